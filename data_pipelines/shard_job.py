"""One shard of the tokenize job: its manifest lines' audio encoded in batches of similar length,
written through a temporary name, then its sidecar (what `data_pipelines.tokenize` reads back to
skip a finished shard). Both engines run `ShardJob.run`: the local one in its process, the ray one
(`data_pipelines.tokenize_ray`) in its actors, so a shard's bytes do not depend on the engine."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
from etils import epath

from data_pipelines import conversations, encoders
from data_pipelines.shards import Record, ShardError, ShardWriter, open_shard, write_json_atomic
from mimo_jax.tokenizer import audio_io
from mimo_jax.tokenizer.config import TokenizerConfig

Unit = tuple[int, int]  # (manifest line, index of the audio in its line): one encoded audio


class WorkerError(RuntimeError):
    """A worker of the ray engine failed in a way no retry mends (its encoder did not load, its
    code raised); the message is the worker's."""


@dataclasses.dataclass
class Item:
    """A good manifest line: its audios (one, or a conversation's every one, maybe none) become
    one record."""

    line: int
    audios: list[str]
    id: str
    text: str = ""
    speaker: str = ""
    language: str = ""
    task: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    conversation: dict | None = None  # its own keys, audio values as given in the manifest

    @property
    def audio(self) -> str | None:
        return self.audios[0] if self.audios else None


def error_entry(line: int, audio: str | None, reason: str) -> dict:
    return {"line": line, "audio": audio, "reason": reason}


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}"


def length_batches(
    lengths: dict[Any, float], max_seconds: float, max_items: int
) -> list[list[Any]]:
    """Groups keys into batches of similar length (sorted), each under `max_seconds` of audio."""
    order = sorted(lengths, key=lambda k: (lengths[k], k))
    batches: list[list[Any]] = []
    cur: list[Any] = []
    total = 0.0
    for k in order:
        if cur and (total + lengths[k] > max_seconds or len(cur) >= max_items):
            batches.append(cur)
            cur, total = [], 0.0
        cur.append(k)
        total += lengths[k]
    if cur:
        batches.append(cur)
    return batches


class ShardJob:
    """Encodes the items of one shard and writes the shard and its sidecar."""

    def __init__(
        self, out: epath.Path, k: int, n: int, entries: list, checksum: int, encoding: dict, args
    ):
        self.out, self.k, self.n, self.entries, self.checksum = out, k, n, entries, checksum
        self.encoding, self.args = encoding, args
        self.encode: encoders.EncodeBatch  # given to `run`
        self.audio: TokenizerConfig  # the encoder's (rates, codebook sizes): `run`, `give_up`
        self.name = shard_name(k, n)
        self.sidecar = out / f"{self.name}.json"
        self.items: dict[int, Item] = {}
        self.failed: dict[int, dict] = {}  # line -> its one error entry

    def mismatch(self, info: dict) -> str | None:
        """Why a sidecar's shard is not this one (other manifest lines, another encoding)."""
        if info.get("lines_crc32") != self.checksum:
            return "written from different manifest lines"
        theirs = info.get("encoding")
        if theirs is not None and theirs != self.encoding:
            changed = [
                "another --checkpoint (its files differ)"
                if k == "checkpoint"
                else f"--{k} {theirs.get(k)} (now {v})"
                for k, v in self.encoding.items()
                if theirs.get(k) != v
            ]
            return f"encoded with other settings: {', '.join(changed)}"
        return None

    def done(self) -> bool:
        """The sidecar matches the manifest lines and the encoding, and the shard's file holds
        the records the sidecar counts."""
        if not self.sidecar.exists():
            return False
        info = json.loads(self.sidecar.read_text())
        if self.mismatch(info) or info.get("encoding") is None:
            return False
        try:
            open_shard(str(self.out / info["path"]), info["records"]).close()
        except ShardError:
            return False
        return True

    @property
    def units(self) -> int:
        """Progress units of the shard: one per audio, one per line without any."""
        return sum(max(1, len(e.audios)) if isinstance(e, Item) else 1 for e in self.entries)

    @property
    def lines(self) -> tuple[int, int]:
        """The shard's first and last manifest line."""
        first = self.k * self.args.records_per_shard + 1
        return first, first + len(self.entries) - 1

    def run(self, progress, encode: encoders.EncodeBatch) -> dict:
        self.encode, self.audio = encode, encoders.config_of(encode)
        self.sidecar.unlink(missing_ok=True)  # unfinished until its new sidecar is written
        self.items = {e.line: e for e in self.entries if isinstance(e, Item)}
        self.failed = {}
        seconds = self._probe()
        codes: dict[Unit, np.ndarray] = {}
        for batch in length_batches(seconds, self.args.batch_seconds, self.args.max_batch):
            codes.update(self._encode(batch))
            progress.update(len(batch))
        progress.update(self.units - len(seconds))
        errors = [e for e in self.entries if isinstance(e, dict)] + list(self.failed.values())
        return self._write(codes, seconds, errors)

    def give_up(self, audio: TokenizerConfig, reason: str) -> dict:
        """Commits the shard with no record, each of its lines an error (its parse error, else
        `reason`): for a shard the job cannot encode, so that every line is accounted for."""
        self.audio, self.items = audio, {}
        errors = [
            e if isinstance(e, dict) else error_entry(e.line, e.audio, reason) for e in self.entries
        ]
        return self._write({}, {}, errors)

    def _fail(self, unit: Unit, reason: str) -> None:
        """The line of `unit` fails (its first failing audio and reason are reported)."""
        line = unit[0]
        self.failed.setdefault(line, error_entry(line, self._path(unit), reason))

    def _path(self, unit: Unit) -> str:
        return self.items[unit[0]].audios[unit[1]]

    def _probe(self) -> dict[Unit, float]:
        """Seconds of every audio of the lines whose audios can all be read."""
        seconds = {}
        for line, item in self.items.items():
            for i in range(len(item.audios)):
                try:
                    seconds[line, i] = audio_io.audio_seconds(item.audios[i])
                except Exception as e:  # any decoder error is a property of the file
                    self._fail((line, i), f"bad audio: {e}")
                    break
        return {u: s for u, s in seconds.items() if u[0] not in self.failed}

    def _encode(self, batch: list[Unit]) -> dict[Unit, np.ndarray]:
        wavs = {}
        for unit in batch:
            if unit[0] in self.failed:  # another audio of its line failed
                continue
            try:
                wavs[unit] = audio_io.read_audio(
                    self._path(unit),
                    self.audio.sampling_rate,
                    min_samples=self.audio.min_samples,
                    allow_silence=True,
                )
            except Exception as e:
                self._fail(unit, f"bad audio: {e}")
        return self._encode_wavs(wavs)

    def _encode_wavs(self, wavs: dict[Unit, np.ndarray]) -> dict[Unit, np.ndarray]:
        """Codes of each wav; when the encoder refuses the batch (ValueError: e.g. a clip below its
        minimum length), each clip is retried alone and the refused ones fail their lines."""
        if not wavs:
            return {}
        units = list(wavs)
        try:
            outs = self.encode([wavs[u] for u in units])
        except ValueError as e:
            if len(units) == 1:
                self._fail(
                    units[0],
                    f"refused by the encoder ({len(wavs[units[0]])} samples at "
                    f"{self.audio.sampling_rate} Hz): {e}",
                )
                return {}
            return {k: v for u in units for k, v in self._encode_wavs({u: wavs[u]}).items()}
        result = {}
        for unit, c in zip(units, outs):
            c = np.asarray(c)
            want = (self.audio.clip_code_frames(len(wavs[unit])), self.args.codebooks)
            if c.shape != want:
                raise RuntimeError(
                    f"encoder returned codes {c.shape} for {self._path(unit)} "
                    f"({len(wavs[unit])} samples), expected {want}"
                )
            result[unit] = c.astype(np.int16)
        return result

    def _record(self, item: Item, codes: list[np.ndarray], seconds: float) -> Record:
        meta = item.meta
        if item.conversation is not None:
            spans = conversations.with_spans(item.conversation, [len(c) for c in codes])
            meta = {**meta, "conversation": spans}
        return Record(
            id=item.id,
            codes=np.concatenate(codes) if codes else np.zeros((0, self.args.codebooks), np.int16),
            text=item.text,
            speaker=item.speaker,
            language=item.language,
            task=item.task,
            duration=seconds,
            meta=meta,
        )

    def _write(self, codes: dict, seconds: dict, errors: list) -> dict:
        writer = ShardWriter(str(self.out / f"{self.name}.array_record"), self.audio.frame_rate)
        for line in sorted(set(self.items) - set(self.failed)):
            item = self.items[line]
            units = [(line, i) for i in range(len(item.audios))]
            writer.write(
                self._record(item, [codes[u] for u in units], sum(seconds[u] for u in units))
            )
        stats = writer.close()
        errors.sort(key=lambda e: e["line"])
        info = {
            "path": f"{self.name}.array_record",
            **stats,
            "errors": len(errors),
            "lines": len(self.entries),
            "lines_crc32": self.checksum,
            "encoding": self.encoding,
            "codebook_sizes": list(self.audio.codebook_sizes[: self.args.codebooks]),
            "frame_rate": self.audio.frame_rate,
            "error_entries": errors,
        }
        write_json_atomic(self.sidecar, info)
        return info


def check_codebooks(codebooks: int, audio: TokenizerConfig) -> None:
    available = len(audio.codebook_sizes)
    if not 1 <= codebooks <= available:
        raise ValueError(
            f"--codebooks {codebooks}: expected 1 to {available}, the audio tokenizer's codebooks"
        )
