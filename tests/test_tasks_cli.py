"""`python -m mimo_jax.generate` end to end on the tasks/ fixture: a JSONL of good and bad
requests (the good ones give the fixture's text and a WAV of its length; each bad one is one line
of errors.jsonl), one request from the command line, and a checkpoint refused for its ids; what a
run keeps through a kill or a failing batch and what a rerun skips; every request checked before
anything loads; a line that is not UTF-8, an unusable --out, an adapter with a nonsense
lora_alpha."""

import json
import re

import numpy as np
import pytest
import soundfile as sf
from tasks_support import record_batches

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

    from mimo_jax.inference.mimo_audio import MimoAudio

    mimo = MimoAudio.load(
        lm_dir, fx.dir / fx.meta["audio_tokenizer"], fx.dir / "text_tokenizer" / "tokenizer.json"
    )
    assert isinstance(mimo.model.model.layers, nnx.List)
    assert isinstance(mimo.model.local_transformer.layers, nnx.List)


TEMPLATE = "Read this content out loud"  # one TTS template: prompts whose lengths follow the texts


def _tts(rid: str, text: str) -> dict:
    return {"id": rid, "task": "tts", "input": text, "template": TEMPLATE, "greedy": True}


def _requests(path, *lines) -> str:
    """A requests file of JSON objects and raw lines (bytes, written as they are)."""
    raw = [x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return str(path)


@pytest.fixture
def batches(monkeypatch):
    """The ids of each batch generated, in order; `fail[id] = exception` makes the batch of that
    request raise it inside its generation."""
    return record_batches(monkeypatch, lambda requests: [r["id"] for r in requests])


def test_finished_requests_survive_faults_and_a_rerun_runs_only_the_rest(
    fx, lm_dir, tmp_path, batches, capsys
):
    """Seen: killed at 25 of 100 requests, generate left nothing, and a rerun redid everything.
    Each request's files are written as soon as its batch ends; a batch that fails loses only its
    requests; a rerun skips the requests with output (--overwrite runs them again)."""
    ran, fail = batches
    texts = ["Hi.", "Good night, sleep well.", "See you all again tomorrow morning."]
    reqs = [{**_tts(f"r{i}", t), "max_new_groups": 2} for i, t in enumerate(texts)]
    out = tmp_path / "out"
    argv = ["--requests", _requests(tmp_path / "r.jsonl", *reqs), "--batch-size", "1"]
    argv += _args(fx, lm_dir, out)
    done = lambda: sorted(p.stem for p in out.glob("*.txt"))  # noqa: E731

    fail["r1"] = KeyboardInterrupt()  # the process ends inside the second batch (a kill)
    with pytest.raises(KeyboardInterrupt):
        generate.main(argv)
    assert ran == [["r0"], ["r1"]] and done() == ["r0"] and (out / "r0.wav").is_file()

    ran.clear()
    fail["r1"] = RuntimeError("device lost")  # an error inside the second batch's generation
    assert generate.main(argv) == 1
    assert ran == [["r1"], ["r2"]] and done() == ["r0", "r2"]
    (error,) = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert error["line"] == 2 and error["id"] == "r1" and "device lost" in error["error"]
    assert "skipping 1 of 3 requests" in capsys.readouterr().err

    ran.clear()
    del fail["r1"]
    assert generate.main(argv) == 0 and ran == [["r1"]] and done() == ["r0", "r1", "r2"]
    assert (out / "errors.jsonl").read_text() == ""
    assert "skipping 2 of 3 requests" in capsys.readouterr().err

    ran.clear()
    assert generate.main(argv + ["--overwrite"]) == 0 and len(ran) == 3
    assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl"] + sorted(
        f"r{i}.{ext}" for i in range(3) for ext in ("txt", "wav")
    )


def test_every_request_is_checked_before_anything_loads(fx, tmp_path):
    """Seen: a request with "seed": 1208925819614629174706176 raised OverflowError 3.5 minutes
    into a run, with no output and no errors.jsonl. Every field is checked first: a file of bad
    requests only ends with its errors.jsonl without loading the (here missing) checkpoint."""
    bad = {  # request -> what its error line says
        2**80: "seed: 1208925819614629174706176 is not an integer in [0, 2**32)",
        -1: "seed: -1 is not an integer in [0, 2**32)",
        "7": "seed: '7' is not an integer",
    }
    lines = [{**_tts(f"s{i}", "Hi."), "seed": seed} for i, seed in enumerate(bad)]
    lines.append({**_tts("n", "Hi."), "min_new_groups": 5, "max_new_groups": 2})
    argv = ["--requests", _requests(tmp_path / "r.jsonl", *lines)]
    argv += _args(fx, tmp_path / "no-checkpoint", tmp_path / "out")
    assert generate.main(argv) == 1
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == [1, 2, 3, 4]
    for e, want in zip(errors, [*bad.values(), "min_new_groups 5 is more than max_new_groups 2"]):
        assert want in e["error"], (e, want)


def test_a_line_that_is_not_utf8_is_one_error(fx, lm_dir, tmp_path):
    """Seen: one non-UTF-8 line rejected the whole requests file."""
    good = {**_tts("good", "Hi."), "max_new_groups": 2}
    path = _requests(tmp_path / "r.jsonl", b'{"id": "latin", "input": "caf\xe9"}', good)
    out = tmp_path / "out"
    assert generate.main(["--requests", path, "--batch-size", "1"] + _args(fx, lm_dir, out)) == 1
    (error,) = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert error["line"] == 1 and "not UTF-8" in error["error"]
    assert (out / "good.txt").is_file() and (out / "good.wav").is_file()


@pytest.mark.parametrize("place", ["a file", "under a file"])
def test_out_that_cannot_take_files_is_refused_before_loading(fx, tmp_path, place, capsys):
    """Seen: --out naming a file or an unwritable place gave a traceback, after the models had
    loaded. It is one line, before anything loads (the checkpoint here does not exist)."""
    (tmp_path / "taken").write_text("")
    out = tmp_path / "taken" if place == "a file" else tmp_path / "taken" / "out"
    argv = ["tts", "--input", "Hi."] + _args(fx, tmp_path / "no-checkpoint", out)
    with pytest.raises(SystemExit) as stop:
        generate.main(argv)
    want = "is a file" if place == "a file" else "cannot write there (Not a directory)"
    assert str(stop.value).startswith(f"--out {out}: ") and want in str(stop.value)
    assert "\n" not in str(stop.value)


@pytest.mark.parametrize(
    "alpha, want", [(-1e30, "lora_alpha=-1e+30; expected a finite number > 0"), (1e300, "finite")]
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the scale 1e300 / r
def test_adapter_with_nonsense_lora_alpha_is_refused(fx, lm_dir, tmp_path, alpha, want):
    """Seen: an adapter with lora_alpha -1e30 gave empty text and a silent WAV, with exit 0. A
    lora_alpha that is not a positive number is refused, and so is one whose merge overflows."""
    import jax.numpy as jnp
    from flax import nnx

    from mimo_jax.conversion.convert import load_torch_checkpoint
    from mimo_jax.lm import adapters
    from mimo_jax.lm.conversion import LMFamily
    from mimo_jax.lm.lora import LoraConfig, adapted, apply_lora

    _, model = load_torch_checkpoint(lm_dir, LMFamily())
    q_proj = r"model\.layers\.\d+\.self_attn\.q_proj"
    apply_lora(model, LoraConfig(2, 4.0, 0.0, (q_proj,)), rngs=nnx.Rngs(0))
    for _, module in adapted(model):  # lora_b starts at zero, which hides any scale
        module.lora.lora_b.set_value(jnp.full(module.lora.lora_b.shape, 0.1))
    adapters.save(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["lora_alpha"] = alpha
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    argv = ["tts", "--input", "Hi.", "--adapter", str(tmp_path / "adapter")]
    with pytest.raises(SystemExit, match=re.escape(want)):
        generate.main(argv + _args(fx, lm_dir, tmp_path / "out"))
