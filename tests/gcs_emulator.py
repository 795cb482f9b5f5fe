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

A subprocess, not a thread: Orbax and tensorstore block the calling Python thread while their C++
threads talk to the server, and the emulator must not wait for the GIL of the process it serves.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = "mimo-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def start(bucket: str = BUCKET, timeout: float = 30.0) -> Emulator:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory", "--default-bucket", bucket, "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2) as r:
                if r.status == 200:
                    return Emulator(url, bucket, proc)
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.stderr.read().decode(errors="replace")
            raise RuntimeError(f"gcp-storage-emulator did not serve {url} within {timeout} s "
                               f"(exit status {proc.poll()}): {err[-2000:]}")
        time.sleep(0.1)


def point_this_process(env: dict[str, str]) -> None:
    """Applies `env` here: os.environ (for subprocesses and tensorstore, which reads it when its
    gcs kvstore is first used) and fsspec's config (read from the environment at import)."""
    os.environ.update(env)
    import fsspec

    fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
