"""Shared helpers of the tokenizer tests: the fixture root (MIMO_FIXTURES), the converted fixture
model and its reference arrays, loaded once per session."""

import functools
import os

import numpy as np

from mimo_jax.tokenizer.audio_tokenizer import Tokenizer
from mimo_jax.tokenizer.tokenizer_checkpoint import load_tokenizer

FIXTURES = os.environ.get("MIMO_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures"))
CHECKPOINT = os.path.join(FIXTURES, "tokenizer")


@functools.lru_cache(maxsize=1)
def fixture_model():
    return load_tokenizer(CHECKPOINT)


@functools.lru_cache(maxsize=1)
def reference() -> dict[str, np.ndarray]:
    with np.load(os.path.join(CHECKPOINT, "reference.npz")) as f:
        return {k: f[k] for k in f.files}


def tokenizer(**options) -> Tokenizer:
    config, model = fixture_model()
    return Tokenizer(config, model, **options)


def clip_codes(i: int) -> np.ndarray:
    """The fixture codes of clip i, [frames, codebooks]."""
    ref = reference()
    lens = ref["code_lens"]
    start = int(lens[:i].sum())
    return ref["codes"][:, start : start + int(lens[i])].T


def clip_margins(i: int) -> np.ndarray:
    ref = reference()
    lens = ref["code_lens"]
    start = int(lens[:i].sum())
    return ref["code_margin"][:, start : start + int(lens[i])].T


def assert_codes_match(got: np.ndarray, i: int) -> None:
    """Codes must equal the fixture wherever the frame's margins are >= 1e-4 in every codebook up
    to that one (a near-tie may flip under float32 rounding, and then so may the rest)."""
    want = clip_codes(i)[:, : got.shape[1]]
    assert got.shape == want.shape, (got.shape, want.shape)
    decided = np.cumprod(clip_margins(i)[:, : got.shape[1]] >= 1e-4, axis=1).astype(bool)
    wrong = (got != want) & decided
    assert not wrong.any(), f"clip {i}: codes differ at (frame, codebook) {np.argwhere(wrong)[:10]}"
    assert decided.mean() > 0.9  # the check must cover most codes to mean anything


def padded(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-padded batch [batch, max_len, ...] and lengths."""
    lengths = np.array([len(a) for a in arrays])
    out = np.zeros((len(arrays), lengths.max()) + arrays[0].shape[1:], arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, lengths
