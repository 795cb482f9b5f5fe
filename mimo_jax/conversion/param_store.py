"""The model checkpoint format: a directory holding the official `config.json` and the parameters in
Orbax. Reading one takes its model family (`mimo_jax.model_checkpoint` finds the family of any
checkpoint by its config.json).

    DIR/config.json          the official config (architecture, sizes, special token ids)
    DIR/params/<path>/       one Orbax checkpoint per NNX parameter (stacked layers included),
                             <path> its state path joined by dots, e.g.
                             model.layers.mlp.up_proj.kernel

One checkpoint per parameter lets the converter write and read a model one parameter at a time
(memory: the largest parameter, not the model), and lets `load` restore each parameter straight into
its shards on a device mesh.

Every path goes through `mimo_jax.paths` (etils.epath): a model checkpoint may be local or on gs://.
`config.json` is written last, so a directory holding it is complete (see `save`).
"""

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mimo_jax import paths
from mimo_jax.conversion.family import ModelFamily
from mimo_jax.nn.partitioning import named_sharding
from mimo_jax.nn.quantized import QuantizedKernel

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


PathLike = str | os.PathLike


def is_model_checkpoint(path: PathLike) -> bool:
    root = paths.resolve(path)
    return (root / CONFIG_FILE).is_file() and (root / PARAMS_DIR).is_dir()


def require_model_checkpoint(path: PathLike) -> epath.Path:
    root = paths.resolve(path)
    if not is_model_checkpoint(root):
        raise FileNotFoundError(
            f"{root}: not a model checkpoint (expected {CONFIG_FILE} and "
            f"{PARAMS_DIR}/); convert an official checkpoint with "
            f"convert_torch_weights.py first"
        )
    return root


def flat_params(model_or_state) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    """(path, variable) of every parameter, paths as strings."""
    state = (
        model_or_state
        if isinstance(model_or_state, nnx.State)
        else nnx.state(model_or_state, nnx.Param)
    )
    return [(tuple(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]


def read_config(path: PathLike, family: ModelFamily) -> Any:
    """The config of a checkpoint of `family`, read from its config.json; an error names the
    file and what it holds when it is another model."""
    cfg_path = paths.resolve(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}")
    hf = paths.read_json(cfg_path)
    archs = hf.get("architectures") or []
    if family.architecture not in archs:
        raise ValueError(
            f"{cfg_path}: architectures {archs} is not a {family.name} "
            f"(expected {family.architecture})"
        )
    try:
        return family.config_from_hf(hf)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _leaf_dir(params_dir: PathLike, path: tuple[str, ...]) -> epath.Path:
    return paths.resolve(params_dir) / ".".join(path)


def save_param(params_dir: PathLike, path: tuple[str, ...], value) -> None:
    """Saves one parameter (Orbax finalizes it whole: a rename locally, a marker on gs://)."""
    _checkpointer().save(_leaf_dir(params_dir, path), args=ocp.args.PyTreeSave({"value": value}))


def param_metadata(params_dir: PathLike) -> dict[tuple[str, ...], Any]:
    """{path: metadata (shape, dtype)} of every saved parameter, read without loading data."""
    out = {}
    ckptr = _checkpointer()
    for leaf in sorted(paths.resolve(params_dir).iterdir()):
        if leaf.is_dir() and not leaf.name.startswith("."):
            out[tuple(leaf.name.split("."))] = ckptr.metadata(leaf).item_metadata.tree["value"]
    return out


def restore_param(params_dir: PathLike, path: tuple[str, ...], sharding=None, dtype=None):
    """One parameter: a host numpy array, or with `sharding` a jax.Array placed in its shards."""
    if sharding is None:
        args = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
    else:
        args = ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype)
    out = _checkpointer().restore(
        _leaf_dir(params_dir, path), args=ocp.args.PyTreeRestore(restore_args={"value": args})
    )
    return out["value"]


def save(model: nnx.Module, hf_config: dict, path: PathLike) -> epath.Path:
    """Writes a model checkpoint (the official config.json and one Orbax checkpoint per parameter),
    e.g. the weights a training run ends with; convert_torch_weights.py turns it into an official
    directory. Staged in `.NAME.partial` next to it and committed whole (`paths.commit_dir`: a
    rename locally; on gs:// a copy with config.json last, so an interrupted commit leaves no
    config.json and no directory that passes for a model checkpoint). A model whose base kernels
    are held quantised (QLoRA) is refused: its weights exist only once the adapters are merged."""
    quantised = nnx.to_flat_state(nnx.state(model, QuantizedKernel))
    held = sorted({".".join(map(str, p[:-1])) for p, _ in quantised})
    if held:
        raise ValueError(
            f"the model holds {len(held)} quantised base kernels ({held[0]}, ...): a model "
            f"checkpoint holds fully trained weights, expected the adapters merged first "
            f"(mimo_jax.lm.lora.merge_lora)"
        )
    out = paths.resolve(path)
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        tmp.rmtree()
    tmp.mkdir(parents=True)
    for p, var in flat_params(model):
        save_param(tmp / PARAMS_DIR, p, var.get_value())
    if jax.process_index() == 0:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        paths.commit_dir(tmp, out, marker=CONFIG_FILE)
    return out


def check_params(path: PathLike, shapes: dict[tuple[str, ...], tuple[int, ...]]) -> dict:
    """The metadata of a checkpoint's saved parameters, after checking that they are exactly the
    parameters of `shapes` (those its config implies); one error names every missing, extra or
    misshapen parameter."""
    saved = param_metadata(paths.resolve(path) / PARAMS_DIR)
    problems = [f"parameter {'.'.join(p)} is missing" for p in shapes if p not in saved]
    problems += [
        f"parameter {'.'.join(p)} has shape {tuple(saved[p].shape)}, the config implies {shape}"
        for p, shape in shapes.items()
        if p in saved and tuple(saved[p].shape) != shape
    ]
    problems += [
        f"parameter {'.'.join(p)} is not described by its {CONFIG_FILE}"
        for p in saved
        if p not in shapes
    ]
    if problems:
        raise ValueError(
            f"{path} holds another architecture than its {CONFIG_FILE} describes:\n  "
            + "\n  ".join(problems)
        )
    return saved


def load(
    path: PathLike,
    family: ModelFamily,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    dtype=None,
    param_dtype=None,
    **config_overrides,
):
    """(config, model) from a model checkpoint directory of `family`.

    With `mesh`, every parameter is restored straight into its shards (no host copy of the whole
    model) following the logical axis `rules` (a preset of `sharding.rules`). `dtype` is
    the compute dtype; `param_dtype` casts the stored parameters on restore.
    """
    if mesh is not None and rules is None:
        raise ValueError(
            "checkpoint.load: a mesh needs logical axis rules (e.g. "
            "sharding.rules.PRESETS['fsdp_tensor'])"
        )
    root = require_model_checkpoint(path)
    config = read_config(root, family)
    if config_overrides:
        config = config.replace(**config_overrides)
    build_kw = {} if dtype is None else {"dtype": dtype}
    abstract = nnx.eval_shape(lambda: family.build(config, rngs=nnx.Rngs(0), **build_kw))
    graphdef, abs_state = nnx.split(abstract)
    params_dir = root / PARAMS_DIR
    flat = flat_params(abs_state)
    check_params(root, {p: tuple(v.get_value().shape) for p, v in flat})
    for p, var in flat:
        sharding = (
            named_sharding(mesh, var, rules)
            if mesh is not None
            else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
        var.set_value(restore_param(params_dir, p, sharding, param_dtype))
    return config, nnx.merge(graphdef, abs_state)
