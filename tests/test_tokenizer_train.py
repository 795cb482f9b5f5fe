"""Tokenizer training through the train entry point on the demo corpus: stage 1 with every loss
term in metrics.jsonl, a resume to the same losses, the export with its RVQ buffers through the
converter and back; stage 2 from that export with its encoder and codebooks untouched; and the
errors that stop a run before it starts."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import convert_torch_weights
from experiments import train
from experiments.config_checks import set_value
from experiments.configs import tokenizer_stage1, tokenizer_stage2
from mimo_jax import model_checkpoint

FAST = {
    "data.batch_size": 8,  # one crop per simulated device
    "data.crop_seconds": 0.4,
    "ema.kmeans_iters": 5,
    "log_every": 1,
    "checkpoint.async_save": False,
}


def _config(module, data, **overrides):
    config = module.get_config(f"demo,data={data}")
    for key, value in {**FAST, **overrides}.items():
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
def stage1(demo_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tokenizer") / "stage1"
    config = _config(tokenizer_stage1, demo_data, total_steps=4, checkpoint_every=2, eval_every=2)
    assert train.run(config, str(workdir)) == 0
    return config, workdir


def test_stage1_logs_every_term_resumes_and_exports_its_buffers(stage1, tmp_path, capsys):
    config, workdir = stage1
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


def test_stage2_trains_the_decoder_against_the_discriminators_only(stage1, demo_data, tmp_path):
    _, stage1_dir = stage1
    config = _config(
        tokenizer_stage2,
        demo_data,
        total_steps=2,
        checkpoint_every=0,
        eval_every=0,
        **{"model.init_checkpoint": str(stage1_dir / "model")},
    )
    assert train.run(config, str(tmp_path)) == 0
    steps = [r for r in _metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert {"recon_loss", "adv_loss", "fm_loss", "disc_loss"} <= set(r)
        assert all(np.isfinite(v) for v in r.values())
    before, after = _params(stage1_dir / "model"), _params(tmp_path / "model")
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
