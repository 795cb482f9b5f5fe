"""Tokenizer decoder: dequantized vectors [batch, codes, d_model] -> waveform.

ConvTranspose(k=s=avg_pooler) + GroupNorm -> causal transformer -> LayerNorm ->
ConvTranspose(decoder_kernel_size, decoder_stride_size) + GroupNorm, last k - s steps dropped ->
coarse mel [batch, 4 * codes, n_mels] -> vocoder.

GroupNorm statistics cover each sequence's own un-trimmed output only, so a sequence decodes the
same in any padded batch as alone (the official code, decoding one sequence, sees no padding).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.nn.conv import ConvTranspose1d
from mimo_jax.nn.layers import LayerNorm
from mimo_jax.nn.params import ones, param, zeros
from mimo_jax.tokenizer.config import TokenizerConfig
from mimo_jax.tokenizer.transformer import make_stack, run_stack, time_mask
from mimo_jax.tokenizer.vocoder import TransformerVocos


class GroupNorm1(nnx.Module):
    """torch.nn.GroupNorm(1, channels): one mean and variance per sequence over all channels and
    the valid time steps; statistics in float32."""

    def __init__(self, channels: int, *, eps: float = 1e-5, rngs: nnx.Rngs):
        self.scale = param(rngs, ones, (channels,), ("conv_out",))
        self.bias = param(rngs, zeros, (channels,), ("conv_out",))
        self.eps = eps

    def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        valid = time_mask(lengths, x.shape[1])
        count = jnp.maximum(lengths * x.shape[2], 1).astype(jnp.float32)[:, None, None]
        mean = jnp.sum(jnp.where(valid, x32, 0.0), axis=(1, 2), keepdims=True) / count
        centred = jnp.where(valid, x32 - mean, 0.0)
        var = jnp.sum(jnp.square(centred), axis=(1, 2), keepdims=True) / count
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class CausalConvTranspose1d(nnx.Module):
    """ConvTranspose1d + GroupNorm(1) over the un-trimmed output, then the last max(0, k - s)
    steps dropped: L frames -> L * s frames."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        stride: int,
        *,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.conv = ConvTranspose1d(
            in_features, out_features, kernel_size, stride=stride, dtype=dtype, rngs=rngs
        )
        self.norm = GroupNorm1(out_features, rngs=rngs)
        self.kernel_size = kernel_size
        self.stride = stride

    def __call__(self, x: jax.Array, lengths: jax.Array):
        x = jnp.where(time_mask(lengths, x.shape[1]), x, 0.0)
        y = self.norm(self.conv(x), (lengths - 1) * self.stride + self.kernel_size)
        out_lengths = lengths * self.stride
        y = y[:, : x.shape[1] * self.stride]
        return jnp.where(time_mask(out_lengths, y.shape[1]), y, 0.0), out_lengths


class AudioDecoder(nnx.Module):
    def __init__(self, config: TokenizerConfig, *, dtype=None, rngs: nnx.Rngs):
        c = config
        self.dtype = dtype
        self.dconv1 = CausalConvTranspose1d(
            c.d_model, c.d_model, c.avg_pooler, c.avg_pooler, dtype=dtype, rngs=rngs
        )
        self.stack_config = c.decoder_stack()
        self.layers = make_stack(self.stack_config, dtype=dtype, rngs=rngs)
        self.remat_policy = "none"  # training sets it (MiMoAudioTokenizer.set_remat)
        self.attention = "auto"  # the kernel (MiMoAudioTokenizer.set_attention)
        self.layer_norm = LayerNorm(c.d_model, eps=c.ln_eps, rngs=rngs)
        self.dconv2 = CausalConvTranspose1d(
            c.d_model,
            c.n_mels,
            c.decoder_kernel_size,
            c.decoder_stride_size,
            dtype=dtype,
            rngs=rngs,
        )
        self.vocoder = TransformerVocos(c, dtype=dtype, rngs=rngs)

    def coarse_mel(self, x: jax.Array, lengths: jax.Array, *, inv_freq_dtype=None):
        """x [batch, codes, d_model] -> (coarse mel [batch, frames, n_mels], frame lengths)."""
        x = x.astype(self.dtype or jnp.float32)
        h, lengths = self.dconv1(x, lengths)
        h = run_stack(
            self.layers,
            self.stack_config,
            h,
            lengths,
            inv_freq_dtype=inv_freq_dtype,
            remat_policy=self.remat_policy,
            attention=self.attention,
        )
        return self.dconv2(self.layer_norm(h), lengths)

    def __call__(self, x: jax.Array, lengths: jax.Array, *, inv_freq_dtype=None):
        """x [batch, codes, d_model], lengths [batch] -> (waveform [batch, samples] float32,
        sample lengths)."""
        mel, mel_lengths = self.coarse_mel(x, lengths, inv_freq_dtype=inv_freq_dtype)
        wav = self.vocoder(mel, mel_lengths, inv_freq_dtype=inv_freq_dtype)
        return wav, mel_lengths * self.vocoder.head.istft.hop
