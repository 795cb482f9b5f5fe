"""Batched encoding and decoding of whole clips, for the command line and the data pipelines.

Encoding splits each clip's log-mel into segments of `segment_frames` frames (6000, as the official
code) and encodes every segment as if alone; segments of all clips are sorted by length and run in
padded batches whose shapes come from a small set of buckets, so that a corpus compiles a handful
of programs. Decoding splits codes into chunks of `decode_chunk` frames (1500, as the official
code) and concatenates their waveforms.

    encode_batch = load_encoder("path/to/MiMo-Audio-Tokenizer", codebooks=8)
    codes = encode_batch([wav_24k_mono_float32, ...])   # list of int32 [frames, 8]
"""

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from mimo_jax.tokenizer.audio_io import check_codes, check_waveform
from mimo_jax.tokenizer.config import TokenizerConfig
from mimo_jax.tokenizer.frontend import log_mel_frames, window_bounds
from mimo_jax.tokenizer.tokenizer_checkpoint import load_tokenizer


@dataclasses.dataclass(frozen=True)
class _Piece:
    item: int  # which input
    start: int  # first frame (mel frames when encoding, code frames when decoding)
    frames: int


def _bucket(frames: int, quantum: int, cap: int) -> int:
    return min(-(-frames // quantum) * quantum, max(cap, frames))


def _batches(pieces: list[_Piece], quantum: int, cap: int, batch_frames: int, max_batch: int):
    """Longest first; each batch shares one padded length and holds at most
    max(1, batch_frames // length) pieces (rounded down to a power of two)."""
    order = sorted(pieces, key=lambda p: -p.frames)
    i = 0
    while i < len(order):
        length = _bucket(order[i].frames, quantum, cap)
        size = max(1, min(max_batch, batch_frames // length))
        size = 1 << (size.bit_length() - 1)
        yield length, size, order[i : i + size]
        i += size


def _padded_size(count: int, size: int) -> int:
    """The smallest power of two >= count (at most size): few distinct batch shapes."""
    return min(size, 1 << max(0, count - 1).bit_length())


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _encode_segments(
    graphdef, state, wav, clip_lengths, wav_start, first_frame, frames, num_codebooks, seg_frames
):
    model = nnx.merge(graphdef, state)
    mel = log_mel_frames(model.config, wav, clip_lengths, wav_start, first_frame, frames)
    return model.encode_mel(mel, seg_frames, num_codebooks)


@functools.partial(jax.jit, static_argnums=(0,))
def _decode_chunks(graphdef, state, codes, lengths):
    return nnx.merge(graphdef, state).decode(codes, lengths)


class Tokenizer:
    """A loaded tokenizer with batched, bucketed encode and decode of numpy arrays."""

    def __init__(
        self,
        config: TokenizerConfig,
        model: nnx.Module,
        *,
        segment_frames: int = 6000,
        decode_chunk: int = 1500,
        batch_frames: int = 48000,
        max_batch: int = 64,
        frame_quantum: int = 256,
        code_quantum: int = 64,
    ):
        if segment_frames % config.mel_frames_per_code:
            raise ValueError(
                f"segment_frames {segment_frames} must be a multiple of "
                f"{config.mel_frames_per_code} mel frames per code"
            )
        self.config = config
        self.graphdef, self.state = nnx.split(model)
        self.segment_frames = segment_frames
        self.decode_chunk = decode_chunk
        self.batch_frames = batch_frames
        self.max_batch = max_batch
        self.frame_quantum = frame_quantum
        self.code_quantum = code_quantum

    @classmethod
    def load(cls, checkpoint: str, *, dtype=None, **options) -> "Tokenizer":
        config, model = load_tokenizer(checkpoint, dtype=dtype)
        return cls(config, model, **options)

    # Encoding.
    def encode(self, wavs: Sequence[np.ndarray], num_codebooks: int = 8) -> list[np.ndarray]:
        """24 kHz mono float waveforms -> codes int32 [frames, num_codebooks] each."""
        c = self.config
        wavs = [
            check_waveform(w, f"clip {i}", min_samples=c.min_samples, allow_silence=True)
            for i, w in enumerate(wavs)
        ]
        if not 1 <= num_codebooks <= c.num_quantizers:
            raise ValueError(
                f"num_codebooks {num_codebooks}: the tokenizer has {c.num_quantizers} codebooks"
            )
        pieces = []
        for i, wav in enumerate(wavs):
            total = c.mel_frames(wav.size)
            pieces += [
                _Piece(i, s, min(self.segment_frames, total - s))
                for s in range(0, total, self.segment_frames)
            ]
        results: dict[_Piece, np.ndarray] = {}
        for length, size, batch in _batches(
            pieces, self.frame_quantum, self.segment_frames, self.batch_frames, self.max_batch
        ):
            results.update(
                self._encode_batch(
                    wavs, batch, length, _padded_size(len(batch), size), num_codebooks
                )
            )
        return [
            np.concatenate([results[p] for p in pieces if p.item == i]) for i in range(len(wavs))
        ]

    def _encode_batch(self, wavs, batch, length, rows, num_codebooks):
        c = self.config
        _, width = window_bounds(c, 0, length)
        wav = np.zeros((rows, width), np.float32)
        clip_len = np.full(rows, c.min_samples, np.int32)
        wav_start = np.zeros(rows, np.int32)
        first = np.zeros(rows, np.int32)
        seg = np.ones(rows, np.int32)
        for r, p in enumerate(batch):
            clip = wavs[p.item]
            start, _ = window_bounds(c, p.start, length)
            lo, hi = max(start, 0), min(start + width, clip.size)
            wav[r, lo - start : hi - start] = clip[lo:hi]
            clip_len[r], wav_start[r], first[r], seg[r] = clip.size, start, p.start, p.frames
        codes, lengths = _encode_segments(
            self.graphdef, self.state, wav, clip_len, wav_start, first, length, num_codebooks, seg
        )
        codes, lengths = np.asarray(codes), np.asarray(lengths)
        return {p: codes[r, : lengths[r]] for r, p in enumerate(batch)}

    # Decoding.
    def decode(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """codes [frames, n] each (n <= num_quantizers) -> float32 waveforms of frames * 960."""
        codes = [
            check_codes(x, f"codes {i}", self.config.codebook_sizes) for i, x in enumerate(codes)
        ]
        by_width: dict[int, list[_Piece]] = {}
        for i, x in enumerate(codes):
            by_width.setdefault(x.shape[1], []).extend(
                _Piece(i, s, min(self.decode_chunk, x.shape[0] - s))
                for s in range(0, x.shape[0], self.decode_chunk)
            )
        results: dict[_Piece, np.ndarray] = {}
        spc = self.config.samples_per_code
        for width, pieces in by_width.items():
            for length, size, batch in _batches(
                pieces, self.code_quantum, self.decode_chunk, self.batch_frames // 4, self.max_batch
            ):
                rows = _padded_size(len(batch), size)
                array = np.zeros((rows, length, width), np.int32)
                lengths = np.ones(rows, np.int32)
                for r, p in enumerate(batch):
                    array[r, : p.frames] = codes[p.item][p.start : p.start + p.frames]
                    lengths[r] = p.frames
                wav, _ = _decode_chunks(self.graphdef, self.state, array, lengths)
                wav = np.asarray(wav)
                results.update({p: wav[r, : p.frames * spc] for r, p in enumerate(batch)})
        order = [p for w in by_width.values() for p in w]
        return [
            np.concatenate(
                [results[p] for p in sorted(order, key=lambda p: p.start) if p.item == i]
            )
            for i in range(len(codes))
        ]

    def decode_windows(self, codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Decode each [frames, n] array whole, in one padded batch (no chunking): the streaming
        decoder's context windows. Codes must already be checked."""
        width = codes[0].shape[1]
        length = _bucket(max(x.shape[0] for x in codes), self.code_quantum, 0)
        rows = _padded_size(len(codes), len(codes) * 2)
        array = np.zeros((rows, length, width), np.int32)
        lengths = np.ones(rows, np.int32)
        for r, x in enumerate(codes):
            array[r, : x.shape[0]] = x
            lengths[r] = x.shape[0]
        wav, wav_lengths = _decode_chunks(self.graphdef, self.state, array, lengths)
        wav, wav_lengths = np.asarray(wav), np.asarray(wav_lengths)
        return [wav[r, : wav_lengths[r]] for r in range(len(codes))]


def load_encoder(
    checkpoint_path: str, codebooks: int = 8, *, dtype=None, **options
) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """`encode_batch(wavs)`: float32 24 kHz mono waveforms -> int32 codes [frames, codebooks],
    batched by length inside."""
    tokenizer = Tokenizer.load(checkpoint_path, dtype=dtype, **options)
    return functools.partial(tokenizer.encode, num_codebooks=codebooks)


def load_decoder(
    checkpoint_path: str, *, dtype=None, **options
) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """`decode_batch(codes)`: int codes [frames, n] -> float32 24 kHz waveforms."""
    return Tokenizer.load(checkpoint_path, dtype=dtype, **options).decode
