"""Smoke training runs in a subprocess, shared by the train-loop, run-directory and gs:// tests,
and a random training batch for the step tests."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from compile_settings import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def xla_env(devices: int) -> dict:
    """The environment of a subprocess that simulates `devices` CPU devices (the test process's
    compilation cache and compile flags included)."""
    return dict(os.environ, XLA_FLAGS=xla_flags(devices))


# The suite's smoke runs: one row per simulated device, every step logged, synchronous saves, and
# a constant learning rate, so the train step's program does not depend on total_steps and one
# compile (kept in the persistent cache) serves the smoke runs of every length.
SMOKE_SETTINGS = {
    "data.batch_size": 8,
    "log_every": 1,
    "checkpoint.async_save": False,
    "optimizer.schedule": "constant",
}


def train_cmd(data, workdir, *extra) -> list[str]:
    """The train entry point on the demo's smoke config with SMOKE_SETTINGS."""
    return [
        sys.executable,
        "-u",
        "-m",
        "experiments.train",
        f"--config={ROOT}/experiments/configs/demo.py:stage=stage2,data={data},smoke=True",
        f"--workdir={workdir}",
        *(f"--config.{key}={value}" for key, value in SMOKE_SETTINGS.items()),
        *extra,
    ]


def run_sigterm_at_step(cmd, env, step: int = 2) -> str:
    """Runs `cmd`, sends SIGTERM once it logs `step`, and returns its output; it must exit 0."""
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


def random_batch(config, b=2, g=6, seed=0) -> dict:
    """A training batch of random ids for an LM config: b rows of g groups, half of them speech."""
    rng = np.random.default_rng(seed)
    gs, c = config.group_size, config.audio_channels
    text = rng.integers(0, config.vocab_size, (b, g))
    text[:, ::2] = config.empty_idx
    return {
        k: jnp.asarray(v)
        for k, v in dict(
            text=text,
            codes=rng.integers(0, 128, (b, g, gs, c)),
            positions=np.tile(np.arange(g), (b, 1)),
            segment_ids=np.ones((b, g), np.int32),
            text_targets=rng.integers(0, config.vocab_size, (b, g)),
            text_weights=np.ones((b, g), np.float32),
            code_targets=rng.integers(0, 128, (b, g, gs, c)),
            code_weights=np.ones((b, g, c), np.float32),
        ).items()
    }
