"""Sequence builders: one shard `Record` -> one `Document` in a task format of the report's stages.

A document is a list of groups (LLM positions). Per group g of a document of L groups:
  text    int32 [L]                       text id; `<|empty|>` for a speech group
  codes   int16 [L, group_size, channels] a speech group's frames; a text group holds every
                                          channel's empty id (speech_zeroemb_idx)
  target  bool  [L]                       whether group g is supervised (predicted from g-1)
`packing.pack_rows` / `packing.add_targets` turn documents into the model's training examples
(field names and meaning are documented in `data_pipelines.packing`).

Audio follows SPEC §2.2/2.3: codes are padded to a multiple of `group_size` by repeating the last
frame; an audio segment is `<|sosp|>`, one `<|empty|>` group per patch, `<|eosp|>`; a streaming
segment is the fixed 5:5 text-guided interleave `<|sostm|>` 5 text, 5 patches, ..., last text +
`<|eot|>`, remaining patches (or remaining text), `<|eostm|>`.

Tasks (`TASKS`): `continuation` (speech only), `interleave` (5:5 stream), `asr`, `tts`, `caption`,
`instruct_tts`, `text`. Prompt templates are picked deterministically from the record id.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from data_pipelines import prompts
from data_pipelines.config import DataConfig
from data_pipelines.shards import Record
from data_pipelines.text_tokenizer import TextTokenizer

TEXT_CHUNK = 5  # text tokens per interleave chunk
AUDIO_CHUNK = 5  # patches per interleave chunk


class DocumentError(ValueError):
    """A record that cannot become a document of its task; names the record and the reason."""


def patchify(frames: np.ndarray, group_size: int, channels: int) -> np.ndarray:
    """`[T, >=channels]` codes -> `[ceil(T / group_size), group_size, channels]`, the last patch
    completed by repeating the last frame (as the official front end does)."""
    frames = np.asarray(frames)[:, :channels]
    t = frames.shape[0]
    pad = -t % group_size
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    return frames.reshape(-1, group_size, channels)


class _Doc:
    """Accumulates groups as Python lists (cheap appends): text ids, supervision flags, and for each
    group the row of the record's patches it shows (-1 for a text group)."""

    def __init__(self):
        self.text: list[int] = []
        self.target: list[bool] = []
        self.patch_row: list[int] = []
        self.patches: np.ndarray | None = None

    def add_text(self, ids, target: bool):
        ids = list(ids)
        self.text.extend(ids)
        self.target.extend([target] * len(ids))
        self.patch_row.extend([-1] * len(ids))

    def add_patches(self, patches: np.ndarray, start: int, stop: int, empty_id: int, target: bool):
        """Groups for rows `start:stop` of `patches` (one patch array per document)."""
        if self.patches is not None and self.patches is not patches:
            raise ValueError("a document holds the patches of one record")
        self.patches = patches
        n = stop - start
        self.text.extend([empty_id] * n)
        self.target.extend([target] * n)
        self.patch_row.extend(range(start, stop))

    def add_groups(self, text: np.ndarray, rows: np.ndarray, patches: np.ndarray, target: bool):
        """Mixed groups at once: `rows[i]` is the patch row of group i, or -1 for text `text[i]`."""
        if self.patches is not None and self.patches is not patches:
            raise ValueError("a document holds the patches of one record")
        self.patches = patches
        self.text.extend(text.tolist())
        self.target.extend([target] * len(text))
        self.patch_row.extend(rows.tolist())

    def finish(self, empty_codes: np.ndarray) -> dict[str, np.ndarray]:
        n = len(self.text)
        codes = np.empty((n,) + empty_codes.shape, np.int16)
        codes[:] = empty_codes
        if self.patches is not None:
            rows = np.asarray(self.patch_row, np.int64)
            speech = rows >= 0
            codes[speech] = self.patches[rows[speech]]
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

    def _audio(self, doc: _Doc, patches: np.ndarray, target: bool):
        doc.add_text([self.tok.sosp_id], target)
        doc.add_patches(patches, 0, len(patches), self.tok.empty_id, target)
        doc.add_text([self.tok.eosp_id], target)

    def _stream(self, doc: _Doc, text: str, patches: np.ndarray, target: bool):
        """SPEC §2.2 streaming segment: the fixed 5:5 text-guided interleave."""
        ids = self.tok.encode(text) + [
            self.tok.eot_id
        ]  # <|eot|> joins the last chunk (it may have 6)
        t, p = len(ids), len(patches)
        nt, na = max(1, -(-(t - 1) // TEXT_CHUNK)), -(-p // AUDIO_CHUNK)
        k = max(nt, na)
        lengths = np.zeros((k, 2), np.int64)  # per round: text tokens, then patches
        lengths[:nt, 0] = TEXT_CHUNK
        lengths[nt - 1, 0] = t - TEXT_CHUNK * (nt - 1)
        if na:
            lengths[:na, 1] = AUDIO_CHUNK
            lengths[na - 1, 1] = p - AUDIO_CHUNK * (na - 1)
        is_patch = np.repeat(np.tile([False, True], k), lengths.reshape(-1))
        text_out = np.full(t + p, self.tok.empty_id, np.int32)
        text_out[~is_patch] = ids
        rows = np.full(t + p, -1, np.int64)
        rows[is_patch] = np.arange(p)
        doc.add_text([self.tok.sostm_id], target)
        doc.add_groups(text_out, rows, patches, target)
        doc.add_text([self.tok.eostm_id], target)

    def _pick(self, rec: Record, options: tuple[str, ...]) -> str:
        return options[zlib.crc32(rec.id.encode()) % len(options)]

    # ---- tasks ----------------------------------------------------------------------------------
    def continuation(self, rec: Record, doc: _Doc):
        self._audio(doc, self._patches(rec), True)

    def interleave(self, rec: Record, doc: _Doc):
        self._stream(doc, rec.text, self._patches(rec), True)

    def asr(self, rec: Record, doc: _Doc):
        self._understanding(rec, doc, self._pick(rec, prompts.ASR_TEMPLATES), rec.text)

    def caption(self, rec: Record, doc: _Doc):
        caption = rec.text if rec.task == "caption" else rec.meta.get("caption")
        if not caption:
            raise DocumentError(
                f"record {rec.id}: task caption needs a caption (record text of a "
                f"caption record, or meta.caption)"
            )
        self._understanding(rec, doc, self._pick(rec, prompts.CAPTION_QUESTIONS), caption)

    def _understanding(self, rec: Record, doc: _Doc, question: str, answer: str):
        if not answer:
            raise DocumentError(
                f"record {rec.id}: task {rec.task or 'asr'} needs a text answer, the record text is empty"
            )
        doc.add_text(self._ids("<|im_start|>user\n"), False)
        self._audio(doc, self._patches(rec), False)
        doc.add_text(self._ids(question), False)
        doc.add_text(self._ids("<|im_end|>\n"), False)
        doc.add_text(self._ids("<|im_start|>assistant\n"), False)
        doc.add_text(self._ids(prompts.THINK_OFF), False)
        doc.add_text(self.tok.encode(answer), True)
        doc.add_text(self._ids("<|im_end|>\n"), True)

    def tts(self, rec: Record, doc: _Doc):
        text = self._need_text(rec)
        options = prompts.TTS_TEMPLATES_ZH if prompts.is_chinese(text) else prompts.TTS_TEMPLATES_EN
        doc.add_text(
            self.tok.encode(f"<|im_start|>user\n{self._pick(rec, options)}: {text}<|im_end|>\n"),
            False,
        )
        doc.add_text(self._ids("<|im_start|>assistant\n"), False)
        self._stream(doc, text, self._patches(rec), True)
        doc.add_text(self._ids("<|im_end|>\n"), True)

    def instruct_tts(self, rec: Record, doc: _Doc):
        text = self._need_text(rec)
        instruct = rec.meta.get("instruct")
        if not instruct:
            raise DocumentError(
                f"record {rec.id}: task instruct_tts needs meta.instruct (the style instruction)"
            )
        options = prompts.TTS_TEMPLATES_ZH if prompts.is_chinese(text) else prompts.TTS_TEMPLATES_EN
        doc.add_text(self._ids("<|im_start|>system\n"), False)
        doc.add_text(self._ids(prompts.INSTRUCT_TTS_SYSTEM), False)
        doc.add_text(self._ids("<|im_end|>\n"), False)
        doc.add_text(
            self.tok.encode(
                f"<|im_start|>user\n{self._pick(rec, options)}: {text}({instruct})<|im_end|>\n"
            ),
            False,
        )
        doc.add_text(self._ids("<|im_start|>assistant\n<think>\n"), False)
        doc.add_text(self._ids("\n</think>\n"), True)
        self._stream(doc, text, self._patches(rec), True)
        doc.add_text(self._ids("<|im_end|>\n"), True)

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
        fn: Callable | None = getattr(self, name, None) if name in TASKS else None
        if fn is None:
            raise DocumentError(
                f"record {rec.id}: unknown task {name!r}, expected one of {', '.join(TASKS)}"
            )
        doc = _Doc()
        fn(rec, doc)
        return doc.finish(self.empty_codes)


TASKS = ("continuation", "interleave", "asr", "tts", "caption", "instruct_tts", "text")


def delay_patch(patch: np.ndarray, delays, empty_ids) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced view of the patch decoder (SPEC §1.7): `patch [..., G, C]` (undelayed) ->
    `(delayed [..., G + max(delays), C], active [G + max(delays), C])` where step t holds, for each
    channel c active at t (`delays[c] <= t < delays[c] + G`), the code of frame `t - delays[c]`;
    inactive cells hold the channel's empty id."""
    patch = np.asarray(patch)
    g, c = patch.shape[-2:]
    steps = g + max(delays)
    out = np.broadcast_to(np.asarray(empty_ids, patch.dtype), patch.shape[:-2] + (steps, c)).copy()
    active = np.zeros((steps, c), bool)
    for ch, d in enumerate(delays):
        out[..., d : d + g, ch] = patch[..., :, ch]
        active[d : d + g, ch] = True
    return out, active
