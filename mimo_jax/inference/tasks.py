"""The former name of `mimo_jax.inference.mimo_audio`, kept so that imports written for it still
work; new code imports `mimo_audio`."""

from mimo_jax.inference.mimo_audio import *  # noqa: F403
