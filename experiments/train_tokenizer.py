"""Audio tokenizer training through the train entry point: `experiments.train` on a config whose
`task` is `tokenizer_stage1` or `tokenizer_stage2` (experiments/configs/tokenizer_stage*.py).

The run directory, lock, Orbax checkpoints (model, optimizer and data-iterator state, verified on
restore), SIGTERM, resume with exactly the next batch, the non-finite-loss stop and
metrics.jsonl/TensorBoard are those of LM training. Data parallel over the devices, with the state
fully sharded over them (`state_shardings`); the data are random crops of the tokenize manifests
with transcripts for the A2T loss (`data_pipelines.waveforms`). Stage 1 runs the codebooks'
k-means on its first batch. Every `eval_every` steps a fixed batch of crops is reconstructed (8
codebooks and all): the multi-scale mel distance goes to metrics.jsonl, the audio and log-mel
images to TensorBoard. The run ends by exporting the tokenizer (its RVQ buffers included) to
workdir/model, which convert_torch_weights.py turns into an official directory and stage 2
starts from.
"""

import json
import time

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

STAGES = ("tokenizer_stage1", "tokenizer_stage2")


def is_tokenizer_run(config) -> bool:
    return config.get("task", "lm") in STAGES


def _stage1(config) -> bool:
    return config.task == "tokenizer_stage1"


def crop_samples(config, sampling_rate: int) -> int:
    return int(round(config.data.crop_seconds * sampling_rate))


def discriminator_config(config):
    from mimo_jax.tokenizer.discriminators import DiscriminatorConfig, MPDConfig, STFTDConfig

    d = config.discriminator
    return DiscriminatorConfig(
        MPDConfig(channels=tuple(d.mpd_channels)), STFTDConfig(filters=d.stft_filters)
    )


def check(config) -> None:
    """Raises one ValueError naming every problem of a tokenizer config, before anything runs."""
    from mimo_jax import model_checkpoint
    from mimo_jax.nn.attention import IMPLEMENTATIONS
    from mimo_jax.tokenizer.config import from_hf
    from mimo_jax.tokenizer.stage2 import check_stage2

    problems = []
    try:
        tokenizer = from_hf(dict(config.model.tokenizer), "config model.tokenizer")
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"model.tokenizer: expected a tokenizer config.json ({e})") from None
    if config.model.init_checkpoint and not model_checkpoint.is_model_checkpoint(
        config.model.init_checkpoint
    ):
        problems.append(
            f"model.init_checkpoint={config.model.init_checkpoint!r}: expected a tokenizer "
            f"model checkpoint (a stage-1 run's workdir/model, or a converted one)"
        )
    if not _stage1(config) and not config.model.init_checkpoint:
        problems.append(
            "model.init_checkpoint='': a stage-2 run starts from a stage-1 tokenizer; expected "
            "the workdir/model a stage-1 run exported"
        )
    if config.model.attention not in IMPLEMENTATIONS:
        problems.append(
            f"model.attention={config.model.attention!r}: expected one of "
            f"{', '.join(IMPLEMENTATIONS)}"
        )
    if not config.data.crop_seconds > 0:
        problems.append(f"data.crop_seconds={config.data.crop_seconds!r}: expected a number > 0")
    elif not _stage1(config):
        try:
            check_stage2(
                tokenizer,
                discriminator_config(config),
                crop_samples(config, tokenizer.sampling_rate),
            )
        except (ValueError, TypeError) as e:
            problems.append(f"data.crop_seconds={config.data.crop_seconds}: {e}")
    ways = jax.device_count()
    if config.data.batch_size % ways or config.data.batch_size % jax.process_count():
        problems.append(
            f"data.batch_size={config.data.batch_size}: expected a multiple of the "
            f"{ways} devices and {jax.process_count()} processes"
        )
    for key in ("total_steps", "log_every", "checkpoint_every", "eval_every"):
        low = 1 if key == "total_steps" else 0
        if not (isinstance(config[key], int) and config[key] >= low):
            problems.append(f"{key}={config[key]!r}: expected an integer >= {low}")
    if problems:
        raise ValueError("\n".join(problems))


# ---- building ---------------------------------------------------------------------------------
def initial_tokenizer(config):
    """(tokenizer config, tokenizer) a run starts from: its init checkpoint, or initialised from
    the config's seed."""
    from mimo_jax.tokenizer.config import from_hf
    from mimo_jax.tokenizer.model import MiMoAudioTokenizer
    from mimo_jax.tokenizer.tokenizer_checkpoint import load_tokenizer

    if config.model.init_checkpoint:
        return load_tokenizer(config.model.init_checkpoint)
    tok_config = from_hf(dict(config.model.tokenizer), "config model.tokenizer")
    return tok_config, MiMoAudioTokenizer(tok_config, rngs=nnx.Rngs(config.seed))


def _schedule(config):
    o = config.optimizer
    return optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, max(o.warmup_steps, 1), max(config.total_steps, o.warmup_steps + 1)
    )


def _generator_tx(config):
    o = config.optimizer
    adamw = optax.adamw(_schedule(config), o.b1, o.b2, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm else adamw


def build(config, text_vocab: int):
    """(tokenizer config, trainer, state) of the config's stage."""
    from mimo_jax.tokenizer.a2t import A2TConfig, AudioToTextLM
    from mimo_jax.tokenizer.discriminators import Discriminators
    from mimo_jax.tokenizer.gan_losses import GanLossConfig
    from mimo_jax.tokenizer.rvq_training import EmaConfig
    from mimo_jax.tokenizer.stage1 import Stage1Config, Stage1Model, Stage1Trainer
    from mimo_jax.tokenizer.stage2 import Stage2Model, Stage2Trainer

    tok_config, tokenizer = initial_tokenizer(config)
    tokenizer.set_remat(config.model.remat_policy)
    tokenizer.set_attention(config.model.attention)
    if _stage1(config):
        a2t = AudioToTextLM(
            A2TConfig(text_vocab, **dict(config.a2t)),
            tok_config.d_model,
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
            Stage1Model(tokenizer, a2t), _generator_tx(config), loss
        )
        return tok_config, trainer, state
    d = config.discriminator
    disc = Discriminators(discriminator_config(config), rngs=nnx.Rngs(config.seed + 2))
    gan = GanLossConfig(config.loss.recon, config.loss.adversarial, config.loss.feature_matching)
    disc_tx = optax.adam(d.learning_rate, d.b1, d.b2)  # no weight decay on the discriminators
    trainer2, state2 = Stage2Trainer.create(
        Stage2Model(tokenizer, disc), _generator_tx(config), disc_tx, gan
    )
    return tok_config, trainer2, state2


def data(config, sampling_rate: int, needs_text: bool, *, shuffle=True):
    """(text tokenizer, this process's batch iterator)."""
    from data_pipelines.text_tokenizer import TextTokenizer
    from data_pipelines.waveforms import WaveformConfig, make_dataset, preflight

    tok = TextTokenizer.from_file(config.data.tokenizer)
    cfg = WaveformConfig(
        manifests=tuple(m for m in config.data.manifests.split(",") if m),
        crop_samples=crop_samples(config, sampling_rate),
        sampling_rate=sampling_rate,
        batch_size=config.data.batch_size // jax.process_count(),
        max_text_tokens=config.data.max_text_tokens,
        short_clips=config.data.short_clips,
        seed=config.seed,
        workers=config.data.workers,
        needs_text=needs_text,
        skip_bad_records=config.data.skip_bad_records,
    )
    corpus = preflight(cfg, tok)
    if shuffle:
        print("\n".join(corpus.summary), flush=True)
    dataset = make_dataset(
        corpus,
        cfg,
        tok.pad_id,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        shuffle=shuffle,
    )
    return tok, iter(dataset)


# ---- the run ----------------------------------------------------------------------------------
FIELDS = ("wav", "lengths", "text", "text_lengths")
_SPLIT_FROM = 2**14  # entries from which an array is split over the devices


def mesh_of_devices(devices=None):
    """One data axis over `devices` (default: all), slice after slice where they span several
    (jax.make_mesh lays out one slice only)."""
    devices = list(jax.devices() if devices is None else devices)
    auto = (jax.sharding.AxisType.Auto,)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh((len(devices),), ("data",), axis_types=auto, devices=devices)
    ordered = mesh_utils.create_hybrid_device_mesh((len(devices) // slices,), (slices,), devices)
    return jax.sharding.Mesh(ordered, ("data",), axis_types=auto)


def state_shardings(state, mesh):
    """Each array of the train state split over the devices along its largest axis that their
    count divides (parameters, AdamW moments, codebooks: fully sharded, gathered where used);
    small or indivisible ones replicated."""

    def place(a):
        spec: list[str | None] = [None] * a.ndim
        divisible = [i for i in range(a.ndim) if a.shape[i] % mesh.size == 0]
        if divisible and a.size >= _SPLIT_FROM:
            spec[max(divisible, key=lambda i: a.shape[i])] = "data"
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(place, state)


def batch_shardings(batch, mesh):
    return {
        k: NamedSharding(mesh, PartitionSpec("data", *([None] * (batch[k].ndim - 1))))
        for k in FIELDS
    }


def _global(local: dict, mesh) -> dict:
    """This process's crops as its part of the global batch (split over the devices)."""
    shardings = batch_shardings(local, mesh)
    return {k: jax.make_array_from_process_local_data(shardings[k], local[k]) for k in FIELDS}


def _identity(config, tok_config) -> dict:
    from mimo_jax.tokenizer.config import to_hf

    return {
        "task": config.task,
        "tokenizer": to_hf(tok_config),
        "a2t": dict(config.a2t) if _stage1(config) else None,
        "discriminator": None if _stage1(config) else json.loads(config.discriminator.to_json()),
        "loss": dict(config.loss),
    }


def run(config, workdir) -> int:
    """The stage's training in `workdir` (locked and written by `experiments.train.run`)."""
    from experiments.loop_support import open_run
    from mimo_jax.tokenizer.config import from_hf

    mesh = mesh_of_devices()
    # The transcripts' tokenizer sizes the A2T LM, so data comes first.
    rate = from_hf(dict(config.model.tokenizer), "config model.tokenizer").sampling_rate
    needs_text = _stage1(config) and config.loss.a2t > 0
    text_tok, train_it = data(config, rate, needs_text)
    tok_config, trainer, state = build(config, text_tok.tokenizer.get_vocab_size())
    state = jax.device_put(state, state_shardings(state, mesh))
    eval_batch = _global(_eval_batch(config, rate, needs_text), mesh) if config.eval_every else None
    identity = _identity(config, tok_config)
    ckpts, writer, start, state = open_run(config, workdir, identity, state, train_it)
    try:
        step, finished = start or 0, (start or 0) >= config.total_steps
        if not finished:
            # The mesh in context: a splash kernel shards itself over it (nn.attention).
            with jax.set_mesh(mesh):
                state, finished = _loop(
                    config, trainer, state, train_it, eval_batch, mesh, ckpts, writer, step
                )
        if finished and config.export_model:
            _export(config, trainer, state, tok_config, workdir)
        return 0
    finally:
        ckpts.close()
        writer.close()


def _eval_batch(config, rate: int, needs_text: bool) -> dict:
    """The fixed crops reconstructed every `eval_every` steps: the first batch, unshuffled."""
    _, it = data(config, rate, needs_text, shuffle=False)
    return next(it)


def _loop(config, trainer, state, train_it, eval_batch, mesh, ckpts, writer, step):
    from experiments.loop_support import (
        Preempted,
        Preemption,
        check_finite,
        checkpoint_if_due,
        due,
        next_batch,
    )

    preemption = Preemption()
    # The state keeps its placement from step to step, so a resumed run, restored to that
    # placement, runs the very program the interrupted one ran (bit-identical losses).
    placed = jax.tree.map(lambda a: a.sharding, state)
    train = jax.jit(trainer.train_step, donate_argnums=0, out_shardings=(placed, None))
    # Read once (a host transfer): only the first batch of a fresh stage 1 initialises codebooks.
    init_pending = _stage1(config) and trainer.needs_init(state)
    if init_pending:
        initialise = jax.jit(trainer.initialise, out_shardings=placed)
    audio_seconds = config.data.batch_size * config.data.crop_seconds
    t_last, last_logged, skipped = time.time(), step, 0
    while step < config.total_steps:
        try:
            local = next_batch(train_it, preemption)
        except Preempted:
            checkpoint_if_due(step, state, train_it, ckpts, writer, True, False)
            return state, False
        skipped += int(np.sum(local["skipped"]))
        batch = _global(local, mesh)
        if init_pending:  # k-means on the first batch
            state, init_pending = initialise(state, batch, jax.random.key(config.seed)), False
        state, metrics = train(state, batch)
        step += 1
        last = step == config.total_steps
        save = due(step, config.checkpoint_every) or last
        if due(step, config.log_every) or last or save:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            check_finite(values, step, ckpts)
        if due(step, config.log_every) or last:
            rate = (step - last_logged) * audio_seconds / max(time.time() - t_last, 1e-9)
            values.update(audio_seconds_per_second=rate, skipped_clips=skipped)
            t_last, last_logged = time.time(), step
            writer.write(step, values)
            writer.progress(step, values)
        if eval_batch is not None and due(step, config.eval_every):
            _reconstruct(trainer, state, eval_batch, writer, step)
        if checkpoint_if_due(step, state, train_it, ckpts, writer, preemption.due(step), save):
            return state, False
    return state, True


def _reconstruct(trainer, state, batch, writer, step: int) -> None:
    """The eval crops through the tokenizer at 8 codebooks and all: the mel distance of each
    to metrics.jsonl, the first crop's audio and log-mel images to TensorBoard."""
    from mimo_jax.evaluation.during_training import log_mel_image
    from mimo_jax.tokenizer.mel_loss import multiscale_mel_loss
    from mimo_jax.tokenizer.stage1 import fit_length

    tokenizer = trainer.model(state).tokenizer
    config = tokenizer.config
    wav, lengths = batch["wav"], batch["lengths"]
    codes, code_lengths = jax.jit(tokenizer.encode)(wav, lengths)
    values, audio = {}, {"reconstruction/original": np.asarray(wav[0])}
    for n in sorted({min(8, codes.shape[-1]), codes.shape[-1]}):
        out, _ = jax.jit(tokenizer.decode)(codes[..., :n], code_lengths)
        out = fit_length(out, wav.shape[1])
        values[f"eval/mel_distance_{n}"] = float(
            multiscale_mel_loss(wav, out, config.sampling_rate, lengths)
        )
        audio[f"reconstruction/{n}_codebooks"] = np.asarray(out[0])
    writer.write(step, values)
    images = {tag: log_mel_image(config, wav) for tag, wav in audio.items()}
    writer.media(step, audio=audio, images=images, sampling_rate=config.sampling_rate)


def _export(config, trainer, state, tok_config, workdir) -> None:
    from mimo_jax import model_checkpoint
    from mimo_jax.tokenizer.config import to_hf

    tokenizer = trainer.model(state).tokenizer
    out = model_checkpoint.save(tokenizer, to_hf(tok_config), workdir / "model")
    print(f"final weights: {out}", flush=True)
