"""MiMoAudioTokenizer: 24 kHz waveform <-> 25 Hz frames of RVQ codes, over padded batches.

All methods take padded arrays with per-sequence lengths and give every sequence exactly the
result it would get alone. `encode_mel` treats each row as one segment (the official encoder
splits long audio into segments of 6000 mel frames; `audio_tokenizer.Tokenizer` does that
splitting).

`dtype` is the compute dtype of convolutions, linears and attention (None: float32); parameters
stay float32, the front end, the RVQ and the ISTFT always run in float32.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.nn import remat
from mimo_jax.nn.attention import check_implementation
from mimo_jax.tokenizer.config import TokenizerConfig
from mimo_jax.tokenizer.decoder import AudioDecoder
from mimo_jax.tokenizer.encoder import AudioEncoder
from mimo_jax.tokenizer.frontend import log_mel, mel_lengths


class MiMoAudioTokenizer(nnx.Module):
    def __init__(
        self,
        config: TokenizerConfig,
        *,
        dtype=None,
        reference_bf16_rope: bool = False,
        rngs: nnx.Rngs,
    ):
        """`reference_bf16_rope`: round RoPE inverse frequencies to bfloat16 as the official
        pipeline does after `.bfloat16()` (only for bfloat16 parity with it)."""
        self.config = config
        self.dtype = dtype
        self.inv_freq_dtype = jnp.bfloat16 if reference_bf16_rope else None
        self.encoder = AudioEncoder(config, dtype=dtype, rngs=rngs)
        self.decoder = AudioDecoder(config, dtype=dtype, rngs=rngs)

    def set_remat(self, policy: str) -> None:
        """Rematerialise the encoder's, decoder's and vocoder's layers in training's backward
        pass by `policy` (`mimo_jax.nn.remat`; "none": keep every activation)."""
        remat.policy(policy)  # names a bad policy
        for stack in (self.encoder, self.decoder, self.decoder.vocoder):
            stack.remat_policy = policy

    def set_attention(self, implementation: str) -> None:
        """Run the encoder's, decoder's and vocoder's attention on the kernel `implementation`
        names (`mimo_jax.nn.attention`: auto, xla, splash, cudnn)."""
        check_implementation(implementation)
        for stack in (self.encoder, self.decoder, self.decoder.vocoder):
            stack.attention = implementation

    def mel(self, wav: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """wav [batch, samples] float32 24 kHz, lengths [batch] -> (log-mel [batch, frames, mels],
        frame lengths)."""
        return log_mel(self.config, wav, lengths), mel_lengths(self.config, lengths)

    def encode_hidden(self, mel: jax.Array, lengths: jax.Array):
        """Encoder output before quantisation: ([batch, codes, d_model] zero past each length,
        code lengths)."""
        return self.encoder(mel, lengths, inv_freq_dtype=self.inv_freq_dtype)

    def encode_mel(self, mel: jax.Array, lengths: jax.Array, num_codebooks: int | None = None):
        """log-mel segments [batch, frames, mels] -> (codes [batch, codes, n] int32, code lengths);
        codes past a length are 0."""
        hidden, code_lengths = self.encode_hidden(mel, lengths)
        codes = self.encoder.quantizer.encode(hidden, num_codebooks)
        valid = jnp.arange(codes.shape[1])[None, :, None] < code_lengths[:, None, None]
        return jnp.where(valid, codes, 0), code_lengths

    def encode(self, wav: jax.Array, lengths: jax.Array, num_codebooks: int | None = None):
        """wav [batch, samples] (each at most one segment long) -> (codes, code lengths)."""
        return self.encode_mel(*self.mel(wav, lengths), num_codebooks)

    def dequantize(self, codes: jax.Array) -> jax.Array:
        """codes [batch, codes, n] -> the sum of their codebook entries [batch, codes, d_model]."""
        return self.encoder.quantizer.decode(codes)

    def decode_hidden(self, hidden: jax.Array, lengths: jax.Array):
        """Dequantized vectors [batch, codes, d_model] -> (waveform [batch, samples] float32,
        sample lengths)."""
        return self.decoder(hidden, lengths, inv_freq_dtype=self.inv_freq_dtype)

    def decode(self, codes: jax.Array, lengths: jax.Array):
        """codes [batch, codes, n] (n <= num_quantizers, first codebooks first), lengths [batch]
        -> (waveform [batch, codes * samples_per_code] float32, sample lengths)."""
        return self.decode_hidden(self.dequantize(codes), lengths)
