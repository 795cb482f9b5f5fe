"""The audio encoder interface of `data_pipelines.tokenize`.

An encoder is a callable `encode_batch(wavs) -> codes` with a `config` (a `TokenizerConfig`: the
sample rate, frame rate and codebook sizes the job checks codes against):
  wavs:  list of 1-D float32 numpy arrays, mono at `config.sampling_rate`, of similar lengths (the
         caller sorts by length; the encoder pads and runs them as one batch on the device);
  codes: list of integer numpy arrays `[config.clip_code_frames(len(wav)), codebooks]`, the RVQ
         codes of each wav on its own (a clip's codes must not depend on what else is in the batch).
`load_encoder(spec, checkpoint, codebooks)` returns one:
  "mimo"             `MimoEncoder`, the JAX MiMo-Audio tokenizer of `checkpoint`;
  "energy"           `EnergyEncoder`, a deterministic pure-numpy stand-in with the released
                     tokenizer's frame rate and codebook sizes, for testing pipelines without a
                     checkpoint;
  "module:function"  any factory called as `function(checkpoint, codebooks=codebooks)`; without a
                     `config` attribute its encoder is taken to have the released tokenizer's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np

from mimo_jax.tokenizer.config import TokenizerConfig

EncodeBatch = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


def config_of(encode: EncodeBatch) -> TokenizerConfig:
    return getattr(encode, "config", None) or TokenizerConfig()


class MimoEncoder:
    """The JAX MiMo-Audio tokenizer's encoder (batched by length inside)."""

    def __init__(self, checkpoint: str, codebooks: int):
        from mimo_jax.tokenizer.audio_tokenizer import Tokenizer  # JAX and the model only when used

        self.tokenizer = Tokenizer.load(checkpoint)
        self.config = self.tokenizer.config
        self.codebooks = codebooks

    def __call__(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.tokenizer.encode(wavs, num_codebooks=self.codebooks)


class EnergyEncoder:
    """Stand-in encoder: per code frame, the log energy of the wav, scaled differently for each
    codebook and wrapped into the codebook's range. Deterministic and batch-independent."""

    def __init__(self, codebooks: int = 8, config: TokenizerConfig | None = None):
        self.config = config or TokenizerConfig()
        self.codebooks = codebooks
        self.sizes = np.asarray(self.config.codebook_sizes[:codebooks])

    def __call__(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self._one(np.asarray(w, np.float32)) for w in wavs]

    def _one(self, wav: np.ndarray) -> np.ndarray:
        n, spc = self.config.clip_code_frames(len(wav)), self.config.samples_per_code
        padded = np.zeros(n * spc, np.float32)
        padded[: min(len(wav), len(padded))] = wav[: len(padded)]
        energy = np.log(np.mean(padded.reshape(n, spc) ** 2, axis=1) + 1e-8)
        scaled = np.floor((energy[:, None] + 20.0) * 7.0 * np.arange(1, self.codebooks + 1))
        return np.mod(scaled.astype(np.int64), self.sizes).astype(np.int16)


def load_encoder(spec: str, checkpoint: str | None, codebooks: int) -> EncodeBatch:
    if spec == "energy":
        return EnergyEncoder(codebooks)
    if spec == "mimo":
        if not checkpoint:
            raise ValueError(
                "encoder 'mimo': expected an audio tokenizer checkpoint (--checkpoint)"
            )
        return MimoEncoder(checkpoint, codebooks)
    if ":" not in spec:
        raise ValueError(f"encoder {spec!r}: expected 'mimo', 'energy' or 'module:function'")
    module, name = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"encoder {spec!r}: cannot import {module}.{name} ({e})") from e
    return factory(checkpoint, codebooks=codebooks)
