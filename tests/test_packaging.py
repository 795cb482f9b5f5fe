"""The wheel ships every module of the source tree (a package without `__init__.py` was once left
out), with the console commands."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # whole commands in processes of their own

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mimo_jax", "sharding", "data_pipelines", "experiments")
MODULES = ("convert_torch_weights.py",)
COMMANDS = (
    "mimo-demo",
    "mimo-train",
    "mimo-convert",
    "mimo-audio-tokenizer",
    "mimo-tokenize",
    "mimo-shards",
)


def source_modules() -> set[str]:
    files = set(MODULES)
    for package in PACKAGES:
        files |= {
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / package).rglob("*.py")
            if "__pycache__" not in p.parts
        }
    return files


def test_wheel_holds_every_module(tmp_path):
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    tree = tmp_path / "src"
    for name in tracked:  # a clean copy, as a fresh clone has it
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(tree),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("mimo_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.endswith(".py")}
    assert source_modules() - shipped == set()
    assert "mimo_jax/lm/model.py" in shipped
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{command} =" in text for command in COMMANDS)
