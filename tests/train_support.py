"""Smoke training runs in a subprocess, shared by the train-loop, run-directory and gs:// tests."""
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The suite is compile-bound on two cores: LLVM's cheap pipeline halves the train step's compile
# time and keeps every parity test within its tolerance. conftest sets it for the whole suite.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# A guard: eight simulated devices share two cores with the other test worker, so one device's
# thread may reach a collective long after the rest, and past XLA:CPU's default 40 s rendezvous
# timeout the process aborts; the suite waits as long as a test may run.
PATIENT_COLLECTIVES = "--xla_cpu_collective_call_terminate_timeout_seconds=900"
TEST_XLA_FLAGS = f"{FAST_COMPILE} {PATIENT_COLLECTIVES}"


def xla_env(devices: int) -> dict:
    """The environment of a subprocess that simulates `devices` CPU devices."""
    return dict(os.environ,
                XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}")


def train_cmd(data, workdir, *extra) -> list[str]:
    """The train entry point on the demo's smoke config (one row per simulated device)."""
    return [sys.executable, "-u", "-m", "experiments.train",
            f"--config={ROOT}/experiments/configs/demo.py:stage=stage2,data={data},smoke=True",
            f"--workdir={workdir}", "--config.data.batch_size=8", "--config.log_every=1",
            "--config.checkpoint.async_save=False", *extra]


def run_sigterm_at_step(cmd, env, step: int = 2) -> str:
    """Runs `cmd`, sends SIGTERM once it logs `step`, and returns its output; it must exit 0."""
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    for line in run.stdout:
        if line.startswith(f"step {step}/"):
            run.send_signal(signal.SIGTERM)
            break
    out = run.stdout.read()
    assert run.wait(timeout=300) == 0, out
    return out
