"""Metrics out of a run: JSON lines (`workdir/metrics.jsonl`, one object per logged step),
TensorBoard, and a progress line with rate and ETA. Only process 0 writes.

metrics.jsonl on local disk is appended to and flushed per record. Object stores (gs://) have no
append: the records are kept and the object is rewritten whole on `flush()` (at each checkpoint
save, at most every `remote_flush_seconds` otherwise, and at close). TensorBoard on gs:// is
written to a local directory and its event files copied over at the same moments (through
epath, like every other file of the run, rather than tensorboardX's own GCS client).

On resume the file is cut back to the restored step: records of later steps (written after the
checkpoint, to be written again) and a trailing partial line (a run killed mid-write, a full disk)
are dropped.
"""

import json
import struct
import tempfile
import time
import zlib

import jax
import numpy as np
from etils import epath

from mimo_jax.paths import is_local, write_whole

METRICS_FILE = "metrics.jsonl"


def cut_back(path: epath.Path, last_step: int) -> list[str]:
    """The complete lines of `path` whose step is at most `last_step`; rewrites the file to them
    when anything is dropped, and says what was dropped."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    partial = bool(lines) and not lines[-1].endswith("\n")
    kept, later = [], 0
    for line in lines[:-1] if partial else lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # a line cut and joined to the next one
            partial = True
            continue
        if step <= last_step:
            kept.append(line)
        else:
            later += 1
    if later or partial:
        write_whole(path, "".join(kept))
        print(
            f"{path}: kept {len(kept)} records up to step {last_step}, dropped {later} of later "
            f"steps" + (" and a partial line" if partial else ""),
            flush=True,
        )
    return kept


def _png(image: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of `image` [H, W] in [0, 1] (tensorboardX's own encoder needs
    Pillow, which the project does not otherwise use)."""
    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    h, w = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = np.concatenate([np.zeros((h, 1), np.uint8), pixels], axis=1)  # filter type 0 per row
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows.tobytes()))
        + chunk(b"IEND", b"")
    )


def _image_summary(tag: str, image: np.ndarray):
    from tensorboardX.proto.summary_pb2 import Summary

    h, w = image.shape
    return Summary(
        value=[
            Summary.Value(
                tag=tag,
                image=Summary.Image(
                    height=h, width=w, colorspace=1, encoded_image_string=_png(image)
                ),
            )
        ]
    )


# Loss terms a progress line shows beside the loss (the LM's, the tokenizer stages').
SHOWN_TERMS = ("text_loss", "codebook0_loss", "a2t_loss", "recon_loss", "disc_loss")


class MetricsWriter:
    def __init__(
        self,
        workdir,
        total_steps: int,
        start_step: int = 0,
        config_json: str = "",
        hparams: dict | None = None,
        remote_flush_seconds: float = 60.0,
    ):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self._t0 = time.time()
        self._step0: int | None = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._path = workdir / METRICS_FILE
        self._local = is_local(self._path)
        self._lines = cut_back(self._path, start_step)
        self._jsonl = self._path.open("a") if self._local else None
        self._remote_flush_seconds, self._flushed_at = remote_flush_seconds, time.time()
        self._tb_dir = workdir / "tensorboard"
        self._tb_local = (
            epath.Path(self._tb_dir)
            if self._local
            else epath.Path(tempfile.mkdtemp(prefix="tensorboard-"))
        )
        # purge_step: TensorBoard drops the events of steps this run writes again after a resume.
        self._tb = SummaryWriter(
            str(self._tb_local), purge_step=start_step + 1 if start_step else None
        )
        if config_json:
            self._tb.add_text("config", "```\n" + config_json + "\n```", start_step)
        if hparams:
            self._add_hparams(hparams)

    def _add_hparams(self, hparams: dict) -> None:
        from tensorboardX.summary import hparams as hparams_summary

        for event in hparams_summary(hparams, {}):
            self._tb.file_writer.add_summary(event)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        line = json.dumps(record) + "\n"
        if self._jsonl is not None:  # local: appended as it goes
            self._jsonl.write(line)
            self._jsonl.flush()
        else:
            self._lines.append(line)
            if time.time() - self._flushed_at >= self._remote_flush_seconds:
                self.flush()
        for key, value in record.items():
            if key != "step":
                self._tb.add_scalar(key, value, step)

    def media(
        self,
        step: int,
        audio: dict | None = None,
        images: dict | None = None,
        texts: dict | None = None,
        sampling_rate: int = 24000,
    ) -> None:
        """TensorBoard only: waveforms (float, [-1, 1]), images [H, W] in [0, 1] and markdown
        texts, each by tag."""
        if not self.enabled:
            return
        for tag, wav in (audio or {}).items():
            self._tb.add_audio(tag, np.clip(wav, -1.0, 1.0), step, sample_rate=sampling_rate)
        for tag, image in (images or {}).items():
            self._tb.file_writer.add_summary(_image_summary(tag, image), step)
        for tag, text in (texts or {}).items():
            self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        """Makes everything written so far durable in the run directory."""
        if not self.enabled:
            return
        self._tb.flush()
        if not self._local:
            self._upload()

    def _upload(self) -> None:
        write_whole(self._path, "".join(self._lines))
        self._tb_dir.mkdir(parents=True, exist_ok=True)
        for event_file in self._tb_local.iterdir():
            (self._tb_dir / event_file.name).write_bytes(event_file.read_bytes())
        self._flushed_at = time.time()

    def progress(self, step: int, values: dict[str, float]) -> None:
        if self._step0 is None:
            self._t0, self._step0 = time.time(), step
            eta = "?"
        else:
            rate = (step - self._step0) / max(time.time() - self._t0, 1e-9)
            left = (self.total_steps - step) / max(rate, 1e-9)
            eta = f"{int(left // 60)}m{int(left % 60):02d}s"
        if self.enabled:
            extra = "".join(f" {k} {values[k]:.4g}" for k in SHOWN_TERMS if k in values)
            speed = (
                f"{values['audio_seconds_per_second']:.2f} s of audio/s"
                if "audio_seconds_per_second" in values
                else f"{values.get('groups_per_second', 0):.0f} groups/s"
            )
            print(
                f"step {step}/{self.total_steps} loss {values['loss']:.4f}{extra} | "
                f"{speed} | ETA {eta}",
                flush=True,
            )

    def close(self) -> None:
        if not self.enabled:
            return
        self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        else:
            self._upload()
            self._tb_local.rmtree()
