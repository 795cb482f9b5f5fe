"""Rematerialisation policies chosen by name in the config (MaxText's names).

Layers tag their projections with `checkpoint_name`, so the named policies can keep exactly those.
"""
import jax

_SAVE_QKV = ("query_proj", "key_proj", "value_proj")


def policy(name: str):
    """The jax.checkpoint policy of a name; None for 'none' (no rematerialisation)."""
    cp = jax.checkpoint_policies
    policies = {
        "none": None,
        "full": cp.nothing_saveable,
        "minimal": cp.checkpoint_dots_with_no_batch_dims,
        "save_qkv_proj": cp.save_only_these_names(*_SAVE_QKV),
        "save_dot_except_mlp": cp.save_only_these_names(*_SAVE_QKV, "out_proj"),
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {sorted(policies)}")
    return policies[name]


def maybe_remat(fn, name: str):
    """fn wrapped in jax.checkpoint with the named policy (unchanged for 'none')."""
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=policy(name), prevent_cse=False)
