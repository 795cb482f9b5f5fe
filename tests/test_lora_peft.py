"""LoRA adapters for PyTorch: `peft` loads the exported adapter directory onto the official-format
fixture model, and its merge equals the merged export that convert_torch_weights.py turns into an
official directory; the directory loads back into the JAX model, and one made for another base is
refused with its shapes named (torch, transformers and peft come with the test extra)."""

import json

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import convert_torch_weights
from mimo_jax import model_checkpoint as model_ckpt
from mimo_jax.conversion.convert import load_torch_checkpoint
from mimo_jax.inference.mimo_audio import load_lm
from mimo_jax.lm import adapters
from mimo_jax.lm.config import small_config
from mimo_jax.lm.conversion import LMFamily
from mimo_jax.lm.groups import group_of
from mimo_jax.lm.lora import LoraConfig, adapted, apply_lora, merge_lora, module_at
from mimo_jax.lm.model import MiMoAudioLM

TARGETS = (
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    r"local_transformer\.layers\.\d+\.self_attn\.[qv]_proj",
    "lm_head",
    r"local_transformer_lm_heads\.3",
)
ENCODER = ("input_local_transformer.", "speech_embeddings.", "speech_group_downcast.")


def official_model(root):
    """The official MiMoAudioForCausalLM's module tree (transformers' Qwen2Model for its three
    transformers, Linear heads and projections, Embedding tables), sizes read from the fixture's
    tensors and config, its weights loaded strictly (every official name present, no other)."""
    from safetensors.torch import load_file as load_torch

    hf = json.loads((root / "config.json").read_text())
    sd = load_torch(root / "model.safetensors")

    def stack(prefix, heads, kv_heads, vocab=None):
        q = sd[f"{prefix}.layers.0.self_attn.q_proj.weight"]
        layers = {k.split(".")[2] for k in sd if k.startswith(f"{prefix}.layers.")}
        cfg = transformers.Qwen2Config(
            vocab_size=vocab or 1,
            hidden_size=q.shape[1],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=q.shape[0] // heads,
            intermediate_size=sd[f"{prefix}.layers.0.mlp.up_proj.weight"].shape[0],
            num_hidden_layers=len(layers),
            rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=hf["rope_theta"],
        )
        m = transformers.Qwen2Model(cfg)
        if vocab is None:
            del m.embed_tokens  # deleted by the official code too
        return m

    def linear(name):
        out_f, in_f = sd[f"{name}.weight"].shape
        return torch.nn.Linear(in_f, out_f, bias=False)

    channels = len([k for k in sd if k.startswith("speech_embeddings.")])
    m = torch.nn.Module()
    m.model = stack("model", hf["num_attention_heads"], hf["num_key_value_heads"], hf["vocab_size"])
    m.lm_head = linear("lm_head")
    m.local_transformer = stack("local_transformer", hf["local_attn_heads"], hf["local_attn_heads"])
    m.input_local_transformer = stack(
        "input_local_transformer", hf["local_attn_heads"], hf["local_attn_heads"]
    )
    m.speech_embeddings = torch.nn.ModuleList(
        torch.nn.Embedding(*sd[f"speech_embeddings.{c}.weight"].shape) for c in range(channels)
    )
    m.local_transformer_lm_heads = torch.nn.ModuleList(
        linear(f"local_transformer_lm_heads.{c}") for c in range(channels)
    )
    m.speech_group_downcast = linear("speech_group_downcast")
    m.hidden_states_downcast = linear("hidden_states_downcast")
    m.load_state_dict(sd, strict=True)
    return m


@pytest.fixture(scope="module")
def exported(fixtures_root, tmp_path_factory):
    """The fixture LM as a LoRA run leaves it: random non-zero adapters on the backbone and the
    patch decoder (lora_b = 0 would hide a wrong name, layout or scale) and a patch encoder trained
    in full (every parameter moved); its adapter directory, and its merged export converted to an
    official directory."""
    out = tmp_path_factory.mktemp("lora")
    config, model = load_torch_checkpoint(fixtures_root / "lm", LMFamily())
    apply_lora(
        model,
        LoraConfig(4, 12.0, 0.0, TARGETS),
        rngs=nnx.Rngs(1),
        lora_groups=("llm", "patch_decoder"),
    )
    rng = np.random.default_rng(0)
    for _, module in adapted(model):
        for var in (module.lora.lora_a, module.lora.lora_b):
            var.set_value(jnp.asarray(rng.normal(0, 0.1, var.shape), var.dtype))
    for path, _ in model_ckpt.flat_params(model):
        if group_of(path) == "patch_encoder":
            var = module_at(model, path)
            var.set_value(var[...] + jnp.asarray(rng.normal(0, 0.01, var.shape), var.dtype))
    adapters.save(model, out / "adapter", full_groups=("patch_encoder",))
    model_ckpt.save(merge_lora(model), config.to_hf(), out / "merged")
    assert convert_torch_weights.main([str(out / "merged"), str(out / "official"), "--quiet"]) == 0
    return model, out


def test_peft_loads_the_adapters_and_merges_to_our_merged_export(exported, fixtures_root):
    model, out = exported
    saved = load_file(out / "adapter" / adapters.WEIGHTS_FILE)
    peft_model = peft.PeftModel.from_pretrained(
        official_model(fixtures_root / "lm"), str(out / "adapter")
    )
    # (PEFT would add the base embedding and lm_head weights here, lm_head being a target.)
    loaded = peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    base = load_file(fixtures_root / "lm" / "model.safetensors")
    lora_names = {n for n in saved if ".lora_" in n}
    assert len(lora_names) == 2 * (7 * 2 + 2 * 2 + 2)
    assert {n.removeprefix(adapters.PREFIX) for n in set(saved) - lora_names} == {
        n for n in base if n.startswith(ENCODER)
    }  # the patch encoder, as modules_to_save
    assert set(loaded) == set(saved)
    for name, value in saved.items():
        np.testing.assert_array_equal(loaded[name].numpy(), value, err_msg=name)
    merged = {k: v.detach().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    ours = load_file(out / "official" / "model.safetensors")
    assert set(merged) == set(ours)
    for name, value in ours.items():
        np.testing.assert_allclose(merged[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
    # The adapters changed the weights they adapt, the patch encoder changed, nothing else did.
    changed = {n for n in ours if np.max(np.abs(ours[n] - base[n])) > 1e-4}
    adapted_names = {
        n.removeprefix(adapters.PREFIX).replace(".lora_A", "") for n in saved if ".lora_A." in n
    }
    assert changed == adapted_names | {n for n in base if n.startswith(ENCODER)}


def test_adapter_directory_loads_back_for_inference(exported, fixtures_root):
    model, out = exported
    config = json.loads((out / "adapter" / adapters.CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 12.0, "LORA")
    _, fresh = load_torch_checkpoint(fixtures_root / "lm", LMFamily())
    layers = adapters.load(fresh, out / "adapter")
    assert [layer.name for layer in layers] == [layer.name for layer, _ in adapted(model)]
    for (_, want), (_, got) in zip(adapted(model), adapted(fresh)):
        np.testing.assert_array_equal(got.lora.lora_a[...], want.lora.lora_a[...])
        np.testing.assert_array_equal(got.lora.lora_b[...], want.lora.lora_b[...])
        assert got.scale == want.scale == 3.0
    for path, var in model_ckpt.flat_params(model):
        if group_of(path) == "patch_encoder":  # the modules trained in full
            np.testing.assert_array_equal(module_at(fresh, path)[...], var[...])
    # Inference loads the base with the adapters merged in.
    _, merged = load_lm(fixtures_root / "lm", adapter=out / "adapter")
    np.testing.assert_allclose(
        merged.model.layers.mlp.down_proj.kernel[...],
        merge_lora(model).model.layers.mlp.down_proj.kernel[...],
        rtol=1e-6,
        atol=1e-6,
    )


def test_adapters_of_another_base_are_refused_with_their_shapes(exported):
    _, out = exported
    other = nnx.eval_shape(
        lambda: MiMoAudioLM(small_config(hidden_size=96, head_dim=24), rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match="holds adapters for another base model") as err:
        adapters.load(other, out / "adapter")
    assert (
        "model.layers.0.self_attn.q_proj.lora_A.weight has shape [4, 64]; this model's layer "
        "[in 96, out 96] takes [4, 96]"
    ) in str(err.value)
    assert not adapted(other)
