"""One path layer for every file the project writes or reads: `etils.epath`, local or gs://.

Local paths are made absolute (Orbax refuses relative ones), URIs stay as they are. An output
directory is built in a hidden staging directory next to it and committed whole:

  local disk     one rename, atomic;
  object stores  no rename exists (it is a copy of every object), so the staged files are copied
                 into place with `marker` last: the directory counts as complete only once its
                 marker exists, and an interrupted commit leaves no marker.
"""

import hashlib
import json
import os
import socket
import uuid
import zlib

from etils import epath


def is_local(path) -> bool:
    return "://" not in os.fspath(path)


def resolve(path) -> epath.Path:
    """An absolute local path, or the URI (gs://bucket/dir) unchanged."""
    path = os.fspath(path)
    return epath.Path(os.path.abspath(path) if is_local(path) else path)


def same(a, b) -> bool:
    """Whether two paths name the same directory (symbolic links followed locally)."""
    if is_local(a) and is_local(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return os.fspath(a).rstrip("/") == os.fspath(b).rstrip("/")


def write_whole(path: epath.Path, data: str | bytes) -> None:
    """Writes a file so that no reader sees it half-written: locally a temporary file and a rename;
    an object store's upload appears whole already."""
    write = epath.Path.write_bytes if isinstance(data, bytes) else epath.Path.write_text
    if not is_local(path):
        write(path, data)
        return
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    write(tmp, data)
    tmp.replace(path)


def output_dir(path) -> epath.Path:
    """A command's output directory, created if missing and checked to take files, before any
    work starts: a ValueError says in one line why `path` cannot be used."""
    out = resolve(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{path}: is a file (expected a directory, created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{path}: cannot write there ({e.strerror or e})") from None
    return out


def upload(local: str, dst: epath.Path, chunk: int = 1 << 24) -> None:
    """Copies a local file to `dst` (any epath), streaming."""
    with open(local, "rb") as f, dst.open("wb") as out:
        while block := f.read(chunk):
            out.write(block)


def _files(root: epath.Path) -> list[epath.Path]:
    """Every file under `root` (epath refuses `**` globs on gs://)."""
    out = []
    for p in root.iterdir():
        out += _files(p) if p.is_dir() else [p]
    return out


def commit_dir(tmp: epath.Path, dst: epath.Path, marker: str) -> None:
    """Replaces `dst` by the staged directory `tmp` (see the module docstring)."""
    if dst.exists():
        dst.rmtree()
    if is_local(dst):
        tmp.rename(dst)
        return
    files = sorted(_files(tmp), key=lambda p: p == tmp / marker)  # the marker last
    for src in files:
        target = dst / src.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        src.copy(target)
    tmp.rmtree()


# Staging directories of outputs: .NAME.partial-HOST-PID-RANDOM next to NAME.
def staging_dir(dst: epath.Path) -> epath.Path:
    host = socket.gethostname().replace("-", "_")
    tmp = dst.parent / f".{dst.name}.partial-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def stale_staging_dirs(dst: epath.Path) -> list[epath.Path]:
    """Staging directories of `dst` left by dead processes on this host (or by a version that did
    not name its process: no process of this version can be writing to those)."""
    if not dst.parent.exists():
        return []
    host = socket.gethostname().replace("-", "_")
    stale = []
    for path in dst.parent.glob(f".{dst.name}.partial-*"):
        parts = path.name.rsplit(".partial-", 1)[1].split("-")
        if len(parts) == 3 and parts[1].isdigit():
            if parts[0] != host or _alive(int(parts[1])):
                continue
        stale.append(path)
    return stale


def remove_stale_staging(dst: epath.Path) -> list[epath.Path]:
    """Removes what interrupted writes of `dst` left behind, saying so in one line each."""
    stale = stale_staging_dirs(dst)
    for path in stale:
        print(
            f"removing {path}: staging directory of an interrupted write of {dst.name} "
            f"(its process has ended)",
            flush=True,
        )
        path.rmtree()
    return stale


def read_json(path: epath.PathLike):
    """A JSON file's content; a file that is not JSON is named in one line."""
    try:
        return json.loads(epath.Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path, errors: list) -> list[tuple[int, dict]]:
    """(line number, object) of every JSON-object line of a JSONL file (requests, items,
    manifests); blank lines are skipped, the others (not UTF-8, not a JSON object) go to `errors`
    as {"line", "id": None, "error"}. FileNotFoundError when the file itself cannot be read."""
    try:
        lines = epath.Path(path).read_bytes().splitlines()
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read ({e})") from None
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            why = f"byte 0x{raw[e.start]:02x} at column {e.start + 1} ({e.reason})"
            errors.append(
                {"line": n, "id": None, "error": f"not UTF-8: {why}; expected UTF-8 JSON"}
            )
            continue
        except json.JSONDecodeError as e:
            errors.append({"line": n, "id": None, "error": f"not a JSON object ({e})"})
            continue
        if not isinstance(obj, dict):
            errors.append(
                {"line": n, "id": None, "error": f"not a JSON object but {type(obj).__name__}"}
            )
            continue
        out.append((n, obj))
    return out


def fingerprint(path) -> str:
    """A digest of the content of a file or of every file under a directory (each one's path in
    it, size and CRC-32): tells two checkpoints apart without loading them."""
    root = epath.Path(path)
    files = sorted(_files(root), key=os.fspath) if root.is_dir() else [root]
    digest = hashlib.sha256()
    for file in files:
        crc, size = 0, 0
        with file.open("rb") as f:
            while block := f.read(1 << 24):
                crc, size = zlib.crc32(block, crc), size + len(block)
        name = file.name if file == root else os.fspath(file.relative_to(root))
        digest.update(f"{name}\0{size}\0{crc}\n".encode())
    return digest.hexdigest()
