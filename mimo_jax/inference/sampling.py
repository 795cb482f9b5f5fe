"""The official sampler (temperature, top-k, top-p, forbidden ids, greedy or multinomial), batched.

Order as in the official `MiMoSampler`: temperature, then top-k, then top-p, then the forbidden ids
are set to -inf, then argmax (first maximal index) or a draw. Unlike the official top-k, the
threshold is taken per row, so batches are correct.

The settings reach the compiled programs as arrays with one row per batch row (`SamplerRows`), not
as constants: one program serves every preset, and rows of different tasks share a batch. Only
which steps some row takes (a draw, top-k, top-p) is fixed in a program, so that greedy decoding
does not compile the filters it never runs.
"""

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if t is not None and not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {t}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"top_k must be an integer >= 0, got {k!r}")
        if p is not None and not 0.0 <= p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1], got {p}")


GREEDY = SamplerConfig()


_STATIC = dict(static=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerRows:
    """The settings of one sampler per batch row, as arrays (traced inside the programs), and
    which steps any row takes (static: part of the program's key)."""

    do_sample: np.ndarray | jax.Array  # [B] bool
    temperature: np.ndarray | jax.Array  # [B, 1] float32 (1 for none: dividing by 1 is exact)
    top_k: np.ndarray | jax.Array  # [B, 1] int32, 0 for none
    top_p: np.ndarray | jax.Array  # [B, 1] bool: whether the row filters by top-p
    # [B, 1] float32: 1 - top_p, rounded once from the float (as the official float arithmetic
    # does); the float32 difference of float32 values would differ in its last bits.
    top_p_budget: np.ndarray | jax.Array
    any_draw: bool = dataclasses.field(metadata=_STATIC)
    any_top_k: bool = dataclasses.field(metadata=_STATIC)
    any_top_p: bool = dataclasses.field(metadata=_STATIC)

    @classmethod
    def of(cls, configs: Sequence[SamplerConfig]) -> "SamplerRows":
        col = lambda values, dtype: np.asarray(values, dtype).reshape(-1, 1)  # noqa: E731
        # top_p = 1 removes only entries of probability 0, which neither argmax nor a draw can
        # pick, so it is skipped (as top_p = 0); the presets of most tasks have top_p = 1.
        tops = [1.0 if c.top_p is None else c.top_p for c in configs]
        on_p = [0.0 < p < 1.0 for p in tops]
        return cls(
            np.asarray([c.do_sample for c in configs], bool),
            col([1.0 if c.temperature is None else c.temperature for c in configs], np.float32),
            col([c.top_k or 0 for c in configs], np.int32),
            col(on_p, bool),
            col([1.0 - p if on else 0.0 for p, on in zip(tops, on_p)], np.float32),
            any(c.do_sample for c in configs),
            any(c.top_k for c in configs),
            any(on_p),
        )


def _rows(cfg: "SamplerConfig | SamplerRows", rows: int) -> SamplerRows:
    return cfg if isinstance(cfg, SamplerRows) else SamplerRows.of([cfg] * rows)


def process(logits: jax.Array, cfg: "SamplerConfig | SamplerRows") -> jax.Array:
    """Temperature, top-k and top-p filtering of logits [B, V] (removed entries are -inf).

    Sorting is slow on the CPU, so both thresholds are found by a bitwise search over the scores'
    order-preserving integer keys (32 masked counts or sums over [B, V]) instead. Each search runs
    only when some row asks for its filter.
    """
    rows = _rows(cfg, logits.shape[0])
    scores = logits.astype(jnp.float32) / rows.temperature
    scores = jnp.where(scores == 0, 0.0, scores)  # -0.0 and 0.0 get one key
    keys = _ordered_keys(scores)
    if rows.any_top_k:
        # The k-th largest key: the largest u with at least k keys >= u.
        kth = _largest(lambda u: jnp.sum(keys >= u, -1, keepdims=True) >= rows.top_k, len(keys))
        # top_k >= V keeps every entry.
        on_k = (rows.top_k > 0) & (rows.top_k < scores.shape[-1])
        scores = jnp.where(on_k & (keys < kth), -jnp.inf, scores)
    if rows.any_top_p:
        scores = jnp.where(rows.top_p, _top_p_of_budget(scores, keys, rows.top_p_budget), scores)
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
    """The official top-p filter of every row (`top_p` a float)."""
    return _top_p_of_budget(scores, keys, 1.0 - top_p)


def _top_p_of_budget(scores, keys, budget):
    """The official top-p: in stable ascending order, remove the entries whose cumulative
    probability is <= budget = 1 - top_p, but never the last one. Cumulative probabilities only
    grow, so the removed entries are everything below a threshold score plus the first r entries
    (in index order, the stable sort's order) of those equal to it."""
    probs = jax.nn.softmax(scores, axis=-1)
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
    logits: jax.Array,
    cfg: "SamplerConfig | SamplerRows",
    rng: jax.Array,
    forbidden: jax.Array | None = None,
) -> jax.Array:
    """Token ids [B] from logits [B, V]; `forbidden` is a bool mask [V] or [B, V] of ids never
    chosen. `cfg`: one sampler for every row, or one per row."""
    rows = _rows(cfg, logits.shape[0])
    scores = process(logits, rows)
    if forbidden is not None:
        scores = jnp.where(forbidden, -jnp.inf, scores)
    greedy = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    if not rows.any_draw:
        return greedy
    # The draw uses the same key whatever the other rows do: a row's tokens do not depend on the
    # other rows' samplers.
    return jnp.where(rows.do_sample, _draw(scores, rng), greedy)


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
