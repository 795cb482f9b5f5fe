"""The LM on configurations other than the fixture's: widths that need `speech_embeddings_to_local`,
a causal patch encoder, other delay patterns and GQA ratios; the config round trip; remat
policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax.inference.sampling import GREEDY, forbid_one, sample
from mimo_jax.lm.config import MiMoAudioConfig, small_config
from mimo_jax.lm.model import MiMoAudioLM, delay_schedule

VARIANT = dict(
    input_local_dim=24,
    local_dim=32,
    input_full_attention=False,
    group_size=3,
    audio_channels=4,
    delay_pattern="0-2-2-3",
    speech_vocab_size="33-17-17-17",
    speech_zeroemb_idx="32-16-16-16",
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    hidden_size=48,
    local_attn_heads=4,
)


def _model(**overrides):
    config = small_config(**{**VARIANT, **overrides})
    return config, MiMoAudioLM(config, rngs=nnx.Rngs(0))


def test_config_round_trip_keeps_every_key():
    config = small_config(**VARIANT)
    again = MiMoAudioConfig.from_hf(config.to_hf())
    assert again == config and again.to_hf() == config.to_hf()
    assert config.patch_encoder_stack().causal and config.patch_steps == 3 + 3


def test_invalid_config_is_named():
    with pytest.raises(ValueError, match="delay_pattern.*expected 4 values"):
        small_config(**{**VARIANT, "delay_pattern": "0-1"})
    with pytest.raises(ValueError, match="remat_policy 'sometimes'"):
        small_config(remat_policy="sometimes")


def test_delay_schedule():
    active = delay_schedule((0, 2, 2, 3), 3)
    assert active.shape == (6, 4)
    np.testing.assert_array_equal(active[:, 0], [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(active[:, 3], [0, 0, 0, 1, 1, 1])


def test_teacher_forcing_agrees_with_autoregressive_decoding():
    config, model = _model()
    assert model.speech_embeddings_to_local is not None
    seed = jax.random.normal(jax.random.key(1), (3, config.local_dim))

    def greedy(logits, forbidden_id, key):
        return sample(logits, GREEDY, key, forbid_one(logits.shape[-1], forbidden_id))

    codes = model.decode_patch(seed, greedy, jax.random.key(0))
    assert codes.shape == (3, config.group_size, config.audio_channels)
    logits = model.patch_logits(seed, codes)
    for ch, lg in enumerate(logits):
        masked = lg.at[..., config.speech_empty_ids[ch]].set(-jnp.inf)
        np.testing.assert_array_equal(jnp.argmax(masked, -1), codes[:, :, ch])


def test_causal_patch_encoder_ignores_later_frames():
    config, model = _model()
    rng = np.random.default_rng(0)
    text = jnp.full((1, 2), config.empty_idx)
    codes = rng.integers(0, 16, (1, 2, config.group_size, config.audio_channels))
    changed = codes.copy()
    changed[:, :, -1] = (changed[:, :, -1] + 1) % 16  # only the last frame of each patch
    enc = model.input_local_transformer
    frames = lambda c: enc(
        model.embed_speech(jnp.asarray(c)).reshape(2, config.group_size, -1),
        jnp.arange(config.group_size)[None],
        jnp.tril(jnp.ones((1, config.group_size, config.group_size), bool)),
    )[0]
    a, b = frames(codes), frames(changed)
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], atol=1e-6)
    assert not np.allclose(a[:, -1], b[:, -1])
    assert model.embed_inputs(text, jnp.asarray(codes)).shape == (1, 2, config.hidden_size)


def test_patch_encoder_follows_input_full_attention():
    """encode_patches against the stack run with an explicit mask (lower-triangular when
    input_full_attention is false, all-ones when true); the two settings give other outputs."""
    rng = np.random.default_rng(0)
    outputs = {}
    for full in (False, True):
        config, model = _model(input_full_attention=full)
        gs = config.group_size
        text = jnp.asarray([[config.empty_idx, 3, config.empty_idx]])
        codes = jnp.asarray(rng.integers(0, 16, (1, 3, gs, config.audio_channels)))
        frames = model.embed_speech(codes).reshape(3, gs, -1)
        mask = jnp.ones((1, gs, gs), bool) if full else jnp.tril(jnp.ones((1, gs, gs), bool))
        enc, _ = model.input_local_transformer(frames, jnp.arange(gs)[None], mask)
        speech = (text == config.empty_idx)[0, :, None, None]
        want = model.speech_group_downcast((enc * speech).reshape(1, 3, -1))
        got = model.encode_patches(text, codes)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got[0, 1], 0.0)  # a text group has no patch
        outputs[full] = got
        rng = np.random.default_rng(0)  # the same codes for both settings
    speech = np.asarray(text[0] == config.empty_idx)
    assert not np.allclose(outputs[False][0, speech], outputs[True][0, speech], atol=1e-3)


@pytest.mark.parametrize("policy", ["full", "minimal", "save_qkv_proj", "save_dot_except_mlp"])
def test_remat_policies_give_the_same_gradients(policy):
    rng = np.random.default_rng(0)
    base = small_config(**VARIANT)
    text = jnp.asarray(rng.integers(0, base.vocab_size, (2, 5)))
    codes = jnp.asarray(rng.integers(0, 16, (2, 5, base.group_size, base.audio_channels)))

    def grads(remat_policy):
        model = MiMoAudioLM(base.replace(remat_policy=remat_policy), rngs=nnx.Rngs(0))

        def loss(model):
            return jnp.mean(model.text_logits(model(text, codes)) ** 2)

        return jax.tree.leaves(nnx.grad(loss)(model))

    for a, b in zip(grads("none"), grads(policy)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_every_parameter_has_logical_axes():
    _, model = _model()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.get_value().ndim, path
        if "layers" in path:
            assert axes[0] == "layers", path
