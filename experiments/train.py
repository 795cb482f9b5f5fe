"""Trains a MiMo-Audio LM, or its audio tokenizer (a config whose `task` is tokenizer_stage1 or
tokenizer_stage2: `experiments.train_tokenizer`), from an ml-collections experiment config.

    python -m experiments.train --config experiments/configs/demo.py[:arg] --workdir DIR \
        [--config.total_steps=40 --config.optimizer.learning_rates.llm=1e-4 ...]

DIR may be relative or a gs:// URI (mimo_jax.train.rundir describes its layout); one run at a time
holds it (DIR/lock). Resumes from the newest verified checkpoint in DIR/checkpoints (model,
optimizer and data-iterator state; damaged steps are set aside) and continues with exactly the batch
that came next. SIGTERM (preemption) saves a checkpoint and exits cleanly, also while the run waits
for data or an evaluation (it saves the last finished step then); a non-finite loss stops
the run with a message naming the last good checkpoint. The resolved config goes to DIR/config.json,
metrics to DIR/metrics.jsonl and DIR/tensorboard. `log_every`, `checkpoint_every`, `eval_every`
= 0: off (the last step is still logged and saved). With prompts in `eval_generation`, every
`eval_every` steps the current weights also generate (TTS, ASR, continuation): ASR WER/CER go to
metrics.jsonl, audio, log-mel images and transcripts to TensorBoard. Multi-host:
`jax.distributed.initialize()` runs from the environment on TPU pods and SLURM clusters, or from
--coordinator/--num_processes/--process_id.
"""

import dataclasses
import json
import os
import signal
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.loop_support import NonFiniteLoss, Preemption, due
from experiments.training_loop import ModelRun
from mimo_jax import logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file[:arg]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics)")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (local runs)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes of a local multi-host run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in a local run")


def init_distributed() -> None:
    """jax.distributed from flags (local runs) or from the environment (SLURM, TPU pods, GKE)."""
    if _COORDINATOR.value:
        # Cross-process collectives for CPU devices (local runs); no effect on GPUs and TPUs.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif any(
        k in os.environ
        for k in (
            "SLURM_NTASKS",
            "TPU_WORKER_HOSTNAMES",
            "JAX_COORDINATOR_ADDRESS",
            "MEGASCALE_COORDINATOR_ADDRESS",
        )
    ):
        jax.distributed.initialize()


def data_iterators(config, lm_config):
    from data_pipelines.config import DataConfig
    from data_pipelines.pipeline import make_dataset, parse_sources
    from mimo_jax.tasks.text_tokenizer import TextTokenizer

    cfg = DataConfig.for_model(lm_config, config.data)
    tokenizer = TextTokenizer.from_file(config.data.tokenizer)
    split = config.data.split_by_process
    procs, index = jax.process_count(), jax.process_index()
    per_process = config.data.batch_size // procs

    def make(sources, seed, shuffle):
        ds = make_dataset(
            parse_sources(sources),
            cfg,
            tokenizer,
            batch_size=per_process if split else config.data.batch_size,
            seed=seed,
            process_index=index if split else 0,
            process_count=procs if split else 1,
            workers=config.data.workers,
            shuffle=shuffle,
        )
        return iter(ds)

    def local_rows(batch):  # every process read the global batch: keep this process's rows
        if split:
            return batch
        return {k: v[index * per_process : (index + 1) * per_process] for k, v in batch.items()}

    train = make(config.data.sources, config.seed, True)
    evaluate = (
        (lambda: make(config.data.eval_sources, 0, False)) if config.data.eval_sources else None
    )
    return train, evaluate, local_rows


def run(config, workdir: str) -> int:
    from experiments import config_checks, train_tokenizer
    from mimo_jax import paths
    from mimo_jax.train import rundir, tokenizer_build

    tokenizer = tokenizer_build.is_tokenizer_run(config)
    # Before anything is built or written.
    (train_tokenizer.check if tokenizer else config_checks.check)(config)
    root = paths.resolve(workdir)
    lock = rundir.WorkdirLock(root)
    if jax.process_index() == 0:
        lock.acquire()
    previous = _exit_on_sigterm()
    try:
        if jax.process_index() == 0:
            rundir.remove_leftovers(root)
            config_json = config.to_json_best_effort(indent=2) + "\n"
            paths.write_whole(root / "config.json", config_json)
        return (train_tokenizer.run if tokenizer else _run)(config, root)
    finally:
        lock.release()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """SIGTERM before the training loop (which saves first) exits through the cleanups (the
    lock's release); returns the previous handler, None where signals cannot be set."""

    def stop(*_):
        raise SystemExit(128 + signal.SIGTERM)

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        return None


def _run(config, workdir) -> int:
    from experiments.training_loop import train
    from mimo_jax.nn.partitioning import use_rules
    from mimo_jax.train import build
    from sharding.mesh import mesh_and_rules

    mesh, rules = mesh_and_rules(config)
    build.check_batch_divides(config.data.batch_size, config.optimizer.grad_accum, mesh)
    # Built outside the mesh context: parameters are placed by explicit shardings, and
    # nnx.eval_shape would read the logical axis names as mesh axes inside it.
    lm_config, model = build.build_model(config, mesh, rules)
    trainer, state = build.build_trainer(config, build.add_adapters(config, model, mesh, rules))
    del model
    # Built outside the mesh context (the tokenizers' axis names are not the LM's rules).
    generation_eval = _generation_eval(config, lm_config)
    with jax.set_mesh(mesh), use_rules(rules):
        train_it, eval_factory, local_rows = data_iterators(config, lm_config)
    identity = {
        "model": lm_config.to_hf(),
        "trainable": trainer.optimizer.trainable_groups,
        "loss_weights": config.loss.weights,
        "remat": lm_config.remat_policy,
    }
    if config.lora.rank:  # a resumed run must train the same adapters
        identity["lora"] = json.loads(config.lora.to_json())
    run = LMRun(
        state,
        identity,
        train_it,
        mesh,
        rules,
        config,
        lm_config,
        trainer,
        eval_factory,
        local_rows,
        generation_eval,
    )
    del state
    return train(config, workdir, run)


@dataclasses.dataclass
class LMRun(ModelRun):
    """The LM's hooks of the training loop: its rows of the global batch, the compiled steps,
    groups per second and MFU, the held-out loss and generation as evaluations, the export."""

    config: Any
    lm_config: Any
    trainer: Any
    eval_factory: Any  # a fresh iterator of the held-out batches, or None
    local_rows: Any
    generation_eval: Any  # evaluation.during_training.GenerationEval, or None
    steps: Any = None  # build.Steps, once compiled
    flops: float = 0.0  # per group

    def rows(self, batch: dict) -> dict:
        return self.local_rows(batch)

    def compile(self, state):
        from mimo_jax.train import build
        from mimo_jax.train.flops import train_flops_per_group

        self.steps = build.compile_steps(self.trainer, state)
        self.flops = train_flops_per_group(
            self.lm_config, self.config.data.context_length, self.trainer.loss.trains_patch_decoder
        )
        rng = jax.random.key(self.config.seed)
        return lambda state, rows: self.steps.train(state, build.global_batch(rows, self.mesh), rng)

    def rates(self, steps: int, seconds: float, values: dict, skipped: int) -> dict:
        groups = self.config.data.batch_size * self.config.data.context_length
        peak = self.config.peak_tflops_per_device * 1e12 * jax.device_count()
        rate = steps * groups / max(seconds, 1e-9)
        return dict(
            groups_per_second=rate,
            mfu=rate * self.flops / peak if peak else 0.0,
            tokens_per_second=rate * values["tokens"] / groups,  # non-padding
            skipped_documents=_sum_over_processes(skipped),
        )

    def evaluate(self, state, step: int, preemption: Preemption, at_start: bool, writer) -> None:
        if self.eval_factory and (at_start or due(step, self.config.eval_every)):
            with preemption.interruptible():
                scores = self.held_out_loss(state)
            writer.write(step, scores)
        if self.generation_eval is not None and not at_start and due(step, self.config.eval_every):
            # Outside the training mesh: the audio tokenizer lives on one device, and the LM's
            # batches of a few prompts are not split by the training rules.
            with jax.set_mesh(None), preemption.interruptible():
                scalars, media = self.generation_eval(self.trainer.model(state))
            if scalars:
                writer.write(step, scalars)
            writer.media(step, **media)

    def held_out_loss(self, state) -> dict[str, float]:
        from mimo_jax.train.build import global_batch

        it, n = self.eval_factory(), self.config.eval_steps
        totals: dict[str, float] = {}
        for _ in range(n):
            batch = global_batch(self.local_rows(next(it)), self.mesh)
            for k, v in jax.device_get(self.steps.eval(state, batch)).items():
                totals[k] = totals.get(k, 0.0) + float(v) / n
        return {f"eval/{k}": v for k, v in totals.items()}

    def export(self, state, workdir) -> None:
        from mimo_jax.train import build

        written = build.export(self.config, self.trainer, state, self.lm_config, workdir)
        for what, path in written.items():
            print(f"{what}: {path}", flush=True)


def _sum_over_processes(count: int) -> int:
    if jax.process_count() == 1:
        return count
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def _generation_eval(config, lm_config):
    """The eval prompts of `eval_generation`, loaded; None when the config has none."""
    from experiments.config_checks import generation_eval_on

    if not generation_eval_on(config):
        return None
    from mimo_jax.evaluation.during_training import GenerationEval, GenerationEvalConfig

    g = config.eval_generation
    return GenerationEval(
        GenerationEvalConfig(
            audio_tokenizer=g.audio_tokenizer,
            text_tokenizer=config.data.tokenizer,
            tts_texts=tuple(g.tts_texts),
            asr_manifest=g.asr_manifest,
            continuation_audio=tuple(g.continuation_audio),
            max_new_groups=g.max_new_groups,
            seed=config.seed,
        ),
        lm_config,
    )


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:  # absl's --verbosity/-v: the libraries' INFO logs
        logs.configure("warning")
    init_distributed()
    try:
        return run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


def cli() -> None:
    from experiments.cli import parse_flags

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
