"""The Python API (`MimoAudio`) on the tasks/ fixture: every fixture generation end to end from
its request (audio through our tokenizer), a batch of mixed requests equal to each request alone,
the official multi-turn history, and a checkpoint whose special ids disagree with the tokenizer;
requests of any task and settings sharing the generation programs, bad fields refused before
anything runs, the context bounded by the LM's positions."""

import dataclasses
import re

import numpy as np
import pytest

from mimo_jax.inference.mimo_audio import TASK_SAMPLERS, MimoAudio
from mimo_jax.inference.sampling import SamplerConfig
from mimo_jax.lm.layout import to_official
from mimo_jax.tasks import outputs
from mimo_jax.tasks.requests import MAX_GROUPS, RequestError


def _greedy(fx, gen):
    req, _ = fx.request(fx.cases[gen["case"]])
    return {
        **req,
        "greedy": True,
        "min_new_groups": gen["min_new_tokens"],
        "max_new_groups": gen["max_new_tokens"],
    }


def test_fixture_generations_end_to_end(fx, mimo):
    for gen in fx.meta["generations"]:
        name = gen["case"]
        [r] = mimo.run([_greedy(fx, gen)])
        p = r.prompt_groups
        assert p == gen["prompt_groups"] and r.generated_groups == gen["generated_groups"], name
        ids = r.sequence.input_ids()
        want = fx.ref[f"{name}__generated_ids"]
        np.testing.assert_array_equal(ids[:, : p * fx.group_size], want[:, : p * fx.group_size])
        got = to_official(r.sequence.text[None, p:], r.sequence.codes[None, p:])[0]
        np.testing.assert_array_equal(got, want[:, p * fx.group_size :], err_msg=name)
        assert r.text == gen["text"], name
        if r.speech is None:  # a text task: the official forward would still extract speech
            assert r.request["task"] == "asr" and r.wav is None
            speech = outputs.speech_of(
                r.sequence.text[p:],
                r.sequence.codes[p:],
                fx.empty_ids,
                fx.tok.sostm_id,
                fx.tok.eostm_id,
            )
            r.wav = outputs.wav_of(mimo.audio.tokenizer, speech)
            r.speech = speech
        np.testing.assert_array_equal(r.speech.T, fx.ref[f"{name}__speech_codes"], err_msg=name)
        np.testing.assert_allclose(r.wav, fx.ref[f"{name}__wav"], atol=1e-4, err_msg=name)


def _same(a, b):
    np.testing.assert_array_equal(a.sequence.text, b.sequence.text)
    np.testing.assert_array_equal(a.sequence.codes, b.sequence.codes)
    assert a.text == b.text
    if a.wav is not None:
        np.testing.assert_allclose(a.wav, b.wav, atol=1e-5)


def test_mixed_batch_equals_each_request_alone(fx, mimo):
    opts = {"greedy": True, "min_new_groups": 2, "max_new_groups": 6}
    q1, q2 = fx.wavs["q1"], fx.wavs["q2"]
    batch = [
        {
            "task": "tts",
            "input": "Good night, sleep well.",
            "template": "Read this content out loud",
        },
        {"task": "asr", "input": q1, "template": "Transcribe this voice recording"},
        {"task": "tts", "input": "今天天气很好，我们去海边散步吧。", "template": "请朗读这段内容"},
        {"task": "asr", "input": q2, "template": "Transcribe this voice recording"},
    ]
    batch = [{**r, **opts} for r in batch]
    together = mimo.run(batch)
    assert len({r.prompt_groups for r in together if r.request["task"] == "asr"}) == 2
    assert len({r.prompt_groups for r in together if r.request["task"] == "tts"}) == 2
    for req, got in zip(batch, together):
        [alone] = mimo.run([req])
        _same(got, alone)


def test_dialogue_history_appends_the_next_turn_to_the_whole_sequence(fx, mimo):
    case = fx.cases["spoken_dialogue_sft_history"]
    req, history = fx.request(case)
    assert history
    first_req = {k: v for k, v in req.items() if k != "input"}
    first_req["input"] = fx.wavs["q1"]
    opts = {"greedy": True, "max_new_groups": 4}
    [first] = mimo.dialogue([{**first_req, **opts}])
    [second] = mimo.dialogue([{**req, **opts}], history=[first])
    turn = second.sequence.input_ids()[:, first.sequence.groups * fx.group_size :]
    turn = turn[:, : case["groups"] * fx.group_size]
    np.testing.assert_array_equal(turn, fx.ref[f"{case['name']}__input_ids"])
    np.testing.assert_array_equal(
        second.sequence.text[: first.sequence.groups], first.sequence.text
    )
    assert second.prompt_groups == first.sequence.groups + case["groups"]


def test_sampler_presets_are_the_official_ones(mimo):
    tts_text, tts_patch = mimo.task_sampler_configs["tts"]
    assert (tts_text.do_sample, tts_text.temperature, tts_text.top_k, tts_text.top_p) == (
        True,
        0.6,
        None,
        1.0,
    )
    assert (tts_patch.temperature, tts_patch.top_p) == (0.9, 0.95)
    assert not mimo.task_sampler_configs["asr"][0].do_sample
    assert TASK_SAMPLERS["default"][0].top_k == 50


def test_checkpoint_whose_special_ids_disagree_is_refused(fx, mimo):
    config = dataclasses.replace(
        mimo.config, sostm_idx=mimo.config.sostm_idx + 1, eot_idx=mimo.config.eot_idx + 1
    )
    with pytest.raises(ValueError, match=r"sostm_idx=.*<\|sostm\|>.*eot_idx=.*<\|eot\|>"):
        MimoAudio(config, mimo.model, mimo.audio.tokenizer, fx.tok)


def test_continue_speech_extends_the_given_audio(fx, mimo):
    [r] = mimo.continue_speech([{"input": fx.wavs["q1"], "greedy": True, "max_new_groups": 4}])
    prompt = r.sequence.text[: r.prompt_groups]
    assert prompt[0] == fx.tok.sosp_id and fx.tok.eosp_id not in prompt.tolist()
    assert (prompt[1:] == fx.tok.empty_id).all()
    new = r.sequence.text[r.prompt_groups :].tolist()
    frames = sum(fx.group_size for t in new[:-1] if t == fx.tok.empty_id)
    end = new.index(fx.tok.eosp_id) if fx.tok.eosp_id in new else len(new) - 1
    assert r.speech.shape[0] == fx.group_size * new[:end].count(fx.tok.empty_id) <= frames
    per_frame = mimo.audio.tokenizer.config.samples_per_code
    assert r.wav.shape[0] == (r.speech.shape[0] * per_frame or mimo.audio.rate)


def test_requests_of_any_task_and_settings_share_the_generation_programs(fx, mimo):
    """Seen: 23 requests of mixed tasks (7 valid) took 6.5 minutes on the demo model, a compile
    per task and shape, while 25 identical TTS requests took 20 s. Requests of different tasks,
    samplers, stop ids and lengths now share one batch, and the next batch of the same shape
    reuses its programs whatever its settings and lengths (its KV cache is a multiple of
    LENGTH_QUANTUM groups)."""
    from mimo_jax.inference import generation_loop as programs

    def tts(text, **kw):
        return {"task": "tts", "input": text, "template": "Read this content out loud", **kw}

    def chat(text, **kw):
        return {"task": "text_dialogue", "input": text, **kw}

    first = [tts("Good night, sleep well.", min_new_groups=2), chat("How are you today?")]
    second = [tts("See you tomorrow."), chat("What is the capital of France?", min_new_groups=3)]
    programs._prefill_jit.clear_cache()
    programs._advance_jit.clear_cache()
    done = mimo.run([{**r, "max_new_groups": 6} for r in first])
    assert max(r.prompt_groups for r in done) == 32  # prompts of one width bucket in both calls
    assert programs._prefill_jit._cache_size() == programs._advance_jit._cache_size() == 1
    other = SamplerConfig(True, 0.9, None, 0.8)  # other temperatures and top-p, a draw as before
    done = mimo.run([{**r, "max_new_groups": 9} for r in second], text_sampler=other)
    assert max(r.prompt_groups for r in done) <= 32
    assert programs._prefill_jit._cache_size() == programs._advance_jit._cache_size() == 1


def test_a_bad_field_is_a_request_error_before_anything_runs(fx, mimo, monkeypatch):
    """Seen: the Python API raised OverflowError for "seed": 1208925819614629174706176, minutes
    into the run, not RequestError; min_new_groups > max_new_groups was accepted."""

    def generate_batch(*args):
        raise AssertionError("a batch ran before every request was checked")

    monkeypatch.setattr(MimoAudio, "_generate", generate_batch)
    good = {"task": "tts", "input": "Hi.", "max_new_groups": 2}
    for bad, want in (
        ({"seed": 2**80}, "seed: 1208925819614629174706176 is not an integer in [0, 2**32)"),
        ({"min_new_groups": 5}, "min_new_groups 5 is more than max_new_groups 2"),
    ):
        with pytest.raises(RequestError, match=re.escape(want)):
            mimo.run([good, {**good, **bad}])


def test_the_context_ends_at_the_lm_positions(fx, mimo):
    """Seen: generation took any max_length (10**9: still running after 300 s). The context is
    at most the LM's max_position_embeddings, by default and when asked for."""
    limit = mimo.config.max_positions
    assert limit is not None and mimo.context_groups == min(MAX_GROUPS, limit)
    with pytest.raises(ValueError, match=f"expected 1 to {limit} .*max_position_embeddings"):
        MimoAudio(mimo.config, mimo.model, mimo.audio.tokenizer, fx.tok, context_groups=10**9)
