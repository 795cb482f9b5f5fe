"""The same train step gives the same loss and parameters on one device and on a simulated
8-device mesh, under every preset of logical-axis rules."""

import jax
import numpy as np
import pytest
from flax import nnx
from train_support import TWO_CHANNELS, random_batch

from mimo_jax.lm.config import small_config
from mimo_jax.lm.model import MiMoAudioLM
from mimo_jax.nn.partitioning import batch_sharding, state_shardings, use_rules
from mimo_jax.train.losses import LossConfig
from mimo_jax.train.optimizer import OptimizerConfig
from mimo_jax.train.step import Trainer
from sharding.mesh import make_mesh
from sharding.rules import PRESETS

MESHES = {"data": {"data": 8}, "fsdp": {"fsdp": 8}, "fsdp_tensor": {"fsdp": 4, "tensor": 2}}


TINY = dict(
    vocab_size=128,
    hidden_size=32,
    head_dim=8,
    intermediate_size=64,
    local_dim=16,
    input_local_dim=16,
    local_ffn_dim=32,
    local_attn_dropout=0.0,
    empty_idx=127,
    sosp_idx=122,
    eosp_idx=123,
    sostm_idx=124,
    eostm_idx=125,
    eot_idx=126,
    **TWO_CHANNELS,
)


def _one_step(preset: str, devices):
    config = small_config(**TINY)
    mesh = make_mesh(MESHES[preset] if len(devices) > 1 else {}, devices=devices)
    rules = PRESETS[preset]
    model = MiMoAudioLM(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))
    opt = OptimizerConfig(
        {"patch_encoder": 1e-3, "llm": 1e-3, "patch_decoder": 1e-3}, total_steps=10
    )
    trainer, train_state = Trainer.create(model, LossConfig.from_string("100-12-8"), opt)
    batch = {
        k: jax.device_put(v, batch_sharding(mesh, v.ndim))
        for k, v in random_batch(config, b=8, g=8).items()
    }
    with jax.set_mesh(mesh), use_rules(rules):
        new, metrics = jax.jit(trainer.train_step)(train_state, batch, jax.random.key(0))
    kernel = new.params["model"]["layers"]["mlp"]["gate_proj"]["kernel"][...]
    return float(metrics["loss"]), float(metrics["grad_norm"]), np.asarray(kernel), kernel.sharding


@pytest.fixture(scope="module")
def one_device():
    return _one_step("data", jax.devices()[:1])  # on one device every preset is the same


@pytest.mark.parametrize("preset", sorted(MESHES))
def test_one_device_equals_eight(preset, one_device):
    loss1, norm1, kernel1, _ = one_device
    loss8, norm8, kernel8, sharding = _one_step(preset, jax.devices())
    assert len(sharding.device_set) == 8
    assert sharding.is_fully_replicated == (preset == "data")
    assert loss8 == pytest.approx(loss1, rel=1e-5)
    assert norm8 == pytest.approx(norm1, rel=1e-4)
    # Adam divides by sqrt(v): where a gradient is tiny, reduction-order noise moves its update by
    # a visible fraction of the learning rate (1e-3); 1e-5 is 1% of it.
    np.testing.assert_allclose(kernel8, kernel1, atol=1e-5)
