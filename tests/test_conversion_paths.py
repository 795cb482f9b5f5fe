"""The converter's paths: relative SRC and DST, and the staging directories of interrupted runs
(removed by the next run on the same DST when their process has ended)."""

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
import pytest
from safetensors.numpy import load_file

import convert_torch_weights

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_relative_paths_both_ways(fixtures_root, tmp_path, monkeypatch, capsys):
    shutil.copytree(fixtures_root / "lm", tmp_path / "official")
    monkeypatch.chdir(tmp_path)
    assert convert_torch_weights.main(["official", "out/orbax", "--quiet"]) == 0
    assert convert_torch_weights.main(["out/orbax", "back", "--quiet"]) == 0
    assert f"wrote {tmp_path / 'back'}" in capsys.readouterr().out
    source, written = load_file("official/model.safetensors"), load_file("back/model.safetensors")
    assert set(written) <= set(source) and written
    for name, value in written.items():
        np.testing.assert_array_equal(value, source[name], err_msg=name)
    assert not list(Path("out").glob(".orbax.partial-*")) and not list(Path(".").glob(".back.*"))


def test_stale_staging_of_dead_processes_is_removed_live_ones_kept(fixtures_root, tmp_path, capsys):
    host = socket.gethostname().replace("-", "_")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead = tmp_path / f".ckpt.partial-{host}-{_dead_pid()}-0a1b2c3d"
        older = tmp_path / ".ckpt.partial-x7y8z9w0"  # named by an earlier version (no pid)
        running = tmp_path / f".ckpt.partial-{host}-{live.pid}-00000000"
        elsewhere = tmp_path / f".ckpt.partial-otherhost-{_dead_pid()}-11111111"
        unrelated = tmp_path / ".ckpt2.partial-x7y8z9w0"
        for d in (dead, older, running, elsewhere, unrelated):
            (d / "params").mkdir(parents=True)
        code = convert_torch_weights.main(
            [str(fixtures_root / "lm"), str(tmp_path / "ckpt"), "--quiet"]
        )
        assert code == 0
        out = capsys.readouterr().out
        removed = [line for line in out.splitlines() if line.startswith("removing ")]
        assert sorted(removed) == sorted(
            f"removing {d}: staging directory of an interrupted write of ckpt (its process has "
            f"ended)"
            for d in (dead, older)
        )
        assert not dead.exists() and not older.exists()
        assert running.exists() and elsewhere.exists() and unrelated.exists()
    finally:
        live.kill()
        live.wait()


@pytest.mark.e2e
def test_killed_conversion_leaves_a_staging_dir_the_next_run_removes(fixtures_root, tmp_path):
    dst = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        str(ROOT / "convert_torch_weights.py"),
        str(fixtures_root / "lm"),
        str(dst),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".ckpt.partial-*")):  # killed as soon as it starts writing
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (partial,) = tmp_path.glob(".ckpt.partial-*")
    assert not dst.exists()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"removing {partial}: staging directory of an interrupted write of ckpt" in done.stdout
    assert not list(tmp_path.glob(".ckpt.partial-*"))
    assert json.loads((dst / "config.json").read_text()) == json.loads(
        (fixtures_root / "lm" / "config.json").read_text()
    )
    assert os.path.isdir(dst / "params")
