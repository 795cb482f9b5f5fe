"""The audio-to-text LM of tokenizer training (report §2.1.2, eq. 2): a small causal Qwen2 stack,
trained jointly from scratch, that reads the quantised audio and predicts the clip's transcript,
so that the codes keep what is said.

A row is [audio frames (projected to the LM's width)] [BOS, transcript tokens but the last]; the
logits at the BOS and token slots predict the transcript, token by token (next-token
cross-entropy). Padded audio frames and padded tokens are invisible to every query.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.nn.attention import MaskSpec
from mimo_jax.nn.layers import Dense, Embed
from mimo_jax.nn.stack import StackConfig
from mimo_jax.nn.transformer import Qwen2Stack


@dataclasses.dataclass(frozen=True)
class A2TConfig:
    vocab_size: int  # the transcripts' tokenizer; one more id is the LM's BOS
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 8
    ffn: int = 1536
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "ffn"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"a2t.{name}={value!r}: expected an integer >= 1")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"a2t: hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads}: "
                f"expected heads dividing hidden and kv_heads dividing heads"
            )

    def stack(self) -> StackConfig:
        return StackConfig(
            hidden=self.hidden,
            layers=self.layers,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.hidden // self.heads,
            ffn=self.ffn,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
        )


class AudioToTextLM(nnx.Module):
    def __init__(
        self,
        config: A2TConfig,
        audio_dim: int,
        *,
        dtype=jnp.float32,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        """`attention`: the kernel of its stack (`nn.attention`: auto, xla, splash, cudnn)."""
        self.config = config
        self.audio_proj = Dense(audio_dim, config.hidden, axes=(None, "embed"), rngs=rngs)
        self.bos = Embed(1, config.hidden, axes=(None, "embed"), rngs=rngs)
        self.stack = Qwen2Stack(
            dataclasses.replace(config.stack(), attention=attention),
            vocab_size=config.vocab_size,
            dtype=dtype,
            rngs=rngs,
        )
        self.lm_head = Dense(config.hidden, config.vocab_size, axes=("embed", "vocab"), rngs=rngs)

    def __call__(
        self,
        audio: jax.Array,
        audio_lengths: jax.Array,
        text: jax.Array,
        text_lengths: jax.Array,
    ) -> jax.Array:
        """audio [batch, frames, audio_dim], text [batch, tokens] int -> logits [batch, tokens,
        vocab]: those at slot j predict text[:, j]."""
        batch, frames = audio.shape[:2]
        tokens = text.shape[1]
        embed = self.stack.embed_tokens
        assert embed is not None
        bos = self.bos(jnp.zeros((batch, 1), jnp.int32))
        x = jnp.concatenate([self.audio_proj(audio), bos, embed(text[:, :-1])], axis=1)
        positions = jnp.broadcast_to(jnp.arange(frames + tokens), (batch, frames + tokens))
        visible = jnp.concatenate(
            [
                jnp.arange(frames)[None] < audio_lengths[:, None],
                jnp.arange(tokens)[None] < jnp.maximum(text_lengths[:, None], 1),
            ],
            axis=1,
        ).astype(jnp.int32)
        # Every query one segment, padded keys another: given by its parts, the mask runs on any
        # attention kernel (splash takes query and key segments apart).
        mask = MaskSpec(positions, positions, jnp.ones_like(visible), visible, causal=True)
        h, _ = self.stack(x.astype(jnp.float32), positions, mask)
        return self.lm_head(h[:, frames:])

    def loss(
        self,
        audio: jax.Array,
        audio_lengths: jax.Array,
        text: jax.Array,
        text_lengths: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """(mean next-token cross-entropy over the real transcript tokens, their count)."""
        logits = self(audio, audio_lengths, text, text_lengths).astype(jnp.float32)
        real = (jnp.arange(text.shape[1])[None] < text_lengths[:, None]).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), text[..., None], axis=-1)[..., 0]
        count = jnp.sum(real)
        return jnp.sum(nll * real) / jnp.maximum(count, 1.0), count
