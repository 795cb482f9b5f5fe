"""KV-cached generation with the MiMo-Audio LM (the official `generate` / `slm_sample` loop),
batched.

Prefill the prompt, then one group per step: sample a text token; where it is `<|empty|>` the patch
decoder emits a patch of group_size frames, otherwise the group carries the empty speech ids; feed
the new group back. A row stops at a stop token (allowed only once `min_length` groups exist) or at
`max_length` groups. The loop runs on the device in a compiled `while_loop`, at once (`generate`)
or a chunk of groups at a time (`generate_chunks`, for streaming).

Prompts of different lengths are left-padded: `prompt_lengths[b]` counts the real groups at the end
of row b; padding groups are never attended to and positions start at 0 at each row's first real
group.
"""

import dataclasses
from functools import partial
from typing import TYPE_CHECKING, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.inference.sampling import GREEDY, SamplerConfig, forbid_one, sample
from mimo_jax.nn.transformer import KVCache

if TYPE_CHECKING:  # annotations only
    from mimo_jax.lm.model import MiMoAudioLM


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


class _State(NamedTuple):
    cur: jax.Array  # the next group to generate
    last_hidden: jax.Array
    cache: KVCache
    cache_pos: jax.Array
    cache_seg: jax.Array
    out_text: jax.Array
    out_codes: jax.Array
    rng: jax.Array
    lengths: jax.Array
    done: jax.Array
    scores: tuple


def _stop_mask(model: "MiMoAudioLM", gen: GenerationConfig):
    stop_mask = jnp.zeros((model.config.vocab_size,), bool)
    if gen.stop_ids:
        stop_mask = stop_mask.at[jnp.asarray(gen.stop_ids)].set(True)
    return stop_mask


def _prefill(
    model: "MiMoAudioLM", text, codes, prompt_lengths, rng, gen: GenerationConfig
) -> _State:
    """The loop state after the prompt: KV cache filled, nothing generated yet."""
    c = model.config
    b, gp = text.shape
    total = gen.max_length
    segments, positions = _left_pad_layout(prompt_lengths, gp)
    cache = model.model.init_cache(b, total)
    cache_seg = jnp.zeros((b, total), jnp.int32).at[:, :gp].set(segments)
    cache_pos = jnp.zeros((b, total), jnp.int32).at[:, :gp].set(positions)
    hidden, cache = model.backbone_cached(
        model.embed_inputs(text, codes), positions, segments, cache, cache_pos, cache_seg, 0
    )
    out_text = jnp.zeros((b, total), jnp.int32).at[:, :gp].set(text)
    out_codes = jnp.zeros((b, total, c.group_size, c.audio_channels), jnp.int32)
    out_codes = out_codes.at[:, :gp].set(codes)
    scores = (
        (
            jnp.zeros((b, total, c.vocab_size), jnp.float32),
            jnp.zeros((b, total, c.local_dim), jnp.float32),
        )
        if gen.output_scores
        else ()
    )
    return _State(
        jnp.asarray(gp),
        hidden[:, -1],
        cache,
        cache_pos,
        cache_seg,
        out_text,
        out_codes,
        rng,
        jnp.full((b,), total, jnp.int32),
        jnp.zeros((b,), bool),
        scores,
    )


def _advance(model: "MiMoAudioLM", state: _State, until, gen: GenerationConfig) -> _State:
    """Runs the loop until group `until` (exclusive), `max_length` or every row's stop."""
    c = model.config
    b = state.out_text.shape[0]
    total = gen.max_length
    empty_patch = jnp.broadcast_to(
        jnp.asarray(c.speech_empty_ids, jnp.int32), (b, c.group_size, c.audio_channels)
    )
    stop_mask = _stop_mask(model, gen)

    def patch_sampler(logits, forbidden_id, key):
        return sample(logits, gen.patch_sampler, key, forbid_one(logits.shape[-1], forbidden_id))

    def cond(s: _State):
        return (s.cur < jnp.minimum(until, total)) & ~jnp.all(s.done)

    def body(s: _State) -> _State:
        cur, out_text, done, scores = s.cur, s.out_text, s.done, s.scores
        rng, k_text, k_patch = jax.random.split(s.rng, 3)
        forbidden = jnp.where(cur < gen.min_length, stop_mask, False)
        text_logits = model.text_logits(s.last_hidden)
        local_hidden = model.local_hidden(s.last_hidden)
        if gen.output_scores:
            scores = (
                scores[0].at[:, cur].set(text_logits.astype(jnp.float32)),
                scores[1].at[:, cur].set(local_hidden.astype(jnp.float32)),
            )
        tok = sample(text_logits, gen.text_sampler, k_text, forbidden)
        is_speech = tok == c.empty_idx
        patch = jax.lax.cond(
            jnp.any(is_speech & ~done),
            lambda: model.decode_patch(local_hidden, patch_sampler, k_patch),
            lambda: empty_patch,
        )
        patch = jnp.where(is_speech[:, None, None], patch, empty_patch)
        tok = jnp.where(done, out_text[:, cur - 1], tok)  # finished rows repeat their stop group
        patch = jnp.where(done[:, None, None], empty_patch, patch)
        out_text = out_text.at[:, cur].set(tok)
        out_codes = s.out_codes.at[:, cur].set(patch)
        stopped = ~done & (stop_mask[tok] & (cur + 1 >= gen.min_length))
        lengths = jnp.where(stopped, cur + 1, s.lengths)
        done = done | stopped
        # Feed the new group back (unless this was the last slot).
        pos = jax.lax.dynamic_slice_in_dim(s.cache_pos, cur - 1, 1, axis=1) + 1
        seg = jnp.ones((b, 1), jnp.int32)
        cache_pos = jax.lax.dynamic_update_slice(s.cache_pos, pos, (0, cur))
        cache_seg = jax.lax.dynamic_update_slice(s.cache_seg, seg, (0, cur))
        hidden, cache = model.backbone_cached(
            model.embed_inputs(tok[:, None], patch[:, None]),
            pos,
            seg,
            s.cache,
            cache_pos,
            cache_seg,
            cur,
        )
        return _State(
            cur + 1,
            hidden[:, -1],
            cache,
            cache_pos,
            cache_seg,
            out_text,
            out_codes,
            rng,
            lengths,
            done,
            scores,
        )

    return jax.lax.while_loop(cond, body, state)


# One program each for the prefill and for the loop (its end `until` is traced), shared by the
# one-shot and the chunked paths: a chunked generation runs exactly the one-shot computation.
# They take the model split (graphdef, weights), not through nnx.jit, whose traversal of the model
# graph on every call cost about 100 ms per call for a 12-layer model on the CPU (nnx.split once
# per generation costs 7 to 26 ms). Generation changes no model state.
@partial(jax.jit, static_argnums=(0, 6))
def _prefill_jit(graphdef, weights, text, codes, prompt_lengths, rng, gen):
    return _prefill(nnx.merge(graphdef, weights), text, codes, prompt_lengths, rng, gen)


@partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
def _advance_jit(graphdef, weights, state, until, gen):
    return _advance(nnx.merge(graphdef, weights), state, until, gen)


@partial(jax.jit, static_argnums=(2,))
def _window(state: _State, start, groups: int):
    """Groups [start, start + groups) of every row (start clipped to fit), and the row states."""
    total = state.out_text.shape[1]
    start = jnp.minimum(start, total - groups)
    return (
        start,
        jax.lax.dynamic_slice_in_dim(state.out_text, start, groups, axis=1),
        jax.lax.dynamic_slice_in_dim(state.out_codes, start, groups, axis=1),
        state.cur,
        state.lengths,
        state.done,
    )


def _inputs(
    text, codes, gen: GenerationConfig, prompt_lengths, rng
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    text, codes = jnp.asarray(text, jnp.int32), jnp.asarray(codes, jnp.int32)
    b, gp = text.shape
    if gen.max_length <= gp:
        raise ValueError(
            f"max_length {gen.max_length} groups leaves no room after a prompt of {gp}"
        )
    lengths = (
        jnp.full((b,), gp, jnp.int32)
        if prompt_lengths is None
        else jnp.asarray(prompt_lengths, jnp.int32)
    )
    return text, codes, lengths, jax.random.key(0) if rng is None else rng


def generate(
    model: "MiMoAudioLM",
    text,
    codes,
    gen: GenerationConfig,
    *,
    prompt_lengths=None,
    rng: jax.Array | None = None,
) -> Generation:
    """Generates up to `gen.max_length` groups per row.

    text [B, Gp] int, codes [B, Gp, group_size, channels] int (the prompt, left-padded when rows
    differ in length; `prompt_lengths` [B] then gives each row's real groups). A model whose
    stacks are unstacked (`lm.model.unstack_for_decoding`, as `MimoAudio.load` holds it on the
    CPU) decodes faster there; a scanned one (a training model) gives the same tokens.
    """
    split = nnx.split(model)
    state = _prefill_jit(*split, *_inputs(text, codes, gen, prompt_lengths, rng), gen)
    state = _advance_jit(*split, state, gen.max_length, gen)
    return Generation(
        np.asarray(state.out_text),
        np.asarray(state.out_codes),
        np.asarray(state.lengths),
        *(np.asarray(a) for a in state.scores),
    )


@dataclasses.dataclass(frozen=True)
class GenerationChunk:
    start: int  # the index of this chunk's first group (the prompt width for the first chunk)
    text: np.ndarray  # [B, n] groups start .. start + n - 1
    codes: np.ndarray  # [B, n, group_size, channels]
    lengths: np.ndarray  # [B] as `Generation.lengths` (max_length while a row runs)
    done: np.ndarray  # [B] rows that have stopped (their later groups repeat the stop group)
    last: bool  # no chunk follows


def generate_chunks(
    model: "MiMoAudioLM",
    text,
    codes,
    gen: GenerationConfig,
    *,
    chunk_groups: int = 8,
    prompt_lengths=None,
    rng: jax.Array | None = None,
) -> Iterator[GenerationChunk]:
    """`generate`, handing back the new groups every `chunk_groups` groups.

    The loop runs on the device `chunk_groups` groups at a time and stops in between to yield;
    it is the same compiled loop with the same random keys, so the joined chunks equal
    `generate`'s groups after the prompt, token for token, greedy or sampled.
    """
    if chunk_groups < 1:
        raise ValueError(f"chunk_groups {chunk_groups}: expected at least 1")
    if gen.output_scores:
        raise ValueError("output_scores is not streamed: use generate()")
    split = nnx.split(model)
    state = _prefill_jit(*split, *_inputs(text, codes, gen, prompt_lengths, rng), gen)
    cur = int(np.shape(text)[1])
    size = min(chunk_groups, gen.max_length)
    while True:
        state = _advance_jit(*split, state, cur + chunk_groups, gen)
        start, new_text, new_codes, end, lengths, done = jax.device_get(_window(state, cur, size))
        end, off = int(end), cur - int(start)
        last = end >= gen.max_length or bool(done.all())
        yield GenerationChunk(
            cur,
            new_text[:, off : off + end - cur],
            new_codes[:, off : off + end - cur],
            lengths,
            done,
            last,
        )
        if last:
            return
        cur = end
