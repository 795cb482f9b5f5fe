"""The LM's conversion family: NNX parameter paths <-> official `MiMoAudioForCausalLM` tensors."""

import jax.numpy as jnp
from flax import nnx

from mimo_jax.conversion.family import TensorRule
from mimo_jax.lm.config import ARCHITECTURE, MiMoAudioConfig
from mimo_jax.lm.model import MiMoAudioLM

_LEAF = {
    "kernel": ("weight", "linear"),
    "bias": ("bias", "identity"),
    "scale": ("weight", "identity"),
    "embedding": ("weight", "identity"),
}


class LMFamily:
    name = "MiMo-Audio LM"
    architecture = ARCHITECTURE
    ignored: tuple[str, ...] = (
        r".*\.rotary_emb\.inv_freq",  # a non-persistent buffer, recomputed from rope_theta
        # Deleted right after construction by the official code; present only in odd exports.
        r"(local_transformer|input_local_transformer)\.embed_tokens\.weight",
    )

    def config_from_hf(self, hf_config: dict) -> MiMoAudioConfig:
        return MiMoAudioConfig.from_hf(hf_config)

    def config_to_hf(self, config: MiMoAudioConfig) -> dict:
        return config.to_hf()

    def build(
        self, config: MiMoAudioConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        return MiMoAudioLM(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def rule(self, path: tuple) -> TensorRule:
        *scope, leaf = (str(p) for p in path)
        if leaf not in _LEAF:
            raise KeyError(f"no conversion rule for parameter {'/'.join(map(str, path))}")
        suffix, transform = _LEAF[leaf]
        if "layers" in scope:  # a stacked Qwen2 block: one official tensor per layer
            at = scope.index("layers")
            scope = scope[: at + 1] + ["{i}"] + scope[at + 1 :]
        return TensorRule(".".join(scope + [suffix]), transform)
