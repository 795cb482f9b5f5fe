"""The tokenizer's multi-scale mel reconstruction loss (report §2.1.2, eq. 1):

    L_recon = Σ_i mean | S_i(x) - S_i(x̂) |,   i ∈ {5, 6, 7}

S_i is the mel spectrogram with 2^i bins over a normalised STFT of window 15·2^(i-1) and hop
15·2^(i-2) samples (240/120, 480/240, 960/480 at 24 kHz): torchaudio's MelSpectrogram with
`normalized=True` (the STFT divided by the window's L2 norm), power 1, a centred STFT with reflect
padding, a periodic Hann window of n_fft = the window length, and an HTK filterbank without
normalisation. The mean runs over the frames whose centre lies inside the clip (all of them for
full crops) and every bin.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.tokenizer.frontend import htk_filterbank, periodic_hann

REPORT_SCALES = (5, 6, 7)


@dataclasses.dataclass(frozen=True)
class MelScale:
    bins: int
    window: int
    hop: int

    @classmethod
    def of(cls, i: int) -> "MelScale":
        return cls(2**i, 15 * 2 ** (i - 1), 15 * 2 ** (i - 2))


def scales(exponents=REPORT_SCALES) -> tuple[MelScale, ...]:
    return tuple(MelScale.of(i) for i in exponents)


def mel_spectrogram(wav: jax.Array, scale: MelScale, sampling_rate: int) -> jax.Array:
    """wav [batch, samples] -> magnitudes [batch, frames, bins], frames = samples // hop + 1."""
    if wav.shape[-1] <= scale.window // 2:
        raise ValueError(
            f"a clip of {wav.shape[-1]} samples is too short for the mel scale of window "
            f"{scale.window}: reflect padding needs more than {scale.window // 2}"
        )
    half = scale.window // 2
    padded = jnp.pad(wav.astype(jnp.float32), ((0, 0), (half, half)), mode="reflect")
    frames = 1 + (padded.shape[-1] - scale.window) // scale.hop
    index = jnp.arange(frames)[:, None] * scale.hop + jnp.arange(scale.window)[None, :]
    window = periodic_hann(scale.window)
    spectrum = jnp.fft.rfft(padded[:, index] * window, axis=-1)
    magnitude = jnp.abs(spectrum) / float(np.sqrt(np.sum(window.astype(np.float64) ** 2)))
    filterbank = htk_filterbank(
        sampling_rate, scale.window, scale.bins, 0.0, float(sampling_rate) / 2
    )
    return jnp.matmul(magnitude, filterbank, precision=jax.lax.Precision.HIGHEST)


def multiscale_mel_loss(
    wav: jax.Array,
    reconstructed: jax.Array,
    sampling_rate: int,
    lengths: jax.Array | None = None,
    mel_scales: tuple[MelScale, ...] = scales(),
) -> jax.Array:
    """Σ over scales of the mean L1 distance of the two mel spectrograms; wav and reconstructed
    [batch, samples], `lengths` [batch] the real samples of each clip (None: all)."""
    total = jnp.zeros((), jnp.float32)
    for scale in mel_scales:
        a = mel_spectrogram(wav, scale, sampling_rate)
        b = mel_spectrogram(reconstructed, scale, sampling_rate)
        frames = jnp.arange(a.shape[1])[None, :]
        real = (
            jnp.ones(a.shape[:2], jnp.float32)
            if lengths is None
            else (frames * scale.hop < lengths[:, None]).astype(jnp.float32)
        )
        distance = jnp.sum(jnp.abs(a - b) * real[..., None])
        total = total + distance / jnp.maximum(jnp.sum(real) * scale.bins, 1.0)
    return total
