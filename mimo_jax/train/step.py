"""The train state and the jitted train and eval steps.

The state is a plain pytree (step, trainable parameters, frozen parameters, optimizer state), so it
jits with donation, shards by the logical rules and saves with Orbax as it is. The model's structure
(`graphdef`) stays static; the step merges it with the parameters to run the loss.

A step whose loss or gradient norm is not finite leaves the parameters and optimizer state as they
were (`update_skipped` = 1), so the state in memory stays the last good one.
"""

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax.lm.groups import group_of
from mimo_jax.train.losses import LossConfig, mimo_loss
from mimo_jax.train.optimizer import OptimizerConfig, learning_rates, make_optimizer, path_of

if TYPE_CHECKING:  # annotations only
    from mimo_jax.lm.model import MiMoAudioLM


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the trainable parameters
    frozen: Any  # nnx.State of everything else
    opt_state: Any


def trainable_filter(groups: tuple[str, ...], lora_groups: tuple[str, ...] = ()):
    """Parameters of the trainable groups; in a LoRA group only its adapters (nnx.LoRAParam)."""

    def keep(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        group = group_of(tuple(str(p) for p in path))
        return group in groups and (group not in lora_groups or isinstance(value, nnx.LoRAParam))

    return keep


def _mesh_of(params):
    """The mesh the parameters are placed on (None: one device, or abstract values)."""
    for leaf in jax.tree.leaves(params):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return None


def opt_state_shardings(tx, params, mesh):
    """The shardings of `tx`'s state for the placed `params` (`shardings_like`). XLA does not
    propagate the parameters' shardings to zeros_like by itself: a jitted init without these
    returns moments on a single device."""
    return shardings_like(jax.eval_shape(tx.init, params), params, mesh)


def shardings_like(opt_state, params, mesh):
    """Each optimizer-state leaf placed like the parameter it belongs to (Adam's moments mirror the
    parameter tree, so their key paths end with the parameter's path); the rest (step counts)
    replicated. `params`: arrays or ShapeDtypeStructs with their shardings."""
    by_path = {
        path_of(kp): (leaf.shape, leaf.sharding)
        for kp, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(kp, leaf):
        path = path_of(kp)
        for start in range(len(path)):
            shape, sharding = by_path.get(path[start:], (None, None))
            if shape == leaf.shape:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything static about training a model: its structure, the loss and the optimizer."""

    graphdef: Any
    loss: LossConfig
    optimizer: OptimizerConfig
    grad_accum: int = 1

    @property
    def tx(self) -> optax.GradientTransformation:
        return make_optimizer(self.optimizer)

    @classmethod
    def create(
        cls, model: "MiMoAudioLM", loss: LossConfig, optimizer: OptimizerConfig, grad_accum: int = 1
    ) -> tuple["Trainer", TrainState]:
        loss.check_channels(model.config.audio_channels)
        groups = optimizer.trainable_groups
        # nnx.split with two filters is typed as returning a tuple of any length.
        graphdef, params, frozen = nnx.split(  # type: ignore[misc]
            model, trainable_filter(groups, optimizer.lora_groups), ...
        )
        trainer = cls(graphdef, loss, optimizer, grad_accum)
        mesh = _mesh_of(params)
        if mesh is None:
            return trainer, TrainState(
                jnp.zeros((), jnp.int32), params, frozen, jax.jit(trainer.tx.init)(params)
            )
        init = jax.jit(trainer.tx.init, out_shardings=opt_state_shardings(trainer.tx, params, mesh))
        step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, PartitionSpec()))
        return trainer, TrainState(step, params, frozen, init(params))

    def model(self, state: TrainState) -> nnx.Module:
        return nnx.merge(self.graphdef, state.params, state.frozen)

    def _loss(self, params, frozen, batch, rng):
        return mimo_loss(nnx.merge(self.graphdef, params, frozen), batch, self.loss, rng)

    def _grads(self, state: TrainState, batch, rng):
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if self.grad_accum == 1:
            (_, metrics), grads = grad_fn(state.params, state.frozen, batch, rng)
            return grads, metrics
        micro = jax.tree.map(lambda a: a.reshape(self.grad_accum, -1, *a.shape[1:]), batch)

        def accumulate(carry, xs):
            grads, metrics = carry
            mb, i = xs
            (_, m), g = grad_fn(state.params, state.frozen, mb, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        metric_shapes = jax.eval_shape(
            lambda: grad_fn(state.params, state.frozen, jax.tree.map(lambda a: a[0], micro), rng)[
                0
            ][1]
        )
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
        (grads, metrics), _ = jax.lax.scan(
            accumulate, (zeros, zero_metrics), (micro, jnp.arange(self.grad_accum))
        )
        scale = 1.0 / self.grad_accum
        return jax.tree.map(lambda g: g * scale, grads), jax.tree.map(lambda m: m * scale, metrics)

    def train_step(self, state: TrainState, batch: dict, rng: jax.Array):
        """One optimizer step on a batch (split into `grad_accum` micro-batches)."""
        rng = jax.random.fold_in(rng, state.step)
        rates = learning_rates(self.optimizer, state.step)
        grads, metrics = self._grads(state, batch, rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        state = dataclasses.replace(
            state,
            step=state.step + finite.astype(jnp.int32),
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
        )
        metrics = dict(
            metrics, grad_norm=grad_norm, update_skipped=1.0 - finite.astype(jnp.float32), **rates
        )
        return state, metrics

    def eval_step(self, state: TrainState, batch: dict) -> dict:
        return self._loss(state.params, state.frozen, batch, None)[1]
