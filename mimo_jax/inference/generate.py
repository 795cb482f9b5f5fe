"""KV-cached generation with the MiMo-Audio LM (the official `generate` / `slm_sample` loop), batched.

Prefill the prompt, then one group per step: sample a text token; where it is `<|empty|>` the patch
decoder emits a patch of group_size frames, otherwise the group carries the empty speech ids; feed
the new group back. A row stops at a stop token (allowed only once `min_length` groups exist) or at
`max_length` groups. The whole loop runs on the device in one compiled `while_loop`.

Prompts of different lengths are left-padded: `prompt_lengths[b]` counts the real groups at the end
of row b; padding groups are never attended to and positions start at 0 at each row's first real group.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.inference.sampling import GREEDY, SamplerConfig, forbid_one, sample


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_length: int  # groups, prompt included
    min_length: int = 0  # groups, prompt included; stop tokens are forbidden before it
    stop_ids: tuple[int, ...] = ()
    text_sampler: SamplerConfig = GREEDY
    patch_sampler: SamplerConfig = GREEDY
    output_scores: bool = False  # also return the text logits and local hidden of every step


@dataclasses.dataclass(frozen=True)
class Generation:
    text: np.ndarray  # [B, max_length] (prompt, then generated groups)
    codes: np.ndarray  # [B, max_length, group_size, channels]
    lengths: np.ndarray  # [B] groups per row up to and including its stop group
    # With `output_scores`: what group g was decided from (the hidden state of group g - 1), for
    # g >= prompt width; zero elsewhere. [B, max_length, vocab] and [B, max_length, local_dim].
    text_logits: np.ndarray | None = None
    local_hidden: np.ndarray | None = None


def _left_pad_layout(prompt_lengths: jax.Array, width: int):
    """Segments (1 real, 0 padding) and positions of left-padded prompts."""
    first = width - prompt_lengths[:, None]
    idx = jnp.arange(width)[None, :]
    segments = (idx >= first).astype(jnp.int32)
    positions = jnp.maximum(idx - first, 0)
    return segments, positions


def _generate(model, text, codes, prompt_lengths, rng, gen: GenerationConfig):
    c = model.config
    b, gp = text.shape
    total = gen.max_length
    empty_patch = jnp.broadcast_to(jnp.asarray(c.speech_empty_ids, jnp.int32),
                                   (b, c.group_size, c.audio_channels))
    stop_mask = jnp.zeros((c.vocab_size,), bool)
    if gen.stop_ids:
        stop_mask = stop_mask.at[jnp.asarray(gen.stop_ids)].set(True)

    segments, positions = _left_pad_layout(prompt_lengths, gp)
    cache = model.model.init_cache(b, total)
    cache_seg = jnp.zeros((b, total), jnp.int32).at[:, :gp].set(segments)
    cache_pos = jnp.zeros((b, total), jnp.int32).at[:, :gp].set(positions)
    hidden, cache = model.backbone_cached(model.embed_inputs(text, codes), positions, segments,
                                          cache, cache_pos, cache_seg, 0)
    out_text = jnp.zeros((b, total), jnp.int32).at[:, :gp].set(text)
    out_codes = jnp.zeros((b, total, c.group_size, c.audio_channels), jnp.int32)
    out_codes = out_codes.at[:, :gp].set(codes)

    def patch_sampler(logits, forbidden_id, key):
        return sample(logits, gen.patch_sampler, key, forbid_one(logits.shape[-1], forbidden_id))

    def cond(state):
        cur, done = state[0], state[9]
        return (cur < total) & ~jnp.all(done)

    def body(state):
        (cur, last_hidden, cache, cache_pos, cache_seg, out_text, out_codes, rng, lengths, done,
         scores) = state
        rng, k_text, k_patch = jax.random.split(rng, 3)
        forbidden = jnp.where(cur < gen.min_length, stop_mask, False)
        text_logits, local_hidden = model.text_logits(last_hidden), model.local_hidden(last_hidden)
        if gen.output_scores:
            scores = (scores[0].at[:, cur].set(text_logits.astype(jnp.float32)),
                      scores[1].at[:, cur].set(local_hidden.astype(jnp.float32)))
        tok = sample(text_logits, gen.text_sampler, k_text, forbidden)
        is_speech = tok == c.empty_idx
        patch = jax.lax.cond(
            jnp.any(is_speech & ~done),
            lambda: model.decode_patch(local_hidden, patch_sampler, k_patch),
            lambda: empty_patch)
        patch = jnp.where(is_speech[:, None, None], patch, empty_patch)
        tok = jnp.where(done, out_text[:, cur - 1], tok)  # finished rows repeat their stop group
        patch = jnp.where(done[:, None, None], empty_patch, patch)
        out_text = out_text.at[:, cur].set(tok)
        out_codes = out_codes.at[:, cur].set(patch)
        stopped = ~done & (stop_mask[tok] & (cur + 1 >= gen.min_length))
        lengths = jnp.where(stopped, cur + 1, lengths)
        done = done | stopped
        # Feed the new group back (unless this was the last slot).
        pos = jax.lax.dynamic_slice_in_dim(cache_pos, cur - 1, 1, axis=1) + 1
        seg = jnp.ones((b, 1), jnp.int32)
        cache_pos = jax.lax.dynamic_update_slice(cache_pos, pos, (0, cur))
        cache_seg = jax.lax.dynamic_update_slice(cache_seg, seg, (0, cur))
        hidden, cache = model.backbone_cached(model.embed_inputs(tok[:, None], patch[:, None]), pos,
                                              seg, cache, cache_pos, cache_seg, cur)
        return (cur + 1, hidden[:, -1], cache, cache_pos, cache_seg, out_text, out_codes, rng,
                lengths, done, scores)

    scores = ((jnp.zeros((b, total, c.vocab_size), jnp.float32),
               jnp.zeros((b, total, model.config.local_dim), jnp.float32))
              if gen.output_scores else ())
    state = (jnp.asarray(gp), hidden[:, -1], cache, cache_pos, cache_seg, out_text, out_codes, rng,
             jnp.full((b,), total, jnp.int32), jnp.zeros((b,), bool), scores)
    state = jax.lax.while_loop(cond, body, state)
    return state[5], state[6], state[8], state[10]


@nnx.jit(static_argnums=(5,))
def _generate_jit(model, text, codes, prompt_lengths, rng, gen):
    return _generate(model, text, codes, prompt_lengths, rng, gen)


def generate(model, text, codes, gen: GenerationConfig, *, prompt_lengths=None,
             rng: jax.Array | None = None) -> Generation:
    """Generates up to `gen.max_length` groups per row.

    text [B, Gp] int, codes [B, Gp, group_size, channels] int (the prompt, left-padded when rows
    differ in length; `prompt_lengths` [B] then gives each row's real groups).
    """
    text, codes = jnp.asarray(text, jnp.int32), jnp.asarray(codes, jnp.int32)
    b, gp = text.shape
    if gen.max_length <= gp:
        raise ValueError(f"max_length {gen.max_length} groups leaves no room after a prompt of {gp}")
    lengths = jnp.full((b,), gp, jnp.int32) if prompt_lengths is None else jnp.asarray(
        prompt_lengths, jnp.int32)
    rng = jax.random.key(0) if rng is None else rng
    out_text, out_codes, out_lengths, scores = _generate_jit(model, text, codes, lengths, rng, gen)
    return Generation(np.asarray(out_text), np.asarray(out_codes), np.asarray(out_lengths),
                      *(np.asarray(a) for a in scores))
