"""Packing documents into rows of the context length, and the training targets of a row.

A training example is one row of G = context_length groups of the batch `mimo_jax.train.batch`
describes (its fields' dtypes and shapes); what each field holds at group g:
  text          the group's text id; `<|empty|>` for a speech group, `<|endoftext|>` in padding
  codes         a speech group's frames; text and padding groups hold every channel's empty id
                (the model's speech_zeroemb_idx, e.g. 1024,1024,128,...)
  segment_ids   1, 2, 3, ... per packed document, 0 = padding
  positions     0, 1, ... restarting at each document, 0 in padding
  text_targets  text id of group g+1 (the next-token target of position g); `<|endoftext|>` where
                there is none
  text_weights  relative weight of text_targets[g]: 1, or empty_text_weight where the target is
                `<|empty|>`; 0 where g+1 is in another document, is padding or is not supervised
                (the loss applies the text loss weight)
  code_targets  the patch of group g+1 (undelayed: the patch decoder at position g predicts group
                g+1's patch from hidden state g and applies the delay pattern itself); empty ids
                where unused
  code_weights  1 where group g+1 is a supervised speech group of the same document, else 0 (the
                loss applies the codebook weights)
and, beside them, per row (int32 scalars):
  documents     documents packed into the row
  skipped       bad documents skipped (config `skip_bad_records`) since the previous row; the
                trainer logs their sum (skipped_documents)
No position attends across documents when attention is restricted to equal segment ids; no
target crosses a document boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from data_pipelines.config import DataConfig

ERROR_KEY = "error"  # a skipped document: {"error": message}


def add_targets(
    row: dict[str, np.ndarray], target: np.ndarray, cfg: DataConfig, empty_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Adds text/code targets and weights to a packed row (`target`: group is supervised)."""
    text, codes, seg = row["text"], row["codes"], row["segment_ids"]
    g = len(text)
    valid = np.zeros(g, bool)
    valid[:-1] = (seg[1:] == seg[:-1]) & (seg[:-1] != 0) & target[1:]
    text_targets = np.full(g, pad_id, np.int32)
    text_targets[:-1] = text[1:]
    text_targets[~valid] = pad_id
    is_empty = text_targets == empty_id
    text_weights = np.where(valid, np.where(is_empty, cfg.empty_text_weight, 1.0), 0.0)
    speech_next = valid & is_empty
    code_targets = np.empty_like(codes)
    code_targets[:-1] = codes[1:]
    code_targets[~speech_next] = np.asarray(cfg.empty_ids, codes.dtype)
    code_weights = np.repeat(speech_next[:, None], cfg.audio_channels, axis=1)
    row.update(
        text_targets=text_targets,
        text_weights=text_weights.astype(np.float32),
        code_targets=code_targets,
        code_weights=code_weights.astype(np.float32),
    )
    return row


class RowBuilder:
    """Fills one row of `context_length` groups with whole documents."""

    def __init__(self, cfg: DataConfig, empty_id: int, pad_id: int):
        self.cfg, self.empty_id, self.pad_id = cfg, empty_id, pad_id
        self.length = cfg.context_length
        self._arange = np.arange(self.length, dtype=np.int32)
        self._empty_codes = np.asarray(cfg.empty_ids, np.int32)
        self.reset()

    def reset(self):
        g, cfg = self.length, self.cfg
        self.text = np.full(g, self.pad_id, np.int32)
        self.codes = np.empty((g, cfg.group_size, cfg.audio_channels), np.int32)
        self.codes[:] = self._empty_codes
        self.segment_ids = np.zeros(g, np.int32)
        self.positions = np.zeros(g, np.int32)
        self.target = np.zeros(g, bool)
        self.used = 0
        self.documents = 0

    def fits(self, doc: dict[str, np.ndarray]) -> bool:
        return self.used + len(doc["text"]) <= self.length

    def add(self, doc: dict[str, np.ndarray]) -> None:
        n, s = len(doc["text"]), self.used
        if n > self.length:
            raise ValueError(
                f"document of {n} groups is longer than the context of {self.length} groups"
            )
        self.text[s : s + n] = doc["text"]
        self.codes[s : s + n] = doc["codes"]
        self.target[s : s + n] = doc["target"]
        self.documents += 1
        self.segment_ids[s : s + n] = self.documents
        self.positions[s : s + n] = self._arange[:n]
        self.used += n

    def finish(self, skipped: int) -> dict[str, np.ndarray]:
        row = {
            "text": self.text,
            "codes": self.codes,
            "segment_ids": self.segment_ids,
            "positions": self.positions,
        }
        add_targets(row, self.target, self.cfg, self.empty_id, self.pad_id)
        row["documents"] = np.int32(self.documents)
        row["skipped"] = np.int32(skipped)
        self.reset()
        return row


class _PackIterator(grain.DatasetIterator):
    """Next-fit packing; the state is the parent's state before the document that did not fit."""

    def __init__(self, parent: grain.DatasetIterator, cfg: DataConfig, empty_id: int, pad_id: int):
        super().__init__(parent)
        self._builder = RowBuilder(cfg, empty_id, pad_id)
        self._pending = None
        self._pending_state = None

    def _fetch(self):
        if self._pending is None:
            self._pending_state = self._parent.get_state()
            self._pending = next(self._parent)
        return self._pending

    def __next__(self) -> dict[str, np.ndarray]:
        builder, skipped = self._builder, 0
        while True:
            try:
                doc = self._fetch()
            except StopIteration:
                if builder.documents or skipped:
                    return builder.finish(skipped)
                raise
            if ERROR_KEY in doc:
                skipped += 1
            elif builder.fits(doc):
                builder.add(doc)
            elif builder.documents == 0:
                builder.add(doc)  # raises: longer than the context
            else:
                return builder.finish(skipped)
            self._pending = None

    def get_state(self) -> dict[str, Any]:
        parent = self._pending_state if self._pending is not None else self._parent.get_state()
        return {"parent": parent}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None
        self._builder.reset()


class PackIterDataset(grain.IterDataset):
    """Documents (or `{"error": ...}` markers of skipped ones) -> packed rows with targets."""

    def __init__(self, parent: grain.IterDataset, cfg: DataConfig, empty_id: int, pad_id: int):
        super().__init__(parent)
        self._cfg, self._empty_id, self._pad_id = cfg, empty_id, pad_id

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._cfg, self._empty_id, self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(context_length={self._cfg.context_length})"


def example_from_document(
    doc: dict[str, np.ndarray], cfg: DataConfig, empty_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    """The training example of one document alone, in a row of exactly its length."""
    one = RowBuilder(dataclasses.replace(cfg, context_length=len(doc["text"])), empty_id, pad_id)
    one.add(doc)
    return one.finish(0)
