"""Faults on cue for the ray engine's tests: `--encoder ray_support:faulty` is the energy encoder,
whose worker process dies (`os._exit`) or stops (waits, never to encode) at a clip of a given
number of samples, as the plan in `$MIMO_TEST_FAULTS/plan.json` says (read at every batch, so a
test changes it between runs of one Ray instance):

  {"crash": {"samples": N, "times": T}}   die on a clip of N samples, the first T times (-1: always)
  {"hold": {"samples": N}}                write `held` in the folder, then wait until killed

The deaths are counted by files in the folder, across the worker processes."""

import json
import os
import time
from pathlib import Path

from data_pipelines.encoders import EnergyEncoder

ENV = "MIMO_TEST_FAULTS"


def folder() -> Path:
    return Path(os.environ[ENV])


def set_plan(plan: dict) -> None:
    for marker in folder().glob("crash-*"):
        marker.unlink()
    (folder() / "held").unlink(missing_ok=True)
    (folder() / "plan.json").write_text(json.dumps(plan))


class FaultyEncoder(EnergyEncoder):
    def __call__(self, wavs):
        plan = json.loads((folder() / "plan.json").read_text())
        for wav in wavs:
            self._crash(plan.get("crash"), len(wav))
            self._hold(plan.get("hold"), len(wav))
        return super().__call__(wavs)

    def _crash(self, crash, samples: int) -> None:
        if crash and samples == crash["samples"]:
            deaths = len(list(folder().glob("crash-*")))
            if crash["times"] < 0 or deaths < crash["times"]:
                (folder() / f"crash-{os.getpid()}").write_text("")
                os._exit(1)

    def _hold(self, hold, samples: int) -> None:
        if hold and samples == hold["samples"]:
            (folder() / "held").write_text(str(os.getpid()))
            time.sleep(300)  # the test kills the driver, and Ray this worker, long before
            os._exit(1)


def faulty(checkpoint, codebooks=8):
    return FaultyEncoder(codebooks)
