"""MiMoAudioForCausalLM in Flax NNX.

Parameter names mirror the official state dict (`model`, `lm_head`, `input_local_transformer`,
`local_transformer`, `local_transformer_lm_heads`, `speech_embeddings`, ...), so conversion is
mechanical. Shapes: B batch, G groups (LLM positions), gs = group_size frames per patch,
C = audio channels (codebooks), N patches.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.nn.attention import MaskSpec, attention_mask
from mimo_jax.nn.layers import Dense, Embed
from mimo_jax.nn.stack import unstack
from mimo_jax.nn.transformer import KVCache, Qwen2Stack


def delay_schedule(delay_pattern, group_size: int) -> np.ndarray:
    """active[t, c]: channel c emits frame t - delay[c] at patch-decoder step t."""
    steps = group_size + max(delay_pattern)
    t = np.arange(steps)[:, None]
    d = np.asarray(delay_pattern)[None, :]
    return (t >= d) & (t < d + group_size)


class MiMoAudioLM(nnx.Module):
    def __init__(
        self, config: MiMoAudioConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        c = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        stack_kw = dict(remat_policy=c.remat_policy, **kw)
        enc, dec = c.patch_encoder_stack(), c.patch_decoder_stack()
        self.model = Qwen2Stack(c.backbone_stack(), vocab_size=c.vocab_size, **stack_kw)
        self.lm_head = Dense(c.hidden_size, c.vocab_size, axes=("embed", "vocab"), **kw)
        self.input_local_transformer = Qwen2Stack(enc, **stack_kw)
        self.local_transformer = Qwen2Stack(dec, **stack_kw)
        self.speech_embeddings = nnx.List(
            [Embed(v, enc.hidden, axes=("vocab", "embed"), **kw) for v in c.speech_vocab_sizes]
        )
        self.local_transformer_lm_heads = nnx.List(
            [Dense(dec.hidden, v, axes=("embed", "vocab"), **kw) for v in c.speech_vocab_sizes]
        )
        self.speech_embeddings_to_local = (
            Dense(enc.hidden, dec.hidden, axes=("embed", "embed_local"), **kw)
            if enc.hidden != dec.hidden
            else None
        )
        self.speech_group_downcast = Dense(
            c.group_size * enc.hidden, c.hidden_size, axes=("embed_local", "embed"), **kw
        )
        self.hidden_states_downcast = Dense(
            c.hidden_size, dec.hidden, axes=("embed", "embed_local"), **kw
        )
        self.config = c
        self.dtype = dtype

    # Patch encoder and input embeddings -----------------------------------------------------
    def _empty_ids(self):
        return jnp.asarray(self.config.speech_empty_ids, jnp.int32)

    def embed_speech(self, codes: jax.Array) -> jax.Array:
        """Sum of the channels' embeddings, empty ids contributing zero. [..., C] -> [..., D_in]

        Accumulated in bfloat16 channel by channel, whatever the model dtype: the official code
        allocates this sum as bf16, and its rounding is part of the reference numerics.
        """
        total = jnp.zeros(
            codes.shape[:-1] + (self.speech_embeddings[0].embedding.shape[1],), jnp.bfloat16
        )
        for ch, table in enumerate(self.speech_embeddings):
            ids = codes[..., ch]
            e = jnp.where((ids == self.config.speech_empty_ids[ch])[..., None], 0.0, table(ids))
            total = (total + e).astype(jnp.bfloat16)
        return total

    def encode_patches(self, text: jax.Array, codes: jax.Array, dropout_rng=None) -> jax.Array:
        """The patch encoder: codes [B, G, gs, C] -> [B, G, hidden]; zero for text groups."""
        b, g, gs, _ = codes.shape
        is_speech = (text == self.config.empty_idx)[..., None, None]
        frames = (self.embed_speech(codes) * is_speech).reshape(b * g, gs, -1)
        pos = jnp.arange(gs)[None, :]
        mask = attention_mask(pos, pos, causal=self.input_local_transformer.cfg.causal)
        frames, _ = self.input_local_transformer(frames, pos, mask, dropout_rng=dropout_rng)
        frames = frames.reshape(b, g, gs, -1) * is_speech
        return self.speech_group_downcast(frames.reshape(b, g, -1))

    def embed_inputs(self, text: jax.Array, codes: jax.Array, dropout_rng=None) -> jax.Array:
        """Text embedding (zero for `<|empty|>`) plus the patch encoder's output.
        -> [B, G, hidden]"""
        embed_tokens = self.model.embed_tokens
        assert embed_tokens is not None  # the backbone is built with a vocabulary
        text_vec = embed_tokens(text).astype(self.dtype)
        text_vec = jnp.where((text == self.config.empty_idx)[..., None], 0.0, text_vec)
        return text_vec + self.encode_patches(text, codes, dropout_rng)

    # Backbone ----------------------------------------------------------------------------------
    def backbone(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Causal backbone over whole rows; packed rows keep documents apart by segment id.
        `dropout_rng` (training): the key of the adapters' dropout (the backbone has no other)."""
        mask = MaskSpec(positions, positions, segment_ids, segment_ids, causal=True)
        hidden, _ = self.model(embeds, positions, mask, dropout_rng=dropout_rng)
        return hidden

    def backbone_cached(
        self,
        embeds,
        positions,
        segments,
        cache: KVCache,
        cache_positions,
        cache_segments,
        cache_index,
    ) -> tuple[jax.Array, KVCache]:
        """Backbone over new groups against a KV cache whose slots carry positions and segments
        (after this call's groups have been written to them). A prefill (`cache_index` the int 0,
        later slots empty) may run on the accelerated kernels (`nn.attention`)."""
        mask: jax.Array | MaskSpec
        if isinstance(cache_index, int) and cache_index == 0:
            mask = MaskSpec(positions, cache_positions, segments, cache_segments, causal=True)
        else:
            mask = attention_mask(positions, cache_positions, segments, cache_segments, causal=True)
        hidden, new_cache = self.model(embeds, positions, mask, cache, cache_index)
        assert new_cache is not None  # given a cache, the stack returns it updated
        return hidden, new_cache

    def __call__(
        self,
        text: jax.Array,
        codes: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Hidden states [B, G, hidden] (after the final norm) of whole rows."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(text.shape[1]), text.shape)
        return self.backbone(self.embed_inputs(text, codes), positions, segment_ids)

    def text_logits(self, hidden: jax.Array) -> jax.Array:
        return self.lm_head(hidden)

    def local_hidden(self, hidden: jax.Array) -> jax.Array:
        return self.hidden_states_downcast(hidden)

    # Patch decoder -----------------------------------------------------------------------------
    def _to_local(self, e: jax.Array) -> jax.Array:
        return (
            self.speech_embeddings_to_local(e) if self.speech_embeddings_to_local is not None else e
        )

    def patch_logits(
        self, local_hidden: jax.Array, target_codes: jax.Array, dropout_rng=None
    ) -> list[jax.Array]:
        """Teacher-forced patch decoder over all group_size + max(delay) steps in one causal pass.

        local_hidden [N, D_local] seeds step 0; step p > 0 is fed the sum of the embeddings of the
        codes emitted at step p - 1. Returns, per channel c, logits [N, gs, vocab_c] for frames
        0..gs-1 (read at steps delay[c] .. delay[c] + gs - 1).
        """
        c = self.config
        n, gs, channels = target_codes.shape
        steps = c.patch_steps
        fed = jnp.zeros((n, steps, self.speech_embeddings[0].embedding.shape[1]), self.dtype)
        for ch, table in enumerate(self.speech_embeddings):
            d = c.delay_pattern[ch]
            fed = fed.at[:, d : d + gs].add(table(target_codes[:, :, ch]).astype(self.dtype))
        seq = jnp.concatenate(
            [local_hidden[:, None].astype(self.dtype), self._to_local(fed[:, : steps - 1])], axis=1
        )
        pos = jnp.arange(steps)[None, :]
        out, _ = self.local_transformer(
            seq, pos, attention_mask(pos, pos, causal=True), dropout_rng=dropout_rng
        )
        return [
            head(out[:, d : d + gs])
            for d, head in zip(c.delay_pattern, self.local_transformer_lm_heads)
        ]

    def decode_patch(
        self, local_hidden: jax.Array, sample_fn, rng: jax.Array, return_logits: bool = False
    ):
        """Autoregressive patch decoding with a KV cache. local_hidden [N, D_local] -> codes
        [N, gs, C]. `sample_fn(logits [N, V], forbidden_id, rng) -> ids [N]` picks each code.
        With `return_logits`, also the logits each code was picked from, per channel
        [N, gs, vocab_c] (as `patch_logits` returns them).

        The delay schedule is static, so the steps are unrolled and a channel's head and sampler
        run only at the group_size steps where it emits a frame (not at all C x steps). The key is
        still split once per (step, channel) pair in order, so the draws equal those of a loop
        that samples every pair."""
        c = self.config
        n = local_hidden.shape[0]
        steps, gs = c.patch_steps, c.group_size
        active = delay_schedule(c.delay_pattern, gs)
        cache: KVCache | None = self.local_transformer.init_cache(n, steps)
        key_pos = jnp.broadcast_to(jnp.arange(steps), (n, steps))
        heads = list(zip(self.local_transformer_lm_heads, self.speech_embeddings))
        codes: list[list[jax.Array]] = [[] for _ in heads]
        logits: list[list[jax.Array]] = [[] for _ in heads]
        x = local_hidden[:, None].astype(self.dtype)
        for t in range(steps):
            q_pos = jnp.full((n, 1), t)
            out, cache = self.local_transformer(
                x, q_pos, attention_mask(q_pos, key_pos, causal=True), cache, t
            )
            nxt = jnp.zeros((n, 1, self.speech_embeddings[0].embedding.shape[1]), self.dtype)
            for ch, (head, table) in enumerate(heads):
                rng, sub = jax.random.split(rng)
                if not active[t, ch]:
                    continue
                logits[ch].append(head(out[:, 0]))
                codes[ch].append(sample_fn(logits[ch][-1], c.speech_empty_ids[ch], sub))
                nxt = nxt + table(codes[ch][-1])[:, None].astype(self.dtype)
            x = self._to_local(nxt)
        patch = jnp.stack([jnp.stack(frames, 1) for frames in codes], -1)
        if not return_logits:
            return patch
        return patch, [jnp.stack(lg, 1) for lg in logits]


def unstack_for_decoding(model: MiMoAudioLM) -> MiMoAudioLM:
    """`model`, changed in place, with each transformer stack's layers unstacked
    (`nn.stack.unstack`): the form `MimoAudio.load` generates with on the CPU, where a
    100M-parameter model then decodes a group 1.5 times faster at batch 1. A stack's stacked
    weights are dropped as it is replaced, so the peak is one stack's copy (for the 7B backbone,
    13 GiB in bf16: too much for a 24 GB card, hence CPU only). Training keeps the scanned form."""
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, Qwen2Stack) and not isinstance(node.layers, nnx.List):
            node.layers = unstack(node.layers)
    return model
