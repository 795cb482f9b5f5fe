"""Starts a training config on a Cloud TPU VM pod (every worker over `gcloud ... ssh --worker=all`)
or on a SLURM GPU cluster (an sbatch script whose `srun` starts one process per GPU).

    python -m experiments.launch tpu --config experiments/configs/lm_stage2_7b.py \
        --workdir gs://BUCKET/runs/s2 --tpu my-v5p-128 --zone us-east5-a [--project P] \
        [--setup "pip install -e ."] [--env KEY=VALUE ...] [--detach] [--dry-run] [--config.x=y ...]
    python -m experiments.launch slurm --config experiments/configs/lm_stage2_7b.py \
        --workdir /shared/runs/s2 --nodes 16 --gpus-per-node 8 [--partition P] [--time 48:00:00] \
        [--account A] [--setup CMD] [--env KEY=VALUE ...] [--dry-run] [--config.x=y ...]

Every process runs `python -m experiments.train` with the same arguments; jax.distributed finds its
peers from the environment (the TPU runtime on a pod, SLURM_* variables under srun). `--dry-run`
prints the exact commands (and the sbatch script) without running anything.
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path


def train_command(config: str, workdir: str, overrides: list[str], python: str) -> list[str]:
    return [
        python,
        "-m",
        "experiments.train",
        f"--config={config}",
        f"--workdir={workdir}",
        *overrides,
    ]


def _env_pairs(env: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--env {item!r}: expected KEY=VALUE with KEY a variable name")
        pairs.append((key, value))
    return pairs


def _cd(repo_dir: str) -> str:
    # A leading ~ must stay unquoted for the remote shell to expand it.
    if repo_dir == "~" or repo_dir.startswith("~/"):
        return "cd ~" + (f"/{shlex.quote(repo_dir[2:])}" if repo_dir[2:] else "")
    return f"cd {shlex.quote(repo_dir)}"


def remote_script(args, command: list[str]) -> str:
    """The shell line every TPU worker runs: into the repo, the setup, then the trainer."""
    env = [f"{k}={shlex.quote(v)}" for k, v in _env_pairs(args.env)]
    train = shlex.join(command)
    if env:
        train = "env " + " ".join(env) + " " + train
    if args.detach:
        train = f"nohup {train} > {shlex.quote(args.log)} 2>&1 < /dev/null &"
    steps = [_cd(args.repo_dir or "~/mimo-jax")] + ([args.setup] if args.setup else []) + [train]
    return " && ".join(steps)


def tpu_commands(args, command: list[str]) -> list[list[str]]:
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}"]
    if args.project:
        ssh.append(f"--project={args.project}")
    return [ssh + ["--worker=all", f"--command={remote_script(args, command)}"]]


def slurm_script(args, command: list[str]) -> str:
    """An sbatch script: one task per GPU, every task running the trainer."""
    directives = [
        ("job-name", args.job_name),
        ("nodes", args.nodes),
        ("ntasks-per-node", args.gpus_per_node),
        ("gpus-per-node", args.gpus_per_node),
        ("cpus-per-task", args.cpus_per_task),
        ("partition", args.partition),
        ("account", args.account),
        ("time", args.time),
        ("output", args.output),
    ]
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}={v}" for k, v in directives if v]
    if args.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += ["set -euo pipefail"] + ([_cd(args.repo_dir)] if args.repo_dir else [])
    lines += [f"export {k}={shlex.quote(v)}" for k, v in _env_pairs(args.env)]
    if args.setup:  # once per node, before any trainer starts
        lines.append(f"srun --ntasks-per-node=1 bash -c {shlex.quote(args.setup)}")
    lines.append("srun --kill-on-bad-exit=1 " + shlex.join(command))
    return "\n".join(lines) + "\n"


def slurm_commands(args, command: list[str]) -> tuple[str, list[list[str]]]:
    return slurm_script(args, command), [["sbatch", args.script]]


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repo-dir",
        default=None,
        help="the repository on the workers (TPU default "
        "~/mimo-jax; SLURM default: the directory sbatch is called from)",
    )
    p.add_argument("--setup", default="", help="shell command run first (e.g. install the repo)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the trainer (repeatable)",
    )
    p.add_argument("--python", default="python3", help="interpreter on the workers")
    p.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")


def add_tpu(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
    p.add_argument(
        "--detach",
        action="store_true",
        help="start the trainer in the background on each worker (logs to --log)",
    )
    p.add_argument("--log", default="mimo-jax-train.log", help="log file on each worker (--detach)")


def add_slurm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, default=0, help="0: the cluster's default")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--time", default="", help="wall-clock limit, e.g. 48:00:00")
    p.add_argument("--job-name", default="mimo-jax")
    p.add_argument("--output", default="%x-%j.out", help="SLURM log path")
    p.add_argument("--exclusive", action="store_true", help="whole nodes only")
    p.add_argument(
        "--script",
        default="",
        help="where to write the sbatch script (default: JOB_NAME.sbatch in the current directory)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="target", required=True)
    for name, add in (("tpu", add_tpu), ("slurm", add_slurm)):
        s = sub.add_parser(name, allow_abbrev=False)
        s.add_argument("--config", required=True, help="experiment config file[:arg]")
        s.add_argument("--workdir", required=True, help="run directory, seen by every process")
        add(s)
        add_common(s)
    return p


def config_overrides(extra: list[str]) -> list[str]:
    """Arguments argparse did not know: only --config.KEY=VALUE overrides for the trainer."""
    bad = [a for a in extra if not (a.startswith("--config.") and "=" in a)]
    if bad:
        raise ValueError(f"unexpected arguments {bad}: expected only --config.KEY=VALUE overrides")
    return extra


def plan(args, overrides: list[str]) -> tuple[str | None, list[list[str]]]:
    """(sbatch script or None, the commands to run) of a launch."""
    if args.target == "slurm":
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ValueError(
                f"--nodes {args.nodes} and --gpus-per-node {args.gpus_per_node}: "
                "expected at least 1 each"
            )
        args.script = args.script or f"{args.job_name}.sbatch"
    command = train_command(args.config, args.workdir, overrides, args.python)
    if args.target == "tpu":
        return None, tpu_commands(args, command)
    return slurm_commands(args, command)


def execute(args, script: str | None, commands: list[list[str]]) -> int:
    if args.dry_run:
        if script is not None:
            print(f"# {args.script}\n{script}", end="")
        for c in commands:
            print(shlex.join(c))
        return 0
    if script is not None:
        Path(args.script).write_text(script)
    for c in commands:
        rc = subprocess.call(c)
        if rc:
            print(f"error: {shlex.join(c[:6])} ... exited with {rc}", file=sys.stderr)
            return rc
    return 0


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    try:
        script, commands = plan(args, config_overrides(extra))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return execute(args, script, commands)


if __name__ == "__main__":
    sys.exit(main())
