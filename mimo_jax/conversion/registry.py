"""The model families `convert_torch_weights.py` and `checkpoint.load` know, by the official
config.json's architecture. The registry imports the families; no model imports the registry."""

from mimo_jax.conversion.family import ModelFamily
from mimo_jax.lm.conversion import LMFamily
from mimo_jax.tokenizer.conversion import TokenizerFamily

FAMILIES: dict[str, type] = {f.architecture: f for f in (LMFamily, TokenizerFamily)}


def family_for(hf_config: dict, where: str) -> ModelFamily:
    """The family of an official config.json, or an error naming what was found."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]()
    raise ValueError(
        f"{where}: architectures {archs} is not a model mimo-jax can convert "
        f"(expected one of: {', '.join(sorted(FAMILIES))})"
    )
