"""Rule presets: which mesh axes each logical axis of a parameter (`embed`, `mlp`, ...) may take.
`mimo_jax.nn.partitioning` applies a table (first fitting candidate per dimension, else replicated);
the experiment config picks one by name (`mesh.rules`)."""

from mimo_jax.nn.partitioning import Rules

# Pure FSDP: shard every large parameter along one axis over `fsdp` (and `data` when it is used
# for FSDP-style data parallelism across slices).
FSDP_RULES: Rules = {
    "embed": (("fsdp", "data"), "fsdp"),
    "vocab": (("fsdp", "data"), "fsdp"),
    "mlp": (("fsdp", "data"), "fsdp"),
    "q_heads": (("fsdp", "data"), "fsdp"),
    "kv_heads": (("fsdp", "data"), "fsdp"),
    "embed_local": (("fsdp", "data"), "fsdp"),
}
# FSDP over `fsdp` plus tensor (Megatron) parallelism over `tensor`: heads, MLP and vocabulary are
# split across `tensor`, the model dimension across `fsdp`.
FSDP_TENSOR_RULES: Rules = {
    "embed": ("fsdp",),
    "embed_local": ("fsdp",),
    "vocab": ("tensor", "fsdp"),
    "mlp": ("tensor", "fsdp"),
    "q_heads": ("tensor", "fsdp"),
    "kv_heads": ("tensor", "fsdp"),
}
# Data parallel only: every parameter replicated.
DATA_RULES: Rules = {}

PRESETS: dict[str, Rules] = {
    "fsdp": FSDP_RULES,
    "fsdp_tensor": FSDP_TENSOR_RULES,
    "data": DATA_RULES,
}
