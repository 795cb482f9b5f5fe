"""Loading a tokenizer from a checkpoint directory: an official one (config.json + safetensors,
read through the converter's checks) or a model checkpoint (config.json + Orbax params/) written by
convert_torch_weights.py."""

from pathlib import Path

from flax import nnx

from mimo_jax import paths
from mimo_jax.conversion import convert, param_store
from mimo_jax.tokenizer.config import TokenizerConfig
from mimo_jax.tokenizer.conversion import TokenizerFamily
from mimo_jax.tokenizer.model import MiMoAudioTokenizer


def with_compute_dtype(
    config: TokenizerConfig, model: MiMoAudioTokenizer, dtype
) -> MiMoAudioTokenizer:
    """The same parameters in a model that computes in `dtype` (None: float32)."""
    if dtype == model.dtype:
        return model
    abstract = nnx.eval_shape(lambda: MiMoAudioTokenizer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(abstract), nnx.state(model))


def load_tokenizer(path: str | Path, *, dtype=None) -> tuple[TokenizerConfig, MiMoAudioTokenizer]:
    """(config, model) with compute dtype `dtype`; errors name the directory and the problem."""
    root = paths.resolve(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: checkpoint directory does not exist")
    if param_store.is_model_checkpoint(root):
        return param_store.load(root, TokenizerFamily(), dtype=dtype)
    config, model = convert.load_torch_checkpoint(root, TokenizerFamily())
    return config, with_compute_dtype(config, model, dtype)
