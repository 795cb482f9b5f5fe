"""Tokenizer encoder: log-mel [batch, frames, mels] -> 25 Hz vectors [batch, codes, d_model].

conv(k, s=1) + GELU -> conv(k, s=stride) + GELU -> transformer (skip connection from the configured
layer) -> LayerNorm -> Conv(k=s=avg_pooler, no bias) + GELU -> LayerNorm, then the RVQ.

Every sequence of a padded batch is computed as if it were encoded alone: the first conv's output
past a sequence's end is zeroed before the strided conv (alone, that conv reads its zero padding),
and pooling of an odd-length sequence pairs its last frame with a zero frame.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.nn.conv import Conv1d
from mimo_jax.nn.layers import LayerNorm
from mimo_jax.tokenizer.config import TokenizerConfig
from mimo_jax.tokenizer.quantizer import ResidualVectorQuantizer
from mimo_jax.tokenizer.transformer import make_stack, run_stack, time_mask


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


class AudioEncoder(nnx.Module):
    def __init__(self, config: TokenizerConfig, *, dtype=None, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.dtype = dtype
        self.conv1 = Conv1d(c.n_mels, c.d_model, c.kernel_size, padding=1, dtype=dtype, rngs=rngs)
        self.conv2 = Conv1d(
            c.d_model,
            c.d_model,
            c.kernel_size,
            stride=c.stride_size,
            padding=1,
            dtype=dtype,
            rngs=rngs,
        )
        self.stack_config = c.encoder_stack()
        self.layers = make_stack(self.stack_config, dtype=dtype, rngs=rngs)
        self.remat_policy = "none"  # training sets it (MiMoAudioTokenizer.set_remat)
        self.attention = "auto"  # the kernel (MiMoAudioTokenizer.set_attention)
        self.layer_norm = LayerNorm(c.d_model, eps=c.ln_eps, rngs=rngs)
        if c.avg_pooler > 1:
            self.down_sample_layer: Conv1d | None = Conv1d(
                c.d_model,
                c.d_model,
                c.avg_pooler,
                stride=c.avg_pooler,
                use_bias=False,
                dtype=dtype,
                rngs=rngs,
            )
            self.down_sample_norm: LayerNorm | None = LayerNorm(c.d_model, eps=c.ln_eps, rngs=rngs)
        else:
            self.down_sample_layer = None
            self.down_sample_norm = None
        self.quantizer = ResidualVectorQuantizer(c.d_model, c.codebook_sizes, rngs=rngs)

    def lengths(self, mel_lengths: jax.Array):
        """(50 Hz lengths after the strided conv, 25 Hz code lengths)."""
        c = self.config
        conv1 = mel_lengths + 3 - c.kernel_size
        conv2 = (conv1 + 2 - c.kernel_size) // c.stride_size + 1
        return conv1, conv2, -(-conv2 // c.avg_pooler)

    def __call__(self, mel: jax.Array, mel_lengths: jax.Array, *, inv_freq_dtype=None):
        """mel [batch, frames, mels], lengths [batch] -> (hidden [batch, codes, d_model] zero past
        each length, code lengths [batch])."""
        c = self.config
        len1, len2, len3 = self.lengths(mel_lengths)
        x = jnp.where(time_mask(mel_lengths, mel.shape[1]), mel, 0.0)
        x = x.astype(self.dtype or mel.dtype)
        h = _gelu(self.conv1(x))
        h = jnp.where(time_mask(len1, h.shape[1]), h, 0.0)
        h = _gelu(self.conv2(h))
        h = self._transformer(h, len2, inv_freq_dtype)
        h = self.layer_norm(h)
        if self.down_sample_layer is not None and self.down_sample_norm is not None:  # both or none
            h = jnp.where(time_mask(len2, h.shape[1]), h, 0.0)
            extra = -h.shape[1] % c.avg_pooler
            h = jnp.pad(h, ((0, 0), (0, extra), (0, 0)))
            h = self.down_sample_norm(_gelu(self.down_sample_layer(h)))
        return jnp.where(time_mask(len3, h.shape[1]), h, 0.0), len3

    def _transformer(self, h, lengths, inv_freq_dtype):
        skip_at = self.config.encoder_skip_layer_id
        run = lambda x, start, stop: run_stack(
            self.layers,
            self.stack_config,
            x,
            lengths,
            inv_freq_dtype=inv_freq_dtype,
            start=start,
            stop=stop,
            remat_policy=self.remat_policy,
            attention=self.attention,
        )
        if not skip_at:
            return run(h, 0, None)
        skip = run(h, 0, skip_at)  # the output of layer index skip_at - 1
        rest = run(skip, skip_at, None) if skip_at < self.stack_config.layers else skip
        return rest + skip
