"""Training checkpoints with Orbax's CheckpointManager: the train state, the data iterator's state,
and the experiment's identity, saved together (asynchronously, keeping the last N) under
`workdir/checkpoints/<step>`, on local disk or `gs://`.

The identity (model config, trainable groups, optimizer structure) is compared on resume, so a
workdir holding another experiment's checkpoints is refused instead of being half-restored.
"""
import hashlib
import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrainCheckpoints:
    def __init__(self, workdir: str, identity: dict, keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(workdir) / "checkpoints"
        self.identity = dict(identity, fingerprint=fingerprint(identity))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, force: bool = True) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(self.identity)), force=force)

    def check_identity(self, step: int) -> None:
        saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        saved = saved["meta"]
        if saved.get("fingerprint") != self.identity["fingerprint"]:
            differing = sorted(k for k in set(saved) | set(self.identity)
                               if k != "fingerprint" and saved.get(k) != self.identity.get(k))
            raise ValueError(f"{self.directory} holds checkpoints of another experiment (step {step}; "
                             f"differs in: {', '.join(differing)}); use a new --workdir")

    def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
        """The state at `step` placed like `abstract_state`; restores the iterator in place."""
        self.check_identity(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a concrete tree (the restore target)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
