"""AdamW with one learning rate (and schedule) per module group, weight decay that spares norms and
biases, global-norm clipping, and frozen groups that get neither gradients nor optimizer state (nor
do the base weights of a group trained through LoRA adapters: only its adapters do).

The groups are the LM's (`lm.groups`); the report's learning rates per group are the experiment
configs' (experiments/configs/common.py).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from mimo_jax.lm.groups import GROUPS, group_of

NO_DECAY_LEAVES = ("bias", "scale")
# After a linear warmup: cosine decay to `end_lr_ratio` of the peak, or the peak held.
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rates: dict  # group -> peak learning rate
    total_steps: int
    schedule: str = "cosine"  # one of SCHEDULES
    warmup_ratio: float = 0.01
    end_lr_ratio: float = 0.0  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0 disables clipping
    frozen: tuple[str, ...] = ()
    # Groups whose base weights are frozen and whose LoRA adapters (lm.lora) train at the
    # group's learning rate.
    lora_groups: tuple[str, ...] = ()

    def __post_init__(self):
        named = set(self.learning_rates) | set(self.frozen) | set(self.lora_groups)
        unknown = named - set(GROUPS)
        if unknown:
            raise ValueError(
                f"optimizer: unknown module groups {sorted(unknown)}; expected {GROUPS}"
            )
        missing = set(GROUPS) - set(self.learning_rates) - set(self.frozen)
        if missing:
            raise ValueError(
                f"optimizer: no learning rate for {sorted(missing)} (or list them in `frozen`)"
            )
        if set(self.lora_groups) & set(self.frozen):
            raise ValueError(
                f"optimizer: groups {sorted(set(self.lora_groups) & set(self.frozen))}"
                f" are both frozen and trained through LoRA adapters"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"optimizer.schedule={self.schedule!r}: expected one of {', '.join(SCHEDULES)}"
            )
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"optimizer.warmup_ratio={self.warmup_ratio}: expected [0, 1]")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps={self.total_steps}: expected > 0")

    @property
    def trainable_groups(self) -> tuple[str, ...]:
        return tuple(g for g in GROUPS if g not in self.frozen)

    def schedule_of(self, group: str) -> optax.Schedule:
        peak = float(self.learning_rates[group])
        warmup = int(self.warmup_ratio * self.total_steps)
        if self.schedule == "constant":
            main = optax.constant_schedule(peak)
        else:
            main = optax.cosine_decay_schedule(
                peak, max(self.total_steps - warmup, 1), alpha=self.end_lr_ratio
            )
        if warmup == 0:
            return main
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def path_of(keypath) -> tuple[str, ...]:
    """The parameter path of a jax key path into an nnx.State (or nested dict): its dict keys and
    sequence indices, without the Variable's own `.value` attribute."""
    out = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
    return tuple(out)


def labels(params):
    """The optimizer group of every leaf of a parameter tree."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: group_of(path_of(kp)), params)


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: path_of(kp)[-1] not in NO_DECAY_LEAVES, params
    )


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The optimizer over the trainable parameters (frozen groups are not given to it)."""
    per_group = {
        g: optax.adamw(
            cfg.schedule_of(g),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
        for g in cfg.trainable_groups
    }
    # A frozen group has no parameters in the trainable tree, so it needs no transform here.
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.multi_transform(per_group, labels))
    return optax.chain(*parts)


def learning_rates(cfg: OptimizerConfig, step) -> dict[str, jax.Array]:
    return {f"lr/{g}": jnp.asarray(cfg.schedule_of(g)(step)) for g in cfg.trainable_groups}
