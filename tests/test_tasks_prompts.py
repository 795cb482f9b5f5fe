"""Task prompts against the official builders on the tasks/ fixture: prompt ids for every case
(from the fixture's audio codes, and end to end from its audio through our tokenizer)."""

import numpy as np
import pytest

from mimo_jax.tasks import prompts, requests, segments, templates
from mimo_jax.tasks.audio import AudioFrontEnd
from mimo_jax.tokenizer.audio_tokenizer import Tokenizer


def _prompt(fx, req, history, patches_of):
    segs = requests.segments(req, history=history)
    segs = segments.with_audio(segs, [patches_of(a) for a in segments.audio_inputs(segs)])
    return segments.assemble(segs, fx.tok, fx.group_size, fx.empty_ids)


def test_every_case_from_reference_codes(fx):
    assert fx.cases
    for case in fx.cases.values():
        req, history = fx.request(case)
        prompt = _prompt(fx, req, history, lambda a: fx.reference_patches(case, a))
        want = fx.ref[f"{case['name']}__input_ids"]
        assert prompt.groups == case["groups"], case["name"]
        np.testing.assert_array_equal(prompt.input_ids(), want, err_msg=case["name"])


@pytest.fixture(scope="module")
def front_end(fx, fixtures_root):
    tokenizer = Tokenizer.load(str(fx.dir / fx.meta["audio_tokenizer"]))
    return AudioFrontEnd(tokenizer, fx.group_size, fx.channels)


def test_every_case_end_to_end_from_audio(fx, front_end):
    for case in fx.cases.values():
        req, history = fx.request(case)
        segs = requests.segments(req, history=history)
        audio = segments.audio_inputs(segs)
        patches = front_end.patches(audio)
        for a, got in zip(audio, patches):  # each input's codes first, then the whole prompt
            np.testing.assert_array_equal(
                got, fx.reference_patches(case, a), err_msg=f"{case['name']}: {fx.source(a)}"
            )
        prompt = segments.assemble(
            segments.with_audio(segs, patches), fx.tok, fx.group_size, fx.empty_ids
        )
        np.testing.assert_array_equal(
            prompt.input_ids(), fx.ref[f"{case['name']}__input_ids"], err_msg=case["name"]
        )


def test_template_choice_is_explicit_or_seeded(fx):
    for case in fx.cases.values():
        if "template" not in case:
            continue
        req, _ = fx.request(case)
        options = (
            prompts.tts_templates(req["input"]) if req["task"] == "tts" else templates.ASR_TEMPLATES
        )
        assert len(options) == case["template"]["of"], case["name"]
        assert options[case["template"]["index"]] == case["template"]["value"], case["name"]
    draws = {prompts.choose_template(templates.ASR_TEMPLATES, seed=s) for s in range(50)}
    assert len(draws) > 1
    assert all(
        prompts.choose_template(templates.ASR_TEMPLATES, seed=7)
        == prompts.choose_template(templates.ASR_TEMPLATES, seed=7)
        for _ in range(3)
    )


def test_text_preprocessing_matches_the_fixture(fx):
    changed = [p for c in fx.cases.values() for p in c.get("preprocessed_text", [])]
    assert changed
    for p in changed:
        assert prompts.normalize_text(p["given"]) == p["returned"]
    assert prompts.normalize_text("今天天气很好") == "今天天气很好"
    assert prompts.normalize_text("Mixed Case stays") == "Mixed Case stays"
