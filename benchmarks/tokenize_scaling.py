"""Scaling of the tokenize job on Ray: the same corpus with 1 and 2 workers on this machine.

    python benchmarks/tokenize_scaling.py [--workers 1,2] [--shards 4] [--records-per-shard 512]
        [--checkpoint tests/fixtures/tokenizer] [--worker-rate H] [--hosts 64,256,1024]

The corpus is the eSpeak NG demo corpus (80 clips of 1 to 5 s) repeated to `--shards` shards of
`--records-per-shard` lines. Each run is `python -m data_pipelines.tokenize --engine ray --workers
N` on a local Ray of this machine's cores, each actor pinned to one core; a first run of one shard
fills a JAX compilation cache, so that the runs measured encode rather than compile. For each
worker count it prints the audio hours encoded per hour of wall time from the first dispatch, the
ratio to the first worker count, and Ray's scheduling overhead per shard (from dispatch to the
actor starting it, plus the result's return) beside a shard's encode time; then, on paper, the
wall time of 100 M hours on N hosts at `--worker-rate` audio hours per hour each (default: the
measured rate of one worker here) plus that overhead.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from data_pipelines import demo_corpus

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"ray, (?P<workers>\d+) workers: (?P<shards>\d+) shards in (?P<wall>[\d.]+) s from the first "
    r"dispatch, (?P<rate>\d+) audio hours per hour, .*; per shard (?P<encode>[\d.]+) s encoding, "
    r"(?P<overhead>[\d.]+) ms of scheduling"
)
CORPUS_HOURS = 100e6


def corpus(root: Path, lines: int) -> Path:
    """The demo corpus's clips, cycled to `lines` manifest lines of distinct ids."""
    entries = demo_corpus.build(str(root), sentences=len(demo_corpus.SENTENCES))
    manifest = root / f"corpus-{lines}.jsonl"
    with manifest.open("w") as f:
        for n in range(lines):
            f.write(json.dumps({**entries[n % len(entries)], "id": f"u{n:06d}"}) + "\n")
    return manifest


def tokenize(args, manifest: Path, out: Path, workers: int, env: dict) -> dict:
    command = [
        *(sys.executable, "-m", "data_pipelines.tokenize", "--engine", "ray"),
        *("--workers", str(workers), "--manifest", str(manifest), "--out", str(out)),
        *("--records-per-shard", str(args.records_per_shard), "--encoder", args.encoder),
        *(("--checkpoint", args.checkpoint) if args.checkpoint else ()),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    found = SUMMARY.search(done.stdout)
    if found is None:
        sys.exit(f"no Ray summary line in the output of {' '.join(command)}:\n{done.stdout}")
    return {k: float(v) for k, v in found.groupdict().items()}


def paper(rate: float, overhead: float, hosts: list[int]) -> list[str]:
    """Wall time of CORPUS_HOURS at `rate` audio h/h per worker, one worker a host, slowed by
    Ray's overhead (a fraction of a shard's encode time)."""
    lines = []
    for n in hosts:
        days = CORPUS_HOURS / (n * rate) * (1 + overhead) / 24
        lines.append(f"  {n:5d} hosts: {days:9.1f} days")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1,2", help="worker counts, the first the baseline")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--records-per-shard", type=int, default=512)
    p.add_argument("--encoder", default="mimo")
    p.add_argument("--checkpoint", default=str(ROOT / "tests" / "fixtures" / "tokenizer"))
    p.add_argument("--worker-rate", type=float, help="audio h/h of one accelerator worker")
    p.add_argument("--hosts", default="64,256,1024")
    args = p.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        )
        manifest = corpus(root / "demo", args.shards * args.records_per_shard)
        warm = root / "warm.jsonl"
        warm.write_text("".join(manifest.open().readlines()[: args.records_per_shard]))
        tokenize(args, warm, root / "warm", 1, env)
        runs = {w: tokenize(args, manifest, root / f"out-{w}", w, env) for w in counts}
    base = runs[counts[0]]
    print(f"{args.shards} shards of {args.records_per_shard} lines, encoder {args.encoder}")
    print(f"load average (1, 5, 15 min): {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for w, r in runs.items():
        print(
            f"{w} workers: {r['rate']:.0f} audio hours per hour ({r['rate'] / base['rate']:.2f}x "
            f"{counts[0]} worker), per shard {r['encode']:.2f} s encoding and "
            f"{r['overhead']:.1f} ms of Ray scheduling ({r['overhead'] / 10 / r['encode']:.3f} %)"
        )
    rate = args.worker_rate or base["rate"] / counts[0]
    overhead = max(r["overhead"] / 1000 / r["encode"] for r in runs.values())
    print(f"on paper, {CORPUS_HOURS / 1e6:.0f} M hours at {rate:.0f} audio h/h per worker:")
    print("\n".join(paper(rate, overhead, [int(h) for h in args.hosts.split(",")])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
