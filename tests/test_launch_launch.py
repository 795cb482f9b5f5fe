"""experiments.launch: the exact commands and sbatch script a dry run prints, and its errors."""

from experiments import launch

CONFIG = "experiments/configs/lm_stage2_7b.py"


def run(capsys, argv):
    rc = launch.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tpu_dry_run_prints_the_exact_ssh_command(capsys):
    rc, out, _ = run(
        capsys,
        [
            "tpu",
            "--config",
            CONFIG,
            "--workdir",
            "gs://bucket/runs/s2",
            "--tpu",
            "pod-1",
            "--zone",
            "us-east5-a",
            "--project",
            "proj",
            "--setup",
            "pip install -e .",
            "--env",
            "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true",
            "--detach",
            "--dry-run",
            "--config.optimizer.learning_rates.llm=1e-05",
        ],
    )
    assert rc == 0
    assert out == (
        "gcloud compute tpus tpu-vm ssh pod-1 --zone=us-east5-a --project=proj --worker=all "
        "'--command=cd ~/mimo-jax && pip install -e . && nohup env "
        "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true python3 -m experiments.train "
        "--config=experiments/configs/lm_stage2_7b.py --workdir=gs://bucket/runs/s2 "
        "--config.optimizer.learning_rates.llm=1e-05 > mimo-jax-train.log 2>&1 < /dev/null &'\n"
    )


def test_tpu_foreground_quotes_the_repo_dir(capsys):
    rc, out, _ = run(
        capsys,
        [
            "tpu",
            "--config",
            CONFIG + ":batch_size=512",
            "--workdir",
            "gs://b/r",
            "--tpu",
            "t",
            "--zone",
            "z",
            "--repo-dir",
            "/opt/my repo",
            "--dry-run",
        ],
    )
    assert rc == 0
    assert out == (
        "gcloud compute tpus tpu-vm ssh t --zone=z --worker=all '--command=cd "
        "'\"'\"'/opt/my repo'\"'\"' && python3 -m experiments.train "
        "--config=experiments/configs/lm_stage2_7b.py:batch_size=512 "
        "--workdir=gs://b/r'\n"
    )


def test_slurm_dry_run_prints_the_exact_script_and_sbatch(capsys):
    rc, out, _ = run(
        capsys,
        [
            "slurm",
            "--config",
            CONFIG,
            "--workdir",
            "/shared/runs/s2",
            "--nodes",
            "16",
            "--gpus-per-node",
            "8",
            "--cpus-per-task",
            "12",
            "--partition",
            "h100",
            "--account",
            "audio",
            "--time",
            "48:00:00",
            "--job-name",
            "s2",
            "--exclusive",
            "--repo-dir",
            "/shared/mimo-jax",
            "--env",
            "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
            "--setup",
            "uv pip install -e .",
            "--dry-run",
            "--config.total_steps=100",
        ],
    )
    assert rc == 0
    assert (
        out
        == """# s2.sbatch
#!/bin/bash
#SBATCH --job-name=s2
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --partition=h100
#SBATCH --account=audio
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --exclusive
set -euo pipefail
cd /shared/mimo-jax
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
srun --ntasks-per-node=1 bash -c 'uv pip install -e .'
srun --kill-on-bad-exit=1 python3 -m experiments.train \
--config=experiments/configs/lm_stage2_7b.py \
--workdir=/shared/runs/s2 --config.total_steps=100
sbatch s2.sbatch
"""
    )


def test_slurm_writes_the_script_and_submits_it(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda c: calls.append(c) or 0)
    script = tmp_path / "job.sbatch"
    rc, out, _ = run(
        capsys,
        [
            "slurm",
            "--config",
            CONFIG,
            "--workdir",
            "/w",
            "--nodes",
            "1",
            "--gpus-per-node",
            "2",
            "--script",
            str(script),
        ],
    )
    assert rc == 0 and out == ""
    assert calls == [["sbatch", str(script)]]
    assert script.read_text().splitlines()[-1] == (
        "srun --kill-on-bad-exit=1 python3 -m experiments.train "
        "--config=experiments/configs/lm_stage2_7b.py --workdir=/w"
    )


def test_rejects_arguments_that_are_not_config_overrides(capsys):
    rc, _, err = run(
        capsys,
        ["slurm", "--config", CONFIG, "--workdir", "/w", "--nodes", "1", "--gpu", "8", "--dry-run"],
    )
    assert rc == 2 and "['--gpu', '8']" in err and "--config.KEY=VALUE" in err


def test_rejects_a_malformed_env_and_zero_nodes(capsys):
    rc, _, err = run(
        capsys,
        [
            "tpu",
            "--config",
            CONFIG,
            "--workdir",
            "w",
            "--tpu",
            "t",
            "--zone",
            "z",
            "--env",
            "NOVALUE",
            "--dry-run",
        ],
    )
    assert rc == 2 and "--env 'NOVALUE'" in err
    rc, _, err = run(
        capsys, ["slurm", "--config", CONFIG, "--workdir", "w", "--nodes", "0", "--dry-run"]
    )
    assert rc == 2 and "--nodes 0" in err
