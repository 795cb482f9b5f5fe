"""A real GCS JSON API on loopback for tests: `gcp-storage-emulator` in a subprocess.

`start()` runs the emulator on 127.0.0.1 with a free port and one bucket, and returns the
environment that points every client this project uses at it, offline and without credentials:

  STORAGE_EMULATOR_HOST          google-cloud-storage and gcsfs (etils.epath's gs:// backend,
                                 fsspec, when TensorFlow is not installed);
  FSSPEC_GCS_TOKEN=anon          gcsfs: no credential lookup (the default chain would query the
                                 GCE metadata server);
  CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp inside array_record (its riegeli GCS reader
                                 and writer), anonymous when set;
  TENSORSTORE_GCS_HTTP_URL       tensorstore's gcs kvstore (Orbax array data);
  GOOGLE_AUTH_TOKEN_FOR_TESTING  tensorstore: a fixed bearer token instead of the credential chain;
  TENSORSTORE_GCS_HTTP_VERSION   HTTP/1.1 (the emulator is a plain HTTP/1 server);
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  (read when gcsfs is imported; see client_env).

The emulator runs in a subprocess (`serve`), not a thread: Orbax and tensorstore block the calling
Python thread while their C++ threads talk to the server, and the emulator must not wait for the
GIL of the process it serves.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

BUCKET = "mimo-test"


def client_env(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS_TOKEN": "anon",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "TENSORSTORE_GCS_HTTP_VERSION": "1.1",
        "GOOGLE_CLOUD_PROJECT": "test",
        "NO_GCE_CHECK": "true",  # gcsfs/google-auth: never probe the GCE metadata server
        # gcsfs >= 2025.x asks the gRPC storage-control API whether a bucket is zonal/HNS; the
        # emulator has no gRPC endpoint, so each new bucket would wait 60 s before falling back.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }


@dataclasses.dataclass
class Emulator:
    url: str
    bucket: str
    process: subprocess.Popen
    log: str  # the server's stderr

    @property
    def env(self) -> dict[str, str]:
        return client_env(self.url)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.unlink(self.log)


def serve(bucket: str) -> None:
    """The emulator's storage and request handler behind a threading server with a deep accept
    queue: its own server is a single-threaded `http.server.HTTPServer` with a backlog of 5, and
    parallel requests (tensorstore) can overflow it.
    Requests still run one at a time (the in-memory storage is not thread-safe). Prints the port."""
    import faulthandler
    import functools
    import signal
    import threading
    from http import server as http_server

    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import buckets, objects
    from gcp_storage_emulator.storage import Storage

    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID: where a stuck server is
    lock = threading.Lock()

    class Handler(emulator.RequestHandler):
        def _locked(self, method):
            with lock:
                getattr(super(), method)()

        do_GET = lambda self: self._locked("do_GET")  # noqa: E731
        do_POST = lambda self: self._locked("do_POST")  # noqa: E731
        do_PUT = lambda self: self._locked("do_PUT")  # noqa: E731
        do_PATCH = lambda self: self._locked("do_PATCH")  # noqa: E731
        do_DELETE = lambda self: self._locked("do_DELETE")  # noqa: E731

    class Server(http_server.ThreadingHTTPServer):
        request_queue_size = 1024
        daemon_threads = True

    # In memory, its copy of all metadata (JSON, rewritten whole after every change, for restarts
    # from disk) only makes each request slower as the bucket grows: one Orbax save is ~8 objects.
    Storage._write_config_to_file = lambda self: None
    # Media downloads carry no x-goog-generation header: tensorstore then cannot tell which
    # generation it read ("Malformed StorageGeneration" when OCDBT rewrites its manifest).
    download = objects.download

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    objects.download = download_with_generation
    for _, methods in emulator.HANDLERS:
        for method, handler in methods.items():
            if handler is download:
                methods[method] = download_with_generation
    storage = Storage(use_memory_fs=True)
    buckets.create_bucket(bucket, storage)
    httpd = Server(("127.0.0.1", 0), functools.partial(Handler, storage))
    print(httpd.server_address[1], flush=True)
    httpd.serve_forever()


def start(bucket: str = BUCKET, timeout: float = 30.0) -> Emulator:
    # stderr to a file, never a pipe nobody reads: the server prints a traceback for each
    # connection a client drops, and a full pipe would stop it mid-request.
    log = tempfile.NamedTemporaryFile("w+", prefix="gcs-emulator-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, __file__, bucket], stdout=subprocess.PIPE, stderr=log, text=True
    )
    port = proc.stdout.readline().strip()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2) as r:
                if r.status == 200:
                    return Emulator(url, bucket, proc, log.name)
        except (OSError, ValueError):
            pass
        if not port or proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError(
                f"gcp-storage-emulator did not serve {url} within {timeout} s "
                f"(exit status {proc.poll()}): {log.read()[-2000:]}"
            )
        time.sleep(0.1)


def point_this_process(env: dict[str, str]) -> None:
    """Applies `env` here: os.environ (for subprocesses and tensorstore, which reads it when its
    gcs kvstore is first used) and fsspec's config (read from the environment at import)."""
    os.environ.update(env)
    import fsspec

    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"


@pytest.fixture(scope="session")
def gcs():
    """A running emulator, this process and its children pointed at it (restored afterwards)."""
    import fsspec

    em = start()
    saved_env = {k: os.environ.get(k) for k in em.env}
    saved_token = fsspec.config.conf.get("gcs", {}).get("token")
    point_this_process(em.env)
    yield em
    em.stop()
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fsspec.config.conf["gcs"].pop("token", None)
    if saved_token is not None:
        fsspec.config.conf["gcs"]["token"] = saved_token


@pytest.fixture
def gs_dir(gcs, request):
    """A fresh gs:// prefix of the emulator's bucket for one test."""
    return f"gs://{gcs.bucket}/{request.node.name}-{uuid.uuid4().hex[:8]}"


if __name__ == "__main__":
    serve(sys.argv[1])
