"""The discriminators of the tokenizer's stage-2 (adversarial) training: HiFi-GAN's multi-period
discriminator (MPD) and EnCodec's multi-scale STFT discriminator (MS-STFTD), every layer spectrally
normalised (`spectral_norm.py`).

Input: waveforms [batch, samples] at 24 kHz. Output: one `DiscriminatorOutput` (logits
[batch, n] and every layer's feature map) per sub-discriminator, the MPD's periods first, then the
STFT scales. In training mode every call takes one power-iteration step per layer (as a PyTorch
forward does), so a training step should call them once, on real and generated audio concatenated
along the batch (`gan_losses.split_real_fake` splits the outputs again).

Feature maps follow each original: HiFi-GAN's include the output conv's logits, EnCodec's stop at
the last activation. EnCodec leaves its first STFT conv without normalisation; here it is
normalised like every other layer.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.tokenizer.frontend import periodic_hann
from mimo_jax.tokenizer.spectral_norm import SNConv


class DiscriminatorOutput(NamedTuple):
    logits: jax.Array  # [batch, n]
    features: tuple[jax.Array, ...]  # each layer's output [batch, height, width, channels]


def _positive(name: str, values: tuple[int, ...]) -> None:
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{name}={values}: expected one or more integers >= 1")


def _odd(name: str, values: tuple[int, ...]) -> None:
    # An odd kernel with padding (k - 1) // 2 * dilation keeps ceil(length / stride) >= 1 frames.
    if any(v % 2 == 0 for v in values):
        raise ValueError(f"{name}={values}: expected odd kernel sizes (padded to keep length)")


@dataclasses.dataclass(frozen=True)
class MPDConfig:
    """HiFi-GAN's MPD: per period, convs with kernel (kernel_size, 1), the given strides and
    channels, padding (kernel_size - 1) // 2, then a (post_kernel_size, 1) conv to one channel."""

    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)
    strides: tuple[int, ...] = (3, 3, 3, 3, 1)
    kernel_size: int = 5
    post_kernel_size: int = 3
    negative_slope: float = 0.1

    def __post_init__(self):
        _positive("periods", self.periods)
        _positive("channels", self.channels)
        _positive("strides", self.strides)
        _positive("kernel sizes", (self.kernel_size, self.post_kernel_size))
        _odd("MPD kernel sizes", (self.kernel_size, self.post_kernel_size))
        if len(self.strides) != len(self.channels):
            raise ValueError(
                f"MPD strides {self.strides} and channels {self.channels}: expected one stride "
                "per conv"
            )


@dataclasses.dataclass(frozen=True)
class STFTDConfig:
    """EnCodec's MS-STFTD: per scale, an uncentred STFT with a periodic Hann window (zero-padded
    to n_fft), real and imaginary parts as two channels over [frames, bins]; a conv with
    `kernel_size` (time, frequency), one strided conv per dilation (dilated in time), a
    (k, k) conv and a (k, k) output conv, k = kernel_size[0]; channels filters * filters_scale**i
    capped at max_filters; `normalized` divides the STFT by the window's L2 norm."""

    n_ffts: tuple[int, ...] = (1024, 2048, 512)
    hop_lengths: tuple[int, ...] = (256, 512, 128)
    win_lengths: tuple[int, ...] = (1024, 2048, 512)
    filters: int = 32
    max_filters: int = 1024
    filters_scale: int = 1
    kernel_size: tuple[int, int] = (3, 9)
    stride: tuple[int, int] = (1, 2)
    dilations: tuple[int, ...] = (1, 2, 4)
    normalized: bool = True
    negative_slope: float = 0.2

    def __post_init__(self):
        for name in ("n_ffts", "hop_lengths", "win_lengths", "kernel_size", "stride", "dilations"):
            _positive(name, getattr(self, name))
        _positive("filters", (self.filters, self.max_filters, self.filters_scale))
        _odd("STFT kernel_size", self.kernel_size)
        if not len(self.n_ffts) == len(self.hop_lengths) == len(self.win_lengths):
            raise ValueError(
                f"STFT scales: n_ffts {self.n_ffts}, hop_lengths {self.hop_lengths} and "
                f"win_lengths {self.win_lengths}: expected the same number of each"
            )
        for n_fft, win in zip(self.n_ffts, self.win_lengths):
            if win > n_fft:
                raise ValueError(f"STFT win_length {win} > n_fft {n_fft}: expected <= n_fft")

    def channels(self) -> tuple[int, ...]:
        """Output channels of the convs before the output conv."""
        count = len(self.dilations) + 2
        return tuple(
            min(self.filters * self.filters_scale**i, self.max_filters) for i in range(count)
        )


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    mpd: MPDConfig = dataclasses.field(default_factory=MPDConfig)
    stft: STFTDConfig = dataclasses.field(default_factory=STFTDConfig)


def check_fits(config: DiscriminatorConfig, crop_samples: int) -> None:
    """Raises one ValueError line when training crops of `crop_samples` do not fit the config.

    The STFT is not centred, so a crop must hold the largest n_fft; the MPD reflects at most
    period - 1 samples at the end, which needs a crop of at least the largest period. Every conv
    after that keeps at least one frame (odd kernels, padded)."""
    largest_fft = max(config.stft.n_ffts)
    if crop_samples < largest_fft:
        raise ValueError(
            f"training crops of {crop_samples} samples are shorter than the STFT "
            f"discriminator's largest n_fft {largest_fft}: expected crops of at least "
            f"{largest_fft} samples, or smaller n_ffts"
        )
    largest_period = max(config.mpd.periods)
    if crop_samples < largest_period:
        raise ValueError(
            f"training crops of {crop_samples} samples are shorter than the period "
            f"discriminator's largest period {largest_period}: expected crops of at least "
            f"{largest_period} samples"
        )


def period_view(wav: jax.Array, period: int) -> jax.Array:
    """[batch, T] reflect-padded at the end to a multiple of the period, viewed as
    [batch, ceil(T / period), period, 1]: sample t at row t // period, column t % period."""
    pad = -wav.shape[1] % period
    x = jnp.pad(wav, ((0, 0), (0, pad)), mode="reflect")
    return x.reshape(wav.shape[0], -1, period, 1)


class PeriodDiscriminator(nnx.Module):
    """One period of the MPD: 2-D convs along the rows of the period view."""

    def __init__(self, period: int, config: MPDConfig, *, dtype=None, rngs: nnx.Rngs):
        sizes = (1, *config.channels)
        k, post = config.kernel_size, config.post_kernel_size
        conv = functools.partial(SNConv, dtype=dtype, rngs=rngs)
        self.convs = nnx.List(
            [
                conv(cin, cout, (k, 1), stride=(s, 1), padding=((k - 1) // 2, 0))
                for cin, cout, s in zip(sizes[:-1], sizes[1:], config.strides)
            ]
        )
        self.post = conv(sizes[-1], 1, (post, 1), padding=((post - 1) // 2, 0))
        self.period = period
        self.negative_slope = config.negative_slope

    def __call__(self, wav: jax.Array) -> DiscriminatorOutput:
        x = period_view(wav, self.period)
        features = []
        for conv in self.convs:
            x = jax.nn.leaky_relu(conv(x), self.negative_slope)
            features.append(x)
        x = self.post(x)
        features.append(x)
        return DiscriminatorOutput(x.reshape(x.shape[0], -1), tuple(features))


class MultiPeriodDiscriminator(nnx.Module):
    def __init__(self, config: MPDConfig, *, dtype=None, rngs: nnx.Rngs):
        self.discriminators = nnx.List(
            [PeriodDiscriminator(p, config, dtype=dtype, rngs=rngs) for p in config.periods]
        )

    def __call__(self, wav: jax.Array) -> list[DiscriminatorOutput]:
        return [d(wav) for d in self.discriminators]


def stft_window(n_fft: int, win_length: int) -> jax.Array:
    """A periodic Hann window of win_length, centred in n_fft zeros (torch.stft's placement)."""
    left = (n_fft - win_length) // 2
    return jnp.pad(jnp.asarray(periodic_hann(win_length)), (left, n_fft - win_length - left))


def stft(wav: jax.Array, n_fft: int, hop: int, window: jax.Array, normalized: bool) -> jax.Array:
    """torchaudio Spectrogram(center=False, power=None): wav [batch, samples] (>= n_fft) ->
    complex64 [batch, 1 + (samples - n_fft) // hop, n_fft // 2 + 1]; `normalized` divides by the
    window's L2 norm."""
    frames = 1 + (wav.shape[1] - n_fft) // hop
    index = jnp.arange(frames)[:, None] * hop + jnp.arange(n_fft)[None, :]
    spec = jnp.fft.rfft(wav.astype(jnp.float32)[:, index] * window, axis=-1)
    return spec / jnp.sqrt(jnp.sum(jnp.square(window))) if normalized else spec


class STFTDiscriminator(nnx.Module):
    """One scale of the MS-STFTD over [batch, frames, bins, 2 (real, imaginary)]."""

    def __init__(self, scale: int, config: STFTDConfig, *, dtype=None, rngs: nnx.Rngs):
        (kt, kf), k = config.kernel_size, config.kernel_size[0]
        channels = config.channels()
        conv = functools.partial(SNConv, dtype=dtype, rngs=rngs)
        same = lambda size, dilation=1: ((size - 1) * dilation) // 2
        convs = [conv(2, channels[0], (kt, kf), padding=(same(kt), same(kf)))]
        for cin, cout, d in zip(channels, channels[1:], config.dilations):
            convs.append(
                conv(
                    cin,
                    cout,
                    (kt, kf),
                    stride=config.stride,
                    dilation=(d, 1),
                    padding=(same(kt, d), same(kf)),
                )
            )
        convs.append(conv(channels[-2], channels[-1], (k, k), padding=same(k)))
        self.convs = nnx.List(convs)
        self.post = conv(channels[-1], 1, (k, k), padding=same(k))
        self.n_fft = config.n_ffts[scale]
        self.hop = config.hop_lengths[scale]
        self.win_length = config.win_lengths[scale]
        self.normalized = config.normalized
        self.negative_slope = config.negative_slope

    def __call__(self, wav: jax.Array) -> DiscriminatorOutput:
        window = stft_window(self.n_fft, self.win_length)
        spec = stft(wav, self.n_fft, self.hop, window, self.normalized)
        x = jnp.stack([spec.real, spec.imag], axis=-1)
        features = []
        for conv in self.convs:
            x = jax.nn.leaky_relu(conv(x), self.negative_slope)
            features.append(x)
        x = self.post(x)
        return DiscriminatorOutput(x.reshape(x.shape[0], -1), tuple(features))


class MultiScaleSTFTDiscriminator(nnx.Module):
    def __init__(self, config: STFTDConfig, *, dtype=None, rngs: nnx.Rngs):
        self.discriminators = nnx.List(
            [
                STFTDiscriminator(i, config, dtype=dtype, rngs=rngs)
                for i in range(len(config.n_ffts))
            ]
        )

    def __call__(self, wav: jax.Array) -> list[DiscriminatorOutput]:
        return [d(wav) for d in self.discriminators]


class Discriminators(nnx.Module):
    """The MPD and the MS-STFTD together: [batch, samples] -> one output per sub-discriminator
    (len(periods) + len(n_ffts) of them)."""

    def __init__(self, config: DiscriminatorConfig, *, dtype=None, rngs: nnx.Rngs):
        self.config = config
        self.mpd = MultiPeriodDiscriminator(config.mpd, dtype=dtype, rngs=rngs)
        self.stft = MultiScaleSTFTDiscriminator(config.stft, dtype=dtype, rngs=rngs)

    def __call__(self, wav: jax.Array) -> list[DiscriminatorOutput]:
        if wav.ndim != 2:
            raise ValueError(f"waveforms of shape {wav.shape}: expected [batch, samples]")
        check_fits(self.config, wav.shape[1])
        return self.mpd(wav) + self.stft(wav)
