"""The tokenize job on a Ray cluster: `python -m data_pipelines.tokenize --engine ray`.

The driver (the command) cuts the manifest into the local engine's shards and queues the
unfinished ones; a pool of `--workers` actors, each holding the encoder loaded once, pulls them: a
free actor takes the next shard. An actor encodes and commits a shard with the local engine's code
(`ShardJob.run`: the file under a temporary name then renamed, its sidecar last), so the output
is the same whatever the engine, the number of workers or the order in which shards finish, as
long as the encoders do the same arithmetic: the same accelerator kind, or on CPUs the same
number of threads (XLA's dot products block their sums by it), which pinning makes one.
`--out` must be a directory every worker reaches (gs://, or a file system they share).

An actor takes `--worker-accelerators` GPUs or TPU chips where the cluster has them; else it runs
on one core of a CPU node (one actor per core is the cluster's parallelism), the actors spread
over the nodes: it claims a core no other actor of its node holds and pins itself to it before
JAX starts, since XLA sizes its CPU thread pool by the cores a process may run on and would
otherwise spread each actor over every core of the node.

Faults: an actor that dies (killed, out of memory, its node lost) is replaced and its shard goes
back to the head of the queue, for the next free actor; a shard that has lost its actor
`--max-retries` + 1 times is committed with no record, each of its lines an error naming the
shard's line range, and the job goes on. An encoder that fails to load, or an error raised in a
worker, stops the job with the worker's message. A driver that dies takes its actors with it; the
rerun skips the committed shards.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import tempfile
import time
from typing import IO, Any

import ray
import tqdm
from etils import epath

from data_pipelines import encoders
from data_pipelines.shard_job import ShardJob, WorkerError, check_codebooks
from data_pipelines.shards import MANIFEST
from mimo_jax import logs
from mimo_jax.tokenizer.config import TokenizerConfig

log = logging.getLogger(__name__)

# A CPU actor's BLAS and OpenMP threads; XLA's come from the core it claims (`claim_core`).
SINGLE_THREADED = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
CONNECT_SECONDS = 10.0
# Where the CPU actors of a node (of any job) claim their cores: one locked file per core.
CORE_LOCKS = os.path.join(tempfile.gettempdir(), "mimo-jax-cores")
# How an actor's death shows (killed, out of memory, its node lost), unlike an error it raised.
DEATHS = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.NodeDiedError,
)


def claim_core(locks: str = CORE_LOCKS) -> tuple[int, IO] | None:
    """Pins the calling thread, and the threads it starts, to one of its cores that no other
    claimant holds: the core and its lock (held while the file stays open, released when the
    process dies), or None where every core is held or the locks cannot be taken."""
    try:
        os.makedirs(locks, exist_ok=True)
        for core in sorted(os.sched_getaffinity(0)):
            lock = open(os.path.join(locks, f"core-{core}.lock"), "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            os.sched_setaffinity(0, {core})
            return core, lock
    except OSError as e:  # another user's lock folder, a container that forbids pinning
        log.warning("cannot claim a core under %s (%s); this actor is unpinned", locks, e)
        return None
    log.warning("every core of this node is held by an actor; this one is unpinned")
    return None


class ShardWorker:
    """A Ray actor: the encoder, loaded once, and the shards it is handed."""

    def __init__(self, args):
        self.args, self.encode = args, None
        self.core: tuple[int, IO] | None = None

    def load(self) -> tuple[TokenizerConfig, int | None]:
        """Loads the encoder: its config, and the core the actor is pinned to (None: not)."""
        logs.configure(self.args.log_level)
        a = self.args
        if not any(ray.get_runtime_context().get_accelerator_ids().values()):
            self.core = claim_core()  # before the encoder starts JAX's CPU client
        self.encode = encoders.load_encoder(a.encoder, a.checkpoint, a.codebooks)
        return encoders.config_of(self.encode), None if self.core is None else self.core[0]

    def encode_shard(self, job: ShardJob) -> dict:
        started = time.time()
        info = job.run(_Uncounted(), self.encode)
        return {"hours": info["hours"], "started": started, "finished": time.time()}


class _Uncounted:
    """The progress of a shard inside an actor (the driver counts whole shards)."""

    def update(self, n: int) -> None:
        pass


@dataclasses.dataclass
class Task:
    slot: int  # the actor's place in the pool
    job: ShardJob | None  # None: the actor's load
    sent: float


@dataclasses.dataclass
class Timing:
    """One encoded shard: when the driver sent it, the actor started and finished it, and the
    driver had the result (seconds since the epoch)."""

    slot: int
    hours: float
    sent: float
    started: float
    finished: float
    received: float

    @property
    def overhead(self) -> float:
        return (self.started - self.sent) + (self.received - self.finished)

    @property
    def encode(self) -> float:
        return self.finished - self.started


class Progress:
    """One line: shards done / total, the time left, audio hours per wall hour, retries."""

    def __init__(self, total: int, done: int):
        self.bar = tqdm.tqdm(total=total, initial=done, unit="shard", desc="tokenize", disable=None)
        self.start, self.hours = time.time(), 0.0

    def shard(self, hours: float, retries: int) -> None:
        self.hours += hours
        rate = self.hours / max(time.time() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:.0f} audio h/h, {retries} retries", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Pool:
    """The actors and the queue of shards; `run` hands the next shard to each free actor."""

    def __init__(self, args, jobs: list[ShardJob], workers: int, options: dict):
        self.args, self.options = args, options
        self.queue = collections.deque(jobs)
        self.actors: list = [None] * workers
        self.tasks: dict = {}  # ObjectRef -> Task
        self.idle: list[int] = []
        self.deaths: collections.Counter = collections.Counter()  # shard -> actors lost on it
        self.load_deaths = 0  # actors lost while loading, in a row
        self.retries = 0
        self.given_up: list[int] = []
        self.audio: TokenizerConfig | None = None
        self.timings: list[Timing] = []
        self.cores: dict[int, int | None] = {}  # slot -> the core its actor is pinned to

    def run(self, progress: Progress) -> None:
        self.progress = progress
        self.worker: Any = ray.remote(ShardWorker).options(**self.options)  # one class for all
        for slot in range(len(self.actors)):
            self._start(slot)
        try:
            while self.tasks:
                [ref], _ = ray.wait(list(self.tasks), num_returns=1)
                self._settle(ref, self.tasks.pop(ref))
                self._dispatch()
        finally:
            for actor in self.actors:
                if actor is not None:
                    ray.kill(actor)

    def _start(self, slot: int) -> None:
        actor = self.worker.remote(self.args)
        self.actors[slot] = actor
        self.tasks[actor.load.remote()] = Task(slot, None, time.time())

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            slot, job = self.idle.pop(), self.queue.popleft()
            ref = self.actors[slot].encode_shard.remote(job)
            self.tasks[ref] = Task(slot, job, time.time())

    def _settle(self, ref, task: Task) -> None:
        try:
            result = ray.get(ref)
        except DEATHS as e:
            self._lost(task, e)
        except ray.exceptions.RayTaskError as e:
            what = "loading the encoder" if task.job is None else f"on shard {task.job.k}"
            cause = getattr(e, "cause", None) or e
            raise WorkerError(f"worker {task.slot}, {what}: {type(cause).__name__}: {cause}")
        else:
            if task.job is None:
                self._loaded(task.slot, *result)
            else:
                self._encoded(task, result)

    def _loaded(self, slot: int, audio: TokenizerConfig, core: int | None) -> None:
        self.cores[slot] = core
        if self.audio is None:
            check_codebooks(self.args.codebooks, audio)
        elif audio != self.audio:
            raise WorkerError(f"worker {slot}: its encoder's config differs from the others'")
        self.audio, self.load_deaths = audio, 0
        self.idle.append(slot)

    def _encoded(self, task: Task, result: dict) -> None:
        assert task.job is not None  # a load task returns the encoder's config, not a shard
        timing = Timing(task.slot, sent=task.sent, received=time.time(), **result)
        self.timings.append(timing)
        self.progress.shard(timing.hours, self.retries)
        if self.args.verbosity:
            log.info(
                "worker %d: shard %d, %.4f h of audio in %.2f s (%.0f audio h/h)",
                task.slot,
                task.job.k,
                timing.hours,
                timing.encode,
                timing.hours * 3600 / max(timing.encode, 1e-9),
            )
        self.idle.append(task.slot)

    def _lost(self, task: Task, error: Exception) -> None:
        """An actor died: replaced while shards remain; its shard retried or given up."""
        self.actors[task.slot] = None
        death = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        if task.job is None:
            self.load_deaths += 1
            if self.load_deaths > self.args.max_retries:
                raise WorkerError(
                    f"{self.load_deaths} workers in a row died loading the encoder; the last: "
                    f"{death}"
                )
        else:
            self.deaths[task.job.k] += 1
            if self.deaths[task.job.k] > self.args.max_retries:
                self._give_up(task.job, death)
            else:
                self.retries += 1
                log.warning(
                    "worker %d died on shard %d (%s); retrying it", task.slot, task.job.k, death
                )
                self.queue.appendleft(task.job)
        if self.queue or task.job is None:
            self._start(task.slot)

    def _give_up(self, job: ShardJob, death: str) -> None:
        first, last = job.lines
        reason = (
            f"shard {job.k} (manifest lines {first}-{last}) lost its worker "
            f"{self.deaths[job.k]} times (the last: {death})"
        )
        log.warning("%s; its lines are reported in errors.jsonl", reason)
        assert self.audio is not None  # shards go only to workers that loaded the encoder
        job.give_up(self.audio, reason)
        self.given_up.append(job.k)
        self.progress.shard(0.0, self.retries)

    def summary(self) -> str:
        t = self.timings
        if not t:
            return f"ray, {len(self.actors)} workers: no shard encoded"
        wall = max(x.received for x in t) - min(x.sent for x in t)
        hours = sum(x.hours for x in t)
        encode = sum(x.encode for x in t) / len(t)
        overhead = sum(x.overhead for x in t) / len(t)
        return (
            f"ray, {len(self.actors)} workers: {len(t)} shards in {wall:.1f} s from the first "
            f"dispatch, {hours * 3600 / max(wall, 1e-9):.0f} audio hours per hour, "
            f"{self.retries} retries, {len(self.given_up)} shards given up; per shard "
            f"{encode:.3f} s encoding, {overhead * 1000:.1f} ms of scheduling "
            f"({100 * overhead / max(encode, 1e-9):.2f} %)"
        )

    def per_worker(self) -> list[str]:
        lines = []
        for slot in range(len(self.actors)):
            mine = [x for x in self.timings if x.slot == slot]
            busy, hours = sum(x.encode for x in mine), sum(x.hours for x in mine)
            core = self.cores.get(slot)
            pinned = "" if core is None else f" (core {core})"
            lines.append(
                f"worker {slot}{pinned}: {len(mine)} shards, {hours:.4f} h of audio, "
                f"{hours * 3600 / max(busy, 1e-9):.0f} audio h/h while encoding"
            )
        return lines


def actor_options(nodes: list[dict], per_worker: int) -> tuple[dict, int]:
    """An actor's Ray options and the default number of actors, from the resources of each node:
    `per_worker` TPU chips or GPUs where the cluster has them, else a CPU actor (one core).
    An actor no node can hold is refused (Ray would wait for it forever)."""
    for name, option in (
        ("TPU", lambda n: {"resources": {"TPU": n}}),
        ("GPU", lambda n: {"num_gpus": n}),
    ):
        have = [node.get(name, 0) for node in nodes]
        if per_worker and sum(have):
            if per_worker > max(have):
                raise ValueError(
                    f"--worker-accelerators {per_worker}: no node of the cluster has that many "
                    f"{name}s (the most: {max(have):g}); expected at most that"
                )
            return option(per_worker), sum(int(h // per_worker) for h in have)
    cpu = {"scheduling_strategy": "SPREAD", "runtime_env": {"env_vars": SINGLE_THREADED}}
    return cpu, max(1, int(sum(node.get("CPU", 0) for node in nodes)))


def check_reachable(address: str) -> None:
    """Fails within CONNECT_SECONDS, in one line, where Ray itself would retry for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"--ray-address {address}: expected host:port of a Ray cluster's head "
            f"(`ray start --head` prints it)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as e:
        raise ValueError(
            f"--ray-address {address}: cannot connect ({e}); expected the head of a running Ray "
            f"cluster (`ray start --head`)"
        ) from None


@contextlib.contextmanager
def connected(address: str | None):
    """Ray, connected to `address` (checked by `check_reachable` with the other arguments), else
    to RAY_ADDRESS's cluster (`ray job submit` sets it), else a new Ray on this machine (not the
    one a past `ray start` here names, which may be long dead); a Ray already initialised in
    this process (a notebook's, the tests') is used as it is."""
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise ValueError(f"Ray at {address}: {e}") from None
    try:
        yield
    finally:
        ray.shutdown()


def run(args, out: epath.Path, pending: list[ShardJob], total: int) -> int:
    """Encodes the `pending` shards (of `total`) on a pool of actors; returns how many."""
    if not pending:
        return 0
    with connected(args.ray_address):
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        options, default = actor_options(nodes, args.worker_accelerators)
        pool = Pool(args, pending, min(args.workers or default, len(pending)), options)
        (out / MANIFEST).unlink(missing_ok=True)  # rewritten once every shard is done again
        progress = Progress(total, total - len(pending))
        try:
            pool.run(progress)
        finally:
            progress.close()
    print(pool.summary())
    if args.verbosity:
        print("\n".join(pool.per_worker()))
    return len(pending)
