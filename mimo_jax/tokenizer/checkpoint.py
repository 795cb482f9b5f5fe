"""Loading tokenizer checkpoints: official directories (config.json + safetensors) through the
family's rules, with every tensor accounted for, and the reverse mapping to official tensors.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from mimo_jax.conversion.transforms import TRANSFORMS
from mimo_jax.tokenizer import config as config_lib
from mimo_jax.tokenizer.conversion import TokenizerFamily, is_ignored


def _tensor_files(src: str) -> dict[str, str]:
    """Official tensor name -> safetensors file holding it."""
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(src, file) for name, file in weight_map.items()}
    single = os.path.join(src, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{src}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


class _Reader:
    def __init__(self, files: dict[str, str]):
        self.files = files
        self.handles = {}

    def get(self, name: str) -> np.ndarray:
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = safe_open(file, framework="numpy")
        return self.handles[file].get_tensor(name)


def load_torch_checkpoint(src: str, *, dtype=None):
    """(config, model) from an official tokenizer directory. Raises one error naming every
    missing, mis-shaped or unaccounted-for tensor."""
    family = TokenizerFamily()
    config = config_lib.load(src)
    abstract = family.abstract_model(config, dtype=dtype)
    graphdef, state = nnx.split(abstract)
    files = _tensor_files(src)
    reader = _Reader(files)
    used, problems, values = set(), [], {}
    for path, var in nnx.to_flat_state(state):
        rule = family.rule(path)
        transform = TRANSFORMS[rule.transform]
        names = ([rule.torch_name.format(i=i) for i in range(var.shape[0])] if rule.stacked
                 else [rule.torch_name])
        arrays = []
        for name in names:
            if name not in files:
                problems.append(f"{name}: missing")
                continue
            used.add(name)
            array = reader.get(name)
            if transform.torch_ndim is not None and array.ndim != transform.torch_ndim:
                problems.append(f"{name}: rank {array.ndim}, expected {transform.torch_ndim}")
                continue
            arrays.append(transform.to_nnx(array))
        if len(arrays) != len(names):
            continue
        array = np.stack(arrays) if rule.stacked else arrays[0]
        if array.shape != var.shape:
            problems.append(f"{rule.torch_name}: shape {array.shape} after '{rule.transform}', "
                            f"expected {var.shape} for {'.'.join(map(str, path))}")
            continue
        values[path] = jnp.asarray(array.astype(var.dtype))
    unknown = sorted(n for n in files if n not in used and not is_ignored(n))
    problems += [f"{name}: not used by any rule" for name in unknown]
    if problems:
        raise ValueError(f"{src}: tokenizer checkpoint does not match its config.json:\n  "
                         + "\n  ".join(problems))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(values[path])
    return config, nnx.merge(graphdef, nnx.from_flat_state(flat))


def torch_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The official state dict (tensors the rules map; ignored buffers are not written)."""
    family = TokenizerFamily()
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        rule = family.rule(path)
        array = np.asarray(jax.device_get(var.get_value()))
        to_torch = TRANSFORMS[rule.transform].to_torch
        if rule.stacked:
            for i in range(array.shape[0]):
                out[rule.torch_name.format(i=i)] = np.ascontiguousarray(to_torch(array[i]))
        else:
            out[rule.torch_name] = np.ascontiguousarray(to_torch(array))
    return out


def load_tokenizer(path: str, *, dtype=None):
    """(config, model) from a checkpoint directory: an official one (config.json + safetensors)
    or an Orbax one written by convert_torch_weights.py."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    if any(os.path.exists(os.path.join(path, f))
           for f in ("model.safetensors", "model.safetensors.index.json")):
        return load_torch_checkpoint(path, dtype=dtype)
    try:
        from mimo_jax.conversion import checkpoint as orbax_checkpoint
    except ImportError:
        raise ValueError(f"{path}: no model.safetensors; Orbax tokenizer checkpoints need "
                         f"mimo_jax.conversion.checkpoint") from None
    return orbax_checkpoint.load(path)
