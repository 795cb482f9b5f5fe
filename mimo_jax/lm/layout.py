"""The official token layout at the edges, and the internal one.

Official (conversion, prompts, fixtures): ids [batch, 1 + channels, groups * group_size]; row 0
holds a group's text token in its first column, rows 1.. the codes of its frames.
Internal: text [batch, groups] and codes [batch, groups, group_size, channels].
"""

import numpy as np


def from_official(ids, group_size: int):
    """ids [B, 1 + C, G * gs] -> (text [B, G], codes [B, G, gs, C])."""
    ids = np.asarray(ids)
    b, rows, width = ids.shape
    if width % group_size:
        raise ValueError(f"token matrix width {width} is not a multiple of group_size {group_size}")
    text = ids[:, 0, ::group_size]
    codes = (
        ids[:, 1:, :].reshape(b, rows - 1, width // group_size, group_size).transpose(0, 2, 3, 1)
    )
    return text, codes


def to_official(text, codes):
    """(text [B, G], codes [B, G, gs, C]) -> ids [B, 1 + C, G * gs], text repeated over the
    group."""
    text, codes = np.asarray(text), np.asarray(codes)
    b, g, gs, c = codes.shape
    rows = np.concatenate([np.repeat(text[:, :, None, None], gs, axis=2), codes], axis=-1)
    return rows.reshape(b, g * gs, c + 1).transpose(0, 2, 1)


def empty_patch(empty_ids, group_size: int) -> np.ndarray:
    """The codes of a text group: every frame holds each channel's empty id. [gs, C]"""
    return np.broadcast_to(np.asarray(empty_ids, np.int32), (group_size, len(empty_ids))).copy()
