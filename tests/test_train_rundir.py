"""The training run directory: relative paths, the workdir lock (in-process and across real
processes, SIGTERM included), workdir/config.json, metrics.jsonl cut back on resume, leftovers of
interrupted saves and exports, and a smoke run resuming past a damaged newest checkpoint."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train_loop import metrics, smoke, train_losses
from train_support import ROOT, xla_env
from train_support import train_cmd as _train_cmd

from experiments import train
from mimo_jax import paths
from mimo_jax.train import rundir
from mimo_jax.train.metrics import MetricsWriter, cut_back


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir: Path, **holder) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / rundir.LOCK_FILE).write_text(json.dumps(holder))


# --- paths, lock, leftovers, metrics (no training) ---


def test_resolve_makes_local_paths_absolute_and_keeps_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.resolve("runs/x")) == str(tmp_path / "runs" / "x")
    assert str(paths.resolve("gs://bucket/run")) == "gs://bucket/run"
    assert not paths.is_local("gs://bucket/run") and paths.is_local(tmp_path)


def test_lock_refuses_a_live_holder_naming_host_and_pid(tmp_path):
    first = rundir.WorkdirLock(paths.resolve(tmp_path))
    first.acquire()
    with pytest.raises(
        ValueError, match=f"in use by the run of pid {os.getpid()} on host {socket.gethostname()}"
    ):
        rundir.WorkdirLock(paths.resolve(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / rundir.LOCK_FILE).exists()
    _write_lock(tmp_path, host="another-host", pid=_dead_pid(), start=None)
    with pytest.raises(ValueError, match="on host another-host"):  # cannot tell if it is alive
        rundir.WorkdirLock(paths.resolve(tmp_path)).acquire()


@pytest.mark.parametrize("holder", ["dead", "reused pid"])
def test_stale_lock_on_this_host_is_taken_over(tmp_path, holder, capsys):
    if holder == "dead":
        _write_lock(tmp_path, host=socket.gethostname(), pid=_dead_pid(), start=None)
    else:  # our pid, but another process's start time: the holder is gone, its pid reused
        _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), start="1")
    lock = rundir.WorkdirLock(paths.resolve(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over the lock" in capsys.readouterr().out
    lock.release()


def test_leftovers_of_interrupted_saves_and_exports_are_removed(tmp_path):
    tmp_save = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1700000000"
    (tmp_save / "state").mkdir(parents=True)
    (tmp_path / "checkpoints" / "6").mkdir()
    (tmp_path / rundir.EXPORT_TMP / "params").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    removed = rundir.remove_leftovers(paths.resolve(tmp_path))
    assert sorted(p.name for p in removed) == [rundir.EXPORT_TMP, tmp_save.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "model"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["6"]


def test_metrics_are_cut_back_to_the_restored_step(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)]
    path.write_text("".join(lines) + '{"step": 7, "lo')  # killed mid-write
    kept = cut_back(paths.resolve(path), 4)
    assert kept == lines[:4] and path.read_text() == "".join(lines[:4])
    assert "dropped 2 of later steps and a partial line" in capsys.readouterr().out
    path.write_text(lines[0] + '{"step": 2, "lo' + lines[2])  # a cut line joined to the next
    assert cut_back(paths.resolve(path), 4) == [lines[0]]
    assert cut_back(paths.resolve(tmp_path / "none.jsonl"), 4) == []


def test_metrics_writer_appends_after_the_cut_and_logs_the_config(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 4)))
    writer = MetricsWriter(
        str(tmp_path),
        10,
        start_step=2,
        config_json='{"total_steps": 10}',
        hparams={"total_steps": 10, "optimizer.b1": 0.9, "mesh.rules": "data"},
    )
    writer.write(3, {"loss": 0.5})
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    events = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").iterdir())
    assert b'{"total_steps": 10}' in events and b"optimizer.b1" in events


# --- smoke runs ---


def _flip_a_bit_of_a_stored_array(step_dir: Path) -> list[str]:
    """Rewrites the step's state item with one bit of one array flipped (what a silent storage
    fault leaves: readable, one value changed). Orbax compresses and
    deduplicates what it stores, so flipping a bit in its files cannot target an array reliably.
    Returns the names along the array's path."""
    import jax

    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.restore(step_dir / "state")
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    at = next(i for i, (_, x) in enumerate(flat) if x.dtype == np.float32 and x.size >= 64)
    path, value = flat[at]
    bits = np.asarray(value).copy().view(np.uint32)
    bits.flat[bits.size // 2] ^= np.uint32(1 << 9)
    leaves = [x for _, x in flat]
    leaves[at] = jax.device_put(bits.view(np.float32), value.sharding)
    shutil.rmtree(step_dir / "state")
    checkpointer.save(step_dir / "state", jax.tree_util.tree_unflatten(treedef, leaves))
    checkpointer.wait_until_finished()
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def _cut_data_files(state_dir: Path) -> None:
    """Every data file of the step cut to half (a full disk); OCDBT may hold files that the
    restore does not read, so one cut file alone could go unnoticed."""
    for path in state_dir.glob("ocdbt.process_*/d/*"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _resume(data, workdir, *flags) -> subprocess.CompletedProcess:
    """A resume is a new process (in-process, Orbax could serve what it just wrote from memory)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # run from the cwd, the workdir relative to it
    out = subprocess.run(
        _train_cmd(data, workdir, *flags), env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_relative_workdir_resumes_past_a_damaged_newest_checkpoint(
    demo_data, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the README's runs/... workdirs are relative
    config = smoke(demo_data, total_steps=6, checkpoint_every=2, **{"checkpoint.keep": 3})
    assert train.run(config, "runs/x") == 0
    workdir = tmp_path / "runs" / "x"
    straight = train_losses(workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 6
    assert (workdir / "model" / "config.json").exists() and not (workdir / "lock").exists()
    for name, damage_fn in {
        "_METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
        "data_files": lambda d: _cut_data_files(d / "state"),
    }.items():
        copy = tmp_path / "runs" / name
        shutil.copytree(workdir, copy)
        damage_fn(copy / "checkpoints" / "6")
        # total_steps=4: resuming at step 4 only exports, nothing to compile
        out = _resume(
            demo_data, Path("runs") / name, "--config.total_steps=4", "--config.export_model=False"
        ).stdout
        assert "checkpoint step 6 is damaged: cannot be read" in out, (name, out[-2000:])
        assert (copy / "checkpoints_damaged" / "6" / "state").is_dir(), name

    damaged = _flip_a_bit_of_a_stored_array(workdir / "checkpoints" / "6")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.')  # a run killed mid-write
    (workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1700000000" / "state").mkdir(parents=True)
    (workdir / rundir.EXPORT_TMP).mkdir()
    out = _resume(
        demo_data,
        Path("runs") / "x",
        "--config.total_steps=6",
        "--config.checkpoint_every=2",
        "--config.checkpoint.keep=3",
    ).stdout
    line = next(x for x in out.splitlines() if "checkpoint step 6 is damaged" in x)
    assert "1 arrays differ from their saved checksums: " in line, line
    assert "resuming from step 4" in line and all(name in line for name in damaged)
    assert (workdir / "checkpoints_damaged" / "6" / "state").is_dir()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert not (workdir / rundir.EXPORT_TMP).exists()
    assert [m["step"] for m in metrics(workdir)] == [1, 2, 3, 4, 5, 6]
    assert train_losses(workdir) == straight


def test_off_intervals_do_not_divide_by_zero(demo_data, tmp_path):
    config = smoke(
        demo_data, total_steps=2, log_every=0, checkpoint_every=0, eval_every=0, export_model=False
    )
    assert train.run(config, str(tmp_path / "w")) == 0
    assert [m["step"] for m in metrics(tmp_path / "w")] == [2]  # the last step is always logged
    assert [p.name for p in (tmp_path / "w" / "checkpoints").iterdir()] == ["2"]


def test_errors_release_the_lock(demo_data, tmp_path):
    with pytest.raises(ValueError, match="needs 3 devices"):
        train.run(smoke(demo_data, total_steps=2, **{"mesh.ici.data": 3}), str(tmp_path / "w"))
    assert not (tmp_path / "w" / rundir.LOCK_FILE).exists()


# --- real processes ---


def _wait_for(predicate, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_second_run_on_a_workdir_is_refused_and_metrics_never_interleave(demo_data, tmp_path):
    env = xla_env(1)
    steps = ["--config.total_steps=200", "--config.checkpoint_every=1000"]
    first = subprocess.Popen(
        _train_cmd(demo_data, tmp_path / "w", *steps),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in first.stdout:
            if line.startswith("step 2/"):
                break
        second = subprocess.run(
            _train_cmd(demo_data, tmp_path / "w", *steps),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"error: {tmp_path / 'w'} is in use by the run of pid {first.pid} on host "
            f"{socket.gethostname()}; wait for it to end or use another --workdir (remove "
            f"{tmp_path / 'w' / 'lock'} only if that run is gone)"
        ]
        first.send_signal(signal.SIGTERM)
        out = first.stdout.read()
        assert first.wait(timeout=300) == 0, out
    finally:
        first.kill()
    assert "preempted: checkpoint saved" in out
    assert not (tmp_path / "w" / rundir.LOCK_FILE).exists()
    steps_logged = [m["step"] for m in metrics(tmp_path / "w")]
    assert steps_logged == list(range(1, len(steps_logged) + 1))


def test_sigterm_before_training_releases_the_lock(demo_data, tmp_path):
    run = subprocess.Popen(
        _train_cmd(demo_data, tmp_path / "w", "--config.total_steps=2"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(lambda: (tmp_path / "w" / "config.json").exists())  # written after the lock
        run.send_signal(signal.SIGTERM)
        out = run.communicate(timeout=120)[0]
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert not (tmp_path / "w" / rundir.LOCK_FILE).exists()
