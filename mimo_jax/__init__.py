"""MiMo-Audio in JAX/Flax NNX: the audio language model, the audio tokenizer, training and
inference."""
