"""The `data` section of an experiment config: layout of the model's groups and the loss weights.

A plain dataclass so that it can be built from an ml-collections `ConfigDict` section
(`DataConfig.from_mapping(config.data)`) or directly in tests. Dash-separated strings follow the
official `MiMoAudioConfig` spelling (`"1024-1024-128-..."`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

STAGE1_LOSS_WEIGHTS = "1-0-0-0-0-0-0-0-0"
STAGE2_LOSS_WEIGHTS = "100-12-8-6-4-2-2-1-1"


def parse_dashed(value: str | Any, kind=int) -> tuple:
    """`"1-2-3"` -> `(1, 2, 3)`; sequences pass through (converted element-wise)."""
    if isinstance(value, str):
        return tuple(kind(v) for v in value.split("-"))
    return tuple(kind(v) for v in value)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Layout and loss weights of the training examples.

    group_size: code frames per LLM position (patch), 4 in the released models.
    audio_channels: RVQ codebooks the LM models, 8.
    speech_zeroemb_idx: per-channel "empty" code id that fills the codes of text groups.
    delay_pattern: per-channel delay of the patch decoder (used by `sequences.delay_patch`).
    loss_weights: text weight then one weight per codebook (stage 1 `1-0-...-0`, stage 2 and
      fine-tuning `100-12-8-6-4-2-2-1-1`).
    empty_text_weight: factor on the text weight where the text target is `<|empty|>` (0.01 in
      the public third-party trainer).
    context_length: groups per packed row (8192 in the report).
    skip_bad_records: skip and count a corrupt record or an over-long document instead of stopping.
    """

    group_size: int = 4
    audio_channels: int = 8
    speech_zeroemb_idx: str = "1024-1024-128-128-128-128-128-128"
    delay_pattern: str = "0-1-2-3-4-5-6-7"
    loss_weights: str = STAGE2_LOSS_WEIGHTS
    empty_text_weight: float = 0.01
    context_length: int = 8192
    skip_bad_records: bool = False

    def __post_init__(self):
        n = self.audio_channels
        for name, want in (
            ("speech_zeroemb_idx", n),
            ("delay_pattern", n),
            ("loss_weights", n + 1),
        ):
            got = len(parse_dashed(getattr(self, name), float))
            if got != want:
                raise ValueError(
                    f"data config: {name}={getattr(self, name)!r} has {got} values, "
                    f"expected {want} (audio_channels={n})"
                )

    @property
    def empty_ids(self) -> tuple[int, ...]:
        return parse_dashed(self.speech_zeroemb_idx)

    @property
    def delays(self) -> tuple[int, ...]:
        return parse_dashed(self.delay_pattern)

    @property
    def text_weight(self) -> float:
        return parse_dashed(self.loss_weights, float)[0]

    @property
    def codebook_weights(self) -> tuple[float, ...]:
        return parse_dashed(self.loss_weights, float)[1:]

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> "DataConfig":
        """Builds from a dict / ConfigDict, ignoring keys that belong to other parts of `data`."""
        names = {f.name for f in dataclasses.fields(cls)}
        items = section.items() if hasattr(section, "items") else dict(section).items()
        return cls(**{k: v for k, v in items if k in names})
