"""One-voice TTS fine-tuning: a voice folder (transcript pairs or LJSpeech metadata.csv) prepared by
data_pipelines.voice into train and held-out shards, and the lora_tts_voice recipe run by
experiments.demo_voice on a smoke base, the held-out loss logged before and after (end-to-end,
`pytest -m e2e`: the command in a process of its own)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from flax import nnx
from train_support import ROOT, xla_env

from data_pipelines import voice
from experiments import demo_voice
from experiments.configs import demo as demo_config
from mimo_jax import model_checkpoint
from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.lm.model import MiMoAudioLM


def _wav(path, seconds=0.5):
    soundfile.write(path, np.zeros(int(22050 * seconds), np.int16), 22050, subtype="PCM_16")


def test_transcript_pairs_are_read_in_name_order_and_every_nth_held_out(tmp_path):
    for i in range(7):
        _wav(tmp_path / f"u{i}.wav")
        (tmp_path / f"u{i}.txt").write_text(f"  Sentence\nnumber {i}. \n")
    entries = voice.read_voice_dir(str(tmp_path))
    assert [e["id"] for e in entries] == [f"u{i}" for i in range(7)]
    assert entries[3] == {
        "id": "u3",
        "audio": str(tmp_path / "u3.wav"),
        "text": "Sentence number 3.",
    }
    train, held = voice.split(entries, 3)
    assert [e["id"] for e in held] == ["u2", "u5"]
    assert [e["id"] for e in train] == ["u0", "u1", "u3", "u4", "u6"]
    assert [e["id"] for e in voice.split(entries[:2], 5)[1]] == ["u1"]  # at least one
    assert voice.split(entries, 0) == (entries, [])


def test_ljspeech_metadata_uses_the_normalised_column(tmp_path):
    (tmp_path / "wavs").mkdir()
    _wav(tmp_path / "wavs" / "LJ001.wav")
    _wav(tmp_path / "LJ002.wav")
    (tmp_path / "metadata.csv").write_text('LJ001|Dr. Smith|Doctor Smith\nLJ002|Hello "there"\n')
    assert voice.read_voice_dir(str(tmp_path)) == [
        {"id": "LJ001", "audio": str(tmp_path / "wavs" / "LJ001.wav"), "text": "Doctor Smith"},
        {"id": "LJ002", "audio": str(tmp_path / "LJ002.wav"), "text": 'Hello "there"'},
    ]


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            {"a.wav": None, "a.txt": "hi", "b.wav": None, "c.txt": "x"},
            "unpaired files: b.wav (no b.txt), c.txt (no c.wav)",
        ),
        ({"a.wav": None, "a.txt": " \n"}, "empty transcripts: a"),
        ({"notes.md": "x"}, "no recordings (expected NAME.wav + NAME.txt pairs or metadata.csv)"),
        ({"metadata.csv": "a|hello\n"}, "metadata.csv line 1: no recording a.wav"),
        ({"metadata.csv": "a\n"}, "metadata.csv line 1: expected NAME|transcript"),
    ],
)
def test_a_bad_voice_folder_is_named_and_nothing_is_written(tmp_path, capsys, files, expected):
    src = tmp_path / "voice"
    src.mkdir()
    for name, text in files.items():
        _wav(src / name) if text is None else (src / name).write_text(text)
    out = tmp_path / "out"
    assert voice.main(["--voice-dir", str(src), "--checkpoint", "unused", "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and expected in line
    assert not out.exists()


@pytest.mark.parametrize("held_out", ["1", "-2"])
def test_a_held_out_step_that_leaves_nothing_to_train_is_refused(tmp_path, capsys, held_out):
    argv = ["--voice-dir", str(tmp_path), "--checkpoint", "x", "--out", str(tmp_path / "o")]
    assert voice.main([*argv, "--held-out", held_out]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --held-out {held_out}: expected 0 (none) or N >= 2"
    )


@pytest.mark.e2e
def test_the_recipe_fine_tunes_a_new_voice_and_logs_the_held_out_loss(demo_data, tmp_path):
    hf = demo_config.demo_hf(smoke=True)
    base = tmp_path / "base"
    model_checkpoint.save(MiMoAudioLM(MiMoAudioConfig.from_hf(hf), rngs=nnx.Rngs(0)), hf, base)
    argv = ["--workdir", str(tmp_path / "w"), "--base", str(base), "--smoke", "--sentences", "5"]
    argv += ["--tokenizer", str(demo_data / "tokenizer.json")]
    argv += ["--audio-tokenizer", str(demo_data.parent / "audio_tokenizer")]
    # As a user runs it: its own process, one CPU device (the demo's mesh).
    cmd = [sys.executable, "-m", "experiments.demo_voice", *argv]
    run = subprocess.run(cmd, cwd=ROOT, env=xla_env(1), capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    data = tmp_path / "w" / "voice" / "data"
    held = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()]
    assert [(e["id"], e["task"]) for e in held] == [("s004", "tts")]
    assert json.loads((data / "train" / "manifest.json").read_text())["records"] == 4
    losses = demo_voice.held_out_losses(tmp_path / "w" / "voice" / "lora")
    assert [step for step, _ in losses] == [0, 6]
    assert losses[-1][1] < losses[0][1]  # the held-out recording of the voice got likelier
    assert (tmp_path / "w" / "voice" / "lora" / "adapter" / "adapter_config.json").is_file()
    assert "[voice] held-out loss of the new voice:" in run.stdout
