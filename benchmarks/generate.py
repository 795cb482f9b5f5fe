"""Generation throughput: groups per second of KV-cached generation (prompt prefill included),
greedy and sampled, after compilation, next to PyTorch `transformers`' Qwen2ForCausalLM.generate
of the same backbone (KV cache, greedy; the official loop runs it one request at a time). Every
generated group is speech, so ours also runs the patch decoder (11 local steps) per group. Then
streaming TTS at batch 1 (sampled): the time to first audio (generation handed back every
--stream-chunk groups, its frames through the streaming decoder of a random audio tokenizer, the
demo's size) beside the end-to-end time of the same stream.

    python benchmarks/generate.py [--quick] [--batches 1,8,32 --prompt 16 --new 32]

The default is about 100M parameters with random weights, float32 on both sides. `--quick` runs a
tiny model for a few steps (a smoke test). The PyTorch side needs the `test` extra (torch,
transformers); without it those columns are skipped with a note.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from small_lm import add_size_args, build_config, torch_config

from mimo_jax.inference.generation_loop import GenerationConfig, generate, generate_chunks
from mimo_jax.inference.sampling import SamplerConfig
from mimo_jax.lm.model import MiMoAudioLM, unstack_for_decoding
from mimo_jax.tokenizer.streaming import StreamingDecoder

# The official demo's default patch sampler (T 0.9, top-k 50, top-p 0.95). The text token
# is drawn at T 0.6 without top-k/top-p: they could filter out `<|empty|>`, the one id allowed here.
SAMPLED = dict(
    text_sampler=SamplerConfig(True, 0.6), patch_sampler=SamplerConfig(True, 0.9, 50, 0.95)
)
QUICK = dict(
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    ffn=128,
    vocab=512,
    local_dim=32,
    prompt=4,
    new=4,
    reps=1,
    batches="1",
    torch_batches="1",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_args(p)
    p.add_argument("--local-dim", type=int, default=256)
    p.add_argument("--prompt", type=int, default=16, help="prompt groups per row")
    p.add_argument("--new", type=int, default=32, help="generated groups per row")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--torch-batches", default="1,8")
    p.add_argument(
        "--stream-chunk",
        type=int,
        default=4,
        help="streaming TTS: groups generated between hand-backs",
    )
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps")
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    return a


def prompt_batch(config, batch, groups):
    """Random prompts of `groups` groups per row, every other group speech."""
    rng = np.random.default_rng(0)
    text = rng.integers(0, config.vocab_size - 8, (batch, groups)).astype(np.int32)
    text[:, ::2] = config.empty_idx  # half the prompt groups are speech
    codes = rng.integers(
        0,
        min(config.speech_vocab_sizes) - 1,
        (batch, groups, config.group_size, config.audio_channels),
    )
    return text, codes.astype(np.int32)


def speech_only(config, length: int, sampler: dict) -> GenerationConfig:
    """Every generated group is speech (all other text ids are forbidden until the end), so each
    one runs the patch decoder: the TTS case, the heaviest. `length`: groups, prompt included."""
    others = tuple(i for i in range(config.vocab_size) if i != config.empty_idx)
    return GenerationConfig(max_length=length, min_length=length, stop_ids=others, **sampler)


def bench_jax(model, config, batch, a, sampler):
    text, codes = prompt_batch(config, batch, a.prompt)
    gen = speech_only(config, a.prompt + a.new, sampler)
    t0 = time.perf_counter()
    out = generate(model, text, codes, gen)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(a.reps):
        out = generate(model, text, codes, gen, rng=jax.random.key(i + 1))
    step_s = (time.perf_counter() - t0) / a.reps
    speech = float((out.text[:, a.prompt :] == config.empty_idx).mean())
    return compile_s, batch * a.new / step_s, speech


def _audio_tokenizer():
    from experiments.configs.common import DEMO_TOKENIZER_HF as TOKENIZER_HF
    from mimo_jax.tokenizer.audio_tokenizer import Tokenizer
    from mimo_jax.tokenizer.config import from_hf
    from mimo_jax.tokenizer.model import MiMoAudioTokenizer

    config = from_hf(TOKENIZER_HF)
    return Tokenizer(config, MiMoAudioTokenizer(config, rngs=nnx.Rngs(0)))


def bench_stream(model, config, a, tokenizer):
    """(seconds to the first audio, seconds to the end) of one streamed TTS request, after a
    first run that compiles."""
    text, codes = prompt_batch(config, 1, a.prompt)
    gen = speech_only(config, a.prompt + a.new, SAMPLED)

    def run(seed):
        decoder, first = StreamingDecoder(tokenizer), None
        t0 = time.perf_counter()
        for chunk in generate_chunks(
            model, text, codes, gen, chunk_groups=a.stream_chunk, rng=jax.random.key(seed)
        ):
            wav = decoder.push([chunk.codes[0].reshape(-1, config.audio_channels)])[0]
            if first is None and len(wav):
                first = time.perf_counter() - t0
        decoder.finish()
        end = time.perf_counter() - t0
        return end if first is None else first, end

    run(0)
    return run(1)


def bench_torch(config, batch, a):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = torch_config(config)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = torch.as_tensor(prompt_batch(config, batch, a.prompt)[0], dtype=torch.long)
    kw = dict(
        max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, use_cache=True, pad_token_id=0
    )
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(a.reps):
            model.generate(ids, **kw)
    return first_s, batch * a.new / ((time.perf_counter() - t0) / a.reps)


def torch_available(a):
    if a.skip_torch:
        print("PyTorch comparison skipped (--skip-torch)")
        return False
    try:
        import torch
        import transformers
    except ImportError:
        print(
            "PyTorch comparison skipped: torch/transformers not importable "
            "(install the `test` extra: pip install -e '.[test]')"
        )
        return False
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}"
    )
    return True


def main(argv=None):
    a = parse_args(argv)
    config = build_config(a, a.local_dim)
    # As MimoAudio.load holds it: the transformer stacks' layers unstacked for decoding.
    model = unstack_for_decoding(MiMoAudioLM(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"devices: {jax.devices()}  {n_params / 1e6:.1f}M parameters, float32, "
        f"{a.prompt} prompt + {a.new} new groups per row"
    )
    use_torch = torch_available(a)
    rows = {}
    for batch in (int(b) for b in a.batches.split(",")):
        for name, sampler in (("greedy", {}), ("sampled", SAMPLED)):
            rows[f"jax {name}", batch] = bench_jax(model, config, batch, a, sampler)
        if use_torch and str(batch) in a.torch_batches.split(","):
            first_s, gps = bench_torch(config, batch, a)
            rows["torch greedy", batch] = (first_s, gps, float("nan"))
    print(f"\n{'':14s}{'batch':>6s}{'compile s':>11s}{'groups/s':>11s}{'speech':>8s}")
    for (name, batch), (compile_s, gps, speech) in rows.items():
        print(f"{name:14s}{batch:6d}{compile_s:11.2f}{gps:11.1f}{speech:8.2f}")
    first_s, end_s = bench_stream(model, config, a, _audio_tokenizer())
    print(
        f"\nstreaming TTS, batch 1, sampled, {a.stream_chunk} groups per chunk: first audio "
        f"after {first_s:.2f} s, end to end {end_s:.2f} s ({a.new} groups)"
    )
    print("\ntargets:")
    for name in ("greedy", "sampled"):
        ours = {b: r[1] for (n, b), r in rows.items() if n == f"jax {name}"}
        if ("torch greedy", 1) in rows and 1 in ours:
            theirs = rows["torch greedy", 1][1]
            print(
                f"  {name}: jax batch 1 >= torch batch 1: {ours[1]:.1f} vs {theirs:.1f} "
                f"{'met' if ours[1] >= theirs else 'NOT met'}"
            )
        if 1 in ours and 8 in ours:
            print(
                f"  {name}: jax batch 8 >= 4x jax batch 1: {ours[8] / ours[1]:.2f}x "
                f"{'met' if ours[8] >= 4 * ours[1] else 'NOT met'}"
            )


if __name__ == "__main__":
    main()
