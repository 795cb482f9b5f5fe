"""The device check: what one accelerator does with MiMo-Audio, in one command.

    python benchmarks/device_check.py [--out FILE.json] [--smoke]
        [--sections train,generate,tokenizer] [--peak-tflops T]

On one accelerator (an H100, H200 or TPU chip; the CPU for --smoke):
- train: the stage-2 train step of a ~1.5B-parameter LM of the 7B's layout (head dim 128, GQA
  4:1, the 7B's FFN ratio, vocabulary, patch encoder and decoder; 12 layers of width 2048),
  bf16 compute, one 8192-group row per device (data-parallel where there are more): groups/s and
  MFU (analytic model FLOPs per second / the devices' dense bf16 peak) with each attention kernel
  the device runs. Remat is off unless the step does not fit; then the next policy (minimal,
  full) is tried and the figure says which ran.
- generate (on the first device): KV-cached generation of the same LM (bf16 weights, every
  group speech, sampled as the official demo) at batch 1, 8 and 64: decode groups/s (two lengths
  on the same compiled programs, so the prefill cancels), and batch 1 beside its memory-bandwidth
  limit (the weight and KV-cache bytes one group reads / the chip's HBM bandwidth).
- tokenizer: the audio tokenizer at the released size (random weights, bf16), encode and decode
  real-time factors on 60 s of speech at batch 1 and 16.
Prints a table and the targets; --out writes every figure with its settings, the device name and
the jax/jaxlib versions as JSON. --smoke runs the same code at tiny sizes (a test runs it).
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial

import generate as generation_bench
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import tokenizer as tokenizer_bench
import train_step
from flax import nnx

from experiments.configs.common import DEMO_TOKENIZER_HF
from mimo_jax.inference.generation_loop import generate
from mimo_jax.lm.model import MiMoAudioLM, unstack_for_decoding
from mimo_jax.nn.attention import kernels_on
from mimo_jax.tokenizer.config import TokenizerConfig, from_hf
from mimo_jax.tokenizer.model import MiMoAudioTokenizer
from mimo_jax.tokenizer.tokenizer_checkpoint import with_compute_dtype
from mimo_jax.train.build import lm_architecture

SECTIONS = ("train", "generate", "tokenizer")
REMAT_POLICIES = ("none", "minimal", "full")  # tried in this order until the step fits
# HBM bandwidth per device, TB/s (vendor figures).
HBM_TBPS = {
    "H200": 4.8,
    "H100": 3.35,
    "TPU v6 lite": 1.64,
    "TPU v5p": 2.765,
    "TPU v5 lite": 0.819,
    "TPU v4": 1.2,
}


@dataclass(frozen=True)
class Sizes:
    lm: dict  # benchmarks.train_step's size flags
    context: int  # groups per train row
    train_steps: int
    prompt: int  # generation: prompt groups per row
    new: tuple[int, int]  # two generation lengths; their difference is timed
    batches: tuple[int, ...]  # generation
    audio_s: float  # tokenizer input per row
    audio_batches: tuple[int, ...]
    tokenizer: str  # "released" or "demo"
    repeats: int  # timed runs of each program; the best counts


FULL = Sizes(
    lm=dict(
        hidden=2048,
        layers=12,
        heads=16,
        kv_heads=4,
        ffn=5504,
        vocab=151680,
        local_dim=1024,
        local_layers=16,
        input_local_layers=6,
        local_heads=64,
    ),
    context=8192,
    train_steps=5,
    prompt=32,
    new=(16, 80),
    batches=(1, 8, 64),
    audio_s=60.0,
    audio_batches=(1, 16),
    tokenizer="released",
    repeats=2,
)
SMOKE = Sizes(
    lm=dict(
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=1,
        ffn=172,
        vocab=512,
        local_dim=32,
        local_layers=2,
        input_local_layers=2,
        local_heads=4,
    ),
    context=64,
    train_steps=2,
    prompt=4,
    new=(2, 6),
    batches=(1, 4),
    audio_s=2.0,
    audio_batches=(1, 2),
    tokenizer="demo",
    repeats=1,
)


def _out_of_memory(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ---- train ----------------------------------------------------------------------------------
def train_args(sizes: Sizes, attention: str, remat: str) -> argparse.Namespace:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.lm.items()]
    flags += [f"--context={sizes.context}", "--batch=0", f"--steps={sizes.train_steps}"]
    flags += [f"--attention={attention}", f"--remat={remat}"]
    return train_step.parser().parse_args(flags)


def measure_train(sizes: Sizes, attention: str, peak_tflops: float) -> dict:
    """The step with the first remat policy that fits (those that did not, listed)."""
    did_not_fit = []
    for remat in REMAT_POLICIES:
        try:
            r = train_step.measure(train_args(sizes, attention, remat), "bfloat16", "full")
        except Exception as e:  # an allocation failure names itself only in its message
            if not _out_of_memory(e):
                raise
            did_not_fit.append(remat)
            continue
        devices = r["batch"]  # one row per device
        mfu = r["groups_per_s"] * r["flops_per_group"] / (peak_tflops * 1e12 * devices)
        return dict(
            attention=attention,
            remat=remat,
            did_not_fit=did_not_fit,
            mfu=mfu,
            context=sizes.context,
            **r,
        )
    return dict(attention=attention, did_not_fit=did_not_fit)


# ---- generate -------------------------------------------------------------------------------
def lm_config(sizes: Sizes):
    return lm_architecture(train_step.make_config(train_args(sizes, "auto", "none"), "bfloat16"))


def bytes_per_group(model: MiMoAudioLM, cache_groups: int, batch: int = 1) -> int:
    """Bytes one generated group reads at `batch` rows: every weight once (the patch decoder's
    and its input projection at each of its steps, a channel's head at each frame it emits;
    embedding tables are gathered, not read) and the backbone's whole KV cache."""
    c = model.config
    reads = {"local_transformer": c.patch_steps, "speech_embeddings_to_local": c.patch_steps}
    reads |= {"local_transformer_lm_heads": c.group_size, "speech_embeddings": 0}
    total = 0
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        times = 0 if "embed_tokens" in names else reads.get(names[0], 1)
        value = leaf.get_value()  # an array, or its shape and dtype (abstract models too)
        total += times * value.size * jnp.dtype(value.dtype).itemsize
    s = c.backbone_stack()
    cache = 2 * s.layers * s.kv_heads * s.head_dim * cache_groups * jnp.dtype(model.dtype).itemsize
    return total + batch * cache


def measure_generation(model, sizes: Sizes, batch: int) -> dict:
    config = model.config
    text, codes = generation_bench.prompt_batch(config, batch, sizes.prompt)
    cache = sizes.prompt + sizes.new[1]
    runs = {
        new: partial(
            generate,
            model,
            text,
            codes,
            generation_bench.speech_only(config, sizes.prompt + new, generation_bench.SAMPLED),
            cache_groups=cache,  # one cache for both lengths: they share the compiled programs
        )
        for new in sizes.new
    }
    runs[sizes.new[1]]()  # compiles
    seconds = {new: float("inf") for new in sizes.new}
    for seed in range(sizes.repeats):
        for new, run in runs.items():
            start = time.perf_counter()
            run(rng=jax.random.key(seed + 1))
            seconds[new] = min(seconds[new], time.perf_counter() - start)
    (n1, n2), (t1, t2) = sizes.new, (seconds[n] for n in sizes.new)
    return dict(
        batch=batch,
        prompt=sizes.prompt,
        cache_groups=cache,
        groups_per_s=batch * (n2 - n1) / max(t2 - t1, 1e-9),
        end_to_end_groups_per_s=batch * n2 / t2,
        bytes_per_group=bytes_per_group(model, cache, batch),
    )


def generation_model(sizes: Sizes) -> MiMoAudioLM:
    config = lm_config(sizes).replace(remat_policy="none")
    model = MiMoAudioLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    # As MimoAudio.load holds it: unstacked layers decode faster on the CPU.
    return unstack_for_decoding(model) if jax.default_backend() == "cpu" else model


# ---- tokenizer ------------------------------------------------------------------------------
def measure_tokenizer(sizes: Sizes) -> list[dict]:
    config = TokenizerConfig() if sizes.tokenizer == "released" else from_hf(DEMO_TOKENIZER_HF)
    model = with_compute_dtype(config, MiMoAudioTokenizer(config, rngs=nnx.Rngs(0)), jnp.bfloat16)
    graphdef, state = nnx.split(model)
    encode = lambda st, w, n: nnx.merge(graphdef, st).encode(w, n, 8)  # noqa: E731
    decode = lambda st, c, n: nnx.merge(graphdef, st).decode(c, n)  # noqa: E731
    wav = tokenizer_bench.speech(sizes.audio_s, config.sampling_rate)
    rows = []
    for batch in sizes.audio_batches:
        wavs = jnp.asarray(np.tile(wav, (batch, 1)))
        lengths = jnp.full((batch,), wav.size, jnp.int32)
        enc_compile, enc_s, (codes, code_lengths) = tokenizer_bench.timed(
            encode, state, wavs, lengths, repeats=sizes.repeats
        )
        dec_compile, dec_s, (out, _) = tokenizer_bench.timed(
            decode, state, codes, code_lengths, repeats=sizes.repeats
        )
        audio_s = batch * sizes.audio_s
        rows.append(
            dict(
                batch=batch,
                seconds_per_row=sizes.audio_s,
                encode_compile_s=enc_compile,
                encode_s=enc_s,
                encode_rtf=audio_s / enc_s,
                decode_compile_s=dec_compile,
                decode_s=dec_s,
                decode_rtf=batch * out.shape[1] / config.sampling_rate / dec_s,
                frames=int(codes.shape[1]),
            )
        )
    return rows


# ---- the report -----------------------------------------------------------------------------
def targets(report: dict) -> list[tuple[str, float, bool]]:
    """(the target, the figure, met) for each target the run has the figures for."""
    out = []
    mfus = [r["mfu"] for r in report.get("train", []) if "mfu" in r]
    if mfus:
        out.append(("train MFU >= 40% (best attention)", max(mfus), max(mfus) >= 0.40))
    gen = {r["batch"]: r for r in report.get("generate", [])}
    if 1 in gen and 64 in gen:
        ratio = gen[64]["groups_per_s"] / gen[1]["groups_per_s"]
        out.append(("generation batch 64 >= 20x batch 1", ratio, ratio >= 20))
    if 1 in gen and gen[1].get("bandwidth_limit_groups_per_s"):
        share = gen[1]["groups_per_s"] / gen[1]["bandwidth_limit_groups_per_s"]
        out.append(("batch 1 within 2x of its bandwidth limit", share, share >= 0.5))
    tok = {r["batch"]: r for r in report.get("tokenizer", [])}
    if 16 in tok:
        rtf = tok[16]["encode_rtf"]
        out.append(("tokenizer encode >= 200x real time at batch 16", rtf, rtf >= 200))
    return out


def header(report: dict) -> str:
    smoke = ", smoke sizes" if report["smoke"] else ""
    return (
        f"{report['device']} ({report['platform']}), jax {report['jax']}, "
        f"jaxlib {report['jaxlib']}{smoke}"
    )


def train_line(r: dict) -> str:
    if "mfu" not in r:
        return f"train {r['attention']:>6}: does not fit with remat {r['did_not_fit']}"
    return (
        f"train {r['attention']:>6}: {r['params'] / 1e6:.1f} M params, {r['batch']} x "
        f"{r['context']} groups, remat {r['remat']} | compile {r['compile_s']:.1f} s | step "
        f"{r['step_s'] * 1e3:.1f} ms | {r['groups_per_s']:.0f} groups/s | MFU {100 * r['mfu']:.1f}%"
    )


def generate_line(r: dict) -> str:
    limit = r.get("bandwidth_limit_groups_per_s")
    bound = f" | bandwidth limit {limit:.1f} groups/s" if limit else ""
    return (
        f"generate batch {r['batch']:>3}: {r['groups_per_s']:.1f} groups/s decoding "
        f"({r['end_to_end_groups_per_s']:.1f} with the prefill) | "
        f"{r['bytes_per_group'] / 1e9:.3f} GB read per group{bound}"
    )


def tokenizer_line(r: dict) -> str:
    return (
        f"tokenizer batch {r['batch']:>2} x {r['seconds_per_row']:g} s: encode "
        f"{r['encode_rtf']:.1f}x real time (compile {r['encode_compile_s']:.1f} s), decode "
        f"{r['decode_rtf']:.1f}x (compile {r['decode_compile_s']:.1f} s)"
    )


def target_lines(report: dict) -> list[str]:
    if report["smoke"]:
        return ["targets: not judged at smoke sizes"]
    return ["targets:"] + [
        f"  {name}: {value:.3g} {'met' if met else 'NOT met'}"
        for name, value, met in report["targets"]
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/device_check.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="", help="write the figures as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU, under two minutes)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="which parts to run")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the chip's peak")
    a = p.parse_args(argv)
    unknown = set(a.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections {a.sections}: unknown {sorted(unknown)}; expected any of {SECTIONS}")
    return a


def run(a: argparse.Namespace) -> dict:
    """Measures the sections asked for, printing each figure as it comes; the report."""
    sizes, device, started = SMOKE if a.smoke else FULL, jax.devices()[0], time.perf_counter()
    sections = a.sections.split(",")
    report: dict = dict(
        device=device.device_kind,
        platform=device.platform,
        jax=jax.__version__,
        jaxlib=jaxlib.version.__version__,
        smoke=a.smoke,
        sizes=asdict(sizes),
    )
    print(header(report))
    timer = time.perf_counter()

    def section_done(name: str) -> None:
        nonlocal timer
        report.setdefault("section_seconds", {})[name] = time.perf_counter() - timer
        print(f"({name}: {time.perf_counter() - timer:.0f} s)")
        timer = time.perf_counter()

    if "train" in sections:
        peak, source = train_step.peak_tflops(device, a.peak_tflops)
        report.update(peak_tflops=peak, peak_source=source, train=[])
        print(f"peak {peak:.4g} TFLOP/s ({source})")
        for kernel in kernels_on(device.platform):
            report["train"].append(measure_train(sizes, kernel, peak))
            print(train_line(report["train"][-1]))
        section_done("train")
    if "generate" in sections:
        model, bandwidth = generation_model(sizes), train_step.by_device_kind(HBM_TBPS, device)
        report.update(hbm_tbps=bandwidth, generate=[])
        for batch in sizes.batches:
            r = measure_generation(model, sizes, batch)
            if batch == 1 and bandwidth:
                r["bandwidth_limit_groups_per_s"] = bandwidth * 1e12 / r["bytes_per_group"]
            report["generate"].append(r)
            print(generate_line(r))
        del model
        section_done("generate")
    if "tokenizer" in sections:
        report["tokenizer"] = []
        for r in measure_tokenizer(sizes):
            report["tokenizer"].append(r)
            print(tokenizer_line(r))
        section_done("tokenizer")
    report["targets"] = targets(report)
    report["seconds"] = time.perf_counter() - started
    return report


def main(argv=None) -> None:
    a = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # figures appear as they are measured
    report = run(a)
    print("\n".join(target_lines(report)))
    print(f"all in {report['seconds']:.0f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
