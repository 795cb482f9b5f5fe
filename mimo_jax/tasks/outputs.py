"""Generated ids -> text and speech as the official `forward` returns them.

`text` and `codes` are the generated groups only (prompt excluded), the stop group included: the
official code drops the last generated group, whatever ended the generation.
"""

from __future__ import annotations

import numpy as np

REMOVED = ("<|empty|>", "<|eot|>", "<|eostm|>")  # in this order, after strip()


def text_of(tok, text: np.ndarray) -> str:
    """The text channel of the generated groups, decoded as the official `forward` does."""
    out = tok.decode(np.asarray(text)[:-1].tolist()).strip()
    for token in REMOVED:
        out = out.replace(token, "")
    return out


def speech_of(
    text: np.ndarray,
    codes: np.ndarray,
    empty_ids,
    start_id: int | None,
    end_id: int,
    *,
    complete: bool = True,
) -> np.ndarray:
    """The speech frames [F, channels] of the generated groups: those between the first
    `start_id` (exclusive; the beginning if absent or None) and the first `end_id` (exclusive; the
    end if absent) whose channel-0 code is not its empty id.

    `complete=False`: the groups are the beginning of a generation that goes on (streaming). None
    is dropped as the last, and only frames sure to be in the final result are returned: none
    while a `start_id` is awaited (if it never comes, the result starts at the beginning)."""
    text = np.asarray(text)[:-1] if complete else np.asarray(text)
    codes = np.asarray(codes)[: text.size]
    starts: np.ndarray | list[int] = []
    if start_id is not None:
        starts = np.flatnonzero(text == start_id)
    if not complete and start_id is not None and not len(starts):
        return codes[:0].reshape(0, codes.shape[-1])
    ends = np.flatnonzero(text == end_id)
    start = int(starts[0]) + 1 if len(starts) else 0
    end = int(ends[0]) if len(ends) else text.size
    frames = codes[start:end].reshape(-1, codes.shape[-1])
    frames = frames[frames[:, 0] != empty_ids[0]]
    bad = frames >= np.asarray(empty_ids)
    if bad.any():
        f, c = np.argwhere(bad)[0]
        raise ValueError(
            f"generated speech frame {f} holds {frames[f, c]} in channel {c}, at or "
            f"above its empty id {empty_ids[c]}"
        )
    return frames


def wav_of(tokenizer, frames: np.ndarray) -> np.ndarray:
    """Frames [F, channels] -> the 24 kHz waveform, decoded in chunks of 1500 frames (the audio
    tokenizer's `decode_chunk`); 1 s of zeros when there is no speech, as the official code."""
    if frames.shape[0] == 0:
        return np.zeros(tokenizer.config.sampling_rate, np.float32)
    return tokenizer.decode([frames])[0]
