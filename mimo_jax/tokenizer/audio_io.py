"""Reading audio and code files, with one error per bad input that names it: the one audio reader
of the project (the tokenizer's command line, the tokenize job of the data pipelines, task prompts).

Audio of any sample rate and channel count in any format soundfile reads, local or on gs://, becomes
float32 mono at the tokenizer's rate (channels averaged, resampled with soxr through librosa).
Every problem raises `InputError` with the file and what is wrong, so that a batch job can report
it and go on.
"""

import io
import os
import re

import librosa
import numpy as np
import soundfile as sf
from etils import epath

# libsndfile's log of a WAV/AIFF whose data chunk is cut short: "data : 96000 (should be 47978)".
_TRUNCATED = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class InputError(ValueError):
    """A bad audio or codes input; the message names the input and the problem."""


def check_waveform(
    wav: np.ndarray, name: str, *, min_samples: int, allow_silence: bool = False
) -> np.ndarray:
    """A 1-D finite float32 waveform long enough for one frame, or InputError naming `name`."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise InputError(f"{name}: waveform has shape {wav.shape}, expected [samples] (mono)")
    if not np.issubdtype(wav.dtype, np.floating):
        raise InputError(f"{name}: waveform has dtype {wav.dtype}, expected float")
    if wav.size == 0:
        raise InputError(f"{name}: no audio samples (empty)")
    bad = ~np.isfinite(wav)
    if bad.any():
        raise InputError(
            f"{name}: {int(bad.sum())} NaN or infinite samples (first at sample "
            f"{int(np.argmax(bad))})"
        )
    if wav.size < min_samples:
        raise InputError(
            f"{name}: {wav.size} samples is too short for one frame "
            f"(at least {min_samples} samples are needed)"
        )
    if not allow_silence and not np.any(wav):
        raise InputError(f"{name}: silent (every sample is zero)")
    return wav.astype(np.float32)


def _source(path: str):
    """A local path as it is; a remote file read whole into memory (libsndfile seeks through cffi
    callbacks that gcsfs files do not satisfy, and clips are small)."""
    p = epath.Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file")
    if p.is_dir():
        raise InputError(f"{path}: is a directory, not an audio file")
    return io.BytesIO(p.read_bytes()) if "://" in str(path) else os.fspath(path)


def audio_seconds(path: str) -> float:
    """The duration from the file's header, without decoding; InputError naming a bad file."""
    try:
        info = sf.info(_source(path))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise InputError(f"{path}: cannot read audio ({e})") from None
    if info.frames <= 0:
        raise InputError(f"{path}: no audio samples (empty)")
    return info.frames / info.samplerate


def read_audio(
    path: str, sampling_rate: int, *, min_samples: int, allow_silence: bool = False, resample=None
) -> np.ndarray:
    """The file (local or gs://) as float32 mono at `sampling_rate`, or InputError naming it.

    `resample(wav, rate)` -> wav at `sampling_rate` replaces the default resampler (soxr)."""
    source = _source(path)
    try:
        with sf.SoundFile(source) as f:
            short = _TRUNCATED.search(f.extra_info)
            data = f.read(dtype="float32", always_2d=True)
            rate = f.samplerate
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise InputError(f"{path}: cannot read audio ({e})") from None
    if short and int(short.group(2)) < int(short.group(1)):
        raise InputError(
            f"{path}: truncated (its header announces {short.group(1)} bytes of "
            f"audio data, the file holds {short.group(2)})"
        )
    if data.shape[0] == 0:
        raise InputError(f"{path}: no audio samples (empty)")
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputError(
            f"{path}: {int(bad.sum())} NaN or infinite samples (first at frame "
            f"{int(np.argmax(bad.any(axis=1)))})"
        )
    wav = data.mean(axis=1)
    if rate != sampling_rate and resample is not None:
        wav = resample(wav, rate)
    elif rate != sampling_rate:
        wav = librosa.resample(wav, orig_sr=rate, target_sr=sampling_rate, res_type="soxr_hq")
    if wav.size < min_samples:
        raise InputError(
            f"{path}: too short for one frame ({data.shape[0]} samples at {rate} Hz "
            f"give {wav.size} at {sampling_rate} Hz; at least {min_samples} "
            f"are needed)"
        )
    if not allow_silence and not np.any(data):
        raise InputError(f"{path}: silent (every sample is zero)")
    return wav.astype(np.float32)


def check_codes(codes: np.ndarray, name: str, codebook_sizes: tuple[int, ...]) -> np.ndarray:
    """Codes [frames, codebooks] of integers inside each codebook, or InputError naming `name`."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise InputError(f"{name}: codes have shape {codes.shape}, expected [frames, codebooks]")
    frames, books = codes.shape
    if not 1 <= books <= len(codebook_sizes):
        raise InputError(
            f"{name}: codes have {books} codebooks, expected 1 to "
            f"{len(codebook_sizes)} (shape {codes.shape} is [frames, codebooks])"
        )
    if frames == 0:
        raise InputError(f"{name}: no code frames (empty)")
    if not np.issubdtype(codes.dtype, np.integer):
        raise InputError(f"{name}: codes have dtype {codes.dtype}, expected integers")
    for q in range(books):
        column = codes[:, q]
        outside = (column < 0) | (column >= codebook_sizes[q])
        if outside.any():
            t = int(np.argmax(outside))
            raise InputError(
                f"{name}: codebook {q} has {int(outside.sum())} codes outside "
                f"[0, {codebook_sizes[q]}) (first: {int(column[t])} at frame {t})"
            )
    return codes.astype(np.int32)


def read_codes(path: str, codebook_sizes: tuple[int, ...]) -> np.ndarray:
    """A .npy file of codes [frames, codebooks], checked, or InputError naming the file."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    try:
        codes = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read codes ({e})") from None
    return check_codes(codes, path, codebook_sizes)


def wav_bytes(wav: np.ndarray, sampling_rate: int, subtype: str = "FLOAT") -> bytes:
    """The WAV file `write_audio` writes, in memory (for a file written whole elsewhere)."""
    out = io.BytesIO()
    sf.write(out, np.asarray(wav, np.float32), sampling_rate, subtype=subtype, format="WAV")
    return out.getvalue()


def write_audio(path: str, wav: np.ndarray, sampling_rate: int, subtype: str = "FLOAT") -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, np.asarray(wav, np.float32), sampling_rate, subtype=subtype)
