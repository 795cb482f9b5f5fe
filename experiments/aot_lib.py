"""Ahead-of-time compilation of the train step from abstract values (see experiments/aot.py)."""

import contextlib
import dataclasses
import math
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.lm.model import MiMoAudioLM
from mimo_jax.nn.dtypes import dtype_named
from mimo_jax.nn.partitioning import batch_sharding, state_shardings, use_rules
from mimo_jax.nn.quantized import QuantizedKernel
from mimo_jax.train import batch, build, flops, tokenizer_build
from mimo_jax.train.step import opt_state_shardings
from sharding.mesh import AXES, mesh_and_rules

GIB = 2**30

# HBM of one chip by the device kind libtpu reports (vendor figures), and the topology names of
# those chips; a chip whose two TensorCores are two devices (v4) gives each half.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
TOPOLOGY_NAMES = (
    "GENERATION:SHAPE with GENERATION one of v4, v5e, v5p, v6e "
    "(e.g. v5p:4x4x4, v5e:8x8, v6e:8x8, v4:4x4x4)"
)
MAX_BATCH_LIMIT = 1024  # --max-batch searches 1..this many rows (or crops) per device

# XLA:CPU has no bf16 arithmetic: it rewrites every bf16 op to f32 (FloatNormalization), which
# turns each scanned layer's weight slice into a slice of an f32 convert of the whole stacked
# weight; loop-invariant code motion then hoists that convert out of the layer loop, so the CPU
# program holds an f32 copy of every stacked bf16 weight (24 GiB for the 7B backbone) that a
# GPU/TPU program, with bf16 dots, does not. Without the hoisting the convert fuses into the slice.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


@dataclasses.dataclass(frozen=True)
class Target:
    """The devices a step compiles for: the host's CPU devices (XLA's CPU compiler), or those of a
    TPU topology as libtpu describes them (its TPU compiler), with the HBM of one chip."""

    name: str
    devices: tuple
    slices: int = 1
    devices_per_chip: int = 1
    hbm_per_chip: int | None = None  # bytes; None for CPU devices

    @property
    def tpu(self) -> bool:
        return self.hbm_per_chip is not None

    @property
    def hbm_per_device(self) -> int:
        assert self.hbm_per_chip is not None
        return self.hbm_per_chip // self.devices_per_chip

    @property
    def compiler_options(self):
        return None if self.tpu else CPU_COMPILER_OPTIONS

    @property
    def kind(self) -> str:
        return self.devices[0].device_kind


def cpu_target() -> Target:
    return Target(f"{jax.device_count()} simulated CPU devices", tuple(jax.devices()))


def _first_line(error: Exception) -> str:
    line = str(error).strip().splitlines()[0]
    return line.split(": ", 1)[1] if line.split(":")[0].isupper() else line


@contextlib.contextmanager
def _libtpu_environment():
    """The environment libtpu reads as it loads, restored afterwards. This process is a host of
    its own, not a TPU VM's worker (on a machine without TPU metadata libtpu otherwise prints
    warnings about both), and it opens no TPU, so it need not hold libtpu's one-process-per-machine
    lock. What JAX and libtpu add while loading (TPU_WORKER_HOSTNAMES among them) goes too: a
    later jax.distributed setup in this process, or a process it starts, would take it for a TPU
    pod's."""
    saved = dict(os.environ)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def tpu_target(topology: str, slices: int = 1) -> Target:
    """The devices of `slices` slices of the TPU topology `topology` (e.g. v5p:4x4x4), as libtpu
    lays them out; ValueError naming the problem and the accepted names."""
    from jax.experimental import topologies

    if slices < 1:
        raise ValueError(f"--num-slices {slices}: expected at least 1")
    try:
        with _libtpu_environment():
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=topology, num_slices=slices
            )
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(
            f"--topology {topology}: libtpu refuses it ({_first_line(e)}); expected "
            + TOPOLOGY_NAMES
        ) from None
    except RuntimeError:
        raise ValueError(
            f"--topology {topology}: libtpu is not installed; install the tpu extra "
            "(pip install -e '.[tpu]')"
        ) from None
    devices: tuple[Any, ...] = tuple(desc.devices)  # TPU devices: device_kind, coords
    kind = devices[0].device_kind
    if kind not in HBM_GIB:
        raise ValueError(
            f"--topology {topology}: no HBM size known for {kind} chips; expected " + TOPOLOGY_NAMES
        )
    chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}
    return Target(topology, devices, slices, len(devices) // len(chips), HBM_GIB[kind] * GIB)


class DoesNotFit(Exception):
    """libtpu refused to compile the step: it needs more HBM than a device has."""


@contextlib.contextmanager
def _no_cache_entry(target: Target):
    """A TPU executable compiled without a TPU cannot be loaded back from JAX's persistent cache
    (libtpu needs a TPU client for that): none is written, so none is read and warned about."""
    key = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, key)
    if target.tpu:
        jax.config.update(key, float("inf"))
    try:
        yield
    finally:
        jax.config.update(key, before)


def compile_for(target: Target, lowered):
    """`lowered` compiled by the target's compiler; DoesNotFit where libtpu runs out of HBM."""
    with _no_cache_entry(target):
        try:
            return lowered.compile(target.compiler_options)
        except jax.errors.JaxRuntimeError as e:
            if target.tpu and str(e).startswith("RESOURCE_EXHAUSTED"):
                raise DoesNotFit(f"libtpu: {_first_line(e)}") from None
            raise


def compiled_flops(compiled) -> float:
    """XLA's FLOP count for one device's program."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def compiled_flops_line(count: float) -> str:
    # XLA's cost analysis (CPU and TPU alike) counts a while loop's body once, not once per trip.
    return (
        f"  compiled (XLA cost analysis)     {count:.4e}  (a loop's body once: one scanned layer)"
    )


def parse_mesh(text: str) -> dict[str, int]:
    """`"fsdp=32,tensor=2"` -> every mesh axis with its size (1 where not named)."""
    sizes = {a: 1 for a in AXES}
    for item in filter(None, text.split(",")):
        name, sep, value = item.partition("=")
        if not sep or name not in AXES:
            raise ValueError(f"--mesh item {item!r}: expected AXIS=SIZE with AXIS one of {AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"--mesh item {item!r}: the size must be an integer") from None
    return sizes


def configure(
    config,
    ici: dict[str, int],
    rules: str | None,
    batch_per_device: int,
    target: Target | None = None,
) -> ml_collections.ConfigDict:
    """A copy of the config on the mesh `ici` within a slice of the target (default: the CPU
    devices), its slices data-parallel, with a global batch of `batch_per_device` rows per
    data-parallel device per micro-batch."""
    if batch_per_device < 1:
        raise ValueError(f"--batch-per-device {batch_per_device}: expected at least 1")
    target = target or cpu_target()
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh.ici = ici
    config.mesh.dcn = {a: target.slices if a == "data" else 1 for a in AXES}
    if rules:
        config.mesh.rules = rules
    mesh, _ = mesh_and_rules(config, target.devices)
    accum = config.optimizer.get("grad_accum", 1)  # the tokenizer's steps accumulate none
    config.data.batch_size = batch_per_device * build.data_ways(mesh) * accum
    return config


def abstract_batch(config, lm: MiMoAudioConfig, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    fields = batch.shapes(
        config.data.batch_size, config.data.context_length, lm.group_size, lm.audio_channels
    )
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
        for k, (shape, dtype) in fields.items()
    }


def _with_shardings(abstract, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def abstract_state(config, mesh, rules):
    """(lm config, trainer, train state of ShapeDtypeStructs with the shardings training uses)."""
    lm = MiMoAudioConfig.from_hf(
        dict(config.model.hf),
        remat_policy=config.model.remat_policy,
        attention=config.model.attention,
    )
    dtype = dtype_named(config.model.dtype, "config model.dtype")
    param_dtype = dtype_named(config.model.param_dtype, "config model.param_dtype")
    built = {}

    def make():
        model = MiMoAudioLM(lm, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(config.seed))
        built["trainer"], state = build.build_trainer(config, build.apply_adapters(config, model))
        return state

    state = jax.eval_shape(make)
    trainer = built["trainer"]
    params = _with_shardings(state.params, state_shardings(state.params, mesh, rules))
    frozen = _with_shardings(state.frozen, state_shardings(state.frozen, mesh, rules))
    opt_shardings = opt_state_shardings(trainer.tx, params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = state.replace(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=params,
        frozen=frozen,
        opt_state=_with_shardings(state.opt_state, opt_shardings),
    )
    return lm, trainer, state


@dataclasses.dataclass
class Compiled:
    lm: MiMoAudioConfig
    trains_patch_decoder: bool
    memory: object  # CompiledMemoryStats
    flops: float  # XLA's count for one device's program
    devices: int
    compile_s: float
    trainable: int  # parameters the step updates (LoRA: the adapters and fully trained groups)
    total: int  # every parameter of the train state, adapters included


def size_of(state) -> int:
    """Parameters of an nnx.State: the entries of its floating-point parameters, and of the values
    of a quantised kernel (its scales are not parameters)."""
    count = 0
    for _, var in nnx.to_flat_state(state):
        value = var.get_value()
        floating = jnp.issubdtype(value.dtype, jnp.floating)
        if (isinstance(var, nnx.Param) and floating) or (
            isinstance(var, QuantizedKernel) and not floating
        ):
            count += math.prod(value.shape)
    return count


def compile_train_step(config, target: Target | None = None) -> Compiled:
    target = target or cpu_target()
    mesh, rules = mesh_and_rules(config, target.devices)
    build.check_batch_divides(config.data.batch_size, config.optimizer.grad_accum, mesh)
    with jax.set_mesh(mesh), use_rules(rules):
        lm, trainer, state = abstract_state(config, mesh, rules)
        batch = abstract_batch(config, lm, mesh)
        key = jax.eval_shape(lambda: jax.random.key(0))
        replicated = NamedSharding(mesh, PartitionSpec())
        rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
        start = time.perf_counter()
        step = build.compile_steps(trainer, state).train
        compiled = compile_for(target, step.lower(state, batch, rng))
        seconds = time.perf_counter() - start
    return Compiled(
        lm,
        trainer.loss.trains_patch_decoder,
        compiled.memory_analysis(),
        compiled_flops(compiled),
        mesh.size,
        seconds,
        size_of(state.params),
        size_of(state.params) + size_of(state.frozen),
    )


def total_bytes(m) -> int:
    """What one device holds at the peak: arguments, outputs and temporaries, less the outputs
    that reuse donated argument buffers."""
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def hbm_bytes(m) -> int:
    """What a TPU device's HBM holds: the peak of `total_bytes` and the program's code."""
    return total_bytes(m) + m.generated_code_size_in_bytes


def fits(m, target: Target) -> bool:
    return hbm_bytes(m) <= target.hbm_per_device


def _gib(b: int) -> str:
    return f"{b / GIB:8.3f} GiB  ({b} bytes)"


def _host_ram_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def target_line(target: Target) -> str:
    if target.hbm_per_chip is None:
        return f"target: {target.name} (XLA's CPU compiler)"
    chip = (
        "one per chip"
        if target.devices_per_chip == 1
        else f"{target.devices_per_chip} per chip, {target.hbm_per_chip / GIB:g} GiB HBM each chip"
    )
    return (
        f"target: {target.name} x {target.slices} slice(s): {len(target.devices)} "
        f"{target.kind} devices ({chip}), libtpu's compiler"
    )


def memory_lines(m, target: Target) -> list[str]:
    """The per-device figures of XLA's memory analysis; on a TPU, what HBM holds and whether it
    fits."""
    lines = [
        "memory per device:",
        f"  arguments     {_gib(m.argument_size_in_bytes)}",
        f"  outputs       {_gib(m.output_size_in_bytes)}",
        f"  temporaries   {_gib(m.temp_size_in_bytes)}",
        f"  aliased       {_gib(m.alias_size_in_bytes)}",
        f"  code          {_gib(m.generated_code_size_in_bytes)}",
        f"per-device memory: {total_bytes(m) / GIB:.3f} GiB",
    ]
    if target.tpu:
        verdict = "fits" if fits(m, target) else "does not fit"
        lines.append(
            f"HBM per device: {hbm_bytes(m) / GIB:.3f} GiB ({hbm_bytes(m)} bytes, with the code) "
            f"of {target.hbm_per_device / GIB:g} GiB: {verdict}"
        )
    return lines


def report(config, r: Compiled, elapsed_s: float, target: Target | None = None) -> str:
    target = target or cpu_target()
    groups = config.data.batch_size * config.data.context_length
    n = flops.parameter_count(r.lm)
    six_n = 6.0 * n * groups
    analytic = (
        flops.train_flops_per_group(r.lm, config.data.context_length, r.trains_patch_decoder)
        * groups
    )
    dcn = {a: s for a, s in dict(config.mesh.dcn).items() if s > 1}
    lines = [
        target_line(target),
        f"mesh {dict(config.mesh.ici)}{f' x dcn {dcn}' if dcn else ''} on {r.devices} devices, "
        f"rules {config.mesh.rules}, remat {config.model.remat_policy}, "
        f"attention {config.model.attention}, "
        f"dtype {config.model.dtype}/{config.model.param_dtype}",
        f"global batch {config.data.batch_size} rows x {config.data.context_length} groups "
        f"(grad_accum {config.optimizer.grad_accum}); parameters {n / 1e9:.3f} B",
        f"trainable parameters {r.trainable:,} of {r.total:,} "
        f"({100 * r.trainable / r.total:.2f} %)",
        f"compile {r.compile_s:.1f} s (all {elapsed_s:.1f} s); "
        f"peak host RAM {_host_ram_gib():.2f} GiB",
        "FLOPs per device per step:",
        compiled_flops_line(r.flops),
        f"  analytic 6*N*tokens              {six_n / r.devices:.4e}",
        f"  analytic train_flops_per_group   {analytic / r.devices:.4e}",
        *memory_lines(r.memory, target),
    ]
    return "\n".join(lines)


# ---- tokenizer training -----------------------------------------------------------------------
MIMO_TEXT_VOCAB = 151680  # the released text tokenizer's, the A2T LM's vocabulary at full size


@dataclasses.dataclass
class CompiledTokenizerStep:
    memory: object  # CompiledMemoryStats
    flops: float  # XLA's count for one device's program
    devices: int
    compile_s: float
    parameters: int  # the tokenizer's and the A2T LM's
    crop_samples: int
    sampling_rate: int


def compile_tokenizer_step(
    config, text_vocab: int = MIMO_TEXT_VOCAB, target: Target | None = None
) -> CompiledTokenizerStep:
    """The stage-1 tokenizer step as a run compiles it (`experiments.train_tokenizer`), from
    abstract values: the state placed by the config's mesh and rules over the target's devices
    (default: the CPU devices), the crops split over data x fsdp."""
    if config.task != "tokenizer_stage1":
        raise ValueError(f"task {config.task!r}: experiments.aot compiles tokenizer_stage1 steps")
    target = target or cpu_target()
    mesh, rules = mesh_and_rules(config, target.devices)
    built = {}

    def make():
        built["tokenizer"], built["trainer"], state = tokenizer_build.build(config, text_vocab)
        return state

    abstract = jax.eval_shape(make)
    trainer, tok = built["trainer"], built["tokenizer"]
    placed = tokenizer_build.train_state_shardings(abstract, mesh, rules)
    state = _with_shardings(abstract, placed)
    samples = tokenizer_build.crop_samples(config, tok.sampling_rate)
    b, tokens = config.data.batch_size, config.data.max_text_tokens
    shapes = {
        "wav": ((b, samples), jnp.float32),
        "lengths": ((b,), jnp.int32),
        "text": ((b, tokens), jnp.int32),
        "text_lengths": ((b,), jnp.int32),
    }
    batch = {
        k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(mesh, len(s)))
        for k, (s, d) in shapes.items()
    }
    start = time.perf_counter()
    step = jax.jit(trainer.train_step, donate_argnums=0, out_shardings=(placed, None))
    with jax.set_mesh(mesh), use_rules(rules):  # as the training loop traces it
        lowered = step.lower(state, batch)
    compiled = compile_for(target, lowered)
    return CompiledTokenizerStep(
        compiled.memory_analysis(),
        compiled_flops(compiled),
        mesh.size,
        time.perf_counter() - start,
        size_of(state.params) + size_of(state.frozen),
        samples,
        tok.sampling_rate,
    )


def tokenizer_report(
    config, r: CompiledTokenizerStep, elapsed_s: float, target: Target | None = None
) -> str:
    target = target or cpu_target()
    per_device = config.data.batch_size // r.devices
    return "\n".join(
        [
            target_line(target),
            f"{config.task} on {r.devices} devices (state sharded by mesh.rules "
            f"{config.mesh.rules}), remat "
            f"{config.model.remat_policy}, attention {config.model.attention}; "
            f"parameters {r.parameters / 1e9:.3f} B",
            f"{per_device} crop(s) of {r.crop_samples / r.sampling_rate:g} s per device "
            f"(global batch {config.data.batch_size})",
            f"compile {r.compile_s:.1f} s (all {elapsed_s:.1f} s); "
            f"peak host RAM {_host_ram_gib():.2f} GiB",
            "FLOPs per device per step:",
            compiled_flops_line(r.flops),
            *memory_lines(r.memory, target),
        ]
    )


# ---- the command ------------------------------------------------------------------------------
def largest_fitting(fits_at: Callable[[int], bool], limit: int = MAX_BATCH_LIMIT) -> int:
    """The largest n in 1..limit with fits_at(n) (0 if not even 1), fits_at shrinking with n:
    doubling from 1 to the first n that does not fit, then bisection below it."""
    good, bad, n = 0, limit + 1, 1
    while good < limit:
        if not fits_at(n):
            bad = n
            break
        good, n = n, min(2 * n, limit)
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits_at(mid):
            good = mid
        else:
            bad = mid
    return good


def run(
    config,
    target: Target,
    mesh: str = "fsdp=-1",
    rules: str | None = None,
    batch_per_device: int = 1,
    max_batch: bool = False,
    text_vocab: int = MIMO_TEXT_VOCAB,
) -> int:
    """What `experiments.aot` does: compiles the config's train step (an LM's, or a tokenizer's as
    `experiments.train_tokenizer` runs it) for the target and prints the report. On a TPU: 1 if
    it does not fit; with `max_batch`, after a search for the largest batch per device that fits
    (each candidate compiled), the report of that batch. ValueError for a bad value."""
    tokenizer = tokenizer_build.is_tokenizer_run(config)
    ici = parse_mesh(mesh)
    results: dict[int, tuple[ml_collections.ConfigDict, Any, float]] = {}

    def attempt(n: int):
        """(config, compiled step or DoesNotFit, seconds) for n rows (or crops) per device."""
        if n not in results:
            start = time.perf_counter()
            c = configure(config, ici, rules, n, target)
            r: Compiled | CompiledTokenizerStep | DoesNotFit
            try:
                if tokenizer:
                    r = compile_tokenizer_step(c, text_vocab, target)
                else:
                    r = compile_train_step(c, target)
            except DoesNotFit as e:
                r = e
            results[n] = (c, r, time.perf_counter() - start)
        return results[n]

    def fits_at(n: int) -> bool:
        _, r, seconds = attempt(n)
        if isinstance(r, DoesNotFit):
            print(f"batch-per-device {n}: does not fit ({r}) ({seconds:.0f} s)", flush=True)
            return False
        ok = fits(r.memory, target)
        print(
            f"batch-per-device {n}: {'fits' if ok else 'does not fit'}, "
            f"{hbm_bytes(r.memory) / GIB:.3f} GiB HBM per device ({seconds:.0f} s)",
            flush=True,
        )
        return ok

    if max_batch:
        if not target.tpu:
            raise ValueError("--max-batch needs --topology: the HBM of a TPU chip to fit")
        best = largest_fitting(fits_at)
        summary = f"--max-batch: {len(results)} compiles; "
        if best == 0:
            print(summary + "not even 1 per device fits", flush=True)
            return 1
        over = f", {best + 1} does not" if best + 1 in results else " (the search's limit)"
        per_chip = (
            f" ({best * target.devices_per_chip} per chip)" if target.devices_per_chip > 1 else ""
        )
        summary += f"the largest batch per device that fits: {best}{per_chip}{over}"
    else:
        best, summary = batch_per_device, ""
    c, r, seconds = attempt(best)
    if isinstance(r, DoesNotFit):
        print(f"{target_line(target)}\nbatch-per-device {best}: does not fit ({r})", flush=True)
        return 1
    text = (tokenizer_report if tokenizer else report)(c, r, seconds, target)
    print(text + (f"\n{summary}" if summary else ""), flush=True)
    return 0 if not target.tpu or fits(r.memory, target) else 1
