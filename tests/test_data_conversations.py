"""Conversation data: the hand-checked training sequence of every SFT format (ids, targets and
codes written out from SPEC §2.4's strings), its prompt part against the inference prompt of the
same request, the checks of a conversation, and tokenize from a conversation manifest to
documents."""

import json

import numpy as np
import pytest
import soundfile

from data_pipelines import conversations, tokenize
from data_pipelines.config import DataConfig
from data_pipelines.demo_text_tokenizer import word_level_tokenizer
from data_pipelines.encoders import EnergyEncoder
from data_pipelines.pipeline import Source, document_dataset
from data_pipelines.sequences import DocumentError, SequenceBuilder
from data_pipelines.shards import Record, ShardSet
from mimo_jax.tasks import requests, segments
from mimo_jax.tasks.segments import patchify
from mimo_jax.tasks.text_tokenizer import TextTokenizer
from mimo_jax.tokenizer import audio_io
from mimo_jax.tokenizer.config import TokenizerConfig

INSTRUCT_SYSTEM = "你需要根据指定的风格指令和文本内容来生成语音。"
VOICE_INSTRUCT_SYSTEM = (
    "你需要根据指定的风格指令和文本内容来生成和语音prompt具有相同音色的语音。你的音色应该是："
)
# The templates that record id "a1" picks (crc32 of the id modulo the list's length).
ASR_TEMPLATE = "Convert this speech recording to text"
TTS_TEMPLATE = "Create an audio version of this text"
WORDS = (
    "user assistant system Go w1(w9) Your voice should be: speech: "
    + ASR_TEMPLATE
    + " "
    + TTS_TEMPLATE
    + " text: "
    + " ".join(f"w{i}" for i in range(1, 10))
).split()
TOK = word_level_tokenizer(list(dict.fromkeys(WORDS + [INSTRUCT_SYSTEM, VOICE_INSTRUCT_SYSTEM])))
CFG = DataConfig(context_length=512)
EMPTY = np.array(CFG.empty_ids)
FRAMES = (np.arange(64 * 8).reshape(64, 8) * 7 % 1000).astype(np.int16)  # frame f of a record
F, T = False, True


def _build(task, conv, frames=0):
    rec = Record(id="a1", codes=FRAMES[:frames], task=task, meta={"conversation": conv})
    return SequenceBuilder(TOK, CFG).build(rec, "record")


def _check(doc, chunks, patches=()):
    """`chunks`: (tokens, supervised), tokens a space-separated string of special tokens and
    words, `P` a speech group; `patches`: the record frames of each speech group, in order."""
    text, target = [], []
    for tokens, supervised in chunks:
        ids = [TOK.empty_id if w == "P" else TOK.tokenizer.token_to_id(w) for w in tokens.split()]
        assert None not in ids, tokens
        text += ids
        target += [supervised] * len(ids)
    assert doc["text"].tolist() == text
    assert doc["target"].tolist() == target
    speech = doc["text"] == TOK.empty_id
    want = FRAMES[np.array(patches, int).reshape(-1, 4)]
    np.testing.assert_array_equal(doc["codes"][speech], want)
    assert (doc["codes"][~speech] == EMPTY).all()


def _turn(role, **keys):
    return {"role": role, **keys}


# ---- the hand-checked sequences of every format ------------------------------------------------
def test_asr():
    conv = {"messages": [_turn("user", audio=[0, 8]), _turn("assistant", text="w1 w2")]}
    _check(
        _build("asr", conv, 8),
        [
            (
                "<|im_start|> user <|sosp|> P P <|eosp|> Convert this speech recording to text "
                "<|im_end|> <|im_start|> assistant <think> </think>",
                F,
            ),
            ("w1 w2 <|im_end|>", T),
        ],
        [[0, 1, 2, 3], [4, 5, 6, 7]],
    )


def test_tts_pads_the_last_patch_with_the_last_frame():
    conv = {
        "messages": [_turn("user", text="Go w1"), _turn("assistant", text="Go w1", audio=[0, 6])]
    }
    _check(
        _build("tts", conv, 6),
        [
            (
                "<|im_start|> user Create an audio version of this text: Go w1 <|im_end|> "
                "<|im_start|> assistant",
                F,
            ),
            ("<|sostm|> Go w1 <|eot|> P P <|eostm|> <|im_end|>", T),
        ],
        [[0, 1, 2, 3], [4, 5, 5, 5]],
    )


def test_instruct_tts_with_reasoning_without_voice_prompt():
    conv = {
        "instruct": "w9",
        "messages": [
            _turn("user", text="Go w1"),
            _turn("assistant", text="w1 w2", audio=[0, 8], thinking="w5 w6"),
        ],
    }
    _check(
        _build("instruct_tts", conv, 8),
        [
            (
                f"<|im_start|> system {INSTRUCT_SYSTEM} <|im_end|> <|im_start|> user Create an "
                "audio version of this text: Go w1(w9) <|im_end|> <|im_start|> assistant <think>",
                F,
            ),
            ("w5 w6 </think> <|sostm|> w1 w2 <|eot|> P P <|eostm|> <|im_end|>", T),
        ],
        [[0, 1, 2, 3], [4, 5, 6, 7]],
    )


def test_instruct_tts_with_voice_prompt():
    conv = {
        "instruct": "w9",
        "prompt_speech": [0, 4],
        "messages": [_turn("user", text="Go w1"), _turn("assistant", text="w2", audio=[4, 8])],
    }
    _check(
        _build("instruct_tts", conv, 8),
        [
            (
                f"<|im_start|> system {VOICE_INSTRUCT_SYSTEM} <|sosp|> P <|eosp|> <|im_end|> "
                "<|im_start|> user Create an audio version of this text: Go w1(w9) <|im_end|> "
                "<|im_start|> assistant <think>",
                F,
            ),
            ("</think> <|sostm|> w2 <|eot|> P <|eostm|> <|im_end|>", T),
        ],
        [[0, 1, 2, 3], [4, 5, 6, 7]],
    )


@pytest.mark.parametrize(
    "thinking, opener, said",
    [
        (None, "<think> </think>", "w1 <|im_end|>"),
        (False, "<think> </think>", "w1 <|im_end|>"),
        (True, "<think>", "</think> w1 <|im_end|>"),
        ("w7 w8", "<think>", "w7 w8 </think> w1 <|im_end|>"),
    ],
)
def test_understanding_with_and_without_thinking(thinking, opener, said):
    answer = _turn("assistant", text="w1")
    if thinking is not None:
        answer["thinking"] = thinking
    conv = {"messages": [_turn("user", audio=[0, 4], text="w3 w4"), answer]}
    _check(
        _build("understanding", conv, 4),
        [
            (
                "<|im_start|> user <|sosp|> P <|eosp|> w3 w4 <|im_end|> <|im_start|> assistant "
                + opener,
                F,
            ),
            (said, T),
        ],
        [[0, 1, 2, 3]],
    )


def test_spoken_dialogue_single_turn_with_voice_and_system_prompt():
    conv = {
        "system_prompt": "w8 w9",
        "prompt_speech": [0, 4],
        "messages": [_turn("user", audio=[4, 8]), _turn("assistant", text="w1", audio=[8, 12])],
    }
    _check(
        _build("spoken_dialogue", conv, 12),
        [
            (
                "<|im_start|> system Your voice should be: <|sosp|> P <|eosp|> <|im_end|> "
                "<|im_start|> user w8 w9 <|sosp|> P <|eosp|> <|im_end|> <|im_start|> assistant",
                F,
            ),
            ("<|sostm|> w1 <|eot|> P <|eostm|> <|im_end|>", T),
        ],
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
    )


def test_spoken_dialogue_multi_turn_streams_every_assistant_turn():
    conv = {
        "system_prompt": "w9",
        "messages": [
            _turn("user", audio=[0, 4]),
            _turn("assistant", text="w1 w2 w3 w4 w5 w6", audio=[4, 28]),
            _turn("user", audio=[28, 32]),
            _turn("assistant", text="w7", audio=[32, 36]),
        ],
    }
    first_answer = [list(range(f, f + 4)) for f in range(4, 28, 4)]
    _check(
        _build("spoken_dialogue", conv, 36),
        [
            ("<|im_start|> user w9 <|sosp|> P <|eosp|> <|im_end|> <|im_start|> assistant", F),
            ("<|sostm|> w1 w2 w3 w4 w5 P P P P P w6 <|eot|> P <|eostm|> <|im_end|>", T),
            ("<|im_start|> user <|sosp|> P <|eosp|> <|im_end|> <|im_start|> assistant", F),
            ("<|sostm|> w7 <|eot|> P <|eostm|> <|im_end|>", T),
        ],
        [[0, 1, 2, 3], *first_answer, [28, 29, 30, 31], [32, 33, 34, 35]],
    )


def test_s2t_dialogue_single_and_multi_turn():
    single = {"messages": [_turn("user", audio=[0, 4]), _turn("assistant", text="w1")]}
    _check(
        _build("s2t_dialogue", single, 4),
        [
            (
                "<|im_start|> user <|sosp|> P <|eosp|> <|im_end|> <|im_start|> assistant "
                "<think> </think>",
                F,
            ),
            ("w1 <|im_end|>", T),
        ],
        [[0, 1, 2, 3]],
    )
    multi = {
        "messages": [
            *single["messages"],
            _turn("user", audio=[4, 8]),
            _turn("assistant", text="w2", thinking="w7"),
        ]
    }
    _check(
        _build("s2t_dialogue", multi, 8),
        [
            ("<|im_start|> user <|sosp|> P <|eosp|> <|im_end|> <|im_start|> assistant", F),
            ("w1 <|im_end|>", T),
            ("<|im_start|> user <|sosp|> P <|eosp|> <|im_end|> <|im_start|> assistant <think>", F),
            ("w7 </think> w2 <|im_end|>", T),
        ],
        [[0, 1, 2, 3], [4, 5, 6, 7]],
    )


def test_text_dialogue_single_and_multi_turn():
    single = {"messages": [_turn("user", text="w3"), _turn("assistant", text="w1")]}
    _check(
        _build("text_dialogue", single),
        [
            ("<|im_start|> user w3 <|im_end|> <|im_start|> assistant <think> </think>", F),
            ("w1 <|im_end|>", T),
        ],
    )
    multi = {
        "messages": [
            *single["messages"],
            _turn("user", text="w4"),
            _turn("assistant", text="w2", thinking=True),
        ]
    }
    _check(
        _build("text_dialogue", multi),
        [
            ("<|im_start|> user w3 <|im_end|> <|im_start|> assistant", F),
            ("w1 <|im_end|>", T),
            ("<|im_start|> user w4 <|im_end|> <|im_start|> assistant <think>", F),
            ("</think> w2 <|im_end|>", T),
        ],
    )


def test_plain_records_and_single_turn_conversations_make_the_same_documents():
    b = SequenceBuilder(TOK, CFG)
    plain = Record(id="a1", codes=FRAMES[:8], text="w1 w2", meta={"instruct": "w9"})
    user_audio = {"messages": [_turn("user", audio=[0, 8]), _turn("assistant", text="w1 w2")]}
    said = {
        "messages": [_turn("user", text="w1 w2"), _turn("assistant", text="w1 w2", audio=[0, 8])]
    }
    for task, conv in [
        ("asr", user_audio),
        ("tts", said),
        ("instruct_tts", {**said, "instruct": "w9"}),
    ]:
        want = b.build(plain, task)
        got = _build(task, conv, 8)
        for key in ("text", "codes", "target"):
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{task} {key}")


# ---- the prompt part is the inference prompt of the same request --------------------------------
def _patches(start, stop):
    return patchify(FRAMES[start:stop], CFG.group_size, CFG.audio_channels)


SAME_REQUEST = [
    (
        "asr",
        {"messages": [_turn("user", audio=[0, 8]), _turn("assistant", text="Hello there.")]},
        {"task": "asr", "input": _patches(0, 8), "template": ASR_TEMPLATE},
    ),
    (
        "tts",
        {
            "messages": [
                _turn("user", text="Good morning"),
                _turn("assistant", text="Good morning", audio=[0, 8]),
            ]
        },
        {"task": "tts", "input": "Good morning", "template": TTS_TEMPLATE},
    ),
    (
        "instruct_tts",
        {
            "instruct": "Slowly, in a low voice.",
            "prompt_speech": [0, 4],
            "messages": [
                _turn("user", text="Good morning"),
                _turn("assistant", text="Good morning", audio=[4, 12], thinking="Low, slow."),
            ],
        },
        {
            "task": "tts",
            "input": "Good morning",
            "template": TTS_TEMPLATE,
            "instruct": "Slowly, in a low voice.",
            "prompt_speech": _patches(0, 4),
        },
    ),
    (
        "instruct_tts",
        {
            "messages": [
                _turn("user", text="Say good morning, cheerfully."),
                _turn("assistant", text="Good morning!", audio=[0, 8]),
            ]
        },
        {"task": "tts", "input": "Say good morning, cheerfully.", "read_text_only": False},
    ),
    (
        "understanding",
        {
            "messages": [
                _turn("user", audio=[0, 8], text="What is said?"),
                _turn("assistant", text="A greeting.", thinking="Someone speaks."),
            ]
        },
        {
            "task": "understand",
            "input": _patches(0, 8),
            "input_text": "What is said?",
            "thinking": True,
        },
    ),
    (
        "spoken_dialogue",
        {
            "system_prompt": "Be brief.",
            "prompt_speech": [0, 4],
            "messages": [
                _turn("user", audio=[4, 8]),
                _turn("assistant", text="Hi, how are you today?", audio=[8, 36]),
                _turn("user", audio=[36, 40]),
                _turn("assistant", text="Fine.", audio=[40, 48]),
            ],
        },
        {
            "task": "dialogue",
            "system_prompt": "Be brief.",
            "prompt_speech": _patches(0, 4),
            "message_list": [
                {"role": "user", "content": _patches(4, 8)},
                {
                    "role": "assistant",
                    "content": {"text": "Hi, how are you today?", "audio": _patches(8, 36)},
                },
                {"role": "user", "content": _patches(36, 40)},
            ],
        },
    ),
    (
        "s2t_dialogue",
        {
            "messages": [
                _turn("user", audio=[0, 4]),
                _turn("assistant", text="Yes."),
                _turn("user", audio=[4, 8]),
                _turn("assistant", text="No.", thinking=False),
            ]
        },
        {
            "task": "s2t_dialogue",
            "message_list": [
                {"role": "user", "content": _patches(0, 4)},
                {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": _patches(4, 8)},
            ],
        },
    ),
    (
        "text_dialogue",
        {
            "messages": [
                _turn("user", text="Hi!"),
                _turn("assistant", text="Hello."),
                _turn("user", text="Bye."),
                _turn("assistant", text="Bye!", thinking="They leave."),
            ]
        },
        {
            "task": "text_dialogue",
            "thinking": True,
            "message_list": [
                {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye."},
            ],
        },
    ),
]


@pytest.mark.parametrize("task, conv, request_", SAME_REQUEST, ids=[c[0] for c in SAME_REQUEST])
def test_prompt_part_is_the_inference_prompt(fixtures_root, task, conv, request_):
    tok = TextTokenizer.from_file(str(fixtures_root / "tasks" / "text_tokenizer"))
    frames = max((stop for _, stop in conversations.audio_values(conv)), default=0)
    rec = Record(id="a1", codes=FRAMES[:frames], task=task, meta={"conversation": conv})
    doc = SequenceBuilder(tok, CFG).build(rec, "record")
    prompt = segments.assemble(requests.segments(request_), tok, CFG.group_size, CFG.empty_ids)
    n = prompt.groups
    np.testing.assert_array_equal(doc["text"][:n], prompt.text)
    np.testing.assert_array_equal(doc["codes"][:n], prompt.codes)
    # Supervised: the final answer (from the stream's <|sostm|> where the prompt opens one), not
    # the last user turn before it; before that only the past assistant turns (checked above).
    answer = n - int(prompt.text[-1] == tok.sostm_id)
    user = np.flatnonzero(prompt.text == tok.im_start_id)[-2]
    assert doc["target"][answer:].all() and not doc["target"][user:answer].any()
    assert doc["target"][:user].any() == any(
        m["role"] == "assistant" for m in conv["messages"][:-1]
    )


# ---- conversations a format cannot take ---------------------------------------------------------
USER_AUDIO, USER_TEXT = _turn("user", audio="q.wav"), _turn("user", text="Hi.")
SAID, SPOKEN = _turn("assistant", text="Yes."), _turn("assistant", text="Yes.", audio="a.wav")
BAD = [
    ("dance", [USER_TEXT, SAID], {}, "task 'dance': expected one of asr, tts, instruct_tts, "
     "understanding, spoken_dialogue, s2t_dialogue, text_dialogue"),
    ("asr", [], {}, "messages: [] is not a non-empty list of turns"),
    ("s2t_dialogue", [USER_AUDIO, USER_AUDIO, SAID], {},
     "messages[1] (user): a second user turn in a row; turns alternate, the user's first"),
    ("text_dialogue", [SAID, USER_TEXT, SAID], {},
     "messages[0] (assistant): the assistant speaks first; turns alternate, the user's first"),
    ("text_dialogue", [USER_TEXT, SAID, USER_TEXT], {},
     "messages[2] (user): the last turn is the user's; a conversation ends with what the "
     "assistant says"),
    ("asr", [USER_AUDIO, SAID, USER_AUDIO, SAID], {},
     "task asr has one turn each (a user turn, then the assistant's), not 4 messages"),
    ("text_dialogue", [_turn("system", text="Be brief."), USER_TEXT, SAID], {},
     "messages[0]: role 'system', expected user or assistant (the system and voice prompts are "
     "keys of the conversation)"),
    ("asr", [{**USER_AUDIO, "txt": "Hi."}, SAID], {},
     "messages[0] (user): unknown key 'txt' (asr user turns take audio)"),
    ("spoken_dialogue", [USER_AUDIO, {**SPOKEN, "thinking": True}], {},
     "messages[1] (assistant): unknown key 'thinking' (spoken_dialogue assistant turns take "
     "text, audio)"),
    ("asr", [_turn("user"), SAID], {},
     "messages[0] (user): no 'audio' (asr user turns take audio)"),
    ("spoken_dialogue", [USER_AUDIO, SAID], {},
     "messages[1] (assistant): no 'audio' (spoken_dialogue assistant turns take text, audio)"),
    ("tts", [_turn("user", text=" "), SPOKEN], {}, "messages[0].text: ' ' is empty"),
    ("asr", [_turn("user", audio=""), SAID], {}, "messages[0].audio: '' is not an audio file path"),
    ("s2t_dialogue", [USER_AUDIO, {**SAID, "thinking": False}, USER_AUDIO, SAID], {},
     "messages[1] (assistant): thinking only in the last turn (the official history has no think "
     "blocks)"),
    ("understanding", [{**USER_AUDIO, "text": "Who?"}, {**SAID, "thinking": 3}], {},
     "messages[1].thinking: 3 is not true, false or the reasoning text"),
    ("instruct_tts", [USER_TEXT, {**SPOKEN, "thinking": False}], {},
     "messages[1].thinking: instruct TTS always opens the think block (true or the reasoning "
     "text)"),
    ("tts", [USER_TEXT, SPOKEN], {"system_prompt": "Be brief."},
     "task tts takes no 'system_prompt'"),
    ("instruct_tts", [USER_TEXT, SPOKEN], {"system_prompt": "Be brief."},
     "task instruct_tts takes no 'system_prompt' (only instruct, prompt_speech)"),
    ("spoken_dialogue", [USER_AUDIO, SPOKEN], {"prompt_speech": 3},
     "prompt_speech: 3 is not an audio file path"),
]  # fmt: skip


@pytest.mark.parametrize("task, messages, keys, reason", BAD, ids=[b[3][:40] for b in BAD])
def test_check_names_the_message_and_the_reason(task, messages, keys, reason):
    with pytest.raises(conversations.ConversationError) as e:
        conversations.check(task, {"messages": messages, **keys})
    assert str(e.value) == reason


def test_builder_refuses_a_conversation_it_cannot_build():
    b = SequenceBuilder(TOK, CFG)
    conv = {"messages": [_turn("user", audio=[0, 8]), _turn("assistant", text="w1")]}
    rec = Record(id="c9", codes=FRAMES[:4], task="asr", meta={"conversation": conv})
    with pytest.raises(
        DocumentError,
        match=r"record c9: conversation: messages\[0\].audio: \[0, 8\] is not a span \[start, "
        r"stop\] of the record's 4 frames",
    ):
        b.build(rec, "record")
    with pytest.raises(DocumentError, match="record c9: a conversation of task asr, built as tts"):
        b.build(rec, "tts")
    with pytest.raises(DocumentError, match="record c9: task text_dialogue needs a conversation"):
        b.build(Record(id="c9", codes=FRAMES[:0], text="w1"), "text_dialogue")


# ---- tokenize: a conversation manifest to shards and documents ----------------------------------
AUDIO = TokenizerConfig()  # the released tokenizer's rates, as EnergyEncoder's


class CountingEncoder(EnergyEncoder):
    def __init__(self):
        super().__init__(8)
        self.batches = []

    def __call__(self, wavs):
        self.batches.append([len(w) for w in wavs])
        return super().__call__(wavs)


def _wavs(root, seconds: dict) -> dict:
    """Writes `name.wav` of each length; returns each one's EnergyEncoder codes."""
    codes = {}
    for i, (name, s) in enumerate(seconds.items()):
        wav = 0.1 * np.random.default_rng(i).standard_normal(int(s * 24000)).astype(np.float32)
        soundfile.write(root / f"{name}.wav", wav, 24000)
        read = audio_io.read_audio(str(root / f"{name}.wav"), 24000, min_samples=AUDIO.min_samples)
        codes[name] = EnergyEncoder(8)([read])[0]
    return codes


def test_tokenize_encodes_every_audio_and_reports_bad_conversations(tmp_path):
    codes = _wavs(tmp_path, {"voice": 0.45, "q1": 0.5, "a1": 0.7, "q2": 0.3, "a2": 0.6})
    spoken = {
        "id": "c1",
        "task": "spoken_dialogue",
        "system_prompt": "w9",
        "prompt_speech": "voice.wav",
        "speaker": "ann",
        "source": "studio",
        "messages": [
            _turn("user", audio="q1.wav"),
            _turn("assistant", text="w1 w2", audio="a1.wav"),
            _turn("user", audio="q2.wav"),
            _turn("assistant", text="w3", audio="a2.wav"),
        ],
    }
    text = {"id": "c2", "task": "text_dialogue", "messages": [USER_TEXT, SAID]}
    lines = [
        spoken,
        text,
        {"id": "c3", "task": "asr", "messages": [_turn("user", audio="q2.wav"), SAID]},
        {**spoken, "id": "c4", "prompt_speech": "gone.wav"},
        {"id": "c5", "task": "s2t_dialogue", "messages": [USER_AUDIO, USER_AUDIO, SAID]},
        {"audio": "a2.wav", "text": "w1 w2", "task": "asr"},
        {**text, "id": "c6", "messages": [USER_TEXT, {"role": "assistant"}]},
        {"task": "text_dialogue", "messages": [USER_TEXT, SAID]},
    ]
    manifest = tmp_path / "conversations.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = tokenize.parse_args(
        ["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--process-index", "0",
         "--process-count", "1"]
    )  # fmt: skip
    encoder = CountingEncoder()
    assert tokenize.run(args, encode=encoder) == 0

    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert errors == [
        {
            "line": 4,
            "audio": str(tmp_path / "gone.wav"),
            "reason": f"bad audio: {tmp_path / 'gone.wav'}: no such file",
        },
        {
            "line": 5,
            "audio": None,
            "reason": "conversation: messages[1] (user): a second user turn in a row; turns "
            "alternate, the user's first",
        },
        {
            "line": 7,
            "audio": None,
            "reason": "conversation: messages[1] (assistant): no 'text' (text_dialogue assistant "
            "turns take text, thinking)",
        },
        {
            "line": 8,
            "audio": None,
            "reason": "conversation: no 'id' (a conversation needs its id and task)",
        },
    ]
    # Every audio of the good lines in length-sorted batches; none of the failed line's.
    assert sorted(n for b in encoder.batches for n in b) == sorted(
        int(s * 24000) for s in (0.45, 0.5, 0.7, 0.3, 0.6, 0.3, 0.6)
    )
    assert all(b == sorted(b) for b in encoder.batches)

    recs = {r.id: r for r in ShardSet(str(tmp_path / "out"))}
    assert sorted(recs) == ["a2", "c1", "c2", "c3"]
    c1 = recs["c1"]
    order = ["voice", "q1", "a1", "q2", "a2"]
    np.testing.assert_array_equal(c1.codes, np.concatenate([codes[n] for n in order]))
    ends = np.cumsum([len(codes[n]) for n in order]).tolist()
    assert c1.meta == {
        "source": "studio",
        "conversation": {
            "system_prompt": "w9",
            "prompt_speech": [0, ends[0]],
            "messages": [
                _turn("user", audio=[ends[0], ends[1]]),
                _turn("assistant", text="w1 w2", audio=[ends[1], ends[2]]),
                _turn("user", audio=[ends[2], ends[3]]),
                _turn("assistant", text="w3", audio=[ends[3], ends[4]]),
            ],
        },
    }
    assert (c1.task, c1.speaker) == ("spoken_dialogue", "ann")
    assert c1.duration == pytest.approx(0.45 + 0.5 + 0.7 + 0.3 + 0.6, abs=1e-3)
    assert recs["c2"].frames == 0 and recs["c2"].meta["conversation"]["messages"][1] == SAID

    # The records read back become documents with every audio segment (DIR:record).
    docs = document_dataset(
        [Source(str(tmp_path / "out"), "record")], CFG, TOK, seed=0, num_epochs=1, shuffle=False
    )
    doc = next(d for d in docs if d["id"] == "c1")
    speech = doc["codes"][doc["text"] == TOK.empty_id]
    want = [patchify(codes[n], CFG.group_size, CFG.audio_channels) for n in order]
    np.testing.assert_array_equal(speech, np.concatenate(want))
    assert {d["id"] for d in docs} == {"a2", "c1", "c2", "c3"}


def test_an_audio_the_encoder_refuses_fails_its_conversation_alone(tmp_path):
    class Picky(CountingEncoder):  # refuses any batch holding a clip under 0.35 s
        def __call__(self, wavs):
            if any(len(w) < 0.35 * 24000 for w in wavs):
                raise ValueError("clip under 0.35 s")
            return super().__call__(wavs)

    _wavs(tmp_path, {"short": 0.3, "long": 0.6, "other": 0.5})
    lines = [
        {"id": "c1", "task": "asr", "messages": [_turn("user", audio="other.wav"), SAID]},
        {
            "id": "c2",
            "task": "s2t_dialogue",
            "messages": [
                _turn("user", audio="short.wav"),
                SAID,
                _turn("user", audio="long.wav"),
                SAID,
            ],
        },
    ]
    manifest = tmp_path / "conversations.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = tokenize.parse_args(
        ["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--max-batch", "1",
         "--process-index", "0", "--process-count", "1"]
    )  # fmt: skip
    encoder = Picky()
    assert tokenize.run(args, encode=encoder) == 0
    (error,) = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert error == {
        "line": 2,
        "audio": str(tmp_path / "short.wav"),
        "reason": "refused by the encoder (7200 samples at 24000 Hz): clip under 0.35 s",
    }
    # One clip a batch, the shortest first: the failed conversation's other audio is not encoded.
    assert encoder.batches == [[12000]]
    assert [r.id for r in ShardSet(str(tmp_path / "out"))] == ["c1"]
