"""How every test process and every process a test starts compiles: 8 simulated CPU devices (or
as many as a test asks for), LLVM's cheap pipeline, and one persistent compilation cache.

JAX reads its cache settings when it is imported, so `configure` runs in conftest before anything
imports JAX; the processes the tests start inherit the environment it sets."""

import os
from pathlib import Path

# The suite is compile-bound on two cores: LLVM's cheap pipeline halves the train step's compile
# time (31 s against 69 s) and keeps every parity test within its tolerance.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
DEVICES = 8


def xla_flags(devices: int) -> str:
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}"


def configure() -> None:
    """Sets the environment of the test processes (and so of what they start)."""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(DEVICES)}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # The same smoke train step and LM programs are compiled by dozens of tests, in the xdist
    # workers and the training subprocesses alike: one cache serves them all. A max size turns on
    # the cache's file lock (processes share it).
    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / ".pytest_cache" / "jax"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
