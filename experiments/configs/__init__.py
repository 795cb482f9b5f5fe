"""Experiment configs: one file per experiment family, each with `get_config(arg=None)`."""
