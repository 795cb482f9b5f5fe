"""LoRA adapters: what they compute (PEFT's formula, dropout on the adapter's input only), their
merge, the layers their patterns choose and the errors of a bad choice, that training gives
gradients and optimizer state to the adapters and fully trained groups only, and a LoRA run's
config checks and exports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_support import random_batch

from mimo_jax.lm.config import small_config
from mimo_jax.lm.groups import group_of
from mimo_jax.lm.lora import LoraConfig, LoRADense, adapted, apply_lora, merge_lora
from mimo_jax.lm.model import MiMoAudioLM
from mimo_jax.train.losses import LossConfig
from mimo_jax.train.optimizer import OptimizerConfig
from mimo_jax.train.step import Trainer

BACKBONE = r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def _lora(rank=4, alpha=8.0, dropout=0.0, targets=(BACKBONE,)) -> LoraConfig:
    return LoraConfig(rank, alpha, dropout, tuple(targets))


def _randomise(model, seed=1) -> None:
    """Non-zero adapters (lora_b starts at zero, which would hide a wrong merge or scale)."""
    rng = np.random.default_rng(seed)
    for _, module in adapted(model):
        for var in (module.lora.lora_a, module.lora.lora_b):
            var.set_value(jnp.asarray(rng.normal(0, 0.1, var.shape), var.dtype))


def test_adapted_layer_computes_peft_formula_and_drops_only_the_adapter_input(lm):
    model = nnx.clone(lm[1])  # the fixture LM (hidden 64, 2 layers)
    q_proj = r"model\.layers\.\d+\.self_attn\.q_proj"
    apply_lora(model, _lora(rank=3, alpha=12.0, dropout=0.5, targets=[q_proj]), rngs=nnx.Rngs(1))
    _randomise(model)
    q = model.model.layers.self_attn.q_proj
    assert isinstance(q, LoRADense) and q.lora.lora_a.shape == (2, 64, 3)
    graphdef, stacked = nnx.split(q)
    layer = nnx.merge(graphdef, jax.tree.map(lambda v: v[0], stacked))  # layer 0 of the stack
    w, b = np.asarray(q.kernel[0]), np.asarray(q.bias[0])
    a_, b_ = np.asarray(q.lora.lora_a[0]), np.asarray(q.lora.lora_b[0])
    x = np.random.default_rng(2).normal(size=(5, 64)).astype(np.float32)
    want = x @ w + b + 12.0 / 3 * (x @ a_ @ b_)
    np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
    key = jax.random.key(3)
    dropped = np.asarray(layer(jnp.asarray(x), dropout_rng=key))
    keep = np.asarray(jax.random.bernoulli(key, 0.5, x.shape))
    want = x @ w + b + 4.0 * ((np.where(keep, x / 0.5, 0)) @ a_ @ b_)
    np.testing.assert_allclose(dropped, want, rtol=1e-5, atol=1e-5)


def test_adapters_start_as_the_base_model_and_merge_into_it(lm):
    config, model = lm[0], nnx.clone(lm[1])
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.integers(0, config.vocab_size, (1, 6)))
    codes = jnp.asarray(rng.integers(0, 128, (1, 6, config.group_size, config.audio_channels)))
    forward = nnx.jit(
        lambda m, key=None: m.backbone(m.embed_inputs(text, codes), jnp.arange(6)[None], None, key)
    )
    base = forward(model)
    targets = (
        BACKBONE,
        r"input_local_transformer\.layers\.\d+\.mlp\.up_proj",
        r"speech_group_downcast",
    )
    apply_lora(model, _lora(targets=targets), rngs=nnx.Rngs(1))
    assert len(adapted(model)) == 9
    # lora_b = 0: the model computes what it did
    np.testing.assert_allclose(forward(model), base, rtol=1e-6, atol=1e-6)
    _randomise(model)
    adapted_out = forward(model)
    assert float(jnp.max(jnp.abs(adapted_out - base))) > 1e-2
    merged = merge_lora(model)
    assert not adapted(merged) and adapted(model)  # a merged copy; the adapted model kept
    np.testing.assert_allclose(forward(merged), adapted_out, rtol=1e-4, atol=1e-5)
    # The merged kernel is W + alpha/r * A @ B, per stacked layer.
    up = model.input_local_transformer.layers.mlp.up_proj
    want = np.asarray(up.kernel[1]) + 2.0 * np.asarray(up.lora.lora_a[1]) @ np.asarray(
        up.lora.lora_b[1]
    )
    np.testing.assert_allclose(
        merged.input_local_transformer.layers.mlp.up_proj.kernel[1], want, rtol=1e-6, atol=1e-6
    )
    # The backbone passes its dropout key to the adapters (and to nothing else).
    for _, module in adapted(model):
        module.dropout = 0.5
    assert float(jnp.max(jnp.abs(forward(model, jax.random.key(0)) - adapted_out))) > 1e-3


def _messages(model, cfg, groups=None) -> str:
    with pytest.raises(ValueError) as err:
        apply_lora(model, cfg, rngs=nnx.Rngs(0), lora_groups=groups)
    assert not adapted(model)  # nothing was changed
    return str(err.value)


def test_bad_choices_are_named_and_change_nothing():
    model = nnx.eval_shape(lambda: MiMoAudioLM(small_config(), rngs=nnx.Rngs(0)))
    text = _messages(model, _lora(targets=[r"model\.layers\.\d+\.attn\.q"]))
    assert r"lora.targets pattern 'model\.layers\.\d+\.attn\.q' matches no linear layer" in text
    for name in (
        "model.layers.{i}.self_attn.q_proj (i = 0..1)",
        "lm_head",
        "local_transformer_lm_heads.7",
        "input_local_transformer.layers.{i}.mlp.down_proj",
    ):
        assert name in text
    text = _messages(model, _lora(targets=[r"model\.layers\.0\.self_attn\.q_proj"]))
    assert (
        "lora.targets match layers [0] of model.layers.{i}.self_attn.q_proj (i = 0..1), not all 2"
    ) in text
    text = _messages(
        model,
        _lora(
            rank=33,
            targets=[
                r"local_transformer\.layers\.\d+\.self_attn"
                r"\.o_proj"
            ],
        ),
    )
    assert (
        "lora.rank=33: wider than layer local_transformer.layers.{i}.self_attn.o_proj "
        "[in 32, out 32]; expected a rank <= 32"
    ) in text
    text = _messages(model, _lora(targets=[BACKBONE, "lm_head"]), groups=("llm", "patch_decoder"))
    assert "lora.modes.patch_decoder='lora': lora.targets match none of its layers" in text
    text = _messages(model, _lora(targets=[BACKBONE, "hidden_states_downcast"]), groups=("llm",))
    assert (
        "lora.targets match hidden_states_downcast of module group 'patch_decoder', which is "
        "not in LoRA mode"
    ) in text
    text = _messages(model, _lora(dropout=0.1, targets=[BACKBONE, "lm_head"]))
    assert "lora.dropout=0.1: layer lm_head is outside the transformer stacks" in text


def test_only_adapters_and_fully_trained_groups_train(lm):
    config, model = lm[0], nnx.clone(lm[1])
    apply_lora(model, _lora(dropout=0.1), rngs=nnx.Rngs(1), lora_groups=("llm",))
    before = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
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
    trained = {tuple(map(str, p)) for p, _ in nnx.to_flat_state(state.params)}
    for path, value in before.items():
        path = tuple(map(str, path))
        adapter = path[-2] == "lora"
        assert (path in trained) == (adapter or group_of(path) == "patch_encoder"), path
    # Adam's two moments exist for the trained parameters only (besides integer step counts).
    sizes = lambda tree: sum(
        x.size for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
    )
    assert sizes(state.opt_state) == 2 * sizes(state.params)
    batch = random_batch(config)
    state, metrics = jax.jit(trainer.train_step)(state, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    after = {
        p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(trainer.model(state), nnx.Param))
    }
    for path, value in before.items():
        moved = float(np.max(np.abs(np.asarray(after[path]) - np.asarray(value))))
        name = tuple(map(str, path))
        if name not in trained:
            assert moved == 0, name
        elif name[-1] == "lora_b" or name[-1] == "kernel":
            assert moved > 0, name


@pytest.fixture
def demo_config(tmp_path):
    """The demo's smoke config with adapters (rank 4), over what the checks read of a data
    directory: tokenizer.json with the demo's special ids and a shard manifest."""
    from data_pipelines.demo_text_tokenizer import word_level_tokenizer
    from data_pipelines.shards import write_manifest
    from experiments.config_checks import set_value
    from experiments.configs import demo
    from mimo_jax.tokenizer.config import TokenizerConfig

    (tmp_path / "shards").mkdir()
    write_manifest(str(tmp_path / "shards"), [], TokenizerConfig().codebook_sizes[:8], 25.0)
    word_level_tokenizer(["hello"]).save(str(tmp_path / "tokenizer.json"))

    def make(**overrides):
        config = demo.get_config(f"data={tmp_path},smoke")
        config.lora.rank = 4
        for key, value in overrides.items():
            set_value(config, key, value)
        return config

    return make


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"lora.rank": -1}, "lora.rank=-1: expected an integer >= 0"),
        ({"lora.dropout": 1.0}, "lora.dropout=1.0: expected a number in [0, 1)"),
        ({"lora.modes.llm": "half"}, "lora.modes.llm='half': expected one of lora, full, frozen"),
        (
            {"lora.modes.llm": "full"},
            "expected at least one group in 'lora' mode while lora.rank > 0",
        ),
        (
            {"optimizer.frozen": ("patch_encoder",), "lora.modes.patch_encoder": "full"},
            "lora.modes.patch_encoder='full': expected 'frozen' "
            "(optimizer.frozen lists patch_encoder)",
        ),
        ({"lora.targets": ("(",)}, "lora.targets='(': expected a regular expression"),
        (
            {"lora.quantize": "nf4"},
            "lora.quantize='nf4': expected '' (a base in its own dtype) or one of int8, int4",
        ),
        (
            {"lora.quantize": "int8", "lora.quantize_tile": 24},
            "lora.quantize_tile=24: expected a divisor of the 32 inputs of "
            "model.layers.{i}.self_attn.q_proj (i = 0..",
        ),
        (
            {"lora.targets": (r"model\.layers\.\d+\.mlp\.gate",)},
            r"lora.targets pattern 'model\.layers\.\d+\.mlp\.gate' matches no linear layer; "
            "the model's linear layers are: hidden_states_downcast; "
            "input_local_transformer.layers.{i}.mlp.down_proj",
        ),
        (
            {"lora.rank": 20},
            "lora.rank=20: wider than layer model.layers.{i}.self_attn.k_proj "
            "[in 32, out 16]; expected a rank <= 16",
        ),
    ],
)
def test_config_checks_name_bad_adapters(demo_config, overrides, expected):
    from experiments import config_checks

    config_checks.check(demo_config())  # the defaults with a rank: valid
    with pytest.raises(config_checks.ConfigError) as err:
        config_checks.check(demo_config(**overrides))
    assert expected in str(err.value)


def test_a_lora_run_builds_its_groups_and_exports_adapters_and_merged_model(
    demo_config, lm, tmp_path, monkeypatch
):
    """The run's wiring on the fixture LM (one device: the sharded build and the checkpoint
    write are tested elsewhere; the merged model's save and conversion in test_lora_peft)."""
    import json

    from mimo_jax.conversion import param_store
    from mimo_jax.lm import adapters
    from mimo_jax.train import build
    from sharding.rules import PRESETS

    config = demo_config(**{"lora.modes.patch_encoder": "full"})
    lm_config, model = lm[0], nnx.clone(lm[1])
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    model = build.add_adapters(config, model, mesh, PRESETS["data"])
    trainer, state = build.build_trainer(config, model)
    opt = trainer.optimizer
    assert (opt.lora_groups, opt.frozen) == (("llm",), ("patch_decoder",))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        assert var.get_value().sharding.mesh == mesh, path  # placed by the rules
    saved = {}
    monkeypatch.setattr(param_store, "save", lambda m, hf, path: saved.update(model=m, path=path))
    build.export(config, trainer, state, lm_config, tmp_path)
    assert saved["path"] == str(tmp_path / "model") and not adapted(saved["model"])
    peft_config = json.loads((tmp_path / "adapter" / adapters.CONFIG_FILE).read_text())
    assert peft_config["r"] == 4 and len(peft_config["target_modules"]) == 7 * 2
    assert peft_config["modules_to_save"] == (
        ["input_local_transformer"]
        + [f"speech_embeddings.{c}" for c in range(8)]
        + ["speech_group_downcast"]
    )
