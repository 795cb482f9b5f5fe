"""Groups per second and model FLOPs utilisation of the stage-2 train step (patch encoder, backbone,
patch decoder, loss, AdamW) for a model size given on the command line, on the devices present:
full fine-tuning, LoRA (adapters of rank --lora-rank on the backbone's attention and MLP, the
patch encoder and decoder frozen: the config's default `lora` block) and QLoRA (the same adapters
over a base quantised to --qlora-type with --quantize-tile inputs a scale) in the same run.

    python -m benchmarks.train_step [--hidden 256 --layers 4 --heads 4 --kv-heads 2 --ffn 768
        --vocab 4096 --local-dim 128 --local-layers 2 --input-local-layers 2 --local-heads 4
        --attention auto
        --context 256 --batch N --steps 5 --dtypes float32,bfloat16 --methods full,lora,qlora
        --lora-rank 16 --qlora-type int8 --quantize-tile 64 --peak-tflops T]

The defaults take about a minute on a small CPU. Compile time is measured apart from the steps.
MFU = groups/s x analytic FLOPs per group (mimo_jax.train.flops) / (peak x devices); the peak is
--peak-tflops, or the bf16 dense peak of the device kind from PEAK_TFLOPS (CPU: an assumed figure,
see cpu_peak_tflops), used for both dtypes. MFU counts the full step's FLOPs for LoRA too, so
the two are comparable as throughput.
"""

import argparse
import os
import time

import jax
import numpy as np

from experiments.aot_lib import size_of
from experiments.configs import common
from mimo_jax.lm.config import parse_dashed
from mimo_jax.nn.partitioning import use_rules
from mimo_jax.train import build, flops
from sharding.mesh import mesh_and_rules

# Dense bf16 peak TFLOP/s per device (vendor figures, without sparsity).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v6 lite": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}


def cpu_peak_tflops() -> float:
    """Assumed: 3 GHz x 32 FLOP/cycle (two 256-bit FMA units, fp32) per core of this host."""
    return (os.cpu_count() or 1) * 3e9 * 32 / 1e12


def by_device_kind(table: dict[str, float], device) -> float | None:
    """The entry of `table` whose name the device's kind contains, or None."""
    return next((v for k, v in table.items() if k.lower() in device.device_kind.lower()), None)


def peak_tflops(device, given: float | None) -> tuple[float, str]:
    if given:
        return given, "given"
    if device.platform == "cpu":
        return cpu_peak_tflops(), f"assumed for {os.cpu_count()} CPU cores"
    value = by_device_kind(PEAK_TFLOPS, device)
    if value is not None:
        return value, f"{device.device_kind} bf16 dense"
    raise ValueError(f"no peak TFLOP/s known for {device.device_kind!r}: pass --peak-tflops")


METHODS = ("full", "lora", "qlora")


def make_config(a, dtype: str, method: str = "full"):
    c = common.stage(common.base_config(), "stage2")
    c.lora.rank = a.lora_rank if method in ("lora", "qlora") else 0
    c.lora.quantize = a.qlora_type if method == "qlora" else ""
    c.lora.quantize_tile = a.quantize_tile
    c.model.hf.update(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        intermediate_size=a.ffn,
        local_dim=a.local_dim,
        local_layers=a.local_layers,
        local_attn_heads=a.local_heads,
        local_ffn_dim=4 * a.local_dim,
        input_local_layers=a.input_local_layers,
        input_local_dim=a.local_dim,
        sosp_idx=a.vocab - 8,
        eosp_idx=a.vocab - 7,
        empty_idx=a.vocab - 6,
        sostm_idx=a.vocab - 5,
        eostm_idx=a.vocab - 4,
        eot_idx=a.vocab - 3,
    )
    c.model.dtype, c.model.remat_policy, c.model.attention = dtype, a.remat, a.attention
    c.data.batch_size, c.data.context_length = a.batch or jax.device_count(), a.context
    c.mesh.ici = {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1}
    c.mesh.dcn = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1}
    c.mesh.rules = a.rules
    c.total_steps = 1000
    return c


def synthetic_batch(c, lm, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows where half the groups are speech (<|empty|> text, codes supervised by the decoder)."""
    b, g, gs = c.data.batch_size, c.data.context_length, lm.group_size
    vocab = np.asarray(lm.speech_vocab_sizes)
    speech = rng.random((b, g)) < 0.5
    words = rng.integers(0, lm.empty_idx - 8, (b, g))
    text = np.where(speech, lm.empty_idx, words).astype(np.int32)
    codes = (rng.random((b, g, gs, len(vocab))) * (vocab - 1)).astype(np.int32)
    targets = np.roll(text, -1, axis=1)
    weights = np.asarray(parse_dashed(c.loss.weights, float)[1:], np.float32)
    return {
        "text": text,
        "codes": codes,
        "positions": np.broadcast_to(np.arange(g, dtype=np.int32), (b, g)).copy(),
        "segment_ids": np.ones((b, g), np.int32),
        "text_targets": targets,
        "text_weights": np.where(targets == lm.empty_idx, 0.01, 1.0).astype(np.float32),
        "code_targets": np.roll(codes, -1, axis=1),
        "code_weights": (targets == lm.empty_idx)[..., None] * weights,
    }


def measure(a, dtype: str, method: str) -> dict[str, float]:
    c = make_config(a, dtype, method)
    mesh, rules = mesh_and_rules(c)
    build.check_batch_divides(c.data.batch_size, 1, mesh)
    lm, model = build.build_model(c, mesh, rules)
    model = build.add_adapters(c, model, mesh, rules)  # none for full fine-tuning
    trainer, state = build.build_trainer(c, model)
    del model
    with jax.set_mesh(mesh), use_rules(rules):
        batch = build.global_batch(synthetic_batch(c, lm, np.random.default_rng(0)), mesh)
        rng = jax.random.key(0)
        start = time.perf_counter()
        step = build.compile_steps(trainer, state).train.lower(state, batch, rng).compile()
        compile_s = time.perf_counter() - start
        state, metrics = step(state, batch, rng)  # the first run pays for allocations
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(a.steps):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / a.steps
    groups = c.data.batch_size * c.data.context_length
    return {
        "compile_s": compile_s,
        "step_s": seconds,
        "groups_per_s": groups / seconds,
        "flops_per_group": flops.train_flops_per_group(lm, c.data.context_length, True),
        "params": size_of(state.params) + size_of(state.frozen),
        "trainable": size_of(state.params),
        "loss": float(metrics["loss"]),
        "batch": c.data.batch_size,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for name, default in (
        ("hidden", 256),
        ("layers", 4),
        ("heads", 4),
        ("kv-heads", 2),
        ("ffn", 768),
        ("vocab", 4096),
        ("local-dim", 128),
        ("local-layers", 2),
        ("input-local-layers", 2),
        ("local-heads", 4),
        ("context", 256),
        ("batch", 0),
        ("steps", 5),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes to measure")
    p.add_argument(
        "--methods",
        default="full,lora,qlora",
        help="any of full (every parameter trained), lora (adapters only) and qlora (adapters "
        "over a quantised base), comma-separated",
    )
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--qlora-type", default="int8", choices=("int8", "int4"))
    p.add_argument("--quantize-tile", type=int, default=64, help="inputs per quantisation scale")
    p.add_argument("--remat", default="minimal", help="remat policy (none, minimal, full, ...)")
    p.add_argument("--attention", default="auto", help="model.attention: auto, xla, splash, cudnn")
    p.add_argument("--rules", default="fsdp", choices=("fsdp", "fsdp_tensor", "data"))
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s per device for MFU (default: by device kind)",
    )
    return p


def report(a, dtype: str, method: str, r: dict, peak: float) -> None:
    mfu = r["groups_per_s"] * r["flops_per_group"] / (peak * 1e12 * jax.device_count())
    print(
        f"{dtype:>9} {method:>5}: {r['params'] / 1e6:.2f} M params "
        f"({r['trainable'] / 1e6:.3f} M trained), batch {r['batch']} x {a.context} groups | "
        f"compile {r['compile_s']:.1f} s | step {r['step_s'] * 1e3:.1f} ms | "
        f"{r['groups_per_s']:.1f} groups/s | {r['flops_per_group'] / 1e6:.1f} MFLOP/group | "
        f"MFU {100 * mfu:.2f}% | loss {r['loss']:.3f}",
        flush=True,
    )


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    methods = a.methods.split(",")
    if not set(methods) <= set(METHODS):
        raise SystemExit(
            f"--methods {a.methods}: expected any of {', '.join(METHODS)}, comma-separated"
        )
    device = jax.devices()[0]
    peak, source = peak_tflops(device, a.peak_tflops)
    print(
        f"devices: {jax.device_count()} x {device.device_kind}; peak {peak:.3g} TFLOP/s per "
        f"device ({source})"
    )
    for dtype in a.dtypes.split(","):
        results = {m: measure(a, dtype, m) for m in methods}
        for method, r in results.items():
            report(a, dtype, method, r, peak)
        for method in methods:
            if method != "full" and "full" in results:
                ratio = results[method]["groups_per_s"] / results["full"]["groups_per_s"]
                print(f"{dtype:>9}: the {method} step runs {ratio:.2f}x the full step's groups/s")


if __name__ == "__main__":
    main()
