"""Prompt builders of every task of the official `mimo_audio.py`, as lists of segments
(`mimo_jax.tasks.segments`).

The same builders make the inference prompts and the prompt part of the training sequences
(`data_pipelines.sequences`), so the two cannot drift apart; the chat prompts are made of turns
(`user_turn`, `reply`, `answer`) that the training conversations (`data_pipelines.conversations`)
lay out with the same functions. Audio arguments are patches
[P, group_size, channels] (`audio.AudioFrontEnd` makes them from waveforms or files, as the
official `preprocess_input`). Where the official code draws a template with `random.choice`, the
builder takes the template text itself; `choose_template` makes that choice, seedable.
"""

from __future__ import annotations

import random

from mimo_jax.tasks import templates as t
from mimo_jax.tasks.segments import Audio, Segment, Stream, Text

STREAM_OPEN = "<|sostm|>"
INSTRUCTION = "[Int]:"
SPEECH_ONLY = "<Spe>:"


def choose_template(
    options: tuple[str, ...], template: str | None = None, seed: int | random.Random | None = None
) -> str:
    """`template` itself when given, else a draw from `options` (seeded by `seed`)."""
    if template is not None:
        if not template:
            raise ValueError("template: empty text, expected one of the task's templates or None")
        return template
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return rng.choice(options)


def tts_templates(text: str) -> tuple[str, ...]:
    """The official template list for a TTS text: Chinese if it holds any CJK ideograph."""
    return t.TTS_TEMPLATES_ZH if t.is_chinese(text) else t.TTS_TEMPLATES_EN


def normalize_text(text: str) -> str:
    """The official `preprocess_input` of a text: all upper or all lower case is capitalised."""
    return text.capitalize() if text.isupper() or text.islower() else text


def _think(thinking: bool) -> Text:
    return Text(t.THINK_ON if thinking else t.THINK_OFF)


# ---- chat turns: the pieces of the chat prompts, shared with the training sequences ----------
def user_turn(*body: Segment) -> list:
    return [Text(t.USER), *body, Text(t.END)]


def reply(thinking: bool | None = None) -> list:
    """The opener of an assistant turn: `<|im_start|>assistant\n`, then the think block closed
    (False) or open (True); the past turns of a multi-turn prompt have none (None)."""
    return [Text(t.ASSISTANT)] + ([] if thinking is None else [_think(thinking)])


def answer(*said: Segment) -> list:
    """The rest of an assistant turn after its opener: what the assistant says, then the turn's
    end. The training sequences supervise exactly this part (SPEC §4.2)."""
    return [*said, Text(t.END)]


def assistant_turn(*said: Segment) -> list:
    """A past assistant turn of a multi-turn prompt."""
    return reply() + answer(*said)


# ---- speech in, text out ----------------------------------------------------------------------
def asr(audio, template: str) -> list:
    return user_turn(Audio(audio), Text(template)) + reply(False)


def understanding(audio, question: str, thinking: bool = False) -> list:
    return user_turn(Audio(audio), Text(question)) + reply(thinking)


def s2t_dialogue(audio, thinking: bool = False) -> list:
    return s2t_dialogue_multiturn([{"role": "user", "content": audio}], thinking)


def s2t_dialogue_multiturn(messages, thinking: bool = False) -> list:
    """User turns hold audio patches, assistant turns text (no think block inside them)."""
    return _chat(messages, Audio, thinking)


def text_dialogue(text: str, thinking: bool = False) -> list:
    return text_dialogue_multiturn([{"role": "user", "content": text}], thinking)


def text_dialogue_multiturn(messages, thinking: bool = False) -> list:
    return _chat(messages, Text, thinking)


def _chat(messages, user_body, thinking: bool) -> list:
    out = []
    for m in messages:
        if _role(m) == "user":
            out += user_turn(user_body(m["content"]))
        else:
            out += assistant_turn(Text(m["content"]))
    return out + reply(thinking)


def _role(message) -> str:
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise ValueError(f"message role {role!r}: expected 'user' or 'assistant'")
    return role


# ---- text in, speech out ----------------------------------------------------------------------
def tts_user_turn(text: str, template: str) -> Text:
    """The user turn of plain TTS."""
    return Text(f"{t.USER}{template}: {normalize_text(text)}{t.END}")


def tts(
    text: str,
    template: str | None = None,
    instruct: str | None = None,
    read_text_only: bool = True,
    prompt_speech=None,
) -> list:
    """TTS, instruct TTS (`instruct`), natural-instruction TTS (`read_text_only=False`, the text
    holds the instruction); `prompt_speech` (patches) is the voice prompt of the instruct forms
    (plain TTS ignores it, as the official builder does). `template` is needed where
    `read_text_only` is set."""
    text = normalize_text(text)
    if read_text_only:
        if template is None:
            raise ValueError("tts: read_text_only needs a template (see choose_template)")
        if instruct is None:
            return [tts_user_turn(text, template), Text(t.ASSISTANT + STREAM_OPEN)]
    system: list[Segment]
    if prompt_speech is None:
        system = [Text(t.SYSTEM), Text(t.INSTRUCT_TTS_SYSTEM), Text(t.END)]
    else:
        system = [
            Text(t.SYSTEM),
            Text(t.INSTRUCT_TTS_VOICE_SYSTEM),
            Audio(prompt_speech),
            Text(t.END),
        ]
    user = f"{template}: {text}({instruct})" if read_text_only else text
    return system + [Text(f"{t.USER}{user}{t.END}"), Text(t.ASSISTANT + t.THINK_ON)]


# ---- spoken dialogue --------------------------------------------------------------------------
def voice_block(prompt_speech) -> list:
    """The system turn that gives a spoken dialogue its voice (none without a voice prompt)."""
    if prompt_speech is None:
        return []
    return [Text(t.SYSTEM), Text(t.VOICE_SYSTEM), Audio(prompt_speech), Text(t.END)]


def spoken_user_turn(audio, system_prompt: str | None = None) -> list:
    """A user turn of a spoken dialogue; the system prompt, if any, opens the first one."""
    head = [Text(system_prompt), Text("\n\n")] if system_prompt else []
    return user_turn(*head, Audio(audio))


def spoken_dialogue(audio, system_prompt: str | None = None, prompt_speech=None) -> list:
    return spoken_dialogue_multiturn(
        [{"role": "user", "content": audio}], system_prompt, prompt_speech
    )


def spoken_dialogue_turn(audio) -> list:
    """The next user turn of a dialogue whose whole previous sequence (prompt and generation) is
    kept as history: the official `add_history` prompt, appended to that sequence."""
    return user_turn(Audio(audio)) + [Text(t.ASSISTANT + STREAM_OPEN)]


def spoken_dialogue_multiturn(
    messages, system_prompt: str | None = None, prompt_speech=None
) -> list:
    """User turns hold audio patches; assistant turns {"text": str, "audio": patches}."""
    out = voice_block(prompt_speech)
    for i, m in enumerate(messages):
        if _role(m) == "user":
            out += spoken_user_turn(m["content"], system_prompt if i == 0 else None)
        else:
            out += assistant_turn(Stream(m["content"]["text"], m["content"]["audio"]))
    return out + [Text(t.ASSISTANT + STREAM_OPEN)]


# ---- Base model: in-context learning and continuation ----------------------------------------
def in_context_s2s(instruction: str, examples, audio) -> list:
    """Few-shot speech-to-speech: `examples` of {"input_audio", "output_transcription",
    "output_audio"} (patches), then the query `audio`."""
    out: list[Segment] = [Text(f"{INSTRUCTION}{instruction}\n")]
    for ex in examples:
        out += [
            Audio(ex["input_audio"]),
            Text("\n"),
            Stream(ex["output_transcription"], ex["output_audio"]),
            Text(" \n\n"),
        ]
    return out + [Audio(audio), Text("\n"), Text(STREAM_OPEN)]


def few_shot(examples, query, speech_output: bool) -> list:
    """Pretraining-style few-shot prompt: `examples` of (input, output) pairs, then the `query`
    input. A text item is a str; a speech item patches, or for a speech output
    {"text": transcription, "audio": patches} (a stream). Prefixed `<Spe>:` when every item is
    speech, else `[Int]:`; items are laid out as `in_context_s2s` lays them out."""
    items = [x for pair in examples for x in pair] + [query]
    prefix = SPEECH_ONLY if all(not isinstance(x, str) for x in items) else INSTRUCTION
    out = [Text(prefix)]
    for source, target in examples:
        out += [_item(source), Text("\n"), _item(target), Text(" \n\n")]
    out += [_item(query), Text("\n")]
    return out + ([Text(STREAM_OPEN)] if speech_output else [])


def _item(x):
    if isinstance(x, str):
        return Text(x)
    if isinstance(x, dict):
        return Stream(x["text"], x["audio"])
    return Audio(x)


def audio_qa(audio, question: str) -> list:
    """Pretraining-style audio question answering; the answer ends at eos or `<|sosp|>`."""
    return [Text(INSTRUCTION), Audio(audio), Text(f"Question: {question}"), Text("\nAnswer:")]


def continuation(audio) -> list:
    """Speech continuation for the Base model: the `continuation` training sequence (one audio
    segment) without its `<|eosp|>`, so the model goes on with the speech it was given."""
    return [Audio(audio, close=False)]
