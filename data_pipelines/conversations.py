"""Conversations: SFT data in every chat format of the official prompts (SPEC §2.4), from the
manifest line to the training sequence.

A manifest line of `data_pipelines.tokenize` that has `messages` is a conversation:

  {"id": "c1", "task": "spoken_dialogue", "system_prompt": "Be brief.",
   "prompt_speech": "voice.wav",
   "messages": [{"role": "user", "audio": "q1.wav"},
                {"role": "assistant", "text": "Sure.", "audio": "a1.wav"},
                {"role": "user", "audio": "q2.wav"},
                {"role": "assistant", "text": "Done.", "audio": "a2.wav"}]}

`id` and `task` are required; audio paths are relative to the manifest's folder or absolute
(local or gs://); `speaker`, `language` and other keys are kept as tokenize keeps them. Messages
alternate user and assistant turns, from a user turn to an assistant turn (one of each in the
single-turn formats). The keys of each format (`thinking` and the conversation's own are
optional, the others required and not empty):

  task             turns   user         assistant               conversation
  asr              one     audio        text
  tts              one     text         text, audio
  instruct_tts     one     text         text, audio, thinking   instruct, prompt_speech
  understanding    one     audio, text  text, thinking
  spoken_dialogue  many    audio        text, audio             system_prompt, prompt_speech
  s2t_dialogue     many    audio        text, thinking
  text_dialogue    many    text         text, thinking

An assistant's audio is said as the 5:5 stream of its `text` (the transcript) and its speech.
`thinking`: false closes the think block of the prompt (the default), true opens it, a text
opens it and is the assistant's reasoning. In multi-turn formats only the last turn takes it (the
official history has no think blocks); instruct TTS always opens it, as its prompt does. Instruct
TTS without `instruct` is the official natural-instruction TTS: the user text holds the
instruction. `check` reports the first problem (an unknown role or key, a missing or empty value,
roles out of order) as a `ConversationError` naming the message.

In a shard the conversation is one `Record`: `codes` every audio of it concatenated in the order
`audio_values` gives (the voice prompt, then the messages'), `task` its format, and
`meta["conversation"]` the conversation with each audio replaced by its frame span
[start, stop] of the codes (`with_spans`).

Its training sequence (`layout`) is the prompt of `mimo_jax.tasks.prompts`, turn by turn as
inference builds it for the same request, and what the assistant says. Only the latter is
supervised: every assistant turn from after its opener (`<|im_start|>assistant\\n` and the think
block opener) through its `<|im_end|>\\n`, past turns of a multi-turn conversation included, as
the public trainer labels them (SPEC §4.2).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from mimo_jax.tasks import prompts, templates
from mimo_jax.tasks.segments import Audio, Segment, Stream, Text

ROLES = ("user", "assistant")
KEYS = ("messages", "system_prompt", "prompt_speech", "instruct")  # a conversation's own keys

Part = tuple[list[Segment], bool]  # prompt segments, whether they are supervised


class ConversationError(ValueError):
    """A conversation its format cannot take; the message names the message and the reason."""


@dataclasses.dataclass(frozen=True)
class Format:
    multi_turn: bool
    user: tuple[str, ...]  # the keys of a user turn
    assistant: tuple[str, ...]  # the keys of an assistant turn, `thinking` aside
    thinking: bool = False  # whether the (last) assistant turn takes `thinking`
    options: tuple[str, ...] = ()  # optional keys of the conversation


FORMATS = {
    "asr": Format(False, ("audio",), ("text",)),
    "tts": Format(False, ("text",), ("text", "audio")),
    "instruct_tts": Format(
        False, ("text",), ("text", "audio"), True, ("instruct", "prompt_speech")
    ),
    "understanding": Format(False, ("audio", "text"), ("text",), True),
    "spoken_dialogue": Format(
        True, ("audio",), ("text", "audio"), options=("system_prompt", "prompt_speech")
    ),
    "s2t_dialogue": Format(True, ("audio",), ("text",), True),
    "text_dialogue": Format(True, ("text",), ("text",), True),
}

# Says what is wrong with a value, or None (audio: a path in a manifest, a span in a record).
Problem = Callable[[Any], str | None]


def path_problem(value) -> str | None:
    return None if isinstance(value, str) and value else "is not an audio file path"


def span_problem(frames: int) -> Problem:
    """The check of a stored conversation's audio: a span [start, stop] of `frames` code frames."""

    def problem(value) -> str | None:
        ok = (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int) for v in value)
            and 0 <= value[0] < value[1] <= frames
        )
        return None if ok else f"is not a span [start, stop] of the record's {frames} frames"

    return problem


# ---- checks -------------------------------------------------------------------------------------
def check(task: str, conv: dict, audio: Problem = path_problem) -> None:
    """Raises `ConversationError` unless `conv` (the conversation's own keys) is a conversation
    of format `task` whose audio values pass `audio`."""
    fmt = FORMATS.get(task)
    if fmt is None:
        raise ConversationError(f"task {task!r}: expected one of {', '.join(FORMATS)}")
    for key in KEYS[1:]:
        if key in conv and key not in fmt.options:
            only = f" (only {', '.join(fmt.options)})" if fmt.options else ""
            raise ConversationError(f"task {task} takes no {key!r}{only}")
        if key in conv:
            _value(key, conv[key], audio if key == "prompt_speech" else _text_problem)
    messages = conv.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"messages: {messages!r} is not a non-empty list of turns")
    _roles(task, fmt, messages)
    for i, m in enumerate(messages):
        _message(task, fmt, i, m, last=i == len(messages) - 1, audio=audio)


def _roles(task: str, fmt: Format, messages: list) -> None:
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(m, dict) or role not in ROLES:
            raise ConversationError(
                f"messages[{i}]: role {role!r}, expected user or assistant (the system and voice "
                f"prompts are keys of the conversation)"
            )
        if role != ROLES[i % 2]:
            raise ConversationError(
                f"messages[{i}] ({role}): "
                + ("a second user turn in a row" if i else "the assistant speaks first")
                + "; turns alternate, the user's first"
            )
    if messages[-1]["role"] != "assistant":
        raise ConversationError(
            f"messages[{len(messages) - 1}] (user): the last turn is the user's; a conversation "
            f"ends with what the assistant says"
        )
    if not fmt.multi_turn and len(messages) != 2:
        raise ConversationError(
            f"task {task} has one turn each (a user turn, then the assistant's), "
            f"not {len(messages)} messages"
        )


def _message(task: str, fmt: Format, i: int, m: dict, last: bool, audio: Problem) -> None:
    role = m["role"]
    keys = fmt.user if role == "user" else fmt.assistant
    optional = ("thinking",) if role == "assistant" and fmt.thinking else ()
    takes = f"{task} {role} turns take {', '.join(keys + optional)}"
    unknown = sorted(set(m) - {"role", *keys, *optional})
    if unknown:
        raise ConversationError(f"messages[{i}] ({role}): unknown key {unknown[0]!r} ({takes})")
    for key in keys:
        if key not in m:
            raise ConversationError(f"messages[{i}] ({role}): no {key!r} ({takes})")
        _value(f"messages[{i}].{key}", m[key], audio if key == "audio" else _text_problem)
    if "thinking" in m:
        _thinking_value(task, fmt, i, m["thinking"], last)


def _thinking_value(task: str, fmt: Format, i: int, value, last: bool) -> None:
    if fmt.multi_turn and not last:
        raise ConversationError(
            f"messages[{i}] (assistant): thinking only in the last turn (the official history "
            f"has no think blocks)"
        )
    if not isinstance(value, bool) and _text_problem(value):
        raise ConversationError(
            f"messages[{i}].thinking: {value!r} is not true, false or the reasoning text"
        )
    if task == "instruct_tts" and value is False:
        raise ConversationError(
            f"messages[{i}].thinking: instruct TTS always opens the think block (true or the "
            f"reasoning text)"
        )


def _text_problem(value) -> str | None:
    if not isinstance(value, str):
        return "is not a text"
    return None if value.strip() else "is empty"


def _value(name: str, value, problem: Problem) -> None:
    reason = problem(value)
    if reason:
        raise ConversationError(f"{name}: {value!r} {reason}")


# ---- audio values -------------------------------------------------------------------------------
def _audio_slots(conv: dict) -> Iterator[tuple[dict, str]]:
    """(holder, key) of every audio value, in the order of the record's codes."""
    if "prompt_speech" in conv:
        yield conv, "prompt_speech"
    for m in conv["messages"]:
        if "audio" in m:
            yield m, "audio"


def audio_values(conv: dict) -> list:
    return [holder[key] for holder, key in _audio_slots(conv)]


def with_spans(conv: dict, frames: list[int]) -> dict:
    """A copy of `conv` whose audio values are the spans of consecutive audios of `frames`
    code frames each (in `audio_values` order)."""
    out = copy.deepcopy(conv)
    slots = list(_audio_slots(out))
    if len(slots) != len(frames):
        raise ValueError(f"{len(frames)} frame counts for {len(slots)} audios")
    start = 0
    for (holder, key), n in zip(slots, frames):
        holder[key] = [start, start + n]
        start += n
    return out


# ---- training sequences -------------------------------------------------------------------------
def layout(task: str, conv: dict, audio: Callable, pick: Callable) -> list[Part]:
    """The training sequence of a checked conversation as parts (segments, supervised);
    `audio(value)` gives an audio value's patches, `pick(options)` chooses a template."""
    m = conv["messages"]
    voice = audio(conv["prompt_speech"]) if "prompt_speech" in conv else None
    if task == "asr":
        return asr(audio(m[0]["audio"]), pick(templates.ASR_TEMPLATES), m[1]["text"])
    if task == "understanding":
        return understanding(
            audio(m[0]["audio"]), m[0]["text"], m[1]["text"], m[1].get("thinking", False)
        )
    if task == "tts":
        text = m[0]["text"]
        return tts(text, pick(prompts.tts_templates(text)), m[1]["text"], audio(m[1]["audio"]))
    if task == "instruct_tts":
        text, instruct = m[0]["text"], conv.get("instruct")
        return instruct_tts(
            text,
            pick(prompts.tts_templates(text)) if instruct is not None else None,
            instruct,
            m[1]["text"],
            audio(m[1]["audio"]),
            voice,
            m[1].get("thinking", True),
        )
    turns = [{**x, "audio": audio(x["audio"])} if "audio" in x else x for x in m]
    if task == "spoken_dialogue":
        return spoken_dialogue(turns, conv.get("system_prompt"), voice)
    if task == "s2t_dialogue":
        return dialogue(turns, lambda x: Audio(x["audio"]))
    return dialogue(turns, lambda x: Text(x["text"]))


def _thinking(thinking: bool | str) -> tuple[bool, list[Segment]]:
    """(whether the prompt opens the think block, what the assistant says in it): its
    reasoning, if given, closed by `\\n</think>\\n`."""
    if thinking is False:
        return False, []
    reasoning: list[Segment] = [Text(thinking)] if isinstance(thinking, str) else []
    return True, reasoning + [Text(templates.THINK_CLOSE)]


def asr(audio, template: str, text: str) -> list[Part]:
    return [(prompts.asr(audio, template), False), (prompts.answer(Text(text)), True)]


def understanding(audio, question: str, text: str, thinking: bool | str = False) -> list[Part]:
    opened, thought = _thinking(thinking)
    return [
        (prompts.understanding(audio, question, opened), False),
        (prompts.answer(*thought, Text(text)), True),
    ]


def tts(text: str, template: str, speech_text: str, speech) -> list[Part]:
    """Plain TTS: the inference prompt opens the stream, whose `<|sostm|>` the assistant says."""
    return [
        ([prompts.tts_user_turn(text, template)] + prompts.reply(), False),
        (prompts.answer(Stream(speech_text, speech)), True),
    ]


def instruct_tts(
    text: str,
    template: str | None,
    instruct: str | None,
    speech_text: str,
    speech,
    prompt_speech=None,
    thinking: bool | str = True,
) -> list[Part]:
    """Instruct TTS (natural-instruction TTS without `instruct`); the prompt opens the think
    block, which the assistant closes before its stream."""
    prompt = prompts.tts(text, template, instruct, instruct is not None, prompt_speech)
    _, thought = _thinking(thinking)
    return [(prompt, False), (prompts.answer(*thought, Stream(speech_text, speech)), True)]


def spoken_dialogue(messages, system_prompt: str | None = None, prompt_speech=None) -> list[Part]:
    """User turns {"audio": patches}, assistant turns {"text", "audio": patches}."""
    parts: list[Part] = [(prompts.voice_block(prompt_speech), False)]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            user = prompts.spoken_user_turn(m["audio"], system_prompt if i == 0 else None)
            parts.append((user, False))
        else:
            parts += [
                (prompts.reply(), False),
                (prompts.answer(Stream(m["text"], m["audio"])), True),
            ]
    return parts


def dialogue(messages, user_body: Callable[[dict], Segment]) -> list[Part]:
    """Speech-to-text or text dialogue: assistant turns {"text", "thinking"?}; only the last
    turn has a think block, as in the prompt that asks for it."""
    parts: list[Part] = []
    for i, m in enumerate(messages):
        if m["role"] == "user":
            parts.append((prompts.user_turn(user_body(m)), False))
            continue
        opened, thought = (
            _thinking(m.get("thinking", False)) if i == len(messages) - 1 else (None, [])
        )
        parts += [(prompts.reply(opened), False), (prompts.answer(*thought, Text(m["text"])), True)]
    return parts
