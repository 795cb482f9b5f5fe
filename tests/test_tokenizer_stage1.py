"""One stage-1 tokenizer training step on a tiny tokenizer: the first batch's k-means, the weighted
loss of its three terms, gradients for the encoder, decoder, vocoder and A2T LM only, and the
codebooks moved by their EMA rule alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mimo_jax.tokenizer import rvq_training
from mimo_jax.tokenizer.a2t import A2TConfig, AudioToTextLM
from mimo_jax.tokenizer.config import TokenizerConfig
from mimo_jax.tokenizer.model import MiMoAudioTokenizer
from mimo_jax.tokenizer.stage1 import Stage1Config, Stage1Model, Stage1Trainer, encoded

TINY = TokenizerConfig(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    encoder_skip_layer_id=1,
    num_quantizers=3,
    codebook_size=(4, 4, 2),  # fewer entries than frames: no codebook fits them exactly
    decoder_layers=2,
    decoder_attention_heads=2,
    decoder_ffn_dim=64,
    vocoder_dim=32,
    vocoder_intermediate_dim=64,
    vocoder_num_layers=2,
    vocoder_attention_heads=2,
)


@pytest.fixture(scope="module")
def setup():
    model = Stage1Model(
        MiMoAudioTokenizer(TINY, rngs=nnx.Rngs(0)),
        AudioToTextLM(
            A2TConfig(vocab_size=20, hidden=16, layers=1, heads=2, kv_heads=1, ffn=32),
            TINY.d_model,
            rngs=nnx.Rngs(1),
        ),
    )
    rng = np.random.default_rng(0)
    samples = 9600  # 0.4 s: 10 codes
    t = np.arange(samples) / TINY.sampling_rate
    wav = np.stack([np.sin(2 * np.pi * f * t) * 0.3 for f in (220.0, 330.0)]).astype(np.float32)
    wav += rng.normal(0, 0.01, wav.shape).astype(np.float32)
    batch = {
        "wav": jnp.asarray(wav),
        "lengths": jnp.asarray([samples, 7680]),
        "text": jnp.asarray(rng.integers(0, 20, (2, 5)), jnp.int32),
        "text_lengths": jnp.asarray([5, 3]),
    }
    return model, batch


def test_a_step_trains_by_gradients_and_moves_the_codebooks_by_ema(setup):
    model, batch = setup
    cfg = Stage1Config(a2t_weight=10.0, kmeans_iters=5)
    trainer, state = Stage1Trainer.create(nnx.clone(model), optax.adamw(1e-3), cfg)
    assert trainer.needs_init(state)
    state = jax.jit(trainer.initialise)(state, batch, jax.random.key(0))  # as the run does
    assert not trainer.needs_init(state)
    before = trainer.model(state)
    codebooks = rvq_training.states_of(before.tokenizer.encoder.quantizer)
    # The quantizer's input, jitted as the step computes it, so that near-tied codes are chosen
    # alike.
    hidden, _, mask = jax.jit(lambda s: encoded(trainer.model(s).tokenizer, batch))(state)
    assert bool(mask[1, -2:].any()) is False
    new, metrics = jax.jit(trainer.train_step)(state, batch)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert int(new.step) == 1
    # The three terms, weighted as configured.
    parts = 10.0 * metrics["a2t_loss"] + metrics["recon_loss"] + metrics["commit_loss"]
    assert float(metrics["loss"]) == pytest.approx(float(parts), rel=1e-6)
    assert int(metrics["text_tokens"]) == 8
    # Every trained parameter moves (the A2T LM and the encoder through straight-through).
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), new.params, state.params)
    flat = dict(nnx.to_flat_state(moved))
    for path in (
        ("a2t", "lm_head", "kernel"),
        ("tokenizer", "encoder", "conv1", "kernel"),
        ("tokenizer", "decoder", "vocoder", "head", "out", "kernel"),
    ):
        assert flat[path].get_value() > 0, path
    # The codebooks are the EMA rule's update on the forward's input to the quantizer.
    ema = jax.jit(lambda c, h, m: rvq_training.train_step(c, h, cfg.ema, m)[1])
    want = ema(codebooks, hidden, mask)
    got = rvq_training.states_of(trainer.model(new).tokenizer.encoder.quantizer)
    for q, (a, b) in enumerate(zip(got, want)):
        for name, x, y in zip(rvq_training.CodebookState._fields, a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{q} {name}")


def test_bad_weights_are_named():
    with pytest.raises(ValueError, match="a2t_weight=-1.0: expected a number >= 0"):
        Stage1Config(a2t_weight=-1.0)
    with pytest.raises(ValueError, match="kmeans_iters=0"):
        dataclasses.replace(Stage1Config(), kmeans_iters=0)
