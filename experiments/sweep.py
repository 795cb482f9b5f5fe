"""Runs every point of a config file's sweep: `sweep(arg)` returns a list of override dicts; each
run trains `get_config(arg)` with those overrides in ROOT/<name>, the name made from the overrides.

    python -m experiments.sweep --config experiments/configs/lm_stage2_7b.py --workdir ROOT \
        [--dry-run] [--launcher local|tpu|slurm] [launcher options, see experiments.launch]

Every override is checked against the config (the key exists, the value has its type) before any
run starts. `local` runs the trainer once per point, one after another; `tpu` and `slurm` hand each
point to experiments.launch (one ssh command / one sbatch job per point).
"""

import argparse
import re
import shlex
import subprocess
import sys

import ml_collections

from experiments import launch
from experiments.cli import import_config_file


def load_config_module(spec: str):
    """(module, arg) of `FILE[:arg]`."""
    module, arg = import_config_file(spec)
    if not callable(getattr(module, "sweep", None)):
        raise ValueError(f"config file {spec.partition(':')[0]!r} defines no sweep(arg)")
    return module, arg


def _node(config: ml_collections.ConfigDict, key: str):
    """(parent ConfigDict, leaf name) of a dotted key, or ValueError naming the missing part."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "the config"
            options = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ValueError(
                f"sweep override {key!r}: {where} has no key {part!r}"
                + (f" (expected one of {options})" if options else "")
            )
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def _compatible(current, value) -> bool:
    if current is None:
        return True
    if isinstance(current, bool) or isinstance(value, bool):
        return type(current) is type(value)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    if isinstance(current, (list, tuple)):
        return isinstance(value, (list, tuple))
    return type(current) is type(value)


def validate(config: ml_collections.ConfigDict, overrides: dict) -> None:
    for key, value in overrides.items():
        parent, leaf = _node(config, key)
        current = parent[leaf]
        if isinstance(current, ml_collections.ConfigDict) or isinstance(value, dict):
            raise ValueError(
                f"sweep override {key!r}: override the leaves of a sub-config "
                f"({key}.NAME), not the sub-config itself"
            )
        if not _compatible(current, value):
            raise ValueError(
                f"sweep override {key!r}={value!r}: expected type "
                f"{type(current).__name__}, as the config's {current!r}"
            )


def flag_value(value) -> str:
    """The text ml_collections' config flags parse back into `value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return repr(tuple(value))
    return repr(value) if isinstance(value, float) else str(value)


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key of the sweep ends with."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[key] = suffix
    return out


def run_name(overrides: dict, short: dict[str, str]) -> str:
    """Filesystem-safe and deterministic: `key=value` pairs in the sweep's order."""
    if not overrides:
        return "base"
    text = ",".join(f"{short[k]}={flag_value(v)}" for k, v in overrides.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def plan_runs(spec: str, root: str) -> list[tuple[str, list[str]]]:
    """[(run name, --config.KEY=VALUE overrides)] of the sweep, all validated first."""
    module, arg = load_config_module(spec)
    config = module.get_config(arg)
    points = list(module.sweep(arg))
    if not points:
        raise ValueError(f"sweep({arg!r}) of {spec!r} returned no runs")
    for point in points:
        validate(config, point)
    short = _short_keys(sorted({k for p in points for k in p}))
    runs = [
        (run_name(p, short), [f"--config.{k}={flag_value(v)}" for k, v in p.items()])
        for p in points
    ]
    names = [n for n, _ in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"sweep points with the same overrides: {duplicates}")
    return runs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--config", required=True, help="experiment config file[:arg]")
    p.add_argument("--workdir", required=True, help="root directory; each run gets ROOT/NAME")
    p.add_argument("--launcher", choices=("local", "tpu", "slurm"), default="local")
    p.add_argument(
        "--python",
        default=None,
        help="interpreter of the runs (default: this one "
        "for local runs, python3 on TPU workers and SLURM nodes)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    return p


def _launcher_args(launcher: str, rest: list[str], python: str | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.sweep --launcher {launcher}", allow_abbrev=False
    )
    (launch.add_tpu if launcher == "tpu" else launch.add_slurm)(p)
    launch.add_common(p)
    args = p.parse_args(rest)
    args.target, args.python = launcher, python or "python3"
    return args


def commands_of(args, rest: list[str], runs) -> list[tuple[str | None, list[list[str]], object]]:
    """Per run: (sbatch script or None, commands, launcher args or None)."""
    out: list[tuple[str | None, list[list[str]], object]] = []
    for name, overrides in runs:
        config, workdir = args.config, f"{args.workdir.rstrip('/')}/{name}"
        if args.launcher == "local":
            python = args.python or sys.executable
            out.append((None, [launch.train_command(config, workdir, overrides, python)], None))
            continue
        largs = _launcher_args(args.launcher, rest, args.python)
        largs.config, largs.workdir, largs.dry_run = config, workdir, args.dry_run
        if args.launcher == "slurm":
            largs.job_name = f"{largs.job_name}-{name}"
            largs.script = f"{largs.job_name}.sbatch"
        script, commands = launch.plan(largs, overrides)
        out.append((script, commands, largs))
    return out


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    if args.launcher == "local" and rest:
        print(f"error: unexpected arguments {rest} for the local launcher", file=sys.stderr)
        return 2
    try:
        planned = commands_of(args, rest, plan_runs(args.config, args.workdir))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = []
    for script, commands, largs in planned:
        if largs is not None:
            rc = launch.execute(largs, script, commands)
        elif args.dry_run:
            print(shlex.join(commands[0]))
            rc = 0
        else:
            print(f"== {shlex.join(commands[0])}", flush=True)
            rc = subprocess.call(commands[0])
        if rc:
            failed.append((commands[0], rc))
    for command, rc in failed:
        print(f"failed ({rc}): {shlex.join(command)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
