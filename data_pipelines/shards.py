"""Shards of tokenized corpora: one ArrayRecord record per utterance, a manifest per directory.

Why ArrayRecord: Grain reads it with random access (`grain.sources.ArrayRecordDataSource`), a
record is one utterance so a corrupt one stays local, and its C++ reader reads `gs://` directly
(google-cloud-cpp; CLOUD_STORAGE_EMULATOR_ENDPOINT points it at an emulator). Its writer only
writes local files (a gs:// name is opened as a local path), so a shard for gs:// is written to a
local temporary file and uploaded whole when closed.
Tensorstore arrays would need a separate index for variable-length utterances and their text.

Record layout (little endian):
  b"MAR1" | u32 header length | header (UTF-8 JSON: id, text, speaker, language, task, duration,
  frames, codebooks, meta) | int16 codes [frames, codebooks] | u32 CRC-32 of all preceding bytes.
The length and the CRC detect truncation and corruption; readers report the shard and record.
A shard file that is missing or holds another number of records than the manifest says is an
error of the whole directory (`ShardError`), never a bad record to skip.

`DIR/manifest.json` lists the shards with `records`, `hours`, `frames`, `errors` each and in total.

Command: `python -m data_pipelines.shards DIR [--show N] [--export ID OUT.npy]`.
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import dataclasses
import json
import os
import struct
import sys
import tempfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from array_record.python import array_record_module
from etils import epath

from mimo_jax import paths
from mimo_jax.tokenizer.config import TokenizerConfig

MAGIC = b"MAR1"
FORMAT = "mimo-jax-codes/1"
MANIFEST = "manifest.json"
_HEAD = struct.Struct("<4sI")


class RecordError(ValueError):
    """A record that cannot be used; the message names the shard, the record and the reason."""

    def __init__(self, shard: str, index: int, reason: str):
        super().__init__(f"shard {shard} record {index}: {reason}")
        self.shard, self.index, self.reason = shard, index, reason


class ShardError(ValueError):
    """A shard file that cannot be read as its directory's manifest lists it."""


def open_shard(path: str, records: int):
    """An ArrayRecord reader of `path`, checked to hold `records` records. ArrayRecord opens a
    missing or damaged file as one of 0 records: the file's existence is checked first."""
    if not epath.Path(path).exists():
        raise ShardError(f"shard {path}: missing (the manifest lists {records} records in it)")
    reader = array_record_module.ArrayRecordReader(
        str(path), "readahead_buffer_size:0", file_reader_buffer_size=32768
    )
    if reader.num_records() != records:
        found = reader.num_records()
        reader.close()
        raise ShardError(f"shard {path}: holds {found} records, the manifest says {records}")
    return reader


@dataclasses.dataclass
class Record:
    """One utterance: RVQ codes `[frames, codebooks]` int16 (frames may be 0 for text-only data)."""

    id: str
    codes: np.ndarray
    text: str = ""
    speaker: str = ""
    language: str = ""
    task: str = ""
    duration: float = 0.0
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    origin: str = ""  # "shard PATH record N" when read from a shard (not stored)

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


def encode_record(rec: Record) -> bytes:
    codes = np.asarray(rec.codes)
    if codes.ndim != 2:
        raise ValueError(
            f"record {rec.id}: codes must be [frames, codebooks], got shape {codes.shape}"
        )
    if codes.size and (
        codes.min() < np.iinfo(np.int16).min or codes.max() > np.iinfo(np.int16).max
    ):
        raise ValueError(f"record {rec.id}: codes do not fit int16")
    header = json.dumps(
        {
            "id": rec.id,
            "text": rec.text,
            "speaker": rec.speaker,
            "language": rec.language,
            "task": rec.task,
            "duration": float(rec.duration),
            "frames": int(codes.shape[0]),
            "codebooks": int(codes.shape[1]),
            "meta": rec.meta,
        },
        ensure_ascii=False,
    ).encode()
    body = _HEAD.pack(MAGIC, len(header)) + header + codes.astype("<i2").tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def decode_record(
    data: bytes, shard: str = "?", index: int = -1, codebooks: int | None = None
) -> Record:
    """Parses and checks one record; raises `RecordError` naming `shard` and `index`."""

    def fail(reason):
        raise RecordError(shard, index, reason)

    if len(data) < _HEAD.size + 4:
        fail(f"truncated: {len(data)} bytes, shorter than the fixed header")
    magic, hlen = _HEAD.unpack_from(data)
    if magic != MAGIC:
        fail(f"bad magic {magic!r}, expected {MAGIC!r}")
    if _HEAD.size + hlen + 4 > len(data):
        fail(f"truncated: header of {hlen} bytes does not fit in {len(data)} bytes")
    try:
        head = json.loads(data[_HEAD.size : _HEAD.size + hlen])
        frames, cbs = int(head["frames"]), int(head["codebooks"])
    except (ValueError, KeyError, TypeError) as e:
        fail(f"unreadable header: {e}")
    want = _HEAD.size + hlen + frames * cbs * 2 + 4
    if len(data) != want:
        fail(
            f"truncated or padded: {len(data)} bytes, expected {want} for {frames} frames x "
            f"{cbs} codebooks"
        )
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) != crc:
        fail("checksum mismatch (corrupt data)")
    if codebooks is not None and cbs < codebooks:
        fail(f"codes have {cbs} codebooks, expected {codebooks}")
    codes = np.frombuffer(data, "<i2", frames * cbs, _HEAD.size + hlen).reshape(frames, cbs)
    if codebooks is not None:
        codes = codes[:, :codebooks]
    return Record(
        id=head["id"],
        codes=codes,
        text=head.get("text", ""),
        speaker=head.get("speaker", ""),
        language=head.get("language", ""),
        task=head.get("task", ""),
        duration=float(head.get("duration", 0.0)),
        meta=head.get("meta") or {},
        origin=f"shard {shard} record {index}",
    )


class ShardWriter:
    """Writes records to `path` through a temporary name; `close()` makes the shard appear."""

    def __init__(self, path: str, frame_rate: float):
        self.path = paths.resolve(path)
        self.frame_rate = frame_rate  # code frames per second, for the hours of audio
        if paths.is_local(self.path):
            self._tmp = str(self.path.parent / (self.path.name + ".tmp"))
        else:
            fd, self._tmp = tempfile.mkstemp(suffix=".array_record")
            os.close(fd)
        self._writer = array_record_module.ArrayRecordWriter(self._tmp, "group_size:1")
        self.stats = {"records": 0, "frames": 0, "hours": 0.0}

    def write(self, rec: Record) -> None:
        self._writer.write(encode_record(rec))
        self.stats["records"] += 1
        self.stats["frames"] += rec.frames
        self.stats["hours"] += rec.frames / self.frame_rate / 3600

    def close(self) -> dict:
        self._writer.close()
        if paths.is_local(self.path):
            os.replace(self._tmp, self.path)
        else:
            try:
                paths.upload(self._tmp, self.path)
            finally:
                os.unlink(self._tmp)
        return dict(self.stats)


def write_json_atomic(path: epath.Path, obj: Any) -> None:
    paths.write_whole(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_manifest(
    directory: str,
    shards: Sequence[dict],
    codebook_sizes: Sequence[int],
    frame_rate: float,
    **extra,
) -> dict:
    """`shards`: dicts with `path` (relative to `directory`), `records`, `hours`, `frames`,
    `errors`; `codebook_sizes` and `frame_rate` are the audio tokenizer's (checked against the LM
    when it trains on the shards)."""
    totals = {k: sum(s[k] for s in shards) for k in ("records", "hours", "frames", "errors")}
    manifest = {
        "format": FORMAT,
        "codebooks": len(codebook_sizes),
        "codebook_sizes": list(codebook_sizes),
        "frame_rate": frame_rate,
        **totals,
        "shards": list(shards),
        **extra,
    }
    write_json_atomic(epath.Path(directory) / MANIFEST, manifest)
    return manifest


def write_shards(
    directory: str,
    records: Sequence[Record],
    records_per_shard: int,
    codebooks: int,
    audio: TokenizerConfig | None = None,
) -> dict:
    """Writes `records` into consecutive shards and the manifest (synthetic data, tests, tools);
    `audio` is the tokenizer the codes are of (default: the released one's sizes)."""
    audio = audio or TokenizerConfig()
    root = paths.resolve(directory)
    root.mkdir(parents=True, exist_ok=True)
    n = max(1, -(-len(records) // records_per_shard))
    entries = []
    for k in range(n):
        name = f"shard-{k:05d}-of-{n:05d}.array_record"
        writer = ShardWriter(str(root / name), audio.frame_rate)
        for rec in records[k * records_per_shard : (k + 1) * records_per_shard]:
            writer.write(rec)
        entries.append({"path": name, **writer.close(), "errors": 0})
    return write_manifest(str(root), entries, audio.codebook_sizes[:codebooks], audio.frame_rate)


def read_manifest(directory: str) -> dict:
    path = epath.Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no shard manifest (expected the output of data_pipelines.tokenize)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class ShardSet:
    """Random access to the records of one shard directory (a Grain `RandomAccessDataSource`).

    `self[i]` returns the decoded `Record` or raises `RecordError`; `get(i)` returns the error
    instead of raising, for pipelines that may skip bad records. A shard that cannot be read
    raises `ShardError` from both (`problems()` lists them all up front).
    """

    def __init__(self, directory: str, codebooks: int | None = None):
        self.directory = str(directory)
        self.manifest = read_manifest(self.directory)
        self.codebooks = codebooks
        self.shard_paths = [
            str(epath.Path(self.directory) / s["path"]) for s in self.manifest["shards"]
        ]
        counts = [int(s["records"]) for s in self.manifest["shards"]]
        self._starts = list(np.cumsum([0] + counts))
        self._readers: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global record index -> (shard number, record number inside the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(
                f"record {index} out of range for {len(self)} records in {self.directory}"
            )
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - int(self._starts[shard])

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            reader = open_shard(self.shard_paths[shard], self._count(shard))
            self._readers[shard] = reader
        return reader

    def _count(self, shard: int) -> int:
        return int(self._starts[shard + 1] - self._starts[shard])

    def problems(self) -> list[str]:
        """One line per shard that cannot be read as the manifest lists it (each shard opened
        and closed; in threads, as on gs:// each open waits for the store)."""

        def problem(shard: int) -> str | None:
            try:
                open_shard(self.shard_paths[shard], self._count(shard)).close()
            except ShardError as e:
                return str(e)
            return None

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return [p for p in pool.map(problem, range(len(self.shard_paths))) if p]

    def read_bytes(self, index: int) -> tuple[str, int, bytes]:
        shard, local = self.locate(index)
        reader = self._reader(shard)
        try:
            data = reader.read([local])[0]
        except Exception as e:  # riegeli reports a damaged chunk as a generic error
            raise RecordError(self.shard_paths[shard], local, f"unreadable: {e}") from e
        return self.shard_paths[shard], local, data

    def __getitem__(self, index) -> Record:
        path, local, data = self.read_bytes(int(index))
        return decode_record(data, path, local, self.codebooks)

    def get(self, index) -> Record | RecordError:
        try:
            return self[index]
        except RecordError as e:
            return e

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def lenient(self) -> "LenientShards":
        return LenientShards(self)

    # Readers hold file handles: reopen them in each process.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state


class LenientShards:
    """The same records, with `RecordError`s returned as elements instead of raised."""

    def __init__(self, shards: ShardSet):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index) -> Record | RecordError:
        return self.shards.get(index)


def _summary(manifest: dict) -> str:
    lines = [
        f"{manifest['records']} records, {manifest['hours']:.3f} h, {manifest['frames']} frames, "
        f"{manifest['errors']} errors, {manifest['codebooks']} codebooks, "
        f"{len(manifest['shards'])} shards"
    ]
    for s in manifest["shards"]:
        lines.append(
            f"  {s['path']}: {s['records']} records, {s['hours']:.3f} h, {s['frames']} frames, "
            f"{s['errors']} errors"
        )
    return "\n".join(lines)


def _describe(rec: Record) -> str:
    head = rec.codes[:2].tolist()
    return (
        f"  {rec.id}: {rec.frames} frames x {rec.codes.shape[1]} codebooks ({rec.duration:.2f} s) "
        f"speaker={rec.speaker!r} language={rec.language!r} task={rec.task!r} "
        f"text={rec.text[:60]!r} first frames={head}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.shards", description=__doc__.split("\n")[0]
    )
    parser.add_argument("dir", help="shard directory (local or gs://)")
    parser.add_argument("--show", type=int, default=3, help="records to print")
    parser.add_argument(
        "--export",
        nargs=2,
        metavar=("ID", "OUT.npy"),
        help="write one record's codes [frames, codebooks] to OUT.npy",
    )
    args = parser.parse_args(argv)
    shards = ShardSet(args.dir)
    print(_summary(shards.manifest))
    if args.export:
        rec_id, out = args.export
        for i in range(len(shards)):
            rec = shards[i]
            if rec.id == rec_id:
                with epath.Path(out).open("wb") as f:
                    np.save(f, np.asarray(rec.codes))
                print(f"wrote {out}: codes {tuple(rec.codes.shape)} int16 of record {rec_id}")
                return 0
        print(f"no record with id {rec_id!r} in {args.dir}", file=sys.stderr)
        return 1
    for i in range(min(args.show, len(shards))):
        print(_describe(shards[i]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
