"""One attention layer's gradient (wrt q, k, v) on each kernel of `model.attention`: per-device
memory as the compiler reports it, and on an accelerator its time per step. Packed causal rows of
--seq tokens (two documents each), batch split over the devices as the LM's train step splits it.

    python -m benchmarks.attention [--topology v5p:2x2x1] [--seq 8192 --heads 28 --kv-heads 4
        --head-dim 128 --rows-per-device 1 --kernels xla,splash --steps 10]

With --topology (any machine with the tpu extra), libtpu compiles for that TPU slice and only
memory is printed; without it the kernels run on the devices present (xla and splash on a TPU,
xla and cudnn on a GPU) and are timed too. The defaults are the 7B backbone's attention.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from experiments import aot_lib
from mimo_jax.nn.attention import MaskSpec, attend
from mimo_jax.nn.partitioning import use_rules
from sharding.rules import PRESETS


def _inputs(a, mesh, concrete: bool):
    rows = a.rows_per_device * mesh.size
    shapes = {
        "q": ((rows, a.seq, a.heads, a.head_dim), jnp.bfloat16),
        "k": ((rows, a.seq, a.kv_heads, a.head_dim), jnp.bfloat16),
        "v": ((rows, a.seq, a.kv_heads, a.head_dim), jnp.bfloat16),
        "pos": ((rows, a.seq), jnp.int32),
        "seg": ((rows, a.seq), jnp.int32),
    }
    sharding = NamedSharding(mesh, PartitionSpec("fsdp"))
    if not concrete:
        return {n: jax.ShapeDtypeStruct(s, d, sharding=sharding) for n, (s, d) in shapes.items()}
    keys = jax.random.split(jax.random.key(0), 3)
    out = {n: jax.random.normal(key, shapes[n][0], jnp.bfloat16) for n, key in zip("qkv", keys)}
    idx, cut = jnp.arange(a.seq)[None] * jnp.ones((rows, 1), jnp.int32), a.seq // 3
    out["pos"], out["seg"] = jnp.where(idx < cut, idx, idx - cut), jnp.where(idx < cut, 1, 2)
    return {n: jax.device_put(x, sharding) for n, x in out.items()}


def _grad(kernel: str):
    def loss(q, k, v, pos, seg):
        out = attend(q, k, v, MaskSpec(pos, pos, seg, seg, causal=True), implementation=kernel)
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--topology", default="")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rows-per-device", type=int, default=1)
    p.add_argument("--kernels", default="xla,splash")
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    target = aot_lib.tpu_target(a.topology) if a.topology else None
    devices = target.devices if target else jax.devices()
    mesh = Mesh(
        np.asarray(devices).reshape(-1, 1), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2
    )
    where = a.topology or f"{len(devices)} x {devices[0].device_kind}"
    print(
        f"{where}: {a.rows_per_device} row(s) of {a.seq} per device, heads {a.heads}/{a.kv_heads}"
        f" x {a.head_dim}, bf16, grad wrt q, k, v"
    )
    for kernel in a.kernels.split(","):
        x = _inputs(a, mesh, concrete=target is None)
        with jax.set_mesh(mesh), use_rules(PRESETS["fsdp"]):
            lowered = _grad(kernel).lower(*x.values())
        start = time.perf_counter()
        compiled = aot_lib.compile_for(target, lowered) if target else lowered.compile()
        m = compiled.memory_analysis()
        line = (
            f"  {kernel:7s} compile {time.perf_counter() - start:5.1f} s, temporaries "
            f"{m.temp_size_in_bytes / 2**30:6.3f} GiB per device"
        )
        if target is None:
            jax.block_until_ready(compiled(*x.values()))
            start = time.perf_counter()
            for _ in range(a.steps):
                out = compiled(*x.values())
            jax.block_until_ready(out)
            line += f", {1e3 * (time.perf_counter() - start) / a.steps:8.2f} ms per step"
        print(line, flush=True)


if __name__ == "__main__":
    main()
