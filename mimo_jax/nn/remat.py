"""Rematerialisation policies chosen by name in the config (MaxText's names): the one table.

Layers tag their projections with `checkpoint_name`, so the named policies can keep exactly those.
"""

import jax

_SAVE_QKV = ("query_proj", "key_proj", "value_proj")
_cp = jax.checkpoint_policies
POLICIES = {
    "none": None,  # no rematerialisation
    "full": _cp.nothing_saveable,
    "minimal": _cp.checkpoint_dots_with_no_batch_dims,
    "save_qkv_proj": _cp.save_only_these_names(*_SAVE_QKV),
    "save_dot_except_mlp": _cp.save_only_these_names(*_SAVE_QKV, "out_proj"),
}


def policy(name: str):
    """The jax.checkpoint policy of a name; None for 'none' (no rematerialisation)."""
    if name not in POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {sorted(POLICIES)}")
    return POLICIES[name]


def maybe_remat(fn, name: str):
    """fn wrapped in jax.checkpoint with the named policy (unchanged for 'none')."""
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=policy(name), prevent_cse=False)
