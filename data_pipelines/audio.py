"""Audio input for tokenization: any soundfile-readable file (local or gs://) -> 24 kHz mono float32."""

from __future__ import annotations

import io

import librosa
import numpy as np
import soundfile
from etils import epath

SAMPLE_RATE = 24000
HOP = 240  # mel hop: 100 mel frames per second


def code_frames(num_samples: int) -> int:
    """25 Hz code frames the tokenizer encoder yields for `num_samples` at 24 kHz (SPEC §3.9)."""
    mel = num_samples // HOP + 1
    return -(-((mel - 1) // 2 + 1) // 2)


def _read_bytes(path: str) -> bytes:
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: file not found")
    return p.read_bytes()


def audio_seconds(path: str) -> float:
    """Duration from the file header (no decoding); raises on a missing or unreadable file."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: file not found")
    # libsndfile seeks through cffi callbacks that gcsfs files do not satisfy: read remote files
    # whole (clips are small), open local ones.
    with p.open("rb") if "://" not in path else io.BytesIO(p.read_bytes()) as f:
        info = soundfile.info(f)
    if info.frames <= 0:
        raise ValueError(f"{path}: no samples")
    return info.frames / info.samplerate


def load_audio(path: str) -> np.ndarray:
    """Decodes, averages channels, resamples to 24 kHz (soxr); raises on bad audio."""
    data, sr = soundfile.read(io.BytesIO(_read_bytes(path)), dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError(f"{path}: no samples")
    wav = data.mean(axis=1)
    if not np.all(np.isfinite(wav)):
        raise ValueError(f"{path}: non-finite samples")
    if sr != SAMPLE_RATE:
        wav = librosa.resample(wav, orig_sr=sr, target_sr=SAMPLE_RATE)
    return np.ascontiguousarray(wav, np.float32)
