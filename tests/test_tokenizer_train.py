"""Tokenizer training through the train entry point on the demo corpus, at the smallest size:
stage 1 with every loss term in metrics.jsonl, a resume to the same losses, the export with its RVQ
buffers through the converter and back; stage 2 from a stage-1 export with its encoder and
codebooks untouched; and the errors that stop a run before it starts. The runs are end-to-end
(`pytest -m e2e`), with the tokenizer demo (`experiments.demo_tokenizer --smoke`), its held-out
clips scored before and after."""

import contextlib
import io
import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import convert_torch_weights
from experiments import demo_tokenizer, train
from experiments.config_checks import set_value
from experiments.configs import common, tokenizer_stage1, tokenizer_stage2
from mimo_jax import model_checkpoint
from mimo_jax.tokenizer.config import to_hf
from mimo_jax.train import tokenizer_build

# The demo tokenizer's layout at the smallest widths, with 9 codebooks (the 8 an LM models and one
# more, so that the evaluation reconstructs at 8 and at all) of a few entries.
TINY = {
    **common.DEMO_TOKENIZER_HF,
    "d_model": 32,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "num_quantizers": 9,
    "codebook_size": [4] * 9,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 64,
    "n_mels": 32,
    "vocoder_dim": 16,
    "vocoder_intermediate_dim": 32,
    "vocoder_attention_heads": 2,
}
SMALLEST = {
    "model.tokenizer": TINY,
    "a2t": {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1, "ffn": 32},
    "data.crop_seconds": 0.1,  # fits the STFT discriminators' largest n_fft (2048)
    "data.max_text_tokens": 8,
    "discriminator.mpd_channels": (4, 4, 4, 4, 4),
    "discriminator.stft_filters": 4,
}


def _config(module, data, **overrides):
    config = module.get_config(f"demo,data={data}")
    for key, value in {**demo_tokenizer.SMOKE, **SMALLEST, **overrides}.items():
        set_value(config, key, value)
    return config


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir) -> dict:
    terms = ("loss", "a2t_loss", "recon_loss", "commit_loss")
    return {r["step"]: [r[k] for k in terms] for r in _metrics(workdir) if "loss" in r}


def _params(path) -> dict:
    _, state = model_checkpoint.load(str(path))
    return {
        ".".join(map(str, p)): np.asarray(v.get_value())
        for p, v in model_checkpoint.flat_params(state)
    }


@pytest.mark.e2e  # whole training runs of the GAN stack: minutes of tracing and saving
def test_stage1_logs_every_term_resumes_and_exports_its_buffers(demo_data, tmp_path, capsys):
    # 4 steps, checkpoints at 2 and 4, the evaluation at 4; the straight run exports nothing.
    length = {"total_steps": 4, "eval_every": 4}
    straight = tmp_path / "straight"
    config = _config(tokenizer_stage1, demo_data, export_model=False, **length)
    assert train.run(config, str(straight)) == 0
    records = _metrics(straight)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"a2t_loss", "recon_loss", "commit_loss", "grad_norm"} <= set(r)
        assert all(np.isfinite(v) for v in r.values())
    evals = [r for r in records if "eval/mel_distance_8" in r]  # 8 codebooks, and all 9
    assert [r["step"] for r in evals] == [4] and "eval/mel_distance_9" in evals[0]
    # Preempted after step 2: the rerun resumes there and repeats the losses bit for bit.
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    shutil.rmtree(cut / "checkpoints" / "4")
    capsys.readouterr()
    assert train.run(_config(tokenizer_stage1, demo_data, **length), str(cut)) == 0
    out = capsys.readouterr().out
    assert "step 3/4" in out and "step 2/4" not in out
    assert _losses(cut) == _losses(straight)
    # The export: codebooks initialised, and through the converter with their buffers, both ways.
    exported = _params(cut / "model")
    inited = [v for k, v in exported.items() if k.endswith("inited")]
    assert len(inited) == 9 and all(v.tolist() == [1.0] for v in inited)
    official = tmp_path / "official"
    assert convert_torch_weights.main([str(cut / "model"), str(official), "--quiet"]) == 0
    tensors = {}
    for name in official.iterdir():
        if name.suffix == ".safetensors":
            tensors.update(load_file(name))
    cluster = exported["encoder.quantizer.layers.3.cluster_size"]
    np.testing.assert_array_equal(
        tensors["encoder.quantizer.vq.layers.3._codebook.cluster_size"], cluster
    )
    assert convert_torch_weights.main([str(official), str(tmp_path / "back"), "--quiet"]) == 0
    back = _params(tmp_path / "back")
    assert back.keys() == exported.keys()
    for key, value in exported.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def _stage1_export(config, path) -> None:
    """What a stage-1 run exports, untrained: the tokenizer it starts from, codebooks marked
    initialised."""
    tok_config, tokenizer = tokenizer_build.initial_tokenizer(config)
    for layer in tokenizer.encoder.quantizer.layers:
        layer.inited[...] = jnp.ones((1,), jnp.float32)
    model_checkpoint.save(tokenizer, to_hf(tok_config), path)


@pytest.mark.e2e  # whole training runs of the GAN stack: minutes of tracing and saving
def test_stage2_trains_the_decoder_against_the_discriminators_only(demo_data, tmp_path):
    stage1 = tmp_path / "stage1_model"
    _stage1_export(_config(tokenizer_stage1, demo_data), stage1)
    config = _config(tokenizer_stage2, demo_data, total_steps=2, eval_every=0)
    config.model.init_checkpoint = str(stage1)
    assert train.run(config, str(tmp_path / "stage2")) == 0
    steps = [r for r in _metrics(tmp_path / "stage2") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert {"recon_loss", "adv_loss", "fm_loss", "disc_loss"} <= set(r)
        assert all(np.isfinite(v) for v in r.values())
    before, after = _params(stage1), _params(tmp_path / "stage2" / "model")
    assert before.keys() == after.keys()
    for key in before:
        same = np.array_equal(before[key], after[key])
        assert same == (not key.startswith("decoder.")), key


def test_runs_that_cannot_start_say_why(demo_data, tmp_path):
    config = _config(tokenizer_stage2, demo_data)
    with pytest.raises(ValueError, match="a stage-2 run starts from a stage-1 tokenizer"):
        train.run(config, str(tmp_path / "no_stage1"))
    config = _config(tokenizer_stage2, demo_data, **{"data.crop_seconds": 0.05})
    set_value(config, "model.init_checkpoint", str(tmp_path))
    with pytest.raises(ValueError, match=r"data.crop_seconds=0.05: .*n_fft 2048"):
        train.run(config, str(tmp_path / "short"))
    assert not (tmp_path / "no_stage1").exists() and not (tmp_path / "short").exists()


@pytest.fixture(scope="module")
def demo_run(demo_data, tmp_path_factory):
    """(workdir, printed output) of `python -m experiments.demo_tokenizer --smoke` on the demo
    corpus: its stage-1 run (4 steps, checkpoints at 2 and 4) and stage-2 run (2 steps)."""
    workdir = tmp_path_factory.mktemp("tokenizer_demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = demo_tokenizer.main(["--workdir", str(workdir), "--data", str(demo_data), "--smoke"])
    assert code == 0
    return workdir, out.getvalue()


@pytest.mark.e2e
def test_the_demo_scores_held_out_clips_before_and_after_and_reports_the_discriminators(
    demo_run, demo_data
):
    workdir, out = demo_run
    held = [json.loads(line) for line in (workdir / "heldout.jsonl").read_text().splitlines()]
    trained = (workdir / "train.jsonl").read_text().splitlines()
    corpus = (demo_data / "manifest.jsonl").read_text().splitlines()
    assert len(held) + len(trained) == len(corpus) and len({e["pair"] for e in held}) == 1
    for name in ("init", "stage1", "stage2"):
        report = json.loads((workdir / "eval" / name / "report.json").read_text())
        assert report["means"]["8"]["clips"] == len(held) and report["errors"] == 0
    init = json.loads((workdir / "eval" / "init" / "report.json").read_text())
    stoi = re.findall(
        r"STOI of (\d+) held-out clips, (\d+) codebooks: ([\d.]+) \(random init\) -> [\d.]+ "
        r"\(stage 1, 4 steps\) -> [\d.]+ \(stage 2, 2 steps\)",
        out,
    )
    assert [(int(c), n, float(v)) for c, n, v in stoi] == [
        (len(held), n, pytest.approx(init["means"][n]["stoi"], abs=5e-4)) for n in init["means"]
    ]
    disc = re.search(r"hinge loss ([\d.]+) \(step 1, at initialisation\) -> [\d.]+ \(step 2\)", out)
    assert disc, out
    assert float(disc[1]) == pytest.approx(_metrics(workdir / "stage2")[0]["disc_loss"], abs=5e-4)
    # The runs the demo trained: stage 1 with its evaluation and export, stage 2 from that export.
    assert {"eval/mel_distance_8", "eval/mel_distance_20"} <= set(_metrics(workdir / "stage1")[2])
    assert (workdir / "stage2" / "model" / "config.json").exists()
