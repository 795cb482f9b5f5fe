"""The command line on generated speech (eSpeak NG, 22.05 kHz stereo) and on bad inputs."""

import os
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile as sf
from tokenizer_support import CHECKPOINT, fixture_model, tokenizer

from data_pipelines.espeak import synthesize
from mimo_jax.tokenizer.__main__ import main
from mimo_jax.tokenizer.audio_io import read_audio


@pytest.fixture(scope="module")
def speech_files(tmp_path_factory):
    """Two stereo 22.05 kHz utterances (WAV and FLAC) and a set of bad inputs."""
    root = tmp_path_factory.mktemp("audio")
    good = {}
    for name, text, voice, fmt in [
        ("hello", "Hello, this is a tokenizer test.", "en", "WAV"),
        ("bonjour", "Bonjour, voici un essai.", "fr", "FLAC"),
    ]:
        wav, rate = synthesize(text, voice)
        stereo = np.stack([wav, 0.6 * wav], axis=1)
        path = root / f"{name}.{fmt.lower()}"
        sf.write(path, stereo, rate, format=fmt)
        good[name] = (str(path), stereo, rate)
    bad = {}
    sf.write(root / "empty.wav", np.zeros((0, 2), np.float32), 22050)
    bad["empty"] = (root / "empty.wav", "no audio samples")
    sf.write(root / "silence.wav", np.zeros(22050, np.float32), 22050)
    bad["silence"] = (root / "silence.wav", "silent")
    noisy = np.full(4000, 0.1, np.float32)
    noisy[1234] = np.nan
    sf.write(root / "nan.wav", noisy, 22050, subtype="FLOAT")
    bad["nan"] = (root / "nan.wav", "1 NaN or infinite samples (first at frame 1234)")
    whole = open(good["hello"][0], "rb").read()
    (root / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    bad["truncated"] = (root / "truncated.wav", "truncated")
    (root / "garbage.wav").write_bytes(b"this is not audio" * 10)
    bad["garbage"] = (root / "garbage.wav", "cannot read audio")
    sf.write(root / "short.wav", np.full(300, 0.1, np.float32), 22050)
    bad["short"] = (root / "short.wav", "too short for one frame")
    bad["missing"] = (root / "missing.wav", "no such file")
    return good, {k: (str(p), m) for k, (p, m) in bad.items()}


def test_read_audio_averages_channels_and_resamples(speech_files):
    good, _ = speech_files
    path, stereo, rate = good["hello"]
    got = read_audio(path, 24000, min_samples=481)
    pcm = sf.read(path, dtype="float32")[0].mean(axis=1)
    want = librosa.resample(pcm, orig_sr=rate, target_sr=24000, res_type="soxr_hq")
    np.testing.assert_array_equal(got, want.astype(np.float32))
    assert abs(len(got) - len(stereo) * 24000 / rate) <= 1


def test_encode_reports_bad_files_and_encodes_the_others(speech_files, tmp_path, capsys):
    good, bad = speech_files
    inputs = [good["hello"][0], *(p for p, _ in bad.values()), good["bonjour"][0]]
    status = main(["encode", "--checkpoint", CHECKPOINT, *inputs, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 1
    for path, problem in bad.values():
        assert any(path in line and problem in line for line in err.splitlines()), (path, err)
    assert f"{len(bad)} of {len(inputs)} files failed" in err
    config, _ = fixture_model()
    tok = tokenizer()
    for name in ("hello", "bonjour"):
        codes = np.load(tmp_path / f"{name}.npy")
        wav = read_audio(good[name][0], 24000, min_samples=481)
        assert codes.shape == (config.code_frames(config.mel_frames(wav.size)), 8)
        np.testing.assert_array_equal(codes, tok.encode([wav], num_codebooks=8)[0])
    assert sorted(os.listdir(tmp_path)) == ["bonjour.npy", "hello.npy"]


def test_decode_writes_24khz_audio_and_rejects_bad_codes(speech_files, tmp_path, capsys):
    good, _ = speech_files
    wav = read_audio(good["hello"][0], 24000, min_samples=481)
    codes = tokenizer().encode([wav], num_codebooks=8)[0]
    np.save(tmp_path / "hello.npy", codes)
    assert (
        main(
            [
                "decode",
                "--checkpoint",
                CHECKPOINT,
                str(tmp_path / "hello.npy"),
                "--out",
                str(tmp_path / "hello.wav"),
            ]
        )
        == 0
    )
    audio, rate = sf.read(tmp_path / "hello.wav", dtype="float32")
    assert rate == 24000 and audio.shape == (len(codes) * 960,)
    np.testing.assert_allclose(audio, tokenizer().decode([codes])[0], rtol=0, atol=1e-6)

    outside = codes.copy()
    outside[3, 2] = 128  # codebook 2 holds 128 entries
    np.save(tmp_path / "outside.npy", outside)
    np.save(tmp_path / "wide.npy", np.zeros((10, 21), np.int64))
    np.save(tmp_path / "flat.npy", codes[:, 0])
    status = main(
        [
            "decode",
            "--checkpoint",
            CHECKPOINT,
            *(str(tmp_path / f"{n}.npy") for n in ("outside", "wide", "flat", "absent")),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert status == 1
    assert "outside.npy: codebook 2 has 1 codes outside [0, 128) (first: 128 at frame 3)" in err
    assert "wide.npy: codes have 21 codebooks, expected 1 to 20" in err
    assert "flat.npy: codes have shape" in err
    assert "absent.npy: no such file" in err


@pytest.mark.e2e
def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "mimo_jax.tokenizer", "encode", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert "--codebooks" in out.stdout and "--checkpoint" in out.stdout
