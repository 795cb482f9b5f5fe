"""Grain pipelines: shard sources -> task documents -> packed rows -> batches.

Per source (a shard directory and the task its records become): the records of this process
(`records[process_index::process_count]`), shuffled with the seed (reshuffled each epoch),
repeated for `num_epochs` (None: forever), built into documents; sources are mixed with their
weights, packed into rows of `context_length` groups (`data_pipelines.packing`, which documents
the fields of an example), batched, and prefetched by `workers` processes. The output is
deterministic for a seed, a process slice and a worker count, and the iterator's `get_state()` /
`set_state()` (or `grain.checkpoint.CheckpointSave/Restore` in Orbax) resume mid-epoch with
exactly the next batch.

A corrupt record, a record its task cannot use, or a document longer than the context stops the
pipeline with a message naming the shard, record and reason; with `skip_bad_records` it is
skipped, logged, and counted in the rows' `skipped` field, unless a source has no good record left
(`BuildDocument`). A shard that cannot be read (`shards.ShardError`) always stops it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from data_pipelines.config import DataConfig
from data_pipelines.packing import ERROR_KEY, PackIterDataset
from data_pipelines.sequences import TASKS, DocumentError, SequenceBuilder
from data_pipelines.shards import Record, RecordError, ShardSet
from mimo_jax.tasks.text_tokenizer import TextTokenizer


@dataclasses.dataclass(frozen=True)
class Source:
    """A shard directory, the task its records are built into (`sequences.TASKS` or `"record"`
    for each record's own task field), and its mixing weight."""

    path: str
    task: str
    weight: float = 1.0


TASK_NAMES = (*TASKS, "record")


def parse_sources(text: str) -> list[Source]:
    """`"DIR:task[:weight],..."` (the config's `data.sources`) -> Sources. DIR may itself hold
    colons (`gs://bucket/shards:tts:0.5`): the task and the weight are read from the right."""
    sources = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        head, _, last = item.rpartition(":")
        weight = 1.0
        try:
            weight = float(last)
            head, _, last = head.rpartition(":")
        except ValueError:
            pass
        if not head or last not in TASK_NAMES:
            raise ValueError(
                f"data source {item!r}: expected DIR:TASK[:WEIGHT] with TASK one of "
                f"{', '.join(TASK_NAMES)}"
            )
        sources.append(Source(head, last, weight))
    return sources


class EpochShuffle(grain.MapDataset):
    """A different permutation of the parent per epoch, from a cached numpy permutation.

    Grain's `shuffle` computes each index with `index_shuffle` (about 0.1 ms per element here,
    more than reading and decoding a record); one epoch's permutation of this process's records
    costs 4 bytes per record.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._epoch = -1
        self._perm = np.empty(0, np.int32)  # the permutation of `_epoch`

    def __len__(self) -> int:
        return len(self._parent)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self._seed, epoch])
            self._perm = rng.permutation(len(self._parent)).astype(np.int32)
            self._epoch = epoch
        return self._perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), len(self._parent))
        return self._parent[int(self._permutation(epoch)[i])]

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"


class BuildDocument:
    """Record (or the error reading it) -> document dict, or an error marker when skipping.

    Skipping is bounded: a source whose records were bad twice as many times in a row as this
    process reads records of it in an epoch has no good record left to skip to (the run would
    skip forever), and stops the pipeline."""

    def __init__(self, builder: SequenceBuilder, task: str, cfg: DataConfig, records: int):
        self.builder, self.task, self.cfg = builder, task, cfg
        self.max_bad_in_a_row = 2 * records
        self.bad_in_a_row = 0

    def _bad(self, message: str) -> dict:
        if not self.cfg.skip_bad_records:
            raise ValueError(message)
        self.bad_in_a_row += 1
        if self.bad_in_a_row >= self.max_bad_in_a_row:
            raise ValueError(
                f"{self.bad_in_a_row} bad records in a row, twice the "
                f"{self.max_bad_in_a_row // 2} this process reads of their source per epoch: no "
                f"good record left to skip to (the last: {message})"
            )
        logging.warning("skipping a bad record: %s", message)
        return {ERROR_KEY: message}

    def __call__(self, rec: Record | RecordError) -> dict:
        if isinstance(rec, RecordError):
            return self._bad(str(rec))
        try:
            doc: dict[str, Any] = self.builder.build(rec, self.task)
        except DocumentError as e:
            return self._bad(f"{rec.origin}: {e}")
        n = len(doc["text"])
        if n > self.cfg.context_length:
            return self._bad(
                f"{rec.origin} ({rec.id}): the {self.task} sequence has {n} groups, "
                f"longer than the context of {self.cfg.context_length} groups"
            )
        doc["id"] = rec.id
        self.bad_in_a_row = 0
        return doc


def document_dataset(
    sources: Sequence[Source],
    cfg: DataConfig,
    tokenizer: TextTokenizer,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
) -> grain.MapDataset:
    """The mixed, shuffled, per-process stream of documents (before packing)."""
    builder = SequenceBuilder(tokenizer, cfg)
    datasets = []
    for i, src in enumerate(sources):
        shards = ShardSet(src.path, codebooks=cfg.audio_channels)
        ds = grain.MapDataset.source(shards.lenient())[process_index::process_count]
        if shuffle:
            ds = EpochShuffle(ds, seed=seed * 1_000_003 + i)
        ds = ds.repeat(num_epochs).map(BuildDocument(builder, src.task, cfg, len(ds)))
        datasets.append(ds)
    if len(datasets) == 1:
        return datasets[0]
    return grain.MapDataset.mix(datasets, [s.weight for s in sources])


def make_dataset(
    sources: Sequence[Source],
    cfg: DataConfig,
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    workers: int = 0,
    worker_buffer: int = 2,
    read_threads: int = 0,
    shuffle: bool = True,
) -> grain.IterDataset:
    """Batches `{field: [batch_size, ...]}` of packed rows for this process.

    `workers` > 0 moves reading, building and packing into that many processes (each packs its
    own slice, so the rows depend on the worker count); `read_threads` are reader threads per
    process (0: read in the packing thread, best when decoding dominates).
    """
    docs = document_dataset(
        sources,
        cfg,
        tokenizer,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        shuffle=shuffle,
    )
    it = docs.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    it = PackIterDataset(it, cfg, tokenizer.empty_id, tokenizer.pad_id)
    it = it.batch(batch_size, drop_remainder=True)
    if workers > 0:
        # Grain's worker processes read absl flags; outside an absl app they were never parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=worker_buffer)
        )
    return it
