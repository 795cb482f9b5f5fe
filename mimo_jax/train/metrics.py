"""Metrics out of a run: JSON lines (`workdir/metrics.jsonl`, one object per logged step), TensorBoard,
and a progress line with rate and ETA. Only process 0 writes."""
import json
import time
from pathlib import Path

import jax


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self._t0, self._step0 = time.time(), None
        if self.enabled:
            from tensorboardX import SummaryWriter
            Path(workdir).mkdir(parents=True, exist_ok=True)
            self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step":
                self._tb.add_scalar(key, value, step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        if self._step0 is None:
            self._t0, self._step0 = time.time(), step
            eta = "?"
        else:
            rate = (step - self._step0) / max(time.time() - self._t0, 1e-9)
            left = (self.total_steps - step) / max(rate, 1e-9)
            eta = f"{int(left // 60)}m{int(left % 60):02d}s"
        if self.enabled:
            extra = "".join(f" {k} {values[k]:.4g}" for k in ("text_loss", "codebook0_loss")
                            if k in values)
            print(f"step {step}/{self.total_steps} loss {values['loss']:.4f}{extra} | "
                  f"{values.get('groups_per_second', 0):.0f} groups/s | ETA {eta}", flush=True)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
