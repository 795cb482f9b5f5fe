"""Grain pipeline of tokenizer training: random waveform crops and their transcripts.

The clips are the lines of the manifests the tokenize command reads (`data_pipelines.tokenize`
documents the format; one `audio` per line, its `text` the transcript of the A2T loss).
`preflight` reads every manifest and every audio header once, before training, and turns each
problem into one line: lines that cannot be used (not JSON, no audio, unreadable audio, duplicate
id, a conversation), clips shorter than a crop (padded or skipped, by config, and counted), and
clips without a transcript when the A2T loss needs one (always fatal). Its `summary` says what
was kept and what was skipped.

`make_dataset` serves this process's clips (`clips[process_index::process_count]`), shuffled per
epoch, each decoded on the workers (`audio_io.read_audio`, resampled to `sampling_rate`) and
cropped at a random start drawn from `(seed, epoch, clip)`: a crop depends on neither the process
count nor the worker count, so the stream is reproducible and resumes (`get_state` /
`set_state`) with exactly the next batch. The transcript is that of the whole clip (the A2T LM
learns from the crop what it can), cut or padded to `max_text_tokens`.

A clip that fails to decode during training (file gone or damaged since the preflight) behaves as
a bad record of the LM pipeline (`data_pipelines.pipeline`): it stops the pipeline with a message
naming the manifest, line and reason; with `skip_bad_records` it is skipped, logged and counted
in the batches' `skipped` field.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from data_pipelines.pipeline import EpochShuffle
from data_pipelines.shard_job import Item
from data_pipelines.tokenize import parse_manifest, read_manifest_lines
from mimo_jax import paths
from mimo_jax.tasks.text_tokenizer import TextTokenizer
from mimo_jax.tokenizer import audio_io

log = logging.getLogger(__name__)

SHORT_CLIPS = ("pad", "skip")
ERROR_KEY = "error"  # a clip skipped at training time: {"error": message}
SHOWN_LINES = 10  # line numbers quoted in one message


class WaveformDataError(ValueError):
    """A manifest that cannot feed tokenizer training; one line per problem."""


@dataclasses.dataclass(frozen=True)
class WaveformConfig:
    """Data of tokenizer training.

    manifests: JSONL manifests (the tokenize command's format), local or gs://.
    crop_samples: samples of each training crop, at `sampling_rate`.
    batch_size: crops per batch of this process.
    max_text_tokens: transcript tokens per crop (longer transcripts are cut, and counted).
    short_clips: "pad" (kept, zero-padded; `lengths` tells the real samples) or "skip" clips
      shorter than a crop.
    needs_text: every clip must have a transcript (the A2T loss weight is non-zero).
    workers: decoding processes (0: decode in the iterating process).
    skip_bad_records: skip and count unusable manifest lines and clips that fail to decode
      instead of stopping.
    """

    manifests: tuple[str, ...]
    crop_samples: int
    sampling_rate: int = 24000
    batch_size: int = 8
    max_text_tokens: int = 256
    short_clips: str = "pad"
    seed: int = 0
    workers: int = 0
    needs_text: bool = True
    skip_bad_records: bool = False

    def __post_init__(self):
        if isinstance(self.manifests, str):  # one path given alone
            object.__setattr__(self, "manifests", (self.manifests,))
        object.__setattr__(self, "manifests", tuple(self.manifests))
        if not self.manifests:
            raise ValueError("waveform data: no manifests")
        for name in ("crop_samples", "sampling_rate", "batch_size", "max_text_tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"waveform data: {name}={getattr(self, name)!r}, expected >= 1")
        if self.short_clips not in SHORT_CLIPS:
            raise ValueError(
                f"waveform data: short_clips={self.short_clips!r}, expected one of {SHORT_CLIPS}"
            )
        if self.workers < 0:
            raise ValueError(f"waveform data: workers={self.workers}, expected >= 0")


@dataclasses.dataclass(frozen=True)
class Clip:
    """One usable manifest line: its audio, header length and transcript tokens."""

    manifest: str
    line: int
    audio: str
    samples: int  # at the config's rate, from the header
    tokens: tuple[int, ...]

    @property
    def origin(self) -> str:
        return f"{self.manifest} line {self.line}"


@dataclasses.dataclass
class ManifestCheck:
    """What the preflight found in one manifest."""

    path: str
    lines: int = 0
    clips: list[Clip] = dataclasses.field(default_factory=list)
    bad: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (line, reason)
    short: list[int] = dataclasses.field(default_factory=list)
    no_text: list[int] = dataclasses.field(default_factory=list)
    cut: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Corpus:
    """The clips training uses (every manifest's, in order) and one summary line per manifest."""

    clips: list[Clip]
    summary: list[str]


def _line_list(lines: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:SHOWN_LINES])
    return shown + (", …" if len(lines) > SHOWN_LINES else "")


def _check_item(item: Item, path: str, cfg: WaveformConfig, tok: TextTokenizer, out) -> None:
    if item.conversation is not None or len(item.audios) != 1:
        out.bad.append((item.line, "a conversation: tokenizer training takes one audio a line"))
        return
    try:
        seconds = audio_io.audio_seconds(item.audios[0])
    except (audio_io.InputError, OSError) as e:
        out.bad.append((item.line, f"bad audio: {e}"))
        return
    # The header's length at the training rate (the resampled clip may differ by one sample).
    samples = round(seconds * cfg.sampling_rate)
    if samples < cfg.crop_samples:
        out.short.append(item.line)
        if cfg.short_clips == "skip":
            return
    tokens = tuple(tok.encode(item.text)) if item.text.strip() else ()
    if not tokens:
        out.no_text.append(item.line)
    if len(tokens) > cfg.max_text_tokens:
        out.cut.append(item.line)
    out.clips.append(Clip(path, item.line, item.audios[0], samples, tokens))


def check_manifest(path: str, cfg: WaveformConfig, tok: TextTokenizer) -> ManifestCheck:
    """Every line of one manifest parsed, its audio header read, its transcript tokenised."""
    lines = read_manifest_lines(path)
    out = ManifestCheck(path, lines=len(lines))
    for entry in parse_manifest(lines, paths.resolve(path).parent):
        if isinstance(entry, Item):
            _check_item(entry, path, cfg, tok, out)
        else:
            out.bad.append((entry["line"], entry["reason"]))
    return out


def problems(check: ManifestCheck, cfg: WaveformConfig) -> list[str]:
    """The fatal problems of one manifest, one line each."""
    found = []
    if check.bad and not cfg.skip_bad_records:
        first = "; ".join(f"line {n}: {why}" for n, why in check.bad[:3])
        found.append(
            f"{len(check.bad)} of {check.lines} lines of {check.path} cannot be used "
            f"(lines {_line_list([n for n, _ in check.bad])}; {first}): fix them, or set "
            f"skip_bad_records to skip them"
        )
    if check.no_text and cfg.needs_text:
        found.append(
            f"{len(check.no_text)} of {len(check.clips)} clips of {check.path} have no transcript "
            f"(lines {_line_list(check.no_text)}); the A2T loss needs one per clip: give "
            f"`text` or set its weight to 0"
        )
    return found


def summary(check: ManifestCheck, cfg: WaveformConfig) -> str:
    """One line: what was kept, padded, skipped and cut."""
    handled = "padded" if cfg.short_clips == "pad" else "skipped"
    parts = [
        f"{len(check.short)} shorter than the crop of {cfg.crop_samples} samples ({handled})",
        f"{len(check.bad)} unusable lines skipped",
        f"{len(check.cut)} transcripts cut to {cfg.max_text_tokens} tokens",
        f"{len(check.no_text)} without transcript",
    ]
    return f"{check.path}: {check.lines} lines, {len(check.clips)} clips kept; " + ", ".join(parts)


def preflight(cfg: WaveformConfig, tok: TextTokenizer) -> Corpus:
    """Checks every manifest before training; WaveformDataError lists every fatal problem."""
    checks = [check_manifest(path, cfg, tok) for path in cfg.manifests]
    fatal = [line for c in checks for line in problems(c, cfg)]
    clips = [clip for c in checks for clip in c.clips]
    if not fatal and not clips:
        fatal.append(f"no clips to train on in {', '.join(cfg.manifests)}")
    if fatal:
        raise WaveformDataError("\n".join(fatal))
    return Corpus(clips, [summary(c, cfg) for c in checks])  # the caller shows the summary


def random_crop(wav: np.ndarray, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(`samples` consecutive samples at a random start, zero-padded if the clip is shorter;
    the real samples)."""
    if len(wav) >= samples:
        start = int(rng.integers(0, len(wav) - samples + 1))
        return wav[start : start + samples], samples
    return np.pad(wav, (0, samples - len(wav))), len(wav)


def fit_tokens(tokens: Sequence[int], size: int, pad_id: int) -> tuple[np.ndarray, int]:
    """(tokens cut or padded to `size`, the real ones)."""
    out = np.full(size, pad_id, np.int32)
    n = min(len(tokens), size)
    out[:n] = tokens[:n]
    return out, n


class LoadCrop:
    """(stream index, clip index) -> one example: decoded, resampled, cropped, with its text."""

    def __init__(self, clips: Sequence[Clip], cfg: WaveformConfig, pad_id: int, per_epoch: int):
        self.clips, self.cfg, self.pad_id, self.per_epoch = clips, cfg, pad_id, per_epoch

    def _bad(self, message: str) -> dict:
        if not self.cfg.skip_bad_records:
            raise WaveformDataError(message)
        log.warning("skipping a clip: %s", message)
        return {ERROR_KEY: message}

    def __call__(self, index: int, clip_index: int) -> dict:
        clip = self.clips[clip_index]
        try:
            wav = audio_io.read_audio(
                clip.audio, self.cfg.sampling_rate, min_samples=1, allow_silence=True
            )
        except (audio_io.InputError, OSError) as e:
            return self._bad(f"{clip.origin}: {e}")
        epoch = index // self.per_epoch
        rng = np.random.default_rng([self.cfg.seed, epoch, clip_index])
        crop, length = random_crop(wav, self.cfg.crop_samples, rng)
        text, text_length = fit_tokens(clip.tokens, self.cfg.max_text_tokens, self.pad_id)
        return {
            "wav": crop.astype(np.float32),
            "lengths": np.int32(length),
            "text": text,
            "text_lengths": np.int32(text_length),
        }


class _BatchIterator(grain.DatasetIterator):
    """Stacks examples, leaving out skipped clips; each example's `skipped` counts the skipped
    clips just before it. The state is the parent's: a batch is taken whole in one `next`."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __next__(self) -> dict[str, np.ndarray]:
        examples: list[dict] = []
        skipped = 0
        while len(examples) < self._batch_size:
            example = next(self._parent)  # StopIteration drops an incomplete last batch
            if ERROR_KEY in example:
                skipped += 1
                continue
            examples.append(example | {"skipped": np.int32(skipped)})
            skipped = 0
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])


class BatchIterDataset(grain.IterDataset):
    """Examples (or `{"error": ...}` markers of skipped clips) -> batches of `batch_size`."""

    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._parent.__iter__(), self._batch_size)

    def __str__(self) -> str:
        return f"BatchIterDataset(batch_size={self._batch_size})"


def example_dataset(
    corpus: Corpus,
    cfg: WaveformConfig,
    pad_id: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
) -> grain.MapDataset:
    """This process's stream of examples (or skip markers), before batching."""
    mine = grain.MapDataset.range(len(corpus.clips))[process_index::process_count]
    if len(mine) == 0:
        raise WaveformDataError(
            f"process {process_index} of {process_count} has no clips ({len(corpus.clips)} in all)"
        )
    ds = EpochShuffle(mine, seed=cfg.seed) if shuffle else mine
    load = LoadCrop(corpus.clips, cfg, pad_id, len(mine))
    return ds.repeat(num_epochs).map_with_index(load)


def make_dataset(
    corpus: Corpus,
    cfg: WaveformConfig,
    pad_id: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    read_threads: int = 0,
    worker_buffer: int = 2,
) -> grain.IterDataset:
    """Batches of stage-1 training: `wav` [batch, crop_samples] float32, `lengths` [batch]
    int32 (real samples), `text` [batch, max_text_tokens] int32 (padded with `pad_id`),
    `text_lengths` [batch] int32 and `skipped` [batch] int32 (clips skipped before each)."""
    examples = example_dataset(
        corpus,
        cfg,
        pad_id,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        shuffle=shuffle,
    )
    it = examples.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=cfg.batch_size * 2)
    )
    it = BatchIterDataset(it, cfg.batch_size)
    if cfg.workers > 0:
        # Grain's worker processes read absl flags; outside an absl app they were never parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=cfg.workers, per_worker_buffer_size=worker_buffer
            )
        )
    return it
