"""The LM's LoRA adapters as a PEFT directory, which `peft.PeftModel.from_pretrained` loads onto the
official PyTorch model, and back into the JAX model.

    DIR/adapter_config.json        PEFT's LoraConfig: r, lora_alpha, lora_dropout, target_modules
                                   (the adapted layers' official module names, listed in full),
                                   modules_to_save (the modules of fully trained groups)
    DIR/adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in] and
                                   .lora_B.weight [out, r] per adapted layer, and
                                   base_model.model.<official tensor name> for modules_to_save
                                   (PEFT's saved names)

PEFT's lora_A.weight is our lora_a transposed and its lora_B.weight our lora_b transposed (PyTorch
Linear weights are [out, in]); a stacked layer writes one pair per layer index. A module group
trained in full travels as PEFT's `modules_to_save`, so the directory holds everything a run
trained.
"""

import functools
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mimo_jax import paths
from mimo_jax.conversion import safetensors_io as st
from mimo_jax.conversion.convert import placements
from mimo_jax.conversion.param_store import flat_params
from mimo_jax.conversion.transforms import TRANSFORMS
from mimo_jax.lm.conversion import LMFamily
from mimo_jax.lm.groups import GROUP_OF_MODULE
from mimo_jax.lm.lora import (
    LinearLayer,
    LoraConfig,
    adapted,
    apply_lora,
    linear_layers,
    module_at,
    select,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(re.escape(PREFIX) + r"(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
# PEFT options whose meaning this loader does not reproduce: refused rather than half-applied.
_UNSUPPORTED = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
}


def modules_of(model: nnx.Module, groups) -> list[str]:
    """The official names of the modules of these groups, as PEFT's modules_to_save names them
    (a ModuleList by its items: PEFT does not wrap a list)."""
    out = []
    for name, group in GROUP_OF_MODULE.items():
        node = getattr(model, name, None)
        if group in groups and node is not None:
            out += (
                [f"{name}.{i}" for i in range(len(node))] if isinstance(node, nnx.List) else [name]
            )
    return out


def peft_config(model: nnx.Module, base_model: str | None = None, full_groups=()) -> dict:
    """adapter_config.json of the model's adapters (all share one rank, alpha and dropout)."""
    layers = adapted(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to export")
    settings = {(m.rank, m.alpha, m.dropout) for _, m in layers}
    if len(settings) > 1:
        raise ValueError(
            f"adapters with different (rank, alpha, dropout) {sorted(settings)}: a "
            f"PEFT directory holds one setting"
        )
    ((rank, alpha, dropout),) = settings
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(n for layer, _ in layers for n in layer.names()),
        "modules_to_save": modules_of(model, full_groups) or None,
        "inference_mode": True,
        "init_lora_weights": True,
        **_UNSUPPORTED,
    }


def _host(x: jax.Array, dtype=np.float32) -> np.ndarray:
    """A host copy (gathered from every process when the array spans several)."""
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x, dtype)


def peft_tensors(model: nnx.Module, full_groups=()) -> dict[str, np.ndarray]:
    """{PEFT tensor name: array} of every adapter (float32) and of the parameters of
    `full_groups` (their dtype). Collective across processes."""
    out = {}
    for layer, module in adapted(model):
        a, b = _host(module.lora.lora_a[...]), _host(module.lora.lora_b[...])
        for i, name in enumerate(layer.names()):
            ai, bi = (a[i], b[i]) if layer.layers else (a, b)
            out[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)
            out[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)
    family = LMFamily()
    for path, var in flat_params(model):
        if GROUP_OF_MODULE[path[0]] not in full_groups:
            continue
        rule, value = family.rule(path), _host(var[...], var[...].dtype)
        to_torch = TRANSFORMS[rule.transform].to_torch
        if not rule.stacked:
            out[PREFIX + rule.torch_name] = np.ascontiguousarray(to_torch(value))
            continue
        for i in range(value.shape[0]):
            out[PREFIX + rule.torch_name.format(i=i)] = np.ascontiguousarray(to_torch(value[i]))
    return out


def save(model: nnx.Module, path: str | os.PathLike, base_model: str | None = None, full_groups=()):
    """Writes the model's adapters, and the modules of the groups trained in full, as a PEFT
    directory (staged, then committed whole). Every process calls it; process 0 writes."""
    config = peft_config(model, base_model, full_groups)
    tensors = peft_tensors(model, full_groups)
    out = paths.resolve(path)
    if jax.process_index() != 0:
        return out
    paths.remove_stale_staging(out)
    tmp = paths.staging_dir(out)
    try:
        pending = [
            st.PendingTensor(k, v.dtype, v.shape, functools.partial(np.asarray, v))
            for k, v in sorted(tensors.items())
        ]
        st.write_file(tmp / WEIGHTS_FILE, pending)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        paths.commit_dir(tmp, out, marker=CONFIG_FILE)
    except BaseException:
        if tmp.exists():
            tmp.rmtree()
        raise
    return out


def _read_config(root) -> dict:
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{root}: no {CONFIG_FILE}; expected a PEFT LoRA adapter directory")
    config = paths.read_json(cfg_path)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {config.get('peft_type')!r}, expected 'LORA'")
    for key, plain in _UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, None, [], {}):
            raise ValueError(
                f"{cfg_path}: {key}={config[key]!r} is not supported; expected {plain!r}"
            )
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{cfg_path}: r={rank!r}; expected an integer >= 1")
    number = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not (number and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{cfg_path}: lora_alpha={alpha!r}; expected a finite number > 0")
    return config


def _read_weights(root) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """({module: {"A": lora_A [r, in], "B": lora_B [out, r]}}, {official tensor name: array of a
    module to save}) of the weights file."""
    if not (root / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{root}: no {WEIGHTS_FILE}; expected a PEFT LoRA adapter directory"
        )
    lora: dict[str, dict[str, np.ndarray]] = {}
    saved = {}
    for name, info in sorted(st.read_file(root / WEIGHTS_FILE).items()):
        m = _KEY.fullmatch(name)
        if m is not None:
            lora.setdefault(m["module"], {})[m["ab"]] = st.read_tensor(info)
        elif name.startswith(PREFIX):
            saved[name.removeprefix(PREFIX)] = st.read_tensor(info)
        else:
            raise ValueError(
                f"{root / WEIGHTS_FILE}: tensor {name} is not a PEFT name ({PREFIX}...)"
            )
    return lora, saved


def _lora_problems(layers: dict[str, LinearLayer], weights, rank: int) -> list[str]:
    problems = []
    for name, ab in sorted(weights.items()):
        layer = layers.get(name)
        if layer is None:
            problems.append(f"{name} is not a linear layer of this model")
            continue
        want = {"A": (rank, layer.features[0]), "B": (layer.features[1], rank)}
        for which in "AB":
            got = ab.get(which)
            if got is None:
                problems.append(f"{name} has no lora_{which}.weight")
            elif tuple(got.shape) != want[which]:
                problems.append(
                    f"{name}.lora_{which}.weight has shape {list(got.shape)}; this "
                    f"model's layer [in {layer.features[0]}, out {layer.features[1]}] "
                    f"takes {list(want[which])}"
                )
    return problems


def _saved_params(
    model: nnx.Module, saved: dict[str, np.ndarray], modules: list[str]
) -> tuple[dict[tuple[str, ...], np.ndarray], list[str]]:
    """The parameters the modules_to_save tensors make up, and the problems: a tensor outside the
    listed modules or of no parameter of this model, a wrong shape, a stack with missing layers."""
    if not saved:
        return {}, []
    base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    needed = {p.torch_name: p for p in placements(LMFamily(), base)[0]}
    problems: list[str] = []
    parts: dict[tuple[str, ...], dict[int | None, np.ndarray]] = {}
    for name, value in saved.items():
        p = needed.get(name)
        if not any(name.startswith(m + ".") for m in modules):
            problems.append(f"{name} belongs to none of modules_to_save {modules}")
        elif p is None:
            problems.append(f"{name} is not a parameter of this model")
        elif tuple(value.shape) != p.torch_shape:
            problems.append(
                f"{name} has shape {list(value.shape)}; this model's takes {list(p.torch_shape)}"
            )
        else:
            parts.setdefault(p.param_path, {})[p.layer] = TRANSFORMS[p.transform].to_nnx(value)
    params: dict[tuple[str, ...], np.ndarray] = {}
    for path, layers in parts.items():
        if None in layers:
            params[path] = layers[None]
            continue
        count = module_at(model, path).shape[0]
        missing = sorted(set(range(count)) - set(layers))
        if missing:
            problems.append(f"{'.'.join(path)}: modules_to_save lacks layers {missing}")
        else:
            params[path] = np.stack([layers[i] for i in range(count)])
    return params, problems


def load(model: nnx.Module, path: str | os.PathLike) -> list[LinearLayer]:
    """Adds the adapters of a PEFT directory to the model, and sets the modules it saved in full
    (in place; for inference or further training); returns the adapted layers. A stacked layer
    whose directory names only some of its layer indices gets zero adapters on the others (what
    PEFT computes there). The directory's lora_dropout is kept (for further training) unless a
    layer outside the transformer stacks is adapted, where adapters run without dropout. An
    adapter made for another base is refused with every misshapen tensor named, and the model is
    left as it was."""
    root = paths.resolve(path)
    config = _read_config(root)
    rank = int(config["r"])
    layers = {n: layer for layer in linear_layers(model) for n in layer.names()}
    weights, saved = _read_weights(root)
    if not weights:
        raise ValueError(f"{root / WEIGHTS_FILE}: no LoRA weights ({PREFIX}<module>.lora_A.weight)")
    params, problems = _saved_params(model, saved, list(config.get("modules_to_save") or []))
    problems = _lora_problems(layers, weights, rank) + problems
    if problems:
        raise ValueError(
            f"{root} holds adapters for another base model than this one "
            f"({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
    chosen = {layers[n].name: layers[n] for n in weights}
    targets = tuple(re.escape(t).replace(re.escape("{i}"), r"\d+") for t in sorted(chosen))
    # Adapter dropout runs inside the transformer stacks only (lora.select).
    stacks_only = all(layer.layers for layer in chosen.values())
    dropout = float(config.get("lora_dropout") or 0.0) if stacks_only else 0.0
    cfg = LoraConfig(rank, float(config["lora_alpha"]), dropout, targets)
    problems = select(linear_layers(model), cfg)[1]
    if problems:  # e.g. a layer that already has an adapter
        raise ValueError(f"{root}: " + "; ".join(problems))
    for param_path, value in params.items():
        var = module_at(model, param_path)
        var.set_value(jnp.asarray(value, var.dtype))
    out = apply_lora(model, cfg, rngs=nnx.Rngs(0))
    for layer in out:
        module = module_at(model, layer.path)
        for var, which in ((module.lora.lora_a, "A"), (module.lora.lora_b, "B")):
            value = np.zeros(var.shape, np.float32)
            for i, name in enumerate(layer.names()):
                if name not in weights:
                    continue
                tensor = np.asarray(weights[name][which], np.float32).T
                if layer.layers:
                    value[i] = tensor
                else:
                    value[...] = tensor
            var.set_value(jnp.asarray(value, var.dtype))
    return out
