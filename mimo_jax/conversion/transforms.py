"""Layout changes between PyTorch tensors and NNX parameters, each with its inverse.

A rule names one of these; the converter applies `to_nnx` reading an official checkpoint and
`to_torch` writing one, so a round trip is exact.
"""

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    to_nnx: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_ndim: int | None  # expected rank of the PyTorch tensor (None: any)


TRANSFORMS: dict[str, Transform] = {
    # Embeddings, biases, norm weights, buffers: unchanged.
    "identity": Transform(lambda a: a, lambda a: a, None),
    # nn.Linear weight [out, in] <-> Dense kernel [in, out].
    "linear": Transform(lambda a: a.T, lambda a: a.T, 2),
    # nn.Conv1d weight [out, in, k] <-> kernel [k, in, out].
    "conv1d": Transform(lambda a: a.transpose(2, 1, 0), lambda a: a.transpose(2, 1, 0), 3),
    # nn.ConvTranspose1d weight [in, out, k] <-> kernel [k, in, out].
    "conv_transpose1d": Transform(
        lambda a: a.transpose(2, 0, 1), lambda a: a.transpose(1, 2, 0), 3
    ),
}
