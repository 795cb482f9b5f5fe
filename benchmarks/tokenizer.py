"""Throughput of the audio tokenizer at the released size with random weights.

    python benchmarks/tokenizer.py [--seconds 30] [--dtypes float32,bfloat16] [--repeats 1]

Builds the released architecture (d_model 1280, 32 + 32 layers, 20 quantizers, vocoder 256 x 16),
synthesises --seconds of speech with eSpeak NG (24 kHz), and for each compute dtype prints the
compile time of encode (waveform -> 8 codebooks) and decode (8 codebooks -> waveform), then their
steady-state wall time and real-time factor (seconds of audio processed per second of wall time).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import librosa
import numpy as np
from flax import nnx

from data_pipelines.espeak import synthesize
from mimo_jax.nn.dtypes import DTYPES
from mimo_jax.tokenizer.config import TokenizerConfig
from mimo_jax.tokenizer.model import MiMoAudioTokenizer
from mimo_jax.tokenizer.tokenizer_checkpoint import with_compute_dtype

_TEXT = (
    "The audio tokenizer turns speech into discrete codes at twenty five frames per second, "
    "and turns those codes back into speech. "
)


def speech(seconds: float, rate: int) -> np.ndarray:
    wav, sr = synthesize(_TEXT * 8)
    wav = librosa.resample(wav, orig_sr=sr, target_sr=rate, res_type="soxr_hq")
    reps = int(np.ceil(seconds * rate / wav.size))
    return np.tile(wav, reps)[: int(seconds * rate)].astype(np.float32)


def timed(fn, *args, repeats: int):
    """(compile seconds, best run seconds, output)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return compile_s, best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; the best is shown")
    parser.add_argument("--codebooks", type=int, default=8)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # figures appear as they are measured

    config = TokenizerConfig()
    start = time.perf_counter()
    model = MiMoAudioTokenizer(config, rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()} "
        f"({os.cpu_count()} host cores)"
    )
    print(
        f"model: released size, random weights, {params / 1e9:.3f} B parameters "
        f"(built in {time.perf_counter() - start:.1f} s)"
    )
    wav = speech(args.seconds, config.sampling_rate)
    print(
        f"input: {args.seconds:.1f} s of eSpeak NG speech at {config.sampling_rate} Hz, batch 1, "
        f"{args.codebooks} codebooks"
    )
    wav_in, lengths = jnp.asarray(wav)[None], jnp.asarray([wav.size])

    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        graphdef, state = nnx.split(with_compute_dtype(config, model, dtype))

        def encode(state, wav, lengths):
            return nnx.merge(graphdef, state).encode(wav, lengths, args.codebooks)

        def decode(state, codes, lengths):
            return nnx.merge(graphdef, state).decode(codes, lengths)

        c_enc, t_enc, (codes, code_lengths) = timed(
            encode, state, wav_in, lengths, repeats=args.repeats
        )
        c_dec, t_dec, (out, _) = timed(decode, state, codes, code_lengths, repeats=args.repeats)
        audio = out.shape[1] / config.sampling_rate
        print(
            f"[{name}] encode: compile {c_enc:6.1f} s, run {t_enc:6.2f} s, "
            f"real-time factor {args.seconds / t_enc:6.2f}x ({codes.shape[1]} frames)"
        )
        print(
            f"[{name}] decode: compile {c_dec:6.1f} s, run {t_dec:6.2f} s, "
            f"real-time factor {audio / t_dec:6.2f}x ({audio:.2f} s of audio)"
        )


if __name__ == "__main__":
    main()
