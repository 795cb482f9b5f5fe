"""What the converter needs to know of a model family (the LM, the audio tokenizer).

A family maps every NNX parameter path of its model to one official tensor name (with `{i}` for the
index of a stacked layer, whose parameter then has a leading `layers` axis) and a transform, and
names by regular expression the official tensors it deliberately does not use. The converter checks
that these rules account for every tensor of a checkpoint, in both directions.
"""

import dataclasses
import re
from typing import Any, Protocol

from flax import nnx


@dataclasses.dataclass(frozen=True)
class TensorRule:
    torch_name: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    transform: str  # a key of conversion.transforms.TRANSFORMS

    @property
    def stacked(self) -> bool:
        return "{i}" in self.torch_name


class ModelFamily(Protocol):
    name: str  # a human name, e.g. "MiMo-Audio LM"
    architecture: str  # config.json "architectures"[0]
    ignored: tuple[str, ...]  # regexes (full match) of official tensors deliberately not used

    def config_from_hf(self, hf_config: dict) -> Any: ...

    def config_to_hf(self, config: Any) -> dict: ...

    def build(self, config: Any, *, rngs: nnx.Rngs, dtype=None, param_dtype=None) -> nnx.Module:
        """The model with randomly initialised parameters (the converter calls it under
        nnx.eval_shape, so that only shapes and dtypes are made)."""

    def rule(self, path: tuple[str, ...]) -> TensorRule:
        """The official tensor of the parameter at this NNX state path."""


def is_ignored(family: ModelFamily, torch_name: str) -> bool:
    return any(re.fullmatch(p, torch_name) for p in family.ignored)
