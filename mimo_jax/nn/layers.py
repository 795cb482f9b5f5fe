"""Dense, embedding and norm layers whose parameters carry logical axis names.

`dtype` is the compute dtype (None: that of the input); parameters keep `param_dtype` and are cast
at use, so bf16 compute can run on fp32 parameters.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.nn.params import normal, ones, param, zeros


def _compute_dtype(dtype, x):
    return dtype if dtype is not None else x.dtype


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (the transpose of a PyTorch Linear weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = False,
        init_std: float = 0.02,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel = param(rngs, normal(init_std), (in_features, out_features), axes, param_dtype)
        self.bias = param(rngs, zeros, (out_features,), axes[1:], param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = _compute_dtype(self.dtype, x)
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Embed(nnx.Module):
    """A lookup table [num_embeddings, features]."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: tuple[str | None, str | None],
        init_std: float = 0.02,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embedding = param(
            rngs, normal(init_std), (num_embeddings, features), axes, param_dtype
        )
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.embedding[...]
        out = jnp.take(table, ids, axis=0)
        return out.astype(self.dtype) if self.dtype is not None else out

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table (a tied output head)."""
        dtype = _compute_dtype(self.dtype, x)
        return jnp.dot(x.astype(dtype), self.embedding[...].astype(dtype).T)


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: statistics in float32, the normalised value cast back to the input dtype, then
    scaled with the usual dtype promotion (a bf16 input and an fp32 scale give fp32, as in
    PyTorch)."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        axis_name: str = "embed",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = param(rngs, ones, (features,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return y * self.scale[...]


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm with affine parameters (`scale`, `bias`); statistics in float32."""

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-5,
        axis_name: str = "embed",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = param(rngs, ones, (features,), (axis_name,), param_dtype)
        self.bias = param(rngs, zeros, (features,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)
