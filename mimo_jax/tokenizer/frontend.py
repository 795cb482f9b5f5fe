"""Log-mel front end of the tokenizer, in JAX so that it batches and jits with the encoder.

torchaudio MelSpectrogram(power=1, center=True, pad_mode="reflect", norm=None, mel_scale="htk")
followed by log(clip(x, 1e-7)): a centred STFT of each clip with reflect padding at the clip's own
ends (so clips of different lengths batch without changing each other), a periodic Hann window,
magnitude, an HTK triangular filterbank without area normalisation.
"""

import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np

from mimo_jax.tokenizer.config import TokenizerConfig


def periodic_hann(length: int) -> np.ndarray:
    """w[n] = 0.5 - 0.5 cos(2 pi n / length) (torch.hann_window default; np.hanning is
    symmetric)."""
    n = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def stft_window(config: TokenizerConfig) -> np.ndarray:
    """The analysis window, centred and zero-padded to nfft as torch.stft does."""
    window = periodic_hann(config.window_size)
    left = (config.nfft - config.window_size) // 2
    return np.pad(window, (left, config.nfft - config.window_size - left))


@functools.lru_cache(maxsize=8)
def htk_filterbank(sr: int, nfft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    fb = librosa.filters.mel(
        sr=sr, n_fft=nfft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=True, norm=None
    )
    return np.ascontiguousarray(fb.T.astype(np.float32))  # [freqs, mels]


def mel_filterbank(config: TokenizerConfig) -> np.ndarray:
    fmax = config.fmax if config.fmax is not None else config.sampling_rate / 2
    return htk_filterbank(
        config.sampling_rate, config.nfft, config.n_mels, float(config.fmin), float(fmax)
    )


def mel_lengths(config: TokenizerConfig, lengths: jax.Array) -> jax.Array:
    return lengths // config.hop_length + 1


def _reflect(index: jax.Array, length: jax.Array) -> jax.Array:
    """Reflect-pad indexing (no edge repeat) into a signal of `length` samples."""
    index = jnp.abs(index)
    return jnp.where(index >= length, 2 * (length - 1) - index, index)


def log_mel(config: TokenizerConfig, wav: jax.Array, lengths: jax.Array) -> jax.Array:
    """wav [batch, samples] float32 (zero padded), lengths [batch] -> log-mel [batch, frames, mels]
    with frames = samples // hop + 1; frames past a clip's own count are zero.
    Every clip needs at least nfft // 2 + 1 samples (checked by the callers that read audio)."""
    batch, samples = wav.shape
    zeros = jnp.zeros((batch,), jnp.int32)
    return log_mel_frames(config, wav, lengths, zeros, zeros, samples // config.hop_length + 1)


def window_bounds(config: TokenizerConfig, first_frame: int, frames: int) -> tuple[int, int]:
    """The clip samples [start, start + size) that hold everything frames [first_frame,
    first_frame + frames) read, reflect padding at the clip's ends included (start may be < 0)."""
    return (
        first_frame * config.hop_length - config.nfft,
        frames * config.hop_length + 2 * config.nfft,
    )


def log_mel_frames(
    config: TokenizerConfig,
    wav: jax.Array,
    clip_lengths: jax.Array,
    wav_start: jax.Array,
    first_frame: jax.Array,
    frames: int,
) -> jax.Array:
    """Frames [first_frame, first_frame + frames) of each clip's log-mel, identical to those rows
    of the whole clip's log-mel. wav [batch, samples] holds clip samples from wav_start [batch]
    on (see window_bounds); clip_lengths [batch] are the whole clips' lengths in samples.
    -> [batch, frames, mels], zero past each clip's last frame."""
    offsets = (
        jnp.arange(frames)[:, None] * config.hop_length
        + jnp.arange(config.nfft)[None, :]
        - config.nfft // 2
    )
    index = offsets[None] + (first_frame * config.hop_length)[:, None, None]
    index = _reflect(index, clip_lengths[:, None, None]) - wav_start[:, None, None]
    index = jnp.clip(index, 0, wav.shape[1] - 1)
    windowed = jax.vmap(lambda w, i: w[i])(wav.astype(jnp.float32), index)
    windowed = windowed * jnp.asarray(stft_window(config))
    magnitude = jnp.abs(jnp.fft.rfft(windowed, n=config.nfft, axis=-1))
    mel = jnp.matmul(
        magnitude, jnp.asarray(mel_filterbank(config)), precision=jax.lax.Precision.HIGHEST
    )
    logmel = jnp.log(jnp.maximum(mel, 1e-7))
    last = mel_lengths(config, clip_lengths) - first_frame
    valid = jnp.arange(frames)[None, :] < last[:, None]
    return jnp.where(valid[..., None], logmel, 0.0)
