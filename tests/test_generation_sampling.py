"""Generation applies its samplers (temperature, top-k, top-p of the text and of the patch
sampler: the draws of many rows follow the filtered distribution), and stops at exactly the group
that min_length and max_length allow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.inference import sampling
from mimo_jax.inference.generation_loop import GenerationConfig, generate
from mimo_jax.inference.mimo_audio import TASK_SAMPLERS
from mimo_jax.inference.sampling import SamplerConfig, process, sample

ROWS = 512  # identical rows per sampler, one draw each


def _speech_next(config, gp):
    """min_length and stop ids that leave `<|empty|>` the only choice for the next group."""
    return dict(
        min_length=gp + 1,
        stop_ids=tuple(t for t in range(config.vocab_size) if t != config.empty_idx),
    )


def _expected(logits, cfg, forbidden=None):
    scores = process(jnp.asarray(logits)[None], cfg)[0]
    if forbidden is not None:
        scores = scores.at[forbidden].set(-jnp.inf)
    return np.asarray(jax.nn.softmax(scores))


def _assert_draws_follow(draws, probs):
    counts = np.bincount(draws, minlength=len(probs)) / len(draws)
    assert counts[probs == 0].sum() == 0, np.nonzero(counts * (probs == 0))
    bound = 4.5 * np.sqrt(probs * (1 - probs) / len(draws)) + 1.0 / len(draws)
    assert (np.abs(counts - probs) <= bound).all(), (counts[probs > 0], probs[probs > 0])


def _batched(prompt, rows=ROWS):
    text, codes = prompt
    return np.repeat(text, rows, 0), np.repeat(codes, rows, 0)


# (temperature in units of the gap between the best and the 5th best logit, top_k, top_p): the
# random fixture's logits are peaked, so the temperature is scaled to leave several live choices.
SAMPLERS = {
    "t0.5-k5": (0.5, 5, None),
    "t1-k5": (1.0, 5, None),
    "t0.5-p0.6": (0.5, None, 0.6),
    "t1-k8-p0.8": (1.0, 8, 0.8),
}


def _sampler(logits, forbidden, name):
    scale, top_k, top_p = SAMPLERS[name]
    live = np.sort(np.delete(logits, forbidden) if forbidden is not None else logits)[::-1]
    gap = live[0] - live[min(4, len(live) - 1)]
    return SamplerConfig(do_sample=True, temperature=float(scale * gap), top_k=top_k, top_p=top_p)


@pytest.fixture(scope="module")
def first_step(lm, prompt):
    """The first generated group's text logits and patch-decoder seed (greedy run)."""
    _, model = lm
    gp = prompt[0].shape[1]
    out = generate(model, *prompt, GenerationConfig(max_length=gp + 1, output_scores=True))
    return out.text_logits[0, gp], out.local_hidden[0, gp]


def test_text_samplers_draws_follow_their_filtered_distributions(lm, prompt, first_step):
    # Every sampler in one batch (ROWS rows each, its settings per row): one program serves them.
    config, model = lm
    gp = prompt[0].shape[1]
    cfgs = [_sampler(first_step[0], None, name) for name in SAMPLERS]
    gens = [
        GenerationConfig(max_length=gp + 1, text_sampler=cfg, output_scores=True)
        for cfg in cfgs
        for _ in range(ROWS)
    ]
    out = generate(model, *_batched(prompt, len(gens)), gens, rng=jax.random.key(1))
    # Identical rows decide from identical logits (those of one row may differ from a batch of
    # one in the last bits: another matmul blocking).
    logits = out.text_logits[0, gp]
    np.testing.assert_array_equal(
        out.text_logits[:, gp], np.broadcast_to(logits, (len(gens),) + logits.shape)
    )
    for i, (name, cfg) in enumerate(zip(SAMPLERS, cfgs)):
        probs = _expected(logits, cfg)
        assert 1 < (probs > 0).sum() < len(probs), name  # the filter leaves a choice, removes some
        _assert_draws_follow(out.text[i * ROWS : (i + 1) * ROWS, gp], probs)


def test_patch_samplers_draws_follow_their_filtered_distributions(lm, prompt, first_step):
    config, model = lm
    gp = prompt[0].shape[1]
    # The channel with the smallest delay emits frame 0 from the seed alone (nothing fed yet).
    ch = int(np.argmin(config.delay_pattern))
    dummy = jnp.zeros((1, config.group_size, config.audio_channels), jnp.int32)
    logits = np.asarray(model.patch_logits(jnp.asarray(first_step[1])[None], dummy)[ch][0, 0])
    empty = config.speech_empty_ids[ch]
    cfgs = [_sampler(logits, empty, name) for name in SAMPLERS]
    gens = [
        GenerationConfig(
            max_length=gp + 1, patch_sampler=cfg, output_scores=True, **_speech_next(config, gp)
        )
        for cfg in cfgs
        for _ in range(ROWS)
    ]
    out = generate(model, *_batched(prompt, len(gens)), gens, rng=jax.random.key(2))
    assert (out.text[:, gp] == config.empty_idx).all()  # every row is speech
    seeds = out.local_hidden[:, gp]
    np.testing.assert_array_equal(seeds, np.broadcast_to(seeds[0], seeds.shape))
    logits = np.asarray(model.patch_logits(jnp.asarray(seeds[:1]), dummy)[ch][0, 0])
    for i, (name, cfg) in enumerate(zip(SAMPLERS, cfgs)):
        probs = _expected(logits, cfg, forbidden=empty)
        assert 1 < (probs > 0).sum() < len(probs), name
        _assert_draws_follow(out.codes[i * ROWS : (i + 1) * ROWS, gp, 0, ch], probs)


@pytest.fixture(scope="module")
def filler(lm, prompt):
    """Stop ids: every text id but one filler (the least likely first token, not `<|empty|>`)."""
    config, model = lm
    gp = prompt[0].shape[1]
    out = generate(model, *prompt, GenerationConfig(max_length=gp + 1, output_scores=True))
    order = np.argsort(out.text_logits[0, gp])
    f = int(next(t for t in order if t != config.empty_idx))
    return f, tuple(t for t in range(config.vocab_size) if t != f)


# Every length test generates into a cache of prompt + LENGTHS groups: one program serves them.
LENGTHS = 6


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_min_length_allows_a_stop_exactly_at_its_group(lm, prompt, filler, extra):
    config, model = lm
    gp = prompt[0].shape[1]
    f, stops = filler
    min_length, max_length = gp + extra, gp + LENGTHS
    out = generate(
        model,
        *prompt,
        GenerationConfig(max_length=max_length, min_length=min_length, stop_ids=stops),
    )
    # Groups before min_length are the filler (every stop id forbidden), the group at index
    # min_length is the first that may stop, and greedy decoding stops there.
    assert out.text[0, gp:min_length].tolist() == [f] * extra
    assert int(out.text[0, min_length]) != f
    assert out.lengths.tolist() == [min_length + 1]


def test_max_length_ends_generation_at_its_group(lm, prompt, filler):
    config, model = lm
    gp = prompt[0].shape[1]
    f, stops = filler
    end = gp + LENGTHS
    out = generate(model, *prompt, GenerationConfig(max_length=end, min_length=end, stop_ids=stops))
    assert out.text.shape[1] == end and out.lengths.tolist() == [end]
    assert out.text[0, gp:].tolist() == [f] * LENGTHS


def test_top_p_of_one_is_skipped_without_changing_a_choice():
    # Logits spread so widely that many probabilities underflow to exactly 0: top_p = 1 removes
    # those (the official filter), which `process` skips as no choice can fall on them.
    logits = 40.0 * jax.random.normal(jax.random.key(0), (64, 300))
    for do_sample in (False, True):
        cfg = SamplerConfig(do_sample, 0.7, None, 1.0)
        scores = logits / 0.7
        filtered = sampling._top_p(scores, sampling._ordered_keys(scores), 1.0)
        assert (~jnp.isfinite(filtered)).any() and jnp.isfinite(process(logits, cfg)).all()
        for key in jax.random.split(jax.random.key(1), 20 if do_sample else 1):
            want = sampling._draw(filtered, key) if do_sample else jnp.argmax(filtered, -1)
            np.testing.assert_array_equal(sample(logits, cfg, key), want)


def _official_filters(logits, cfg):
    """The official sampler's filters in NumPy: temperature, then top-k, then top-p over a stable
    ascending sort of what top-k kept (entries at cumulative probability <= 1 - top_p removed,
    never the last)."""
    scores = np.asarray(logits, np.float64) / cfg.temperature
    kth = np.sort(scores, -1)[:, -cfg.top_k][:, None]
    scores = np.where(scores < kth, -np.inf, scores)
    order = np.argsort(scores, -1, kind="stable")
    ascending = np.take_along_axis(scores, order, -1)
    probs = np.exp(ascending - ascending.max(-1, keepdims=True))
    removed_sorted = np.cumsum(probs / probs.sum(-1, keepdims=True), -1) <= 1 - cfg.top_p
    removed_sorted[:, -1] = False
    removed = np.zeros_like(removed_sorted)
    np.put_along_axis(removed, order, removed_sorted, -1)
    return np.where(removed, -np.inf, scores)


def test_top_k_filters_before_top_p():
    # Top-k keeps .3 and .25, renormalised .545 and .455; top-p 0.5 then removes .455 (its
    # cumulative probability is <= 0.5): one entry is left. Top-p first would keep two.
    logits = jnp.log(jnp.asarray([[0.3, 0.25, 0.2, 0.15, 0.1]]))
    cfg = SamplerConfig(do_sample=True, temperature=1.0, top_k=2, top_p=0.5)
    assert np.isfinite(process(logits, cfg)).tolist() == [[True, False, False, False, False]]
    # The `default` preset (top_k 50, top_p 0.95), where the two filters interact: the official
    # filters keep fewer than 50 entries, top-p first would keep 50.
    logits = 3.0 * jax.random.normal(jax.random.key(3), (8, 200))
    cfg = TASK_SAMPLERS["default"][0]
    want = _official_filters(logits, cfg)
    kept = np.isfinite(want)
    assert (kept.sum(-1) < cfg.top_k).all() and kept.any(-1).all()
    got = np.asarray(process(logits, cfg))
    np.testing.assert_array_equal(np.isfinite(got), kept)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-6)
