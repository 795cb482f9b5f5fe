"""Local transformers whose width the head count does not divide (head_dim = width // heads, as the
official code computes it): built, written in the official layout (the official state_dict names),
converted back, loaded and run against a NumPy Qwen2 reference. Configs the official code refuses
are refused."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from qwen2_reference import qwen2_stack
from safetensors.numpy import load_file

import convert_torch_weights
from mimo_jax import model_checkpoint as checkpoint
from mimo_jax.inference.generation_loop import GenerationConfig, generate
from mimo_jax.lm.config import small_config
from mimo_jax.lm.model import MiMoAudioLM

# (patch encoder width, patch decoder width, local heads): 40 // 6 = 6 and 28 // 6 = 4;
# 44 // 5 = 8 and 24 // 5 = 4. None of the widths is a multiple of its head count.
CASES = [(40, 28, 6), (44, 24, 5)]


def randomize(model, seed=0):
    """Every parameter random (the default init has zero biases and unit norms, which hide bugs)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        var.set_value(jnp.asarray(rng.normal(0, 0.2, value.shape) + (value == 1), value.dtype))
    return model


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"enc{c[0]}-dec{c[1]}-heads{c[2]}")
def official(request, tmp_path_factory):
    enc, dec, heads = request.param
    config = small_config(
        input_local_dim=enc, local_dim=dec, local_attn_heads=heads, input_full_attention=False
    )
    root = tmp_path_factory.mktemp("floor")
    checkpoint.save(randomize(MiMoAudioLM(config, rngs=nnx.Rngs(0))), config.to_hf(), root / "ckpt")
    assert convert_torch_weights.main([str(root / "ckpt"), str(root / "official"), "--quiet"]) == 0
    assert convert_torch_weights.main([str(root / "official"), str(root / "back"), "--quiet"]) == 0
    return root, (enc, dec, heads)


def test_official_layout_of_narrow_projections(official):
    root, (enc, dec, heads) = official
    tensors = load_file(root / "official" / "model.safetensors")
    for prefix, width in (("input_local_transformer", enc), ("local_transformer", dec)):
        inner = heads * (width // heads)
        assert inner < width
        for name in ("q_proj", "k_proj", "v_proj"):
            assert tensors[f"{prefix}.layers.0.self_attn.{name}.weight"].shape == (inner, width)
            assert tensors[f"{prefix}.layers.0.self_attn.{name}.bias"].shape == (inner,)
        assert tensors[f"{prefix}.layers.0.self_attn.o_proj.weight"].shape == (width, inner)
    assert tensors["speech_embeddings_to_local.weight"].shape == (dec, enc)
    hf = json.loads((root / "official" / "config.json").read_text())
    assert (hf["input_local_dim"], hf["local_dim"], hf["local_attn_heads"]) == (enc, dec, heads)


def test_loaded_model_matches_numpy_reference(official):
    root, _ = official
    config, model = checkpoint.load(root / "back")
    tensors = load_file(root / "official" / "model.safetensors")
    rng = np.random.default_rng(1)
    kw = dict(
        heads=config.local_attn_heads,
        kv_heads=config.local_attn_heads,
        theta=config.rope_theta,
        eps=config.rms_norm_eps,
    )
    for stack, width in (
        (model.input_local_transformer, config.input_local_dim),
        (model.local_transformer, config.local_dim),
    ):
        prefix = (
            "input_local_transformer"
            if stack is model.input_local_transformer
            else "local_transformer"
        )
        x = rng.normal(size=(2, config.group_size, width)).astype(np.float32)
        pos = np.broadcast_to(np.arange(config.group_size), (2, config.group_size))
        mask = np.broadcast_to(
            np.tril(np.ones((config.group_size,) * 2, bool)), (2,) + (config.group_size,) * 2
        )
        got, _ = stack(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(mask))
        want = qwen2_stack(tensors, prefix, x, pos, mask, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_generation_runs(official):
    root, _ = official
    config, model = checkpoint.load(root / "back")
    text = jnp.full((1, 2), config.empty_idx)
    codes = jnp.zeros((1, 2, config.group_size, config.audio_channels), jnp.int32)
    out = generate(model, text, codes, GenerationConfig(max_length=5))
    assert out.codes.shape == (1, 5, config.group_size, config.audio_channels)
    speech = out.text[0, 2:] == config.empty_idx
    assert (out.codes[0, 2:][speech] < np.asarray(config.speech_empty_ids)).all()


@pytest.mark.parametrize(
    "key, value",
    [
        ("local_attn_heads", 0),
        ("num_attention_heads", 0),
        ("num_key_value_heads", 0),
        ("hidden_size", -64),
        ("local_dim", -32),
        ("input_local_dim", -8),
        ("intermediate_size", -1),
        ("group_size", 0),
        ("audio_channels", 0),
    ],
)
def test_config_the_official_code_refuses_is_named(key, value):
    with pytest.raises(ValueError, match=rf"\b{key}={value}\b"):
        small_config(**{key: value})


def test_local_width_below_the_head_count_is_refused():
    # The official code then divides by head_dim 0 (its attention scale is head_dim ** -0.5).
    with pytest.raises(ValueError, match=r"local_dim=3 // local_attn_heads=4 gives head_dim 0"):
        small_config(local_dim=3)
