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
    if cfg.top_k:
        k = min(cfg.top_k, scores.shape[-1])
        kth = jax.lax.top_k(scores, k)[0][:, -1:]
        scores = jnp.where(scores < kth, -jnp.inf, scores)
    if cfg.top_p is not None and 0.0 < cfg.top_p <= 1.0:
        order = jnp.argsort(scores, axis=-1, stable=True)
        sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
        remove_sorted = (cumulative <= 1.0 - cfg.top_p).at[:, -1].set(False)
        rows = jnp.arange(scores.shape[0])[:, None]
        remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
        scores = jnp.where(remove, -jnp.inf, scores)
    return scores


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
