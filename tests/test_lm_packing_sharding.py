"""Packed rows and sharded execution give the same outputs as plain single-device runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convert_torch_weights
from mimo_jax import model_checkpoint as checkpoint
from mimo_jax.inference.generation_loop import GenerationConfig, generate
from mimo_jax.lm.layout import from_official
from mimo_jax.nn.params import logical_axes
from mimo_jax.nn.partitioning import partition_spec
from sharding.mesh import make_mesh
from sharding.rules import PRESETS

TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def converted(fixtures_root, tmp_path_factory):
    dst = tmp_path_factory.mktemp("lm") / "ckpt"
    assert convert_torch_weights.main([str(fixtures_root / "lm"), str(dst), "--quiet"]) == 0
    return dst


@pytest.fixture(scope="module")
def ref(fixtures_root):
    return dict(np.load(fixtures_root / "lm" / "reference.npz"))


def test_packed_row_equals_documents_one_by_one(converted, ref):
    config, model = checkpoint.load(converted)
    text, codes = from_official(ref["input_ids"], config.group_size)
    cut = 5  # document A: groups 0..4 of row 0; document B: groups 0..6 of row 1
    doc_a, doc_b = (text[0, :cut], codes[0, :cut]), (text[1, :7], codes[1, :7])
    packed_text = np.concatenate([doc_a[0], doc_b[0]])[None]
    packed_codes = np.concatenate([doc_a[1], doc_b[1]])[None]
    segments = np.array([[1] * cut + [2] * 7])
    positions = np.array([list(range(cut)) + list(range(7))])
    packed = model(
        jnp.asarray(packed_text),
        jnp.asarray(packed_codes),
        jnp.asarray(positions),
        jnp.asarray(segments),
    )
    alone_a = model(jnp.asarray(doc_a[0][None]), jnp.asarray(doc_a[1][None]))
    alone_b = model(jnp.asarray(doc_b[0][None]), jnp.asarray(doc_b[1][None]))
    np.testing.assert_allclose(packed[0, :cut], alone_a[0], **TOL)
    np.testing.assert_allclose(packed[0, cut:], alone_b[0], **TOL)
    # And the first document alone is the official prefix (causality: later groups do not leak in).
    np.testing.assert_allclose(alone_a[0], ref["hidden"][0, :cut], **TOL)


@pytest.mark.parametrize("preset", ["fsdp_tensor", "fsdp"])
def test_sharded_model_matches_single_device(converted, ref, preset):
    assert len(jax.devices()) == 8
    mesh = make_mesh({"fsdp": 4, "tensor": 2} if preset == "fsdp_tensor" else {"fsdp": 8})
    config, sharded = checkpoint.load(converted, mesh=mesh, rules=PRESETS[preset])
    _, single = checkpoint.load(converted)
    # Every parameter is placed as the rules imply for its shape (split where its size divides).
    for path, var in checkpoint.flat_params(sharded):
        value = var.get_value()
        spec = partition_spec(value.shape, logical_axes(var), PRESETS[preset], mesh)
        assert value.sharding.spec == spec, path
        assert value.sharding.is_fully_replicated == all(a is None for a in spec), path

    text, codes = (jnp.asarray(a) for a in from_official(ref["input_ids"], config.group_size))

    @nnx.jit
    def forward(model, text, codes):
        hidden = model(text, codes)
        return model.text_logits(hidden), model.local_hidden(hidden)

    with jax.set_mesh(mesh):
        logits, local = forward(sharded, text, codes)
    want_logits, want_local = forward(single, text, codes)
    np.testing.assert_allclose(logits, want_logits, **TOL)
    np.testing.assert_allclose(local, want_local, **TOL)
    np.testing.assert_allclose(logits, ref["text_logits"], **TOL)

    ptext, pcodes = from_official(ref["prompt_ids"], config.group_size)
    gen = GenerationConfig(max_length=ref["generated_ids"].shape[-1] // config.group_size)
    with jax.set_mesh(mesh):
        out = generate(sharded, ptext, pcodes, gen)
    want = generate(single, ptext, pcodes, gen)
    np.testing.assert_array_equal(out.text, want.text)
    np.testing.assert_array_equal(out.codes, want.codes)
