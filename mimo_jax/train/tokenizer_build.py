"""Builds what an audio tokenizer training run needs from its config (an ml-collections ConfigDict
whose `task` is `tokenizer_stage1` or `tokenizer_stage2`), beside the LM's (`train.build`): the
tokenizer (random or from a checkpoint), the stage's trainer with its optimizers, its state placed
on the mesh by the logical-axis rules the LM's state follows (`mesh.rules`), the global batches and
the export. The crops are read by `data_pipelines.waveforms`; the mesh and rule presets come from
`sharding`."""

import dataclasses

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax.conversion import param_store
from mimo_jax.nn.partitioning import batch_sharding, state_shardings
from mimo_jax.tokenizer.config import TokenizerConfig, from_hf, to_hf
from mimo_jax.tokenizer.discriminators import DiscriminatorConfig, MPDConfig, STFTDConfig
from mimo_jax.tokenizer.model import MiMoAudioTokenizer
from mimo_jax.tokenizer.tokenizer_checkpoint import load_tokenizer
from mimo_jax.train.step import shardings_like

STAGES = ("tokenizer_stage1", "tokenizer_stage2")
# A batch of crops: wav [batch, samples], lengths [batch], text [batch, tokens], text_lengths.
BATCH_FIELDS = ("wav", "lengths", "text", "text_lengths")
# Each optimizer state of a stage's train state, and the parameters it belongs to.
_OPT_STATE_PARAMS = {
    "opt_state": "params",
    "gen_opt_state": "gen_params",
    "disc_opt_state": "disc_params",
}


def is_tokenizer_run(config) -> bool:
    return config.get("task", "lm") in STAGES


def is_stage1(config) -> bool:
    return config.task == "tokenizer_stage1"


def tokenizer_architecture(config) -> TokenizerConfig:
    return from_hf(dict(config.model.tokenizer), "config model.tokenizer")


def crop_samples(config, sampling_rate: int) -> int:
    return int(round(config.data.crop_seconds * sampling_rate))


def discriminator_config(config) -> DiscriminatorConfig:
    d = config.discriminator
    return DiscriminatorConfig(
        MPDConfig(channels=tuple(d.mpd_channels)), STFTDConfig(filters=d.stft_filters)
    )


def initial_tokenizer(config) -> tuple[TokenizerConfig, MiMoAudioTokenizer]:
    """(tokenizer config, tokenizer) a run starts from: its init checkpoint, or initialised from
    the config's seed."""
    if config.model.init_checkpoint:
        return load_tokenizer(config.model.init_checkpoint)
    tok_config = tokenizer_architecture(config)
    return tok_config, MiMoAudioTokenizer(tok_config, rngs=nnx.Rngs(config.seed))


def generator_tx(config) -> optax.GradientTransformation:
    """AdamW on a linear warmup and cosine decay, after global-norm clipping (`clip_norm` 0:
    none): the optimizer of the tokenizer (and, in stage 1, of the A2T LM)."""
    o = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, max(o.warmup_steps, 1), max(config.total_steps, o.warmup_steps + 1)
    )
    adamw = optax.adamw(schedule, o.b1, o.b2, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw


def build(config, text_vocab: int):
    """(tokenizer config, trainer, state) of the config's stage, on the host; `text_vocab` sizes
    stage 1's A2T LM (the transcripts' tokenizer)."""
    from mimo_jax.tokenizer.a2t import A2TConfig, AudioToTextLM
    from mimo_jax.tokenizer.discriminators import Discriminators
    from mimo_jax.tokenizer.gan_losses import GanLossConfig
    from mimo_jax.tokenizer.rvq_training import EmaConfig
    from mimo_jax.tokenizer.stage1 import Stage1Config, Stage1Model, Stage1Trainer
    from mimo_jax.tokenizer.stage2 import Stage2Model, Stage2Trainer

    tok_config, tokenizer = initial_tokenizer(config)
    tokenizer.set_remat(config.model.remat_policy)
    tokenizer.set_attention(config.model.attention)
    if is_stage1(config):
        a2t = AudioToTextLM(
            A2TConfig(text_vocab, **dict(config.a2t)),
            tok_config.d_model,
            attention=config.model.attention,
            rngs=nnx.Rngs(config.seed + 1),
        )
        loss = Stage1Config(
            config.loss.a2t,
            config.loss.recon,
            config.loss.commit,
            EmaConfig(config.ema.decay, config.ema.epsilon),
            config.ema.kmeans_iters,
        )
        trainer, state = Stage1Trainer.create(
            Stage1Model(tokenizer, a2t), generator_tx(config), loss
        )
        return tok_config, trainer, state
    d = config.discriminator
    disc = Discriminators(discriminator_config(config), rngs=nnx.Rngs(config.seed + 2))
    gan = GanLossConfig(config.loss.recon, config.loss.adversarial, config.loss.feature_matching)
    disc_tx = optax.adam(d.learning_rate, d.b1, d.b2)  # no weight decay on the discriminators
    trainer2, state2 = Stage2Trainer.create(
        Stage2Model(tokenizer, disc), generator_tx(config), disc_tx, gan
    )
    return tok_config, trainer2, state2


def train_state_shardings(state, mesh, rules):
    """The shardings of a stage's train state (concrete or abstract): parameters and buffers by
    their logical axes under the rules, each optimizer state like the parameters it belongs to,
    the rest (the step) replicated."""
    out = {}
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        if isinstance(value, nnx.State):
            out[field.name] = state_shardings(value, mesh, rules)
    for opt, params in _OPT_STATE_PARAMS.items():
        if hasattr(state, opt):
            placed = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                getattr(state, params),
                out[params],
            )
            out[opt] = shardings_like(getattr(state, opt), placed, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    rest = {f.name: replicated for f in dataclasses.fields(state) if f.name not in out}
    return state.replace(**out, **rest)


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's crops placed as its part of the global batch (over data x fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(
            batch_sharding(mesh, local[k].ndim), np.asarray(local[k])
        )
        for k in BATCH_FIELDS
    }


def identity(config, tok_config: TokenizerConfig) -> dict:
    """What a resumed run must match: the stage, the architectures and the loss."""
    import json

    stage1 = is_stage1(config)
    return {
        "task": config.task,
        "tokenizer": to_hf(tok_config),
        "a2t": dict(config.a2t) if stage1 else None,
        "discriminator": None if stage1 else json.loads(config.discriminator.to_json()),
        "loss": dict(config.loss),
    }


def export(tokenizer: MiMoAudioTokenizer, tok_config: TokenizerConfig, workdir) -> dict:
    """The tokenizer (its RVQ buffers included) as a model checkpoint in workdir/model: stage 2's
    init_checkpoint, or an official directory through convert_torch_weights.py. Returns
    {what: path}."""
    return {"final weights": param_store.save(tokenizer, to_hf(tok_config), workdir / "model")}
