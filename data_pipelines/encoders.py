"""The audio encoder interface of `data_pipelines.tokenize`.

An encoder is a callable `encode_batch(wavs) -> codes`:
  wavs:  list of 1-D float32 numpy arrays, 24 kHz mono, of similar lengths (the caller sorts by
         length; the encoder pads and runs them as one batch on the device);
  codes: list of integer numpy arrays `[code_frames(len(wav)), codebooks]`, the RVQ codes of each
         wav on its own (a clip's codes must not depend on what else is in the batch).
`load_encoder(spec, checkpoint, codebooks)` returns one:
  "mimo"             `mimo_jax.tokenizer.load_encoder(checkpoint, codebooks=codebooks)` (the JAX
                     MiMo-Audio tokenizer; it must return such a callable);
  "energy"           `EnergyEncoder`, a deterministic pure-numpy stand-in with the tokenizer's
                     frame rate and codebook sizes, for testing pipelines without a checkpoint;
  "module:function"  any factory called as `function(checkpoint, codebooks=codebooks)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np

from data_pipelines.audio import code_frames

EncodeBatch = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
CODEBOOK_SIZES = (1024, 1024) + (128,) * 18
SAMPLES_PER_FRAME = 960


class EnergyEncoder:
    """Stand-in encoder: per 40 ms frame, the log energy of the wav, scaled differently for each
    codebook and wrapped into the codebook's range. Deterministic and batch-independent."""

    def __init__(self, codebooks: int = 8):
        self.codebooks = codebooks
        self.sizes = np.asarray(CODEBOOK_SIZES[:codebooks])

    def __call__(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self._one(np.asarray(w, np.float32)) for w in wavs]

    def _one(self, wav: np.ndarray) -> np.ndarray:
        n = code_frames(len(wav))
        padded = np.zeros(n * SAMPLES_PER_FRAME, np.float32)
        padded[: min(len(wav), len(padded))] = wav[: len(padded)]
        energy = np.log(np.mean(padded.reshape(n, SAMPLES_PER_FRAME) ** 2, axis=1) + 1e-8)
        scaled = np.floor((energy[:, None] + 20.0) * 7.0 * np.arange(1, self.codebooks + 1))
        return np.mod(scaled.astype(np.int64), self.sizes).astype(np.int16)


def load_encoder(spec: str, checkpoint: str | None, codebooks: int) -> EncodeBatch:
    if spec == "energy":
        return EnergyEncoder(codebooks)
    if spec == "mimo":
        from mimo_jax.tokenizer import load_encoder as load_mimo  # JAX only when it is used

        return load_mimo(checkpoint, codebooks=codebooks)
    if ":" not in spec:
        raise ValueError(f"encoder {spec!r}: expected 'mimo', 'energy' or 'module:function'")
    module, name = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"encoder {spec!r}: cannot import {module}.{name} ({e})") from e
    return factory(checkpoint, codebooks=codebooks)
