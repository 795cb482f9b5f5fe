"""`benchmarks/generate.py --quick` runs end to end and prints its table, the streaming time to
first audio and the targets."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # whole commands in processes of their own

ROOT = Path(__file__).resolve().parents[1]


def test_generate_benchmark_quick_prints_the_table():
    # The script's own folder comes first on its path: point imports at this checkout.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    out = subprocess.run(
        [sys.executable, "benchmarks/generate.py", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for name in ("jax greedy", "jax sampled"):
        row = re.search(rf"^{name}\s+1\s+[\d.]+\s+([\d.]+)\s+1\.00$", text, re.M)
        assert row and float(row.group(1)) > 0, text  # every generated group is speech
    stream = re.search(
        r"^streaming TTS.*first audio after ([\d.]+) s, end to end ([\d.]+) s", text, re.M
    )
    assert stream and 0 < float(stream.group(1)) <= float(stream.group(2)), text
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        assert re.search(r"^torch greedy\s+1\s+[\d.]+\s+[\d.]+", text, re.M), text
        assert "jax batch 1 >= torch batch 1" in text
    else:
        assert "PyTorch comparison skipped" in text
