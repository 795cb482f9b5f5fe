"""Checks an experiment config before anything is built: every value a user can get wrong is named
with the value and what was expected, one line each, all at once.

0 means "off" only where it is documented so (experiments/configs/common.py): `log_every`,
`checkpoint_every` (only the last step is logged / saved), `eval_every` (no periodic evaluation)
and `optimizer.clip_norm` (no clipping).
"""

import difflib
import re
from collections.abc import Callable

import ml_collections
from etils import epath
from flax import nnx

from data_pipelines.pipeline import parse_sources
from data_pipelines.shards import MANIFEST, ShardSet
from mimo_jax import model_checkpoint as checkpoint
from mimo_jax.lm.groups import GROUPS, group_of
from mimo_jax.lm.lora import MODES, linear_layers, select
from mimo_jax.lm.model import MiMoAudioLM
from mimo_jax.nn.attention import IMPLEMENTATIONS
from mimo_jax.nn.dtypes import DTYPES
from mimo_jax.nn.quantized import QTYPES
from mimo_jax.nn.remat import policy as remat_policy
from mimo_jax.tasks.text_tokenizer import TextTokenizer, model_id_problems
from mimo_jax.train.build import groups_in_mode, lm_architecture, lora_config
from mimo_jax.train.losses import LossConfig
from mimo_jax.train.optimizer import SCHEDULES
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
    "model.attention": _one_of(IMPLEMENTATIONS),
    "data.batch_size": _int_at_least(1),
    "data.context_length": _int_at_least(1),
    "data.empty_text_weight": _non_negative,
    "data.workers": _int_at_least(0),
    "loss.text_chunk": _int_at_least(1),
    "loss.patch_chunk": _int_at_least(1),
    "loss.patch_fraction": lambda v: None if 0 < v <= 1 else "a number in (0, 1]",
    "optimizer.schedule": _one_of(SCHEDULES),
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
    "lora.rank": _int_at_least(0),
    "lora.alpha": _positive,
    "lora.dropout": _in_range(0, 1, high_open=True),
    "lora.quantize": lambda v: (
        None
        if v in ("", *QTYPES)
        else f"'' (a base in its own dtype) or one of {', '.join(QTYPES)}"
    ),
    "lora.quantize_tile": _int_at_least(1),
    "eval_generation.max_new_groups": _int_at_least(1),
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
            out.append(
                _problem(
                    f"optimizer.learning_rates.{group}",
                    lr,
                    f"a module group: one of {', '.join(GROUPS)}",
                )
            )
        elif _non_negative(lr):
            out.append(_problem(f"optimizer.learning_rates.{group}", lr, "a number >= 0"))
    for group in config.optimizer.frozen:
        if group not in GROUPS:
            out.append(
                _problem(
                    "optimizer.frozen",
                    tuple(config.optimizer.frozen),
                    f"module groups among {', '.join(GROUPS)}",
                )
            )
    return out


def _lora_problems(config) -> list[str]:
    """The adapters' modes and target patterns (checked while `lora.rank` > 0)."""
    lora = config.lora
    out: list[str] = []
    if not (isinstance(lora.rank, int) and lora.rank > 0):
        return out
    for group in lora.modes:
        if group not in GROUPS:
            out.append(
                _problem(
                    f"lora.modes.{group}",
                    lora.modes[group],
                    f"a module group: one of {', '.join(GROUPS)}",
                )
            )
    for group in GROUPS:
        mode = lora.modes.get(group)
        if mode not in MODES:
            out.append(_problem(f"lora.modes.{group}", mode, f"one of {', '.join(MODES)}"))
        elif mode != "frozen" and group in config.optimizer.frozen:
            out.append(
                _problem(f"lora.modes.{group}", mode, f"'frozen' (optimizer.frozen lists {group})")
            )
    if "lora" not in [lora.modes.get(g) for g in GROUPS]:
        out.append(
            _problem(
                "lora.modes",
                lora.modes.to_dict(),
                "at least one group in 'lora' mode while lora.rank > 0",
            )
        )
    targets = lora.targets
    if not (
        isinstance(targets, (tuple, list))
        and targets
        and all(isinstance(t, str) and t for t in targets)
    ):
        out.append(
            _problem("lora.targets", targets, "a tuple of regular expressions over module names")
        )
        return out
    for pattern in targets:
        try:
            re.compile(pattern)
        except re.error as e:
            out.append(_problem("lora.targets", pattern, f"a regular expression ({e})"))
    return out


def _target_problems(config, lm) -> list[str]:
    """What the targets choose in the model's layers: patterns matching nothing, part of a stack,
    a layer narrower than the rank, a layer outside the LoRA groups, a quantisation tile that does
    not divide a chosen layer's inputs."""
    keys = ("lora.rank", "lora.alpha", "lora.dropout", "lora.quantize", "lora.quantize_tile")
    if any(CHECKS[k](get(config, k)) for k in keys) or not config.lora.rank:
        return []  # off, or named by _value_problems
    if _lora_problems(config):
        return []  # named by _lora_problems
    model = nnx.eval_shape(lambda: MiMoAudioLM(lm, rngs=nnx.Rngs(0)))
    cfg = lora_config(config)
    assert cfg is not None
    layers = linear_layers(model)
    problems = select(layers, cfg, groups_in_mode(config, "lora"))[1]
    if config.lora.quantize:
        untrained = groups_in_mode(config, "lora") + groups_in_mode(config, "frozen")
        tile = config.lora.quantize_tile
        problems += [
            _problem(
                "lora.quantize_tile",
                tile,
                f"a divisor of the {layer.features[0]} inputs of {layer.shown()}",
            )
            for layer in layers
            if group_of(layer.path) in untrained and layer.features[0] % tile
        ]
    return problems


def _model_problems(config) -> list[str]:
    """What the LM a run trains implies (its config.json or `model.hf`): one loss weight per
    codebook, the text tokenizer's special ids, shards of the audio tokenizer it models."""
    key = "model.init_checkpoint" if config.model.init_checkpoint else "model.hf"
    if config.model.init_checkpoint and not checkpoint.is_model_checkpoint(
        config.model.init_checkpoint
    ):
        return []  # named by _path_problems
    try:
        lm = lm_architecture(config)
    except (ValueError, TypeError, KeyError) as e:
        return [f"{key}: expected a MiMo-Audio LM architecture ({e})"]
    return (
        _loss_problems(config, lm)
        + _tokenizer_problems(config, lm)
        + _shard_problems(config, lm)
        + _target_problems(config, lm)
    )


def _loss_problems(config, lm) -> list[str]:
    want = (
        f"{lm.audio_channels + 1} numbers >= 0 joined by '-' (text, then one per codebook "
        f"of the model's {lm.audio_channels})"
    )
    try:
        LossConfig.from_string(config.loss.weights).check_channels(lm.audio_channels)
    except ValueError:
        return [_problem("loss.weights", config.loss.weights, want)]
    return []


def _tokenizer_problems(config, lm) -> list[str]:
    if not (config.data.tokenizer and epath.Path(config.data.tokenizer).is_file()):
        return []  # named by _path_problems
    try:
        problems = model_id_problems(lm, TextTokenizer.from_file(config.data.tokenizer))
    except KeyError as e:  # a special token missing from the tokenizer
        problems = [str(e.args[0])]
    except Exception as e:  # noqa: BLE001  (what the tokenizers library says of the file)
        return [
            _problem(
                "data.tokenizer",
                config.data.tokenizer,
                f"a tokenizer.json the tokenizers library reads ({e})",
            )
        ]
    return [
        _problem(
            "data.tokenizer",
            config.data.tokenizer,
            f"the text tokenizer of the model's special ids: {p}",
        )
        for p in problems
    ]


def _shard_problems(config, lm) -> list[str]:
    out = []
    checked: set[str] = set()  # directories whose shards were opened
    for key in ("data.sources", "data.eval_sources"):
        try:
            dirs = dict.fromkeys(s.path for s in parse_sources(get(config, key)))
        except ValueError:
            continue  # named by _path_problems
        for path in dirs:
            manifest = epath.Path(path) / MANIFEST
            if not manifest.is_file():
                continue
            try:
                shards = ShardSet(path)
                facts = shards.manifest
                facts["codebooks"], facts["codebook_sizes"]
            except (ValueError, KeyError, TypeError):
                out.append(
                    _problem(
                        key,
                        path,
                        f"a {MANIFEST} written by data_pipelines.tokenize "
                        f"(with codebooks, codebook_sizes and shards)",
                    )
                )
                continue
            if facts["codebooks"] < lm.audio_channels:
                out.append(
                    _problem(
                        key,
                        path,
                        f"shards of at least the model's "
                        f"{lm.audio_channels} codebooks; they have "
                        f"{facts['codebooks']}",
                    )
                )
            sizes = tuple(facts["codebook_sizes"][: lm.audio_channels])
            if sizes != tuple(lm.speech_empty_ids[: len(sizes)]):
                out.append(
                    _problem(
                        key,
                        path,
                        f"codes of the model's audio tokenizer (codebook "
                        f"sizes {tuple(lm.speech_empty_ids)}, the model's "
                        f"empty ids); they have codebook sizes {sizes}",
                    )
                )
            if path not in checked:  # a directory named by both keys: its shards once
                checked.add(path)
                out += [
                    _problem(key, path, f"the shards its {MANIFEST} lists; {p}")
                    for p in shards.problems()
                ]
    return out


def _path_problems(config) -> list[str]:
    out = []
    if not config.data.tokenizer:
        out.append(
            _problem("data.tokenizer", "", "the path of the text tokenizer's tokenizer.json")
        )
    elif not epath.Path(config.data.tokenizer).is_file():
        out.append(_problem("data.tokenizer", config.data.tokenizer, "an existing tokenizer.json"))
    if config.model.init_checkpoint and not epath.Path(config.model.init_checkpoint).is_dir():
        out.append(
            _problem(
                "model.init_checkpoint",
                config.model.init_checkpoint,
                "an existing model checkpoint directory (convert_torch_weights.py)",
            )
        )
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
                out.append(
                    _problem(key, text, f"shard directories with a manifest.json; {path} has none")
                )
        for s in sources:
            if s.weight <= 0:
                out.append(_problem(key, text, f"weights > 0; {s.path}:{s.task} has {s.weight}"))
    return out


def generation_eval_on(config) -> bool:
    g = config.eval_generation
    return bool(g.tts_texts or g.asr_manifest or g.continuation_audio)


def _generation_problems(config) -> list[str]:
    """The eval prompts: texts, existing files, an audio tokenizer, and a cadence to run at."""
    g, out = config.eval_generation, []
    for key in ("eval_generation.tts_texts", "eval_generation.continuation_audio"):
        value = get(config, key)
        if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, str) and v.strip() for v in value
        ):
            out.append(_problem(key, value, "a tuple of non-empty texts"))
    if not generation_eval_on(config) or out:
        return out
    if config.eval_every == 0:
        out.append(_problem("eval_every", 0, "an integer >= 1 (eval_generation has prompts)"))
    if not (epath.Path(g.audio_tokenizer or "/nonexistent") / "config.json").is_file():
        out.append(
            _problem(
                "eval_generation.audio_tokenizer",
                g.audio_tokenizer,
                "an audio tokenizer checkpoint directory (with config.json)",
            )
        )
    if g.asr_manifest and not epath.Path(g.asr_manifest).is_file():
        out.append(
            _problem(
                "eval_generation.asr_manifest",
                g.asr_manifest,
                "an existing JSONL manifest of audio and transcripts",
            )
        )
    for path in g.continuation_audio:
        if not epath.Path(path).is_file():
            out.append(
                _problem(
                    "eval_generation.continuation_audio",
                    tuple(g.continuation_audio),
                    f"existing audio files; {path} is not one",
                )
            )
    return out


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming every problem of the config (one line each)."""
    problems = (
        _value_problems(config)
        + _lora_problems(config)
        + _path_problems(config)
        + _model_problems(config)
        + _generation_problems(config)
    )
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
