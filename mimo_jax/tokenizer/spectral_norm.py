"""Spectral normalisation (Miyato et al., 2018) of convolution and dense layers, as PyTorch's
`torch.nn.utils.spectral_norm` does it.

The layer's trained parameter is the raw kernel W; every call uses W / σ, with σ estimated by power
iteration on W reshaped to PyTorch's [out, -1] matrix:
  training:  v <- normalize(Wᵀ u),  u <- normalize(W v)   (one step per call, stored),
  always:    σ = uᵀ W v, gradients through W only (u and v are constants to autodiff),
with normalize(x) = x / max(‖x‖, 1e-12). In eval mode (`model.eval()`) the stored u and v are used
as they are, so evaluation neither changes state nor depends on how often it runs. u and v start
from 15 power-iteration steps, as `torch.nn.utils.parametrizations.spectral_norm` starts them, so
σ is already a good estimate at the first call.

`nnx.SpectralNorm` (flax 0.12.8) is not used: it writes W / σ back into the wrapped layer's
nnx.Param on every call, eval mode included, so the trained parameter is replaced by its normalised
value (PyTorch trains `weight_orig` and derives the weight), and in eval mode it still iterates
instead of reusing the stored estimate.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.nn.params import Initializer, param

_HIGHEST = jax.lax.Precision.HIGHEST
_CONV_DIMS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}
_KERNEL_AXES = {1: ("kernel",), 2: ("kernel_h", "kernel_w")}


class SpectralVector(nnx.Variable):
    """A power-iteration vector (u or v): saved with the model in checkpoints, never trained (it is
    not an nnx.Param, so an optimizer over nnx.Param does not see it)."""


def l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def weight_matrix(kernel: jax.Array) -> jax.Array:
    """A kernel [*spatial, in, out] (a dense kernel is [in, out]) as PyTorch's weight reshaped to
    [out, -1]: [out, in * prod(spatial)] in PyTorch's (in, *spatial) order, so that u and v line up
    with a PyTorch checkpoint's `weight_u` and `weight_v`."""
    n = kernel.ndim
    return jnp.transpose(kernel, (n - 1, n - 2, *range(n - 2))).reshape(kernel.shape[-1], -1)


def power_iteration(
    matrix: jax.Array, u: jax.Array, eps: float, steps: int = 1
) -> tuple[jax.Array, jax.Array]:
    """`steps` (>= 1) power-iteration steps from u: (u, v), unit estimates of the top left and right
    singular vectors of matrix [out, in]."""
    if steps < 1:
        raise ValueError(f"steps={steps}: expected at least one power-iteration step")

    def step(_, uv):
        v = l2_normalize(jnp.dot(matrix.T, uv[0], precision=_HIGHEST), eps)
        return l2_normalize(jnp.dot(matrix, v, precision=_HIGHEST), eps), v

    return jax.lax.fori_loop(0, steps, step, (u, jnp.zeros(matrix.shape[1], matrix.dtype)))


@functools.partial(jax.jit, static_argnames=("eps", "steps"))
def initial_vectors(
    kernel: jax.Array, key: jax.Array, eps: float = 1e-12, steps: int = 15
) -> tuple[jax.Array, jax.Array]:
    """(u, v) after `steps` power-iteration steps from a random unit u, as
    `torch.nn.utils.parametrizations.spectral_norm` starts them (one compiled function per kernel
    shape rather than one per operation when a model is built eagerly)."""
    matrix = weight_matrix(kernel.astype(jnp.float32))
    u = l2_normalize(jax.random.normal(key, (matrix.shape[0],)), eps)
    return power_iteration(matrix, u, eps, steps)


class SpectralNorm(nnx.Module):
    """The power-iteration state (u [out], v [in * prod(kernel)]) of one kernel and the division
    by σ. `use_running_average` is the attribute NNX's `.train()` / `.eval()` switch: False
    (training, the default as in PyTorch) takes one power-iteration step per call and stores it."""

    def __init__(self, u: jax.Array, v: jax.Array, *, eps: float = 1e-12):
        self.u = SpectralVector(u, out_sharding=(None,), eager_sharding=False)
        self.v = SpectralVector(v, out_sharding=(None,), eager_sharding=False)
        self.eps = eps
        self.use_running_average = False

    def sigma(self, kernel: jax.Array) -> jax.Array:
        """σ = uᵀ W v (float32), after this call's power-iteration step in training mode."""
        matrix = weight_matrix(kernel.astype(jnp.float32))
        u, v = self.u[...], self.v[...]
        if not self.use_running_average:
            u, v = power_iteration(jax.lax.stop_gradient(matrix), u, self.eps)
            self.u[...] = u
            self.v[...] = v
        u, v = jax.lax.stop_gradient((u, v))
        return jnp.dot(u, jnp.dot(matrix, v, precision=_HIGHEST), precision=_HIGHEST)

    def __call__(self, kernel: jax.Array) -> jax.Array:
        """kernel / σ in float32."""
        return kernel.astype(jnp.float32) / self.sigma(kernel)


def torch_uniform(fan_in: int) -> Initializer:
    """PyTorch's default Conv/Linear initialisation of weights and biases: U(±1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def spectral_parameters(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], param_dtype, eps: float
) -> tuple[nnx.Param, nnx.Param, SpectralNorm]:
    """A layer's kernel [..., in, out] and bias [out] initialised as PyTorch does, with their
    logical axes, and the kernel's spectral-norm state."""
    init = torch_uniform(math.prod(shape[:-1]))
    kernel = param(rngs, init, shape, axes, param_dtype)
    bias = param(rngs, init, shape[-1:], axes[-1:], param_dtype)
    u, v = initial_vectors(kernel[...], rngs.params(), eps)
    return kernel, bias, SpectralNorm(u, v, eps=eps)


def _per_axis(value: int | Sequence[int], rank: int, name: str) -> tuple[int, ...]:
    values = (value,) * rank if isinstance(value, int) else tuple(value)
    if len(values) != rank:
        raise ValueError(f"{name}={values}: expected {rank} values, one per spatial axis")
    return values


class SNConv(nnx.Module):
    """torch.nn.Conv1d / Conv2d wrapped in spectral_norm, over [batch, *spatial, channels]:
    kernel [*kernel_size, in, out], PyTorch's symmetric zero padding, stride and dilation per
    spatial axis."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dtype=None,
        param_dtype=jnp.float32,
        eps: float = 1e-12,
        rngs: nnx.Rngs,
    ):
        rank = len(kernel_size)
        if rank not in _CONV_DIMS:
            raise ValueError(f"kernel_size={tuple(kernel_size)}: expected a 1-D or 2-D kernel")
        self.kernel, self.bias, self.spectral = spectral_parameters(
            rngs,
            (*kernel_size, in_features, out_features),
            (*_KERNEL_AXES[rank], "conv_in", "conv_out"),
            param_dtype,
            eps,
        )
        self.stride = _per_axis(stride, rank, "stride")
        self.dilation = _per_axis(dilation, rank, "dilation")
        self.padding = _per_axis(padding, rank, "padding")
        self.dtype = dtype

    def weight(self) -> jax.Array:
        """The spectrally normalised kernel (a power-iteration step in training mode)."""
        return self.spectral(self.kernel[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.weight().astype(dtype),
            window_strides=self.stride,
            padding=[(p, p) for p in self.padding],
            rhs_dilation=self.dilation,
            dimension_numbers=_CONV_DIMS[len(self.stride)],
        )
        return y + self.bias[...].astype(dtype)


class SNDense(nnx.Module):
    """torch.nn.Linear wrapped in spectral_norm: y = x @ (kernel / σ) + bias, kernel [in, out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        dtype=None,
        param_dtype=jnp.float32,
        eps: float = 1e-12,
        rngs: nnx.Rngs,
    ):
        self.kernel, self.bias, self.spectral = spectral_parameters(
            rngs, (in_features, out_features), axes, param_dtype, eps
        )
        self.dtype = dtype

    def weight(self) -> jax.Array:
        """The spectrally normalised kernel (a power-iteration step in training mode)."""
        return self.spectral(self.kernel[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        return jnp.dot(x.astype(dtype), self.weight().astype(dtype)) + self.bias[...].astype(dtype)
