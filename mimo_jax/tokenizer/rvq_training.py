"""The RVQ's training behaviour (the official `EuclideanCodebook` in training mode, EnCodec-style):
codebooks learn by exponential moving averages of the vectors assigned to them, not by gradients.

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

from mimo_jax.tokenizer.quantizer import TrainingForward, training_forward

_HIGHEST = jax.lax.Precision.HIGHEST


class CodebookState(NamedTuple):
    """A codebook's training buffers, under their official names: entries [K, dim], EMA cluster
    sizes [K] and EMA sums of the assigned vectors [K, dim] (float32)."""

    embed: jax.Array
    cluster_size: jax.Array
    embed_avg: jax.Array


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    decay: float = 0.99
    epsilon: float = 1e-5

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay={self.decay}: expected a number in [0, 1)")
        if not self.epsilon > 0.0:
            raise ValueError(f"epsilon={self.epsilon}: expected a number > 0")


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
    return CodebookState(embed_avg / smoothed[:, None], cluster_size, embed_avg)


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
