"""Command line of the tasks: prompts to text and 24 kHz speech.

  python -m mimo_jax.generate TASK --lm CKPT --audio-tokenizer CKPT --text-tokenizer tokenizer.json
      [--input TEXT_OR_AUDIO] [task inputs] [generation options] --out DIR
  python -m mimo_jax.generate --requests FILE.jsonl --lm ... --out DIR

TASK is one of asr, tts, understand, dialogue, s2t_dialogue, text_dialogue, few_shot, continue. A
line of FILE.jsonl is one request: {"id", "task", inputs under the official builders' names
("input", "instruct", "read_text_only", "prompt_speech", "input_text", "thinking", "message_list",
"system_prompt", "instruction", "prompt_examples"; audio as file paths), and "template",
"min_new_groups", "max_new_groups", "greedy", "seed"}. Requests are sorted by prompt length and
generated in batches. Each writes DIR/<id>.txt (the text as the official `forward` returns it) and,
for speech tasks, DIR/<id>.wav (24 kHz). A bad request is written to DIR/errors.jsonl with its
line, and the others still run (exit status 1).

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

from mimo_jax.inference.model_args import add_model_args, load_mimo
from mimo_jax.paths import read_jsonl
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
        objects = read_jsonl(path, errors)
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


def _write(out: Path, result, rate: int) -> None:
    from mimo_jax.tokenizer.audio_io import write_audio

    rid = result.request["id"]
    (out / f"{rid}.txt").write_text(result.text)
    if result.wav is not None:
        write_audio(str(out / f"{rid}.wav"), result.wav, rate)


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


def _stream(mimo, chunk: list, out: Path, args, bar, errors: list) -> None:
    """Runs a chunk of request lines as a stream, writing the WAVs as their audio comes."""
    t0, writers = time.perf_counter(), {}
    for piece in mimo.stream(
        [r for _, r in chunk],
        batch_size=args.batch_size,
        raise_errors=False,
        chunk_groups=args.stream_chunk,
    ):
        n, req = chunk[piece.index]
        rid, res = req["id"], piece.result
        if res is not None and res.error is not None:
            errors.append({"line": n, "id": rid, "error": res.error})
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
            (out / f"{rid}.txt").write_text(res.text)
            if rid in writers:
                writers.pop(rid).close()
            bar.update(1)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if (args.task is None) == (args.requests is None):
        raise SystemExit("give either TASK (one request) or --requests FILE.jsonl")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size {args.batch_size}: expected at least 1")
    if args.stream_chunk < 1:
        raise SystemExit(f"--stream-chunk {args.stream_chunk}: expected at least 1")
    errors: list[dict] = []
    if args.requests:
        lines = _read_requests(args.requests, errors)
    else:
        one = {k: getattr(args, k) for k in _ARGS if getattr(args, k) is not None}
        lines = [(0, {"id": args.id, "task": args.task, **one})]
    mimo = load_mimo(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rate = mimo.audio.rate
    with tqdm(total=len(lines), unit="request", desc="generate") as bar:
        for start in range(0, len(lines), CHUNK):
            chunk = lines[start : start + CHUNK]
            if args.stream:
                _stream(mimo, chunk, out, args, bar, errors)
                continue
            results = mimo.run(
                [r for _, r in chunk],
                batch_size=args.batch_size,
                raise_errors=False,
                progress=bar.update,
            )
            for (n, req), res in zip(chunk, results):
                if res.error is not None:
                    errors.append({"line": n, "id": req["id"], "error": res.error})
                    bar.update(1)
                else:
                    _write(out, res, rate)
    errors.sort(key=lambda e: e["line"])
    (out / "errors.jsonl").write_text(
        "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
    )
    for err in errors:  # not `e`: an `except ... as e` above unbinds that name
        print(f"error: line {err['line']}: {err['error']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
