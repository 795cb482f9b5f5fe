"""Frozen kernels held quantised (QLoRA's base): qwix's symmetric int8 or int4 with one scale per
`tile` consecutive inputs of each output (per group), dequantised at each use to the kernel's dtype.
`QuantizedDense` is a frozen Dense held so; `lm.lora.LoRADense` holds its base the same way.

A kernel [..., in, out] becomes two `QuantizedKernel` variables: its values [..., in, out] (int8 or
int4, the kernel's logical axes) and its scales [..., in / tile, out] (the kernel's dtype; the input
axis unsharded, since a tile never spans shards of it). `QuantizedKernel` is not an `nnx.Param`:
nothing trains it, and a model checkpoint, which holds parameters, refuses a model that has one
(`conversion.param_store.save`): the weights it stands for exist only after a merge.

int8 and int4 are the storage types Orbax checkpoints hold (its tensorstore refuses uint4, the
storage of qwix's NF4), so a training checkpoint keeps the quantised base as it is.
"""

import dataclasses

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from mimo_jax.nn.layers import Dense
from mimo_jax.nn.params import logical_axes

QTYPES = {"int8": jnp.int8, "int4": jnp.int4}


class QuantizedKernel(nnx.Variable):
    """The values or the scales of a quantised frozen kernel."""


@dataclasses.dataclass(frozen=True)
class Quantization:
    qtype: str  # a key of QTYPES
    tile: int  # inputs sharing one scale

    def __post_init__(self):
        if self.qtype not in QTYPES:
            raise ValueError(
                f"lora.quantize={self.qtype!r}: expected one of {', '.join(map(repr, QTYPES))} "
                f"(or '' for a base in its own dtype)"
            )
        if not (isinstance(self.tile, int) and self.tile >= 1):
            raise ValueError(f"lora.quantize_tile={self.tile!r}: expected an integer >= 1")


def quantize(kernel: jax.Array, q: Quantization) -> qwix.QArray:
    """The kernel [..., in, out] with a scale per output and per `q.tile` inputs (and per layer of
    a stack)."""
    if kernel.shape[-2] % q.tile:
        raise ValueError(
            f"lora.quantize_tile={q.tile} does not divide a kernel's {kernel.shape[-2]} inputs"
        )
    per_channel = tuple(a for a in range(kernel.ndim) if a != kernel.ndim - 2)
    return qwix.quantize(
        kernel, QTYPES[q.qtype], channelwise_axes=per_channel, tiled_axes={kernel.ndim - 2: q.tile}
    )


def dequantize(values: jax.Array, scales: jax.Array, qtype: str) -> jax.Array:
    """The kernel the values and scales stand for, in the scales' dtype."""
    return qwix.dequantize(qwix.QArray(values, scales, qtype=QTYPES[qtype]))


def scale_axes(kernel_axes: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """The logical axes of the scales: the kernel's, the input axis unsharded."""
    return kernel_axes[:-2] + (None, kernel_axes[-1])


def quantized_kernel(kernel: nnx.Variable, q: Quantization) -> tuple[QuantizedKernel, ...]:
    """(values, scales) of a kernel parameter, each carrying its logical axes."""
    axes = logical_axes(kernel)
    packed = quantize(kernel[...], q)
    meta = lambda ax: {"out_sharding": ax, "eager_sharding": False}
    return (
        QuantizedKernel(packed.qvalue, **meta(axes)),
        QuantizedKernel(packed.scale, **meta(scale_axes(axes))),
    )


class QuantizedDense(nnx.Module):
    """A frozen Dense with its kernel held quantised: y = x @ dequantize(kernel) (+ bias)."""

    def __init__(self, dense: Dense, q: Quantization):
        self.kernel_values, self.kernel_scales = quantized_kernel(dense.kernel, q)
        self.bias, self.dtype, self.qtype = dense.bias, dense.dtype, q.qtype

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.kernel_values.shape)

    def kernel(self) -> jax.Array:
        return dequantize(self.kernel_values[...], self.kernel_scales[...], self.qtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype if self.dtype is not None else x.dtype
        y = jnp.dot(x.astype(dtype), self.kernel().astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y
