"""The evaluations run by `python -m mimo_jax.evaluate` and during training, on a `MimoAudio`.

ASR: a manifest in the format `data_pipelines.tokenize` reads (one JSON object per line: `audio`,
a path relative to the manifest's folder or absolute; `text`, the transcript; optional `id`,
`language`), transcribed with the official ASR prompt (its template drawn, seeded, from the
reference language's list) and scored by `asr_metrics`.

Few-shot multiple choice: a JSONL of items
  {"id", "examples": [[input, output], ...], "question": input, "options": [text, ...],
   "answer": index, "subject" (optional)}
where an input or output is a text, {"audio": path} (speech) or {"text", "audio"} (speech with its
transcription); the prompt is the pretraining-style few-shot prompt (`prompts.few_shot`) and the
prediction the option with the highest log-likelihood (`choice`).

A bad line (not UTF-8, not a JSON object, a field missing or of the wrong kind, an id used twice,
audio that is missing or unreadable, an empty transcript) becomes one entry {"line", "id",
"error"} and the others still run. Each scored row is handed to `on_row` as soon as it is scored
(a batch of utterances, an item), so that a caller can keep it before the next starts.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from mimo_jax.evaluation import asr_metrics, choice
from mimo_jax.paths import read_jsonl
from mimo_jax.tasks import prompts, segments, templates
from mimo_jax.tasks.requests import RequestError
from mimo_jax.tokenizer.audio_io import InputError


def error(line: int, item_id, message: str) -> dict:
    return {"line": line, "id": item_id, "error": message}


def _path(value, base: Path, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise RequestError(f"{key}: {value!r} is not an audio file path")
    return value if "://" in value or value.startswith("/") else str(base / value)


# ---- ASR ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Utterance:
    line: int
    id: str
    audio: str  # a path, or a 24 kHz mono float array
    text: str
    language: str  # "en" or "zh"


def utterance(line: int, obj: dict, base: Path) -> Utterance:
    """A manifest line -> Utterance, or RequestError naming the field."""
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"text: {text!r} is not a non-empty transcript")
    try:
        language = asr_metrics.language_of(text, obj.get("language"))
    except ValueError as e:
        raise RequestError(str(e)) from None
    audio = _path(obj.get("audio"), base, "audio")
    return Utterance(line, str(obj.get("id") or Path(audio).stem), audio, text, language)


def _unique(entries: list, errors: list) -> list:
    """The entries (with `line` and `id`) whose id no earlier one has; the others go to
    `errors` (results are kept and resumed by id)."""
    out, seen = [], dict[str, int]()  # id -> line
    for e in entries:
        if e.id in seen:
            errors.append(error(e.line, e.id, f"id {e.id!r} is used by line {seen[e.id]}"))
            continue
        seen[e.id] = e.line
        out.append(e)
    return out


def read_manifest(path: str | Path, errors: list) -> list[Utterance]:
    out: list[Utterance] = []
    for n, obj in read_jsonl(path, errors):
        try:
            out.append(utterance(n, obj, Path(path).parent))
        except RequestError as e:
            errors.append(error(n, obj.get("id"), str(e)))
    return _unique(out, errors)


def asr_template(language: str, seed: int) -> str:
    """The official ASR template list of the language, drawn with `seed`."""
    options = templates.ASR_TEMPLATES_ZH if language == "zh" else templates.ASR_TEMPLATES_EN
    return prompts.choose_template(options, None, random.Random(seed))


def evaluate_asr(
    mimo,
    utterances: list[Utterance],
    errors: list,
    *,
    seed: int = 0,
    template: str | None = None,
    min_new_groups: int = 0,
    max_new_groups: int | None = None,
    greedy: bool = False,
    batch_size: int | None = None,
    progress=None,
    on_row=None,
    done=frozenset(),
) -> dict:
    """Transcribes and scores; {"totals", "utterances": [per utterance, in manifest order]}.
    Failures go to `errors`. `template`: one template for all (default: drawn per utterance by
    language and position); `on_row(row)` is called as each utterance is scored; the ids in
    `done` are skipped (their template draws stay where they were)."""
    options = {"seed": seed, "greedy": greedy, "min_new_groups": min_new_groups}
    if max_new_groups:
        options["max_new_groups"] = max_new_groups
    pending = [(i, u) for i, u in enumerate(utterances) if u.id not in done]
    reqs = [
        {
            "id": u.id,
            "input": u.audio,
            "template": template or asr_template(u.language, seed + i),
            **options,
        }
        for i, u in pending
    ]
    rows = []
    for k, res in mimo.run_iter(reqs, task="asr", raise_errors=False, batch_size=batch_size):
        u = pending[k][1]
        if progress is not None:
            progress(1)
        if res.error is not None:
            errors.append(error(u.line, u.id, res.error))
            continue
        hyp = asr_metrics.hypothesis_text(res.text)
        try:
            s = asr_metrics.score(u.text, hyp, u.language)
        except ValueError as e:
            errors.append(error(u.line, u.id, str(e)))
            continue
        row = {
            "id": u.id,
            "line": u.line,
            "reference": u.text,
            "hypothesis": hyp,
            "output": res.text,
            **s.as_dict(),
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    rows.sort(key=lambda r: r["line"])
    return {"totals": asr_totals(rows), "utterances": rows}


def asr_totals(rows: list[dict]) -> dict:
    """The corpus totals of scored utterance rows (each scored again from its texts)."""
    return asr_metrics.totals(
        [asr_metrics.score(r["reference"], r["hypothesis"], r["language"]) for r in rows]
    )


# ---- few-shot multiple choice -----------------------------------------------------------------
@dataclasses.dataclass
class ChoiceItem:
    line: int
    id: str
    examples: list  # [(input, output)] with audio as paths
    question: object
    options: list[str]
    answer: int
    subject: str


def _part(value, base: Path, key: str):
    """A prompt item: a text, {"audio": path} or {"text", "audio": path} (paths resolved)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and set(value) in ({"audio"}, {"text", "audio"}):
        out = {"audio": _path(value["audio"], base, f"{key}.audio")}
        if "text" in value:
            if not isinstance(value["text"], str) or not value["text"].strip():
                raise RequestError(f"{key}.text: {value['text']!r} is not a non-empty text")
            out["text"] = value["text"]
        return out
    raise RequestError(
        f"{key}: {value!r} is not a text, {{'audio': path}} or {{'text', 'audio': path}}"
    )


def choice_item(line: int, obj: dict, base: Path) -> ChoiceItem:
    options = obj.get("options")
    if (
        not isinstance(options, list)
        or len(options) < 2
        or not all(isinstance(o, str) and o.strip() for o in options)
    ):
        raise RequestError(f"options: {options!r} is not a list of two or more non-empty texts")
    answer = obj.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
        raise RequestError(f"answer: {answer!r} is not an option index in 0..{len(options) - 1}")
    examples = obj.get("examples", [])
    if not isinstance(examples, list) or not all(
        isinstance(e, list) and len(e) == 2 for e in examples
    ):
        raise RequestError(f"examples: {examples!r} is not a list of [input, output] pairs")
    pairs = [
        (_part(a, base, f"examples[{i}][0]"), _part(b, base, f"examples[{i}][1]"))
        for i, (a, b) in enumerate(examples)
    ]
    return ChoiceItem(
        line,
        str(obj.get("id", line)),
        pairs,
        _part(obj.get("question"), base, "question"),
        options,
        answer,
        str(obj.get("subject", "")),
    )


def read_choice_items(path: str | Path, errors: list) -> list[ChoiceItem]:
    out = []
    for n, obj in read_jsonl(path, errors):
        try:
            out.append(choice_item(n, obj, Path(path).parent))
        except RequestError as e:
            errors.append(error(n, obj.get("id"), str(e)))
    return _unique(out, errors)


def _with_patches(part, audio, name: str):
    """A prompt item with its audio path replaced by patches (encoded by the front end)."""
    if isinstance(part, str):
        return part
    patches = audio.patches([part["audio"]], [name])[0]
    return {"text": part["text"], "audio": patches} if "text" in part else patches


def choice_prompt(mimo, item: ChoiceItem) -> segments.Prompt:
    name = f"item {item.id}"
    parts = [
        (_with_patches(a, mimo.audio, name), _with_patches(b, mimo.audio, name))
        for a, b in item.examples
    ]
    segs = prompts.few_shot(
        parts, _with_patches(item.question, mimo.audio, name), speech_output=False
    )
    c = mimo.config
    return segments.assemble(segs, mimo.tok, c.group_size, c.speech_empty_ids)


def evaluate_choices(
    mimo, items: list[ChoiceItem], errors: list, progress=None, on_row=None, done=frozenset()
) -> dict:
    """{"totals": accuracy overall and per subject, "items": [per item]}; `on_row(row)` is called
    as each item is scored; the ids in `done` are skipped."""
    rows = []
    for item in (i for i in items if i.id not in done):
        try:
            prompt = choice_prompt(mimo, item)
        except (InputError, RequestError, ValueError) as e:
            errors.append(error(item.line, item.id, str(e)))
            if progress is not None:
                progress(1)
            continue
        pick, scores = choice.choose(
            mimo.model, prompt, [mimo.tok.encode(o) for o in item.options], mimo.tok.pad_id
        )
        rows.append(
            {
                "id": item.id,
                "line": item.line,
                "subject": item.subject,
                "prediction": pick,
                "answer": item.answer,
                "correct": pick == item.answer,
                "scores": [float(s) for s in scores],
            }
        )
        if on_row is not None:
            on_row(rows[-1])
        if progress is not None:
            progress(1)
    return {"totals": accuracy(rows), "items": rows}


def accuracy(rows: list[dict]) -> dict:
    subjects: dict[str, list[bool]] = {}
    for r in rows:
        subjects.setdefault(r["subject"], []).append(r["correct"])
    correct = sum(r["correct"] for r in rows)
    return {
        "items": len(rows),
        "correct": correct,
        "accuracy": correct / len(rows) if rows else 0.0,
        "subjects": {k: sum(v) / len(v) for k, v in sorted(subjects.items()) if k},
    }
