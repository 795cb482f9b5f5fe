"""Text tokenizer, task sequence builders, delayed patch targets and loss weights on hand-checked
examples."""

import pickle

import numpy as np
import pytest
import tokenizers

from data_pipelines.config import DataConfig
from data_pipelines.demo_text_tokenizer import (
    tokenizer_digest,
    train_demo_tokenizer,
    word_level_tokenizer,
)
from data_pipelines.packing import example_from_document
from data_pipelines.sequences import DocumentError, SequenceBuilder
from data_pipelines.shards import Record
from experiments.configs.demo import demo_hf
from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.tasks.segments import patchify
from mimo_jax.tasks.text_tokenizer import SPECIAL_TOKENS, TextTokenizer

WORDS = [f"w{i}" for i in range(1, 21)]
TOK = word_level_tokenizer(WORDS)
W = {w: TOK.tokenizer.token_to_id(w) for w in WORDS}
S = {t: TOK.special_id(t) for t in SPECIAL_TOKENS}
E = S["<|empty|>"]
EMPTY = np.array([1024, 1024, 128, 128, 128, 128, 128, 128])
CFG = DataConfig(context_length=256, empty_text_weight=0.01)


def _rec(frames, text="", **kw):
    codes = (np.arange(frames * 8).reshape(frames, 8) % 97).astype(np.int16)
    return Record(id="r1", codes=codes, text=text, **kw)


def _words(n, start=1):
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_text_tokenizer_special_ids_and_missing_token():
    assert S["<|endoftext|>"] == 0 and TOK.pad_id == 0 and TOK.empty_id == E
    assert TOK.encode("w1 <|eot|>w2") == [W["w1"], S["<|eot|>"], W["w2"]]
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<|sosp|>": 1}, unk_token="a"))
    with pytest.raises(KeyError, match=r"special token '<\|endoftext\|>' is missing"):
        TextTokenizer(bare, "bare.json")
    clone = pickle.loads(pickle.dumps(TOK))
    assert clone.encode("w3 w4") == TOK.encode("w3 w4") and clone.eot_id == TOK.eot_id


def test_demo_tokenizer_is_deterministic_and_has_all_special_tokens(tmp_path):
    sentences = [
        "the cat sat on the mat",
        "a dog ran in the park",
        "der Hund läuft schnell",
        "今天天气很好",
    ] * 3
    a, b = train_demo_tokenizer(sentences, 400), train_demo_tokenizer(sentences, 400)
    assert tokenizer_digest(a) == tokenizer_digest(b)
    for t in SPECIAL_TOKENS:
        assert a.encode(t) == [a.special_id(t)]
    a.save(str(tmp_path / "tokenizer.json"))
    c = TextTokenizer.from_file(str(tmp_path))
    text = "the cat<|eot|> 今天 Ünknown"
    assert c.encode(text) == a.encode(text) and c.decode(c.encode(text)) == text


def test_continuation_document_and_weights():
    b = SequenceBuilder(TOK, CFG)
    doc = b.build(_rec(7), "continuation")
    assert doc["text"].tolist() == [S["<|sosp|>"], E, E, S["<|eosp|>"]]
    np.testing.assert_array_equal(doc["codes"][0], np.tile(EMPTY, (4, 1)))
    np.testing.assert_array_equal(doc["codes"][1:3], patchify(_rec(7).codes, 4, 8))
    np.testing.assert_array_equal(doc["codes"][3], np.tile(EMPTY, (4, 1)))
    ex = example_from_document(doc, CFG, E, TOK.pad_id)
    assert ex["text_targets"].tolist() == [E, E, S["<|eosp|>"], TOK.pad_id]
    # relative weights (the loss applies the loss weights): 0.01 for an <|empty|> target
    np.testing.assert_allclose(ex["text_weights"], [0.01, 0.01, 1.0, 0.0])
    np.testing.assert_array_equal(ex["code_targets"][:2], doc["codes"][1:3])
    np.testing.assert_array_equal(ex["code_targets"][2:], np.tile(EMPTY, (2, 4, 1)))
    np.testing.assert_array_equal(ex["code_weights"], [[1] * 8] * 2 + [[0] * 8] * 2)
    assert ex["segment_ids"].tolist() == [1] * 4 and ex["positions"].tolist() == [0, 1, 2, 3]
    assert ex["codes"].dtype == np.int32 and ex["code_weights"].dtype == np.float32


def test_empty_text_weight_scales_only_empty_targets():
    cfg = DataConfig(empty_text_weight=0.5)
    doc = SequenceBuilder(TOK, cfg).build(_rec(7), "continuation")
    ex = example_from_document(doc, cfg, E, TOK.pad_id)
    np.testing.assert_allclose(ex["text_weights"], [0.5, 0.5, 1.0, 0.0])


def test_interleave_5_to_5_text_longer_than_speech():
    rec = _rec(27, _words(12))  # 7 patches (27 frames + 1 repeated)
    doc = SequenceBuilder(TOK, CFG).build(rec, "interleave")
    w = lambda *ids: [W[f"w{i}"] for i in ids]  # noqa: E731
    assert doc["text"].tolist() == (
        [S["<|sostm|>"]]
        + w(1, 2, 3, 4, 5)
        + [E] * 5
        + w(6, 7, 8, 9, 10)
        + [E] * 2
        + w(11, 12)
        + [S["<|eot|>"], S["<|eostm|>"]]
    )
    patches = patchify(rec.codes, 4, 8)
    np.testing.assert_array_equal(doc["codes"][6:11], patches[:5])
    np.testing.assert_array_equal(doc["codes"][16:18], patches[5:])
    assert doc["target"].all()


def test_interleave_speech_longer_than_text():
    rec = _rec(48, _words(3))  # 12 patches
    doc = SequenceBuilder(TOK, CFG).build(rec, "interleave")
    assert doc["text"].tolist() == (
        [S["<|sostm|>"], W["w1"], W["w2"], W["w3"], S["<|eot|>"]] + [E] * 12 + [S["<|eostm|>"]]
    )
    np.testing.assert_array_equal(doc["codes"][5:17], patchify(rec.codes, 4, 8))


def test_interleave_exactly_five_tokens_puts_eot_in_first_chunk():
    doc = SequenceBuilder(TOK, CFG).build(_rec(40, _words(5)), "interleave")
    assert doc["text"][:8].tolist() == [S["<|sostm|>"]] + [W[f"w{i}"] for i in range(1, 6)] + [
        S["<|eot|>"],
        E,
    ]


def _supervised_tail(task, tail):
    """A two-word record built as `task`: its text ends in `tail`, and only `tail` is a target."""
    doc = SequenceBuilder(TOK, CFG).build(_rec(8, "w1 w2"), task)
    text = doc["text"].tolist()
    start = text.index(tail[0])
    assert text[start:] == tail
    assert not doc["target"][:start].any() and doc["target"][start:].all()
    return doc, text, start


def test_asr_supervises_only_the_answer():
    doc, text, answer = _supervised_tail("asr", [W["w1"], W["w2"], S["<|im_end|>"]])
    # "\n" is <unk> in the word tokenizer
    assert text[:2] == [S["<|im_start|>"], TOK.tokenizer.token_to_id("<unk>")]
    assert text[2:6] == [S["<|sosp|>"], E, E, S["<|eosp|>"]]
    assert S["<think>"] in text[:answer] and S["</think>"] in text[:answer]
    ex = example_from_document(doc, CFG, E, TOK.pad_id)
    supervised = np.flatnonzero(ex["text_weights"])
    assert supervised.tolist() == list(range(answer - 1, len(text) - 1))
    assert not ex["code_weights"].any()  # speech of the prompt is not a target


def test_tts_stream_is_supervised_and_patches_get_code_weights():
    # The word tokenizer drops "\n".
    stream = [S["<|sostm|>"], W["w1"], W["w2"], S["<|eot|>"], E, E, S["<|eostm|>"]]
    doc, text, start = _supervised_tail("tts", stream + [S["<|im_end|>"]])
    ex = example_from_document(doc, CFG, E, TOK.pad_id)
    speech = [start + 4, start + 5]
    assert np.flatnonzero(ex["code_weights"][:, 0]).tolist() == [s - 1 for s in speech]
    np.testing.assert_array_equal(ex["code_targets"][start + 3], doc["codes"][start + 4])


def test_instruct_tts_caption_and_text_tasks():
    b = SequenceBuilder(TOK, CFG)
    rec = _rec(8, "w1 w2", meta={"instruct": " w9 w10 ", "caption": "w7 w8"})
    doc = b.build(rec, "instruct_tts")
    text = doc["text"].tolist()
    assert text[:1] == [S["<|im_start|>"]] and W["w9"] in text and S["<|sostm|>"] in text
    first_target = int(np.argmax(doc["target"]))
    assert text[first_target : first_target + 2] == [S["</think>"], S["<|sostm|>"]]
    assert text[first_target - 1] == S["<think>"] and W["w10"] in text[:first_target]
    cap = b.build(rec, "caption")["text"].tolist()
    assert cap[-3:] == [W["w7"], W["w8"], S["<|im_end|>"]]
    txt = b.build(_rec(0, "w3 w4 w5"), "text")
    assert txt["text"].tolist() == [W["w3"], W["w4"], W["w5"], TOK.pad_id] and txt[
        "codes"
    ].shape == (4, 4, 8)
    assert b.build(_rec(4, "w3", task="text"), "record")["text"].tolist() == [W["w3"], TOK.pad_id]


def test_builder_errors_name_record_and_reason():
    b = SequenceBuilder(TOK, CFG)
    with pytest.raises(DocumentError, match="record r1: task needs audio codes"):
        b.build(_rec(0, "w1"), "tts")
    with pytest.raises(DocumentError, match="record r1: task instruct_tts needs meta.instruct"):
        b.build(_rec(4, "w1"), "instruct_tts")
    with pytest.raises(DocumentError, match="record r1: task asr needs a text answer"):
        b.build(_rec(4, ""), "asr")
    with pytest.raises(DocumentError, match="unknown task 'dance'"):
        b.build(_rec(4, "w1"), "dance")


def test_layout_comes_from_the_model_config():
    model = MiMoAudioConfig.from_hf(demo_hf(smoke=True))
    cfg = DataConfig.for_model(model, {"context_length": 32, "sources": "ignored", "batch_size": 2})
    assert (cfg.group_size, cfg.audio_channels) == (model.group_size, model.audio_channels)
    assert cfg.empty_ids == tuple(model.speech_empty_ids) and cfg.context_length == 32
    with pytest.raises(ValueError, match=r"2 empty ids \(1, 2\) for 8 audio channels"):
        DataConfig(empty_ids=(1, 2))
