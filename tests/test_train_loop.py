"""The train entry point on the demo corpus: stages, evaluation, metrics, a non-finite loss, SIGTERM
while the run waits for data, multi-process runs, and the errors that stop a run before it starts.
(A real process SIGTERMed and resumed: tests/test_train_rundir.py.)"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from train_support import ROOT, metrics, smoke, train_cmd, train_losses, xla_env

from data_pipelines.shards import ShardSet
from experiments import train, training_loop
from experiments.config_checks import ConfigError
from mimo_jax.train.build import lm_architecture


def test_stage1_then_stage2_from_its_weights(demo_data, tmp_path):
    assert train.run(smoke(demo_data, "stage1", total_steps=6), str(tmp_path / "s1")) == 0
    first = metrics(tmp_path / "s1")
    assert [m["step"] for m in first] == list(range(1, 7))
    assert "codebook0_loss" not in first[0] and first[-1]["loss"] < first[0]["loss"]
    config = smoke(demo_data, "stage2", total_steps=4, eval_every=2, eval_steps=1)
    config.model.init_checkpoint = str(tmp_path / "s1" / "model")
    assert train.run(config, str(tmp_path / "s2")) == 0
    second = metrics(tmp_path / "s2")
    assert "codebook1_loss" in second[0] and "codebook1_accuracy" in second[0]
    assert any("eval/loss" in m for m in second)
    for key in (
        "text_accuracy",
        "grad_norm",
        "groups_per_second",
        "mfu",
        "lr/llm",
        "tokens",
        "skipped_documents",
    ):
        assert key in second[0], key
    assert (tmp_path / "s2" / "tensorboard").is_dir()
    assert (tmp_path / "s2" / "model" / "config.json").exists()
    # Stage 2 in stage 1's workdir: refused (its checkpoints are of another experiment), stage
    # 1's metrics kept.
    with pytest.raises(ValueError, match="holds checkpoints of another experiment"):
        train.run(smoke(demo_data, "stage2", total_steps=8), str(tmp_path / "s1"))
    assert [m["step"] for m in metrics(tmp_path / "s1")] == list(range(1, 7))


def test_a_missing_shard_stops_the_run_before_the_first_step(demo_data, tmp_path):
    # The demo config skips bad records; a missing shard file used to be skipped as a bad record
    # forever, with SIGTERM ignored. Bounded: past 60 s SIGTERM comes, as `timeout` would send it
    # (a run that stops then has not stopped before its first step, and the test fails).
    data = tmp_path / "data"
    shutil.copytree(demo_data / "shards", data / "shards")
    shutil.copy(demo_data / "tokenizer.json", data)
    shard = data / "shards" / "shard-00000-of-00001.array_record"
    shard.unlink()
    timeout = threading.Timer(60, os.kill, (os.getpid(), signal.SIGTERM))
    timeout.start()
    try:
        with pytest.raises(ConfigError) as error:
            train.run(smoke(data), str(tmp_path / "w"))
    finally:
        timeout.cancel()
    assert [line for line in str(error.value).splitlines() if shard.name in line] == [
        f"  data.sources={str(data / 'shards')!r}: expected the shards its manifest.json lists; "
        f"shard {shard}: missing (the manifest lists 12 records in it)"
    ]
    assert not (tmp_path / "w" / "metrics.jsonl").exists()
    assert (data / "shards" / "manifest.json").exists()


def test_sigterm_while_waiting_for_data_saves_the_last_step(demo_data, tmp_path, monkeypatch):
    # The third batch's first read blocks (a store that stopped answering) and SIGTERM comes:
    # the run stops at once, saving step 2 with the data iterator from before that batch.
    blocked, read, next_batch = threading.Event(), ShardSet.read_bytes, training_loop.next_batch
    calls = []

    def third_blocks(data_iterator, preemption):
        calls.append(len(calls) + 1)
        if len(calls) == 3:
            blocked.set()
        return next_batch(data_iterator, preemption)

    def blocking_read(self, index):
        if blocked.is_set():
            blocked.clear()
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
            time.sleep(30)
            raise AssertionError("SIGTERM did not stop the wait for data within 30 s")
        return read(self, index)

    monkeypatch.setattr(training_loop, "next_batch", third_blocks)
    monkeypatch.setattr(ShardSet, "read_bytes", blocking_read)
    config = smoke(demo_data, total_steps=6, checkpoint_every=0)
    assert train.run(config, str(tmp_path / "w")) == 0
    assert calls == [1, 2, 3] and sorted(train_losses(tmp_path / "w")) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir()) == ["2"]
    monkeypatch.undo()
    # The saved iterator state is that after two batches: a resumed run reads the third next.
    saved = tmp_path / "w" / "checkpoints" / "2" / "data" / "process_0-of-1.json"
    it = train.data_iterators(config, lm_architecture(config))[0]
    next(it), next(it)
    assert json.loads(saved.read_text()) == it.get_state()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_two_processes_of_four_devices_equal_one_of_eight(demo_data, tmp_path):
    # Every process reads the global batch and keeps its rows, so both runs see the same data.
    args = {"total_steps": 2, "data.split_by_process": False, "export_model": False}
    assert train.run(smoke(demo_data, **args), str(tmp_path / "one")) == 0
    env = xla_env(4)
    port = _free_port()
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]  # pipes could fill and block
    flags = [f"--config.{k}={v}" for k, v in args.items()]
    procs = [
        subprocess.Popen(
            train_cmd(
                demo_data,
                tmp_path / "two",
                *flags,
                f"--coordinator=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=env,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    codes = [p.wait(timeout=600) for p in procs]
    outs = [(tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2)]
    assert codes == [0, 0], outs
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert a.keys() == b.keys() == {1, 2}
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step


def test_errors_name_the_problem(demo_data, tmp_path, fixtures_root):
    cases = [
        (dict(**{"mesh.ici.data": 3}), "needs 3 devices"),
        (dict(**{"data.batch_size": 6}), "does not divide over the 8 data-parallel devices"),
        (dict(**{"data.sources": f"{tmp_path / 'none'}:tts"}), "none"),
        (dict(**{"model.init_checkpoint": str(fixtures_root / "tokenizer")}), "tokenizer"),
        (dict(**{"mesh.rules": "pipeline"}), "mesh.rules='pipeline'"),
    ]
    for overrides, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train.run(smoke(demo_data, total_steps=2, **overrides), str(tmp_path / "w"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_data, tmp_path, monkeypatch):
    # The third batch's text weights are NaN, and so are its gradients (the train step's program
    # is that of every smoke run; a diverging run's loss reaches the same check).
    next_batch, calls = training_loop.next_batch, []

    def third_is_nan(data_iterator, preemption):
        batch = next_batch(data_iterator, preemption)
        calls.append(len(calls) + 1)
        if len(calls) == 3:
            batch = dict(batch, text_weights=np.full_like(batch["text_weights"], np.nan))
        return batch

    monkeypatch.setattr(training_loop, "next_batch", third_is_nan)
    workdir = tmp_path / "w"
    config = smoke(demo_data, total_steps=6, checkpoint_every=2, export_model=False)
    with pytest.raises(
        train.NonFiniteLoss,
        match="non-finite loss .* at step 3: stopping; the last good checkpoint is step 2 in "
        + re.escape(str(workdir / "checkpoints")),
    ):
        train.run(config, str(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    assert sorted(train_losses(workdir)) == [1, 2]
