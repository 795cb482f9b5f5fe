"""Prepare one voice for TTS fine-tuning: a folder of recordings with transcripts -> manifests and
RVQ-code shards, with a held-out part to measure the fine-tuning on.

  python -m data_pipelines.voice --voice-dir DIR --checkpoint AUDIO_TOKENIZER --out OUT

DIR holds WAV files with their transcripts in either form:
  - `NAME.wav` beside `NAME.txt` (UTF-8, the whole file is the transcript);
  - `metadata.csv` in the LJSpeech layout, `NAME|transcript[|normalised transcript]` a line (the
    normalised column is used when present), with the audio at `wavs/NAME.wav` or `NAME.wav`.
Every `--held-out`-th recording (in name order, at least one while there are two) goes to the
held-out part. Written: OUT/train.jsonl and OUT/heldout.jsonl (tokenize's manifest format, task
`tts`, speaker `--speaker`, default the folder's name) and their shards, OUT/train/ and
OUT/heldout/, by `data_pipelines.tokenize` (whose errors.jsonl keeps any clip it refuses). A
recording without a transcript, or a transcript without its recording, stops the command with
the names of all of them before anything is written. Paths may be relative, local or gs://.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence

from etils import epath

from data_pipelines import tokenize
from mimo_jax import logs, paths

METADATA = "metadata.csv"


class VoiceDirError(ValueError):
    pass


def _from_metadata(root: epath.Path) -> list[dict]:
    entries = []
    rows = csv.reader(
        io.StringIO((root / METADATA).read_text()), delimiter="|", quoting=csv.QUOTE_NONE
    )
    for line, row in enumerate(rows, 1):
        if not row:
            continue
        if len(row) < 2 or not row[-1].strip():
            raise VoiceDirError(f"{root / METADATA} line {line}: expected NAME|transcript")
        name = row[0].strip()
        wav = next(
            (p for p in (root / "wavs" / f"{name}.wav", root / f"{name}.wav") if p.exists()), None
        )
        if wav is None:
            raise VoiceDirError(
                f"{root / METADATA} line {line}: no recording {name}.wav in {root}/wavs or {root}"
            )
        entries.append({"id": name, "audio": str(wav), "text": row[-1].strip()})
    return entries


def _from_pairs(root: epath.Path) -> list[dict]:
    wavs = {p.stem: p for p in root.glob("*.wav")}
    texts = {p.stem: p for p in root.glob("*.txt")}
    unpaired = sorted(f"{n}.wav (no {n}.txt)" for n in wavs.keys() - texts.keys())
    unpaired += sorted(f"{n}.txt (no {n}.wav)" for n in texts.keys() - wavs.keys())
    if unpaired:
        raise VoiceDirError(f"--voice-dir {root}: unpaired files: {', '.join(unpaired)}")
    entries = [
        {"id": n, "audio": str(wavs[n]), "text": " ".join(texts[n].read_text().split())}
        for n in sorted(wavs)
    ]
    empty = [e["id"] for e in entries if not e["text"]]
    if empty:
        raise VoiceDirError(f"--voice-dir {root}: empty transcripts: {', '.join(empty)}")
    return entries


def read_voice_dir(voice_dir: str) -> list[dict]:
    """The recordings of a voice folder as [{"id", "audio", "text"}], in name order."""
    root = paths.resolve(voice_dir)
    if not root.is_dir():
        raise VoiceDirError(f"--voice-dir {voice_dir}: not a directory")
    entries = _from_metadata(root) if (root / METADATA).exists() else _from_pairs(root)
    if not entries:
        raise VoiceDirError(
            f"--voice-dir {voice_dir}: no recordings (expected NAME.wav + NAME.txt pairs or "
            f"{METADATA})"
        )
    return sorted(entries, key=lambda e: e["id"])


def split(entries: list[dict], every: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): every `every`-th entry is held out, at least one while there are two."""
    held = {i for i in range(len(entries)) if every and i % every == every - 1}
    if every and not held and len(entries) > 1:
        held = {len(entries) - 1}
    train = [e for i, e in enumerate(entries) if i not in held]
    return train, [e for i, e in enumerate(entries) if i in held]


def _write_manifest(path: epath.Path, entries: list[dict], speaker: str) -> None:
    lines = [
        json.dumps({**e, "speaker": speaker, "task": "tts"}, ensure_ascii=False) + "\n"
        for e in entries
    ]
    path.write_text("".join(lines))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voice-dir", required=True, help="WAV files with transcripts (see above)")
    p.add_argument("--checkpoint", required=True, help="audio tokenizer checkpoint")
    p.add_argument("--out", required=True, help="output directory (local or gs://)")
    p.add_argument(
        "--held-out", type=int, default=5, help="every Nth recording is held out (N >= 2; 0: none)"
    )
    p.add_argument("--speaker", help="speaker name (default: the folder's name)")
    logs.add_flag(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure(args.log_level)
    if args.held_out < 0 or args.held_out == 1:
        print(f"error: --held-out {args.held_out}: expected 0 (none) or N >= 2", file=sys.stderr)
        return 2
    try:
        entries = read_voice_dir(args.voice_dir)
    except VoiceDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parts = split(entries, args.held_out)  # N >= 2 leaves recordings to train on
    speaker = args.speaker or paths.resolve(args.voice_dir).name
    out = paths.resolve(args.out)
    out.mkdir(parents=True, exist_ok=True)
    code = 0
    for name, part in zip(("train", "heldout"), parts):
        if not part:
            continue
        _write_manifest(out / f"{name}.jsonl", part, speaker)
        print(f"{name}: {len(part)} recordings of {speaker}", flush=True)
        code |= tokenize.main(
            [
                "--manifest",
                str(out / f"{name}.jsonl"),
                "--checkpoint",
                args.checkpoint,
                "--out",
                str(out / name),
                "--log-level",
                args.log_level,
            ]
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
