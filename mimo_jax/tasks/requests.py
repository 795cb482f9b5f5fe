"""Requests of the tasks: a JSON-like mapping -> prompt segments and how to generate and read out.

A request names its `task` and the task's inputs under the official builders' argument names
(`input` for the text or the audio, audio as a file path or a 24 kHz mono float array):

  asr            input (audio)
  tts            input (text), instruct, read_text_only, prompt_speech (audio)
  understand     input (audio), input_text, thinking
  dialogue       input (audio) or message_list, system_prompt, prompt_speech (audio)
  s2t_dialogue   input (audio) or message_list, thinking
  text_dialogue  input (text) or message_list, thinking
  few_shot       instruction, prompt_examples, input (audio)
  continue       input (audio)

and generation options `template`, `min_new_groups`, `max_new_groups`, `greedy`, `seed` (and `id`).
Every problem is a `RequestError` naming the field, its value and what was expected.
"""

from __future__ import annotations

import dataclasses

from mimo_jax.tasks import prompts, templates

MAX_GROUPS = 8192  # the official GenerationConfig's max_length: prompt and generation together

OPTIONS = ("id", "task", "template", "min_new_groups", "max_new_groups", "greedy", "seed")


class RequestError(ValueError):
    """A request that cannot be run; the message names the field and the problem."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    fields: tuple[str, ...]
    stop_tokens: tuple[str, ...]  # besides the tokenizer's eos
    sampler: str  # key of the official per-task sampler presets
    speech_out: bool
    speech_start: str | None = "<|sostm|>"  # the output speech span
    speech_end: str = "<|eostm|>"


TASKS = {
    "asr": TaskSpec("asr", ("input",), ("<|im_end|>",), "asr", False),
    "tts": TaskSpec(
        "tts",
        ("input", "instruct", "read_text_only", "prompt_speech"),
        ("<|eostm|>", "<|im_end|>"),
        "tts",
        True,
    ),
    "understand": TaskSpec(
        "understand",
        ("input", "input_text", "thinking"),
        ("<|im_end|>",),
        "audio_understanding",
        False,
    ),
    "dialogue": TaskSpec(
        "dialogue",
        ("input", "message_list", "system_prompt", "prompt_speech"),
        ("<|eostm|>", "<|im_end|>"),
        "spoken_dialogue",
        True,
    ),
    "s2t_dialogue": TaskSpec(
        "s2t_dialogue",
        ("input", "message_list", "thinking"),
        ("<|im_end|>",),
        "spoken_dialogue",
        False,
    ),
    "text_dialogue": TaskSpec(
        "text_dialogue", ("input", "message_list", "thinking"), ("<|im_end|>",), "text_chat", False
    ),
    "few_shot": TaskSpec(
        "few_shot",
        ("instruction", "prompt_examples", "input"),
        ("<|eostm|>",),
        "in_context_learning_s2s",
        True,
    ),
    # The Base model continues the audio segment; its <|eosp|> ends the speech.
    "continue": TaskSpec(
        "continue",
        ("input",),
        ("<|eosp|>",),
        "continuation",
        True,
        speech_start=None,
        speech_end="<|eosp|>",
    ),
}


def task_of(request: dict) -> TaskSpec:
    name = request.get("task")
    if name not in TASKS:
        raise RequestError(f"task {name!r}: expected one of {', '.join(TASKS)}")
    spec = TASKS[name]
    unknown = sorted(set(request) - set(spec.fields) - set(OPTIONS))
    if unknown:
        raise RequestError(
            f"task {name}: unknown field {unknown[0]!r} (expected "
            f"{', '.join(spec.fields + OPTIONS)})"
        )
    for key, kind in _TYPES.items():
        value = request.get(key)
        if value is not None and not _is(value, kind):
            raise RequestError(f"{key}: {value!r} is not {_KIND_NAMES[kind]}")
    least, most = request.get("min_new_groups"), request.get("max_new_groups")
    if least is not None and most is not None and least > most:
        raise RequestError(
            f"min_new_groups {least} is more than max_new_groups {most}: expected at most "
            f"max_new_groups"
        )
    return spec


_TYPES = {
    "min_new_groups": "count",
    "max_new_groups": "positive",
    "seed": "seed",
    "greedy": bool,
    "thinking": bool,
    "read_text_only": bool,
    "template": str,
    "system_prompt": str,
    "instruction": str,
    "input_text": str,
}
_KIND_NAMES = {
    "count": "an integer >= 0",
    "positive": "an integer >= 1",
    "seed": "an integer in [0, 2**32)",
    bool: "true or false",
    str: "a text",
}


def _is(value, kind) -> bool:
    if kind in ("count", "positive", "seed"):
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value >= (kind == "positive")
            and (kind != "seed" or value < 2**32)
        )
    return isinstance(value, kind)


def _text(request, key, name="text") -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{key}: {value!r} is not a non-empty {name}")
    return value


def _audio(request, key):
    value = request.get(key)
    if value is None or isinstance(value, (dict, list, bool, int, float)):
        raise RequestError(f"{key}: {value!r} is not audio (expected a file path or a waveform)")
    return value


def _messages(request, user, assistant) -> list:
    messages = request.get("message_list")
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"message_list: {messages!r} is not a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise RequestError(f"message_list[{i}]: role {role!r}, expected 'user' or 'assistant'")
        content = (user if role == "user" else assistant)(m, f"message_list[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _one_input(request) -> bool:
    """Whether the request gives `input` (else `message_list`); both or neither is an error."""
    has_input, has_list = "input" in request, "message_list" in request
    if has_input == has_list:
        raise RequestError(
            f"task {request['task']}: give either input or message_list "
            f"({'both' if has_input else 'neither'} given)"
        )
    return has_input


def segments(request: dict, *, history: bool = False) -> list:
    """The prompt segments of a checked request; audio stays as given (paths or arrays) until
    encoded. `history`: a dialogue turn appended to the previous sequence (the official history
    rule)."""
    spec = task_of(request)
    r = request
    name = spec.name
    if name == "asr":
        template = prompts.choose_template(
            templates.ASR_TEMPLATES, r.get("template"), r.get("seed")
        )
        return prompts.asr(_audio(r, "input"), template)
    if name == "tts":
        text = _text(r, "input")
        read_only = bool(r.get("read_text_only", True))
        tts_template = (
            prompts.choose_template(prompts.tts_templates(text), r.get("template"), r.get("seed"))
            if read_only
            else None
        )
        voice = _audio(r, "prompt_speech") if r.get("prompt_speech") is not None else None
        instruct = _text(r, "instruct") if r.get("instruct") is not None else None
        return prompts.tts(text, tts_template, instruct, read_only, voice)
    if name == "understand":
        return prompts.understanding(
            _audio(r, "input"), _text(r, "input_text"), bool(r.get("thinking", False))
        )
    if name == "dialogue":
        voice = _audio(r, "prompt_speech") if r.get("prompt_speech") is not None else None
        system = r.get("system_prompt")
        if _one_input(r):
            if history:
                return prompts.spoken_dialogue_turn(_audio(r, "input"))
            return prompts.spoken_dialogue(_audio(r, "input"), system, voice)
        return prompts.spoken_dialogue_multiturn(
            _messages(r, lambda m, k: _audio(m, "content"), _stream_turn), system, voice
        )
    if name == "s2t_dialogue":
        thinking = bool(r.get("thinking", False))
        if _one_input(r):
            return prompts.s2t_dialogue(_audio(r, "input"), thinking)
        return prompts.s2t_dialogue_multiturn(
            _messages(r, lambda m, k: _audio(m, "content"), lambda m, k: _text(m, "content")),
            thinking,
        )
    if name == "text_dialogue":
        thinking = bool(r.get("thinking", False))
        if _one_input(r):
            return prompts.text_dialogue(_text(r, "input"), thinking)
        content = lambda m, k: _text(m, "content")  # noqa: E731
        return prompts.text_dialogue_multiturn(_messages(r, content, content), thinking)
    if name == "few_shot":
        examples = r.get("prompt_examples")
        if not isinstance(examples, list):
            raise RequestError(f"prompt_examples: {examples!r} is not a list of examples")
        return prompts.in_context_s2s(
            str(r.get("instruction", "")),
            [_example(e, i) for i, e in enumerate(examples)],
            _audio(r, "input"),
        )
    return prompts.continuation(_audio(r, "input"))


def _stream_turn(message, key):
    content = message.get("content")
    if not isinstance(content, dict) or set(content) != {"text", "audio"}:
        raise RequestError(f"{key}: {content!r} is not an assistant turn {{'text', 'audio'}}")
    return {"text": _text(content, "text"), "audio": _audio(content, "audio")}


def _example(example, i):
    keys = {"input_audio", "output_transcription", "output_audio"}
    if not isinstance(example, dict) or set(example) != keys:
        raise RequestError(
            f"prompt_examples[{i}]: {example!r} is not an example with {', '.join(sorted(keys))}"
        )
    return {
        "input_audio": _audio(example, "input_audio"),
        "output_transcription": _text(example, "output_transcription"),
        "output_audio": _audio(example, "output_audio"),
    }
