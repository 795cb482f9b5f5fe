"""LM throughput: groups per second of the forward pass and of forward+backward, float32 and
bfloat16, after compilation (compile time printed apart), next to PyTorch `transformers`'
Qwen2Model running the same backbone in the same process (what the official model runs).

    python benchmarks/lm_forward.py [--hidden 768 --layers 12 --heads 12 --kv-heads 4 --ffn 2048
                                     --vocab 16384 --batch 1 --groups 512 --steps 5]

The default is about 100M parameters. The PyTorch side needs the `test` extra (torch,
transformers); without it that column is skipped with a note.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from small_lm import add_size_args, build_config, torch_config

from mimo_jax.lm.model import MiMoAudioLM
from mimo_jax.nn.attention import attention_mask


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--groups", type=int, default=512, help="LLM positions per row")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions")
    p.add_argument("--skip-torch", action="store_true")
    return p.parse_args()


def timed(fn, args, steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - t0) / steps


def bench_jax(config, dtype, a):
    model = MiMoAudioLM(config, dtype=dtype, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.integers(0, config.vocab_size - 8, (a.batch, a.groups)), jnp.int32)
    codes = jnp.asarray(
        rng.integers(0, 128, (a.batch, a.groups, config.group_size, config.audio_channels)),
        jnp.int32,
    )
    text = text.at[:, ::2].set(config.empty_idx)  # half the groups are speech
    pos = jnp.broadcast_to(jnp.arange(a.groups), (a.batch, a.groups))
    embeds = jax.random.normal(jax.random.key(0), (a.batch, a.groups, config.hidden_size), dtype)
    graphdef, state = nnx.split(model)

    @jax.jit
    def backbone(state, embeds):
        m = nnx.merge(graphdef, state)
        hidden, _ = m.model(embeds, pos, attention_mask(pos, pos, causal=True))
        return hidden

    @jax.jit
    def lm_forward(state, text, codes):
        m = nnx.merge(graphdef, state)
        return m.text_logits(m(text, codes))

    @jax.jit
    def lm_train(state, text, codes):
        def loss(state):
            m = nnx.merge(graphdef, state)
            logits = m.text_logits(m(text, codes)).astype(jnp.float32)
            return jax.nn.logsumexp(logits, -1).mean() - logits[..., 0].mean()

        return jax.grad(loss)(state)

    return n_params, {
        "backbone forward": timed(backbone, (state, embeds), a.steps),
        "LM forward": timed(lm_forward, (state, text, codes), a.steps),
        "LM forward+backward": timed(lm_train, (state, text, codes), a.steps),
    }


def bench_torch(config, dtype_name, a):
    import torch
    from transformers import Qwen2Model

    torch.manual_seed(0)
    cfg = torch_config(config)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    model = Qwen2Model(cfg).to(dtype).eval()
    embeds = torch.randn(a.batch, a.groups, config.hidden_size, dtype=dtype)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(inputs_embeds=embeds)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(a.steps):
            model(inputs_embeds=embeds)
    return first, (time.perf_counter() - t0) / a.steps


def main():
    a = parse_args()
    config = build_config(a)
    groups = a.batch * a.groups
    print(f"devices: {jax.devices()}  batch {a.batch} x {a.groups} groups")
    torch_ok = not a.skip_torch
    if torch_ok:
        try:
            import torch
            import transformers

            print(
                f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                f"transformers {transformers.__version__}"
            )
        except ImportError:
            print("PyTorch comparison skipped: install the `test` extra (pip install -e '.[test]')")
            torch_ok = False
    for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        n_params, results = bench_jax(config, dtype, a)
        print(f"\n== {dtype_name}: {n_params / 1e6:.1f}M parameters")
        print(f"{'':24s}{'compile s':>11s}{'step ms':>10s}{'groups/s':>11s}")
        for name, (compile_s, step_s) in results.items():
            print(
                f"{'jax ' + name:24s}{compile_s:11.2f}{step_s * 1e3:10.1f}{groups / step_s:11.0f}"
            )
        if torch_ok:
            first_s, step_s = bench_torch(config, dtype_name, a)
            ours = results["backbone forward"][1]
            print(
                f"{'torch Qwen2Model fwd':24s}{first_s:11.2f}{step_s * 1e3:10.1f}"
                f"{groups / step_s:11.0f}"
            )
            print(f"backbone forward, jax / torch groups per second: {step_s / ours:.2f}x")


if __name__ == "__main__":
    main()
