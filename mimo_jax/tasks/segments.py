"""Prompt segments (the official `InputSegment`) and their assembly into groups, for training and
inference alike.

A prompt is a list of segments; assembled, it is one group (LLM position) per text token or patch:
  text   int32 [L]                       the text id; `<|empty|>` for a speech group
  codes  int32 [L, group_size, channels] a speech group's frames; a text group holds every
                                         channel's empty id
`input_ids` turns that into the official layout [1 + channels, L * group_size] (`get_input_ids`).

Segments:
  Text(s)            the ids of `s` (special-token strings inside it become single ids)
  Audio(patches)     `<|sosp|>`, one `<|empty|>` group per patch, `<|eosp|>` (either marker may be
                     left out: a speech continuation prompt has no `<|eosp|>`)
  Stream(s, patches) the fixed 5:5 text-guided interleave `<|sostm|>` 5 tokens, 5 patches, ...,
                     last tokens + `<|eot|>`, remaining patches (or tokens), `<|eostm|>`
"""

from __future__ import annotations

import dataclasses

import numpy as np

TEXT_CHUNK = 5  # text tokens per interleave chunk
AUDIO_CHUNK = 5  # patches per interleave chunk
IGNORE = -100  # the official text row in the columns after a group's first


def patchify(frames: np.ndarray, group_size: int, channels: int) -> np.ndarray:
    """`[T, >=channels]` codes -> `[ceil(T / group_size), group_size, channels]`, the last patch
    completed by repeating the last frame (as the official front end does)."""
    frames = np.asarray(frames)[:, :channels]
    t = frames.shape[0]
    pad = -t % group_size
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    return frames.reshape(-1, group_size, channels)


@dataclasses.dataclass(frozen=True)
class Text:
    text: str


@dataclasses.dataclass(frozen=True, eq=False)
class Audio:
    patches: np.ndarray  # [P, group_size, channels]
    open: bool = True  # starts with <|sosp|>
    close: bool = True  # ends with <|eosp|>


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
    text: str
    patches: np.ndarray  # [P, group_size, channels]


Segment = Text | Audio | Stream


def stream_order(num_ids: int, num_patches: int) -> np.ndarray:
    """Which groups of a stream body (between `<|sostm|>` and `<|eostm|>`) are patches, for
    `num_ids` text ids (`<|eot|>` included, it joins the last chunk) and `num_patches` patches.

    Text chunk i and patch chunk i alternate while both exist, then the rest of the longer one."""
    nt = max(1, -(-(num_ids - 1) // TEXT_CHUNK))
    na = -(-num_patches // AUDIO_CHUNK)
    k = max(nt, na)
    lengths = np.zeros((k, 2), np.int64)  # per round: text tokens, then patches
    lengths[:nt, 0] = TEXT_CHUNK
    lengths[nt - 1, 0] = num_ids - TEXT_CHUNK * (nt - 1)
    if na:
        lengths[:na, 1] = AUDIO_CHUNK
        lengths[na - 1, 1] = num_patches - AUDIO_CHUNK * (na - 1)
    return np.repeat(np.tile([False, True], k), lengths.reshape(-1))


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: np.ndarray  # int32 [L]
    codes: np.ndarray  # int32 [L, group_size, channels]

    @property
    def groups(self) -> int:
        return int(self.text.shape[0])

    def input_ids(self) -> np.ndarray:
        """The official layout [1 + channels, L * group_size]: row 0 the text id in each group's
        first column and -100 in the others, rows 1.. the codes (the official layout)."""
        length, gs, ch = self.codes.shape
        text = np.full((length, gs), IGNORE, np.int64)
        text[:, 0] = self.text
        return np.concatenate(
            [text.reshape(1, -1), self.codes.reshape(length * gs, ch).T.astype(np.int64)]
        )

    def __add__(self, other: "Prompt") -> "Prompt":
        return Prompt(
            np.concatenate([self.text, other.text]), np.concatenate([self.codes, other.codes])
        )


def assemble(segments, tok, group_size: int, empty_ids) -> Prompt:
    """Segments -> one Prompt; `tok` a TextTokenizer, `empty_ids` each channel's empty code."""
    empty_ids = np.asarray(empty_ids, np.int32)
    text: list[np.ndarray] = []
    codes: list[np.ndarray] = []

    def add(ids, patches=None, rows=None):
        ids = np.asarray(ids, np.int32)
        block = np.empty((ids.size, group_size, empty_ids.size), np.int32)
        block[:] = empty_ids
        if patches is not None:
            _check_patches(patches, group_size, empty_ids.size)
            block[rows >= 0] = patches[rows[rows >= 0]]
        text.append(ids)
        codes.append(block)

    for seg in segments:
        if isinstance(seg, Text):
            add(tok.encode(seg.text))
        elif isinstance(seg, Audio):
            n = len(seg.patches)
            add([tok.sosp_id] * seg.open)
            add(np.full(n, tok.empty_id), seg.patches, np.arange(n))
            add([tok.eosp_id] * seg.close)
        elif isinstance(seg, Stream):
            ids, rows = stream_groups(
                tok.encode(seg.text) + [tok.eot_id], len(seg.patches), tok.empty_id
            )
            add([tok.sostm_id])
            add(ids, seg.patches, rows)
            add([tok.eostm_id])
        else:
            raise TypeError(f"prompt segment {seg!r}: expected Text, Audio or Stream")
    return Prompt(np.concatenate(text), np.concatenate(codes))


def stream_groups(ids, num_patches: int, empty_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The body of a stream: (text id per group, patch row per group or -1 for a text group)."""
    ids = list(ids)
    is_patch = stream_order(len(ids), num_patches)
    text = np.full(is_patch.size, empty_id, np.int32)
    text[~is_patch] = ids
    rows = np.full(is_patch.size, -1, np.int64)
    rows[is_patch] = np.arange(num_patches)
    return text, rows


def _check_patches(patches, group_size: int, channels: int) -> None:
    shape = np.shape(patches)
    if shape[1:] != (group_size, channels):
        raise ValueError(
            f"audio patches of shape {shape}: expected [patches, {group_size}, {channels}]"
        )


def audio_inputs(segments) -> list:
    """The audio of every Audio and Stream segment, in order of appearance."""
    return [s.patches for s in segments if isinstance(s, (Audio, Stream))]


def with_audio(segments, patches) -> list:
    """The segments with their audio, in order of appearance, replaced by `patches`."""
    patches = iter(patches)
    return [
        dataclasses.replace(s, patches=next(patches)) if isinstance(s, (Audio, Stream)) else s
        for s in segments
    ]
