"""Bad input to the converter stops it with a message naming the file or tensor, and leaves nothing
half-written behind."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import convert_torch_weights
from mimo_jax import model_checkpoint as checkpoint


@pytest.fixture
def official(fixtures_root, tmp_path):
    src = tmp_path / "official"
    shutil.copytree(fixtures_root / "lm", src)
    for f in src.iterdir():
        f.chmod(0o644)
    return src


def _convert(capsys, *args):
    code = convert_torch_weights.main([str(a) for a in args] + ["--quiet"])
    return code, capsys.readouterr().err


def _edit_tensors(src, edit):
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors")


def _nothing_left(dst):
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.partial")]


def test_missing_config(official, tmp_path, capsys):
    (official / "config.json").unlink()
    code, err = _convert(capsys, official, tmp_path / "out")
    assert code == 1 and "no config.json" in err
    _nothing_left(tmp_path / "out")


def test_other_architecture(official, tmp_path, capsys):
    cfg = json.loads((official / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (official / "config.json").write_text(json.dumps(cfg))
    code, err = _convert(capsys, official, tmp_path / "out")
    assert code == 1 and "LlamaForCausalLM" in err and "MiMoAudioForCausalLM" in err


def _config(src) -> dict:
    return json.loads((src / "config.json").read_text())


def test_invalid_config_value(official, tmp_path, capsys):
    # No head count is a multiple of 0 kv heads: invalid for every fixture.
    cfg = _config(official)
    cfg["num_key_value_heads"] = 0
    (official / "config.json").write_text(json.dumps(cfg))
    code, err = _convert(capsys, official, tmp_path / "out")
    assert code == 1 and "num_key_value_heads=0" in err
    _nothing_left(tmp_path / "out")


def test_truncated_file(official, tmp_path, capsys):
    path = official / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    code, err = _convert(capsys, official, tmp_path / "out")
    assert code == 1 and "truncated" in err and "model.safetensors" in err
    _nothing_left(tmp_path / "out")


def test_every_bad_tensor_is_named(official, tmp_path, capsys):
    cfg = _config(official)
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]

    def edit(t):
        t["lm_head.weight"] = t["lm_head.weight"][:, :-1].copy()  # wrong shape
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)  # wrong dtype
        del t[f"model.layers.{cfg['num_hidden_layers'] - 1}.mlp.up_proj.weight"]  # missing
        t["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)  # unexpected
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored

    _edit_tensors(official, edit)
    code, err = _convert(capsys, official, tmp_path / "out")
    assert code == 1
    assert f"lm_head.weight has shape [{vocab}, {hidden - 1}], expected [{vocab}, {hidden}]" in err
    assert "model.norm.weight has dtype I32" in err
    last = cfg["num_hidden_layers"] - 1
    assert f"missing tensor model.layers.{last}.mlp.up_proj.weight" in err
    assert "unexpected tensor model.layers.0.mlp.extra.weight" in err
    assert "inv_freq" not in err
    assert "(4 problems)" in err
    _nothing_left(tmp_path / "out")


def test_checkpoint_of_the_other_model_is_named(official, fixtures_root, tmp_path, capsys):
    # LM tensors under a tokenizer config.json: every tokenizer tensor is reported missing.
    (official / "config.json").write_text((fixtures_root / "tokenizer" / "config.json").read_text())
    code, err = _convert(capsys, official, tmp_path / "out")
    assert code == 1 and "tokenizer" in err
    assert (
        "missing tensor encoder.conv1.weight" in err and "unexpected tensor lm_head.weight" in err
    )


def test_existing_destination_needs_overwrite(official, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("data")
    code, err = _convert(capsys, official, dst)
    assert code == 1 and "--overwrite" in err and (dst / "keep.txt").exists()
    code, _ = _convert(capsys, official, dst, "--overwrite")
    assert code == 0 and checkpoint.is_model_checkpoint(dst) and not (dst / "keep.txt").exists()


def test_bfloat16_conversion_loads_and_runs(official, tmp_path, capsys):
    import jax.numpy as jnp

    code, _ = _convert(capsys, official, tmp_path / "bf16", "--dtype", "bfloat16")
    assert code == 0
    config, model = checkpoint.load(tmp_path / "bf16")
    assert model.lm_head.kernel[...].dtype == jnp.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hidden = model(
        jnp.zeros((1, 3), jnp.int32),
        jnp.zeros((1, 3, config.group_size, config.audio_channels), jnp.int32),
    )
    assert bool(jnp.isfinite(hidden).all())


def test_checkpoint_of_other_size_is_refused_on_load(official, tmp_path, capsys):
    dst = tmp_path / "ckpt"
    assert _convert(capsys, official, dst)[0] == 0
    cfg = _config(dst)
    layers, ffn, hidden = cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["hidden_size"]
    cfg["intermediate_size"] = ffn + 1
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=rf"model\.layers\.mlp\.down_proj\.kernel has shape "
        rf"\({layers}, {ffn}, {hidden}\), the config implies "
        rf"\({layers}, {ffn + 1}, {hidden}\)",
    ):
        checkpoint.load(dst)
