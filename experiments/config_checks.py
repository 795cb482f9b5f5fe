"""Checks an experiment config before anything is built: every value a user can get wrong is named
with the value and what was expected, one line each, all at once.

0 means "off" only where it is documented so (experiments/configs/common.py): `log_every`,
`checkpoint_every` (only the last step is logged / saved), `eval_every` (no periodic evaluation)
and `optimizer.clip_norm` (no clipping).
"""
import difflib
from collections.abc import Callable

import ml_collections
from etils import epath

from data_pipelines.pipeline import parse_sources
from mimo_jax.lm.config import parse_dashed
from mimo_jax.nn.dtypes import DTYPES
from mimo_jax.nn.remat import policy as remat_policy
from mimo_jax.train.optimizer import GROUPS
from sharding.rules import PRESETS


class ConfigError(ValueError):
    """One line per problem: `key=value: expected ...`."""


def _int_at_least(low: int) -> Callable:
    return lambda v: None if isinstance(v, int) and v >= low else f"an integer >= {low}"


def _in_range(low: float, high: float, high_open: bool = False) -> Callable:
    def check(v):
        ok = isinstance(v, (int, float)) and low <= v and (v < high if high_open else v <= high)
        return None if ok else f"a number in [{low}, {high}{')' if high_open else ']'}"
    return check


def _one_of(options) -> Callable:
    return lambda v: None if v in options else f"one of {', '.join(map(str, options))}"


def _non_negative(v) -> str | None:
    return None if isinstance(v, (int, float)) and v >= 0 else "a number >= 0"


def _positive(v) -> str | None:
    return None if isinstance(v, (int, float)) and v > 0 else "a number > 0"


def _remat(v) -> str | None:
    try:
        remat_policy(v)
    except ValueError as e:
        return str(e).split("; expected ")[-1]
    return None


CHECKS: dict[str, Callable] = {
    "total_steps": _int_at_least(1),
    "log_every": _int_at_least(0),
    "checkpoint_every": _int_at_least(0),
    "eval_every": _int_at_least(0),
    "eval_steps": _int_at_least(1),
    "peak_tflops_per_device": _non_negative,
    "model.dtype": _one_of(tuple(DTYPES)),
    "model.param_dtype": _one_of(tuple(DTYPES)),
    "model.remat_policy": _remat,
    "data.batch_size": _int_at_least(1),
    "data.context_length": _int_at_least(1),
    "data.empty_text_weight": _non_negative,
    "data.workers": _int_at_least(0),
    "loss.text_chunk": _int_at_least(1),
    "loss.patch_chunk": _int_at_least(1),
    "loss.patch_fraction": lambda v: None if 0 < v <= 1 else "a number in (0, 1]",
    "optimizer.schedule": _one_of(("cosine", "constant")),
    "optimizer.warmup_ratio": _in_range(0, 1),
    "optimizer.end_lr_ratio": _in_range(0, 1),
    "optimizer.weight_decay": _non_negative,
    "optimizer.b1": _in_range(0, 1, high_open=True),
    "optimizer.b2": _in_range(0, 1, high_open=True),
    "optimizer.eps": _positive,
    "optimizer.clip_norm": _non_negative,
    "optimizer.grad_accum": _int_at_least(1),
    "mesh.rules": _one_of(sorted(PRESETS)),
    "checkpoint.keep": _int_at_least(2),
}


def get(config: ml_collections.ConfigDict, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def set_value(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets a dotted key (`optimizer.learning_rates.llm`)."""
    *parents, leaf = key.split(".")
    node = get(config, ".".join(parents)) if parents else config
    node[leaf] = value


def closest_key(config: ml_collections.ConfigDict, key: str) -> str | None:
    """The config key nearest to a mistyped one (`data.sorces` -> `data.sources`)."""
    keys = list(flat_keys(config))
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    return match[0] if match else None


def flat_keys(config: ml_collections.ConfigDict, prefix: str = ""):
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            yield from flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _problem(key: str, value, expected: str) -> str:
    return f"{key}={value!r}: expected {expected}"


def _value_problems(config) -> list[str]:
    out = []
    for key, check in CHECKS.items():
        value = get(config, key)
        expected = check(value)
        if expected:
            out.append(_problem(key, value, expected))
    for group, lr in config.optimizer.learning_rates.items():
        if group not in GROUPS:
            out.append(_problem(f"optimizer.learning_rates.{group}", lr,
                                f"a module group: one of {', '.join(GROUPS)}"))
        elif _non_negative(lr):
            out.append(_problem(f"optimizer.learning_rates.{group}", lr, "a number >= 0"))
    for group in config.optimizer.frozen:
        if group not in GROUPS:
            out.append(_problem("optimizer.frozen", tuple(config.optimizer.frozen),
                                f"module groups among {', '.join(GROUPS)}"))
    return out


def _layout_problems(config) -> list[str]:
    channels = config.data.audio_channels
    out = []
    for key in ("data.loss_weights", "data.delay_pattern", "data.speech_zeroemb_idx"):
        value = get(config, key)
        want = channels + 1 if key == "data.loss_weights" else channels
        try:
            values = parse_dashed(value, float)
        except ValueError:
            out.append(_problem(key, value, f"{want} numbers joined by '-'"))
            continue
        if len(values) != want or min(values) < 0:
            out.append(_problem(key, value, f"{want} numbers >= 0 joined by '-' "
                                            f"(data.audio_channels={channels})"))
    return out


def _path_problems(config) -> list[str]:
    out = []
    if not config.data.tokenizer:
        out.append(_problem("data.tokenizer", "", "the path of the text tokenizer's tokenizer.json"))
    elif not epath.Path(config.data.tokenizer).is_file():
        out.append(_problem("data.tokenizer", config.data.tokenizer, "an existing tokenizer.json"))
    if config.model.init_checkpoint and not epath.Path(config.model.init_checkpoint).is_dir():
        out.append(_problem("model.init_checkpoint", config.model.init_checkpoint,
                            "an existing model checkpoint directory (convert_torch_weights.py)"))
    for key in ("data.sources", "data.eval_sources"):
        text = get(config, key)
        if key == "data.eval_sources" and not (text and config.eval_every):
            continue
        try:
            sources = parse_sources(text)
        except ValueError as e:
            out.append(_problem(key, text, str(e).split(": expected ", 1)[-1]))
            continue
        if not sources:
            out.append(_problem(key, text, "one or more shard sources DIR:TASK[:WEIGHT],..."))
        for path in dict.fromkeys(s.path for s in sources):
            if not (epath.Path(path) / "manifest.json").is_file():
                out.append(_problem(key, text, f"shard directories with a manifest.json; "
                                               f"{path} has none"))
        for s in sources:
            if s.weight <= 0:
                out.append(_problem(key, text, f"weights > 0; {s.path}:{s.task} has {s.weight}"))
    return out


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming every problem of the config (one line each)."""
    problems = _value_problems(config) + _layout_problems(config) + _path_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
