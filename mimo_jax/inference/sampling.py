"""The official sampler (temperature, top-k, top-p, forbidden ids, greedy or multinomial), batched.

Order as in the official `MiMoSampler`: temperature, then top-k, then top-p, then the forbidden ids
are set to -inf, then argmax (first maximal index) or a draw. Unlike the official top-k, the
threshold is taken per row, so batches are correct.
"""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1], got {self.top_p}")


GREEDY = SamplerConfig()


def process(logits: jax.Array, cfg: SamplerConfig) -> jax.Array:
    """Temperature, top-k and top-p filtering of logits [B, V] (removed entries are -inf)."""
    scores = logits.astype(jnp.float32)
    if cfg.temperature is not None:
        scores = scores / cfg.temperature
    ascending, n_out = None, jnp.zeros((scores.shape[0], 1), jnp.int32)
    if cfg.top_k:
        k = min(cfg.top_k, scores.shape[-1])
        top = jax.lax.top_k(scores, k)[0]
        below = scores < top[:, -1:]
        scores = jnp.where(below, -jnp.inf, scores)
        # Top-p then only needs the k survivors in order: everything below is out (probability 0).
        ascending, n_out = top[:, ::-1], jnp.sum(below, -1, keepdims=True, dtype=jnp.int32)
    if cfg.top_p is not None and 0.0 < cfg.top_p <= 1.0:
        if ascending is None:
            ascending = jnp.sort(scores, axis=-1)
        scores = _top_p(scores, ascending, n_out, cfg.top_p)
    return scores


def _top_p(scores, ascending, n_out, top_p):
    """The official top-p (stable ascending sort, remove entries whose cumulative probability is
    <= 1 - top_p, never the largest) without sorting indices or scattering back.

    `ascending` [B, n] holds the n largest scores in ascending order; the rest of the V scores are
    `n_out` entries at -inf, and `extra` entries tied with ascending[:, 0] that did not fit (top-k
    keeps all ties at its threshold). Since cumulative probabilities only grow, the removed entries
    are a prefix of the sorted order, of length m: entries below the score at position m go, entries
    above stay, and entries equal to it go in index order (the stable sort's order) until m are gone.
    """
    v, n = scores.shape[-1], ascending.shape[-1]
    extra = v - n_out - n
    low, high = ascending[:, :1], ascending[:, -1:]
    weights = jnp.exp(ascending - high)
    w_low = weights[:, :1]
    total = jnp.sum(weights, -1, keepdims=True) + extra * w_low
    p_low = w_low / total
    cumulative = extra * p_low + jnp.cumsum(weights / total, axis=-1)
    budget = 1.0 - top_p
    # The j-th tied extra entry has cumulative probability j * p_low.
    extra_removed = jnp.where(p_low > 0, jnp.floor(budget / jnp.maximum(p_low, 1e-38)), extra)
    extra_removed = jnp.clip(extra_removed, 0, extra).astype(jnp.int32)
    m = n_out + extra_removed + jnp.sum(cumulative <= budget, -1, keepdims=True)
    m = jnp.minimum(m, v - 1)
    at = jnp.clip(m - n_out - extra, 0, n - 1)
    threshold = jnp.take_along_axis(ascending, at, axis=-1)
    tied = scores == threshold
    tie_rank = jnp.cumsum(tied, axis=-1) - 1
    below = jnp.sum(scores < threshold, -1, keepdims=True)
    keep = (scores > threshold) | (tied & (tie_rank >= m - below))
    return jnp.where(keep, scores, -jnp.inf)


def sample(logits: jax.Array, cfg: SamplerConfig, rng: jax.Array,
           forbidden: jax.Array | None = None) -> jax.Array:
    """Token ids [B] from logits [B, V]; `forbidden` is a bool mask [V] or [B, V] of ids never chosen."""
    scores = process(logits, cfg)
    if forbidden is not None:
        scores = jnp.where(forbidden, -jnp.inf, scores)
    if cfg.do_sample:
        return jax.random.categorical(rng, scores, axis=-1).astype(jnp.int32)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def forbid_one(vocab: int, token: int) -> jax.Array:
    return jnp.zeros((vocab,), bool).at[token].set(True)
