"""The LM against the official outputs in the fixtures, after conversion with
convert_torch_weights.py.

Each stage is checked from its own reference input (the backbone from `input_embeds`, the patch
decoder from `local_hidden`), then end to end from `input_ids`.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convert_torch_weights
from mimo_jax import model_checkpoint as checkpoint
from mimo_jax.conversion import safetensors_io as st
from mimo_jax.inference.generation_loop import GenerationConfig, generate
from mimo_jax.inference.sampling import GREEDY, forbid_one, sample
from mimo_jax.lm.layout import from_official, to_official

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def lm_dir(fixtures_root):
    return fixtures_root / "lm"


@pytest.fixture(scope="module")
def ref(lm_dir):
    return dict(np.load(lm_dir / "reference.npz"))


@pytest.fixture(scope="module")
def converted(lm_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("lm") / "ckpt"
    assert convert_torch_weights.main([str(lm_dir), str(dst), "--quiet"]) == 0
    return dst


@pytest.fixture(scope="module")
def lm(converted):
    return checkpoint.load(converted)


def _positions(text):
    return jnp.broadcast_to(jnp.arange(text.shape[1]), text.shape)


def test_input_embeds(lm, ref):
    config, model = lm
    text, codes = from_official(ref["input_ids"], config.group_size)
    np.testing.assert_array_equal(text == config.empty_idx, ref["speech_mask"])
    np.testing.assert_allclose(
        model.embed_inputs(jnp.asarray(text), jnp.asarray(codes)), ref["input_embeds"], **TOL
    )


def test_backbone_from_reference_embeds(lm, ref):
    config, model = lm
    embeds = jnp.asarray(ref["input_embeds"])
    hidden = model.backbone(embeds, _positions(embeds[..., 0]))
    np.testing.assert_allclose(hidden, ref["hidden"], **TOL)
    np.testing.assert_allclose(model.text_logits(hidden), ref["text_logits"], **TOL)
    np.testing.assert_allclose(model.local_hidden(hidden), ref["local_hidden"], **TOL)


def test_end_to_end_from_input_ids(lm, ref):
    config, model = lm
    text, codes = from_official(ref["input_ids"], config.group_size)
    hidden = model(jnp.asarray(text), jnp.asarray(codes))
    np.testing.assert_allclose(hidden, ref["hidden"], **TOL)
    np.testing.assert_allclose(model.text_logits(hidden), ref["text_logits"], **TOL)
    np.testing.assert_allclose(model.local_hidden(hidden), ref["local_hidden"], **TOL)


def test_teacher_forced_patch_logits(lm, ref):
    config, model = lm
    seed = jnp.asarray(ref["local_hidden"][:, int(ref["local_hidden_position"])])
    logits = model.patch_logits(seed, jnp.asarray(ref["local_targets"]))
    want = ref["local_logits"]  # [B, steps, C, max vocab], NaN where inactive
    assert want.shape[1] == config.patch_steps
    checked = np.zeros(want.shape, bool)
    for ch, got in enumerate(logits):
        d, vocab = config.delay_pattern[ch], config.speech_vocab_sizes[ch]
        np.testing.assert_allclose(got, want[:, d : d + config.group_size, ch, :vocab], **TOL)
        checked[:, d : d + config.group_size, ch, :vocab] = True
    # Every active entry was compared, and every entry not compared is inactive (NaN).
    np.testing.assert_array_equal(checked, ~np.isnan(want))


def test_greedy_patch(lm, ref):
    config, model = lm
    seed = jnp.asarray(ref["local_hidden"][:, int(ref["local_hidden_position"])])

    def greedy(logits, forbidden_id, key):
        return sample(logits, GREEDY, key, forbid_one(logits.shape[-1], forbidden_id))

    codes = model.decode_patch(seed, greedy, jax.random.key(0))
    np.testing.assert_array_equal(codes, ref["greedy_patch"])


def test_greedy_generation(lm, ref):
    config, model = lm
    text, codes = from_official(ref["prompt_ids"], config.group_size)
    groups = ref["generated_ids"].shape[-1] // config.group_size
    out = generate(model, text, codes, GenerationConfig(max_length=groups))
    np.testing.assert_array_equal(to_official(out.text, out.codes), ref["generated_ids"])
    assert out.lengths.tolist() == [groups]


def test_round_trip_to_official_is_bit_exact(lm_dir, converted, tmp_path):
    back = tmp_path / "official"
    assert convert_torch_weights.main([str(converted), str(back), "--quiet"]) == 0
    original, restored = st.read_index(lm_dir), st.read_index(back)
    assert sorted(original) == sorted(restored)
    for name, info in original.items():
        a, b = st.read_tensor(info), st.read_tensor(restored[name])
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (lm_dir / "config.json").read_text()
    )


# bfloat16 compute (float32 parameters) against the float32 reference: relative RMS error and
# largest error relative to the largest reference value. Measured on the bundled fixture:
# 0.002 / 0.005 (text logits), 0.006 / 0.007 (local hidden); on a random fixture of larger weights
# (tests/make_fixture_variant.py): up to 0.028 / 0.043.
BF16_RMS, BF16_MAX = 0.04, 0.06


def test_bfloat16_compute_stays_within_its_bound(lm, ref):
    from flax import nnx

    from mimo_jax.lm.model import MiMoAudioLM

    config, model = lm
    graphdef = nnx.split(MiMoAudioLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))[0]
    bf16 = nnx.merge(graphdef, nnx.state(model))
    text, codes = from_official(ref["input_ids"], config.group_size)
    hidden = bf16(jnp.asarray(text), jnp.asarray(codes))
    for name, got in (
        ("text_logits", bf16.text_logits(hidden)),
        ("local_hidden", bf16.local_hidden(hidden)),
    ):
        want, got = ref[name], np.asarray(got, np.float32)
        rms = np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))
        worst = np.abs(got - want).max() / np.abs(want).max()
        assert rms <= BF16_RMS and worst <= BF16_MAX, (name, rms, worst)
        assert rms > 1e-4  # bfloat16 really was used
