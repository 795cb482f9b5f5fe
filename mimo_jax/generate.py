"""Command line of the tasks: prompts to text and 24 kHz speech.

  python -m mimo_jax.generate TASK --lm CKPT --audio-tokenizer CKPT --text-tokenizer tokenizer.json
      [--input TEXT_OR_AUDIO] [task inputs] [generation options] --out DIR
  python -m mimo_jax.generate --requests FILE.jsonl --lm ... --out DIR

TASK is one of asr, tts, understand, dialogue, s2t_dialogue, text_dialogue, few_shot, continue. A
line of FILE.jsonl is one request: {"id", "task", inputs under the official builders' names
("input", "instruct", "read_text_only", "prompt_speech", "input_text", "thinking", "message_list",
"system_prompt", "instruction", "prompt_examples"; audio as file paths), and "template",
"min_new_groups", "max_new_groups", "greedy", "seed"}. Every request is checked before anything
loads; they are then sorted by prompt length and generated in batches. Each writes DIR/<id>.txt
(the text as the official `forward` returns it) and, for speech tasks, DIR/<id>.wav (24 kHz), each
file whole, as soon as its batch is done; the .txt is written last. A bad request, or a batch that
fails, goes to DIR/errors.jsonl with its line(s), and the others still run (exit status 1).

A rerun into the same DIR skips the requests whose DIR/<id>.txt exists (an interrupted run resumes
where it stopped); --overwrite runs them again.

With --stream, speech is written while it is generated: DIR/<id>.wav grows chunk by chunk (every
--stream-chunk groups) and is a valid WAV at every point, so a player can start on it before the
request ends; the time to each request's first audio is printed. The streamed audio comes from the
streaming decoder (left 250, right 40 code frames of context), within 40 dB SNR of the one-shot
decode.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import time
from pathlib import Path

from tqdm import tqdm

from mimo_jax import paths
from mimo_jax.inference.model_args import add_model_args, load_mimo
from mimo_jax.tasks import requests
from mimo_jax.tasks.requests import TASKS

CHUNK = 512  # requests read, sorted by length and generated together
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_JSON_ARGS = ("message_list", "prompt_examples")
_ARGS = (
    "input",
    "instruct",
    "read_text_only",
    "prompt_speech",
    "input_text",
    "thinking",
    "message_list",
    "system_prompt",
    "instruction",
    "prompt_examples",
    "template",
    "min_new_groups",
    "max_new_groups",
    "greedy",
    "seed",
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mimo_jax.generate",
        description="MiMo-Audio tasks: requests -> text and speech",
    )
    p.add_argument("task", nargs="?", choices=sorted(TASKS), help="the task of one request")
    p.add_argument("--requests", help="a JSONL file of requests (instead of TASK)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="run the requests whose DIR/<id>.txt exists too (by default a rerun skips them)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="requests per generation batch")
    p.add_argument("--id", default="output", help="the id (file name) of the one request")
    p.add_argument(
        "--stream",
        action="store_true",
        help="write each DIR/<id>.wav while it is generated (a valid WAV at every "
        "point, whole at the end) and print the time to its first audio",
    )
    p.add_argument(
        "--stream-chunk",
        type=int,
        default=8,
        help="with --stream: groups generated between writes (default 8)",
    )
    g = p.add_argument_group("the one request's inputs and options (see the request fields)")
    for name in (
        "input",
        "instruct",
        "prompt_speech",
        "input_text",
        "system_prompt",
        "instruction",
        "template",
    ):
        g.add_argument(f"--{name.replace('_', '-')}", dest=name)
    for name in _JSON_ARGS:
        g.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=json.loads,
            help="JSON, as in a request line",
        )
    for name in ("read_text_only", "thinking", "greedy"):
        g.add_argument(
            f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction
        )
    for name in ("min_new_groups", "max_new_groups", "seed"):
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int)
    return p


def _read_requests(path: str, errors: list) -> list[tuple[int, dict]]:
    """(line number, request) of every well-formed line; the others go to `errors`."""
    out, seen = [], set()
    try:
        objects = paths.read_jsonl(path, errors)
    except FileNotFoundError as e:
        raise SystemExit(f"--requests {e}") from None
    for n, req in objects:
        rid = str(req.get("id", n))
        if not _ID.match(rid) or rid in seen:
            why = (
                "is used by an earlier line"
                if rid in seen
                else ("is not a file name (letters, digits, '.', '_', '-')")
            )
            errors.append({"line": n, "id": rid, "error": f"id {rid!r} {why}"})
            continue
        seen.add(rid)
        out.append((n, {**req, "id": rid}))
    return out


def _checked(lines: list[tuple[int, dict]], errors: list) -> list[tuple[int, dict]]:
    """The requests whose fields are all valid (checked before anything loads or runs); the
    others go to `errors`. Audio files are read later, with their batch."""
    good = []
    for n, req in lines:
        try:
            requests.segments(req)
        except (ValueError, KeyError, TypeError) as e:  # RequestError is a ValueError
            errors.append({"line": n, "id": req["id"], "error": str(e)})
            continue
        good.append((n, req))
    return good


def _to_run(lines: list[tuple[int, dict]], out: Path, overwrite: bool) -> list[tuple[int, dict]]:
    """The requests without output in `out` (all of them with `overwrite`), saying how many were
    skipped."""
    if overwrite:
        return lines
    pending = [(n, req) for n, req in lines if not (out / f"{req['id']}.txt").exists()]
    if len(pending) < len(lines):
        print(
            f"skipping {len(lines) - len(pending)} of {len(lines)} requests: their output is "
            f"already in {out} (--overwrite to run them again)",
            file=sys.stderr,
        )
    return pending


class _Errors:
    """DIR/errors.jsonl: each error appended as it is found (a run that is killed keeps them),
    the whole file sorted by line at the end. A rerun starts it afresh (its requests run again)."""

    def __init__(self, out: Path):
        self.path, self.errors = out / "errors.jsonl", list[dict]()
        self.path.write_text("")

    def add(self, *errors: dict) -> None:
        self.errors += errors
        with self.path.open("a") as f:
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)

    def finish(self) -> None:
        self.errors.sort(key=lambda e: e["line"])
        lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.errors)
        paths.write_whole(paths.resolve(self.path), lines)
        for err in self.errors:
            print(f"error: line {err['line']}: {err['error']}", file=sys.stderr)


def _write(out: Path, result, rate: int) -> None:
    """A finished request's files, each written whole; the .txt last, as it marks the request
    done for a rerun."""
    from mimo_jax.tokenizer.audio_io import wav_bytes

    rid = result.request["id"]
    if result.wav is not None:
        paths.write_whole(paths.resolve(out / f"{rid}.wav"), wav_bytes(result.wav, rate))
    paths.write_whole(paths.resolve(out / f"{rid}.txt"), result.text)


class GrowingWav:
    """A float32 mono WAV file that is appended to; its header is rewritten after every append,
    so that the file is a valid WAV of everything written so far at every point."""

    def __init__(self, path, rate: int):
        self.file = open(path, "wb")
        self.rate, self.samples = rate, 0
        self._header()

    def _header(self):
        data = 4 * self.samples
        self.file.seek(0)
        self.file.write(
            b"RIFF"
            + struct.pack("<I", 36 + data)
            + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 3, 1, self.rate, 4 * self.rate, 4, 32)
            + b"data"
            + struct.pack("<I", data)
        )
        self.file.seek(0, 2)
        self.file.flush()

    def append(self, wav) -> None:
        import numpy as np

        wav = np.asarray(wav, "<f4")
        self.file.write(wav.tobytes())
        self.samples += wav.size
        self._header()

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stream(mimo, chunk: list, out: Path, args, bar, errors: _Errors) -> None:
    """Runs a chunk of request lines as a stream, writing the WAVs as their audio comes."""
    t0, writers = time.perf_counter(), dict[str, GrowingWav]()
    for piece in mimo.stream(
        [r for _, r in chunk],
        batch_size=args.batch_size,
        raise_errors=False,
        chunk_groups=args.stream_chunk,
    ):
        n, req = chunk[piece.index]
        rid, res = req["id"], piece.result
        if res is not None and res.error is not None:
            errors.add({"line": n, "id": rid, "error": res.error})
            if rid in writers:  # a batch that failed midway: its partial audio goes
                writers.pop(rid).close()
                (out / f"{rid}.wav").unlink()
            bar.update(1)
            continue
        if len(piece.wav):
            if rid not in writers:
                writers[rid] = GrowingWav(out / f"{rid}.wav", mimo.audio.rate)
                bar.write(
                    f"first audio of {rid} after {time.perf_counter() - t0:.2f} s", file=sys.stderr
                )
            writers[rid].append(piece.wav)
        if res is not None:
            if rid in writers:
                writers.pop(rid).close()
            paths.write_whole(paths.resolve(out / f"{rid}.txt"), res.text)
            bar.update(1)


def _check_args(args) -> Path:
    """The output directory, once every option is checked (before anything loads)."""
    if (args.task is None) == (args.requests is None):
        raise SystemExit("give either TASK (one request) or --requests FILE.jsonl")
    for flag in ("batch_size", "stream_chunk", "context_groups"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {value}: expected at least 1")
    try:
        return Path(paths.output_dir(args.out))
    except ValueError as e:
        raise SystemExit(f"--out {e}") from None


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = _check_args(args)
    bad: list[dict] = []
    if args.requests:
        lines = _read_requests(args.requests, bad)
    else:
        one = {k: getattr(args, k) for k in _ARGS if getattr(args, k) is not None}
        lines = [(0, {"id": args.id, "task": args.task, **one})]
    lines = _to_run(_checked(lines, bad), out, args.overwrite)
    errors = _Errors(out)
    errors.add(*bad)
    if lines:
        _run(load_mimo(args), lines, out, args, errors)
    errors.finish()
    return 1 if errors.errors else 0


def _run(mimo, lines: list[tuple[int, dict]], out: Path, args, errors: _Errors) -> None:
    with tqdm(total=len(lines), unit="request", desc="generate") as bar:
        for start in range(0, len(lines), CHUNK):
            chunk = lines[start : start + CHUNK]
            if args.stream:
                _stream(mimo, chunk, out, args, bar, errors)
                continue
            results = mimo.run_iter(
                [r for _, r in chunk], batch_size=args.batch_size, raise_errors=False
            )
            for i, res in results:
                n, req = chunk[i]
                if res.error is not None:
                    errors.add({"line": n, "id": req["id"], "error": res.error})
                else:
                    _write(out, res, mimo.audio.rate)
                bar.update(1)


if __name__ == "__main__":
    sys.exit(main())
