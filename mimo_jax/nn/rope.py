"""Rotary position embeddings in the rotate-half (non-interleaved) form of HF Qwen2 and the
MiMo-Audio tokenizer: inv_freq[j] = theta^(-2j/d), angles in float32."""

import jax
import jax.numpy as jnp


def inv_frequencies(head_dim: int, theta: float) -> jax.Array:
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def rope_tables(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., head_dim] for integer positions [...], cast to the activation dtype."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, time, heads, head_dim]; cos/sin [batch, time, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
