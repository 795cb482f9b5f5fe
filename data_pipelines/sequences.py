"""Sequence builders: one shard `Record` -> one `Document` in a task format of the report's stages.

A document is a list of groups (LLM positions). Per group g of a document of L groups:
  text    int32 [L]                       text id; `<|empty|>` for a speech group
  codes   int16 [L, group_size, channels] a speech group's frames; a text group holds every
                                          channel's empty id (speech_zeroemb_idx)
  target  bool  [L]                       whether group g is supervised (predicted from g-1)
`packing.pack_rows` / `packing.add_targets` turn documents into the model's training examples
(field names and meaning are documented in `data_pipelines.packing`).

The prompt part of every task comes from the inference prompt builders (`mimo_jax.tasks.prompts`),
segments as `mimo_jax.tasks.segments` defines them (as the official `InputSegment`), so that a model
is trained on the text it is prompted with.

Tasks (`TASKS`): `continuation` (speech only), `interleave` (5:5 stream), `asr`, `tts`, `caption`,
`instruct_tts`, `text` from a record's codes and text; and the conversation formats of
`data_pipelines.conversations` (`asr`, `tts`, `instruct_tts`, `understanding`, `spoken_dialogue`,
`s2t_dialogue`, `text_dialogue`) from a conversation record, which is built in its own format.
Prompt templates are picked deterministically from the record id.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from data_pipelines import conversations
from data_pipelines.config import DataConfig
from data_pipelines.shards import Record
from mimo_jax.tasks import prompts, templates
from mimo_jax.tasks.segments import Audio, Stream, Text, patchify, stream_groups
from mimo_jax.tasks.text_tokenizer import TextTokenizer

__all__ = ["DocumentError", "SequenceBuilder", "TASKS", "patchify"]


class DocumentError(ValueError):
    """A record that cannot become a document of its task; names the record and the reason."""


class _Doc:
    """Accumulates groups as Python lists (cheap appends): text ids, supervision flags, and for each
    group the row of the document's patches it shows (-1 for a text group). The document's
    patches are the patch arrays it was given, one after the other."""

    def __init__(self) -> None:
        self.text: list[int] = []
        self.target: list[bool] = []
        self.patch_row: list[int] = []
        self._arrays: list[np.ndarray] = []
        self._offsets: dict[int, int] = {}  # id of a patch array -> its first row
        self._rows = 0

    def _offset(self, patches: np.ndarray) -> int:
        """The first row of `patches` among the document's (kept alive, so its id is unique)."""
        key = id(patches)
        if key not in self._offsets:
            self._offsets[key] = self._rows
            self._arrays.append(patches)
            self._rows += len(patches)
        return self._offsets[key]

    def add_text(self, ids, target: bool):
        ids = list(ids)
        self.text.extend(ids)
        self.target.extend([target] * len(ids))
        self.patch_row.extend([-1] * len(ids))

    def add_patches(self, patches: np.ndarray, start: int, stop: int, empty_id: int, target: bool):
        """Groups for rows `start:stop` of `patches`."""
        offset = self._offset(patches)
        n = stop - start
        self.text.extend([empty_id] * n)
        self.target.extend([target] * n)
        self.patch_row.extend(range(offset + start, offset + stop))

    def add_groups(self, text: np.ndarray, rows: np.ndarray, patches: np.ndarray, target: bool):
        """Mixed groups at once: `rows[i]` is the patch row of group i, or -1 for text `text[i]`."""
        offset = self._offset(patches)
        self.text.extend(text.tolist())
        self.target.extend([target] * len(text))
        self.patch_row.extend(np.where(rows >= 0, rows + offset, -1).tolist())

    def finish(self, empty_codes: np.ndarray) -> dict[str, np.ndarray]:
        n = len(self.text)
        codes = np.empty((n,) + empty_codes.shape, np.int16)
        codes[:] = empty_codes
        if self._arrays:
            rows = np.asarray(self.patch_row, np.int64)
            speech = rows >= 0
            codes[speech] = np.concatenate(self._arrays)[rows[speech]]
        return {
            "text": np.asarray(self.text, np.int32),
            "codes": codes,
            "target": np.asarray(self.target, bool),
        }


class SequenceBuilder:
    """Builds the documents of every task from records, for one text tokenizer and data config."""

    def __init__(self, tokenizer: TextTokenizer, config: DataConfig):
        self.tok = tokenizer
        self.cfg = config
        self.empty_codes = np.broadcast_to(
            np.asarray(config.empty_ids, np.int16), (config.group_size, config.audio_channels)
        ).copy()
        self._cache: dict[str, list[int]] = {}

    # ---- segments -------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        """Tokenised fixed prompt text, cached (the tokenizer call would dominate otherwise)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok.encode(text)
            if len(self._cache) < 4096:
                self._cache[text] = ids
        return ids

    def _patches(self, rec: Record) -> np.ndarray:
        if rec.frames == 0:
            raise DocumentError(f"record {rec.id}: task needs audio codes, the record has none")
        return patchify(rec.codes, self.cfg.group_size, self.cfg.audio_channels)

    def _add(self, doc: _Doc, segments, target: bool):
        """Prompt segments (mimo_jax.tasks.segments) as groups of the document."""
        for seg in segments:
            if isinstance(seg, Text):
                doc.add_text(self._ids(seg.text), target)
            elif isinstance(seg, Audio):
                doc.add_text([self.tok.sosp_id] * seg.open, target)
                doc.add_patches(seg.patches, 0, len(seg.patches), self.tok.empty_id, target)
                doc.add_text([self.tok.eosp_id] * seg.close, target)
            else:
                self._stream(doc, seg.text, seg.patches, target)

    def _stream(self, doc: _Doc, text: str, patches: np.ndarray, target: bool):
        """The official streaming segment: the fixed 5:5 text-guided interleave."""
        ids = self.tok.encode(text) + [self.tok.eot_id]  # <|eot|> joins the last chunk
        text_out, rows = stream_groups(ids, len(patches), self.tok.empty_id)
        doc.add_text([self.tok.sostm_id], target)
        doc.add_groups(text_out, rows, patches, target)
        doc.add_text([self.tok.eostm_id], target)

    def _pick(self, rec: Record, options: tuple[str, ...]) -> str:
        return options[zlib.crc32(rec.id.encode()) % len(options)]

    def _parts(self, doc: _Doc, parts: list[conversations.Part]):
        for segments, target in parts:
            self._add(doc, segments, target)

    def _conversation(self, rec: Record, doc: _Doc):
        """A conversation record in its own format: each audio is a frame span of its codes."""
        conv = rec.meta["conversation"]
        try:
            conversations.check(rec.task, conv, conversations.span_problem(rec.frames))
        except conversations.ConversationError as e:
            raise DocumentError(f"record {rec.id}: conversation: {e}") from None
        gs, ch = self.cfg.group_size, self.cfg.audio_channels

        def audio(span):
            return patchify(rec.codes[span[0] : span[1]], gs, ch)

        pick = lambda options: self._pick(rec, options)  # noqa: E731
        self._parts(doc, conversations.layout(rec.task, conv, audio, pick))

    # ---- tasks ----------------------------------------------------------------------------------
    def continuation(self, rec: Record, doc: _Doc):
        self._add(doc, [Audio(self._patches(rec))], True)

    def interleave(self, rec: Record, doc: _Doc):
        self._add(doc, [Stream(rec.text, self._patches(rec))], True)

    def asr(self, rec: Record, doc: _Doc):
        if not rec.text:
            raise DocumentError(
                f"record {rec.id}: task {rec.task or 'asr'} needs a text answer, "
                f"the record text is empty"
            )
        template = self._pick(rec, templates.ASR_TEMPLATES)
        self._parts(doc, conversations.asr(self._patches(rec), template, rec.text))

    def caption(self, rec: Record, doc: _Doc):
        caption = rec.text if rec.task == "caption" else rec.meta.get("caption")
        if not caption:
            raise DocumentError(
                f"record {rec.id}: task caption needs a caption (record text of a "
                f"caption record, or meta.caption)"
            )
        question = self._pick(rec, templates.CAPTION_QUESTIONS)
        self._parts(doc, conversations.understanding(self._patches(rec), question, caption))

    def tts(self, rec: Record, doc: _Doc):
        text = self._need_text(rec)
        template = self._pick(rec, prompts.tts_templates(text))
        self._parts(doc, conversations.tts(text, template, text, self._patches(rec)))

    def instruct_tts(self, rec: Record, doc: _Doc):
        text = self._need_text(rec)
        instruct = rec.meta.get("instruct")
        if not instruct:
            raise DocumentError(
                f"record {rec.id}: task instruct_tts needs meta.instruct (the style instruction)"
            )
        template = self._pick(rec, prompts.tts_templates(text))
        self._parts(
            doc, conversations.instruct_tts(text, template, instruct, text, self._patches(rec))
        )

    def text(self, rec: Record, doc: _Doc):
        doc.add_text(self.tok.encode(self._need_text(rec)), True)
        doc.add_text([self.tok.pad_id], True)

    def _need_text(self, rec: Record) -> str:
        if not rec.text:
            raise DocumentError(
                f"record {rec.id}: task {rec.task or 'text'} needs text, the record text is empty"
            )
        return rec.text

    # ---- entry point ----------------------------------------------------------------------------
    def build(self, rec: Record, task: str) -> dict[str, np.ndarray]:
        """`task` one of `TASKS`, or `"record"` to use the record's own `task` field."""
        name = rec.task if task == "record" else task
        if name not in TASKS:
            raise DocumentError(
                f"record {rec.id}: unknown task {name!r}, expected one of {', '.join(TASKS)}"
            )
        doc = _Doc()
        if "conversation" in rec.meta:
            if name != rec.task:
                raise DocumentError(
                    f"record {rec.id}: a conversation of task {rec.task}, built as {name} (build "
                    f"it as its own task: DIR:record or DIR:{rec.task})"
                )
            self._conversation(rec, doc)
            return doc.finish(self.empty_codes)
        fn: Callable | None = getattr(self, name, None)
        if fn is None:
            raise DocumentError(
                f"record {rec.id}: task {name} needs a conversation record (a manifest line "
                f"with messages, see data_pipelines.conversations)"
            )
        fn(rec, doc)
        return doc.finish(self.empty_codes)


TASKS = (
    "continuation",
    "interleave",
    "asr",
    "tts",
    "caption",
    "instruct_tts",
    "text",
    "understanding",
    "spoken_dialogue",
    "s2t_dialogue",
    "text_dialogue",
)
