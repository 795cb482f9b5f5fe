"""1-D convolutions over [batch, time, channels] with PyTorch semantics and logical axes.

Kernels are stored [kernel, in, out] for both Conv1d (PyTorch [out, in, k]) and ConvTranspose1d
(PyTorch [in, out, k]); the converter's `conv1d` / `conv_transpose1d` transforms map between them.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.nn.params import normal, param, zeros

_DIMS = ("NWC", "WIO", "NWC")


def _kernel_and_bias(in_features, out_features, kernel_size, use_bias, init_std, param_dtype, rngs):
    """A kernel [k, in, out] and an optional bias [out], with their logical axes."""
    kernel = param(
        rngs,
        normal(init_std),
        (kernel_size, in_features, out_features),
        ("kernel", "conv_in", "conv_out"),
        param_dtype,
    )
    bias = param(rngs, zeros, (out_features,), ("conv_out",), param_dtype) if use_bias else None
    return kernel, bias


class Conv1d(nnx.Module):
    """torch.nn.Conv1d(in, out, kernel, stride, padding) with zero padding on both sides."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = True,
        init_std: float = 0.02,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel, self.bias = _kernel_and_bias(
            in_features, out_features, kernel_size, use_bias, init_std, param_dtype, rngs
        )
        self.stride = stride
        self.padding = padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            window_strides=(self.stride,),
            padding=[(self.padding, self.padding)],
            dimension_numbers=_DIMS,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class ConvTranspose1d(nnx.Module):
    """torch.nn.ConvTranspose1d(in, out, kernel, stride) without padding:
    y[s*t + j] += x[t] @ W[j] (+ bias), output length (T - 1) * s + k."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int,
        use_bias: bool = True,
        init_std: float = 0.02,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel, self.bias = _kernel_and_bias(
            in_features, out_features, kernel_size, use_bias, init_std, param_dtype, rngs
        )
        self.stride = stride
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        kernel = self.kernel[...].astype(dtype)
        k = kernel.shape[0]
        # A transposed convolution is a convolution of the stride-dilated input with the kernel
        # flipped in time, padded by k - 1 on both sides.
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            kernel[::-1],
            window_strides=(1,),
            padding=[(k - 1, k - 1)],
            lhs_dilation=(self.stride,),
            dimension_numbers=_DIMS,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y
