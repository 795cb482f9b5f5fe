"""The MiMo-Audio training loss: text cross-entropy plus the patch decoder's per-codebook
cross-entropies from its teacher-forced pass, weighted per position by the data pipeline.

Batch fields (see data_pipelines.packing): text, codes, positions, segment_ids
[B, G] / [B, G, gs, C]; text_targets, text_weights [B, G]; code_targets [B, G, gs, C],
code_weights [B, G, C].

Normalisation (the report's weights w = 100-12-8-6-4-2-2-1-1, as the public trainer applies them):
text_loss = sum(text_weights * ce) / sum(text_weights); codebook c's loss = the mean over its
weighted patches of the mean over the patch's frames; total = (w0 * text_loss + sum_c w_c * loss_c)
/ (w0 + sum_c w_c), summing only the terms that have targets in the batch (a batch without speech
gives the plain text loss; stage 1, w = 1-0-...-0, gives the text loss).
"""

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from mimo_jax.lm.config import parse_dashed

if TYPE_CHECKING:  # annotations only
    from mimo_jax.lm.model import MiMoAudioLM

_TINY = 1e-9


@dataclasses.dataclass(frozen=True)
class LossConfig:
    text_weight: float
    codebook_weights: tuple[float, ...]
    text_chunk: int = 1024  # positions per chunk of the text logits (bounds their memory)
    # The patch decoder runs on at most this fraction of a batch's positions, those with speech
    # targets first (text positions have none); targets beyond it are counted in
    # `patches_dropped`, never silently lost. 1.0: every position.
    patch_fraction: float = 1.0
    patch_chunk: int = 1024  # positions per chunk of the patch decoder (bounds its activations)

    def __post_init__(self):
        if not 0.0 < self.patch_fraction <= 1.0:
            raise ValueError(f"loss.patch_fraction={self.patch_fraction}: expected (0, 1]")

    def check_channels(self, channels: int) -> None:
        """A ValueError unless there is one codebook weight per audio channel of the model."""
        if len(self.codebook_weights) != channels:
            raise ValueError(
                f"loss weights: {1 + len(self.codebook_weights)} numbers, expected "
                f"{channels + 1} (text, then one per codebook of the model's {channels})"
            )

    @property
    def trains_patch_decoder(self) -> bool:
        return any(w > 0 for w in self.codebook_weights)

    @classmethod
    def from_string(cls, weights: str, **kw) -> "LossConfig":
        """From the official spelling `"100-12-8-6-4-2-2-1-1"`: text, then one per codebook."""
        try:
            values = parse_dashed(weights, float)
        except (ValueError, AttributeError, TypeError):
            raise ValueError(f"loss weights {weights!r}: expected numbers joined by '-'") from None
        if min(values) < 0:
            raise ValueError(f"loss weights {weights!r}: expected numbers >= 0")
        return cls(values[0], values[1:], **kw)


def chunked_sums(fn, xs, chunk: int):
    """sum over chunks of fn(chunk of xs, chunk index): xs are arrays [N, ...] cut into chunks of
    `chunk` rows (the last zero-padded: fn must give padding rows zero weight), each chunk
    rematerialised in the backward pass, so memory holds one chunk's intermediates at a time."""
    n = jax.tree.leaves(xs)[0].shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    blocks = (n + pad) // chunk
    split = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(
        blocks, chunk, *a.shape[1:]
    )
    sums = jax.lax.map(
        jax.checkpoint(lambda args: fn(*args)), (jax.tree.map(split, xs), jnp.arange(blocks))
    )
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), sums)


def text_cross_entropy(model: "MiMoAudioLM", hidden, targets, weights, chunk: int):
    """Weighted sum of CE and count of correct argmaxes over positions, the [.., vocab] logits
    computed one chunk of positions at a time."""

    def one(xs, _):
        h, t, w = xs
        logits = model.text_logits(h).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, t)
        correct = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
        return jnp.sum(ce * w), jnp.sum(correct * (w > 0))

    flat = lambda a: a.reshape(-1, *a.shape[2:])
    return chunked_sums(one, (flat(hidden), flat(targets), flat(weights)), chunk)


def _speech_positions(hidden, targets, weights, fraction: float):
    """The first ceil(fraction * N) positions with speech targets (all N when fraction is 1), and
    how many positions with targets did not fit."""
    n = hidden.shape[0]
    capacity = min(n, max(1, math.ceil(fraction * n)))
    has = jnp.any(weights > 0, axis=-1)
    dropped = jnp.maximum(jnp.sum(has) - capacity, 0).astype(jnp.float32)
    if capacity == n:
        return hidden, targets, weights, dropped
    keep = jnp.argsort(~has, stable=True)[:capacity]
    return hidden[keep], targets[keep], weights[keep], dropped


def codebook_losses(model: "MiMoAudioLM", hidden, batch, cfg: "LossConfig", dropout_rng=None):
    """Per codebook: (loss, accuracy, weight total) from the teacher-forced patch decoder, run over
    chunks of positions, and the number of speech positions beyond the patch capacity."""
    b, g, _ = hidden.shape
    local, targets, weights, dropped = _speech_positions(
        model.local_hidden(hidden).reshape(b * g, -1),
        batch["code_targets"].reshape(b * g, *batch["code_targets"].shape[2:]),
        batch["code_weights"].reshape(b * g, -1),
        cfg.patch_fraction,
    )

    def one(xs, index):
        h, t, w = xs
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        sums = []
        for ch, logits in enumerate(model.patch_logits(h, t, rng)):
            logits = logits.astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, t[..., ch]).mean(-1)
            acc = (jnp.argmax(logits, -1) == t[..., ch]).astype(jnp.float32).mean(-1)
            active = (w[:, ch] > 0).astype(jnp.float32)
            sums.append(
                jnp.stack(
                    [
                        jnp.sum(ce * w[:, ch]),
                        jnp.sum(w[:, ch]),
                        jnp.sum(acc * active),
                        jnp.sum(active),
                    ]
                )
            )
        return jnp.stack(sums)  # [channels, 4]

    sums = chunked_sums(one, (local, targets, weights), cfg.patch_chunk)
    out = [(s[0] / jnp.maximum(s[1], _TINY), s[2] / jnp.maximum(s[3], 1.0), s[1]) for s in sums]
    return out, dropped


def mimo_loss(model: "MiMoAudioLM", batch, cfg: LossConfig, dropout_rng=None):
    """(total loss, metrics) of a batch. Without codebook weights the patch decoder is not run."""
    rng_enc = rng_dec = rng_llm = None
    if dropout_rng is not None:
        rng_enc, rng_dec = jax.random.split(dropout_rng)
        rng_llm = jax.random.fold_in(dropout_rng, 2)  # used by adapters' dropout only
    embeds = model.embed_inputs(batch["text"], batch["codes"], rng_enc)
    hidden = model.backbone(embeds, batch["positions"], batch["segment_ids"], rng_llm)
    tw = batch["text_weights"].astype(jnp.float32)
    ce_sum, correct = text_cross_entropy(model, hidden, batch["text_targets"], tw, cfg.text_chunk)
    text_total = jnp.sum(tw)
    text_loss = ce_sum / jnp.maximum(text_total, _TINY)
    has_text = (text_total > 0).astype(jnp.float32)
    numerator, denominator = cfg.text_weight * text_loss * has_text, cfg.text_weight * has_text
    metrics = {
        "text_loss": text_loss,
        "text_accuracy": correct / jnp.maximum(jnp.sum(tw > 0), 1),
        "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
    }
    if cfg.trains_patch_decoder:
        per_codebook, metrics["patches_dropped"] = codebook_losses(
            model, hidden, batch, cfg, rng_dec
        )
        for ch, (loss, acc, total) in enumerate(per_codebook):
            has = (total > 0).astype(jnp.float32) * cfg.codebook_weights[ch]
            numerator, denominator = numerator + has * loss, denominator + has
            metrics[f"codebook{ch}_loss"], metrics[f"codebook{ch}_accuracy"] = loss, acc
    loss = numerator / jnp.maximum(denominator, _TINY)
    metrics["loss"] = loss
    return loss, metrics
