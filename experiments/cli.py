"""Command-line parsing for the entry points that take an experiment config (`--config FILE[:arg]`
plus `--config.KEY=VALUE` overrides): a user's mistake ends in one line that names the flag, the
value and what was expected, never in a traceback."""

import importlib.util
import os
import sys

import ml_collections
from absl import flags

from experiments.config_checks import closest_key, get


def _config_spec(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def import_config_file(spec: str):
    """(module, arg) of a config file `FILE[:arg]`; ValueError naming a missing file or function."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"--config {spec}: no config file {path!r}")
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"--config {spec}: {path!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path!r} defines no get_config(arg)")
    return module, (arg or None)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file `FILE[:arg]`."""
    module, arg = import_config_file(spec)
    return module.get_config(arg)


def _explain(argv: list[str]) -> str | None:
    """What is wrong with the config file, its argument or an override key, if anything."""
    spec = _config_spec(argv)
    if spec is None:
        return None
    try:
        config = load_config(spec)
    except ValueError as e:
        return str(e) if str(e).startswith("--config") else f"--config {spec}: {e}"
    for arg in argv[1:]:
        if not arg.startswith("--config.") or "=" not in arg:
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        try:
            get(config, key)
        except (KeyError, AttributeError):
            near = closest_key(config, key)
            hint = f"; did you mean --config.{near}?" if near else ""
            return f"--config.{key}: the config has no key {key!r}{hint}"
    return None


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip("'\"").splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), errors in one line."""
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is None or isinstance(config, ml_collections.ConfigDict):
            return rest
        message = _explain(argv) or "--config: the config file could not be loaded"
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
        message = _explain(argv) or (str(e) if "Traceback" not in str(e) else _last_line(e))
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
