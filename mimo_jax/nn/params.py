"""Parameters that carry logical axis names.

Every parameter records its logical axes (`embed`, `mlp`, `heads`, `layers`, ...) as `out_sharding`
metadata. Placement on a device mesh is done explicitly by `sharding/` (rules -> NamedSharding), so
parameters are created without eager sharding: a model builds the same way with or without a mesh.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    return nnx.Param(
        init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False
    )


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axes of a parameter (a leading `layers` axis included for stacked layers)."""
    axes = variable.get_metadata().get("out_sharding")
    return tuple(axes) if axes is not None else (None,) * variable.get_value().ndim


def normal(stddev: float) -> Initializer:
    return jax.nn.initializers.normal(stddev)


zeros: Initializer = jax.nn.initializers.zeros
ones: Initializer = jax.nn.initializers.ones
