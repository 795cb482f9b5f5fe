"""The one training loop, for the LM (`experiments.train`) and the audio tokenizer
(`experiments.train_tokenizer`): the run's checkpoints opened and restored (`open_run`), the steps,
metrics, periodic evaluation, checkpoints and the preemption save, then the export. What differs
between the models is a `ModelRun`'s."""

import abc
import contextlib
import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from experiments.loop_support import (
    Preempted,
    Preemption,
    check_finite,
    checkpoint_if_due,
    due,
    next_batch,
    open_run,
)
from mimo_jax.nn.partitioning import Rules, use_rules

Step = Callable[[Any, dict], tuple[Any, Any]]


@dataclasses.dataclass
class ModelRun(abc.ABC):
    """One model's part of a run: its built state and data, and the hooks the loop calls."""

    state: Any  # the train state, placed on the mesh (dropped once restored)
    identity: dict  # what a resumed run must match
    train_it: Any  # this process's batches (a checkpointable iterator)
    mesh: jax.sharding.Mesh
    rules: Rules  # the logical-axis rules (a preset of `sharding.rules`)

    def rows(self, batch: dict) -> dict:
        """This process's rows of a batch its iterator gave."""
        return batch

    @abc.abstractmethod
    def compile(self, state) -> Step:
        """`step(state, rows) -> (state, metrics)`, compiled for the (restored) state."""

    @abc.abstractmethod
    def rates(self, steps: int, seconds: float, values: dict, skipped: int) -> dict:
        """The throughput figures logged beside the metrics of `steps` steps in `seconds`;
        `skipped`: what this process's data skipped since the run (re)started."""

    def evaluate(self, state, step: int, preemption: Preemption, at_start: bool, writer) -> None:
        """The evaluations due at `step` (`at_start`: before the first step of a fresh run),
        written to `writer`; none by default."""

    @abc.abstractmethod
    def export(self, state, workdir) -> None:
        """The final weights, written to the run directory."""


def train(config, workdir, run: ModelRun) -> int:
    """Trains `run` to `config.total_steps` in `workdir` (locked by `experiments.train.run`),
    resuming from its newest verified checkpoint; exports the weights once finished."""
    with jax.set_mesh(run.mesh), use_rules(run.rules):
        ckpts, writer, start, state = open_run(
            config, workdir, run.identity, run.state, run.train_it
        )
        run.state = None  # the restored state replaces it (one copy in memory)
        try:
            finished = (start or 0) >= config.total_steps  # done before: nothing to compile
            if not finished:
                state, finished = _loop(config, run, state, start or 0, ckpts, writer)
            if finished and config.export_model:
                run.export(state, workdir)
            return 0
        finally:
            ckpts.close()
            writer.close()


def _loop(config, run: ModelRun, state, step: int, ckpts, writer) -> tuple[Any, bool]:
    """(state, whether the run finished): False when it stopped at a preemption."""
    train_step = run.compile(state)
    preemption = Preemption()
    t_last, last_logged = time.time(), step
    skipped = 0  # what the data skipped in this process's rows since the run (re)started

    def evaluations(state, step: int, at_start: bool = False) -> None:
        """Dropped at SIGTERM (the loop then saves and stops)."""
        with contextlib.suppress(Preempted):
            run.evaluate(state, step, preemption, at_start, writer)

    if config.get("eval_at_start") and step == 0:
        evaluations(state, 0, at_start=True)
    while step < config.total_steps:
        try:
            rows = run.rows(next_batch(run.train_it, preemption))
        except Preempted:
            checkpoint_if_due(step, state, run.train_it, ckpts, writer, True, False)
            return state, False
        skipped += int(np.sum(rows["skipped"]))
        state, metrics = train_step(state, rows)
        step += 1
        last = step == config.total_steps
        save = due(step, config.checkpoint_every) or last
        if due(step, config.log_every) or last or save:
            # Checked before every save too, so that each saved step is a good one.
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            check_finite(values, step, ckpts)
        if due(step, config.log_every) or last:
            elapsed = time.time() - t_last
            values.update(run.rates(step - last_logged, elapsed, values, skipped))
            t_last, last_logged = time.time(), step
            writer.write(step, values)
            writer.progress(step, values)
        evaluations(state, step)
        if checkpoint_if_due(step, state, run.train_it, ckpts, writer, preemption.due(step), save):
            return state, False
    return state, True
