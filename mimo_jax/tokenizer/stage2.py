"""Stage 2 of tokenizer training (report §2.1.2, eq. 4-7): the encoder and the quantizer frozen as
stage 1 left them, the decoder and vocoder trained against the multi-period and multi-scale STFT
discriminators (`discriminators.py`) with

    generator:      λ_recon · L_recon + λ_adv · L_adv + λ_fm · L_fm      (λ = 1, 1, 2)
    discriminators: the hinge loss L_D averaged over the sub-discriminators

(`gan_losses.py`). One step, as HiFi-GAN orders it: the frozen encoder and quantizer give the codes'
vectors, the decoder generates once, the discriminators step on real against the detached
generated audio, then the generator steps on its loss under the discriminators as they are after
their update. Each of the two discriminator calls takes one power-iteration step of every
spectral norm (as two PyTorch forwards do); the step returns the updated vectors.

Two optimizers: the generator's (any optax transform) and the discriminators' (an optax transform
without weight decay, e.g. `optax.adam`: weight decay would fight the spectral normalisation,
which already bounds each layer).

A batch: `wav` [batch, samples] float32 at the tokenizer's rate (every crop long enough for the
discriminators: `check_stage2`), `lengths` [batch] (real samples; the rest is padding).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from mimo_jax.tokenizer import rvq_training
from mimo_jax.tokenizer.config import TokenizerConfig
from mimo_jax.tokenizer.discriminators import DiscriminatorConfig, Discriminators, check_fits
from mimo_jax.tokenizer.gan_losses import (
    GanLossConfig,
    discriminator_hinge_loss,
    generator_loss,
    split_real_fake,
)
from mimo_jax.tokenizer.mel_loss import multiscale_mel_loss, scales
from mimo_jax.tokenizer.model import MiMoAudioTokenizer
from mimo_jax.tokenizer.stage1 import fit_length


class Stage2Model(nnx.Module):
    """What stage 2 holds: the tokenizer (only its decoder trained) and the discriminators."""

    def __init__(self, tokenizer: MiMoAudioTokenizer, discriminators: Discriminators):
        self.tokenizer, self.discriminators = tokenizer, discriminators


def generator_trained(path, value) -> bool:
    """The generator's parameters: the decoder's, vocoder included (encoder and quantizer are
    frozen)."""
    return isinstance(value, nnx.Param) and tuple(path[:2]) == ("tokenizer", "decoder")


def discriminator_trained(path, value) -> bool:
    """The discriminators' parameters (their spectral-norm vectors are state, not trained)."""
    return isinstance(value, nnx.Param) and path[0] == "discriminators"


def check_stage2(
    tokenizer_config: TokenizerConfig, discriminator_config: DiscriminatorConfig, crop_samples: int
) -> None:
    """Raises one ValueError line when training crops of `crop_samples` cannot be trained on: too
    short for the mel loss's reflect padding or for the discriminators (`check_fits`)."""
    if not (isinstance(crop_samples, int) and crop_samples >= 1):
        raise ValueError(f"crop_samples={crop_samples!r}: expected an integer >= 1")
    shortest = max(scale.window // 2 for scale in scales()) + 1
    if crop_samples < shortest:
        rate = tokenizer_config.sampling_rate
        raise ValueError(
            f"training crops of {crop_samples} samples are shorter than the mel loss needs: "
            f"expected at least {shortest} samples ({shortest / rate:.3f} s at {rate} Hz)"
        )
    check_fits(discriminator_config, crop_samples)


def check_codebooks_trained(tokenizer: MiMoAudioTokenizer) -> None:
    """Raises one ValueError line unless every codebook has been initialised, as a stage-1 (or a
    converted) checkpoint's are: stage 2 freezes them, so fresh ones would stay random."""
    states = rvq_training.states_of(tokenizer.encoder.quantizer)
    fresh = [q for q, s in enumerate(states) if not bool(s.inited[0] > 0)]
    if fresh:
        raise ValueError(
            f"codebooks {fresh} of the tokenizer were never initialised: stage 2 starts from a "
            "stage-1 tokenizer checkpoint (its encoder and quantizer stay frozen)"
        )


@struct.dataclass
class Stage2State:
    step: jax.Array
    gen_params: Any  # nnx.State of the decoder's (and vocoder's) parameters
    disc_params: Any  # nnx.State of the discriminators' parameters
    rest: Any  # nnx.State of everything else: the frozen tokenizer, the spectral vectors
    gen_opt_state: Any
    disc_opt_state: Any


def _masked(wav: jax.Array, lengths: jax.Array) -> jax.Array:
    """Zero past each length, so that padding is alike in real and generated audio and tells the
    discriminators nothing."""
    return jnp.where(jnp.arange(wav.shape[1])[None, :] < lengths[:, None], wav, 0.0)


def quantized_input(tokenizer: MiMoAudioTokenizer, batch: dict):
    """The frozen encoder's and quantizer's output for the decoder: (the codes' vectors
    [batch, codes, d_model], code lengths), without gradient."""
    codes, code_lengths = tokenizer.encode(batch["wav"], batch["lengths"])
    return jax.lax.stop_gradient(tokenizer.dequantize(codes)), code_lengths


@dataclasses.dataclass(frozen=True)
class Stage2Trainer:
    graphdef: Any
    gen_tx: optax.GradientTransformation
    disc_tx: optax.GradientTransformation
    cfg: GanLossConfig

    @classmethod
    def create(
        cls,
        model: Stage2Model,
        gen_tx: optax.GradientTransformation,
        disc_tx: optax.GradientTransformation,
        cfg: GanLossConfig = GanLossConfig(),
    ) -> tuple["Stage2Trainer", Stage2State]:
        """`disc_tx` must be without weight decay (e.g. `optax.adam`). Raises a ValueError line
        when the tokenizer's codebooks were never trained (no stage-1 checkpoint loaded)."""
        check_codebooks_trained(model.tokenizer)
        graphdef, gen, disc, rest = nnx.split(  # type: ignore[misc]
            model, generator_trained, discriminator_trained, ...
        )
        step = jnp.zeros((), jnp.int32)
        state = Stage2State(step, gen, disc, rest, gen_tx.init(gen), disc_tx.init(disc))
        return cls(graphdef, gen_tx, disc_tx, cfg), state

    def model(self, state: Stage2State) -> Stage2Model:
        return self._merge(state.gen_params, state.disc_params, state.rest)

    def _merge(self, gen_params, disc_params, rest) -> Stage2Model:
        # Fresh variables: a state's own ones belong to the trace that made them, and the
        # discriminators write their spectral vectors inside the gradients' traces.
        return nnx.merge(self.graphdef, gen_params, disc_params, rest, copy=True)

    def _rest(self, model: Stage2Model) -> Any:
        return nnx.state(model, generator_trained, discriminator_trained, ...)[2]

    def train_step(self, state: Stage2State, batch: dict) -> tuple[Stage2State, dict]:
        quantized, code_lengths = quantized_input(self.model(state).tokenizer, batch)
        real = _masked(batch["wav"], batch["lengths"])

        def generate(gen_params):
            model = self._merge(gen_params, state.disc_params, state.rest)
            wav, _ = model.tokenizer.decode_hidden(quantized, code_lengths)
            return _masked(fit_length(wav, real.shape[1]), batch["lengths"])

        # One decoder forward; its pullback carries the generator loss's gradient to the decoder.
        fake, pullback = jax.vjp(generate, state.gen_params)

        def disc_loss_fn(disc_params):
            model = self._merge(state.gen_params, disc_params, state.rest)
            outputs = model.discriminators(jnp.concatenate([real, jax.lax.stop_gradient(fake)]))
            real_out, fake_out = split_real_fake(outputs, real.shape[0])
            loss = discriminator_hinge_loss(
                [o.logits for o in real_out], [o.logits for o in fake_out]
            )
            return loss, self._rest(model)

        (disc_loss, rest), disc_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(
            state.disc_params
        )
        updates, disc_opt_state = self.disc_tx.update(
            disc_grads, state.disc_opt_state, state.disc_params
        )
        disc_params = optax.apply_updates(state.disc_params, updates)

        def gen_loss_fn(fake):
            model = self._merge(state.gen_params, disc_params, rest)
            recon = multiscale_mel_loss(
                batch["wav"], fake, model.tokenizer.config.sampling_rate, batch["lengths"]
            )
            outputs = model.discriminators(jnp.concatenate([real, fake]))
            real_out, fake_out = split_real_fake(outputs, real.shape[0])
            total, terms = generator_loss(recon, real_out, fake_out, self.cfg)
            return total, (terms, self._rest(model))

        (gen_loss, (terms, rest)), fake_grad = jax.value_and_grad(gen_loss_fn, has_aux=True)(fake)
        (gen_grads,) = pullback(fake_grad)
        updates, gen_opt_state = self.gen_tx.update(
            gen_grads, state.gen_opt_state, state.gen_params
        )
        gen_params = optax.apply_updates(state.gen_params, updates)
        metrics = {
            "loss": gen_loss,
            "recon_loss": terms["recon"],
            "adv_loss": terms["adversarial"],
            "fm_loss": terms["feature_matching"],
            "disc_loss": disc_loss,
            "gen_grad_norm": optax.tree.norm(gen_grads),
            "disc_grad_norm": optax.tree.norm(disc_grads),
        }
        new = Stage2State(
            state.step + 1, gen_params, disc_params, rest, gen_opt_state, disc_opt_state
        )
        return new, metrics
