"""Generated ids -> text, speech codes and WAV as the official `forward`, and greedy generation of
the tasks/ fixture's cases token for token, from its prompts."""

import numpy as np
import pytest
from tasks_support import TASK_OF_GENERATION, fixture_lm, generated_groups

from mimo_jax.inference.generation_loop import GenerationConfig, generate
from mimo_jax.lm.layout import from_official, to_official
from mimo_jax.tasks import outputs, requests
from mimo_jax.tokenizer.audio_tokenizer import Tokenizer


@pytest.fixture(scope="module")
def audio_tokenizer(fx):
    return Tokenizer.load(str(fx.dir / fx.meta["audio_tokenizer"]))


@pytest.fixture(scope="module")
def lm(fx):
    return fixture_lm(fx)


def _stop_ids(fx, spec):
    return [fx.tok.eos_id] + [fx.tok.special_id(t) for t in spec.stop_tokens]


def test_stop_ids_are_the_official_wrappers(fx):
    assert fx.meta["generations"]
    for gen in fx.meta["generations"]:
        spec = requests.TASKS[TASK_OF_GENERATION[gen["task_name"]]]
        assert _stop_ids(fx, spec) == gen["stop_ids"], gen["case"]


def test_text_speech_and_wav_from_the_generated_ids(fx, audio_tokenizer):
    for gen in fx.meta["generations"]:
        name = gen["case"]
        text, codes = generated_groups(fx, gen)
        assert text.size == gen["generated_groups"], name
        assert outputs.text_of(fx.tok, text) == gen["text"], name
        spec = requests.TASKS[TASK_OF_GENERATION[gen["task_name"]]]
        start = fx.tok.special_id(spec.speech_start) if spec.speech_start else None
        frames = outputs.speech_of(
            text, codes, fx.empty_ids, start, fx.tok.special_id(spec.speech_end)
        )
        np.testing.assert_array_equal(frames.T, fx.ref[f"{name}__speech_codes"], err_msg=name)
        assert frames.shape[0] == gen["speech_frames"], name
        wav = outputs.wav_of(audio_tokenizer, frames)
        assert wav.shape == (gen["wav_samples"],), name
        np.testing.assert_allclose(wav, fx.ref[f"{name}__wav"], atol=1e-4, err_msg=name)


def test_no_speech_gives_one_second_of_zeros(fx, audio_tokenizer):
    wav = outputs.wav_of(audio_tokenizer, np.zeros((0, fx.channels), np.int64))
    assert wav.shape == (audio_tokenizer.config.sampling_rate,) and not wav.any()


def test_greedy_generation_from_the_reference_prompts(fx, lm):
    config, model = lm
    for gen in fx.meta["generations"]:
        name, p = gen["case"], gen["prompt_groups"]
        spec = requests.TASKS[TASK_OF_GENERATION[gen["task_name"]]]
        text, codes = from_official(fx.ref[f"{name}__input_ids"][None], config.group_size)
        assert text.shape[1] == p, name
        out = generate(
            model,
            text,
            codes,
            GenerationConfig(
                max_length=p + gen["max_new_tokens"],
                min_length=p + gen["min_new_tokens"],
                stop_ids=tuple(_stop_ids(fx, spec)),
            ),
        )
        length = int(out.lengths[0])
        assert length - p == gen["generated_groups"], name
        want = fx.ref[f"{name}__generated_ids"]
        got = to_official(out.text[:, p:length], out.codes[:, p:length])[0]
        np.testing.assert_array_equal(got, want[:, p * config.group_size :], err_msg=name)
