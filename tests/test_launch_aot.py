"""experiments.aot on the demo model for 8 simulated devices, the optimizer state's placement, and
the trainable-parameter count of a LoRA state and the quantised base of a QLoRA one."""

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from train_support import xla_env

from experiments import aot_lib
from experiments.configs import demo
from mimo_jax.lm.config import MiMoAudioConfig
from mimo_jax.lm.groups import group_of
from mimo_jax.nn.quantized import QuantizedKernel
from mimo_jax.train import build, flops
from mimo_jax.train.optimizer import path_of
from sharding.mesh import mesh_and_rules

ROOT = Path(__file__).resolve().parents[1]


def _bytes(out: str, name: str) -> int:
    return int(re.search(rf"^  {name} .*\((\d+) bytes\)$", out, re.M).group(1))


def test_aot_reports_sharded_per_device_memory():
    cmd = [
        sys.executable,
        "-m",
        "experiments.aot",
        "--config",
        "experiments/configs/demo.py:smoke=True",
        "--devices",
        "8",
        "--mesh",
        "fsdp=8",
        "--rules",
        "fsdp",
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, env=xla_env(8), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    last = out.strip().splitlines()[-1]
    match = re.fullmatch(r"per-device memory: (\d+\.\d+) GiB", last)
    assert match and float(match.group(1)) > 0, last
    assert "on 8 devices, rules fsdp" in out and "global batch 8 rows x 128 groups" in out
    # Parameters and both Adam moments (fp32) are split over the 8 devices, not replicated.
    n = flops.parameter_count(demo_lm())
    assert _bytes(out, "arguments") < 3 * 4 * n / 2
    compiled = float(re.search(r"compiled \(XLA cost analysis\)\s+(\S+)", out).group(1))
    assert compiled > 0
    trained = re.search(r"^trainable parameters (\S+) of (\S+) \((\S+) %\)$", out, re.M)
    assert trained and trained.group(1) == trained.group(2), out  # stage 2 trains everything
    assert int(trained.group(1).replace(",", "")) >= n


def test_a_lora_state_trains_only_its_adapters():
    """The counts `experiments.aot` prints, on the recipe's targets at a small rank: the step
    updates r * (in + out) parameters per adapted projection, and the frozen base is all there."""
    from experiments.configs import lora_sft_7b

    config = demo.get_config("smoke=True")
    mesh, rules = mesh_and_rules(config)
    _, _, full = aot_lib.abstract_state(config, mesh, rules)
    config.lora = lora_sft_7b.get_config().lora
    config.lora.rank = 2
    lm, _, state = aot_lib.abstract_state(config, mesh, rules)
    per_layer = sum(
        i + o
        for i, o in (
            (lm.hidden_size, lm.num_attention_heads * lm.head_dim),
            (lm.hidden_size, lm.num_key_value_heads * lm.head_dim),
            (lm.hidden_size, lm.num_key_value_heads * lm.head_dim),
            (lm.num_attention_heads * lm.head_dim, lm.hidden_size),
        )
    )
    trainable = aot_lib.size_of(state.params)
    assert trainable == 2 * per_layer * lm.num_hidden_layers
    assert aot_lib.size_of(state.frozen) == aot_lib.size_of(full.params)


def test_a_qlora_state_holds_its_untrained_linear_layers_in_int8():
    """The frozen base of a QLoRA state: every linear layer of the LoRA and frozen groups as int8
    values (counted as parameters) with per-group scales, the same parameters as the float base
    in under half its bytes."""
    config = demo.get_config("smoke=True")
    mesh, rules = mesh_and_rules(config)
    config.lora.rank, config.lora.quantize_tile = 2, 16
    _, _, plain = aot_lib.abstract_state(config, mesh, rules)
    config.lora.quantize = "int8"
    _, _, state = aot_lib.abstract_state(config, mesh, rules)
    assert aot_lib.size_of(state.frozen) == aot_lib.size_of(plain.frozen)
    assert aot_lib.size_of(state.params) == aot_lib.size_of(plain.params)
    values = [
        (tuple(map(str, p)), v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(state.frozen, QuantizedKernel))
        if p[-1] == "kernel_values"
    ]
    assert values and all(x.dtype == jnp.int8 for _, x in values)
    assert {group_of(p) for p, _ in values} == {"patch_encoder", "llm", "patch_decoder"}
    # One int8 byte an entry and one float32 scale per 16: 1.25 bytes where the kernel took 4.
    kernels = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(plain.frozen)}
    float_bytes = sum(4 * kernels[tuple(p[:-1]) + ("kernel",)].size for p, _ in values)
    held = nnx.state(state.frozen, QuantizedKernel)
    assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(held)) == float_bytes * 1.25 / 4


def test_aot_compiles_the_tokenizer_stage1_step_sharded_by_the_rules():
    """The tokenizer's stage-1 step as its run compiles it: the state split over the 8 devices
    by the config's mesh rules (the arguments well under the replicated state)."""
    from experiments.configs import tokenizer_stage1

    config = tokenizer_stage1.get_config("demo")
    config.data.crop_seconds, config.data.max_text_tokens = 0.4, 8
    config = aot_lib.configure(config, aot_lib.parse_mesh("fsdp=-1"), None, 1)
    result = aot_lib.compile_tokenizer_step(config, text_vocab=64)
    out = aot_lib.tokenizer_report(config, result, result.compile_s)
    assert "on 8 devices (state sharded by mesh.rules fsdp)" in out
    assert "1 crop(s) of 0.4 s" in out
    state_bytes = 3 * 4 * result.parameters  # float32 parameters and two AdamW moments
    assert result.memory.argument_size_in_bytes < state_bytes / 2
    assert float(out.splitlines()[-1].split()[-2]) > 0


def demo_lm():
    return MiMoAudioConfig.from_hf(dict(demo.get_config("smoke=True").model.hf))


def test_a_mesh_that_does_not_fit_the_devices_is_named():
    config = demo.get_config("smoke=True")
    with pytest.raises(ValueError, match=r"needs 3 devices, but 8 are present"):
        aot_lib.configure(config, aot_lib.parse_mesh("fsdp=3"), None, 1)
    with pytest.raises(ValueError, match=r"--mesh item 'model=2': expected AXIS=SIZE"):
        aot_lib.parse_mesh("fsdp=4,model=2")


def test_global_batch_is_one_row_per_data_parallel_device():
    config = demo.get_config("smoke=True")
    c = aot_lib.configure(config, aot_lib.parse_mesh("fsdp=4,tensor=2"), "fsdp_tensor", 1)
    assert c.data.batch_size == 4 and c.mesh.rules == "fsdp_tensor"
    assert aot_lib.configure(config, aot_lib.parse_mesh("data=8"), None, 2).data.batch_size == 16


def test_build_trainer_places_adam_moments_like_their_parameters():
    config = demo.get_config("smoke=True")
    config.mesh.ici = {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    config.mesh.rules = "fsdp"
    mesh, rules = mesh_and_rules(config)
    _, model = build.build_model(config, mesh, rules)
    _, state = build.build_trainer(config, model)
    params = {
        path_of(kp): a.sharding for kp, a in jax.tree_util.tree_leaves_with_path(state.params)
    }
    moments = [
        (path_of(kp), a)
        for kp, a in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if a.ndim > 0
    ]
    assert len(moments) == 2 * len(params)
    for path, a in moments:
        own = [s for p, s in params.items() if path[-len(p) :] == p]
        assert own and a.sharding == own[0], path
    assert any(not s.is_fully_replicated for s in params.values())
    assert state.step.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), 0
    )
