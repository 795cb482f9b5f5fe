"""Training checkpoints with Orbax's CheckpointManager: the train state, the data iterator's state,
and the experiment's identity, saved together (asynchronously, keeping the last N) under
`workdir/checkpoints/<step>`, on local disk or `gs://`.

The identity (model config, trainable groups, optimizer structure) is compared on resume, so a
workdir holding another experiment's checkpoints is refused instead of being half-restored.

Every step is verified on restore: its meta item holds a checksum of every saved array (computed on
device: the array's bits as uint32 words times odd per-position weights, summed mod 2^32, so any
single flipped bit changes it) and of each process's data-iterator state. A step that cannot be
read or does not match is named and set aside in `workdir/checkpoints_damaged/<step>` (moved, never
deleted) when an older intact step exists to resume from; with none intact, the run stops naming
each step and its problem, and leaves them in place.
"""

import hashlib
import json
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

DAMAGED_DIR = "checkpoints_damaged"


class DamagedCheckpoint(Exception):
    pass


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (an 8-byte element gives two)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    if x.dtype in (jnp.int4, jnp.uint4):  # no 4-bit bitcast; widening keeps every bit
        x = x.astype(jnp.int8 if x.dtype == jnp.int4 else jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
    words = _words(x)
    index, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for axis in reversed(range(words.ndim)):  # row-major position, built from iotas (no reshape)
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(stride)
        stride = stride * words.shape[axis] % 2**32
    return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksum_leaves(leaves):
    return [_array_checksum(x) for x in leaves]


def checksums(tree: Any) -> dict[str, int]:
    """{tree path: checksum} of every array in `tree`, computed where the arrays live."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    sums = jax.device_get(_checksum_leaves([x for _, x in flat]))
    return {jax.tree_util.keystr(path): int(s) for (path, _), s in zip(flat, sums)}


def iterator_checksum(data_iterator) -> int:
    state = data_iterator.get_state()
    blob = state if isinstance(state, bytes) else json.dumps(state, sort_keys=True).encode()
    return int(hashlib.sha256(blob).hexdigest()[:8], 16)


def _per_process(value: int) -> list[int]:
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    return [int(v) for v in multihost_utils.process_allgather(np.uint32(value))]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


class TrainCheckpoints:
    def __init__(self, workdir, identity: dict, keep: int = 3, async_save: bool = True):
        if keep < 2:
            raise ValueError(
                f"checkpoint.keep={keep}: expected at least 2 (a damaged newest "
                f"checkpoint falls back to the one before it)"
            )
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / "checkpoints"
        self.identity = dict(identity, fingerprint=fingerprint(identity))
        self.good_step: int | None = None  # newest step verified on restore or saved by this run
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, force: bool = True) -> None:
        data = _per_process(iterator_checksum(data_iterator))
        meta = dict(self.identity, checksums={"state": checksums(state), "data": data})
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        self.good_step = step

    def _read_meta(self, step: int) -> dict:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any failure to read is damage to report
            raise DamagedCheckpoint(f"its meta item cannot be read ({_first_line(e)})") from None
        meta = meta["meta"]
        if not isinstance(meta, dict):
            raise DamagedCheckpoint("its meta item is not a JSON object")
        return meta

    def check_identity(self, step: int, saved: dict) -> None:
        if saved.get("fingerprint") != self.identity["fingerprint"]:
            differing = sorted(
                k
                for k in set(saved) | set(self.identity)
                if k not in ("fingerprint", "checksums") and saved.get(k) != self.identity.get(k)
            )
            raise ValueError(
                f"{self.directory} holds checkpoints of another experiment "
                f"(step {step}; differs in: {', '.join(differing)}); "
                f"use a new --workdir"
            )

    def _restore_verified(self, step: int, abstract_state: Any, data_iterator) -> Any:
        meta = self._read_meta(step)
        self.check_identity(step, meta)
        expected = meta.get("checksums")
        if not isinstance(expected, dict) or "state" not in expected or "data" not in expected:
            raise DamagedCheckpoint("its meta item has no checksums")
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ),
            )
        except Exception as e:  # noqa: BLE001 - a missing or cut file surfaces in many types
            raise DamagedCheckpoint(f"cannot be read ({_first_line(e)})") from None
        state = restored["state"]
        actual = checksums(state)
        wrong = sorted(
            k
            for k in set(actual) | set(expected["state"])
            if actual.get(k) != expected["state"].get(k)
        )
        if wrong:
            raise DamagedCheckpoint(
                f"{len(wrong)} arrays differ from their saved checksums: "
                + ", ".join(wrong[:3])
                + (" ..." if len(wrong) > 3 else "")
            )
        data = expected["data"]
        if len(data) != jax.process_count() or data[jax.process_index()] != iterator_checksum(
            data_iterator
        ):
            raise DamagedCheckpoint("its data-iterator state differs from its saved checksum")
        return state

    def restore_latest(self, abstract_state: Any, data_iterator) -> tuple[int | None, Any]:
        """(step, state placed like `abstract_state`) of the newest intact step, or (None, None)
        without checkpoints; restores the iterator in place. Damaged newer steps are set aside."""
        damaged = {}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self._restore_verified(step, abstract_state, data_iterator)
            except DamagedCheckpoint as e:
                damaged[step] = str(e)
                continue
            for bad, problem in damaged.items():
                where = self._set_aside(bad)
                print(
                    f"checkpoint step {bad} is damaged: {problem}; moved to {where}, resuming "
                    f"from step {step}",
                    flush=True,
                )
            self.good_step = step
            return step, state
        if damaged:
            raise ValueError(
                f"no intact checkpoint in {self.directory}: "
                + "; ".join(f"step {s} {p}" for s, p in damaged.items())
            )
        return None, None

    def _set_aside(self, step: int) -> epath.Path:
        target = self.workdir / DAMAGED_DIR / str(step)
        n = 0
        while target.exists():  # the same step number damaged again after a later resume
            n += 1
            target = self.workdir / DAMAGED_DIR / f"{step}.{n}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        _sync(f"set_aside_{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a concrete tree (the restore target)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
