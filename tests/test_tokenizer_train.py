"""Tokenizer training through the train entry point on the demo corpus, as the tokenizer demo
(`experiments.demo_tokenizer --smoke`) runs it: held-out clips scored before and after; stage 1
with every loss term in metrics.jsonl, a resume to the same losses, the export with its RVQ
buffers through the converter and back; stage 2 from that export with its encoder and codebooks
untouched; and the errors that stop a run before it starts."""

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import convert_torch_weights
from experiments import demo_tokenizer, train
from experiments.config_checks import set_value
from experiments.configs import tokenizer_stage2
from mimo_jax import model_checkpoint


def _config(module, data, **overrides):
    config = module.get_config(f"demo,data={data}")
    for key, value in {**demo_tokenizer.SMOKE, **overrides}.items():
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


def test_stage1_logs_every_term_resumes_and_exports_its_buffers(
    demo_run, demo_data, tmp_path, capsys
):
    root = demo_run[0]
    workdir = root / "stage1"
    config = demo_tokenizer.stage_config("stage1", demo_data, root / "train.jsonl", smoke=True)
    records = _metrics(workdir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"a2t_loss", "recon_loss", "commit_loss", "grad_norm"} <= set(r)
        assert all(np.isfinite(v) for v in r.values())
    assert {"eval/mel_distance_8", "eval/mel_distance_20"} <= set(records[2])
    # Preempted after step 2: the rerun resumes there and repeats the losses bit for bit.
    cut = tmp_path / "cut"
    shutil.copytree(workdir, cut)
    shutil.rmtree(cut / "checkpoints" / "4")
    shutil.rmtree(cut / "model")
    capsys.readouterr()
    assert train.run(config, str(cut)) == 0
    out = capsys.readouterr().out
    assert "step 3/4" in out and "step 2/4" not in out
    assert _losses(cut) == _losses(workdir)
    # The export: codebooks initialised, and through the converter with their buffers, both ways.
    exported = _params(workdir / "model")
    inited = [v for k, v in exported.items() if k.endswith("inited")]
    assert len(inited) == 20 and all(v.tolist() == [1.0] for v in inited)
    official = tmp_path / "official"
    assert convert_torch_weights.main([str(workdir / "model"), str(official), "--quiet"]) == 0
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


def test_stage2_trains_the_decoder_against_the_discriminators_only(demo_run):
    stage1, stage2 = demo_run[0] / "stage1", demo_run[0] / "stage2"
    steps = [r for r in _metrics(stage2) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert {"recon_loss", "adv_loss", "fm_loss", "disc_loss"} <= set(r)
        assert all(np.isfinite(v) for v in r.values())
    before, after = _params(stage1 / "model"), _params(stage2 / "model")
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
