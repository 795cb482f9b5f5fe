"""Transformer vocoder (Vocos-style) and its ISTFT head: coarse mel [batch, frames, mels] ->
waveform.

Linear embedding -> transformer with a sliding attention window -> LayerNorm -> Linear to
nfft + 2 channels (log-magnitude and phase of nfft // 2 + 1 bins) -> ISTFT with "same" padding:
irfft of each frame times the window, overlap-add with the hop, (nfft - hop) / 2 samples dropped at
each end, division by the overlap-added squared window. A sequence of T frames gives T * hop
samples.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.nn.layers import Dense, LayerNorm
from mimo_jax.tokenizer.config import TokenizerConfig
from mimo_jax.tokenizer.frontend import periodic_hann
from mimo_jax.tokenizer.transformer import make_stack, run_stack, time_mask


class Buffer(nnx.Param):
    """A constant stored in checkpoints (the ISTFT window): converted like a parameter, never
    trained (an optimizer filters it out by its type)."""


def overlap_add(frames: jax.Array, hop: int) -> jax.Array:
    """frames [batch, T, n] -> [batch, (T - 1) * hop + n]: frame t added at offset t * hop."""
    batch, count, n = frames.shape
    parts = -(-n // hop)
    chunks = jnp.pad(frames, ((0, 0), (0, 0), (0, parts * hop - n)))
    chunks = chunks.reshape(batch, count, parts, hop)
    out = jnp.zeros((batch, count + parts - 1, hop), frames.dtype)
    for r in range(parts):
        out = out.at[:, r : r + count].add(chunks[:, :, r])
    return out.reshape(batch, -1)[:, : (count - 1) * hop + n]


def istft_same(spec: jax.Array, lengths: jax.Array, window: jax.Array, hop: int) -> jax.Array:
    """spec [batch, T, bins] complex, lengths [batch] in frames -> waveform [batch, T * hop]
    float32, zero past each sequence's lengths * hop samples (frames past a length do not
    contribute)."""
    n = window.shape[0]
    valid = time_mask(lengths, spec.shape[1])
    window = window.astype(jnp.float32)
    frames = jnp.fft.irfft(spec, n=n, axis=-1) * window
    frames = jnp.where(valid, frames, 0.0)
    envelope = jnp.where(valid, jnp.square(window), 0.0)
    pad = (n - hop) // 2
    total = spec.shape[1] * hop
    audio = overlap_add(frames, hop)[:, pad : pad + total]
    envelope = overlap_add(envelope, hop)[:, pad : pad + total]
    inside = jnp.arange(total)[None, :] < (lengths * hop)[:, None]
    return jnp.where(inside, audio / jnp.where(inside, envelope, 1.0), 0.0)


class ISTFT(nnx.Module):
    def __init__(self, n_fft: int, hop: int):
        self.window = Buffer(
            jnp.asarray(periodic_hann(n_fft)), out_sharding=(None,), eager_sharding=False
        )
        self.hop = hop

    def __call__(self, spec, lengths):
        return istft_same(spec, lengths, self.window[...], self.hop)


class ISTFTHead(nnx.Module):
    def __init__(self, dim: int, n_fft: int, hop: int, *, dtype, rngs: nnx.Rngs):
        self.out = Dense(
            dim, n_fft + 2, axes=("embed", "stft_bins"), use_bias=True, dtype=dtype, rngs=rngs
        )
        self.istft = ISTFT(n_fft, hop)

    def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
        z = self.out(x)
        bins = z.shape[-1] // 2
        # exp, cos and sin in the activation dtype, their products in float32 (complex64).
        magnitude = jnp.minimum(jnp.exp(z[..., :bins]), 100.0).astype(jnp.float32)
        phase = z[..., bins:]
        real = magnitude * jnp.cos(phase).astype(jnp.float32)
        imag = magnitude * jnp.sin(phase).astype(jnp.float32)
        return self.istft(jax.lax.complex(real, imag), lengths)


class TransformerVocos(nnx.Module):
    def __init__(self, config: TokenizerConfig, *, dtype=None, rngs: nnx.Rngs):
        c = config
        self.dtype = dtype
        self.embeddings = Dense(
            c.n_mels,
            c.vocoder_dim,
            axes=("conv_in", "embed"),
            use_bias=False,
            dtype=dtype,
            rngs=rngs,
        )
        self.stack_config = c.vocoder_stack()
        self.layers = make_stack(self.stack_config, dtype=dtype, rngs=rngs)
        self.remat_policy = "none"  # training sets it (MiMoAudioTokenizer.set_remat)
        self.attention = "auto"  # the kernel (MiMoAudioTokenizer.set_attention)
        self.layer_norm = LayerNorm(c.vocoder_dim, eps=c.ln_eps, rngs=rngs)
        self.head = ISTFTHead(c.vocoder_dim, c.nfft, c.hop_length, dtype=dtype, rngs=rngs)

    def __call__(self, mel: jax.Array, lengths: jax.Array, *, inv_freq_dtype=None) -> jax.Array:
        """mel [batch, frames, mels], lengths [batch] -> waveform [batch, frames * hop] float32."""
        x = self.embeddings(mel.astype(self.dtype or mel.dtype))
        x = run_stack(
            self.layers,
            self.stack_config,
            x,
            lengths,
            inv_freq_dtype=inv_freq_dtype,
            remat_policy=self.remat_policy,
            attention=self.attention,
        )
        return self.head(self.layer_norm(x), lengths)
