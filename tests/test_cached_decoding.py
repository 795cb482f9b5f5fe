"""KV-cached decoding equals the uncached forward numerically (not only in its greedy tokens): every
generated step's text logits and local hidden state, every cached patch-decoder step's logits, for
prompts of several lengths, left-padded batches and packed rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.inference.generation_loop import GenerationConfig, generate
from mimo_jax.inference.sampling import GREEDY, SamplerConfig, forbid_one, sample
from mimo_jax.lm.layout import empty_patch, from_official

TOL = dict(rtol=1e-4, atol=1e-4)
NEW = 5  # generated groups per case


@pytest.fixture(scope="module")
def rows(lm, fixtures_root):
    config, _ = lm
    ref = np.load(fixtures_root / "lm" / "reference.npz")
    return from_official(ref["input_ids"], config.group_size)  # [B, T], [B, T, gs, C]


def _uncached(model, text, codes):
    hidden = model(jnp.asarray(text)[None], jnp.asarray(codes)[None])[0]
    return model.text_logits(hidden), model.local_hidden(hidden)


def _check_scores(model, out, row, first, gp):
    """Row `row` of a generation whose real groups start at `first`, prompt width gp: the scores
    of groups gp.. equal the uncached forward of the row's real groups."""
    logits, local = _uncached(model, out.text[row, first:], out.codes[row, first:])
    steps = np.arange(gp, out.text.shape[1])
    np.testing.assert_allclose(out.text_logits[row, steps], logits[steps - first - 1], **TOL)
    np.testing.assert_allclose(out.local_hidden[row, steps], local[steps - first - 1], **TOL)


@pytest.mark.parametrize("prompt", [1, 3, 7])
def test_generated_steps_equal_uncached_forward(lm, rows, prompt):
    config, model = lm
    text, codes = rows
    sampler = SamplerConfig(do_sample=True)  # varied groups: speech and text, not one greedy path
    gen = GenerationConfig(
        max_length=prompt + NEW, output_scores=True, text_sampler=sampler, patch_sampler=sampler
    )
    out = generate(model, text[:, :prompt], codes[:, :prompt], gen, rng=jax.random.key(prompt))
    for row in range(text.shape[0]):
        _check_scores(model, out, row, 0, prompt)


def test_left_padded_batch_steps_equal_uncached_forward(lm, rows):
    config, model = lm
    text, codes = rows
    long, short = 6, 2
    pad = long - short
    pad_text = np.concatenate([np.full((pad,), config.empty_idx), text[1, :short]])
    pad_codes = np.concatenate(
        [
            np.repeat(empty_patch(config.speech_empty_ids, config.group_size)[None], pad, 0),
            codes[1, :short],
        ]
    )
    gen = GenerationConfig(
        max_length=long + NEW, output_scores=True, text_sampler=SamplerConfig(do_sample=True)
    )
    out = generate(
        model,
        np.stack([text[0, :long], pad_text]),
        np.stack([codes[0, :long], pad_codes]),
        gen,
        prompt_lengths=[long, short],
        rng=jax.random.key(5),
    )
    _check_scores(model, out, 0, 0, long)
    _check_scores(model, out, 1, pad, long)


def test_packed_row_cached_steps_equal_documents_alone(lm, rows):
    """A packed row (document A, then the start of document B) prefilled into a cache, then B
    continued group by group: every step equals B alone, uncached; A's part equals A alone."""
    config, model = lm
    text, codes = rows
    cut_a, start_b = 5, 3
    len_b = text.shape[1]
    emb = model.embed_inputs(jnp.asarray(text), jnp.asarray(codes))  # [2, T, hidden]
    width = cut_a + len_b
    cache = model.model.init_cache(1, width)
    seg = jnp.asarray([[1] * cut_a + [2] * len_b])
    pos = jnp.asarray([list(range(cut_a)) + list(range(len_b))])
    prefill = cut_a + start_b
    hidden, cache = model.backbone_cached(
        jnp.concatenate([emb[0, :cut_a], emb[1, :start_b]])[None],
        pos[:, :prefill],
        seg[:, :prefill],
        cache,
        pos,
        jnp.where(jnp.arange(width) < prefill, seg, 0),
        0,
    )
    steps = [hidden[0, cut_a:]]
    for g in range(start_b, len_b):
        at = cut_a + g
        out, cache = model.backbone_cached(
            emb[1, g][None, None],
            pos[:, at : at + 1],
            seg[:, at : at + 1],
            cache,
            pos,
            jnp.where(jnp.arange(width) <= at, seg, 0),
            at,
        )
        steps.append(out[0])
    cached_b = jnp.concatenate(steps)
    alone_a = model(jnp.asarray(text[:1, :cut_a]), jnp.asarray(codes[:1, :cut_a]))[0]
    alone_b = model(jnp.asarray(text[1:]), jnp.asarray(codes[1:]))[0]
    np.testing.assert_allclose(hidden[0, :cut_a], alone_a, **TOL)
    np.testing.assert_allclose(model.text_logits(cached_b), model.text_logits(alone_b), **TOL)
    np.testing.assert_allclose(model.local_hidden(cached_b), model.local_hidden(alone_b), **TOL)


@pytest.mark.parametrize(
    "sampler", [GREEDY, SamplerConfig(do_sample=True)], ids=["greedy", "drawn"]
)
def test_patch_decoder_cached_steps_equal_teacher_forcing(lm, rows, sampler):
    config, model = lm
    text, codes = rows
    hidden = model(jnp.asarray(text), jnp.asarray(codes))
    seeds = model.local_hidden(hidden).reshape(-1, config.local_dim)[::3]  # several positions

    def pick(logits, forbidden_id, key):
        return sample(logits, sampler, key, forbid_one(logits.shape[-1], forbidden_id))

    decoded, cached = model.decode_patch(seeds, pick, jax.random.key(0), return_logits=True)
    forced = model.patch_logits(seeds, decoded)
    assert len(cached) == len(forced) == config.audio_channels
    for ch, (a, b) in enumerate(zip(cached, forced)):
        assert a.shape == b.shape == (len(seeds), config.group_size, config.speech_vocab_sizes[ch])
        np.testing.assert_allclose(a, b, **TOL)
