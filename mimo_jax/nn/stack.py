"""A stack of identical transformer layers: its config, and how it is built and run.

A stack is one module whose parameters have a leading `layers` axis (built by vmapping the layer's
constructor) and runs under `jax.lax.scan`: one compiled layer whatever the depth, rematerialised by
a named policy (`nn.remat`). The LM's backbone and patch transformers and the tokenizer's encoder,
decoder and vocoder are all such stacks.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.nn.remat import maybe_remat

Layer = TypeVar("Layer", bound=nnx.Module)


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """The sizes and attention pattern of one stack. `window` = (left, right) limits attention to
    keys q - left <= k <= q + right (a negative bound is unlimited); `attention` names the kernel
    (`nn.attention`: auto, xla, splash, cudnn)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope_theta: float
    norm_eps: float
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    attn_dropout: float = 0.0
    attention: str = "auto"


def stacked(make_layer: Callable[[nnx.Rngs], Layer], count: int, rngs: nnx.Rngs) -> Layer:
    """`count` layers from `make_layer(rngs)` as one module with a leading `layers` axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(r: nnx.Rngs):
        return make_layer(r)

    return create(rngs)


def scan_layers(
    layers: nnx.Module,
    step: Callable[[Any, Any, Any], tuple[Any, Any]],
    carry,
    xs: Any = None,
    *,
    remat_policy: str = "none",
    start: int = 0,
    stop: int | None = None,
    first_apart: bool = False,
):
    """Run layers [start, stop) of a stacked module: `step(layer, carry, x) -> (carry, y)`, with x
    and y the per-layer slices of `xs` and of the stacked result. Returns (carry, ys).

    `first_apart` runs the first layer outside the scan, for a carry whose dtype that layer changes
    (a scan's carry keeps one dtype). Layers unstacked by `unstack` run in a Python loop instead.
    """
    if isinstance(layers, nnx.List):
        return _loop_layers(list(layers)[start:stop], step, carry, xs, start)
    graphdef, state = nnx.split(layers)
    xs = (state, xs)
    if start or stop is not None:
        xs = jax.tree.map(lambda a: a[start:stop], xs)

    def body(c, args):
        layer_state, x = args
        return step(nnx.merge(graphdef, layer_state), c, x)

    scanned = maybe_remat(body, remat_policy)
    if not first_apart:
        return jax.lax.scan(scanned, carry, xs)
    carry, first = body(carry, jax.tree.map(lambda a: a[0], xs))
    carry, rest = jax.lax.scan(scanned, carry, jax.tree.map(lambda a: a[1:], xs))
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)


def unstack(layers: nnx.Module) -> nnx.List:
    """A stacked module's layers as a list of one-layer modules (copies of the weights), for
    decoding: XLA:CPU copies each scanned layer's weight slice before its matmuls, which made a
    decode step of a 12-layer stack 2.4 times slower than separate weights. Inference only: the
    loop is not rematerialised."""
    graphdef, state = nnx.split(layers)
    count = jax.tree.leaves(state)[0].shape[0]
    return nnx.List(
        [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(count)]
    )


def _loop_layers(layers: list, step, carry, xs, start: int):
    ys = []
    for i, layer in enumerate(layers, start):
        carry, y = step(layer, carry, jax.tree.map(lambda a, i=i: a[i], xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
