"""The RVQ's training behaviour (the official `EuclideanCodebook` in training mode, EnCodec-style):
codebooks learn by exponential moving averages of the vectors assigned to them, not by gradients.

A codebook not yet initialised (`inited` 0) first takes the k-means centroids of its input on the
first training batch (`initialise`: Lloyd iterations from randomly drawn input vectors, an empty
cluster keeping its centroid), as the official `init_embed_` does.

One training step of a codebook, given its input vectors x [N, dim] and their nearest entries
(chosen with the codebook as it was before the step, which is also what the forward returns):
  cluster_size <- decay * cluster_size + (1 - decay) * counts
  embed_avg    <- decay * embed_avg + (1 - decay) * onehotᵀ x
  embed        <- embed_avg / (laplace(cluster_size) * Σ cluster_size),
                  laplace(n)_k = (n_k + ε) / (Σ n + K ε)
With data parallelism the counts and sums are summed over the devices first (`axis_name`), so
every device makes the same update.

Dead codes (EMA cluster size below `threshold_ema_dead_code`): the official code writes random batch
vectors into their rows before the update, but the update's last write replaces every row with the
normalised average, so the replacement never survives a step. This module keeps that net effect
(dead codes follow the same rule as the others) and writes no random rows.
"""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mimo_jax.tokenizer.quantizer import (
    ResidualVectorQuantizer,
    TrainingForward,
    nearest_entry,
    training_forward,
)

_HIGHEST = jax.lax.Precision.HIGHEST


class CodebookState(NamedTuple):
    """A codebook's training buffers, under their official names: entries [K, dim], EMA cluster
    sizes [K], EMA sums of the assigned vectors [K, dim] and `inited` [1] (1 once k-means has set
    the entries; float32, as the official buffer)."""

    embed: jax.Array
    cluster_size: jax.Array
    embed_avg: jax.Array
    inited: jax.Array


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    decay: float = 0.99
    epsilon: float = 1e-5

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay={self.decay}: expected a number in [0, 1)")
        if not self.epsilon > 0.0:
            raise ValueError(f"epsilon={self.epsilon}: expected a number > 0")


def states_of(rvq: ResidualVectorQuantizer) -> list[CodebookState]:
    """Each codebook's training state as the quantizer holds it."""
    return [
        CodebookState(*(getattr(layer, name)[...] for name in CodebookState._fields))
        for layer in rvq.layers
    ]


def store(rvq: ResidualVectorQuantizer, states: Sequence[CodebookState]) -> None:
    """Writes codebook states back into the quantizer (in place)."""
    for layer, state in zip(rvq.layers, states, strict=True):
        for name, value in zip(CodebookState._fields, state, strict=True):
            getattr(layer, name).set_value(value)


def laplace_smoothing(counts: jax.Array, epsilon: float) -> jax.Array:
    return (counts + epsilon) / (jnp.sum(counts) + counts.shape[0] * epsilon)


def ema_update(
    state: CodebookState,
    x: jax.Array,
    codes: jax.Array,
    cfg: EmaConfig,
    mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> CodebookState:
    """The codebook after one training step on x [..., dim] (float32) whose nearest entries under
    `state.embed` are codes [...]; frames where `mask` [...] is false (padding) count for nothing,
    as if the official code had been given only the others."""
    size, dim = state.embed.shape
    onehot = jax.nn.one_hot(codes.reshape(-1), size, dtype=jnp.float32)
    if mask is not None:
        onehot = onehot * mask.reshape(-1, 1).astype(jnp.float32)
    counts = jnp.sum(onehot, axis=0)
    sums = jnp.matmul(onehot.T, x.reshape(-1, dim).astype(jnp.float32), precision=_HIGHEST)
    if axis_name is not None:
        counts, sums = jax.lax.psum((counts, sums), axis_name)
    cluster_size = state.cluster_size * cfg.decay + counts * (1.0 - cfg.decay)
    embed_avg = state.embed_avg * cfg.decay + sums * (1.0 - cfg.decay)
    smoothed = laplace_smoothing(cluster_size, cfg.epsilon) * jnp.sum(cluster_size)
    return CodebookState(embed_avg / smoothed[:, None], cluster_size, embed_avg, state.inited)


def train_step(
    states: Sequence[CodebookState],
    x: jax.Array,
    cfg: EmaConfig,
    mask: jax.Array | None = None,
    axis_name: str | None = None,
) -> tuple[TrainingForward, list[CodebookState]]:
    """One RVQ training step on x [..., dim]: the training forward with the codebooks as they are
    (its quantized output carries the straight-through gradient; its commitment losses are the
    official per-codebook terms) and each codebook's EMA update on its own input residual."""
    out = training_forward([s.embed for s in states], x, mask)
    codes = jnp.moveaxis(out.codes, -1, 0)
    new = [
        ema_update(s, inp, c, cfg, mask, axis_name)
        for s, inp, c in zip(states, out.inputs, codes, strict=True)
    ]
    return out, new


def _draw(key: jax.Array, weight: jax.Array, count: int) -> jax.Array:
    """`count` indices of frames with weight 1: distinct while there are enough of them (the
    official `sample_vectors`: a permutation, else draws with replacement)."""
    n = weight.shape[0]
    valid = jnp.sum(weight)
    k_perm, k_rep = jax.random.split(key)
    # Distinct: the top `count` of random keys, padding ranked last.
    scores = jnp.where(weight > 0, jax.random.uniform(k_perm, (n,)), -1.0)
    distinct = jax.lax.top_k(scores, min(count, n))[1]
    if count > n:
        distinct = jnp.concatenate([distinct, jnp.zeros((count - n,), distinct.dtype)])
    replaced = jax.random.choice(k_rep, n, (count,), p=weight / jnp.maximum(valid, 1.0))
    return jnp.where(valid >= count, distinct, replaced)


def kmeans(
    x: jax.Array, size: int, iters: int, key: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(centroids [size, dim], the last assignment's counts [size]) of the frames of x [N, dim]
    where `mask` [N] is true, after `iters` Lloyd iterations from `size` drawn frames; a cluster
    that empties keeps its centroid (the official `kmeans`)."""
    x = x.astype(jnp.float32)
    weight = jnp.ones(x.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    means = x[_draw(key, weight, size)]

    def lloyd(_, carry):
        means, _ = carry
        onehot = jax.nn.one_hot(nearest_entry(x, means), size, dtype=jnp.float32)
        onehot = onehot * weight[:, None]
        counts = jnp.sum(onehot, axis=0)
        sums = jnp.matmul(onehot.T, x, precision=_HIGHEST)
        new = sums / jnp.maximum(counts, 1.0)[:, None]
        return jnp.where((counts == 0)[:, None], means, new), counts

    return jax.lax.fori_loop(0, iters, lloyd, (means, jnp.zeros((size,), jnp.float32)))


def initialise(
    states: Sequence[CodebookState],
    x: jax.Array,
    key: jax.Array,
    iters: int = 50,
    mask: jax.Array | None = None,
) -> list[CodebookState]:
    """The codebooks after the first training batch's k-means: codebook q, if not initialised,
    takes the centroids of its input, the residual left by codebooks 0..q-1 as they stand after
    their own initialisation (embed_avg = the centroids, cluster_size = their counts, inited =
    1); an initialised codebook is unchanged. x [..., dim]; `mask` [...] marks real frames."""
    dim = x.shape[-1]
    residual = x.reshape(-1, dim).astype(jnp.float32)
    flat_mask = None if mask is None else mask.reshape(-1)
    out = []
    for state, k in zip(states, jax.random.split(key, len(states)), strict=True):

        def fresh(state=state, k=k, residual=residual):
            means, counts = kmeans(residual, state.embed.shape[0], iters, k, flat_mask)
            return CodebookState(means, counts, means, jnp.ones_like(state.inited))

        state = jax.lax.cond(state.inited[0] > 0, lambda state=state: state, fresh)
        out.append(state)
        residual = residual - state.embed[nearest_entry(residual, state.embed)]
    return out
