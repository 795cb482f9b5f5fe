"""`benchmarks/device_check.py`: its smoke run end to end, the remat fallback when a step does not
fit, the bytes a generated group reads, and the targets it judges."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def device_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling scripts, as when run
    import device_check

    return device_check


def _bytes(module) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_a_group_reads_each_weight_as_often_as_decoding_runs_it(device_check):
    model = device_check.generation_model(device_check.SMOKE)
    c, s = model.config, model.config.backbone_stack()
    gathered = _bytes(model.model.embed_tokens) + _bytes(model.speech_embeddings)
    to_local = model.speech_embeddings_to_local
    per_step = _bytes(model.local_transformer) + (_bytes(to_local) if to_local else 0)
    heads = _bytes(model.local_transformer_lm_heads)
    cache = 2 * s.layers * s.kv_heads * s.head_dim * 40 * 2  # bf16 keys and values
    expected = (
        _bytes(model)
        - gathered
        + (c.patch_steps - 1) * per_step
        + (c.group_size - 1) * heads
        + 3 * cache
    )
    assert device_check.bytes_per_group(model, cache_groups=40, batch=3) == expected


def test_a_step_that_does_not_fit_is_retried_with_the_next_remat_policy(device_check, monkeypatch):
    tried = []

    def measure(a, dtype, method):
        tried.append(a.remat)
        if a.remat != "full":
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return dict(groups_per_s=200.0, flops_per_group=1e9, step_s=1.0, batch=2)

    monkeypatch.setattr(device_check.train_step, "measure", measure)
    r = device_check.measure_train(device_check.SMOKE, "xla", peak_tflops=1.0)
    assert tried == ["none", "minimal", "full"]
    assert (r["remat"], r["did_not_fit"], r["mfu"]) == ("full", ["none", "minimal"], 0.1)

    def broken(a, dtype, method):
        raise ValueError("a bad shape")  # not memory: raised, not retried

    monkeypatch.setattr(device_check.train_step, "measure", broken)
    with pytest.raises(ValueError, match="a bad shape"):
        device_check.measure_train(device_check.SMOKE, "xla", peak_tflops=1.0)


def test_targets_are_judged_from_the_figures(device_check):
    report = dict(
        train=[dict(attention="xla", mfu=0.30), dict(attention="cudnn", mfu=0.41)],
        generate=[
            dict(batch=1, groups_per_s=10.0, bandwidth_limit_groups_per_s=25.0),
            dict(batch=64, groups_per_s=150.0),
        ],
        tokenizer=[dict(batch=16, encode_rtf=250.0)],
    )
    assert [(round(v, 3), met) for _, v, met in device_check.targets(report)] == [
        (0.41, True),
        (15.0, False),
        (0.4, False),
        (250.0, True),
    ]


@pytest.mark.e2e
def test_the_smoke_run_measures_every_section(tmp_path):
    out = tmp_path / "check.json"
    flags = os.environ.get("XLA_FLAGS", "").split()
    one_device = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    run = subprocess.run(
        [sys.executable, "benchmarks/device_check.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XLA_FLAGS": " ".join(one_device)},  # as on one accelerator
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["platform"], report["smoke"], report["jax"]) == ("cpu", True, jax.__version__)
    [train] = report["train"]  # the CPU runs xla only
    assert train["attention"] == "xla" and train["remat"] == "none" and 0 < train["mfu"] < 1
    assert [r["batch"] for r in report["generate"]] == list(report["sizes"]["batches"])
    assert all(r["groups_per_s"] > 0 and r["bytes_per_group"] > 0 for r in report["generate"])
    assert [r["batch"] for r in report["tokenizer"]] == list(report["sizes"]["audio_batches"])
    assert all(r["encode_rtf"] > 0 and r["decode_rtf"] > 0 for r in report["tokenizer"])
    assert "train    xla:" in run.stdout and "targets: not judged" in run.stdout


def test_the_checked_lm_is_a_narrower_7b_of_about_one_and_a_half_billion(device_check):
    from experiments.configs.common import mimo_7b_hf
    from mimo_jax.lm.config import MiMoAudioConfig
    from mimo_jax.train.flops import parameter_count

    lm, big = device_check.lm_config(device_check.FULL), MiMoAudioConfig.from_hf(mimo_7b_hf())
    assert 1.4e9 < parameter_count(lm) < 1.6e9
    same = ("head_dim", "vocab_size", "group_size", "audio_channels", "local_dim", "local_layers")
    same += ("input_local_layers", "local_attn_heads", "local_ffn_dim")
    assert {k: getattr(lm, k) for k in same} == {k: getattr(big, k) for k in same}
    gqa = lambda c: c.num_attention_heads // c.num_key_value_heads
    assert gqa(lm) == gqa(big) and lm.num_hidden_layers < big.num_hidden_layers
