"""Builds what a training run needs from its config (an ml-collections ConfigDict), on a mesh and
rules handed in: the model (random or from a converted checkpoint), the trainer and its sharded
state, the compiled steps, the global batches and the export. The data iterators are built by
`data_pipelines`; the mesh and rule presets by `sharding`."""

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from mimo_jax import model_checkpoint as model_ckpt
from mimo_jax.conversion import param_store
from mimo_jax.lm import adapters
from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.lm.groups import GROUPS
from mimo_jax.lm.lora import LoraConfig, apply_lora, merge_lora, quantize_base
from mimo_jax.lm.model import MiMoAudioLM
from mimo_jax.nn.dtypes import dtype_named
from mimo_jax.nn.partitioning import batch_sharding, state_shardings
from mimo_jax.nn.quantized import Quantization, QuantizedKernel
from mimo_jax.train import batch
from mimo_jax.train.losses import LossConfig
from mimo_jax.train.optimizer import OptimizerConfig
from mimo_jax.train.step import Trainer, TrainState


def data_ways(mesh) -> int:
    """The devices a batch is split over (mesh data x fsdp)."""
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))


def check_batch_divides(global_batch: int, grad_accum: int, mesh) -> None:
    ways = data_ways(mesh)
    if global_batch % grad_accum:
        raise ValueError(
            f"data.batch_size {global_batch} is not a multiple of optimizer.grad_accum {grad_accum}"
        )
    micro = global_batch // grad_accum
    if micro % ways:
        raise ValueError(
            f"the micro-batch of {micro} rows (data.batch_size / grad_accum) does not "
            f"divide over the {ways} data-parallel devices (mesh data x fsdp)"
        )
    if global_batch % jax.process_count():
        raise ValueError(
            f"data.batch_size {global_batch} does not divide over {jax.process_count()} processes"
        )


def lm_architecture(config: ConfigDict) -> MiMoAudioConfig:
    """The architecture a run trains: `model.init_checkpoint`'s config.json (no weights are read)
    or `model.hf`; every other part of the run (the data layout, the loss) takes it from here."""
    if not config.model.init_checkpoint:
        return MiMoAudioConfig.from_hf(dict(config.model.hf))
    _, lm = model_ckpt.read_config(config.model.init_checkpoint)
    if not isinstance(lm, MiMoAudioConfig):
        raise ValueError(
            f"model.init_checkpoint={config.model.init_checkpoint!r}: holds a "
            f"{type(lm).__name__}, expected a MiMo-Audio LM checkpoint"
        )
    return lm


def build_model(config: ConfigDict, mesh, rules) -> tuple[MiMoAudioConfig, MiMoAudioLM]:
    """From `model.init_checkpoint` (a converted checkpoint) or randomly from `model.hf`."""
    dtype = dtype_named(config.model.dtype, "config model.dtype")
    param_dtype = dtype_named(config.model.param_dtype, "config model.param_dtype")
    if config.model.init_checkpoint:
        return model_ckpt.load(
            config.model.init_checkpoint,
            mesh=mesh,
            rules=rules,
            dtype=dtype,
            param_dtype=param_dtype,
            remat_policy=config.model.remat_policy,
            attention=config.model.attention,
        )
    lm_config = lm_architecture(config).replace(
        remat_policy=config.model.remat_policy, attention=config.model.attention
    )

    def create():
        return MiMoAudioLM(
            lm_config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(config.seed)
        )

    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    state = jax.jit(
        lambda: nnx.state(create()), out_shardings=state_shardings(abstract, mesh, rules)
    )()
    return lm_config, nnx.merge(graphdef, state)


def lora_config(config: ConfigDict) -> LoraConfig | None:
    """The adapters of a run (`lora`), or None while `lora.rank` is 0 (no adapters)."""
    if not config.lora.rank:
        return None
    return LoraConfig(
        config.lora.rank,
        float(config.lora.alpha),
        float(config.lora.dropout),
        tuple(config.lora.targets),
    )


def base_quantization(config: ConfigDict) -> Quantization | None:
    """How the adapted layers' frozen kernels are held (`lora.quantize`): None in their dtype."""
    if not config.lora.rank or not config.lora.quantize:
        return None
    return Quantization(config.lora.quantize, config.lora.quantize_tile)


def groups_in_mode(config: ConfigDict, mode: str) -> tuple[str, ...]:
    """The module groups of a LoRA mode (`lora.modes`: "lora", "full", "frozen"); none without
    adapters."""
    if not config.lora.rank:
        return ()
    return tuple(g for g in GROUPS if config.lora.modes[g] == mode)


def apply_adapters(config: ConfigDict, model: MiMoAudioLM) -> MiMoAudioLM:
    """The model with the config's LoRA adapters (none while `lora.rank` is 0); with
    `lora.quantize`, the kernels of every linear layer it does not train in full held quantised."""
    cfg = lora_config(config)
    if cfg is not None:
        apply_lora(
            model, cfg, rngs=nnx.Rngs(config.seed + 1), lora_groups=groups_in_mode(config, "lora")
        )
    quantization = base_quantization(config)
    if quantization is not None:
        untrained = groups_in_mode(config, "lora") + groups_in_mode(config, "frozen")
        quantize_base(model, quantization, untrained)
    return model


def add_adapters(config: ConfigDict, model: MiMoAudioLM, mesh, rules) -> MiMoAudioLM:
    """`apply_adapters`, the adapters (and quantised kernels) placed by the rules like the layers
    they belong to."""
    if lora_config(config) is None:
        return model
    apply_adapters(config, model)
    added = nnx.state(model, nnx.Any(nnx.LoRAParam, QuantizedKernel))
    nnx.update(model, jax.device_put(added, state_shardings(added, mesh, rules)))
    return model


def _shardings_of(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def build_trainer(config: ConfigDict, model: MiMoAudioLM) -> tuple[Trainer, TrainState]:
    """The trainer of the config's loss and optimizer, and its state placed like the model."""
    loss = LossConfig.from_string(
        config.loss.weights,
        text_chunk=config.loss.text_chunk,
        patch_fraction=config.loss.patch_fraction,
        patch_chunk=config.loss.patch_chunk,
    )
    frozen = tuple(dict.fromkeys(tuple(config.optimizer.frozen) + groups_in_mode(config, "frozen")))
    if not loss.trains_patch_decoder and "patch_decoder" not in frozen:
        frozen += ("patch_decoder",)  # stage 1: no patch decoder in the graph, nothing to train
    opt = OptimizerConfig(
        learning_rates=dict(config.optimizer.learning_rates),
        total_steps=config.total_steps,
        schedule=config.optimizer.schedule,
        warmup_ratio=config.optimizer.warmup_ratio,
        end_lr_ratio=config.optimizer.end_lr_ratio,
        weight_decay=config.optimizer.weight_decay,
        b1=config.optimizer.b1,
        b2=config.optimizer.b2,
        eps=config.optimizer.eps,
        clip_norm=config.optimizer.clip_norm,
        frozen=frozen,
        lora_groups=groups_in_mode(config, "lora"),
    )
    return Trainer.create(model, loss, opt, config.optimizer.grad_accum)


@dataclasses.dataclass
class Steps:
    """The compiled train and eval steps, with the state's shardings kept across steps."""

    train: Any
    eval: Any


def compile_steps(trainer: Trainer, state: TrainState) -> Steps:
    shardings = _shardings_of(state)
    train = jax.jit(trainer.train_step, donate_argnums=0, out_shardings=(shardings, None))
    return Steps(train=train, eval=jax.jit(trainer.eval_step))


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's rows placed as its part of the global batch (batch axis over data x fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(
            batch_sharding(mesh, local[k].ndim), np.asarray(local[k])
        )
        for k in batch.FIELDS
    }


def export(config: ConfigDict, trainer: Trainer, state: TrainState, lm_config, workdir) -> dict:
    """The final weights as a model checkpoint (workdir/model): the init_checkpoint of a next stage,
    or an official directory through convert_torch_weights.py. With LoRA adapters, the model has
    them merged, and workdir/adapter holds what the run trained alone: the adapters, and the
    modules of groups trained in full (a PEFT directory, `lm.adapters`). Returns {what: path}."""
    model = trainer.model(state)
    out = {}
    if lora_config(config) is not None:
        out["adapters"] = adapters.save(
            model, workdir / "adapter", full_groups=groups_in_mode(config, "full")
        )
        model = merge_lora(model)
    out["final weights"] = param_store.save(model, lm_config.to_hf(), os.fspath(workdir / "model"))
    return out
