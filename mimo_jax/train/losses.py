"""The MiMo-Audio training loss: text cross-entropy plus the patch decoder's per-codebook
cross-entropies from its teacher-forced pass, weighted per position by the data pipeline.

Batch fields (see data_pipelines.packing): text, codes, positions, segment_ids [B, G] / [B, G, gs, C];
text_targets, text_weights [B, G]; code_targets [B, G, gs, C], code_weights [B, G, C].

Normalisation (the report's weights w = 100-12-8-6-4-2-2-1-1, as the public trainer applies them):
text_loss = sum(text_weights * ce) / sum(text_weights); codebook c's loss = the mean over its
weighted patches of the mean over the patch's frames; total = (w0 * text_loss + sum_c w_c * loss_c)
/ (w0 + sum_c w_c), summing only the terms that have targets in the batch (a batch without speech
gives the plain text loss; stage 1, w = 1-0-...-0, gives the text loss).
"""
import dataclasses

import jax
import jax.numpy as jnp
import optax

_TINY = 1e-9


@dataclasses.dataclass(frozen=True)
class LossConfig:
    text_weight: float
    codebook_weights: tuple[float, ...]
    text_chunk: int = 1024  # positions per chunk of the text logits (bounds their memory)

    @property
    def trains_patch_decoder(self) -> bool:
        return any(w > 0 for w in self.codebook_weights)

    @classmethod
    def from_string(cls, weights: str, **kw) -> "LossConfig":
        values = tuple(float(v) for v in weights.split("-"))
        return cls(values[0], values[1:], **kw)


def _weighted_mean(values, weights):
    total = jnp.sum(weights)
    return jnp.sum(values * weights) / jnp.maximum(total, _TINY), total


def text_cross_entropy(model, hidden, targets, weights, chunk: int):
    """Weighted sum of CE and of correct argmaxes over positions, computing the [.., vocab] logits
    one chunk of positions at a time (rematerialised in the backward pass)."""
    b, g, d = hidden.shape
    chunk = min(chunk, g)
    pad = -g % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (g + pad) // chunk
    split = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(xs):
        h, t, w = xs
        logits = model.text_logits(h).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, t)
        correct = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
        return jnp.sum(ce * w), jnp.sum(correct * (w > 0))

    ce_sum, correct = jax.lax.map(one, (split(hidden), split(targets), split(weights)))
    return jnp.sum(ce_sum), jnp.sum(correct)


def codebook_losses(model, hidden, batch, dropout_rng=None):
    """Per codebook: (loss, accuracy, weight total) from the teacher-forced patch decoder."""
    b, g, _ = hidden.shape
    local = model.local_hidden(hidden).reshape(b * g, -1)
    targets = batch["code_targets"].reshape(b * g, *batch["code_targets"].shape[2:])
    weights = batch["code_weights"].reshape(b * g, -1)
    out = []
    for ch, logits in enumerate(model.patch_logits(local, targets, dropout_rng)):
        logits = logits.astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets[..., ch]).mean(-1)
        acc = (jnp.argmax(logits, -1) == targets[..., ch]).astype(jnp.float32).mean(-1)
        loss, total = _weighted_mean(ce, weights[:, ch])
        out.append((loss, jnp.sum(acc * (weights[:, ch] > 0)) / jnp.maximum(
            jnp.sum(weights[:, ch] > 0), 1), total))
    return out


def mimo_loss(model, batch, cfg: LossConfig, dropout_rng=None):
    """(total loss, metrics) of a batch. Without codebook weights the patch decoder is not run."""
    rng_enc = rng_dec = None
    if dropout_rng is not None:
        rng_enc, rng_dec = jax.random.split(dropout_rng)
    embeds = model.embed_inputs(batch["text"], batch["codes"], rng_enc)
    hidden = model.backbone(embeds, batch["positions"], batch["segment_ids"])
    tw = batch["text_weights"].astype(jnp.float32)
    ce_sum, correct = text_cross_entropy(model, hidden, batch["text_targets"], tw, cfg.text_chunk)
    text_total = jnp.sum(tw)
    text_loss = ce_sum / jnp.maximum(text_total, _TINY)
    has_text = (text_total > 0).astype(jnp.float32)
    numerator, denominator = cfg.text_weight * text_loss * has_text, cfg.text_weight * has_text
    metrics = {"text_loss": text_loss,
               "text_accuracy": correct / jnp.maximum(jnp.sum(tw > 0), 1),
               "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)}
    if cfg.trains_patch_decoder:
        for ch, (loss, acc, total) in enumerate(codebook_losses(model, hidden, batch, rng_dec)):
            has = (total > 0).astype(jnp.float32) * cfg.codebook_weights[ch]
            numerator, denominator = numerator + has * loss, denominator + has
            metrics[f"codebook{ch}_loss"], metrics[f"codebook{ch}_accuracy"] = loss, acc
    loss = numerator / jnp.maximum(denominator, _TINY)
    metrics["loss"] = loss
    return loss, metrics
