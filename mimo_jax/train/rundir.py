"""The run directory: its path (absolute, or a gs:// URI), its exclusive lock, and the removal of
what interrupted saves and exports left behind. Everything goes through etils.epath, so a run
directory may live on local disk or on gs://.

    workdir/lock                       {"host", "pid", "start"} of the run holding the directory
    workdir/checkpoints/<step>         Orbax checkpoints (mimo_jax.train.train_checkpoints)
    workdir/checkpoints_damaged/<step> checkpoints that failed verification, set aside
    workdir/metrics.jsonl, tensorboard/, config.json, model/
"""

import json
import os
import socket

from etils import epath

from mimo_jax.paths import is_local

LOCK_FILE = "lock"
ORBAX_TMP = "*.orbax-checkpoint-tmp*"  # Orbax's name for a step it has not finished writing
EXPORT_TMP = ".model.partial"  # mimo_jax.conversion.param_store.save's directory before its rename


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), if known."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return start is None or _start_time(pid) in (None, start)


class WorkdirLock:
    """Held by one run at a time: a second run on the same directory is refused, naming the holder;
    a lock left by a dead process on this host is taken over. Local disk: created atomically
    (O_EXCL); object stores: written after a check (two runs starting in the same second could
    both pass it)."""

    def __init__(self, workdir: epath.Path):
        self.path = workdir / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._create(json.dumps(me)):
                self.held = True
                return
            holder = self._holder()
            if holder is None:  # released between our attempt and the read
                continue
            if holder.get("host") == me["host"] and not _alive(
                int(holder.get("pid", -1)), holder.get("start")
            ):
                print(
                    f"taking over the lock {self.path} of a process that is gone "
                    f"(pid {holder.get('pid')})",
                    flush=True,
                )
                self.path.unlink(missing_ok=True)
                continue
            raise ValueError(
                f"{self.path.parent} is in use by the run of pid {holder.get('pid')} "
                f"on host {holder.get('host')}; wait for it to end or use another "
                f"--workdir (remove {self.path} only if that run is gone)"
            )
        raise ValueError(f"could not take the lock {self.path}")

    def _create(self, text: str) -> bool:
        if is_local(self.path):
            try:
                fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        if self.path.exists():
            return False
        self.path.write_text(text)
        return True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # cut short while being written: treat as held by an unknown run
            return {"host": "?", "pid": "?"}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def remove_leftovers(workdir: epath.Path) -> list[epath.Path]:
    """Removes the temporary directories of interrupted checkpoint saves and model exports (they
    are never complete; Orbax and the export rewrite them from scratch). Returns what it removed."""
    found = (
        list((workdir / "checkpoints").glob(ORBAX_TMP))
        if (workdir / "checkpoints").exists()
        else []
    )
    found += [p for p in [workdir / EXPORT_TMP] if p.exists()]
    for path in found:
        print(f"removing {path} (left by an interrupted save)", flush=True)
        path.rmtree() if path.is_dir() else path.unlink()
    return found
