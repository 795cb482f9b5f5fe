"""The MiMo-Audio tokenizer as a model family of the checkpoint converter.

NNX attribute names mirror the official module names, so the rules are mechanical: join the path
with dots, `{i}` after a stacked `layers`, `kernel` -> `weight` with the transform of its module
type, `scale` -> `weight`. Three renames remain: `down_sample_layer` is `down_sample_layer.0`
(an nn.Sequential), and codebook q and its training buffers live at
`quantizer.vq.layers.{q}._codebook.{embed,inited,cluster_size,embed_avg}`.
"""

import jax.numpy as jnp
from flax import nnx

from mimo_jax.conversion.family import TensorRule
from mimo_jax.tokenizer import config as config_lib
from mimo_jax.tokenizer.config import ARCHITECTURE, TokenizerConfig
from mimo_jax.tokenizer.model import MiMoAudioTokenizer

_CONV1D = {"conv1", "conv2", "down_sample_layer"}
_CONV_TRANSPOSE1D = {("dconv1", "conv"), ("dconv2", "conv")}
# A codebook's entries and its training buffers (k-means flag, EMA statistics), official names.
_CODEBOOK = ("embed", "inited", "cluster_size", "embed_avg")


class TokenizerFamily:
    name = "MiMo-Audio tokenizer"
    architecture = ARCHITECTURE
    ignored: tuple[str, ...] = (
        # Rotary inverse frequencies: recomputed from rope_theta (non-persistent in the official
        # code; ignored should a checkpoint carry them).
        r".*\.inv_freq",
    )

    def config_from_hf(self, hf_config: dict) -> TokenizerConfig:
        return config_lib.from_hf(hf_config)

    def config_to_hf(self, config: TokenizerConfig) -> dict:
        return config_lib.to_hf(config)

    def build(
        self, config: TokenizerConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=None
    ) -> nnx.Module:
        if param_dtype is not None and jnp.dtype(param_dtype) != jnp.float32:
            raise ValueError(
                f"tokenizer parameters are float32 (asked for {param_dtype}); "
                f"choose the compute dtype with `dtype`"
            )
        return MiMoAudioTokenizer(config, dtype=dtype, rngs=rngs)

    def rule(self, path: tuple) -> TensorRule:
        names = [str(p) for p in path]
        *modules, leaf = names
        if leaf in _CODEBOOK and modules[-3:-1] == ["quantizer", "layers"]:
            prefix = ".".join(modules[:-2])
            return TensorRule(f"{prefix}.vq.layers.{modules[-1]}._codebook.{leaf}", "identity")
        out = []
        for i, name in enumerate(modules):
            out.append(name)
            if name == "layers" and i + 1 < len(modules) and not modules[i + 1].isdigit():
                out.append("{i}")
            if name == "down_sample_layer":
                out.append("0")
        transform = "identity"
        if leaf == "kernel":
            leaf = "weight"
            if tuple(modules[-2:]) in _CONV_TRANSPOSE1D:
                transform = "conv_transpose1d"
            elif modules[-1] in _CONV1D:
                transform = "conv1d"
            else:
                transform = "linear"
        elif leaf == "scale":
            leaf = "weight"
        elif leaf not in ("bias", "window"):
            raise KeyError(f"no official tensor for tokenizer parameter {'.'.join(names)}")
        return TensorRule(".".join(out + [leaf]), transform)
