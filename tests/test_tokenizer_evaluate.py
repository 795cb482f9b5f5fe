"""`python -m mimo_jax.tokenizer evaluate` and its metrics, on synthetic clips and the fixture."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
from tokenizer_support import CHECKPOINT

from mimo_jax.tokenizer import reconstruction_quality
from mimo_jax.tokenizer.__main__ import main

RATE = 24000


def voiced(seconds: float, pitch: float, seed: int) -> np.ndarray:
    """A gliding harmonic tone in syllable-like bursts with a little noise: enough for PESQ to
    find speech in both bands (the narrow band starts at 300 Hz, above the pitch)."""
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * (pitch * t + 8 * np.sin(2 * np.pi * 2 * t))
    tone = sum(np.sin(k * phase) / k for k in range(1, 16))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.15 * tone * envelope + noise).astype(np.float32)


def test_the_original_scores_perfectly_and_a_noisy_copy_does_not():
    x = voiced(2.0, 200, 0)
    problems: list[str] = []
    same = reconstruction_quality.score(x, x, RATE, problems)
    assert problems == []
    assert same["mel_distance"] == 0.0
    assert same["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert same["pesq_wb"] >= 4.0 and same["pesq_nb"] >= 4.0
    noisy = x + 0.1 * np.random.default_rng(1).standard_normal(x.size).astype(np.float32)
    worse = reconstruction_quality.score(x, noisy, RATE, problems)
    assert problems == []
    assert worse["mel_distance"] > 0.01
    for metric in ("stoi", "pesq_wb", "pesq_nb"):
        assert worse[metric] < same[metric] - 0.05, metric


def test_a_clip_too_short_for_pesq_and_stoi_gets_none_and_messages():
    x = voiced(0.2, 200, 0)
    problems: list[str] = []
    scores = reconstruction_quality.score(x, x, RATE, problems)
    assert scores["mel_distance"] == 0.0
    assert scores["stoi"] is scores["pesq_wb"] is scores["pesq_nb"] is None
    assert [p.split(":")[0] for p in problems] == ["stoi", "pesq_wb", "pesq_nb"]
    assert "1/4 of a second" in problems[1]
    means = reconstruction_quality.means([scores, {**scores, "mel_distance": 1.0, "pesq_wb": 3.0}])
    assert means == {
        "mel_distance": 0.5,
        "stoi": None,
        "pesq_wb": 3.0,
        "pesq_nb": None,
        "clips": 2,
    }


def test_codebook_counts():
    assert reconstruction_quality.parse_codebooks("8,all", 20) == [8, 20]
    assert reconstruction_quality.parse_codebooks("all, 8,8,1", 20) == [1, 8, 20]
    for bad in ("0", "21", "x", "8,"):
        with pytest.raises(ValueError, match="expected 'all' or a count from 1 to 20"):
            reconstruction_quality.parse_codebooks(bad, 20)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Two good clips (a relative and an absolute path) and three bad lines."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "clips").mkdir()
    sf.write(root / "clips" / "a.wav", voiced(1.5, 180, 0), RATE)
    sf.write(root / "b.flac", voiced(1.2, 240, 1), RATE, format="FLAC")
    lines = [
        json.dumps({"audio": "clips/a.wav", "id": "a", "text": "ignored"}),
        json.dumps({"id": "no-audio"}),
        "not json",
        json.dumps({"audio": "clips/missing.wav"}),
        "",
        json.dumps({"audio": str(root / "b.flac")}),
    ]
    path = root / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(manifest, out, *extra):
    return main(
        ["evaluate", "--checkpoint", CHECKPOINT, "--manifest", str(manifest), "--out", str(out)]
        + list(extra)
    )


def test_the_command_scores_the_good_clips_and_reports_the_bad_lines(manifest, tmp_path, capsys):
    assert _run(manifest, tmp_path) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["codebooks"] == [8, 20] and report["num_quantizers"] == 20
    assert [(c["line"], c["id"]) for c in report["clips"]] == [(1, "a"), (6, "b")]
    for clip in report["clips"]:
        assert set(clip["scores"]) == {"8", "20"}
        for scores in clip["scores"].values():
            assert set(scores) == set(reconstruction_quality.METRICS)
            assert all(math.isfinite(v) for v in scores.values()), scores
        assert clip["scores"]["8"] != clip["scores"]["20"]  # decoded from different codes
    for n in ("8", "20"):
        mean = report["means"][n]
        assert mean["clips"] == 2
        want = np.mean([c["scores"][n]["stoi"] for c in report["clips"]])
        assert mean["stoi"] == pytest.approx(want)
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [2, 3, 4] and report["errors"] == 3
    assert "audio: None is not an audio file path" in errors[0]["error"]
    assert "not a JSON object" in errors[1]["error"]
    assert "missing.wav: no such file" in errors[2]["error"]
    out = capsys.readouterr()
    reported = [line for line in out.err.splitlines() if line.startswith("error: ")]
    assert len(reported) == 3 and "error: line 4 (missing): " in reported[2]
    table = out.out.strip().splitlines()
    assert table[0].split()[1:] == ["8", "codebooks", "20", "codebooks", "(all)"]
    assert [row.split()[0] for row in table[1:]] == [*reconstruction_quality.METRICS, "clips"]


def test_limit_and_codebooks(manifest, tmp_path):
    assert _run(manifest, tmp_path, "--limit", "1", "--codebooks", "4") == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["codebooks"] == [4] and [c["id"] for c in report["clips"]] == ["a"]
    # The manifest's bad lines are still reported; the missing file, past the limit, is not read.
    errors = (tmp_path / "errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["line"] for e in errors] == [2, 3]


def test_a_missing_manifest_or_bad_codebooks_is_one_line(manifest, tmp_path, capsys):
    assert _run(tmp_path / "nope.jsonl", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope.jsonl" in err[0]
    assert _run(manifest, tmp_path / "out", "--codebooks", "8,30") == 2
    assert "codebooks '30'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
