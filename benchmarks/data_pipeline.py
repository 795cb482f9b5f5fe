"""Throughput of the Grain training pipeline: packed rows of 8192 groups per second.

  python benchmarks/data_pipeline.py [--hours 20] [--seconds 20] [--workers 2]

Writes shards of synthetic RVQ codes (utterances of 5-30 s with 3-40 word transcripts), then
times the pipeline (read, decode, build the task sequence, pack, targets, batch) on one CPU core
(affinity pinned, no worker processes) and with worker processes, for speech continuation and
for the 5:5 interleave. It prints these next to the rate one host must sustain for the report's
stage-2 7B run; the assumptions of that figure are printed with it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parents[1])
)  # run as a script from a checkout

from data_pipelines import shards
from data_pipelines.config import DataConfig
from data_pipelines.demo_corpus import SENTENCES
from data_pipelines.demo_text_tokenizer import train_demo_tokenizer
from data_pipelines.pipeline import Source, make_dataset
from data_pipelines.shards import Record

# Stage-2 7B run (the report: batch 16.8 M tokens = groups, context 8192).
GLOBAL_BATCH_GROUPS = 16.8e6
CONTEXT = 8192
PARAMS = 7.6e9  # LLM 7B + patch encoder and decoder
LAYERS, HIDDEN = 36, 4096
GPU_PEAK = 989e12  # H100 SXM dense bf16 FLOP/s
MFU = 0.40
GPUS_PER_HOST = 8


def host_need() -> tuple[float, str]:
    """Rows/s one host consumes: its share of FLOP/s over the FLOPs of a row (independent of the
    number of hosts: more hosts shorten the step in proportion)."""
    flops_per_group = (
        6 * PARAMS + 6 * LAYERS * HIDDEN * CONTEXT
    )  # dense + causal attention, fwd+bwd
    host_flops = GPUS_PER_HOST * GPU_PEAK * MFU
    rows = host_flops / (flops_per_group * CONTEXT)
    hosts = 128
    step = GLOBAL_BATCH_GROUPS * flops_per_group / (hosts * host_flops)
    text = (
        f"assumptions: {PARAMS / 1e9:.1f} B parameters, "
        f"6*N + attention = {flops_per_group / 1e9:.1f} GFLOP per "
        f"group, H100 at {MFU:.0%} MFU ({GPU_PEAK / 1e12:.0f} TFLOP/s peak), "
        f"{GPUS_PER_HOST} GPUs per host; "
        f"e.g. {hosts} hosts -> {GLOBAL_BATCH_GROUPS / CONTEXT:.0f} rows per step in {step:.2f} s"
    )
    return rows, text


def write_corpus(directory: str, hours: float, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    words = " ".join(s for _, lang, s in SENTENCES if lang == "en").split()
    records, total = [], 0.0
    while total < hours * 3600:
        sec = float(rng.uniform(5, 30))
        frames = int(sec * 25)
        codes = np.concatenate(
            [rng.integers(0, 1024, (frames, 2)), rng.integers(0, 128, (frames, 6))], 1
        )
        text = " ".join(rng.choice(words, int(rng.integers(3, 41))))
        records.append(
            Record(id=f"u{len(records):07d}", codes=codes.astype(np.int16), text=text, duration=sec)
        )
        total += sec
    shards.write_shards(directory, records, records_per_shard=2048, codebooks=8)
    return len(records)


def rate(ds, seconds: float, batch: int) -> tuple[float, float, float]:
    """(rows per wall second, rows per CPU second of this process, mean fill) after a warm-up
    batch, over about `seconds`. On a shared machine the CPU-time rate is the one-core figure."""
    it = iter(ds)
    next(it)
    rows, fill = 0, 0.0
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        b = next(it)
        rows += batch
        fill += float(np.mean(b["segment_ids"] > 0)) * batch
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if hasattr(it, "close"):
        it.close()
    return rows / elapsed, rows / cpu, fill / rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hours", type=float, default=20.0, help="hours of synthetic audio codes")
    parser.add_argument("--seconds", type=float, default=20.0, help="timing window per measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="rows per batch")
    args = parser.parse_args()
    need, assumptions = host_need()
    cfg = DataConfig(context_length=CONTEXT)
    tok = train_demo_tokenizer([s for _, _, s in SENTENCES])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        n = write_corpus(tmp, args.hours)
        print(
            f"synthetic shards: {n} utterances, {args.hours:.0f} h, "
            f"written in {time.perf_counter() - t0:.1f} s"
        )
        print(
            f"need: {need:.1f} rows of {CONTEXT} groups per second per host "
            f"({need * CONTEXT / 1e3:.0f} k groups/s); "
            f"target for one core: {10 * need:.0f} rows/s"
        )
        print(f"  {assumptions}")
        cores = sorted(os.sched_getaffinity(0))
        for task in ("continuation", "interleave"):
            src = [Source(tmp, task)]
            os.sched_setaffinity(0, cores[:1])
            wall, per_cpu, fill = rate(
                make_dataset(src, cfg, tok, batch_size=args.batch, seed=0), args.seconds, args.batch
            )
            os.sched_setaffinity(0, cores)
            print(
                f"{task:>12}: 1 core  {per_cpu:7.1f} rows per CPU second "
                f"({per_cpu * CONTEXT / 1e6:.2f} M groups/s, "
                f"{per_cpu / need:5.1f}x need), {wall:.1f} rows per wall second, fill {fill:.3f}"
            )
            if args.workers:
                many, _, _ = rate(
                    make_dataset(
                        src, cfg, tok, batch_size=args.batch, seed=0, workers=args.workers
                    ),
                    args.seconds,
                    args.batch,
                )
                print(
                    f"{task:>12}: {args.workers} workers {many:7.1f} rows per wall second "
                    f"({many / need:5.1f}x need) "
                    f"on {len(cores)} cores, load average {os.getloadavg()[0]:.1f}"
                )


if __name__ == "__main__":
    main()
