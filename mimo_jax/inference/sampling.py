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
    """Temperature, top-k and top-p filtering of logits [B, V] (removed entries are -inf).

    Sorting is slow on the CPU, so both thresholds are found by a bitwise search over the scores'
    order-preserving integer keys (32 masked counts or sums over [B, V]) instead.
    """
    scores = logits.astype(jnp.float32)
    if cfg.temperature is not None:
        scores = scores / cfg.temperature
    scores = jnp.where(scores == 0, 0.0, scores)  # -0.0 and 0.0 get one key
    keys = _ordered_keys(scores)
    # top_k >= V keeps every entry, and top_p = 1 removes only entries of probability 0, which
    # neither argmax nor a draw can pick: both searches are skipped then (the presets of most
    # tasks have top_p = 1).
    if cfg.top_k and cfg.top_k < scores.shape[-1]:
        k = cfg.top_k
        # The k-th largest key: the largest u with at least k keys >= u.
        kth = _largest(lambda u: jnp.sum(keys >= u, -1, keepdims=True) >= k, keys.shape[0])
        scores = jnp.where(keys < kth, -jnp.inf, scores)
    if cfg.top_p is not None and 0.0 < cfg.top_p < 1.0:
        scores = _top_p(scores, keys, cfg.top_p)
    return scores


def _ordered_keys(scores):
    """uint32 keys ordered as the float32 scores are."""
    bits = jax.lax.bitcast_convert_type(scores, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest(ok, rows):
    """The largest uint32 u [rows, 1] with ok(u); ok is monotone (true up to some u, ok(0))."""

    def bit(i, u):
        cand = u | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(ok(cand), cand, u)

    return jax.lax.fori_loop(0, 32, bit, jnp.zeros((rows, 1), jnp.uint32))


def _top_p(scores, keys, top_p):
    """The official top-p: in stable ascending order, remove the entries whose cumulative
    probability is <= 1 - top_p, but never the last one. Cumulative probabilities only grow, so
    the removed entries are everything below a threshold score plus the first r entries (in index
    order, the stable sort's order) of those equal to it."""
    probs = jax.nn.softmax(scores, axis=-1)
    budget = 1.0 - top_p
    # The threshold: the largest key with at most `budget` probability strictly below it.
    thr = _largest(
        lambda u: jnp.sum(jnp.where(keys < u, probs, 0.0), -1, keepdims=True) <= budget,
        keys.shape[0],
    )
    top = jnp.max(keys, -1, keepdims=True)
    thr = jnp.minimum(thr, top)  # rounding can leave even the total at or under the budget
    tied = keys == thr
    n_tied = jnp.sum(tied, -1, keepdims=True)
    p_tied = jnp.max(jnp.where(tied, probs, 0.0), -1, keepdims=True)
    mass_below = jnp.sum(jnp.where(keys < thr, probs, 0.0), -1, keepdims=True)
    # The j-th tied entry has cumulative probability mass_below + j * p_tied.
    r = jnp.where(p_tied > 0, jnp.floor((budget - mass_below) / jnp.maximum(p_tied, 1e-38)), n_tied)
    r = jnp.clip(r, 0, jnp.where(thr == top, n_tied - 1, n_tied)).astype(jnp.int32)
    tie_rank = jnp.cumsum(tied, axis=-1, dtype=jnp.int32) - 1
    keep = (keys > thr) | (tied & (tie_rank >= r))
    return jnp.where(keep, scores, -jnp.inf)


def sample(
    logits: jax.Array, cfg: SamplerConfig, rng: jax.Array, forbidden: jax.Array | None = None
) -> jax.Array:
    """Token ids [B] from logits [B, V]; `forbidden` is a bool mask [V] or [B, V] of ids never
    chosen."""
    scores = process(logits, cfg)
    if forbidden is not None:
        scores = jnp.where(forbidden, -jnp.inf, scores)
    if cfg.do_sample:
        return _draw(scores, rng)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def _draw(scores, rng):
    """A multinomial draw per row by inverting the CDF with one uniform number per row (a Gumbel
    draw needs V random numbers per row, the dominant cost on the CPU)."""
    probs = jax.nn.softmax(scores, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(rng, (scores.shape[0], 1)) * cdf[:, -1:]
    idx = jnp.sum(cdf <= u, -1)
    # Rounding may put u at the total: fall back to the last id with any probability.
    last = scores.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, -1)
    return jnp.minimum(idx, last).astype(jnp.int32)


def forbid_one(vocab: int, token: int) -> jax.Array:
    return jnp.zeros((vocab,), bool).at[token].set(True)
