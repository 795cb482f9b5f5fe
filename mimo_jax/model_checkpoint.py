"""Model checkpoints of any model family mimo-jax knows, found by the official config.json's
architecture: the registry of families, and reading, loading and converting a checkpoint without
naming its family. It stands above the families (`lm`, `tokenizer`), which use the conversion engine
(`mimo_jax.conversion`) with their own family and never this registry."""

import os
from typing import Any

from etils import epath

from mimo_jax import paths
from mimo_jax.conversion import convert as engine
from mimo_jax.conversion import param_store
from mimo_jax.conversion.family import ModelFamily

# The format's functions that need no family, beside `load`, for users of model checkpoints.
from mimo_jax.conversion.param_store import flat_params, is_model_checkpoint, save
from mimo_jax.lm.conversion import LMFamily
from mimo_jax.tokenizer.conversion import TokenizerFamily

__all__ = [
    "FAMILIES",
    "convert",
    "family_for",
    "family_of",
    "flat_params",
    "is_model_checkpoint",
    "load",
    "read_config",
    "save",
]

FAMILIES: dict[str, type] = {f.architecture: f for f in (LMFamily, TokenizerFamily)}
PathLike = str | os.PathLike


def family_for(hf_config: dict, where: str) -> ModelFamily:
    """The family of an official config.json, or an error naming what was found."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]()
    raise ValueError(
        f"{where}: architectures {archs} is not a model mimo-jax can convert "
        f"(expected one of: {', '.join(sorted(FAMILIES))})"
    )


def family_of(path: PathLike) -> ModelFamily:
    """The family of the checkpoint directory at `path` (official or converted)."""
    cfg_path = paths.resolve(path) / param_store.CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no {param_store.CONFIG_FILE}")
    return family_for(paths.read_json(cfg_path), str(cfg_path))


def read_config(path: PathLike) -> tuple[ModelFamily, Any]:
    family = family_of(path)
    return family, param_store.read_config(path, family)


def load(path: PathLike, **kwargs):
    """(config, model) from a model checkpoint of any family; the keywords are
    `conversion.param_store.load`'s (mesh, rules, dtype, param_dtype, config overrides)."""
    root = param_store.require_model_checkpoint(path)
    return param_store.load(root, family_of(root), **kwargs)


def convert(
    src: PathLike,
    dst: PathLike,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> epath.Path:
    """`conversion.convert.convert` with the family found by SRC's config.json."""
    return engine.convert(src, dst, family_of, dtype, overwrite, progress)
