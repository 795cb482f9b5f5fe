"""Compute and parameter dtypes by the names that configs and command lines use."""

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_named(name: str, what: str):
    """The dtype called `name`; `what` names the setting in errors ("config model.dtype")."""
    if name not in DTYPES:
        raise ValueError(f"{what}={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]
