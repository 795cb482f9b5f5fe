"""Streaming decode: codes in, waveform out, chunk by chunk, for players that start before
generation ends.

Each stream keeps a window of recent code frames. On every push the window (at most
`left_context` frames of history plus the new chunk) is decoded whole, and the frames that are at
least `right_context` frames from its end and not yet emitted are emitted; the last
`right_context` frames wait for more context (the vocoder looks 10 mel frames ahead per layer).
This is the official streaming scheme (left 250, right 40 code frames). Several streams are
decoded together in one padded batch, each exactly as if alone.
"""

from typing import Sequence

import numpy as np

from mimo_jax.tokenizer.audio_io import check_codes
from mimo_jax.tokenizer.audio_tokenizer import Tokenizer


class StreamingDecoder:
    def __init__(
        self,
        tokenizer: Tokenizer,
        num_streams: int = 1,
        *,
        left_context: int = 250,
        right_context: int = 40,
    ):
        if left_context <= right_context:
            raise ValueError(
                f"left_context {left_context} must exceed right_context {right_context}"
            )
        self.tokenizer = tokenizer
        self.left = left_context
        self.right = right_context
        self.windows: list[np.ndarray | None] = [None] * num_streams
        self.emitted = [0] * num_streams  # frames of each window already emitted

    def push(self, chunks: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """New code frames [frames, n] per stream (None or empty: nothing new) -> the waveform
        that can be emitted now, per stream (possibly empty)."""
        if len(chunks) != len(self.windows):
            raise ValueError(f"{len(chunks)} chunks for {len(self.windows)} streams")
        ready = []
        for i, chunk in enumerate(chunks):
            if chunk is None or len(chunk) == 0:
                continue
            chunk = check_codes(chunk, f"stream {i} chunk", self.tokenizer.config.codebook_sizes)
            window = self.windows[i]
            if window is not None and window.shape[1] != chunk.shape[1]:
                raise ValueError(
                    f"stream {i}: chunk has {chunk.shape[1]} codebooks, earlier "
                    f"chunks had {window.shape[1]}"
                )
            window = chunk if window is None else np.concatenate([window, chunk])
            self.windows[i] = window
            if len(window) > self.right:
                ready.append(i)
        out = self._emit(ready, final=False)
        for i in ready:
            window = self._window(i)
            total = len(window)
            if total > self.left:  # keep only the left context for the next push
                self.windows[i] = window[total - self.left :]
                self.emitted[i] -= total - self.left
        return out

    def _window(self, i: int) -> np.ndarray:
        """Stream i's window, where the caller knows it holds frames."""
        window = self.windows[i]
        assert window is not None, f"stream {i} has no frames"
        return window

    def finish(self, streams: Sequence[int] | None = None) -> list[np.ndarray]:
        """The rest of the given streams (default: all), which are then empty again; the others'
        entries are empty."""
        streams = range(len(self.windows)) if streams is None else streams
        live = [i for i in streams if self.windows[i] is not None]
        out = self._emit(live, final=True)
        for i in streams:
            self.windows[i], self.emitted[i] = None, 0
        return out

    def _emit(self, streams: list[int], final: bool) -> list[np.ndarray]:
        spc = self.tokenizer.config.samples_per_code
        out = [np.zeros(0, np.float32) for _ in self.windows]
        windows = {i: self._window(i) for i in streams}
        by_width: dict[int, list[int]] = {}
        for i in streams:
            by_width.setdefault(windows[i].shape[1], []).append(i)
        for group in by_width.values():
            wavs = self.tokenizer.decode_windows([windows[i] for i in group])
            for i, wav in zip(group, wavs):
                end = len(windows[i]) if final else len(windows[i]) - self.right
                out[i] = wav[self.emitted[i] * spc : end * spc]
                self.emitted[i] = end
        return out
