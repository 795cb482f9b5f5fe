"""The adversarial losses of the tokenizer's stage-2 training (report eq. 4-7): hinge losses and
feature matching over K sub-discriminators (the MPD's periods and the MS-STFTD's scales together,
as `Discriminators` returns them).

With D_k the logits of sub-discriminator k, x the real and x̂ the generated audio, mean() over all
elements of one array (batch included):
  discriminator:  L_D   = 1/K Σ_k [ mean(relu(1 - D_k(x))) + mean(relu(1 + D_k(x̂))) ]
  generator:      L_adv = 1/K Σ_k mean(relu(1 - D_k(x̂)))
  features:       L_fm  = 1/K Σ_k 1/L_k Σ_l mean(|D_k^l(x) - D_k^l(x̂)|)
                  (L_k feature maps of sub-discriminator k: averaged over its layers, then over
                  the sub-discriminators)
  generator total: λ_recon L_recon + λ_adv L_adv + λ_fm L_fm  (λ = 1, 1, 2)
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mimo_jax.tokenizer.discriminators import DiscriminatorOutput


@dataclasses.dataclass(frozen=True)
class GanLossConfig:
    recon: float = 1.0
    adversarial: float = 1.0
    feature_matching: float = 2.0


def _mean(values: Sequence[jax.Array], name: str) -> jax.Array:
    if not values:
        raise ValueError(f"{name}: expected at least one sub-discriminator")
    return sum(values, jnp.zeros((), jnp.float32)) / len(values)


def _f32_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.astype(jnp.float32))


def discriminator_hinge_loss(
    real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array]
) -> jax.Array:
    """L_D: per sub-discriminator mean(relu(1 - real)) + mean(relu(1 + fake)), averaged over K."""
    if len(real_logits) != len(fake_logits):
        raise ValueError(
            f"{len(real_logits)} real and {len(fake_logits)} fake logits: expected one of each "
            "per sub-discriminator"
        )
    return _mean(
        [
            _f32_mean(jax.nn.relu(1.0 - real)) + _f32_mean(jax.nn.relu(1.0 + fake))
            for real, fake in zip(real_logits, fake_logits)
        ],
        "discriminator loss",
    )


def generator_hinge_loss(fake_logits: Sequence[jax.Array]) -> jax.Array:
    """L_adv: per sub-discriminator mean(relu(1 - fake)), averaged over K."""
    return _mean([_f32_mean(jax.nn.relu(1.0 - fake)) for fake in fake_logits], "generator loss")


def feature_matching_loss(
    real_features: Sequence[Sequence[jax.Array]], fake_features: Sequence[Sequence[jax.Array]]
) -> jax.Array:
    """L_fm: per sub-discriminator the mean absolute difference of each feature map, averaged over
    its layers; then averaged over K."""
    if len(real_features) != len(fake_features):
        raise ValueError(
            f"features of {len(real_features)} real and {len(fake_features)} fake "
            "sub-discriminators: expected the same number"
        )
    per_discriminator = []
    for k, (real, fake) in enumerate(zip(real_features, fake_features)):
        if len(real) != len(fake):
            raise ValueError(
                f"sub-discriminator {k}: {len(real)} real and {len(fake)} fake feature maps"
            )
        layers = [_f32_mean(jnp.abs(r - f)) for r, f in zip(real, fake)]
        per_discriminator.append(_mean(layers, f"feature maps of sub-discriminator {k}"))
    return _mean(per_discriminator, "feature matching loss")


def split_real_fake(
    outputs: Sequence[DiscriminatorOutput], real_count: int
) -> tuple[list[DiscriminatorOutput], list[DiscriminatorOutput]]:
    """Outputs of one call on [real; fake] concatenated along the batch -> (real, fake) outputs,
    the first `real_count` batch rows being real."""
    take = lambda o, part: DiscriminatorOutput(part(o.logits), tuple(part(f) for f in o.features))
    real = [take(o, lambda a: a[:real_count]) for o in outputs]
    fake = [take(o, lambda a: a[real_count:]) for o in outputs]
    return real, fake


def generator_loss(
    recon_loss: jax.Array,
    real: Sequence[DiscriminatorOutput],
    fake: Sequence[DiscriminatorOutput],
    config: GanLossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """λ_recon L_recon + λ_adv L_adv + λ_fm L_fm, and each unweighted term as a metric."""
    adversarial = generator_hinge_loss([o.logits for o in fake])
    matching = feature_matching_loss([o.features for o in real], [o.features for o in fake])
    total = (
        config.recon * recon_loss
        + config.adversarial * adversarial
        + config.feature_matching * matching
    )
    metrics = {"recon": recon_loss, "adversarial": adversarial, "feature_matching": matching}
    return total, metrics
