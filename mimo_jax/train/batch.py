"""The LM's training batch: its fields with their dtypes and shapes, which the data pipeline builds
(`data_pipelines.packing` says what each field holds), the train step reads and the ahead-of-time
compile traces. Axes: b rows, g groups per row, s group size, c audio channels."""

import numpy as np

SCHEMA: dict[str, tuple[str, tuple[str, ...]]] = {
    "text": ("int32", ("b", "g")),
    "codes": ("int32", ("b", "g", "s", "c")),
    "positions": ("int32", ("b", "g")),
    "segment_ids": ("int32", ("b", "g")),
    "text_targets": ("int32", ("b", "g")),
    "text_weights": ("float32", ("b", "g")),
    "code_targets": ("int32", ("b", "g", "s", "c")),
    "code_weights": ("float32", ("b", "g", "c")),
}
FIELDS = tuple(SCHEMA)


def shapes(
    rows: int, groups: int, group_size: int, channels: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{field: (shape, dtype)} of a batch of `rows` rows of `groups` groups."""
    size = {"b": rows, "g": groups, "s": group_size, "c": channels}
    return {
        k: (tuple(size[a] for a in axes), np.dtype(dtype)) for k, (dtype, axes) in SCHEMA.items()
    }
