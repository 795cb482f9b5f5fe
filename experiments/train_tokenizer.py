"""Audio tokenizer training through the train entry point: `experiments.train` on a config whose
`task` is `tokenizer_stage1` or `tokenizer_stage2` (experiments/configs/tokenizer_stage*.py).

The run is the LM's (`experiments.training_loop`): run directory, lock, Orbax checkpoints (model,
optimizer and data-iterator state, verified on restore), SIGTERM, resume with exactly the next
batch, the non-finite-loss stop, metrics.jsonl/TensorBoard and the export. The state is built and
placed by `mimo_jax.train.tokenizer_build`, on the config's mesh by its logical-axis rules
(`mesh.rules`, as the LM's); the data are random crops of the tokenize manifests with transcripts
for the A2T loss (`data_pipelines.waveforms`). Stage 1 runs the codebooks' k-means on its first
batch. Every `eval_every` steps a fixed batch of crops is reconstructed (8 codebooks and all): the
multi-scale mel distance goes to metrics.jsonl, the audio and log-mel images to TensorBoard. The
run ends by exporting the tokenizer (its RVQ buffers included) to workdir/model, which
convert_torch_weights.py turns into an official directory and stage 2 starts from.
"""

import dataclasses
from typing import Any

import jax

from experiments.loop_support import Preemption, due
from experiments.training_loop import ModelRun
from mimo_jax.train import tokenizer_build as tb


def check(config) -> None:
    """Raises one ValueError naming every problem of a tokenizer config, before anything runs."""
    from mimo_jax import model_checkpoint
    from mimo_jax.nn.attention import IMPLEMENTATIONS
    from mimo_jax.tokenizer.stage2 import check_stage2
    from mimo_jax.train.build import data_ways
    from sharding.mesh import mesh_and_rules

    problems = []
    try:
        tokenizer = tb.tokenizer_architecture(config)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"model.tokenizer: expected a tokenizer config.json ({e})") from None
    if config.model.init_checkpoint and not model_checkpoint.is_model_checkpoint(
        config.model.init_checkpoint
    ):
        problems.append(
            f"model.init_checkpoint={config.model.init_checkpoint!r}: expected a tokenizer "
            f"model checkpoint (a stage-1 run's workdir/model, or a converted one)"
        )
    if not tb.is_stage1(config) and not config.model.init_checkpoint:
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
    elif not tb.is_stage1(config):
        try:
            check_stage2(
                tokenizer,
                tb.discriminator_config(config),
                tb.crop_samples(config, tokenizer.sampling_rate),
            )
        except (ValueError, TypeError) as e:
            problems.append(f"data.crop_seconds={config.data.crop_seconds}: {e}")
    ways = data_ways(mesh_and_rules(config)[0])
    if config.data.batch_size % ways or config.data.batch_size % jax.process_count():
        problems.append(
            f"data.batch_size={config.data.batch_size}: expected a multiple of the "
            f"{ways} data-parallel devices (mesh data x fsdp) and {jax.process_count()} processes"
        )
    for key in ("total_steps", "log_every", "checkpoint_every", "eval_every"):
        low = 1 if key == "total_steps" else 0
        if not (isinstance(config[key], int) and config[key] >= low):
            problems.append(f"{key}={config[key]!r}: expected an integer >= {low}")
    if problems:
        raise ValueError("\n".join(problems))


def data(config, sampling_rate: int, needs_text: bool, *, shuffle=True):
    """(text tokenizer, this process's batch iterator)."""
    from data_pipelines.waveforms import WaveformConfig, make_dataset, preflight
    from mimo_jax.tasks.text_tokenizer import TextTokenizer

    tok = TextTokenizer.from_file(config.data.tokenizer)
    cfg = WaveformConfig(
        manifests=tuple(m for m in config.data.manifests.split(",") if m),
        crop_samples=tb.crop_samples(config, sampling_rate),
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


def run(config, workdir) -> int:
    """The stage's training in `workdir` (locked and written by `experiments.train.run`)."""
    from experiments.training_loop import train
    from sharding.mesh import mesh_and_rules

    mesh, rules = mesh_and_rules(config)
    # The transcripts' tokenizer sizes the A2T LM, so data comes first.
    rate = tb.tokenizer_architecture(config).sampling_rate
    needs_text = tb.is_stage1(config) and config.loss.a2t > 0
    text_tok, train_it = data(config, rate, needs_text)
    tok_config, trainer, state = tb.build(config, text_tok.tokenizer.get_vocab_size())
    state = jax.device_put(state, tb.train_state_shardings(state, mesh, rules))
    eval_batch = None
    if config.eval_every:  # the fixed crops reconstructed: the first batch, unshuffled
        eval_batch = tb.global_batch(next(data(config, rate, needs_text, shuffle=False)[1]), mesh)
    identity = tb.identity(config, tok_config)
    run = TokenizerRun(
        state, identity, train_it, mesh, rules, config, tok_config, trainer, eval_batch
    )
    del state
    return train(config, workdir, run)


@dataclasses.dataclass
class TokenizerRun(ModelRun):
    """The tokenizer's hooks of the training loop: its crops of the global batch, the stage's
    compiled step (stage 1's k-means on the first batch), seconds of audio per second, the
    reconstruction of fixed crops as the evaluation, the export."""

    config: Any
    tok_config: Any
    trainer: Any
    eval_batch: dict | None

    def compile(self, state):
        # The state keeps its placement from step to step, so a resumed run, restored to that
        # placement, runs the very program the interrupted one ran (bit-identical losses).
        placed = jax.tree.map(lambda a: a.sharding, state)
        train = jax.jit(self.trainer.train_step, donate_argnums=0, out_shardings=(placed, None))
        # Read once (a host transfer): the first batch of a fresh stage 1 initialises codebooks.
        init_pending = tb.is_stage1(self.config) and self.trainer.needs_init(state)
        if init_pending:
            initialise = jax.jit(self.trainer.initialise, out_shardings=placed)
        key = jax.random.key(self.config.seed)

        def step(state, rows):
            nonlocal init_pending
            batch = tb.global_batch(rows, self.mesh)
            if init_pending:  # k-means on the first batch
                state, init_pending = initialise(state, batch, key), False
            return train(state, batch)

        return step

    def rates(self, steps: int, seconds: float, values: dict, skipped: int) -> dict:
        audio_seconds = self.config.data.batch_size * self.config.data.crop_seconds
        rate = steps * audio_seconds / max(seconds, 1e-9)
        return dict(audio_seconds_per_second=rate, skipped_clips=skipped)

    def evaluate(self, state, step: int, preemption: Preemption, at_start: bool, writer) -> None:
        from mimo_jax.evaluation.during_training import reconstruction

        if at_start or self.eval_batch is None or not due(step, self.config.eval_every):
            return
        scalars, media = reconstruction(self.trainer.model(state).tokenizer, self.eval_batch)
        writer.write(step, scalars)
        writer.media(step, **media)

    def export(self, state, workdir) -> None:
        written = tb.export(self.trainer.model(state).tokenizer, self.tok_config, workdir)
        for what, path in written.items():
            print(f"{what}: {path}", flush=True)
