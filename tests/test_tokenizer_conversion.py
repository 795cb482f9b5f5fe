"""Tokenizer checkpoints through convert_torch_weights.py, both ways, with the same strictness as
the LM: every tensor used or ignored by a rule, round trip bit for bit."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizer_support import CHECKPOINT, clip_codes, reference

import convert_torch_weights
from mimo_jax.conversion.family import is_ignored
from mimo_jax.tokenizer import config as config_lib
from mimo_jax.tokenizer.conversion import TokenizerFamily
from mimo_jax.tokenizer.tokenizer_checkpoint import load_tokenizer


def _convert(src, dst):
    assert convert_torch_weights.main([str(src), str(dst), "--quiet"]) == 0


def test_round_trip_is_bit_for_bit(tmp_path):
    _convert(CHECKPOINT, tmp_path / "orbax")
    _convert(tmp_path / "orbax", tmp_path / "torch")
    source = load_file(os.path.join(CHECKPOINT, "model.safetensors"))
    written = {}
    for name in os.listdir(tmp_path / "torch"):
        if name.endswith(".safetensors"):
            written.update(load_file(tmp_path / "torch" / name))
    family = TokenizerFamily()
    kept = {k for k in source if not is_ignored(family, k)}
    assert set(written) == kept
    assert kept >= {
        "decoder.vocoder.head.istft.window",
        "encoder.quantizer.vq.layers.19._codebook.embed",
        # The RVQ's training buffers travel too, so a trained tokenizer converts whole.
        "encoder.quantizer.vq.layers.19._codebook.inited",
        "encoder.quantizer.vq.layers.19._codebook.cluster_size",
        "encoder.quantizer.vq.layers.19._codebook.embed_avg",
    }
    for name in kept:
        assert written[name].dtype == source[name].dtype, name
        np.testing.assert_array_equal(written[name], source[name], err_msg=name)
    with open(os.path.join(CHECKPOINT, "config.json")) as f:
        original = json.load(f)
    with open(tmp_path / "torch" / "config.json") as f:
        assert json.load(f) == original


def test_orbax_checkpoint_decodes_like_the_official_one(tmp_path):
    _convert(CHECKPOINT, tmp_path / "orbax")
    config, model = load_tokenizer(tmp_path / "orbax")
    codes = clip_codes(0)[None, :, :8]
    wav, _ = model.decode(jnp.asarray(codes), jnp.asarray([codes.shape[1]]))
    np.testing.assert_allclose(np.asarray(wav)[0], reference()["decoded_8"], rtol=0, atol=1e-4)


def test_only_rotary_frequencies_are_ignored():
    family = TokenizerFamily()
    source = load_file(os.path.join(CHECKPOINT, "model.safetensors"))
    assert all(k.endswith(".inv_freq") for k in source if is_ignored(family, k))
    assert is_ignored(family, "decoder.vocoder.layers.0.self_attn.rotary_emb.inv_freq")
    for name in ("embed", "inited", "cluster_size", "embed_avg"):
        assert not is_ignored(family, f"encoder.quantizer.vq.layers.0._codebook.{name}")


def test_bad_checkpoint_names_every_bad_tensor(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(CHECKPOINT, bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["encoder.conv1.bias"]
    tensors["encoder.extra.weight"] = np.zeros(3, np.float32)
    tensors["decoder.vocoder.head.out.bias"] = np.zeros(7, np.float32)
    tensors["encoder.layers.1.fc1.weight"] = tensors["encoder.layers.1.fc1.weight"].T.copy()
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_tokenizer(bad)
    message = str(err.value)
    for name in (
        "encoder.conv1.bias",
        "encoder.extra.weight",
        "decoder.vocoder.head.out.bias",
        "encoder.layers.1.fc1.weight",
    ):
        assert name in message
    assert convert_torch_weights.main([str(bad), str(tmp_path / "out"), "--quiet"]) == 1
    assert not (tmp_path / "out").exists()


def test_config_round_trip_and_unsupported_values():
    with open(os.path.join(CHECKPOINT, "config.json")) as f:
        hf = json.load(f)
    config = config_lib.from_hf(hf)
    assert config_lib.to_hf(config) == hf
    with pytest.raises(ValueError, match="activation_function is 'relu'"):
        config_lib.from_hf(dict(hf, activation_function="relu"))
    with pytest.raises(ValueError, match="missing keys.*d_model"):
        config_lib.from_hf({k: v for k, v in hf.items() if k != "d_model"})
    with pytest.raises(ValueError, match="codebook_size lists 2 codebooks, num_quantizers is 20"):
        config_lib.from_hf(dict(hf, codebook_size=[1024, 1024]))


def test_missing_checkpoint_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint directory does not exist"):
        load_tokenizer(tmp_path / "nowhere")
