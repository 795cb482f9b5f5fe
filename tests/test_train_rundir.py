"""The training run directory: relative paths, the workdir lock (in-process and across real
processes, SIGTERM included), workdir/config.json, metrics.jsonl cut back on resume, leftovers of
interrupted saves and exports, and smoke runs resuming past a damaged newest checkpoint: in this
process, and in the one real-process scenario (a run SIGTERMed, a second launch on its workdir
refused, the resume past a damaged step equal to a straight run)."""

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
from train_support import ROOT, metrics, smoke, train_cmd, train_losses

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


def _cut_data_files(state_dir: Path) -> None:
    """Every data file of the step cut to half (a full disk); OCDBT may hold files that the
    restore does not read, so one cut file alone could go unnoticed."""
    for path in state_dir.glob("ocdbt.process_*/d/*"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_relative_workdir_resumes_past_an_unreadable_newest_checkpoint(
    demo_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the README's runs/... workdirs are relative
    config = smoke(demo_data, total_steps=6, checkpoint_every=2, **{"checkpoint.keep": 3})
    assert train.run(config, "runs/x") == 0
    workdir = tmp_path / "runs" / "x"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 6
    assert (workdir / "model" / "config.json").exists() and not (workdir / "lock").exists()
    # total_steps=4: resuming at step 4 only exports, nothing to compile
    resume = smoke(demo_data, total_steps=4, export_model=False)
    for name, damage_fn in {
        "_METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
        "data_files": lambda d: _cut_data_files(d / "state"),
    }.items():
        copy = tmp_path / "runs" / name
        shutil.copytree(workdir, copy)
        damage_fn(copy / "checkpoints" / "6")
        capsys.readouterr()
        assert train.run(resume, str(Path("runs") / name)) == 0
        out = capsys.readouterr().out
        assert "checkpoint step 6 is damaged: cannot be read" in out, (name, out[-2000:])
        assert "resuming from step 4" in out, (name, out[-2000:])
        assert (copy / "checkpoints_damaged" / "6" / "state").is_dir(), name
        assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["2", "4"], name


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


def test_sigterm_before_training_releases_the_lock(demo_data, tmp_path, monkeypatch):
    # SIGTERM while the run builds its model (the lock taken, config.json written): the run exits
    # with 128 + SIGTERM through its cleanups, the lock's release among them.
    from mimo_jax.train import build

    def sigterm_while_building(*_):
        assert (tmp_path / "w" / "config.json").exists()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the run within 30 s")

    monkeypatch.setattr(build, "build_model", sigterm_while_building)
    with pytest.raises(SystemExit) as exit_:
        train.run(smoke(demo_data, total_steps=2), str(tmp_path / "w"))
    assert exit_.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "w" / rundir.LOCK_FILE).exists()


# --- real processes ---


def _flip_a_bit_of_a_stored_array(step_dir: Path) -> list[str]:
    """Rewrites the step's state item with one bit of one array flipped (what a silent storage
    fault leaves: readable, one value changed). Orbax compresses and deduplicates what it stores,
    so flipping a bit in its files cannot target an array reliably. Returns the names along the
    array's path."""
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


def _wait_for_step(run: subprocess.Popen, step: int) -> None:
    for line in run.stdout:
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(f"the run ended before step {step}: {run.wait()}")


@pytest.mark.e2e
def test_a_preempted_run_refuses_a_second_launch_and_resumes_past_a_damaged_step(
    demo_data, tmp_path
):
    """The real-process scenario: a run SIGTERMed mid-way saves and exits 0, a second launch on
    its workdir meanwhile is refused in one line, and the resume, in a new process, sets the
    damaged newest step aside and ends with the losses of a straight run. The workdir is relative
    to the runs' working directory."""
    steps = {"total_steps": 8, "checkpoint_every": 2, "checkpoint.keep": 3}
    assert train.run(smoke(demo_data, **steps), str(tmp_path / "straight")) == 0
    straight = train_losses(tmp_path / "straight")
    cmd = train_cmd(demo_data, "runs/cut", *(f"--config.{k}={v}" for k, v in steps.items()))
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # the workdir relative to tmp_path
    workdir = tmp_path / "runs" / "cut"
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for_step(first, 3)  # step 2 saved
        first.send_signal(signal.SIGSTOP)  # holds the lock, mid-run, while the second launches
        second = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 1
        assert second.stderr.strip().splitlines() == [
            f"error: {workdir} is in use by the run of pid {first.pid} on host "
            f"{socket.gethostname()}; wait for it to end or use another --workdir (remove "
            f"{workdir / 'lock'} only if that run is gone)"
        ]
        first.send_signal(signal.SIGTERM)
        first.send_signal(signal.SIGCONT)
        out = first.communicate(timeout=300)[0]
        assert first.returncode == 0, out[-3000:]
    finally:
        first.kill()
    cut_at = max(train_losses(workdir))
    assert f"preempted: checkpoint saved at step {cut_at}" in out and 3 <= cut_at < 8, out[-3000:]
    assert not (workdir / rundir.LOCK_FILE).exists()
    assert [m["step"] for m in metrics(workdir)] == list(range(1, cut_at + 1))  # one writer
    newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert newest == cut_at
    # The newest step silently damaged, the metrics cut mid-line, a save and an export cut short.
    damaged = _flip_a_bit_of_a_stored_array(workdir / "checkpoints" / str(newest))
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.')
    (workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1700000000" / "state").mkdir(parents=True)
    (workdir / rundir.EXPORT_TMP).mkdir()
    resumed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    line = next(x for x in resumed.stdout.splitlines() if f"step {newest} is damaged" in x)
    assert "1 arrays differ from their saved checksums: " in line, line
    assert all(name in line for name in damaged), line
    assert f"resuming from step {2 * ((newest - 1) // 2)}" in line, line
    assert (workdir / "checkpoints_damaged" / str(newest) / "state").is_dir()
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 6, 8]
    assert not (workdir / rundir.EXPORT_TMP).exists()
    assert (workdir / "model" / "config.json").exists()
    assert [m["step"] for m in metrics(workdir)] == list(range(1, 9))
    assert train_losses(workdir) == straight
