"""Seconds of audio trained per second by the tokenizer's stage-1 step (encoder, RVQ with its EMA
update, decoder, vocoder, multi-scale mel loss, A2T LM, AdamW), random weights, on the devices
present.

    python benchmarks/tokenizer_train.py [--size demo|released] [--crop-seconds 2] [--batch 2]
        [--steps 3] [--a2t-hidden 512 --a2t-layers 4] [--optimizer adamw|none]

`demo` is the demo's tokenizer (d_model 64, 2 + 2 layers); `released` the released architecture
(1.3 B parameters: their float32 values, gradients and AdamW moments take 20.7 GB, and with the
update's temporaries a 24 GiB machine runs out of memory). `--optimizer none` times the step
without AdamW (forward, backward, the codebooks' EMA update; the parameters are not moved), which
fits there; AdamW's update adds an elementwise pass over the parameters. The first batch's k-means
and the compile are timed apart from the steps; the crops are eSpeak NG speech.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizer import speech

from experiments.configs.common import DEMO_TOKENIZER_HF as TOKENIZER_HF
from mimo_jax.tokenizer.a2t import A2TConfig, AudioToTextLM
from mimo_jax.tokenizer.config import TokenizerConfig, from_hf
from mimo_jax.tokenizer.model import MiMoAudioTokenizer
from mimo_jax.tokenizer.stage1 import Stage1Config, Stage1Model, Stage1Trainer

SIZES = {"demo": lambda: from_hf(TOKENIZER_HF), "released": TokenizerConfig}
VOCAB = 4096  # transcripts of random ids: the A2T LM's cost, not its text
OPTIMIZERS = {"adamw": lambda: optax.adamw(1e-4), "none": optax.set_to_zero}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--crop-seconds", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--a2t-hidden", type=int, default=512)
    p.add_argument("--a2t-layers", type=int, default=4)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    return p.parse_args(argv)


def batch_of(config: TokenizerConfig, a) -> dict:
    samples = int(a.crop_seconds * config.sampling_rate)
    clip = speech(a.crop_seconds * a.batch, config.sampling_rate)
    rng = np.random.default_rng(0)
    return {
        "wav": jnp.asarray(clip[: a.batch * samples].reshape(a.batch, samples)),
        "lengths": jnp.full((a.batch,), samples, jnp.int32),
        "text": jnp.asarray(rng.integers(0, VOCAB, (a.batch, a.text_tokens)), jnp.int32),
        "text_lengths": jnp.full((a.batch,), a.text_tokens, jnp.int32),
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    config = SIZES[a.size]()
    a2t = A2TConfig(VOCAB, hidden=a.a2t_hidden, layers=a.a2t_layers, ffn=3 * a.a2t_hidden)
    model = Stage1Model(
        MiMoAudioTokenizer(config, rngs=nnx.Rngs(0)),
        AudioToTextLM(a2t, config.d_model, rngs=nnx.Rngs(1)),
    )
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    trainer, state = Stage1Trainer.create(model, OPTIMIZERS[a.optimizer](), Stage1Config())
    del model
    batch = batch_of(config, a)
    start = time.perf_counter()
    state = trainer.initialise(state, batch, jax.random.key(0))
    kmeans_s = time.perf_counter() - start
    start = time.perf_counter()
    step = jax.jit(trainer.train_step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = step(state, batch)  # the first run pays for allocations
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(a.steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / a.steps
    audio_s = a.batch * a.crop_seconds
    print(
        f"{a.size}: {params / 1e6:.1f} M parameters (A2T LM included) on "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}; batch {a.batch} x "
        f"{a.crop_seconds:g} s, optimizer {a.optimizer} | k-means {kmeans_s:.1f} s | "
        f"compile {compile_s:.1f} s | "
        f"step {step_s * 1e3:.0f} ms | {audio_s / step_s:.2f} s of audio per second | "
        f"loss {float(metrics['loss']):.3f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
