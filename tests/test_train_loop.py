"""The train entry point on the demo corpus: stages, evaluation, metrics, interrupt (SIGTERM) and
resume, multi-process runs, and the errors that stop a run before it starts."""

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from train_support import ROOT, SMOKE_SETTINGS, run_sigterm_at_step, xla_env
from train_support import train_cmd as _train_cmd

from data_pipelines.shards import ShardSet
from experiments import train
from experiments.config_checks import set_value
from experiments.configs import demo as demo_config
from mimo_jax.train.build import lm_architecture


def smoke(data, stage="stage2", **overrides):
    config = demo_config.get_config(f"stage={stage},data={data},smoke=True")
    for key, value in {**SMOKE_SETTINGS, **overrides}.items():
        set_value(config, key, value)
    return config


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(workdir) if "loss" in m}


def test_stage1_then_stage2_from_its_weights(demo_data, tmp_path):
    assert train.run(smoke(demo_data, "stage1", total_steps=6), str(tmp_path / "s1")) == 0
    first = metrics(tmp_path / "s1")
    assert [m["step"] for m in first] == list(range(1, 7))
    assert "codebook0_loss" not in first[0] and first[-1]["loss"] < first[0]["loss"]
    config = smoke(demo_data, "stage2", total_steps=4, eval_every=2, eval_steps=1)
    config.model.init_checkpoint = str(tmp_path / "s1" / "model")
    assert train.run(config, str(tmp_path / "s2")) == 0
    second = metrics(tmp_path / "s2")
    assert "codebook7_loss" in second[0] and "codebook7_accuracy" in second[0]
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


def test_sigterm_saves_and_resume_continues_identically(demo_data, tmp_path):
    steps = ["--config.total_steps=12", "--config.checkpoint_every=1000"]
    env = xla_env(1)
    straight = subprocess.run(
        _train_cmd(demo_data, tmp_path / "straight", *steps),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stdout + straight.stderr
    out = run_sigterm_at_step(_train_cmd(demo_data, tmp_path / "cut", *steps), env)
    assert "preempted: checkpoint saved at step" in out
    cut_at = max(train_losses(tmp_path / "cut"))
    assert cut_at < 12 and (tmp_path / "cut" / "checkpoints" / str(cut_at)).is_dir()
    resumed = subprocess.run(
        _train_cmd(demo_data, tmp_path / "cut", *steps),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "straight")


def test_a_missing_shard_stops_the_run_before_the_first_step(demo_data, tmp_path):
    # The demo config skips bad records; a missing shard file used to be skipped as a bad record
    # forever, with SIGTERM ignored. Bounded: past 60 s the test sends SIGTERM, as `timeout` did.
    data = tmp_path / "data"
    shutil.copytree(demo_data / "shards", data / "shards")
    shutil.copy(demo_data / "tokenizer.json", data)
    shard = data / "shards" / "shard-00000-of-00001.array_record"
    shard.unlink()
    run = subprocess.Popen(
        _train_cmd(data, tmp_path / "w"),
        cwd=ROOT,
        env=xla_env(8),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = run.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGTERM)
        try:
            run.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            run.kill()
            pytest.fail("the run hung and ignored SIGTERM")
        pytest.fail(f"the run was still going after 60 s; SIGTERM ended it ({run.returncode})")
    assert run.returncode == 1, out + err
    assert [line for line in err.splitlines() if shard.name in line] == [
        f"  data.sources={str(data / 'shards')!r}: expected the shards its manifest.json lists; "
        f"shard {shard}: missing (the manifest lists 12 records in it)"
    ]
    assert not (tmp_path / "w" / "metrics.jsonl").exists()
    assert (data / "shards" / "manifest.json").exists()


def test_sigterm_while_waiting_for_data_saves_the_last_step(demo_data, tmp_path, monkeypatch):
    # The third batch's first read blocks (a store that stopped answering) and SIGTERM comes:
    # the run stops at once, saving step 2 with the data iterator from before that batch.
    blocked, read, next_batch = threading.Event(), ShardSet.read_bytes, train.next_batch
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

    monkeypatch.setattr(train, "next_batch", third_blocks)
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
            _train_cmd(
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


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.nope=1"], "nope"),
        (["--config.total_steps=abc"], "total_steps"),
    ],
)
def test_bad_overrides_stop_before_training(demo_data, tmp_path, args, message):
    out = subprocess.run(
        _train_cmd(demo_data, tmp_path / "w", *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and message in out.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


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


def test_workdir_of_another_experiment_is_refused(demo_data, tmp_path):
    assert train.run(smoke(demo_data, "stage1", total_steps=2), str(tmp_path / "w")) == 0
    with pytest.raises(ValueError, match="holds checkpoints of another experiment"):
        train.run(smoke(demo_data, "stage2", total_steps=4), str(tmp_path / "w"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_data, tmp_path):
    config = smoke(
        demo_data,
        total_steps=30,
        checkpoint_every=2,
        **{
            "optimizer.learning_rates": {"patch_encoder": 1e12, "llm": 1e12, "patch_decoder": 1e12},
            "optimizer.clip_norm": 0.0,
            "optimizer.warmup_ratio": 0.0,
        },
    )
    with pytest.raises(train.NonFiniteLoss, match="non-finite loss .* the last good checkpoint"):
        train.run(config, str(tmp_path / "w"))
