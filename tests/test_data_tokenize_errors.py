"""One bad manifest line never costs the good lines of its shard: a clip below the encoder's
minimum, a line that is not UTF-8, a line that is not JSON, a missing file each become one entry
of errors.jsonl (line number and reason) and the job goes on."""

import json
import os

import numpy as np
import pytest
import soundfile

from data_pipelines import tokenize
from data_pipelines.encoders import EnergyEncoder, load_encoder
from data_pipelines.shards import ShardSet
from mimo_jax.tokenizer import audio_io
from mimo_jax.tokenizer.config import TokenizerConfig

AUDIO = TokenizerConfig()  # the released tokenizer's rate and frame rate, as EnergyEncoder's

FIXTURE_TOKENIZER = os.path.join(
    os.environ.get("MIMO_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures")),
    "tokenizer",
)


def _wav(path, seconds, seed=0):
    rng = np.random.default_rng(seed)
    samples = max(1, int(seconds * AUDIO.sampling_rate))
    soundfile.write(
        path, 0.1 * rng.standard_normal(samples).astype(np.float32), AUDIO.sampling_rate
    )
    return path


def _args(manifest, out, per_shard, *extra):
    return tokenize.parse_args(
        [
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--records-per-shard",
            str(per_shard),
            "--process-index",
            "0",
            "--process-count",
            "1",
            *extra,
        ]
    )


def _errors(out):
    return [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]


def _line(name, **kw):
    return json.dumps({"audio": name, **kw}).encode()


def test_bad_lines_are_reported_and_their_shard_keeps_its_good_lines(tmp_path):
    for i in range(4):
        _wav(tmp_path / f"good{i}.wav", 0.5 + 0.1 * i, seed=i)
    lines = [
        _line("good0.wav"),
        b'{"audio": "caf\xe9.wav"}',  # Latin-1, not UTF-8
        _line("good1.wav"),
        b'{"audio": "good2.wav", "text": }',
        _line("good2.wav"),
        _line("missing.wav"),
        _line("good3.wav"),
    ]
    manifest = tmp_path / "corpus.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    # One shard holds every line: the bad ones must not cost the good ones.
    assert tokenize.run(_args(manifest, out, 16, "--encoder", "energy")) == 0
    errors = _errors(out)
    assert [e["line"] for e in errors] == [2, 4, 6]
    assert errors[0]["reason"] == (
        "not UTF-8: byte 0xe9 at column 15 (invalid continuation byte); expected UTF-8 JSON"
    )
    assert errors[1]["reason"] == "not JSON: Expecting value at column 32"
    assert errors[2]["reason"].endswith("missing.wav: no such file") and errors[2][
        "audio"
    ].endswith("missing.wav")
    recs = {r.id: r for r in ShardSet(str(out))}
    assert sorted(recs) == ["good0", "good1", "good2", "good3"]
    wav = audio_io.read_audio(
        str(tmp_path / "good3.wav"), AUDIO.sampling_rate, min_samples=AUDIO.min_samples
    )
    np.testing.assert_array_equal(recs["good3"].codes, EnergyEncoder(8)([wav])[0])
    manifest_json = json.loads((out / "manifest.json").read_text())
    assert (manifest_json["records"], manifest_json["errors"], manifest_json["lines"]) == (4, 3, 7)
    # A rerun finds the shard done (the checksum of the raw lines, the bad bytes included).
    assert (
        tokenize.run(
            _args(manifest, out, 16, "--encoder", "energy"),
            encode=lambda ws: pytest.fail("a finished shard was encoded again"),
        )
        == 0
    )


def test_clip_below_the_encoder_minimum_is_one_error(tmp_path):
    pytest.importorskip("mimo_jax.tokenizer", reason="the JAX audio tokenizer is not in this tree")
    from mimo_jax.model_checkpoint import read_config

    _, config = read_config(FIXTURE_TOKENIZER)
    short = config.min_samples - 1  # at 24 kHz: no resampling changes its length
    _wav(tmp_path / "a.wav", 0.4, seed=1)
    _wav(tmp_path / "b.wav", 0.3, seed=2)
    soundfile.write(tmp_path / "short.wav", np.full(short, 0.1, np.float32), config.sampling_rate)
    manifest = tmp_path / "corpus.jsonl"
    manifest.write_bytes(b"\n".join([_line("a.wav"), _line("short.wav"), _line("b.wav")]) + b"\n")
    out = tmp_path / "out"
    assert tokenize.run(_args(manifest, out, 8, "--checkpoint", FIXTURE_TOKENIZER)) == 0
    (error,) = _errors(out)
    assert error["line"] == 2 and error["audio"].endswith("short.wav")
    assert error["reason"] == (
        f"bad audio: {tmp_path / 'short.wav'}: too short for one frame ({short} samples at "
        f"{config.sampling_rate} Hz give {short} at {config.sampling_rate} Hz; at least "
        f"{config.min_samples} are needed)"
    )
    recs = {r.id: r for r in ShardSet(str(out))}
    assert sorted(recs) == ["a", "b"]
    assert all(
        r.frames == config.clip_code_frames(int(round(r.duration * 24000))) for r in recs.values()
    )


def test_a_clip_the_encoder_refuses_is_one_error(tmp_path):
    class Picky(EnergyEncoder):  # refuses any batch holding a clip under 0.35 s
        def __call__(self, wavs):
            if any(len(w) < 0.35 * AUDIO.sampling_rate for w in wavs):
                raise ValueError("clip under 0.35 s")
            return super().__call__(wavs)

    for name, seconds in (("a", 0.5), ("b", 0.3), ("c", 0.4)):
        _wav(tmp_path / f"{name}.wav", seconds)
    manifest = tmp_path / "corpus.jsonl"
    manifest.write_bytes(b"\n".join([_line("a.wav"), _line("b.wav"), _line("c.wav")]) + b"\n")
    out = tmp_path / "out"
    assert tokenize.run(_args(manifest, out, 8), encode=Picky(8)) == 0
    (error,) = _errors(out)
    samples = int(0.3 * AUDIO.sampling_rate)
    assert error == {
        "line": 2,
        "audio": str(tmp_path / "b.wav"),
        "reason": f"refused by the encoder ({samples} samples at 24000 Hz): clip under 0.35 s",
    }
    assert sorted(r.id for r in ShardSet(str(out))) == ["a", "c"]


def test_the_mimo_encoder_without_a_checkpoint_says_so():
    with pytest.raises(ValueError, match=r"encoder 'mimo': expected an audio tokenizer checkpoint"):
        load_encoder("mimo", None, 8)
