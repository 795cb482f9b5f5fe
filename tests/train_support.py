"""Smoke training runs, in the test process and in subprocesses, shared by the train-loop, run
directory, QLoRA, eval-generation and gs:// tests; and a random training batch for the step
tests."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mimo_jax.train import batch

ROOT = Path(__file__).resolve().parents[1]


def xla_env(devices: int) -> dict:
    """The environment of a subprocess that simulates `devices` CPU devices: the test process's
    compilation cache and XLA flags with the device count replaced, so that a subprocess of as
    many devices as the test process finds the programs the test process compiled (the XLA flags
    are part of a program's cache key)."""
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+",
        f"--xla_force_host_platform_device_count={devices}",
        os.environ["XLA_FLAGS"],
    )
    return dict(os.environ, XLA_FLAGS=flags)


# The suite's smoke runs: the demo's smoke LM with 2 audio channels (delays 0-1) where parity is
# not what a test checks, one row per simulated device (the 8 of the test process and of the runs
# it starts), every step logged, synchronous saves, and a constant learning rate, so that the
# train step's program depends on neither total_steps nor the process: one compile of each
# program (kept in the persistent cache) serves the smoke runs of every length, in the test
# process and in subprocesses alike.
SMOKE_ARG = "smoke=True,channels=2"
SMOKE_SETTINGS = {
    "data.batch_size": 8,
    "log_every": 1,
    "checkpoint.async_save": False,
    "optimizer.schedule": "constant",
}


def smoke(data, stage="stage2", **overrides):
    """The demo's smoke config of `stage` on the demo data, with SMOKE_SETTINGS and `overrides`
    (dotted keys)."""
    from experiments.config_checks import set_value
    from experiments.configs import demo

    config = demo.get_config(f"stage={stage},data={data},{SMOKE_ARG}")
    for key, value in {**SMOKE_SETTINGS, **overrides}.items():
        set_value(config, key, value)
    return config


def train_cmd(data, workdir, *extra) -> list[str]:
    """The train entry point on what `smoke(data)` configures (`extra`: more flags)."""
    return [
        sys.executable,
        "-u",
        "-m",
        "experiments.train",
        f"--config={ROOT}/experiments/configs/demo.py:stage=stage2,data={data},{SMOKE_ARG}",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in SMOKE_SETTINGS.items()),
        *extra,
    ]


def metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(workdir) if "loss" in m}


def run_sigterm_at_step(cmd, env=None, step: int = 2) -> str:
    """Runs `cmd` (in `env`, default the test process's), sends SIGTERM once it logs `step`, and
    returns its output; it must exit 0."""
    run = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in run.stdout:
        if line.startswith(f"step {step}/"):
            run.send_signal(signal.SIGTERM)
            break
    out = run.stdout.read()
    assert run.wait(timeout=300) == 0, out
    return out


# An LM's two audio channels (delays 0-1), for the step tests that do not test the channels: a
# smaller program, a quicker compile.
TWO_CHANNELS = dict(
    audio_channels=2,
    speech_vocab_size="1025-1025",
    speech_zeroemb_idx="1024-1024",
    delay_pattern="0-1",
)


def random_batch(config, b=2, g=6, seed=0) -> dict:
    """A training batch of random ids for an LM config: b rows of g groups, half of them speech."""
    rng = np.random.default_rng(seed)
    fields = batch.shapes(b, g, config.group_size, config.audio_channels)
    shape = {k: s for k, (s, _) in fields.items()}
    text = rng.integers(0, config.vocab_size, shape["text"])
    text[:, ::2] = config.empty_idx
    values = dict(
        text=text,
        codes=rng.integers(0, 128, shape["codes"]),
        positions=np.broadcast_to(np.arange(g), shape["positions"]),
        text_targets=rng.integers(0, config.vocab_size, shape["text_targets"]),
        code_targets=rng.integers(0, 128, shape["code_targets"]),
    )
    return {k: jnp.asarray(values.get(k, np.ones(s)), dtype) for k, (s, dtype) in fields.items()}
