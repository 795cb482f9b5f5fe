"""The `data` section of an experiment config, with the group layout taken from the model.

The layout (group size, audio channels, the per-channel empty ids) is a fact of the LM and is read
from its config (`DataConfig.for_model`), never restated in the data config. Loss weights are not
here either: the pipeline marks which targets exist (text, speech, the `<|empty|>` factor) and the
loss (`mimo_jax.train.losses.LossConfig`) weighs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mimo_jax.lm.config import AUDIO_DEFAULTS, parse_dashed


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Layout and packing of the training examples.

    group_size: code frames per LLM position (patch).
    audio_channels: RVQ codebooks the LM models.
    empty_ids: per-channel "empty" code id that fills the codes of text groups.
    (Their defaults are the official LM's, `mimo_jax.lm.config.AUDIO_DEFAULTS`.)
    empty_text_weight: factor on the text target weight where the target is `<|empty|>` (0.01 in
      the public third-party trainer).
    context_length: groups per packed row (8192 in the report).
    skip_bad_records: skip and count a corrupt record or an over-long document instead of stopping.
    """

    group_size: int = AUDIO_DEFAULTS["group_size"]
    audio_channels: int = AUDIO_DEFAULTS["audio_channels"]
    empty_ids: tuple[int, ...] = parse_dashed(AUDIO_DEFAULTS["speech_zeroemb_idx"])
    empty_text_weight: float = 0.01
    context_length: int = 8192
    skip_bad_records: bool = False

    def __post_init__(self):
        if len(self.empty_ids) != self.audio_channels:
            raise ValueError(
                f"data config: {len(self.empty_ids)} empty ids {self.empty_ids} for "
                f"{self.audio_channels} audio channels"
            )

    @classmethod
    def for_model(cls, model, section: Mapping[str, Any] | None = None) -> "DataConfig":
        """The layout of `model` (a MiMoAudioConfig) and the packing keys of a `data` config
        section (other keys of the section are ignored)."""
        layout = dict(
            group_size=model.group_size,
            audio_channels=model.audio_channels,
            empty_ids=tuple(model.speech_empty_ids),
        )
        names = {f.name for f in dataclasses.fields(cls)} - set(layout)
        items = dict(section.items()) if section is not None else {}
        return cls(**layout, **{k: v for k, v in items.items() if k in names})
