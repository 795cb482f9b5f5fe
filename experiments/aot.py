"""Compiles a config's train step ahead of time, for N simulated CPU devices or for a TPU
topology with libtpu's own compiler, and reports its per-device memory and FLOPs, without
parameters, data or accelerators (MaxText's train_compile.py idea).

    python -m experiments.aot --config experiments/configs/lm_stage2_7b.py --devices 64 \
        --mesh fsdp=64 [--rules fsdp] [--batch-per-device 1] [--config.model.remat_policy=full]
    python -m experiments.aot --config experiments/configs/lm_stage2_7b.py --topology v5p:4x4x4 \
        --mesh fsdp=64 [--num-slices 2] [--max-batch]
    python -m experiments.aot --config experiments/configs/tokenizer_stage1.py --devices 8 \
        --config.data.crop_seconds=30

A tokenizer config (stage 1) compiles its step as `experiments.train_tokenizer` runs it: the state
placed by the mesh and its rules as an LM's is, `--batch-per-device` crops of `data.crop_seconds`
on each data-parallel device.

Everything is abstract: the model comes from nnx.eval_shape, the optimizer state from
jax.eval_shape, both as ShapeDtypeStructs carrying the rules' NamedShardings, and the batch is
[batch-per-device x data-parallel devices x grad_accum, context] placed as training places it.

`--topology NAME` (any name libtpu accepts for a v4, v5e, v5p or v6e slice: v5p:4x4x4, v5e:8x8,
v6e:8x8, v4:4x4x4, ...) compiles for the devices libtpu lays out for it (64 for v5p:4x4x4 and
v5e:8x8, 128 for v4:4x4x4, whose chips are two devices each), on any machine with the `tpu` extra
and no TPU; `--num-slices N` takes N such slices, data-parallel (the mesh's `data` axis over the
data-centre network). The memory figures are libtpu's, checked against the HBM of a chip (v4 32
GiB, v5e 16, v5p 95, v6e 32): a device holds the per-device memory and its program's code. A step
that needs more than a device has does not fit and exits with status 1 (libtpu refuses some
itself while compiling). `--max-batch` searches the batch per device (doubling from 1, then
bisecting, each candidate compiled, up to aot_lib.MAX_BATCH_LIMIT) and reports the largest that
fits. From libtpu on a 2-core CPU-only machine, the 7B stage-2 step with one 8192-group row per
chip (fsdp=64, full remat): v5p:4x4x4 9.12 GiB of 95 with the code (arguments 1.41, temporaries
7.54, code 0.16), in 6.5 minutes; v5e:8x8 9.40 GiB of 16, in 11 minutes.

`--devices N` compiles for N host CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
set below before JAX starts), so the figures are those of XLA's CPU compiler: a guide to what fits,
not a TPU/GPU measurement (those backends fuse and schedule differently). One CPU-only artefact is
removed: the CPU compile runs without loop-invariant code motion, which on the CPU would hoist an
f32 copy of every stacked bf16 weight out of the layer loop (`aot_lib.CPU_COMPILER_OPTIONS` says
why); libtpu gets no such option.

The compiled FLOPs are XLA's cost analysis of one device's program, which counts a loop's body
once: a scanned stack of layers as one layer. The analytic ones are the train loop's MFU formula
(mimo_jax.train.flops; the LM's only).
"""

import os
import sys


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _choose_backend(argv: list[str]) -> None:
    """The device count must reach XLA before JAX initialises its CPU backend; a TPU topology
    needs no local accelerator (and on a TPU VM leaves its chips alone)."""
    if "jax" in sys.modules:
        return
    n = _flag_value(argv, "devices")
    if n is not None and n.isdigit():
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        ).strip()
    if n is not None or _flag_value(argv, "topology") is not None:
        os.environ["JAX_PLATFORMS"] = "cpu"


_choose_backend(sys.argv)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import aot_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file[:arg]", lock_config=True
)
_DEVICES = flags.DEFINE_integer("devices", None, "simulated CPU devices to compile for")
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "TPU topology to compile for (libtpu's compiler), e.g. v5p:4x4x4, v5e:8x8, v6e:8x8, v4:4x4x4",
)
_NUM_SLICES = flags.DEFINE_integer(
    "num-slices", 1, "slices of --topology, data-parallel over the data-centre network"
)
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
    "batch-per-device", 1, "rows of `context` groups (tokenizer: crops) per data-parallel device"
)
_MAX_BATCH = flags.DEFINE_bool(
    "max-batch",
    False,
    "with --topology: search for the largest batch per device that fits a chip's HBM",
)


def _usage_problem(argv) -> str | None:
    if len(argv) > 1:
        return f"unexpected arguments: {argv[1:]}"
    if _CONFIG.value is None:
        return "--config is required"
    if (_DEVICES.value is None) == (_TOPOLOGY.value is None):
        return "expected one of --devices N (simulated CPU devices) or --topology NAME (a TPU's)"
    if flags.FLAGS["num-slices"].present and _TOPOLOGY.value is None:
        return "--num-slices needs --topology"
    if _MAX_BATCH.value and _TOPOLOGY.value is None:
        return "--max-batch needs --topology: the HBM of a TPU chip to fit"
    if _MAX_BATCH.value and flags.FLAGS["batch-per-device"].present:
        return "--max-batch searches the batch per device: leave out --batch-per-device"
    return None


def main(argv) -> int:
    problem = _usage_problem(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    if _DEVICES.value is not None and jax.device_count() != _DEVICES.value:
        print(
            f"error: {jax.device_count()} devices present, {_DEVICES.value} asked for: JAX was "
            "initialised before --devices could set XLA_FLAGS",
            file=sys.stderr,
        )
        return 1
    try:
        if _TOPOLOGY.value is None:
            target = aot_lib.cpu_target()
        else:
            target = aot_lib.tpu_target(_TOPOLOGY.value, _NUM_SLICES.value)
        return aot_lib.run(
            _CONFIG.value,
            target,
            _MESH.value,
            _RULES.value,
            _BATCH_PER_DEVICE.value,
            _MAX_BATCH.value,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    from experiments.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
