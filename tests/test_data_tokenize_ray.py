"""The tokenize job on Ray (`--engine ray`): the same bytes as the local engine for any number of
workers and on gs://, no record lost or doubled when a worker or the driver dies, a shard that
always kills its worker reported, and bad input refused before anything starts. One local Ray
instance (`ray.init(num_cpus=2)`) serves the module and is shut down at its end; the corpus is 13
shards of 2 short clips, one shard of bad lines."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from etils import epath
from ray_support import ENV, set_plan

from data_pipelines import shard_job, tokenize, tokenize_ray
from mimo_jax.tokenizer.config import TokenizerConfig

RATE = TokenizerConfig().sampling_rate
TESTS = Path(__file__).resolve().parent
FIXTURE_TOKENIZER = Path(os.environ.get("MIMO_FIXTURES", TESTS / "fixtures")) / "tokenizer"
SHARDS, PER_SHARD, BAD_SHARD = 13, 2, 4
CRASH, HOLD = (7, 13331), (5, 14447)  # (shard, samples of its first clip)
FAULTY = "ray_support:faulty"
# Ray kills workers when the machine's memory is 95 % used, whoever uses it: on a machine shared
# with other jobs that would be deaths no test planned.
MEMORY_MONITOR = "RAY_memory_monitor_refresh_ms"


@pytest.fixture(scope="module")
def ray_address(gcs, tmp_path_factory):
    """A local Ray whose workers import tests/ modules, read the fault plan's folder and reach
    the GCS emulator (the environment they inherit is the one at `ray.init`)."""
    import ray

    faults = tmp_path_factory.mktemp("faults")
    saved = {k: os.environ.get(k) for k in (ENV, "PYTHONPATH", MEMORY_MONITOR)}
    os.environ[ENV] = str(faults)
    os.environ[MEMORY_MONITOR] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), saved["PYTHONPATH"]]))
    set_plan({})
    context = ray.init("local", num_cpus=2, logging_level="WARNING")
    yield context.address_info["address"]
    ray.shutdown()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """manifest.jsonl: 26 lines, clips of 0.4 to 0.9 s (each length once); shard BAD_SHARD's two
    lines bad (not JSON, a missing file); the first clip of shards CRASH and HOLD of the lengths
    the fault plans name."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    lines = []
    for n in range(SHARDS * PER_SHARD):
        samples = {CRASH[0] * PER_SHARD: CRASH[1], HOLD[0] * PER_SHARD: HOLD[1]}.get(
            n, 9600 + 480 * n
        )
        soundfile.write(root / f"c{n:02d}.wav", 0.1 * rng.standard_normal(samples), RATE)
        lines.append(json.dumps({"audio": f"c{n:02d}.wav", "text": f"clip {n}"}))
    lines[BAD_SHARD * PER_SHARD] = "{not json"
    lines[BAD_SHARD * PER_SHARD + 1] = json.dumps({"audio": "missing.wav"})
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def argv(manifest, out, *extra, encoder=FAULTY):
    return [
        *("--manifest", str(manifest), "--out", str(out), "--encoder", encoder),
        *("--records-per-shard", str(PER_SHARD), *extra),
    ]


def run_ray(manifest, out, *extra, encoder=FAULTY) -> int:
    return tokenize.run(
        tokenize.parse_args(argv(manifest, out, "--engine", "ray", *extra, encoder=encoder))
    )


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def local(ray_address, corpus, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local") / "out"
    assert tokenize.main(argv(corpus, out, "--process-index", "0", "--process-count", "1")) == 0
    return files(out)


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [1, 3])
def test_any_number_of_workers_writes_the_local_bytes(
    ray_address, corpus, local, tmp_path, workers
):
    set_plan({})
    assert run_ray(corpus, tmp_path / "out", "--workers", str(workers)) == 0
    assert files(tmp_path / "out") == local
    errors = [json.loads(x) for x in local["errors.jsonl"].decode().splitlines()]
    assert [e["line"] for e in errors] == [9, 10]
    assert json.loads(local["manifest.json"])["records"] == 24 and len(local) == 2 * SHARDS + 2


@pytest.mark.e2e
def test_the_tokenizer_checkpoint_on_workers_writes_the_local_bytes(
    ray_address, corpus, tmp_path, capsys
):
    """The real encoder (the fixture tokenizer, JAX in each actor, pinned to a core) gives the
    codes of the local engine on one core: XLA's CPU dot products block their sums by the
    number of threads, so the same arithmetic needs the same thread count (README)."""
    ckpt = ("--checkpoint", str(FIXTURE_TOKENIZER), "--records-per-shard", "9")
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    core = str(min(os.sched_getaffinity(0)))
    local = argv(corpus, local_out, *ckpt, encoder="mimo")
    command = ["taskset", "-c", core, sys.executable, "-m", "data_pipelines.tokenize", *local]
    subprocess.run(command, check=True, capture_output=True)
    capsys.readouterr()
    assert run_ray(corpus, ray_out, *ckpt, "--workers", "2", "--verbosity", encoder="mimo") == 0
    assert files(ray_out) == files(local_out)
    assert re.search(r"^worker \d \(core \d+\): ", capsys.readouterr().out, re.M)


@pytest.mark.e2e
def test_shards_on_gcs_are_the_local_bytes(ray_address, corpus, local, gs_dir):
    """Workers write gs:// shards (through a local file, uploaded whole) and sidecars."""
    set_plan({})
    assert run_ray(corpus, f"{gs_dir}/shards", "--workers", "2") == 0
    written = {p.name: p.read_bytes() for p in epath.Path(f"{gs_dir}/shards").iterdir()}
    assert written == local


@pytest.mark.e2e
def test_a_killed_worker_loses_nothing(ray_address, corpus, local, tmp_path, capsys):
    set_plan({"crash": {"samples": CRASH[1], "times": 1}})
    assert run_ray(corpus, tmp_path / "out", "--workers", "2") == 0
    assert "1 retries, 0 shards given up" in capsys.readouterr().out
    assert files(tmp_path / "out") == local


@pytest.mark.e2e
def test_a_shard_that_always_kills_its_worker_is_reported(
    ray_address, corpus, local, tmp_path, capsys
):
    set_plan({"crash": {"samples": CRASH[1], "times": -1}})
    out = tmp_path / "out"
    assert run_ray(corpus, out, "--workers", "2", "--max-retries", "1") == 0
    assert "1 retries, 1 shards given up" in capsys.readouterr().out
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    first = CRASH[0] * PER_SHARD + 1
    assert [e["line"] for e in errors] == [9, 10, first, first + 1]
    assert errors[2]["reason"].startswith(
        f"shard {CRASH[0]} (manifest lines {first}-{first + 1}) lost its worker 2 times"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == 22 and manifest["errors"] == 4 and manifest["lines"] == 26
    crashed = shard_job.shard_name(CRASH[0], SHARDS)
    others = {
        k: v for k, v in files(out).items() if not k.startswith((crashed, "manifest", "errors"))
    }
    assert (
        others == {k: v for k, v in local.items() if k in others} and len(others) == 2 * SHARDS - 2
    )


@pytest.mark.e2e
def test_a_killed_driver_is_resumed(ray_address, corpus, local, tmp_path, capsys):
    """The driver dies while shard HOLD is being encoded (one worker: shards in order): the rerun
    keeps the shards before it, untouched, and writes the rest."""
    set_plan({"hold": {"samples": HOLD[1]}})
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "data_pipelines.tokenize",
            *argv(corpus, out, "--engine", "ray", "--ray-address", ray_address, "--workers", "1"),
        ],
        env=os.environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    held = Path(os.environ[ENV]) / "held"
    deadline = time.time() + 120
    while not held.exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert held.exists(), (
        driver.stderr.read().decode()[-2000:] if driver.poll() is not None else "no hold"
    )
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    committed = sorted(out.glob("shard-*.json"))
    assert [p.name for p in committed] == [
        f"{shard_job.shard_name(k, SHARDS)}.json" for k in range(HOLD[0])
    ]
    mtimes = lambda: {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    before = mtimes()
    assert len(before) == 2 * HOLD[0]
    set_plan({})
    assert run_ray(corpus, out, "--workers", "2") == 0
    done = f"{SHARDS - HOLD[0]} shards tokenized, {HOLD[0]} skipped as done"
    assert done in capsys.readouterr().out
    assert {k: v for k, v in mtimes().items() if k in before} == before
    assert files(out) == local


@pytest.mark.e2e
def test_a_checkpoint_that_fails_to_load_stops_the_job(ray_address, corpus, tmp_path, capsys):
    broken = tmp_path / "ckpt"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    start = time.time()
    code = tokenize.main(
        argv(
            corpus,
            tmp_path / "out",
            "--engine",
            "ray",
            "--checkpoint",
            str(broken),
            "--workers",
            "2",
            encoder="mimo",
        )
    )
    err = capsys.readouterr().err
    assert code == 1 and time.time() - start < 60
    assert (
        err.startswith("error: worker ") and ", loading the encoder: " in err and str(broken) in err
    ), err
    assert not list((tmp_path / "out").glob("shard-*"))


def test_bad_arguments_are_refused_before_anything_starts(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    for extra, message in (
        (["--engine", "ray", "--workers", "0"], "--workers 0: expected 1 or more Ray actors"),
        (["--engine", "ray", "--max-retries", "-1"], "--max-retries -1: expected 0 or more"),
        (
            ["--engine", "ray", "--worker-accelerators", "-2"],
            "--worker-accelerators -2: expected 0 (CPU actors) or more",
        ),
        (
            ["--engine", "ray", "--process-index", "0"],
            "--process-index: a flag of --engine local; the ray engine takes every shard",
        ),
        (["--workers", "2"], "--workers: a flag of --engine ray; the local engine is one process"),
        (
            ["--engine", "ray", "--ray-address", "127.0.0.1"],
            "--ray-address 127.0.0.1: expected host:port of a Ray cluster's head "
            "(`ray start --head` prints it)",
        ),
    ):
        assert tokenize.main(argv(corpus, out, *extra)) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(SystemExit) as exit:
        tokenize.main(argv(corpus, out, "--engine", "spark"))
    assert exit.value.code == 2 and "--engine: invalid choice: 'spark'" in capsys.readouterr().err
    assert not out.exists()


def test_an_unreachable_ray_address_is_one_line(corpus, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.time()
    assert (
        tokenize.main(
            argv(corpus, tmp_path / "out", "--engine", "ray", "--ray-address", f"127.0.0.1:{port}")
        )
        == 2
    )
    err = capsys.readouterr().err
    assert time.time() - start < 30 and err.count("\n") == 1
    assert (
        err.startswith(f"error: --ray-address 127.0.0.1:{port}: cannot connect (")
        and "ray start --head" in err
    )


def test_actors_take_the_clusters_accelerators():
    cpu = {
        "scheduling_strategy": "SPREAD",
        "runtime_env": {"env_vars": tokenize_ray.SINGLE_THREADED},
    }
    tpu_vms = [{"CPU": 240.0, "TPU": 4.0}] * 4
    options = tokenize_ray.actor_options
    assert options(tpu_vms, 4) == ({"resources": {"TPU": 4}}, 4)
    assert options(tpu_vms, 1) == ({"resources": {"TPU": 1}}, 16)
    gpu_nodes = [{"CPU": 16.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 2.0}]
    assert options(gpu_nodes, 2) == ({"num_gpus": 2}, 5)
    assert options(gpu_nodes, 0) == (cpu, 32)
    assert options([{"CPU": 2.0}], 1) == (cpu, 2)
    with pytest.raises(
        ValueError, match=r"--worker-accelerators 16: no node .* GPUs \(the most: 8\)"
    ):
        options(gpu_nodes, 16)


def test_cpu_actors_claim_distinct_cores(tmp_path):
    """Each claim pins its thread to a core no other claim holds, until none is left; a claim
    dies with its lock (a closed file, a dead process) and the core is free again."""
    cores = sorted(os.sched_getaffinity(0))

    def claim() -> tuple:
        found: list = []
        thread = threading.Thread(
            target=lambda: found.append(
                (tokenize_ray.claim_core(str(tmp_path)), os.sched_getaffinity(0))
            )
        )
        thread.start()
        thread.join()
        return found[0]

    held = [claim() for _ in cores]
    assert [c for (c, _), pinned in held] == cores
    assert all(pinned == {c} for (c, _), pinned in held)
    assert claim() == (None, set(cores)) and os.sched_getaffinity(0) == set(cores)
    held[-1][0][1].close()
    assert claim()[0][0] == cores[-1]
    (tmp_path / "locks").write_text("a file, not a folder")
    assert tokenize_ray.claim_core(str(tmp_path / "locks")) is None


def test_the_summary_line_gives_the_benchmark_its_figures():
    """benchmarks/tokenize_scaling.py reads Ray's overhead and rate from the summary line."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "tokenize_scaling", TESTS.parent / "benchmarks" / "tokenize_scaling.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pool = tokenize_ray.Pool(argparse.Namespace(), [], 2, {})
    for slot, sent in ((0, 100.0), (1, 100.5), (0, 110.5)):  # 10 s shards of 0.1 h of audio
        pool.timings.append(
            tokenize_ray.Timing(slot, 0.1, sent, sent + 0.25, sent + 10.25, sent + 10.5)
        )
    figures = bench.SUMMARY.search(pool.summary()).groupdict()
    assert {k: float(v) for k, v in figures.items()} == {
        "workers": 2,
        "shards": 3,
        "wall": 21.0,
        "rate": round(0.3 * 3600 / 21),
        "encode": 10.0,
        "overhead": 500.0,
    }
    pool.cores = {0: 1, 1: None}  # actor 1 unpinned: an accelerator's, or every core held
    assert pool.per_worker() == [
        "worker 0 (core 1): 2 shards, 0.2000 h of audio, 36 audio h/h while encoding",
        "worker 1: 1 shards, 0.1000 h of audio, 36 audio h/h while encoding",
    ]
    assert bench.paper(100.0, 0.05, [1000]) == [f"   1000 hosts: {1e8 / 1e5 * 1.05 / 24:9.1f} days"]
