"""The former name of `mimo_jax.inference.generation_loop`, kept so that imports written for it
still work; new code imports `generation_loop`."""

from mimo_jax.inference.generation_loop import *  # noqa: F403
