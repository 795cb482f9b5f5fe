"""QLoRA: the frozen base held in int8 or int4 with per-group scales (the rule checked in numpy),
every untrained linear layer quantised, adapters trained over it, the merge into the dequantised
base, and a quantised base refused where fully trained weights are expected."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_support import random_batch, smoke, train_losses

from mimo_jax import model_checkpoint
from mimo_jax.lm.groups import group_of
from mimo_jax.lm.lora import (
    LoraConfig,
    LoRADense,
    adapted,
    apply_lora,
    linear_layers,
    merge_lora,
    module_at,
    quantize_base,
)
from mimo_jax.nn import quantized
from mimo_jax.nn.layers import Dense
from mimo_jax.nn.quantized import Quantization, QuantizedDense, QuantizedKernel
from mimo_jax.train import train_checkpoints
from mimo_jax.train.losses import LossConfig
from mimo_jax.train.optimizer import OptimizerConfig
from mimo_jax.train.step import Trainer

QKVO = r"model\.layers\.\d+\.self_attn\.[qkvo]_proj"
GROUPS = ("llm", "patch_decoder")  # the llm adapted, the patch decoder frozen: both quantised


def _numpy_rule(w: np.ndarray, bits: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-group quantisation over the input axis, written out: each run of `tile`
    inputs of an output shares scale = absmax / (qmax + 1/2); values round half to even. Returns
    the dequantised kernel and where the rule sits on a tie (a group's negative extreme, at
    -qmax - 1/2, which one ulp sends either way)."""
    qmax = 2 ** (bits - 1) - 1
    groups = w.reshape(w.shape[:-2] + (w.shape[-2] // tile, tile, w.shape[-1]))
    absmax = np.abs(groups).max(axis=-2, keepdims=True)
    scale = absmax / (qmax + 0.5)
    values = np.clip(np.round(groups / scale), -qmax - 1, qmax)
    tie = groups == -absmax
    return (values * scale).reshape(w.shape), tie.reshape(w.shape)


@pytest.mark.parametrize("qtype,bits", [("int8", 8), ("int4", 4)])
def test_kernels_follow_the_per_group_rule(qtype, bits):
    w = np.random.default_rng(0).normal(size=(2, 48, 8)).astype(np.float32)  # a 2-layer stack
    kernel = nnx.Param(
        jnp.asarray(w), out_sharding=("layers", "embed", "mlp"), eager_sharding=False
    )
    values, scales = quantized.quantized_kernel(kernel, Quantization(qtype, 16))
    assert values.get_value().dtype == quantized.QTYPES[qtype] and values.shape == w.shape
    assert scales.shape == (2, 3, 8) and scales.get_value().dtype == jnp.float32
    assert scales.get_metadata()["out_sharding"] == ("layers", None, "mlp")
    got = np.asarray(quantized.dequantize(values[...], scales[...], qtype))
    want, tie = _numpy_rule(w, bits, 16)
    np.testing.assert_allclose(got[~tie], want[~tie], rtol=1e-6, atol=1e-7)
    step = np.abs(w[tie]) / (2 ** (bits - 1) - 0.5)
    assert np.all(np.abs(got[tie] - w[tie]) <= step / 2 * 1.0001)
    assert 0 < float(np.abs(got - w).max()) < np.abs(w).max() / (2 ** (bits - 1))


def _qlora(lm, qtype="int8", tile=16):
    config, model = lm[0], nnx.clone(lm[1])
    apply_lora(model, LoraConfig(4, 8.0, 0.0, (QKVO,)), rngs=nnx.Rngs(1), lora_groups=("llm",))
    rng = np.random.default_rng(1)
    for _, module in adapted(model):  # non-zero adapters, so a wrong merge would show
        for var in (module.lora.lora_a, module.lora.lora_b):
            var.set_value(jnp.asarray(rng.normal(0, 0.1, var.shape), var.dtype))
    quantize_base(model, Quantization(qtype, tile), GROUPS)
    return config, model


def test_every_untrained_linear_layer_is_quantised_and_merges_to_its_dequantised_kernel(lm):
    config, model = _qlora(lm)
    for layer in linear_layers(model):
        module = module_at(model, layer.path)
        if group_of(layer.path) not in GROUPS:
            assert type(module) is Dense, layer.name
        elif layer.adapted:
            assert isinstance(module, LoRADense) and module.quantized == "int8", layer.name
        else:
            assert isinstance(module, QuantizedDense), layer.name
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.integers(0, config.vocab_size, (1, 6)))
    codes = jnp.asarray(rng.integers(0, 128, (1, 6, config.group_size, config.audio_channels)))
    forward = nnx.jit(lambda m: m(text, codes)[0])
    merged = merge_lora(model)
    assert not adapted(merged) and not nnx.state(merged, QuantizedKernel)
    np.testing.assert_allclose(forward(merged), forward(model), rtol=1e-5, atol=1e-5)
    # The adapted kernels are dequantised base + scale * a @ b, per layer of the stack.
    q = model.model.layers.self_attn.q_proj
    deq = quantized.dequantize(q.kernel_values[...], q.kernel_scales[...], "int8")
    want = deq + 2.0 * jnp.matmul(q.lora.lora_a[...], q.lora.lora_b[...])
    np.testing.assert_allclose(merged.model.layers.self_attn.q_proj.kernel[...], want, atol=1e-6)
    # The quantised model stays close to the float one it came from (int8 error only).
    base = forward(merge_lora(_float_twin(lm, model)))
    assert float(jnp.abs(forward(model) - base).max()) < 0.05 * float(jnp.abs(base).max())


def _float_twin(lm, quantised):
    """The same adapters over the float base."""
    twin = nnx.clone(lm[1])
    apply_lora(twin, LoraConfig(4, 8.0, 0.0, (QKVO,)), rngs=nnx.Rngs(1), lora_groups=("llm",))
    for (_, a), (_, b) in zip(adapted(twin), adapted(quantised)):
        a.lora.lora_a.set_value(b.lora.lora_a[...])
        a.lora.lora_b.set_value(b.lora.lora_b[...])
    return twin


def test_a_train_step_moves_the_adapters_over_a_frozen_quantised_base(lm):
    config, model = _qlora(lm, "int4")
    opt = OptimizerConfig(
        {"patch_encoder": 1e-3, "llm": 1e-2},
        total_steps=10,
        schedule="constant",
        warmup_ratio=0.0,
        clip_norm=0.0,
        frozen=("patch_decoder",),
        lora_groups=("llm",),
    )
    trainer, state = Trainer.create(model, LossConfig.from_string("100-12-8-6-4-2-2-1-1"), opt)
    assert not nnx.state(state.params, QuantizedKernel)  # nothing quantised is trained
    frozen_before = nnx.state(state.frozen, QuantizedKernel)
    assert frozen_before
    batch = random_batch(config)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = jax.jit(trainer.train_step)(state, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    for (path, old), new in zip(
        nnx.to_flat_state(frozen_before), jax.tree.leaves(nnx.state(state.frozen, QuantizedKernel))
    ):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old.get_value()), str(path))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params, before)
    assert max(jax.tree.leaves(moved)) > 0
    # A training checkpoint's checksum sees every bit of a 4-bit base.
    quantised = nnx.state(state.frozen, QuantizedKernel)
    leaves, treedef = jax.tree.flatten(quantised)
    i = next(i for i, x in enumerate(leaves) if x.dtype == jnp.int4)
    flipped = np.asarray(leaves[i]).astype(np.int8).ravel()
    flipped[5] = flipped[5] ^ 1 if flipped[5] != -8 else 7
    changed = list(leaves)
    changed[i] = jnp.asarray(flipped.reshape(leaves[i].shape), jnp.int4)
    before_sums = train_checkpoints.checksums(quantised)
    after_sums = train_checkpoints.checksums(jax.tree.unflatten(treedef, changed))
    assert [k for k in before_sums if before_sums[k] != after_sums[k]] == [list(before_sums)[i]]


def test_a_quantised_base_is_refused_as_fully_trained_weights(lm, tmp_path):
    config, model = _qlora(lm)
    with pytest.raises(ValueError) as err:
        model_checkpoint.save(model, config.to_hf(), tmp_path / "model")
    assert "quantised base kernels" in str(err.value) and "merge" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "model").exists()


def test_a_tile_that_does_not_divide_a_layer_is_named_and_changes_nothing(lm):
    model = nnx.clone(lm[1])
    before = linear_layers(model)
    with pytest.raises(ValueError, match=r"lora.quantize_tile=24: does not divide the inputs"):
        quantize_base(model, Quantization("int8", 24), GROUPS)
    assert linear_layers(model) == before and not nnx.state(model, QuantizedKernel)
    with pytest.raises(ValueError, match="lora.quantize='nf4'"):
        Quantization("nf4", 16)


@pytest.mark.e2e  # two whole training runs and an export
def test_a_qlora_run_resumes_its_quantised_base_and_exports_merged_weights(
    demo_data, tmp_path, capsys
):
    """The train entry point with an int8 base: a checkpoint holds the quantised base and a
    longer run resumes from it with the same losses as one straight run; the export is the plain
    architecture (adapters merged) beside the PEFT directory."""
    from experiments import train
    from mimo_jax.lm import adapters

    qlora = {"lora.rank": 4, "lora.quantize": "int8", "lora.quantize_tile": 16}
    qlora.update(total_steps=4, checkpoint_every=2)
    # The straight run exports nothing (the resumed one exports: a merge and a save fewer).
    assert train.run(smoke(demo_data, export_model=False, **qlora), str(tmp_path)) == 0
    assert not (tmp_path / "model").exists()
    straight = train_losses(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if preempted after the step-2 checkpoint
    capsys.readouterr()
    assert train.run(smoke(demo_data, **qlora), str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "step 3/4" in out and "step 2/4" not in out  # resumed from the int8 base of step 2
    assert train_losses(tmp_path) == straight and sorted(straight) == [1, 2, 3, 4]
    _, model = model_checkpoint.load(str(tmp_path / "model"))
    assert not adapted(model) and not nnx.state(model, QuantizedKernel)
    assert (tmp_path / "adapter" / adapters.CONFIG_FILE).is_file()
