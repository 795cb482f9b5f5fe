"""Stage-2 tokenizer training steps on a tiny tokenizer and thin discriminators: what a step
trains and what it leaves frozen, the spectral vectors carried forward, the weighted generator
loss, the discriminators learning on one batch, and the errors before training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_tokenizer_discriminators import SMALL
from test_tokenizer_stage1 import TINY

from mimo_jax.tokenizer.discriminators import DiscriminatorConfig, Discriminators
from mimo_jax.tokenizer.mel_loss import multiscale_mel_loss
from mimo_jax.tokenizer.model import MiMoAudioTokenizer
from mimo_jax.tokenizer.spectral_norm import SpectralVector
from mimo_jax.tokenizer.stage2 import (
    Stage2Model,
    Stage2Trainer,
    check_codebooks_trained,
    check_stage2,
)

SAMPLES = 4800  # 0.2 s: 5 codes; fits SMALL's largest n_fft (256) and the mel loss (> 480)


def _tokenizer() -> MiMoAudioTokenizer:
    tokenizer = MiMoAudioTokenizer(TINY, rngs=nnx.Rngs(0))
    # As a stage-1 checkpoint leaves them: codebooks initialised.
    for layer in tokenizer.encoder.quantizer.layers:
        layer.inited[...] = jnp.ones((1,), jnp.float32)
    return tokenizer


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    t = np.arange(SAMPLES) / TINY.sampling_rate
    wav = np.stack([np.sin(2 * np.pi * f * t) * 0.3 for f in (220.0, 330.0)]).astype(np.float32)
    wav += rng.normal(0, 0.01, wav.shape).astype(np.float32)
    wav[1, 3840:] = 0.0
    batch = {"wav": jnp.asarray(wav), "lengths": jnp.asarray([SAMPLES, 3840])}
    model = Stage2Model(_tokenizer(), Discriminators(SMALL, rngs=nnx.Rngs(1)))
    trainer, state = Stage2Trainer.create(model, optax.adamw(1e-4), optax.adam(1e-2))
    return trainer, state, jax.jit(trainer.train_step), batch


def _flat(state) -> dict:
    return {path: v.get_value() for path, v in nnx.to_flat_state(state)}


def _decoded(tokenizer, batch):
    """The audio decoded from the codes of the batch, zero past each length."""
    codes, code_lengths = tokenizer.encode(batch["wav"], batch["lengths"])
    wav, _ = tokenizer.decode(codes, code_lengths)
    wav = wav[:, :SAMPLES]
    wav = jnp.pad(wav, ((0, 0), (0, SAMPLES - wav.shape[1])))
    return jnp.where(jnp.arange(SAMPLES) < batch["lengths"][:, None], wav, 0.0)


@nnx.jit
def _recon_of_the_codes(tokenizer, batch):
    """The mel loss of the audio decoded from the codes."""
    wav = _decoded(tokenizer, batch)
    return multiscale_mel_loss(batch["wav"], wav, TINY.sampling_rate, batch["lengths"])


@nnx.jit
def _discriminator_logits(model, batch):
    """Each sub-discriminator's logits on the real crops and on the audio decoded from their codes
    (both zero past each length): what the step's discriminators see."""
    real = jnp.where(jnp.arange(SAMPLES) < batch["lengths"][:, None], batch["wav"], 0.0)
    fake = _decoded(model.tokenizer, batch)
    return [o.logits for o in model.discriminators(jnp.concatenate([real, fake]))]


def test_a_step_trains_the_decoder_and_discriminators_only(setup):
    trainer, state, step, batch = setup
    new, metrics = step(state, batch)
    assert int(new.step) == 1
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert float(metrics["gen_grad_norm"]) > 0 and float(metrics["disc_grad_norm"]) > 0
    weighted = metrics["recon_loss"] + metrics["adv_loss"] + 2.0 * metrics["fm_loss"]
    assert float(metrics["loss"]) == pytest.approx(float(weighted), rel=1e-6)
    # The decoder's input is the frozen quantizer's codes, decoded.
    recon = _recon_of_the_codes(trainer.model(state).tokenizer, batch)
    assert float(metrics["recon_loss"]) == pytest.approx(float(recon), rel=1e-4)
    # The generator trains the decoder and vocoder only; the discriminators their parameters only.
    assert {p[:2] for p in _flat(state.gen_params)} == {("tokenizer", "decoder")}
    assert {p[0] for p in _flat(state.disc_params)} == {"discriminators"}
    for before, after in ((state.gen_params, new.gen_params), (state.disc_params, new.disc_params)):
        before, after = _flat(before), _flat(after)
        assert before.keys() == after.keys()
        unmoved = [p for p, v in before.items() if np.array_equal(after[p], v)]
        assert not unmoved, unmoved
    # Everything else (encoder, codebooks and their buffers) bit-identical; every spectral
    # vector has taken its power-iteration steps and comes back in the new state (but u of an
    # output conv's single channel, always 1).
    old_rest, new_rest = _flat(state.rest), _flat(new.rest)
    assert old_rest.keys() == new_rest.keys()
    spectral = {p for p, v in nnx.to_flat_state(state.rest) if isinstance(v, SpectralVector)}
    assert spectral and all(p[0] == "discriminators" for p in spectral)
    for path, value in old_rest.items():
        changed = not np.array_equal(value, new_rest[path])
        assert changed == (path in spectral and value.size > 1), path
    frozen = {p[2] for p in old_rest if p[:2] == ("tokenizer", "encoder")}
    assert {"conv1", "layers", "quantizer"} <= frozen, frozen


def test_the_discriminators_loss_is_their_hinge_loss(setup):
    # By hand from the discriminators' logits (those of the state before the step):
    # 1/K sum_k mean(relu(1 - D_k(real))) + mean(relu(1 + D_k(fake))).
    trainer, state, step, batch = setup
    _, metrics = step(state, batch)
    rows = batch["wav"].shape[0]
    logits = [np.asarray(x, np.float64) for x in _discriminator_logits(trainer.model(state), batch)]
    hinge = [
        np.maximum(0, 1 - x[:rows]).mean() + np.maximum(0, 1 + x[rows:]).mean() for x in logits
    ]
    assert float(metrics["disc_loss"]) == pytest.approx(np.mean(hinge), rel=1e-5)


def test_the_discriminators_learn_on_one_batch(setup):
    _, state, step, batch = setup
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["disc_loss"]))  # before this step's update
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.05, losses


def test_a_tokenizer_without_stage_1_is_refused():
    model = Stage2Model(
        MiMoAudioTokenizer(TINY, rngs=nnx.Rngs(0)), Discriminators(SMALL, rngs=nnx.Rngs(1))
    )
    with pytest.raises(ValueError, match=r"codebooks \[0, 1, 2\] .* never initialised.*stage-1"):
        Stage2Trainer.create(model, optax.adamw(1e-4), optax.adam(1e-3))
    check_codebooks_trained(_tokenizer())


def test_crops_that_do_not_fit_are_one_clear_error():
    check_stage2(TINY, SMALL, 481)
    with pytest.raises(ValueError, match="shorter than the mel loss needs: expected at least 481"):
        check_stage2(TINY, SMALL, 480)
    with pytest.raises(ValueError, match="largest n_fft 2048: expected crops of at least 2048"):
        check_stage2(TINY, DiscriminatorConfig(), 1024)
    with pytest.raises(ValueError, match=r"crop_samples=0\.5: expected an integer >= 1"):
        check_stage2(TINY, SMALL, 0.5)  # type: ignore[arg-type]
