"""Reconstruction quality of the tokenizer, as in the report's Table 1: every clip is encoded,
decoded from its first n codebooks (8 and all, by default) and compared with the original by

  mel_distance  the multi-scale mel L1 distance of `mel_loss` (the training loss's distance)
  stoi          STOI (pystoi, which resamples both signals to 10 kHz itself)
  pesq_wb       PESQ wide-band: both signals resampled to 16 kHz (soxr)
  pesq_nb       PESQ narrow-band: both signals resampled to 8 kHz (soxr)

Residual quantisation makes the first n codes of an encoding at all codebooks the encoding at n,
so each clip is encoded once. A metric that cannot score a clip (PESQ finds no speech, STOI no
frame above its silence threshold) is None for that clip, with a message; means run over the
clips that have a value.

Manifests are JSONL, as `python -m mimo_jax.evaluate asr` reads them: `audio`, a path relative to
the manifest's folder or absolute; optional `id`; other fields are ignored.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import librosa
import numpy as np
import pesq as pesq_lib
import pystoi

from mimo_jax.paths import read_jsonl
from mimo_jax.tokenizer.audio_tokenizer import Tokenizer
from mimo_jax.tokenizer.mel_loss import multiscale_mel_loss

METRICS = ("mel_distance", "stoi", "pesq_wb", "pesq_nb")
PESQ_RATES = {"pesq_wb": (16000, "wb"), "pesq_nb": (8000, "nb")}

Scores = dict[str, float | None]


@dataclasses.dataclass(frozen=True)
class Clip:
    line: int
    id: str
    audio: str  # the path, resolved against the manifest's folder


def error(line: int | None, clip_id: str | None, message: str) -> dict:
    return {"line": line, "id": clip_id, "error": message}


def _clip(line: int, obj: dict, base: Path) -> Clip:
    audio = obj.get("audio")
    if not isinstance(audio, str) or not audio:
        raise ValueError(f"audio: {audio!r} is not an audio file path")
    path = audio if "://" in audio or audio.startswith("/") else str(base / audio)
    return Clip(line, str(obj.get("id") or Path(audio).stem), path)


def read_manifest(path: str, errors: list[dict]) -> list[Clip]:
    """The manifest's clips; a bad line goes to `errors` as {"line", "id", "error"}.
    FileNotFoundError when the manifest itself cannot be read. Errors come in line order."""
    clips: list[Clip] = []
    bad: list[dict] = []
    for n, obj in read_jsonl(path, bad):
        try:
            clips.append(_clip(n, obj, Path(path).parent))
        except ValueError as e:
            bad.append(error(n, obj.get("id"), str(e)))
    errors += sorted(bad, key=lambda e: e["line"])
    return clips


def parse_codebooks(text: str, num_quantizers: int) -> list[int]:
    """`8,all` -> [8, num_quantizers]: sorted, unique, each in [1, num_quantizers]."""
    counts = set()
    for part in text.split(","):
        part = part.strip()
        n = num_quantizers if part == "all" else int(part) if part.isdigit() else 0
        if not 1 <= n <= num_quantizers:
            raise ValueError(
                f"codebooks {part!r}: expected 'all' or a count from 1 to {num_quantizers}"
            )
        counts.add(n)
    return sorted(counts)


def _aligned(reconstruction: np.ndarray, size: int) -> np.ndarray:
    """The decoder emits whole frames: cut (or zero-pad) to the original's length."""
    out = np.zeros(size, np.float32)
    out[: min(size, reconstruction.size)] = reconstruction[:size]
    return out


def _message(e: Exception) -> str:
    arg = e.args[0] if e.args else e
    return arg.decode() if isinstance(arg, bytes) else str(arg)  # pesq's messages are bytes


def _stoi(reference, reconstruction, rate: int, problems: list[str]) -> float | None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(pystoi.stoi(reference, reconstruction, rate))
    if caught:  # pystoi returns 1e-5 with a warning when no frame is above its silence threshold
        problems.append(f"stoi: {caught[0].message}")
        return None
    return value


def _pesq(reference, reconstruction, rate: int, metric: str, problems: list[str]):
    target, mode = PESQ_RATES[metric]
    ref, deg = (
        librosa.resample(x, orig_sr=rate, target_sr=target, res_type="soxr_hq")
        for x in (reference, reconstruction)
    )
    try:
        return float(pesq_lib.pesq(target, ref, deg, mode))
    except pesq_lib.PesqError as e:
        problems.append(f"{metric}: {_message(e)}")
        return None


def score(reference: np.ndarray, reconstruction: np.ndarray, rate: int, problems: list[str]):
    """{metric: value or None} of one reconstruction against its original (both mono at `rate`);
    why a metric is None goes to `problems`."""
    reference = np.asarray(reference, np.float32)
    reconstruction = _aligned(np.asarray(reconstruction, np.float32), reference.size)
    mel = multiscale_mel_loss(jnp.asarray(reference[None]), jnp.asarray(reconstruction[None]), rate)
    scores: Scores = {
        "mel_distance": float(mel),
        "stoi": _stoi(reference, reconstruction, rate, problems),
    }
    for metric in PESQ_RATES:
        scores[metric] = _pesq(reference, reconstruction, rate, metric, problems)
    return scores


def evaluate(
    tokenizer: Tokenizer, wavs: Sequence[np.ndarray], codebooks: Sequence[int]
) -> list[tuple[dict[int, Scores], list[str]]]:
    """Per clip (24 kHz mono float32): ({codebook count: scores}, problems)."""
    codes = tokenizer.encode(wavs, max(codebooks))
    decoded = {n: tokenizer.decode([c[:, :n] for c in codes]) for n in codebooks}
    rate = tokenizer.config.sampling_rate
    out = []
    for i, wav in enumerate(wavs):
        problems: list[str] = []
        scores = {}
        for n in codebooks:
            notes: list[str] = []
            scores[n] = score(wav, decoded[n][i], rate, notes)
            problems += [f"{n} codebooks: {note}" for note in notes]
        out.append((scores, problems))
    return out


def means(rows: Sequence[Scores]) -> dict:
    """{metric: mean over the rows where it is not None (None if none), "clips": len(rows)}."""
    out: dict = {}
    for metric in METRICS:
        values = [v for r in rows if (v := r[metric]) is not None and math.isfinite(v)]
        out[metric] = float(np.mean(values)) if values else None
    out["clips"] = len(rows)
    return out
