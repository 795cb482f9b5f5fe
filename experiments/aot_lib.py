"""Ahead-of-time compilation of the train step from abstract values (see experiments/aot.py)."""

import dataclasses
import math
import resource
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.lm.model import MiMoAudioLM
from mimo_jax.nn.dtypes import dtype_named
from mimo_jax.nn.partitioning import batch_sharding, state_shardings, use_rules
from mimo_jax.nn.quantized import QuantizedKernel
from mimo_jax.train import build, flops
from mimo_jax.train.step import opt_state_shardings
from sharding.mesh import AXES, mesh_and_rules

GIB = 2**30

# XLA:CPU has no bf16 arithmetic: it rewrites every bf16 op to f32 (FloatNormalization), which
# turns each scanned layer's weight slice into a slice of an f32 convert of the whole stacked
# weight; loop-invariant code motion then hoists that convert out of the layer loop, so the CPU
# program holds an f32 copy of every stacked bf16 weight (24 GiB for the 7B backbone) that a
# GPU/TPU program, with bf16 dots, does not. Without the hoisting the convert fuses into the slice.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


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


def data_ways(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))


def configure(
    config, ici: dict[str, int], rules: str | None, batch_per_device: int
) -> ml_collections.ConfigDict:
    """A copy of the config on a single-slice mesh `ici`, with a global batch of
    `batch_per_device` rows per data-parallel device per micro-batch."""
    if batch_per_device < 1:
        raise ValueError(f"--batch-per-device {batch_per_device}: expected at least 1")
    config = ml_collections.ConfigDict(config.to_dict())
    config.mesh.ici = ici
    config.mesh.dcn = {a: 1 for a in AXES}
    if rules:
        config.mesh.rules = rules
    mesh, _ = mesh_and_rules(config)
    config.data.batch_size = batch_per_device * data_ways(mesh) * config.optimizer.grad_accum
    return config


def abstract_batch(config, lm: MiMoAudioConfig, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    b, g = config.data.batch_size, config.data.context_length
    gs, c = lm.group_size, len(lm.speech_vocab_sizes)
    shapes = {
        "text": (b, g),
        "codes": (b, g, gs, c),
        "positions": (b, g),
        "segment_ids": (b, g),
        "text_targets": (b, g),
        "text_weights": (b, g),
        "code_targets": (b, g, gs, c),
        "code_weights": (b, g, c),
    }
    dtype = lambda k: jnp.float32 if k.endswith("weights") else jnp.int32
    return {
        k: jax.ShapeDtypeStruct(shapes[k], dtype(k), sharding=batch_sharding(mesh, len(shapes[k])))
        for k in build.BATCH_FIELDS
    }


def _with_shardings(abstract, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def abstract_state(config, mesh, rules):
    """(lm config, trainer, train state of ShapeDtypeStructs with the shardings training uses)."""
    lm = MiMoAudioConfig.from_hf(dict(config.model.hf), remat_policy=config.model.remat_policy)
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


def compile_train_step(config) -> Compiled:
    mesh, rules = mesh_and_rules(config)
    build.check_batch_divides(config.data.batch_size, config.optimizer.grad_accum, mesh)
    with jax.set_mesh(mesh), use_rules(rules):
        lm, trainer, state = abstract_state(config, mesh, rules)
        batch = abstract_batch(config, lm, mesh)
        key = jax.eval_shape(lambda: jax.random.key(0))
        replicated = NamedSharding(mesh, PartitionSpec())
        rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
        start = time.perf_counter()
        step = build.compile_steps(trainer, state).train
        compiled = step.lower(state, batch, rng).compile(CPU_COMPILER_OPTIONS)
        seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Compiled(
        lm,
        trainer.loss.trains_patch_decoder,
        compiled.memory_analysis(),
        float((cost or {}).get("flops", 0.0)),
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


def report(config, r: Compiled, elapsed_s: float) -> str:
    m = r.memory
    groups = config.data.batch_size * config.data.context_length
    n = flops.parameter_count(r.lm)
    six_n = 6.0 * n * groups
    analytic = (
        flops.train_flops_per_group(r.lm, config.data.context_length, r.trains_patch_decoder)
        * groups
    )
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    gib = lambda b: f"{b / GIB:8.3f} GiB  ({b} bytes)"
    lines = [
        f"mesh {dict(config.mesh.ici)} on {r.devices} devices, rules {config.mesh.rules}, "
        f"remat {config.model.remat_policy}, dtype {config.model.dtype}/{config.model.param_dtype}",
        f"global batch {config.data.batch_size} rows x {config.data.context_length} groups "
        f"(grad_accum {config.optimizer.grad_accum}); parameters {n / 1e9:.3f} B",
        f"trainable parameters {r.trainable:,} of {r.total:,} "
        f"({100 * r.trainable / r.total:.2f} %)",
        f"compile {r.compile_s:.1f} s (all {elapsed_s:.1f} s); peak host RAM {rss_gib:.2f} GiB",
        "FLOPs per device per step:",
        f"  compiled (XLA cost analysis)     {r.flops:.4e}",
        f"  analytic 6*N*tokens              {six_n / r.devices:.4e}",
        f"  analytic train_flops_per_group   {analytic / r.devices:.4e}",
        "memory per device:",
        f"  arguments     {gib(m.argument_size_in_bytes)}",
        f"  outputs       {gib(m.output_size_in_bytes)}",
        f"  temporaries   {gib(m.temp_size_in_bytes)}",
        f"  aliased       {gib(m.alias_size_in_bytes)}",
        f"  code          {gib(m.generated_code_size_in_bytes)}",
        f"per-device memory: {total_bytes(m) / GIB:.3f} GiB",
    ]
    return "\n".join(lines)


# ---- tokenizer training -----------------------------------------------------------------------
MIMO_TEXT_VOCAB = 151680  # the released text tokenizer's, the A2T LM's vocabulary at full size


def configure_tokenizer(config, batch_per_device: int) -> ml_collections.ConfigDict:
    """A copy of a tokenizer config with `batch_per_device` crops on each device."""
    if batch_per_device < 1:
        raise ValueError(f"--batch-per-device {batch_per_device}: expected at least 1")
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.batch_size = batch_per_device * jax.device_count()
    return config


@dataclasses.dataclass
class CompiledTokenizerStep:
    memory: object  # CompiledMemoryStats
    devices: int
    compile_s: float
    parameters: int  # the tokenizer's and the A2T LM's
    crop_samples: int
    sampling_rate: int


def compile_tokenizer_step(config, text_vocab: int = MIMO_TEXT_VOCAB) -> CompiledTokenizerStep:
    """The stage-1 tokenizer step as a run compiles it (`experiments.train_tokenizer`), from
    abstract values: the state fully sharded over the devices, the crops split over them."""
    from experiments import train_tokenizer as tt

    if config.task != "tokenizer_stage1":
        raise ValueError(f"task {config.task!r}: experiments.aot compiles tokenizer_stage1 steps")
    mesh = tt.mesh_of_devices()
    built = {}

    def make():
        built["tokenizer"], built["trainer"], state = tt.build(config, text_vocab)
        return state

    abstract = jax.eval_shape(make)
    trainer, tok = built["trainer"], built["tokenizer"]
    placed = tt.state_shardings(abstract, mesh)
    state = _with_shardings(abstract, placed)
    samples = tt.crop_samples(config, tok.sampling_rate)
    b, tokens = config.data.batch_size, config.data.max_text_tokens
    shapes = {
        "wav": ((b, samples), jnp.float32),
        "lengths": ((b,), jnp.int32),
        "text": ((b, tokens), jnp.int32),
        "text_lengths": ((b,), jnp.int32),
    }
    shardings = tt.batch_shardings({k: np.empty(s) for k, (s, _) in shapes.items()}, mesh)
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=shardings[k]) for k, (s, d) in shapes.items()}
    start = time.perf_counter()
    step = jax.jit(trainer.train_step, donate_argnums=0, out_shardings=(placed, None))
    compiled = step.lower(state, batch).compile(CPU_COMPILER_OPTIONS)
    return CompiledTokenizerStep(
        compiled.memory_analysis(),
        mesh.size,
        time.perf_counter() - start,
        size_of(state.params) + size_of(state.frozen),
        samples,
        tok.sampling_rate,
    )


def tokenizer_report(config, r: CompiledTokenizerStep, elapsed_s: float) -> str:
    m = r.memory
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    gib = lambda b: f"{b / GIB:8.3f} GiB  ({b} bytes)"
    per_device = config.data.batch_size // r.devices
    return "\n".join(
        [
            f"{config.task} on {r.devices} devices (state fully sharded), remat "
            f"{config.model.remat_policy}; parameters {r.parameters / 1e9:.3f} B",
            f"{per_device} crop(s) of {r.crop_samples / r.sampling_rate:g} s per device "
            f"(global batch {config.data.batch_size})",
            f"compile {r.compile_s:.1f} s (all {elapsed_s:.1f} s); peak host RAM {rss_gib:.2f} GiB",
            "memory per device:",
            f"  arguments     {gib(m.argument_size_in_bytes)}",
            f"  outputs       {gib(m.output_size_in_bytes)}",
            f"  temporaries   {gib(m.temp_size_in_bytes)}",
            f"  aliased       {gib(m.alias_size_in_bytes)}",
            f"per-device memory: {total_bytes(m) / GIB:.3f} GiB",
        ]
    )
