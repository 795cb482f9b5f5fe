"""Compiles a config's train step ahead of time for N simulated devices and reports its per-device
memory and FLOPs, without parameters, data or accelerators (MaxText's train_compile.py idea).

    python -m experiments.aot --config experiments/configs/lm_stage2_7b.py --devices 64 \
        --mesh fsdp=64 [--rules fsdp] [--batch-per-device 1] [--config.model.remat_policy=full]
    python -m experiments.aot --config experiments/configs/tokenizer_stage1.py --devices 8 \
        --config.data.crop_seconds=30

A tokenizer config (stage 1) compiles its step as `experiments.train_tokenizer` runs it: the state
fully sharded over the devices, `--batch-per-device` crops of `data.crop_seconds` on each (--mesh
and --rules are the LM's).

Everything is abstract: the model comes from nnx.eval_shape, the optimizer state from
jax.eval_shape, both as ShapeDtypeStructs carrying the rules' NamedShardings, and the batch is
[batch-per-device x data-parallel devices x grad_accum, context] placed as training places it. The
devices are host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set below before
JAX starts), so the figures are those of XLA's CPU compiler: a guide to what fits, not a TPU/GPU
measurement (those backends fuse and schedule differently). One CPU-only artefact is removed: the
compile runs without loop-invariant code motion, which on the CPU would hoist an f32 copy of every
stacked bf16 weight out of the layer loop (`aot_lib.CPU_COMPILER_OPTIONS` says why).
"""

import os
import sys


def _devices_from_argv(argv: list[str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def _simulate_devices(argv: list[str]) -> None:
    """The device count must reach XLA before JAX initialises its CPU backend."""
    n = _devices_from_argv(argv)
    if n is not None and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        ).strip()
        os.environ["JAX_PLATFORMS"] = "cpu"


_simulate_devices(sys.argv)

import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import aot_lib  # noqa: E402
from experiments.train_tokenizer import is_tokenizer_run  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file[:arg]", lock_config=True
)
_DEVICES = flags.DEFINE_integer("devices", None, "simulated CPU devices to compile for")
_MESH = flags.DEFINE_string(
    "mesh",
    "fsdp=-1",
    "ICI mesh axes, e.g. fsdp=64 or fsdp=32,tensor=2 (unnamed axes are 1; one axis may be -1)",
)
_RULES = flags.DEFINE_enum(
    "rules",
    None,
    ["fsdp", "fsdp_tensor", "data"],
    "sharding rules (default: the config's mesh.rules)",
)
_BATCH_PER_DEVICE = flags.DEFINE_integer(
    "batch-per-device", 1, "rows of `context` groups per data-parallel device"
)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _DEVICES.value is None:
        raise app.UsageError("--config and --devices are required")
    if jax.device_count() != _DEVICES.value:
        print(
            f"error: {jax.device_count()} devices present, {_DEVICES.value} asked for: JAX was "
            "initialised before --devices could set XLA_FLAGS",
            file=sys.stderr,
        )
        return 1
    try:
        if is_tokenizer_run(_CONFIG.value):
            config = aot_lib.configure_tokenizer(_CONFIG.value, _BATCH_PER_DEVICE.value)
            start = time.perf_counter()
            tokenizer_step = aot_lib.compile_tokenizer_step(config)
            print(
                aot_lib.tokenizer_report(config, tokenizer_step, time.perf_counter() - start),
                flush=True,
            )
            return 0
        config = aot_lib.configure(
            _CONFIG.value, aot_lib.parse_mesh(_MESH.value), _RULES.value, _BATCH_PER_DEVICE.value
        )
        start = time.perf_counter()
        result = aot_lib.compile_train_step(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(aot_lib.report(config, result, time.perf_counter() - start), flush=True)
    return 0


if __name__ == "__main__":
    from experiments.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
