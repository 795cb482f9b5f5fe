"""Evaluation: ASR error rates, multiple-choice scoring, and the runs behind `mimo_jax.evaluate`
and the evaluation during training."""
