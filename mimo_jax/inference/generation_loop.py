"""KV-cached generation with the MiMo-Audio LM (the official `generate` / `slm_sample` loop),
batched.

Prefill the prompt, then one group per step: sample a text token; where it is `<|empty|>` the patch
decoder emits a patch of group_size frames, otherwise the group carries the empty speech ids; feed
the new group back. A row stops at a stop token (allowed only once `min_length` groups exist) or at
`max_length` groups. The loop runs on the device in a compiled `while_loop`, at once (`generate`)
or a chunk of groups at a time (`generate_chunks`, for streaming).

Each row may have its own `GenerationConfig`: lengths, stop ids and samplers reach the programs as
per-row arrays, so the programs depend only on the batch size, the prompt width and the cache
length (the longest `max_length`), and requests of every task and preset share them.

Prompts of different lengths are left-padded: `prompt_lengths[b]` counts the real groups at the end
of row b; padding groups are never attended to and positions start at 0 at each row's first real
group.
"""

import dataclasses
from functools import partial
from typing import TYPE_CHECKING, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.inference.sampling import GREEDY, SamplerConfig, SamplerRows, forbid_one, sample
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


class _Rows(NamedTuple):
    """The GenerationConfigs of a batch's rows as arrays (traced by the programs)."""

    min_length: np.ndarray  # [B] int32
    max_length: np.ndarray  # [B] int32
    stop_mask: np.ndarray  # [B, vocab] bool
    text_sampler: SamplerRows
    patch_sampler: SamplerRows


def _rows(gens: Sequence[GenerationConfig], vocab: int) -> _Rows:
    stop_mask = np.zeros((len(gens), vocab), bool)
    for row, g in enumerate(gens):
        bad = [t for t in g.stop_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop_ids {bad}: expected ids of the text vocabulary [0, {vocab})")
        stop_mask[row, list(g.stop_ids)] = True
    return _Rows(
        np.asarray([g.min_length for g in gens], np.int32),
        np.asarray([g.max_length for g in gens], np.int32),
        stop_mask,
        SamplerRows.of([g.text_sampler for g in gens]),
        SamplerRows.of([g.patch_sampler for g in gens]),
    )


@dataclasses.dataclass(frozen=True)
class Generation:
    text: np.ndarray  # [B, max_length] (prompt, then generated groups)
    codes: np.ndarray  # [B, max_length, group_size, channels]
    lengths: np.ndarray  # [B] groups per row up to and including its stop group
    # (with one GenerationConfig per row, max_length is the longest row's, and each row's groups
    # after its own max_length repeat its last group)
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


def _prefill(
    model: "MiMoAudioLM", text, codes, prompt_lengths, rng, total: int, output_scores: bool
) -> _State:
    """The loop state after the prompt: KV cache (of `total` groups) filled, nothing generated
    yet."""
    c = model.config
    b, gp = text.shape
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
        if output_scores
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


def _advance(model: "MiMoAudioLM", state: _State, until, rows: _Rows) -> _State:
    """Runs the loop until group `until` (exclusive), the cache's end or every row's stop (its
    stop token or its max_length)."""
    c = model.config
    b, total = state.out_text.shape
    empty_patch = jnp.broadcast_to(
        jnp.asarray(c.speech_empty_ids, jnp.int32), (b, c.group_size, c.audio_channels)
    )

    def patch_sampler(logits, forbidden_id, key):
        return sample(logits, rows.patch_sampler, key, forbid_one(logits.shape[-1], forbidden_id))

    def cond(s: _State):
        return (s.cur < jnp.minimum(until, total)) & ~jnp.all(s.done)

    def body(s: _State) -> _State:
        cur, out_text, done, scores = s.cur, s.out_text, s.done, s.scores
        rng, k_text, k_patch = jax.random.split(s.rng, 3)
        forbidden = jnp.where(cur < rows.min_length[:, None], rows.stop_mask, False)
        text_logits = model.text_logits(s.last_hidden)
        local_hidden = model.local_hidden(s.last_hidden)
        if scores:
            scores = (
                scores[0].at[:, cur].set(text_logits.astype(jnp.float32)),
                scores[1].at[:, cur].set(local_hidden.astype(jnp.float32)),
            )
        tok = sample(text_logits, rows.text_sampler, k_text, forbidden)
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
        is_stop = jnp.take_along_axis(rows.stop_mask, tok[:, None], 1)[:, 0]
        stopped = ~done & ((is_stop & (cur + 1 >= rows.min_length)) | (cur + 1 >= rows.max_length))
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
@partial(jax.jit, static_argnums=(0, 6, 7))
def _prefill_jit(graphdef, weights, text, codes, prompt_lengths, rng, total, output_scores):
    model = nnx.merge(graphdef, weights)
    return _prefill(model, text, codes, prompt_lengths, rng, total, output_scores)


@partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _advance_jit(graphdef, weights, state, until, rows):
    return _advance(nnx.merge(graphdef, weights), state, until, rows)


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


class _Start(NamedTuple):
    """What the prefill takes, and the rows' settings."""

    text: jax.Array
    codes: jax.Array
    prompt_lengths: jax.Array
    rng: jax.Array
    total: int  # the cache's groups: cache_groups, or the longest row's max_length
    output_scores: bool
    rows: _Rows


def _start(
    model: "MiMoAudioLM",
    text,
    codes,
    gen: "GenerationConfig | Sequence[GenerationConfig]",
    prompt_lengths,
    rng,
    cache_groups: int | None = None,
) -> _Start:
    """The checked inputs of a generation: one GenerationConfig for every row or one per row."""
    text, codes = jnp.asarray(text, jnp.int32), jnp.asarray(codes, jnp.int32)
    b, gp = text.shape
    gens = [gen] * b if isinstance(gen, GenerationConfig) else list(gen)
    if len(gens) != b:
        raise ValueError(f"{len(gens)} GenerationConfigs for {b} rows: expected one or one per row")
    if len({g.output_scores for g in gens}) != 1:
        raise ValueError("output_scores differs between rows: expected one setting for the batch")
    shortest, total = min(g.max_length for g in gens), max(g.max_length for g in gens)
    if shortest <= gp:
        raise ValueError(f"max_length {shortest} groups leaves no room after a prompt of {gp}")
    if cache_groups is not None:
        if cache_groups < total:
            raise ValueError(
                f"cache_groups {cache_groups}: expected at least the longest max_length, {total}"
            )
        total = cache_groups
    limit = model.config.max_positions
    if limit is not None and total > limit:
        raise ValueError(
            f"{'cache_groups' if cache_groups else 'max_length'} {total} groups: the LM's "
            f"positions end at {limit} "
            f"(max_position_embeddings); expected at most {limit}"
        )
    lengths = (
        jnp.full((b,), gp, jnp.int32)
        if prompt_lengths is None
        else jnp.asarray(prompt_lengths, jnp.int32)
    )
    rng = jax.random.key(0) if rng is None else rng
    rows = jax.device_put(_rows(gens, model.config.vocab_size))  # once, not at every chunk
    return _Start(text, codes, lengths, rng, total, gens[0].output_scores, rows)


def _prefilled(split, start: _Start) -> _State:
    return _prefill_jit(*split, *start[:6])


def generate(
    model: "MiMoAudioLM",
    text,
    codes,
    gen: "GenerationConfig | Sequence[GenerationConfig]",
    *,
    prompt_lengths=None,
    rng: jax.Array | None = None,
    cache_groups: int | None = None,
) -> Generation:
    """Generates up to `gen.max_length` groups per row.

    text [B, Gp] int, codes [B, Gp, group_size, channels] int (the prompt, left-padded when rows
    differ in length; `prompt_lengths` [B] then gives each row's real groups). `gen`: one
    GenerationConfig, or one per row (mixed tasks in one batch; `output_scores` alike). A model
    whose stacks are unstacked (`lm.model.unstack_for_decoding`, as `MimoAudio.load` holds it on
    the CPU) decodes faster there; a scanned one (a training model) gives the same tokens.
    `cache_groups` (at least every max_length) sizes the KV cache and the outputs: batches of other
    lengths then share the compiled programs (a longer cache may change logits in their last bits:
    its masked slots change the order of the sums).
    """
    split = nnx.split(model)
    start = _start(model, text, codes, gen, prompt_lengths, rng, cache_groups)
    state = _advance_jit(*split, _prefilled(split, start), start.total, start.rows)
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
    gen: "GenerationConfig | Sequence[GenerationConfig]",
    *,
    chunk_groups: int = 8,
    prompt_lengths=None,
    rng: jax.Array | None = None,
    cache_groups: int | None = None,
) -> Iterator[GenerationChunk]:
    """`generate`, handing back the new groups every `chunk_groups` groups.

    The loop runs on the device `chunk_groups` groups at a time and stops in between to yield;
    it is the same compiled loop with the same random keys, so the joined chunks equal
    `generate`'s groups after the prompt, token for token, greedy or sampled.
    """
    if chunk_groups < 1:
        raise ValueError(f"chunk_groups {chunk_groups}: expected at least 1")
    start = _start(model, text, codes, gen, prompt_lengths, rng, cache_groups)
    if start.output_scores:
        raise ValueError("output_scores is not streamed: use generate()")
    split = nnx.split(model)
    state = _prefilled(split, start)
    cur = int(np.shape(text)[1])
    size = min(chunk_groups, start.total)
    while True:
        state = _advance_jit(*split, state, cur + chunk_groups, start.rows)
        first, new_text, new_codes, end, lengths, done = jax.device_get(_window(state, cur, size))
        end, off = int(end), cur - int(first)
        last = end >= start.total or bool(done.all())
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
