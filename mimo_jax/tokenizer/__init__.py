"""The MiMo-Audio audio tokenizer in Flax NNX: 24 kHz speech <-> 25 Hz frames of 20 RVQ codes.

Modules: config (official config.json), frontend (log-mel in JAX), encoder, quantizer (RVQ),
decoder (transposed convs + causal transformer), vocoder (transformer vocoder + ISTFT head), model
(MiMoAudioTokenizer over padded batches with lengths), audio_tokenizer (`Tokenizer` on whole clips:
segmenting, batching by length; `load_encoder` / `load_decoder`), streaming (chunked decode with
context), audio_io (files and their errors), conversion (the converter family),
tokenizer_checkpoint (loading from an official or a model checkpoint), __main__ (command line:
`python -m mimo_jax.tokenizer encode|decode`).
"""


def __getattr__(name):
    # `load_encoder` / `load_decoder` without importing the model when only the config is needed.
    if name in ("load_encoder", "load_decoder", "Tokenizer"):
        from mimo_jax.tokenizer import audio_tokenizer

        return getattr(audio_tokenizer, name)
    raise AttributeError(f"module 'mimo_jax.tokenizer' has no attribute {name!r}")
