"""Model checkpoints: a directory holding the official `config.json` and the parameters in Orbax.

    DIR/config.json   the official config (architecture, sizes, special token ids)
    DIR/params/       Orbax PyTree checkpoint of the NNX parameter state (stacked layers)

`load` builds the model from such a directory, optionally placed on a device mesh by logical rules.
Parameter trees are nested dicts with string keys (list indices as "0", "1", ...).
"""
import json
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mimo_jax.conversion.family import ModelFamily, family_for

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def is_model_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def flat_params(model_or_state) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    """(path, variable) of every parameter, paths as strings."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state,
                                                                                    nnx.Param)
    return [(tuple(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]


def nest(flat: Iterable[tuple[tuple[str, ...], Any]]) -> dict:
    tree: dict = {}
    for path, value in flat:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def flatten(tree: dict, prefix: tuple[str, ...] = ()):
    """(path, leaf) pairs of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def lookup(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def read_config(path: str | Path) -> tuple[ModelFamily, Any]:
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    family = family_for(hf, str(cfg_path))
    try:
        return family, family.config_from_hf(hf)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def save_params(path: str | Path, tree: dict) -> None:
    """Saves a nested dict of numpy or jax arrays (Orbax writes to a temporary dir, then renames)."""
    ckptr = ocp.PyTreeCheckpointer()
    ckptr.save(Path(path).absolute(), args=ocp.args.PyTreeSave(tree))


def restore_numpy(path: str | Path) -> dict:
    """The saved parameter tree as host numpy arrays, no device involved."""
    path = Path(path).absolute()
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path).item_metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta.tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load(path: str | Path, *, mesh: jax.sharding.Mesh | None = None, rules=None, dtype=None,
         param_dtype=None, **config_overrides):
    """(config, model) from a model checkpoint directory.

    With `mesh`, every parameter is restored straight into its shards (no host copy of the whole
    model) following the logical axis `rules` (default: sharding.rules.DEFAULT_RULES). `dtype` is
    the compute dtype; `param_dtype` casts the stored parameters on restore.
    """
    from sharding.rules import DEFAULT_RULES, named_sharding

    path = Path(path)
    if not is_model_checkpoint(path):
        raise FileNotFoundError(f"{path}: not a model checkpoint (expected {CONFIG_FILE} and "
                                f"{PARAMS_DIR}/); convert an official checkpoint with "
                                f"convert_torch_weights.py first")
    family, config = read_config(path)
    if config_overrides:
        config = config.replace(**config_overrides)
    build_kw = {} if dtype is None else {"dtype": dtype}
    abstract = nnx.eval_shape(lambda: family.build(config, rngs=nnx.Rngs(0), **build_kw))
    graphdef, abs_state = nnx.split(abstract)
    params_path = (path / PARAMS_DIR).absolute()
    ckptr = ocp.PyTreeCheckpointer()
    saved = ckptr.metadata(params_path).item_metadata.tree

    def target(p, var):
        value = var.get_value()
        try:
            stored = lookup(saved, p)
        except (KeyError, TypeError):
            raise ValueError(f"{path}: checkpoint has no parameter {'/'.join(p)}: it holds another "
                             f"architecture than its {CONFIG_FILE} describes") from None
        if tuple(stored.shape) != tuple(value.shape):
            raise ValueError(f"{path}: parameter {'/'.join(p)} has shape {tuple(stored.shape)}, the "
                             f"config implies {tuple(value.shape)}")
        sharding = (named_sharding(mesh, var, rules or DEFAULT_RULES) if mesh is not None
                    else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        dt = param_dtype or stored.dtype
        return ocp.ArrayRestoreArgs(sharding=sharding, dtype=dt, global_shape=tuple(value.shape))

    flat = flat_params(abs_state)
    extra = sorted("/".join(p) for p, _ in flatten(saved) if p not in {q for q, _ in flat})
    if extra:
        raise ValueError(f"{path}: checkpoint holds parameters that its {CONFIG_FILE} does not "
                         f"describe: {', '.join(extra)}")
    args = nest((p, target(p, v)) for p, v in flat)
    restored = ckptr.restore(params_path, args=ocp.args.PyTreeRestore(restore_args=args))
    for p, var in flat:
        var.set_value(lookup(restored, p))
    return config, nnx.merge(graphdef, abs_state)
