"""Conversion between official HF-style checkpoints (config.json + safetensors) and model
checkpoints (config.json + Orbax parameters), both ways, for a given model family.

Before any data is read, the rules of the family are checked against the checkpoint's headers: every
official tensor must be used or ignored by an explicit rule, and have the expected shape and a float
dtype; all problems are reported together. Tensors are then streamed one at a time into the
preallocated (stacked) parameters, and the output is written to a staging directory
`.DST.partial-HOST-PID-RANDOM` that is committed only when complete (`mimo_jax.paths`: a rename
locally, a copy with config.json last on gs://). Staging directories of dead processes (an earlier
run killed mid-way) are removed when the next conversion to the same DST starts.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx
from tqdm import tqdm

from mimo_jax import paths
from mimo_jax.conversion import param_store
from mimo_jax.conversion import safetensors_io as st
from mimo_jax.conversion.family import ModelFamily, is_ignored
from mimo_jax.conversion.transforms import TRANSFORMS
from mimo_jax.nn.dtypes import DTYPES


class ConversionError(ValueError):
    """The checkpoint does not match the model its config describes."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """One official tensor and where it lands in an NNX parameter."""

    torch_name: str
    param_path: tuple[str, ...]
    layer: int | None  # index into the leading `layers` axis, or None
    transform: str
    torch_shape: tuple[int, ...]


def placements(family: ModelFamily, abstract_state) -> tuple[list[Placement], dict]:
    """Every official tensor the model needs, and the NNX parameter shapes by path."""
    out, shapes = [], {}
    for path, var in param_store.flat_params(abstract_state):
        rule = family.rule(path)
        shape = tuple(var.get_value().shape)
        shapes[path] = shape
        tf = TRANSFORMS[rule.transform]
        layers = range(shape[0]) if rule.stacked else [None]
        inner = shape[1:] if rule.stacked else shape
        # Shape of the official tensor: invert the transform on an empty array of the NNX shape.
        torch_shape = tf.to_torch(np.empty(inner, np.uint8)).shape
        for i in layers:
            name = rule.torch_name.format(i=i) if rule.stacked else rule.torch_name
            out.append(Placement(name, path, i, rule.transform, tuple(torch_shape)))
    return out, shapes


def check_tensors(
    family: ModelFamily, needed: list[Placement], found: dict[str, st.TensorInfo], where: str
) -> None:
    """Raises one error naming every missing, unexpected, misshapen or non-float tensor."""
    problems = []
    needed_names = {p.torch_name for p in needed}
    for p in needed:
        info = found.get(p.torch_name)
        if info is None:
            problems.append(f"missing tensor {p.torch_name} (expected shape {list(p.torch_shape)})")
        elif info.shape != p.torch_shape:
            problems.append(
                f"tensor {p.torch_name} has shape {list(info.shape)}, expected "
                f"{list(p.torch_shape)}"
            )
        elif info.dtype not in st.FLOAT_DTYPES:
            problems.append(
                f"tensor {p.torch_name} has dtype {info.dtype}, expected a float dtype "
                f"({', '.join(st.FLOAT_DTYPES)})"
            )
    for name in sorted(set(found) - needed_names):
        if not is_ignored(family, name):
            problems.append(
                f"unexpected tensor {name} {found[name].dtype}{list(found[name].shape)}: "
                f"no rule of the {family.name} uses or ignores it"
            )
    if problems:
        raise ConversionError(
            f"{where} does not match the {family.name} its config.json describes "
            f"({len(problems)} problems):\n  " + "\n  ".join(problems)
        )


def _abstract(family: ModelFamily, config) -> Any:
    model = nnx.eval_shape(lambda: family.build(config, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def read_hf_config(src: epath.Path, family: ModelFamily) -> tuple[Any, dict]:
    config = param_store.read_config(src, family)
    return config, json.loads((src / param_store.CONFIG_FILE).read_text())


def stream_torch_params(
    src: str | os.PathLike, family: ModelFamily, dtype=None, progress: bool = False
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(path, array) of every NNX parameter, one at a time, from an official HF-style directory
    whose tensors have been checked against the family's rules first."""
    src = paths.resolve(src)
    config, _ = read_hf_config(src, family)
    found = st.read_index(src)
    needed, shapes = placements(family, _abstract(family, config))
    check_tensors(family, needed, found, str(src))
    total = sum(found[p.torch_name].nbytes for p in needed)
    current: tuple[tuple[str, ...], np.ndarray] | None = None
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="converting", disable=not progress
    ) as bar:
        for p in needed:  # grouped by parameter: all layers of one parameter in a row
            info = found[p.torch_name]
            if current is None or current[0] != p.param_path:
                if current is not None:
                    yield current
                current = (
                    p.param_path,
                    np.empty(shapes[p.param_path], dtype or st.DTYPES[info.dtype]),
                )
            value = TRANSFORMS[p.transform].to_nnx(st.read_tensor(info))
            if p.layer is None:
                current[1][...] = value
            else:
                current[1][p.layer] = value
            bar.update(info.nbytes)
    if current is not None:
        yield current


def load_torch_checkpoint(src: str | os.PathLike, family: ModelFamily, dtype=None):
    """(config, model) straight from an official HF-style directory of `family` (no Orbax step)."""
    config = param_store.read_config(src, family)
    params = dict(stream_torch_params(src, family, dtype))
    model = nnx.eval_shape(lambda: family.build(config, rngs=nnx.Rngs(0)))
    for path, var in param_store.flat_params(model):
        var.set_value(jax.numpy.asarray(params[path]))
    graphdef, state = nnx.split(model)
    return config, nnx.merge(graphdef, state)


def _staging(dst: epath.Path, overwrite: bool) -> epath.Path:
    paths.remove_stale_staging(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{dst} already exists and is not empty; pass --overwrite to replace it"
        )
    return paths.staging_dir(dst)


def _discard(tmp: epath.Path) -> None:
    if tmp.exists():
        tmp.rmtree()


def torch_to_orbax(
    src: epath.Path,
    dst: epath.Path,
    family: ModelFamily,
    dtype=None,
    overwrite=False,
    progress=True,
) -> epath.Path:
    _, hf = read_hf_config(src, family)
    tmp = _staging(dst, overwrite)
    try:
        if dtype is not None:
            hf = dict(hf, torch_dtype="bfloat16" if dtype == ml_dtypes.bfloat16 else "float32")
        (tmp / param_store.CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        for path, value in stream_torch_params(src, family, dtype, progress):
            param_store.save_param(tmp / param_store.PARAMS_DIR, path, value)
        paths.commit_dir(tmp, dst, marker=param_store.CONFIG_FILE)
    except BaseException:
        _discard(tmp)
        raise
    return dst


def _torch_tensors(
    src_params: epath.Path, stored: dict, needed: list[Placement], dtype
) -> list[st.PendingTensor]:
    """The official tensors, each produced on demand from a partial restore of its parameter (only
    one parameter is held at a time: placements come grouped by parameter)."""
    held: dict[tuple[str, ...], np.ndarray] = {}

    def parameter(path):
        if path not in held:
            held.clear()
            held[path] = param_store.restore_param(src_params, path)
        return held[path]

    def produce(p: Placement, out_dtype):
        value = parameter(p.param_path)
        value = value if p.layer is None else value[p.layer]
        return TRANSFORMS[p.transform].to_torch(value).astype(out_dtype, copy=False)

    def pending(p: Placement) -> st.PendingTensor:
        out_dtype = np.dtype(dtype or stored[p.param_path].dtype)
        return st.PendingTensor(
            p.torch_name, out_dtype, p.torch_shape, lambda: produce(p, out_dtype)
        )

    return [pending(p) for p in needed]


def orbax_to_torch(
    src: epath.Path,
    dst: epath.Path,
    family: ModelFamily,
    dtype=None,
    overwrite=False,
    progress=True,
) -> epath.Path:
    config = param_store.read_config(src, family)
    needed, shapes = placements(family, _abstract(family, config))
    params_dir = src / param_store.PARAMS_DIR
    stored = param_store.check_params(src, shapes)
    tmp = _staging(dst, overwrite)
    try:
        hf = family.config_to_hf(config)
        if dtype is not None:
            hf["torch_dtype"] = "bfloat16" if dtype == ml_dtypes.bfloat16 else "float32"
        (tmp / param_store.CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
        pending = _torch_tensors(params_dir, stored, needed, dtype)
        with tqdm(
            total=sum(t.nbytes for t in pending),
            unit="B",
            unit_scale=True,
            desc="writing",
            disable=not progress,
        ) as bar:
            st.write_checkpoint(tmp, pending, on_written=bar.update)
        paths.commit_dir(tmp, dst, marker=param_store.CONFIG_FILE)
    except BaseException:
        _discard(tmp)
        raise
    return dst


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    family_of: Callable[[epath.Path], ModelFamily],
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> epath.Path:
    """Converts in the direction that SRC implies: official directory -> model checkpoint, or back.
    Either may be local (relative or absolute) or on gs://. `family_of` names the family of SRC
    (the registry's lookup, `mimo_jax.model_checkpoint.family_of`: the engine knows no family)."""
    source, target = paths.resolve(src), paths.resolve(dst)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    np_dtype = np.dtype(DTYPES[dtype]).type if dtype else None  # np.float32, ml_dtypes.bfloat16
    if paths.same(source, target):
        raise ValueError(f"source and destination are the same directory: {source}")
    if param_store.is_model_checkpoint(source):
        return orbax_to_torch(source, target, family_of(source), np_dtype, overwrite, progress)
    if not (source / param_store.CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{source}: no {param_store.CONFIG_FILE}; expected an official "
            f"checkpoint directory (config.json + model.safetensors) or a "
            f"model checkpoint (config.json + params/)"
        )
    return torch_to_orbax(source, target, family_of(source), np_dtype, overwrite, progress)
