"""Device meshes with the project's axis names, within a slice (ICI) and across slices (DCN)."""

import jax
import numpy as np
from jax.experimental import mesh_utils

from sharding.rules import PRESETS

AXES = ("data", "fsdp", "tensor", "sequence")


def _sizes(shape: dict[str, int], devices: int, what: str) -> list[int]:
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(
            f"{what}: unknown mesh axes {sorted(unknown)}; expected a subset of {AXES}"
        )
    sizes = {a: int(shape.get(a, 1)) for a in AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"{what}: only one axis may be -1, got {free}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"{what}: axis sizes must be positive or -1, got {shape}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if devices % fixed:
            raise ValueError(f"{what}: {devices} devices cannot be split by the fixed axes {shape}")
        sizes[free[0]] = devices // fixed
    total = int(np.prod(list(sizes.values())))
    if total != devices:
        raise ValueError(f"{what} {sizes} needs {total} devices, but {devices} are present")
    return [sizes[a] for a in AXES]


def make_mesh(
    ici: dict[str, int], dcn: dict[str, int] | None = None, devices=None
) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) with named axis sizes; unnamed axes have size 1.

    `ici` shapes the devices of one slice, `dcn` the slices (multi-slice TPU pods, or GPU hosts
    joined by the data-centre network); one axis of each may be -1 to take what remains. Axes are
    Auto: the compiler propagates shardings from the parameters and the model's constraints.
    """
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    dcn_sizes = _sizes(dcn or {}, len(slices), "dcn mesh")
    if len(slices) > 1 or int(np.prod(dcn_sizes)) > 1:
        ici_sizes = _sizes(ici, len(devices) // len(slices), "ici mesh")
        arr = mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices=devices)
    else:
        arr = np.asarray(devices).reshape(_sizes(ici, len(devices), "ici mesh"))
    return jax.sharding.Mesh(arr, AXES, axis_types=axis_types)


def mesh_and_rules(config, devices=None):
    """The mesh over `devices` (default: all) and the rule preset of an experiment config
    (`mesh.ici`, `mesh.dcn`, `mesh.rules`)."""
    if config.mesh.rules not in PRESETS:
        raise ValueError(
            f"config mesh.rules={config.mesh.rules!r}: expected one of {sorted(PRESETS)}"
        )
    mesh = make_mesh(dict(config.mesh.ici), dict(config.mesh.dcn), devices)
    return mesh, PRESETS[config.mesh.rules]
