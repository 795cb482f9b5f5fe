"""The parts of the training loop (`experiments.training_loop`): the preemption signal, opening a
run's checkpoints and metrics, the non-finite-loss stop, the every-N-steps rule and the
hyperparameters TensorBoard shows."""

import contextlib
import signal

import jax
import numpy as np


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(Exception):
    """SIGTERM came while the loop waited for data or an evaluation."""


class Preemption:
    """Set by SIGTERM; in multi-host runs also the preemption sync point JAX reaches.

    The loop saves at the end of the step it is in. Waiting for data or an evaluation may take
    without bound (a slow or unreachable store, a source that never yields), so inside
    `interruptible()` a single-process run's SIGTERM also raises `Preempted` there: the loop then
    saves the last finished step at once. The processes of a multi-host run save together, at the
    sync point only.
    """

    def __init__(self):
        self.signalled = False
        self._waiting = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.signalled = True
        if self._waiting:
            self._waiting = False
            raise Preempted

    @contextlib.contextmanager
    def interruptible(self):
        if jax.process_count() > 1:
            yield
            return
        if self.signalled:
            raise Preempted
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def due(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except RuntimeError:  # no preemption service in this runtime
                pass
        return self.signalled


def next_batch(data_iterator, preemption: Preemption):
    """The next batch, waited for interruptibly; at `Preempted` the iterator is set back to before
    it, so that a checkpoint saved now resumes with exactly this batch."""
    before = data_iterator.get_state()
    try:
        with preemption.interruptible():
            return next(data_iterator)
    except Preempted:
        data_iterator.set_state(before)
        raise


def hparams(config) -> dict:
    """The config's scalar leaves by dotted key (TensorBoard's hparams take scalars only)."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            if hasattr(value, "items"):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (bool, int, float, str)):
                out[prefix + key] = value

    walk(config, "")
    return out


def check_finite(values: dict[str, float], step: int, ckpts) -> None:
    """Stops the run, naming the last good checkpoint, at a non-finite loss or a skipped
    update."""
    if np.isfinite(values["loss"]) and values.get("update_skipped", 0) == 0:
        return
    norm = values.get("grad_norm", values.get("gen_grad_norm"))
    raise NonFiniteLoss(
        f"non-finite loss {values['loss']} (grad norm {norm}) at step {step}: stopping; the "
        "last good checkpoint is "
        + (
            f"step {ckpts.good_step} in {ckpts.directory}"
            if ckpts.good_step is not None
            else "none (no checkpoint was saved or restored)"
        )
    )


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0  # every=0: off


def open_run(config, workdir, identity: dict, state, data_iterator):
    """(checkpoints, metrics writer, start step or None, state): the run's checkpoints opened and
    the newest verified step restored (model, optimizer and data iterator), and metrics.jsonl and
    TensorBoard cut back to it. The caller closes both."""
    from absl import logging

    from mimo_jax.train.metrics import MetricsWriter
    from mimo_jax.train.train_checkpoints import TrainCheckpoints, abstract_like

    ckpts = TrainCheckpoints(
        workdir, identity, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    try:
        start, restored = ckpts.restore_latest(abstract_like(state), data_iterator)
    except BaseException:
        ckpts.close()
        raise
    if start is not None:
        state = restored
        logging.info("resumed from %s at step %d", ckpts.directory, start)
    writer = MetricsWriter(
        workdir,
        config.total_steps,
        start or 0,
        config_json=config.to_json_best_effort(indent=2),
        hparams=hparams(config),
    )
    return ckpts, writer, start, state


def checkpoint_if_due(step, state, data_iterator, ckpts, writer, preempted: bool, due_now: bool):
    """Saves at a preemption (and waits: the process is about to exit) or when a save is due;
    returns whether the run must stop. The metrics up to a checkpoint are made durable with it.
    A preemption at a step that is saved already, or before the first, saves nothing new."""
    if preempted:
        writer.flush()
        if step == 0:
            print("preempted before the first step: nothing to save", flush=True)
            return True
        if step != ckpts.latest_step():
            ckpts.save(step, state, data_iterator)
        ckpts.wait()
        print(f"preempted: checkpoint saved at step {step} in {ckpts.directory}", flush=True)
        return True
    if due_now:
        writer.flush()
        ckpts.save(step, state, data_iterator)
    return False
