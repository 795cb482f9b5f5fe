"""Loading a tokenizer from a checkpoint directory: an official one (config.json + safetensors,
read through the converter's checks) or a model checkpoint (config.json + Orbax params/) written by
convert_torch_weights.py."""

from pathlib import Path

from flax import nnx

from mimo_jax import model_checkpoint as model_checkpoint
from mimo_jax import paths
from mimo_jax.conversion import convert
from mimo_jax.tokenizer.config import TokenizerConfig
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
    if model_checkpoint.is_model_checkpoint(root):
        config, model = model_checkpoint.load(root, dtype=dtype)
    else:
        config, model = convert.load_torch_checkpoint(root)
        model = with_compute_dtype(config, model, dtype)
    if not isinstance(model, MiMoAudioTokenizer):
        raise ValueError(f"{root}: holds a {type(model).__name__}, not a MiMo-Audio tokenizer")
    return config, model
