"""The README's commands and its Python example run as written (paths swapped for small local
ones, sizes shrunk where a command names a 7B run), from a fresh directory with relative paths; and
every command the README shows is run here, by another named test, or by CI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Where each README command runs, by its first words (the quick start runs in .ci/run).
RUN_BY = {
    "python3 -m venv .venv": ".ci/run (the quick-start block)",
    "python -m experiments.train --config experiments/configs/lm_stage2_7b.py": (
        "test_readme.py::test_training_command"
    ),
    "python -m experiments.train --config experiments/configs/demo.py": (
        "test_readme.py::test_data_commands"
    ),
    "python -m experiments.train --config experiments/configs/tokenizer_stage": (
        "test_tokenizer_train.py"
    ),
    "python -m data_pipelines.": "test_readme.py::test_data_commands",
    "python -m data_pipelines.tokenize --engine ray": "test_readme.py::test_ray_cluster_commands",
    "export RAY_AUTH_MODE": "test_readme.py::test_ray_cluster_commands",
    "ray start": "test_readme.py::test_ray_cluster_commands",
    "python -m experiments.demo_tokenizer": "test_tokenizer_train.py (its --smoke run)",
    "python -m data_pipelines.voice": "test_voice.py (through experiments.demo_voice)",
    "python -m experiments.demo_voice": "test_voice.py",
    "python -m experiments.aot": "test_launch_aot.py",
    "python -m experiments.aot --config experiments/configs/lm_stage2_7b.py --topology": (
        "test_aot_tpu.py (a tiny step for v5p:2x2x1)"
    ),
    "python -m experiments.sweep": "test_launch_sweep.py",
    "python -m experiments.launch": "test_launch_launch.py",
    "python convert_torch_weights.py": "test_readme.py::test_conversion_commands",
    "python -m mimo_jax.tokenizer": "test_tokenizer_cli.py",
    "python -m mimo_jax.tokenizer evaluate": "test_tokenizer_evaluate.py",
    "python -m mimo_jax.generate": "test_tasks_cli.py",
    "python -m mimo_jax.evaluate": "test_evaluate.py",
    "MIMO_FIXTURES=": "every parity test (tests/conftest.py reads MIMO_FIXTURES)",
    ".venv/bin/python -m pytest -n 2 -m e2e": ".ci/run (the end-to-end tier)",
    "pip install -e": "test_packaging.py (extras and the wheel); .ci/run (the install)",
    "python benchmarks/": "by hand: figures, not checks (their smoke runs have tests)",
    "python -m benchmarks.": "by hand: figures, not checks (their smoke runs have tests)",
}


def blocks(language: str, section: str | None = None) -> list[str]:
    text = README if section is None else README.split(f"## {section}\n", 1)[1].split("\n## ")[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [
        re.sub(r"\s+#.*$", "", line).strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def readme_command(section: str, start: str) -> list[str]:
    """The words of the one command of a section that starts so, `[optional parts]` left out."""
    (line,) = [c for b in blocks("bash", section) for c in commands(b) if c.startswith(start)]
    return re.sub(r"\s*\[[^\]]*\]", "", line).split()


def test_every_command_is_run_somewhere():
    shown = [c for b in blocks("bash") for c in commands(b)]
    assert len(shown) > 10
    unrun = [c for c in shown if not any(c.startswith(prefix) for prefix in RUN_BY)]
    assert unrun == []


def _run(args, cwd, timeout=600):
    # As on a user's CPU machine: one device, not the suite's eight simulated ones.
    # (Every occurrence: under pytest-xdist the workers' conftest appends the flag once more.)
    flags = " ".join(
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=flags)
    out = subprocess.run(
        [sys.executable if a == "python" else a for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A directory to run README commands from (as from the repository root): the config files
    and the converter script linked in, nothing else."""
    root = tmp_path_factory.mktemp("readme")
    (root / "experiments").symlink_to(ROOT / "experiments")
    (root / "convert_torch_weights.py").symlink_to(ROOT / "convert_torch_weights.py")
    return root


@pytest.fixture(scope="module")
def readme_data(workspace, fixtures_root) -> Path:
    """The README's Data block, run as written from the workspace (CKPT: the fixture tokenizer)."""
    for line in (c for b in blocks("bash", "Data") for c in commands(b)):
        if line.startswith("python -m data_pipelines."):
            out = _run(line.replace("CKPT", str(fixtures_root / "tokenizer")).split(), workspace)
            assert_quiet(out)
    return workspace / "data" / "demo"


def assert_quiet(out) -> None:
    """No INFO lines of the libraries (absl's `I1129 ...`, logging's `INFO absl: ...`)."""
    noisy = re.findall(
        r"^(?:[IDV]\d{4} .*|(?:INFO|DEBUG) (?!data_pipelines|experiments|mimo_jax"
        r"|__main__).*)$",
        out.stdout + out.stderr,
        re.M,
    )
    assert noisy == [], noisy[:5]


@pytest.mark.e2e
def test_data_commands(workspace, readme_data):
    manifest = json.loads((readme_data / "shards" / "manifest.json").read_text())
    assert sum(s["records"] for s in manifest["shards"]) == 16
    assert_quiet(_run(readme_command("Data", "python -m experiments.train"), workspace))
    assert (workspace / "runs" / "mine" / "model" / "config.json").is_file()


@pytest.mark.e2e
def test_training_command(workspace, readme_data):
    """The 7B stage-2 command on a converted checkpoint (a tiny random one with the demo
    tokenizer's ids) and the demo shards, resized to the CPU by overrides appended at the end."""
    from flax import nnx

    from experiments.configs.demo import demo_hf
    from mimo_jax import model_checkpoint as checkpoint
    from mimo_jax.lm.config import MiMoAudioConfig
    from mimo_jax.lm.model import MiMoAudioLM

    hf = demo_hf(smoke=True)
    ckpt = workspace / "ckpt" / "mimo-7b"
    checkpoint.save(MiMoAudioLM(MiMoAudioConfig.from_hf(hf), rngs=nnx.Rngs(0)), hf, ckpt)
    (workspace / "MiMo-Audio-7B-Base").mkdir()
    (workspace / "MiMo-Audio-7B-Base" / "tokenizer.json").symlink_to(readme_data / "tokenizer.json")
    command = readme_command("Training", "python -m experiments.train")
    command = [
        a.replace("gs://bucket/run", "runs/stage2").replace("data/shards", "data/demo/shards")
        for a in command
    ]
    _run(
        command
        + [
            "--config.data.batch_size=8",
            "--config.data.context_length=256",
            "--config.total_steps=3",
            "--config.checkpoint_every=2",
            "--config.log_every=1",
        ],
        workspace,
    )
    lines = (workspace / "runs" / "stage2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert (workspace / "runs" / "stage2" / "model" / "config.json").is_file()


@pytest.mark.e2e
def test_ray_cluster_commands(tmp_path, fixtures_root, monkeypatch):
    """The Ray cluster block as written, its two hosts on this machine (each `ray start` with one
    CPU and `--block`, so that stopping it stops its processes), the demo corpus of one sentence
    and the fixture tokenizer as CKPT."""
    import secrets
    import shutil
    import socket
    import tempfile

    from data_pipelines import demo_corpus

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    section, head_port = "Tokenizing on a Ray cluster", free_port()
    demo_corpus.build(str(tmp_path / "demo"), sentences=1)
    for pair in readme_command(section, "export RAY_AUTH_MODE")[1:]:
        monkeypatch.setenv(*pair.split("=", 1))
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")  # other jobs' memory kills no worker
    here = lambda words: [w.replace("HEAD_IP:6379", f"127.0.0.1:{head_port}") for w in words]
    # Its own --temp-dir: `ray start` names its cluster in the temp dir's ray_current_cluster,
    # which a later ray.init() on this machine would try to join. A short path: Ray's sockets.
    local = ["--num-cpus=1", "--block", f"--temp-dir={tempfile.mkdtemp(prefix='ray-')}"]
    head = [*readme_command(section, "ray start --head"), *local]
    head = [w.replace("6379", str(head_port)) for w in head]
    head.append(f"--ray-client-server-port={free_port()}")
    node = here(readme_command(section, "ray start --address")) + local
    ray = str(Path(sys.executable).parent / "ray")  # the environment's, as `python` is
    started = []
    try:
        for command in (head, node):
            started.append(
                subprocess.Popen([ray, *command[1:]], cwd=tmp_path, stdout=subprocess.DEVNULL)
            )
            _wait_for_port(head_port, started[0])
        words = here(readme_command(section, "python -m data_pipelines.tokenize --engine ray"))
        paths = {"corpus.jsonl": "demo/manifest.jsonl", "CKPT": str(fixtures_root / "tokenizer")}
        out = _run([paths.get(w, w) for w in words], tmp_path)
    finally:
        for process in reversed(started):
            process.terminate()
            process.wait(timeout=60)
        shutil.rmtree(local[-1].split("=", 1)[1], ignore_errors=True)
    assert "ray, 1 workers: 1 shards" in out.stdout
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["records"] == 4


def _wait_for_port(port: int, process, seconds: float = 120.0) -> None:
    import socket
    import time

    deadline = time.time() + seconds
    while process.poll() is None and time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"ray start --head: no head on port {port} (exit {process.poll()})")


@pytest.mark.e2e
def test_conversion_commands(workspace, fixtures_root):
    """Both conversion commands, relative paths (the official directory: the LM fixture)."""
    to_orbax, back = (
        readme_command("Converting checkpoints", f"python convert_torch_weights.py {s}")
        for s in ("MiMo-Audio-7B-Base/", "ckpt/mimo-7b exported/")
    )
    official = workspace / "official"
    official.mkdir()
    for name in ("config.json", "model.safetensors"):
        (official / name).symlink_to(fixtures_root / "lm" / name)
    _run(
        [
            a.replace("MiMo-Audio-7B-Base/", "official/").replace("ckpt/mimo-7b", "converted/lm")
            for a in to_orbax
        ],
        workspace,
    )
    _run([a.replace("ckpt/mimo-7b", "converted/lm") for a in back], workspace)
    assert (workspace / "exported" / "model.safetensors").is_file()


@pytest.mark.e2e
def test_python_example(tmp_path, fixtures_root):
    example = blocks("python", "Using the model")[0]  # the first block; ### Tasks has its own
    ckpt = tmp_path / "ckpt"
    _run(["python", "convert_torch_weights.py", str(fixtures_root / "lm"), str(ckpt)], ROOT)
    script = tmp_path / "example.py"
    script.write_text(example.replace('"ckpt/mimo-7b"', repr(str(ckpt))))
    out = _run(["python", str(script)], tmp_path)
    assert "(1, " in out.stdout  # the official layout's shape


@pytest.mark.e2e
def test_tasks_example(tmp_path, fixtures_root):
    """The ### Tasks block against the tasks/ fixture (its LM, tokenizers and a stereo 16 kHz file
    as the question); short generations."""
    (example,) = re.findall(r"### Tasks\n.*?```python\n(.*?)```", README, re.S)
    tasks = fixtures_root / "tasks"
    script = example
    text_tokenizer = tasks / "text_tokenizer" / "tokenizer.json"
    for name, path in {
        '"MiMo-Audio-7B-Instruct/tokenizer.json"': text_tokenizer,
        '"MiMo-Audio-7B-Instruct"': tasks / "lm",
        '"MiMo-Audio-Tokenizer"': fixtures_root / "tokenizer",
        '"question.wav"': tasks / "stereo16k.wav",
        '"max_new_groups": 750': '"max_new_groups": 6',
    }.items():
        assert name in script, name
        script = script.replace(name, repr(str(path)) if isinstance(path, Path) else path)
    (tmp_path / "example.py").write_text(script)
    out = _run(["python", "example.py"], tmp_path)
    assert out.returncode == 0
    for i in range(2):
        assert (tmp_path / f"tts_{i}.wav").stat().st_size > 0
