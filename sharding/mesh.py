"""Device meshes with the project's axis names."""
import jax
import numpy as np

AXES = ("data", "fsdp", "tensor", "sequence")


def make_mesh(shape: dict[str, int], devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) with the named axis sizes; unnamed axes have size 1.

    One axis may be -1 to take the remaining devices. Axes are Auto (the compiler propagates
    shardings from the parameters and the constraints the model places).
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices cannot be split by the fixed axes {shape}")
        sizes[free[0]] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices, but {len(devices)} are present")
    arr = np.asarray(devices).reshape([sizes[a] for a in AXES])
    return jax.sharding.Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
