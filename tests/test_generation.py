"""The sampler's filters, and batched generation: left-padded rows, stop tokens, min_length;
sampler values that are not numbers and lengths past the LM's positions refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax.inference.generation_loop import GenerationConfig, generate
from mimo_jax.inference.sampling import SamplerConfig, process, sample
from mimo_jax.lm.layout import empty_patch
from mimo_jax.lm.model import unstack_for_decoding


def test_top_k_is_per_row():
    logits = jnp.array([[1.0, 5.0, 3.0, 4.0], [9.0, 0.0, 8.0, 1.0]])
    out = process(logits, SamplerConfig(top_k=2))
    np.testing.assert_array_equal(
        jnp.isfinite(out), [[False, True, False, True], [True, False, True, False]]
    )


def test_top_p_keeps_smallest_set_reaching_p():
    probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
    out = process(jnp.log(probs), SamplerConfig(top_p=0.8))
    # Ascending cumulative: 0.05, 0.2, 0.5, 1.0; entries with cumulative <= 0.2 are removed.
    np.testing.assert_array_equal(jnp.isfinite(out), [[True, True, False, False]])
    assert jnp.isfinite(process(jnp.log(probs), SamplerConfig(top_p=1.0))).all()


def test_temperature_forbidden_and_draws():
    logits = jnp.array([[2.0, 1.0, 0.0]])
    np.testing.assert_allclose(process(logits, SamplerConfig(temperature=0.5)), [[4.0, 2.0, 0.0]])
    forbid = jnp.array([True, False, False])
    assert int(sample(logits, SamplerConfig(), jax.random.key(0), forbid)[0]) == 1
    draws = jax.vmap(lambda k: sample(logits, SamplerConfig(do_sample=True), k, forbid)[0])(
        jax.random.split(jax.random.key(1), 400)
    )
    counts = np.bincount(np.asarray(draws), minlength=3)
    assert counts[0] == 0 and counts[1] > counts[2] > 0


def test_invalid_sampler_values():
    with pytest.raises(ValueError, match="top_p"):
        SamplerConfig(top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplerConfig(temperature=0.0)


def test_left_padded_batch_equals_rows_alone(lm, prompt):
    config, model = lm
    text, codes = prompt
    short_text, short_codes = text[:, 2:], codes[:, 2:]
    pad_text = np.concatenate([np.full((1, 2), config.empty_idx), short_text], axis=1)
    pad_codes = np.concatenate(
        [
            np.repeat(
                empty_patch(config.speech_empty_ids, config.group_size)[None, None], 2, axis=1
            ),
            short_codes,
        ],
        axis=1,
    )
    batch_text = np.concatenate([text, pad_text])
    batch_codes = np.concatenate([codes, pad_codes])
    both = generate(
        model, batch_text, batch_codes, GenerationConfig(max_length=12), prompt_lengths=[6, 4]
    )
    full = generate(model, text, codes, GenerationConfig(max_length=12))
    short = generate(model, short_text, short_codes, GenerationConfig(max_length=10))
    np.testing.assert_array_equal(both.text[0], full.text[0])
    np.testing.assert_array_equal(both.codes[0], full.codes[0])
    np.testing.assert_array_equal(both.text[1, 2:], short.text[0])
    np.testing.assert_array_equal(both.codes[1, 2:], short.codes[0])


def test_sampled_generation_is_reproducible_and_valid(lm, prompt):
    config, model = lm
    sampler = SamplerConfig(do_sample=True, temperature=0.9, top_k=50, top_p=0.95)
    gen = GenerationConfig(max_length=14, text_sampler=sampler, patch_sampler=sampler)
    a = generate(model, *prompt, gen, rng=jax.random.key(3))
    b = generate(model, *prompt, gen, rng=jax.random.key(3))
    np.testing.assert_array_equal(a.codes, b.codes)
    speech = a.text[0] == config.empty_idx
    generated = a.codes[0, 6:][speech[6:]]  # [frames..., channels] of sampled speech groups
    assert (generated < np.asarray(config.speech_empty_ids)).all()  # empty ids never sampled


def test_stop_tokens_and_min_length(lm, prompt):
    config, model = lm
    text, codes = prompt
    free = generate(model, text, codes, GenerationConfig(max_length=16))
    first_text = int(free.text[0, 6])  # the first generated group's token
    stopped = generate(model, text, codes, GenerationConfig(max_length=16, stop_ids=(first_text,)))
    assert stopped.lengths.tolist() == [7] and int(stopped.text[0, 6]) == first_text
    held = generate(
        model, text, codes, GenerationConfig(max_length=16, min_length=10, stop_ids=(first_text,))
    )
    assert int(held.text[0, 6]) != first_text
    assert held.lengths[0] >= 10 or held.lengths[0] == 16
    assert first_text not in held.text[0, 6:9].tolist()


def test_a_longer_cache_generates_the_same_groups(lm, prompt):
    # cache_groups sizes the KV cache (16: the program of max_length 16); each row still ends at
    # its own max_length.
    _, model = lm
    gen = GenerationConfig(max_length=12)
    want = generate(model, *prompt, gen)
    got = generate(model, *prompt, gen, cache_groups=16)
    assert got.text.shape[1] == 16 and got.lengths.tolist() == want.lengths.tolist() == [12]
    np.testing.assert_array_equal(got.text[:, :12], want.text)
    np.testing.assert_array_equal(got.codes[:, :12], want.codes)
    with pytest.raises(ValueError, match="cache_groups 11: expected at least the longest max_len"):
        generate(model, *prompt, gen, cache_groups=11)


def test_prompt_too_long_for_max_length(lm, prompt):
    _, model = lm
    with pytest.raises(ValueError, match="max_length"):
        generate(model, *prompt, GenerationConfig(max_length=6))


def test_unstacked_layers_generate_as_the_scanned_stack(lm, prompt):
    """On the CPU `MimoAudio.load` decodes with each stack's layers unstacked: the same tokens,
    greedy and sampled, and the same teacher-forced hidden states as the scanned stack."""
    config, model = lm
    loose = unstack_for_decoding(nnx.clone(model))
    assert isinstance(loose.model.layers, nnx.List)
    assert len(loose.model.layers) == config.num_hidden_layers
    assert not isinstance(model.model.layers, nnx.List)  # the shared fixture is left scanned
    text, codes = prompt
    for gen in (
        GenerationConfig(max_length=12),
        GenerationConfig(
            max_length=12,
            text_sampler=SamplerConfig(True, 0.9),
            patch_sampler=SamplerConfig(True, 0.9, 50, 0.95),
        ),
    ):
        want = generate(model, text, codes, gen, rng=jax.random.key(3))
        got = generate(loose, text, codes, gen, rng=jax.random.key(3))
        np.testing.assert_array_equal(got.text, want.text)
        np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_allclose(loose(text, codes), model(text, codes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "values",
    [{"temperature": float("nan")}, {"temperature": float("inf")}, {"top_p": float("nan")}],
    ids=["temperature nan", "temperature inf", "top_p nan"],
)
def test_sampler_values_that_are_not_numbers_are_refused(values):
    """Seen: SamplerConfig(temperature=nan) was accepted, and the generation emitted token 0
    forever."""
    with pytest.raises(ValueError, match=next(iter(values))):
        SamplerConfig(**values)


def test_max_length_past_the_lm_positions_is_refused(lm, prompt):
    """Seen: generate(max_length=10**9) started (still running after 300 s)."""
    _, model = lm
    limit = lm[0].max_positions
    with pytest.raises(ValueError, match=f"expected at most {limit}"):
        generate(model, *prompt, GenerationConfig(max_length=10**9))
