"""Segments and their assembly; the training sequences use the inference prompt builders."""

import zlib

import numpy as np

from data_pipelines.config import DataConfig
from data_pipelines.demo_text_tokenizer import word_level_tokenizer
from data_pipelines.sequences import SequenceBuilder
from data_pipelines.shards import Record
from mimo_jax.tasks import prompts, templates
from mimo_jax.tasks.segments import Audio, Stream, Text, assemble, patchify

TOK = word_level_tokenizer([f"w{i}" for i in range(1, 21)])
CFG = DataConfig(context_length=256)


def _rec(frames, text, **kw):
    codes = (np.arange(frames * 8).reshape(frames, 8) % 97).astype(np.int16)
    return Record(id="r1", codes=codes, text=text, **kw)


def _assemble(segs):
    return assemble(segs, TOK, CFG.group_size, CFG.empty_ids)


def _pick(options):  # the sequence builder's choice for record "r1"
    return options[zlib.crc32(b"r1") % len(options)]


def test_patchify_repeats_last_frame():
    frames = np.arange(6 * 9).reshape(6, 9)  # 9 codebooks: only the first 8 are kept
    p = patchify(frames, 4, 8)
    assert p.shape == (2, 4, 8)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(p[1, k], frames[5, :8])


def test_assembled_stream_equals_the_training_stream():
    rec = _rec(27, "w1 w2 w3 w4 w5 w6 w7")
    doc = SequenceBuilder(TOK, CFG).build(rec, "interleave")
    got = _assemble([Stream(rec.text, patchify(rec.codes, 4, 8))])
    np.testing.assert_array_equal(got.text, doc["text"])
    np.testing.assert_array_equal(got.codes, doc["codes"])


def test_training_prompts_are_the_inference_prompts():
    """The unsupervised part of each SFT training sequence is the inference prompt (TTS: up to the
    stream, whose <|sostm|> the training sequence supervises)."""
    b = SequenceBuilder(TOK, CFG)
    rec = _rec(8, "w1 w2", meta={"instruct": "w9 w10"})
    patches = patchify(rec.codes, 4, 8)
    cases = {
        "asr": prompts.asr(patches, _pick(templates.ASR_TEMPLATES)),
        "tts": [
            prompts.tts_user_turn(rec.text, _pick(templates.TTS_TEMPLATES_EN)),
            Text(templates.ASSISTANT),
        ],
        "instruct_tts": prompts.tts(rec.text, _pick(templates.TTS_TEMPLATES_EN), "w9 w10"),
    }
    for task, segs in cases.items():
        doc = b.build(rec, task)
        want = _assemble(segs)
        n = int(np.argmax(doc["target"]))
        assert n == want.groups, task
        np.testing.assert_array_equal(doc["text"][:n], want.text, err_msg=task)
        np.testing.assert_array_equal(doc["codes"][:n], want.codes, err_msg=task)
    inference = _assemble(prompts.tts(rec.text, _pick(templates.TTS_TEMPLATES_EN)))
    training = b.build(rec, "tts")["text"]
    np.testing.assert_array_equal(inference.text, training[: inference.groups])


def test_continuation_prompt_is_the_training_sequence_without_its_end():
    rec = _rec(9, "")
    doc = SequenceBuilder(TOK, CFG).build(rec, "continuation")
    prompt = _assemble(prompts.continuation(patchify(rec.codes, 4, 8)))
    np.testing.assert_array_equal(prompt.text, doc["text"][:-1])
    np.testing.assert_array_equal(prompt.codes, doc["codes"][:-1])
    assert doc["text"][-1] == TOK.eosp_id and prompt.text[0] == TOK.sosp_id


def test_input_ids_layout():
    patches = np.arange(2 * 4 * 8).reshape(2, 4, 8)
    p = _assemble([Text("w1"), Audio(patches)])
    ids = p.input_ids()
    assert ids.shape == (9, 5 * 4)
    assert ids[0, ::4].tolist() == [
        TOK.encode("w1")[0],
        TOK.sosp_id,
        TOK.empty_id,
        TOK.empty_id,
        TOK.eosp_id,
    ]
    assert (ids[0].reshape(-1, 4)[:, 1:] == -100).all()
    np.testing.assert_array_equal(ids[1:, 8:16].T, patches.reshape(8, 8))
    np.testing.assert_array_equal(ids[1:, :4].T, np.tile(CFG.empty_ids, (4, 1)))


def test_pretraining_few_shot_and_audio_qa_layouts():
    speech = np.zeros((1, 4, 8), np.int64)
    out = {"text": "w3", "audio": speech}
    # every item speech: <Spe>:, inputs as audio segments, speech outputs as streams
    segs = prompts.few_shot([(speech, out)], speech, speech_output=True)
    assert [type(s).__name__ for s in segs] == [
        "Text",
        "Audio",
        "Text",
        "Stream",
        "Text",
        "Audio",
        "Text",
        "Text",
    ]
    assert segs[0].text == prompts.SPEECH_ONLY and segs[-1].text == prompts.STREAM_OPEN
    # speech and text mixed: [Int]:, no stream opener for a text answer
    segs = prompts.few_shot([(speech, "w1")], speech, speech_output=False)
    assert segs[0].text == prompts.INSTRUCTION and segs[-1].text == "\n"
    qa = _assemble(prompts.audio_qa(speech, "w2"))
    assert qa.text[0] == TOK.encode(prompts.INSTRUCTION)[0] and TOK.sosp_id in qa.text
    assert W2 in qa.text.tolist()


def test_few_shot_keeps_its_examples_in_order():
    # Text items: the whole prompt by hand (SPEC §2.4's layout, one example after the other).
    segs = prompts.few_shot([("w1", "w2"), ("w3", "w4"), ("w5", "w6")], "w7", speech_output=False)
    assert all(isinstance(s, Text) for s in segs)
    assert "".join(s.text for s in segs) == (
        f"{prompts.INSTRUCTION}w1\nw2 \n\nw3\nw4 \n\nw5\nw6 \n\nw7\n"
    )
    # Speech items: inputs as audio, outputs as streams, each where its example puts it.
    a, b, q = (np.full((1, 4, 8), i, np.int64) for i in range(3))
    segs = prompts.few_shot(
        [(a, {"text": "w1", "audio": a}), (b, {"text": "w2", "audio": b})], q, speech_output=True
    )
    media = [(type(s).__name__, int(s.patches[0, 0, 0])) for s in segs if not isinstance(s, Text)]
    assert media == [("Audio", 0), ("Stream", 0), ("Audio", 1), ("Stream", 1), ("Audio", 2)]
    assert [s.text for s in segs if isinstance(s, Stream)] == ["w1", "w2"]


W2 = TOK.tokenizer.token_to_id("w2")
