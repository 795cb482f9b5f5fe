"""`python -m mimo_jax.generate` end to end on the tasks/ fixture: a JSONL of good and bad
requests (the good ones give the fixture's text and a WAV of its length; each bad one is one line
of errors.jsonl), one request from the command line, and a checkpoint refused for its ids."""

import json

import numpy as np
import pytest
import soundfile as sf

from mimo_jax import generate


@pytest.fixture(scope="module")
def lm_dir(fx):
    return fx.lm_dir


def _args(fx, lm_dir, out):
    return [
        "--lm",
        str(lm_dir),
        "--audio-tokenizer",
        str(fx.dir / fx.meta["audio_tokenizer"]),
        "--text-tokenizer",
        str(fx.dir / "text_tokenizer" / "tokenizer.json"),
        "--out",
        str(out),
    ]


def _generation(fx, name):
    (gen,) = [g for g in fx.meta["generations"] if g["case"] == name]
    return gen


def test_requests_file(fx, lm_dir, tmp_path):
    gen = _generation(fx, "tts_sft_en")
    req, _ = fx.request(fx.cases["tts_sft_en"])
    good = {
        **req,
        "id": "tts",
        "greedy": True,
        "min_new_groups": gen["min_new_tokens"],
        "max_new_groups": gen["max_new_tokens"],
    }
    rate = fx.meta["wavs"]["q1"]["sampling_rate"]
    sf.write(tmp_path / "silent.wav", np.zeros(rate, np.float32), rate)
    sf.write(tmp_path / "short.wav", np.full(8, 0.1, np.float32), rate)
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(tmp_path / "voice.wav", np.tile(fx.wavs["voice"], 4), rate)
    asr = {"task": "asr", "greedy": True, "max_new_groups": 3}
    bad = {  # line content -> what its error line must say
        json.dumps({**asr, "id": "missing", "input": str(tmp_path / "nope.wav")}): "no such file",
        json.dumps({**asr, "id": "silent", "input": str(tmp_path / "silent.wav")}): "silent",
        json.dumps({**asr, "id": "short", "input": str(tmp_path / "short.wav")}): "too short",
        json.dumps({**asr, "id": "broken", "input": str(tmp_path / "broken.wav")}): "cannot read",
        json.dumps({"task": "tts", "id": "empty", "input": " "}): "input: ' ' is not a non-empty",
        json.dumps({"task": "sing", "id": "sing", "input": "la"}): "task 'sing'",
        json.dumps({"task": "tts", "id": "key", "input": "Hi.", "volume": 3}): "'volume'",
        json.dumps({"task": "tts", "id": "n", "input": "Hi.", "max_new_groups": 0}): "max_new",
        json.dumps(
            {
                "task": "dialogue",
                "id": "long",
                "input": str(tmp_path / "voice.wav"),
                "prompt_speech": str(tmp_path / "voice.wav"),
            }
        ): "context of 64",
        "{not json": "not a JSON object",
    }
    lines = [json.dumps(good)] + list(bad)
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = [
        "--requests",
        str(tmp_path / "requests.jsonl"),
        "--context-groups",
        "64",
        "--batch-size",
        "2",
    ] + _args(fx, lm_dir, out)
    assert generate.main(argv) == 1
    assert (out / "tts.txt").read_text() == gen["text"]
    wav, sr = sf.read(out / "tts.wav")
    assert sr == fx.meta["wavs"]["q1"]["sampling_rate"] and wav.shape == (gen["wav_samples"],)
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == list(range(2, len(lines) + 1))
    for e, want in zip(errors, bad.values()):
        assert want in e["error"], (e, want)
    assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl", "tts.txt", "tts.wav"]


def test_one_request_from_the_command_line(fx, lm_dir, tmp_path):
    gen = _generation(fx, "asr_sft")
    case = fx.cases["asr_sft"]
    sf.write(tmp_path / "q1.wav", fx.wavs["q1"], fx.meta["wavs"]["q1"]["sampling_rate"])
    argv = [
        "asr",
        "--input",
        str(tmp_path / "q1.wav"),
        "--template",
        case["template"]["value"],
        "--greedy",
        "--min-new-groups",
        str(gen["min_new_tokens"]),
        "--max-new-groups",
        str(gen["max_new_tokens"]),
        "--id",
        "q1",
    ]
    assert generate.main(argv + _args(fx, lm_dir, tmp_path / "out")) == 0
    assert (tmp_path / "out" / "q1.txt").read_text() == gen["text"]
    assert not (tmp_path / "out" / "q1.wav").exists()  # a text task


def test_checkpoint_with_other_special_ids_is_refused(fx, lm_dir, tmp_path):
    other = tmp_path / "lm"
    other.mkdir()
    config = json.loads((lm_dir / "config.json").read_text())
    config["eostm_idx"], config["eot_idx"] = config["eot_idx"], config["eostm_idx"]
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").symlink_to((lm_dir / "model.safetensors").resolve())
    with pytest.raises(SystemExit, match=r"eostm_idx=\d+ but .* eot_idx=\d+ but"):
        generate.main(["tts", "--input", "Hi."] + _args(fx, other, tmp_path / "out"))


def test_load_unstacks_the_layers_on_the_cpu(fx, lm_dir):
    """The command line's model decodes with separate layer weights on the CPU (faster there; the
    tokens are the scanned stack's, test_generation.py)."""
    from flax import nnx

    from mimo_jax.inference.tasks import MimoAudio

    mimo = MimoAudio.load(
        lm_dir, fx.dir / fx.meta["audio_tokenizer"], fx.dir / "text_tokenizer" / "tokenizer.json"
    )
    assert isinstance(mimo.model.model.layers, nnx.List)
    assert isinstance(mimo.model.local_transformer.layers, nnx.List)
