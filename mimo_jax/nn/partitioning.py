"""Logical-axis partitioning: how a logical axis (`embed`, `mlp`, `activation_batch`, ...) maps to
mesh axes, for parameters and activations. The rule tables themselves (FSDP, FSDP + tensor, data)
are presets of the top-level `sharding` package, which passes them in; the library only applies
them.

A rule lists candidate mesh axes per logical axis, MaxText style: for each dimension the first
candidate that exists in the mesh, is larger than 1, divides the dimension and is not already used
by another dimension of the same array is taken; otherwise the dimension is replicated. So one rule
table serves any mesh shape, and a dimension too small to shard falls back instead of failing.
"""

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax.nn.params import logical_axes

Rules = dict[str, tuple[str | tuple[str, ...], ...]]

# Activations: the batch over the data-parallel axes, the sequence over `sequence`, attention
# heads over `tensor`.
ACTIVATION_RULES: Rules = {
    "activation_batch": (("data", "fsdp"), "data", "fsdp"),
    "activation_length": ("sequence",),
    "activation_heads": ("tensor",),
}


def _axes(candidate) -> tuple[str, ...]:
    return (candidate,) if isinstance(candidate, str) else tuple(candidate)


def partition_spec(
    shape: Sequence[int], axes: Sequence[str | None], rules: Rules, mesh
) -> PartitionSpec:
    sizes = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, axes):
        choice = None
        for candidate in rules.get(name, ()) if name else ():
            mesh_axes = tuple(a for a in _axes(candidate) if sizes.get(a, 1) > 1)
            total = int(np.prod([sizes[a] for a in mesh_axes])) if mesh_axes else 1
            if mesh_axes and not used & set(mesh_axes) and dim % total == 0:
                choice = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
                used |= set(mesh_axes)
                break
        spec.append(choice)
    return PartitionSpec(*spec)


def named_sharding(mesh: jax.sharding.Mesh, variable, rules: Rules) -> NamedSharding:
    """The sharding of an NNX variable (abstract or concrete) under the rules."""
    value = variable.get_value()
    return NamedSharding(mesh, partition_spec(value.shape, logical_axes(variable), rules, mesh))


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules):
    """The nnx.State with each variable's value replaced by its NamedSharding (for jit's
    out_shardings)."""
    return jax.tree.map(
        lambda v: v.replace(named_sharding(mesh, v, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def batch_sharding(mesh: jax.sharding.Mesh, rank: int) -> NamedSharding:
    """A batch of rank `rank` with its leading axis split over the data-parallel mesh axes."""
    spec = partition_spec(
        (mesh.size,) + (1,) * (rank - 1),
        ("activation_batch",) + (None,) * (rank - 1),
        ACTIVATION_RULES,
        mesh,
    )
    return NamedSharding(mesh, spec)


_active: list[Rules] = []


class use_rules:
    """Within this context (and a `jax.set_mesh`), `constrain` places activations by these rules."""

    def __init__(self, rules: Rules):
        self.rules = {**ACTIVATION_RULES, **rules}

    def __enter__(self):
        _active.append(self.rules)
        return self.rules

    def __exit__(self, *exc):
        _active.pop()


def active_rules() -> Rules:
    """The rules of the innermost `use_rules`, else the activation rules alone."""
    return _active[-1] if _active else ACTIVATION_RULES


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """A sharding constraint on an activation by logical axes; nothing outside `use_rules` or a
    mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if not _active or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, partition_spec(x.shape, axes, _active[-1], mesh))
