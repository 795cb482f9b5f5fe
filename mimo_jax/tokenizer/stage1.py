"""Stage 1 of tokenizer training (report §2.1.2, eq. 1-3): the encoder, decoder and vocoder trained
by gradients on

    L = λ_A2T · L_A2T + λ_recon · L_recon + λ_commit · L_commit

(the audio-to-text LM's next-token loss on the quantised frames, the multi-scale mel loss of the
reconstruction, the RVQ's commitment loss), with the A2T LM trained jointly, while the codebooks
learn by EMA (`rvq_training`): k-means on the first batch, then an EMA update per step of each
codebook on its input residual as the forward saw it. Straight-through quantisation carries the
decoder's and the A2T LM's gradients into the encoder.

A batch: `wav` [batch, samples] float32 at the tokenizer's rate, `lengths` [batch] (real samples;
the rest is padding), `text` [batch, tokens] int32 transcripts and `text_lengths` [batch].
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from mimo_jax.tokenizer import rvq_training
from mimo_jax.tokenizer.a2t import AudioToTextLM
from mimo_jax.tokenizer.mel_loss import multiscale_mel_loss
from mimo_jax.tokenizer.model import MiMoAudioTokenizer
from mimo_jax.tokenizer.quantizer import Codebook, CodebookBuffer
from mimo_jax.tokenizer.rvq_training import EmaConfig


@dataclasses.dataclass(frozen=True)
class Stage1Config:
    a2t_weight: float = 10.0
    recon_weight: float = 1.0
    commit_weight: float = 1.0
    ema: EmaConfig = EmaConfig()
    kmeans_iters: int = 50

    def __post_init__(self):
        for name in ("a2t_weight", "recon_weight", "commit_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a number >= 0")
        if not (isinstance(self.kmeans_iters, int) and self.kmeans_iters >= 1):
            raise ValueError(f"kmeans_iters={self.kmeans_iters!r}: expected an integer >= 1")


class Stage1Model(nnx.Module):
    """What stage 1 trains: the tokenizer and its audio-to-text LM."""

    def __init__(self, tokenizer: MiMoAudioTokenizer, a2t: AudioToTextLM):
        self.tokenizer, self.a2t = tokenizer, a2t


def trained(path, value) -> bool:
    """Parameters that gradients train: every one but the codebooks and their EMA buffers."""
    return isinstance(value, nnx.Param) and not isinstance(value, (Codebook, CodebookBuffer))


@struct.dataclass
class Stage1State:
    step: jax.Array
    params: Any  # nnx.State of the trained parameters
    frozen: Any  # nnx.State of the rest: codebooks and their buffers
    opt_state: Any


def fit_length(wav: jax.Array, samples: int) -> jax.Array:
    """A reconstruction [batch, n] cut or zero-padded to the input's `samples`."""
    wav = wav[:, :samples]
    return jnp.pad(wav, ((0, 0), (0, samples - wav.shape[1])))


def encoded(tok: MiMoAudioTokenizer, batch: dict):
    """(the quantizer's input [batch, codes, d_model], code lengths, the codes' real-frame mask)."""
    mel, mel_lengths = tok.mel(batch["wav"], batch["lengths"])
    hidden, code_lengths = tok.encode_hidden(mel, mel_lengths)
    mask = jnp.arange(hidden.shape[1])[None, :] < code_lengths[:, None]
    return hidden, code_lengths, mask


def forward(model: Stage1Model, batch: dict, cfg: Stage1Config):
    """(total loss, (metrics, the quantizer's input [batch, codes, d_model], its frame mask))."""
    tok = model.tokenizer
    hidden, code_lengths, mask = encoded(tok, batch)
    quantized, _, commit = tok.encoder.quantizer(hidden, mask)
    wav, _ = tok.decode_hidden(quantized, code_lengths)
    recon = multiscale_mel_loss(
        batch["wav"],
        fit_length(wav, batch["wav"].shape[1]),
        tok.config.sampling_rate,
        batch["lengths"],
    )
    a2t, tokens = model.a2t.loss(quantized, code_lengths, batch["text"], batch["text_lengths"])
    total = cfg.a2t_weight * a2t + cfg.recon_weight * recon + cfg.commit_weight * commit
    metrics = {"loss": total, "a2t_loss": a2t, "recon_loss": recon, "commit_loss": commit}
    return total, (metrics | {"text_tokens": tokens}, hidden, mask)


@dataclasses.dataclass(frozen=True)
class Stage1Trainer:
    graphdef: Any
    tx: optax.GradientTransformation
    cfg: Stage1Config

    @classmethod
    def create(
        cls, model: Stage1Model, tx: optax.GradientTransformation, cfg: Stage1Config
    ) -> tuple["Stage1Trainer", Stage1State]:
        graphdef, params, frozen = nnx.split(model, trained, ...)  # type: ignore[misc]
        state = Stage1State(jnp.zeros((), jnp.int32), params, frozen, tx.init(params))
        return cls(graphdef, tx, cfg), state

    def model(self, state: Stage1State) -> Stage1Model:
        return nnx.merge(self.graphdef, state.params, state.frozen)

    def needs_init(self, state: Stage1State) -> bool:
        """Whether a codebook still waits for its k-means (the first batch does it)."""
        quantizer = self.model(state).tokenizer.encoder.quantizer
        return not all(bool(s.inited[0] > 0) for s in rvq_training.states_of(quantizer))

    def initialise(self, state: Stage1State, batch: dict, key: jax.Array) -> Stage1State:
        """The codebooks' k-means on this batch's encoder output (those not initialised)."""
        model = self.model(state)
        hidden, _, mask = encoded(model.tokenizer, batch)
        quantizer = model.tokenizer.encoder.quantizer
        states = rvq_training.states_of(quantizer)
        rvq_training.store(
            quantizer,
            rvq_training.initialise(states, hidden, key, self.cfg.kmeans_iters, mask),
        )
        return dataclasses.replace(state, frozen=nnx.state(model, nnx.Not(trained)))

    def train_step(self, state: Stage1State, batch: dict) -> tuple[Stage1State, dict]:
        def loss_fn(params):
            return forward(nnx.merge(self.graphdef, params, state.frozen), batch, self.cfg)

        (_, (metrics, hidden, mask)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        model = nnx.merge(self.graphdef, params, state.frozen)
        quantizer = model.tokenizer.encoder.quantizer
        # The EMA step sees the codebooks the forward used, on the forward's residuals.
        _, states = rvq_training.train_step(
            rvq_training.states_of(quantizer), jax.lax.stop_gradient(hidden), self.cfg.ema, mask
        )
        rvq_training.store(quantizer, states)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new = Stage1State(state.step + 1, params, nnx.state(model, nnx.Not(trained)), opt_state)
        return new, metrics
