"""Streaming safetensors reading and writing, one tensor at a time.

Reading validates every file's header against its size before any data is read, so a truncated or
corrupt file is reported up front with the file and tensor it affects. Writing lays the header out
first from shapes and dtypes alone, then streams each tensor's bytes: a checkpoint is never held
twice in memory. Files are read and written through etils.epath (local or gs://).
"""

import dataclasses
import json
import os
import struct
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np
from etils import epath

from mimo_jax import paths

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def dtype_name(dtype) -> str:
    return _NAMES[np.dtype(dtype)]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: epath.Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def _read_header(path: epath.Path) -> dict[str, TensorInfo]:
    size = path.stat().length
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(
                f"{path}: truncated or not a safetensors file (header of {n} bytes, "
                f"file of {size} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    data_start, data_size = 8 + n, size - 8 - n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        if end > data_size:
            raise ValueError(
                f"{path}: truncated: tensor {name} ends at data byte {end} but the file "
                f"holds {data_size} data bytes"
            )
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        shape = tuple(meta["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[meta["dtype"]]).itemsize
        if end - begin != expected:
            raise ValueError(
                f"{path}: tensor {name} holds {end - begin} bytes, expected {expected} "
                f"for {meta['dtype']}{list(shape)}"
            )
        out[name] = TensorInfo(name, meta["dtype"], shape, path, data_start + begin, end - begin)
    return out


def read_file(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file (its header checked against its size)."""
    return _read_header(paths.resolve(path))


def read_index(src: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of an HF-style directory (single file or sharded with an index)."""
    root = paths.resolve(src)
    index = root / INDEX_FILE
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        path = root / name
        if not path.exists():
            raise FileNotFoundError(f"{index}: lists {name}, which does not exist")
        for key, info in _read_header(path).items():
            if key in tensors:
                raise ValueError(f"tensor {key} appears in both {tensors[key].file} and {path}")
            tensors[key] = info
    return tensors


def read_tensor(info: TensorInfo) -> np.ndarray:
    dtype = np.dtype(DTYPES[info.dtype])
    with info.file.open("rb") as f:
        f.seek(info.offset)
        raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise ValueError(
            f"{info.file}: tensor {info.name} has {len(raw)} of its {info.nbytes} "
            f"bytes (file truncated while reading)"
        )
    return np.frombuffer(raw, dtype).reshape(info.shape)


@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its name, dtype and shape now, its data when `produce` is called."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _write_file(path: epath.Path, tensors: list[PendingTensor], on_written: Callable[[int], None]):
    header: dict[str, dict[str, Any]] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": dtype_name(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            data = np.ascontiguousarray(t.produce(), dtype=t.dtype)
            if data.shape != t.shape:
                raise ValueError(
                    f"tensor {t.name}: produced shape {data.shape}, declared {t.shape}"
                )
            f.write(data.tobytes())
            on_written(t.nbytes)


def write_file(path: str | os.PathLike, tensors: list[PendingTensor]) -> epath.Path:
    """Writes one safetensors file of these tensors."""
    out = paths.resolve(path)
    _write_file(out, tensors, lambda n: None)
    return out


def write_checkpoint(
    dst: str | os.PathLike,
    tensors: Iterable[PendingTensor],
    max_shard_bytes: int = 5 * 2**30,
    on_written: Callable[[int], None] = lambda n: None,
) -> list[epath.Path]:
    """Writes `model.safetensors`, or shards plus `model.safetensors.index.json` when larger."""
    out = paths.resolve(dst)
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        _write_file(out / SINGLE_FILE, shards[0], on_written)
        return [out / SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _write_file(out / name, shard, on_written)
        weight_map.update({t.name: name for t in shard})
    total = sum(t.nbytes for s in shards for t in s)
    (out / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        + os.linesep
    )
    return [out / n for n in names] + [out / INDEX_FILE]
