"""Residual vector quantisation (EnCodec-style RVQ), always in float32.

Encode: for each codebook in order, take the nearest entry (squared L2, first index on ties) and
subtract it from the residual. Decode: the sum of the chosen entries. Codebooks are `Codebook`
variables and their training state `CodebookBuffer`s: checkpoint state like parameters (the
converter maps them), but trained by EMA rather than by gradients, so an optimizer must filter
them out by their type.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

_HIGHEST = jax.lax.Precision.HIGHEST


def nearest_entry(residual: jax.Array, embed: jax.Array) -> jax.Array:
    """Index of the entry of embed [K, dim] nearest to residual [..., dim] (float32)."""
    # The official expression, term for term, so that float32 rounding matches on near-ties.
    r2 = jnp.sum(jnp.square(residual), axis=-1, keepdims=True)
    dot = jnp.matmul(residual, embed.T, precision=_HIGHEST)
    score = -(r2 - 2.0 * dot + jnp.sum(jnp.square(embed), axis=-1))
    return jnp.argmax(score, axis=-1).astype(jnp.int32)


class TrainingForward(NamedTuple):
    quantized: jax.Array  # [..., dim], straight-through: its gradient flows to x unchanged
    codes: jax.Array  # [..., n] int32
    commit_losses: jax.Array  # [n]: each codebook's masked mean squared distance
    inputs: list[jax.Array]  # each codebook's input residual [..., dim] (no gradient)


def training_forward(
    embeds: Sequence[jax.Array], x: jax.Array, mask: jax.Array | None = None
) -> TrainingForward:
    """The official RVQ forward in training mode over codebooks `embeds` ([K_q, dim] each): each
    codebook's nearest entry to its residual, a straight-through estimator, and the commitment
    loss MSE(entry, residual) over the frames where `mask` [...] is true."""
    residual = x.astype(jnp.float32)
    weight = jnp.ones(x.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(weight) * x.shape[-1], 1.0)
    quantized = jnp.zeros_like(residual)
    codes, losses, inputs = [], [], []
    for embed in embeds:
        inputs.append(jax.lax.stop_gradient(residual))
        idx = nearest_entry(inputs[-1], embed)
        entry = jax.lax.stop_gradient(jnp.take(embed, idx, axis=0))
        losses.append(jnp.sum(jnp.square(entry - residual) * weight[..., None]) / denom)
        straight = residual + jax.lax.stop_gradient(entry - residual)
        residual = residual - straight
        quantized = quantized + straight
        codes.append(idx)
    return TrainingForward(quantized, jnp.stack(codes, axis=-1), jnp.stack(losses), inputs)


class Codebook(nnx.Param):
    """Entries [size, dim] of one RVQ codebook (float32; no gradient updates)."""


class CodebookBuffer(nnx.Param):
    """A codebook's training state under its official buffer name (`inited` [1], 1 once k-means
    has set the entries; `cluster_size` [size] and `embed_avg` [size, dim], the EMA statistics).
    Checkpointed and converted like a parameter; updated by `rvq_training`, never by gradients."""


class VectorQuantizer(nnx.Module):
    def __init__(self, dim: int, size: int, *, rngs: nnx.Rngs):
        entries = jax.random.normal(rngs.params(), (size, dim), jnp.float32)
        meta = lambda axes: {"out_sharding": axes, "eager_sharding": False}
        self.embed = Codebook(entries, **meta(("codebook", "embed")))
        # As the official codebook starts: entries not yet set by k-means, no statistics.
        self.inited = CodebookBuffer(jnp.zeros((1,), jnp.float32), **meta((None,)))
        self.cluster_size = CodebookBuffer(jnp.zeros((size,), jnp.float32), **meta(("codebook",)))
        self.embed_avg = CodebookBuffer(entries, **meta(("codebook", "embed")))

    def nearest(self, residual: jax.Array) -> jax.Array:
        """Index of the nearest entry for residual [..., dim] (float32)."""
        return nearest_entry(residual, self.embed[...])

    def lookup(self, codes: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], codes, axis=0)


class ResidualVectorQuantizer(nnx.Module):
    def __init__(self, dim: int, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
        self.sizes = tuple(sizes)
        self.layers = nnx.List([VectorQuantizer(dim, size, rngs=rngs) for size in sizes])

    def _check(self, num_codebooks: int | None) -> int:
        n = len(self.layers) if num_codebooks is None else num_codebooks
        if not 1 <= n <= len(self.layers):
            raise ValueError(f"asked for {n} codebooks; the quantizer has {len(self.layers)}")
        return n

    def encode(self, x: jax.Array, num_codebooks: int | None = None) -> jax.Array:
        """x [..., dim] -> codes [..., num_codebooks] int32."""
        residual = x.astype(jnp.float32)
        codes = []
        for layer in self.layers[: self._check(num_codebooks)]:
            idx = layer.nearest(residual)
            residual = residual - layer.lookup(idx)
            codes.append(idx)
        return jnp.stack(codes, axis=-1)

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes [..., n] (n <= number of codebooks) -> float32 [..., dim], summed in layer
        order."""
        n = self._check(codes.shape[-1])
        out = self.layers[0].lookup(codes[..., 0])
        for q in range(1, n):
            out = out + self.layers[q].lookup(codes[..., q])
        return out

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None, num_codebooks: int | None = None
    ):
        """Training forward: (quantized [..., dim] with straight-through gradients to x,
        codes [..., n], commitment loss: the mean over codebooks of `training_forward`'s)."""
        embeds = [layer.embed[...] for layer in self.layers[: self._check(num_codebooks)]]
        out = training_forward(embeds, x, mask)
        return out.quantized, out.codes, jnp.mean(out.commit_losses)
