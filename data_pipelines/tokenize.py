"""Tokenize an audio corpus into RVQ-code shards.

  python -m data_pipelines.tokenize --manifest corpus.jsonl --checkpoint CKPT --out DIR

The manifest has one JSON object per line: `audio` (a path, relative to the manifest's folder or
absolute, local or gs://) and optional `id` (default: the audio file's stem), `text`, `speaker`,
`language`, `task`; other keys are kept as the record's `meta`. A line with `messages` instead is
a conversation (`data_pipelines.conversations` has its formats): every audio of it is encoded,
and its record holds them all.

Lines are cut into shards of `--records-per-shard` consecutive lines. With `--engine local` (the
default) process p of n (default `jax.process_index()` / `jax.process_count()`) takes shards p,
p+n, ...; with `--engine ray` a pool of Ray actors pulls the shards one at a time
(`data_pipelines.tokenize_ray`), and the output is the same. Within a shard, audio is sorted by
length and encoded in batches of at most `--batch-seconds` of audio.

A finished shard has its `.array_record` file and a `.json` sidecar, written last (stats, errors, a
checksum of its manifest lines, and its `encoding`: the encoder, a fingerprint of the checkpoint's
files and the codebooks). A rerun skips a shard only when its sidecar matches the manifest lines
and the encoding and its file holds the sidecar's records, and redoes the others; a sidecar
without `encoding` (an earlier version's) counts as unfinished. A rerun into a directory holding
shards of other manifest lines, another encoding or another `--records-per-shard` is refused
before anything is encoded, unless `--overwrite`: those shards are then redone, and the shards of
another layout removed.

Every bad line (not UTF-8, not JSON, no audio path, duplicate id, missing or undecodable audio, a
clip the encoder refuses such as one shorter than its minimum, a conversation its format cannot
take) is written to `DIR/errors.jsonl` with its `audio` (the failing one), manifest `line` and
`reason`, and the job goes on: one bad line never costs the good lines of its shard. When all
shards are done, `DIR/manifest.json` and `DIR/errors.jsonl` are written (a run with shards to redo
removes `DIR/manifest.json` first). Exit status 0 when every line was written or reported; a bad
argument or a refused directory is one line and exit status 2; a worker's error that stops the
ray engine is one line and exit status 1. `--manifest`, `--out` and the audio paths may be
relative, local or gs://.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any

import tqdm
from etils import epath

from data_pipelines import conversations, encoders
from data_pipelines.shard_job import (
    Item,
    ShardJob,
    WorkerError,
    check_codebooks,
    error_entry,
)
from data_pipelines.shards import MANIFEST, write_manifest
from mimo_jax import logs, paths

log = logging.getLogger(__name__)

STANDARD_KEYS = ("audio", "id", "text", "speaker", "language", "task")
ERRORS = "errors.jsonl"


def parse_manifest_line(raw: bytes, line: int, base: epath.Path) -> Item | dict:
    """One manifest line -> `Item`, or an error entry naming the line and the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return error_entry(
            line,
            None,
            f"not UTF-8: byte 0x{raw[e.start]:02x} at column "
            f"{e.start + 1} ({e.reason}); expected UTF-8 JSON",
        )
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return error_entry(line, None, f"not JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return error_entry(line, None, f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _conversation_item(obj, line, base)
    path = obj.get("audio")
    if not isinstance(path, str) or not path:
        return error_entry(line, None, "no 'audio' path")
    fields: dict[str, Any] = {
        k: str(obj[k]) for k in ("text", "speaker", "language", "task") if obj.get(k) is not None
    }
    meta = {k: v for k, v in obj.items() if k not in STANDARD_KEYS}
    return Item(
        line=line,
        audios=[_resolve(path, base)],
        id=str(obj.get("id") or epath.Path(path).stem),
        meta=meta,
        **fields,
    )


def _resolve(path: str, base: epath.Path) -> str:
    return path if "://" in path or path.startswith("/") else str(base / path)


def _conversation_item(obj: dict, line: int, base: epath.Path) -> Item | dict:
    def bad(reason: str) -> dict:
        return error_entry(line, None, f"conversation: {reason}")

    for key in ("audio", "text"):
        if key in obj:
            return bad(f"{key!r} beside messages: a conversation's {key} is in its messages")
    for key in ("id", "task"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            return bad(f"no {key!r} (a conversation needs its id and task)")
    conv = {k: obj[k] for k in conversations.KEYS if k in obj}
    try:
        conversations.check(obj["task"], conv)
    except conversations.ConversationError as e:
        return bad(str(e))
    return Item(
        line=line,
        audios=[_resolve(p, base) for p in conversations.audio_values(conv)],
        id=obj["id"],
        speaker=str(obj.get("speaker") or ""),
        language=str(obj.get("language") or ""),
        task=obj["task"],
        meta={k: v for k, v in obj.items() if k not in STANDARD_KEYS + conversations.KEYS},
        conversation=conv,
    )


def read_manifest_lines(path: str) -> list[bytes]:
    """The raw lines (decoded one by one later, so one line that is not UTF-8 is one error)."""
    file = paths.resolve(path)
    if file.is_dir():
        raise ValueError(f"--manifest {path}: a directory; expected a JSONL manifest file")
    if not file.exists():
        raise FileNotFoundError(f"--manifest {path}: no such file; expected a JSONL manifest")
    lines = file.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def parse_manifest(lines: Sequence[bytes], base: epath.Path) -> list[Item | dict]:
    """All lines in order (line numbers from 1); blank lines are reported, duplicate ids too."""
    seen: dict[str, int] = {}
    out: list[Item | dict] = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            out.append(error_entry(n, None, "blank line"))
            continue
        item = parse_manifest_line(raw, n, base)
        if isinstance(item, Item):
            if item.id in seen:
                item = error_entry(
                    n, item.audio, f"duplicate id {item.id!r} (first on line {seen[item.id]})"
                )
            else:
                seen[item.id] = n
        out.append(item)
    return out


def finalize(out: epath.Path, jobs: list[ShardJob], total_lines: int) -> dict | None:
    """Writes manifest.json and errors.jsonl once every shard is done; else None."""
    if not all(job.done() for job in jobs):
        return None
    infos = [json.loads(job.sidecar.read_text()) for job in jobs]
    errors = [e for info in infos for e in info["error_entries"]]
    paths.write_whole(
        out / ERRORS, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
    )
    shards = [
        {k: info[k] for k in ("path", "records", "hours", "frames", "errors")} for info in infos
    ]
    return write_manifest(
        str(out), shards, infos[0]["codebook_sizes"], infos[0]["frame_rate"], lines=total_lines
    )


def check_directory(out: epath.Path, jobs: list[ShardJob], overwrite: bool) -> None:
    """Refuses `out` when it holds shards this run would not make (other manifest lines, another
    encoding, another layout), unless `overwrite`: then those of another layout are removed (the
    others are redone in place). One line names the first such shard."""
    mine = {job.sidecar.name: job for job in jobs}
    found = []
    for sidecar in sorted(out.glob("shard-*-of-*.json")):
        job = mine.get(sidecar.name)
        if job is None:
            found.append(
                (
                    sidecar,
                    f"a shard of another layout (now {len(jobs)} shards: another manifest "
                    f"length or --records-per-shard)",
                )
            )
        elif why := job.mismatch(json.loads(sidecar.read_text())):
            found.append((sidecar, why))
    if found and not overwrite:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ValueError(
            f"{found[0][0]}: {found[0][1]}{more}; use --overwrite to redo such shards, or "
            f"another --out"
        )
    for sidecar, _ in found:
        if sidecar.name not in mine:
            sidecar.unlink(missing_ok=True)  # the sidecar first: it marks the shard finished
            sidecar.with_suffix(".array_record").unlink(missing_ok=True)


def encoding_of(args) -> dict:
    """What a shard's codes depend on besides its manifest lines."""
    checkpoint = None
    if args.checkpoint:
        if not paths.resolve(args.checkpoint).exists():
            raise FileNotFoundError(
                f"--checkpoint {args.checkpoint}: no such file or directory; expected an audio "
                f"tokenizer checkpoint"
            )
        checkpoint = paths.fingerprint(paths.resolve(args.checkpoint))
    return {"encoder": args.encoder, "checkpoint": checkpoint, "codebooks": args.codebooks}


def _process_slice(args) -> tuple[int, int]:
    if args.process_index is not None:
        return args.process_index, args.process_count or 1
    import jax  # only when the slice is not given explicitly

    if args.distributed:
        jax.distributed.initialize()
    return jax.process_index(), jax.process_count()


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.tokenize", description=__doc__.split("\n")[1]
    )
    p.add_argument("--manifest", required=True, help="JSONL corpus manifest")
    p.add_argument("--checkpoint", help="audio tokenizer checkpoint (for --encoder mimo)")
    p.add_argument("--out", required=True, help="output shard directory (local or gs://)")
    p.add_argument(
        "--encoder",
        default="mimo",
        help="mimo | energy | module:function (see data_pipelines.encoders)",
    )
    p.add_argument("--codebooks", type=int, default=8)
    p.add_argument("--records-per-shard", type=int, default=512)
    p.add_argument(
        "--batch-seconds", type=float, default=600.0, help="audio seconds per encoder batch"
    )
    p.add_argument("--max-batch", type=int, default=64, help="utterances per encoder batch")
    p.add_argument(
        "--engine",
        default="local",
        choices=("local", "ray"),
        help="local: this process encodes its slice; ray: a pool of Ray actors pulls shards",
    )
    p.add_argument("--process-index", type=int, help="default: jax.process_index()")
    p.add_argument("--process-count", type=int, help="default: jax.process_count()")
    p.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first"
    )
    ray_flags = p.add_argument_group("--engine ray (see data_pipelines.tokenize_ray)")
    ray_flags.add_argument(
        "--ray-address",
        help="the cluster's head, host:port (default: $RAY_ADDRESS, else a new Ray here)",
    )
    ray_flags.add_argument(
        "--workers", type=int, help="actors (default: the cluster's accelerators, else CPUs)"
    )
    ray_flags.add_argument(
        "--worker-accelerators",
        type=int,
        default=1,
        help="GPUs or TPU chips per actor where the cluster has them (0: CPU actors)",
    )
    ray_flags.add_argument(
        "--max-retries", type=int, default=3, help="times a shard is retried after its actor died"
    )
    ray_flags.add_argument(
        "--verbosity", action="count", default=0, help="also each actor's shards and rate"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo the shards of --out made from other lines or with other settings",
    )
    logs.add_flag(p)
    return p.parse_args(argv)


def check_args(args) -> None:
    if args.records_per_shard < 1:
        raise ValueError(
            f"--records-per-shard {args.records_per_shard}: expected 1 or more lines per shard"
        )
    if args.codebooks < 1:
        raise ValueError(
            f"--codebooks {args.codebooks}: expected 1 or more (at most the audio tokenizer's)"
        )
    if args.engine == "ray":
        check_ray_args(args)
    elif args.ray_address is not None or args.workers is not None:
        flag = "--ray-address" if args.ray_address is not None else "--workers"
        raise ValueError(f"{flag}: a flag of --engine ray; the local engine is one process")


def check_ray_args(args) -> None:
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: expected 1 or more Ray actors")
    if args.max_retries < 0:
        raise ValueError(f"--max-retries {args.max_retries}: expected 0 or more")
    if args.worker_accelerators < 0:
        raise ValueError(
            f"--worker-accelerators {args.worker_accelerators}: expected 0 (CPU actors) or more"
        )
    if args.ray_address not in (None, "auto", "local"):
        from data_pipelines import tokenize_ray  # Ray only for its engine (the `ray` extra)

        tokenize_ray.check_reachable(args.ray_address)
    for flag, value in (
        ("--process-index", args.process_index),
        ("--process-count", args.process_count),
        ("--distributed", args.distributed or None),
    ):
        if value is not None:
            raise ValueError(f"{flag}: a flag of --engine local; the ray engine takes every shard")


def shard_jobs(args, out: epath.Path, lines: list[bytes], entries: list) -> list[ShardJob]:
    """Every shard of the corpus, in order (a process takes its slice)."""
    encoding = encoding_of(args)
    per = args.records_per_shard
    n = max(1, -(-len(entries) // per))
    return [
        ShardJob(
            out,
            k,
            n,
            entries[k * per : (k + 1) * per],
            zlib.crc32(b"\n".join(lines[k * per : (k + 1) * per])),
            encoding,
            args,
        )
        for k in range(n)
    ]


def run_local(
    args, out: epath.Path, who: str, mine: list[ShardJob], pending: list[ShardJob], encode
) -> int:
    """Encodes this process's unfinished shards (`pending`, of `mine`) here; returns how many."""
    if pending:
        if encode is None:
            encode = encoders.load_encoder(args.encoder, args.checkpoint, args.codebooks)
        check_codebooks(args.codebooks, encoders.config_of(encode))
        (out / MANIFEST).unlink(missing_ok=True)  # rewritten once every shard is done again
    log.info("%s: %d shards, %d already done", who, len(mine), len(mine) - len(pending))
    with tqdm.tqdm(
        total=sum(j.units for j in pending), unit="audio", desc="tokenize", disable=None
    ) as progress:
        for job in pending:
            info = job.run(progress, encode)
            progress.set_postfix(shard=job.k, hours=f"{info['hours']:.2f}", errors=info["errors"])
    return len(pending)


def run(args, encode=None) -> int:
    """Tokenizes this process's shards (every shard with --engine ray); `encode` overrides
    `--encoder` for the local engine (tests inject one)."""
    check_args(args)
    lines = read_manifest_lines(args.manifest)
    entries = parse_manifest(lines, paths.resolve(args.manifest).parent)
    out = paths.resolve(args.out)
    jobs = shard_jobs(args, out, lines, entries)
    if out.exists():
        check_directory(out, jobs, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    index, count = (0, 1) if args.engine == "ray" else _process_slice(args)
    mine = jobs[index::count]
    pending = [j for j in mine if not j.done()]
    if args.engine == "ray":
        from data_pipelines import tokenize_ray  # Ray only for its engine (the `ray` extra)

        who, encoded = "ray", tokenize_ray.run(args, out, pending, len(jobs))
    else:
        who = f"process {index}/{count}"
        encoded = run_local(args, out, who, mine, pending, encode)
    infos = [json.loads(j.sidecar.read_text()) for j in mine]
    written, failed = sum(i["records"] for i in infos), sum(i["errors"] for i in infos)
    print(
        f"{who}: {encoded} shards tokenized, {len(mine) - encoded} skipped as done; "
        f"{written} records written, {failed} errors, in {time.time() - start:.1f} s"
    )
    unaccounted = sum(i["lines"] for i in infos) - written - failed
    manifest = finalize(out, jobs, len(entries))
    if manifest is None:
        print(
            "other processes' shards are pending; the last process to finish writes "
            f"{out}/manifest.json"
        )
    else:
        print(
            f"{out}/manifest.json: {manifest['records']} records, {manifest['hours']:.3f} h, "
            f"{manifest['frames']} frames, {manifest['errors']} errors (see {out}/{ERRORS}); "
            f"{manifest['lines']} manifest lines"
        )
        unaccounted = manifest["lines"] - manifest["records"] - manifest["errors"]
    if unaccounted:
        print(
            f"error: {unaccounted} manifest lines were neither written nor reported",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure(args.log_level)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
