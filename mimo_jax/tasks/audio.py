"""The audio front end of the official demo (`preprocess_input`): a file is read as
float32, its channels averaged and resampled to the tokenizer's rate with the windowed-sinc
resampler of `torchaudio.functional.resample` (its defaults); a waveform array is taken as it is
(24 kHz mono). Codes come from the tokenizer in 6000-frame segments; the first `channels`
codebooks are kept and padded to a multiple of the group size by repeating the last frame.
"""

from __future__ import annotations

import math

import numpy as np

from mimo_jax.tasks.segments import patchify
from mimo_jax.tokenizer.audio_io import InputError, check_waveform, read_audio

LOWPASS_WIDTH = 6  # torchaudio's defaults
ROLLOFF = 0.99


def _sinc_kernel(orig: int, new: int) -> tuple[np.ndarray, int]:
    """torchaudio's Hann-windowed sinc kernel [new, 2 * width + orig] in float32, and width."""
    base = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_WIDTH * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float32)[None] / np.float32(orig)
    t = np.arange(0, -new, -1, dtype=np.float32)[:, None] / np.float32(new) + idx
    t = np.clip(t * np.float32(base), -LOWPASS_WIDTH, LOWPASS_WIDTH)
    window = np.cos(t * np.float32(math.pi / LOWPASS_WIDTH / 2)) ** 2
    t = t * np.float32(math.pi)
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, np.float32(1.0), np.sin(t) / t)
    return (kernel * window * np.float32(base / orig)).astype(np.float32), width


def resample(wav: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """`torchaudio.functional.resample(wav, orig_rate, new_rate)` with its defaults, float32."""
    if orig_rate == new_rate:
        return np.asarray(wav, np.float32)
    gcd = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // gcd, int(new_rate) // gcd
    kernel, width = _sinc_kernel(orig, new)
    wav = np.asarray(wav, np.float32)
    padded = np.pad(wav, (width, width + orig))
    frames = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::orig]
    out = (frames @ kernel.T).reshape(-1)  # output i * new + j from frame i, phase j
    return out[: math.ceil(new * wav.size / orig)].astype(np.float32)


class AudioFrontEnd:
    """Waveforms or files -> patches [P, group_size, channels], encoded in one batch."""

    def __init__(self, tokenizer, group_size: int, channels: int):
        self.tokenizer = tokenizer  # mimo_jax.tokenizer.audio_tokenizer.Tokenizer
        self.group_size = group_size
        self.channels = channels

    @property
    def rate(self) -> int:
        return self.tokenizer.config.sampling_rate

    def waveform(self, audio, name: str) -> np.ndarray:
        """A path (read and resampled as the official demo does) or a 24 kHz mono array, checked:
        empty, silent, non-finite or too short audio is an InputError naming `name`."""
        min_samples = self.tokenizer.config.min_samples
        if isinstance(audio, str):
            return read_audio(
                audio,
                self.rate,
                min_samples=min_samples,
                resample=lambda w, r: resample(w, r, self.rate),
            )
        if isinstance(audio, np.ndarray):
            return check_waveform(audio, name, min_samples=min_samples)
        raise InputError(
            f"{name}: {type(audio).__name__} is not audio (expected a file path "
            f"or a float array of 24 kHz samples)"
        )

    def codes(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """Checked waveforms -> codes [frames, channels] each, one batched encoder call."""
        return self.tokenizer.encode(wavs, num_codebooks=self.channels) if wavs else []

    def patches(self, audios: list, names: list[str] | None = None) -> list[np.ndarray]:
        names = names or [f"audio {i}" for i in range(len(audios))]
        wavs = [self.waveform(a, n) for a, n in zip(audios, names)]
        return [patchify(c, self.group_size, self.channels) for c in self.codes(wavs)]
