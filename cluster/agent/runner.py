"""Inference workers: threads that run models, apart from the I/O thread that owns the bus sockets.

The I/O thread validates a request and submits a Job; a worker builds torch tensors over the received frames (no
copy), runs the model and pushes the answer frames to the I/O thread over an inproc socket of its own (ZeroMQ
sockets are not shared between threads). A forward pass of any length never delays a heartbeat (only models measured
to take well under a millisecond may run inline in the I/O thread, a bounded time per loop pass, see INLINE_MAX_S).

Dynamic batching (per model, from config.json: `max_batch_size` > 1 turns it on, `max_queue_delay_us` bounds the
wait): a worker takes queued requests for the model in order while their rows (the inputs' first dimension) fit in
max_batch_size rows, as Triton counts it; the first that does not fit waits at the head of the queue for the next
batch (never skipped, so never starved). It stacks their inputs along the first dimension, runs one forward pass and
splits the outputs back, each caller getting exactly its own rows. A lone request goes at once; only when requests
are already queuing (a burst) does the worker wait up to the delay for the batch to fill. If a batched pass fails,
each request is run alone, so one bad request fails only itself. A request of more rows than max_batch_size reaches
a worker only with `oversize: "split"` (the agent refuses it otherwise, ModelConfig.check_inputs): it runs alone, in
chunks of at most max_batch_size rows, its outputs concatenated into one answer. No forward pass ever holds more
than max_batch_size rows (max_batch_size 0: no batching and no row limit).

Deadlines and cancellation: a Job carries its deadline (the broker says how long the request has left); a job whose
deadline passed before a worker takes it is not run, and a job the broker cancels (its client gave up) is taken out
of the queue if no worker has it yet. Both are answered ERROR by `skip` (TIMEOUT or CANCELLED), never run.

Instances (config `instances: N`): the model is loaded N times; each batch a worker takes runs on a free copy.
Execution slots are per model: a model runs at most `slots` batches at once (its instances, or the pool's `count`
if more), and the pool has a thread for every slot of every model (`ensure_threads`), so a slow (or hung) model
queues only behind itself and never holds the threads another model needs.

Hung calls: a Python thread cannot be cancelled, so `hung` says which running batch has run past its bound (a
multiple of its request's deadline, at least a floor; Timings.hang_factor, hang_min), for the agent to drain and
exit (its supervisor restarts it); the threads are daemons, so a hung one never blocks the process's exit.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from cluster.agent.pipeline import as_model_inputs, stack_rows
from cluster.codec import decode_tensors, encode_tensors
from cluster.model_config import InputError, batched_inputs, request_rows
from cluster.protocol import Command, ErrorCode, ProtocolError, Reply, error_header, routed
from cluster.sockets import send_frames
from cluster.statistics import ModelStats

log = logging.getLogger("cluster.agent")

# A model whose recent runs all took under INLINE_MAX_S may run in the agent's I/O thread, idle or under load, saving
# two thread hand-overs (~100-200 us of a ~600 us round trip here; with 64 echo requests in flight, 30% of them went
# through the workers afterwards, against 81% before). The I/O thread runs inline for at most INLINE_BUDGET_S per loop
# pass, so a heartbeat is never late by more than that; anything slower, batched, or past the pass's budget goes to
# the workers. CLUSTER_AGENT_INLINE=0 turns it off.
INLINE_MAX_S = 0.0005
INLINE_BUDGET_S = 0.005
# "Took" is the thread's CPU time (a run preempted on a busy host is not a slow model), with a wall-time guard: a run
# whose wall time passed INLINE_BUDGET_S (a model that waits, not computes) sends the model to the workers until its
# decaying slowest wall time is back under it. Slowest CPU time decays by 0.9 a run, slowest wall time by this.
INLINE_WALL_DECAY = 0.8
# time.thread_time is a syscall (~2 us, 10% of an echo request's agent CPU): it is read while a model is learned (its
# first 10 runs), after a run slower than INLINE_MAX_S in wall time, and every CPU_SAMPLE_EVERY runs. Any other run
# that took under INLINE_MAX_S of wall time took at most that much CPU: its wall time stands for its CPU time.
CPU_SAMPLE_EVERY = 8


@dataclass
class Job:
    route: bytes  # the broker's key, echoed in the answer
    request_id: Any  # the client's id, echoed in the answer header
    model: Any  # loaded_model.LoadedModel
    metas: list[dict]  # validated input metas
    tensors: list  # the input frames (zmq.Frame), in meta order
    outputs: list[str] | None  # which outputs the client wants; None = all
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0  # when its (batched) forward pass began
    deadline: float = math.inf  # monotonic, this agent's clock: past it, the client has given up (not run then)
    broker_wait_s: float = 0.0  # how long it waited in the broker's queue before it was sent here
    instance: int = 0  # which copy of the model runs it (config `instances`)
    trace: str | None = None  # the caller's request_id (the OIP id, say): in every log line about it
    rows: int = field(init=False, default=1)  # its batch size in rows (the batched inputs' first dimension)

    def __post_init__(self) -> None:
        self.rows = request_rows(self.model.config, self.metas)

    def log_extra(self) -> dict:
        return {"request_id": self.trace, "model": self.model.name}


@dataclass
class BatchStats:
    """What the heartbeat shows of batching, per model: batches taken (in requests) and forward passes (in rows)."""

    batches: int = 0
    requests: int = 0
    largest: int = 0  # most requests in a batch
    queue_wait_s: float = 0.0  # summed over requests
    rows: int = 0
    largest_rows: int = 0  # most rows in one forward pass (at most max_batch_size, when it is > 0)

    def add(self, size: int, waits: list[float], passes: list[int]) -> None:
        """A batch of `size` requests, run as forward passes of `passes` rows (several: a request split in chunks)."""
        self.batches += 1
        self.requests += size
        self.largest = max(self.largest, size)
        self.queue_wait_s += sum(waits)
        self.rows += sum(passes)
        self.largest_rows = max(self.largest_rows, *passes)

    def describe(self) -> dict:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "mean_batch": round(self.requests / self.batches, 2) if self.batches else 0,
            "largest_batch": self.largest,
            "rows": self.rows,
            "largest_rows": self.largest_rows,
            "mean_queue_wait_ms": round(1000 * self.queue_wait_s / self.requests, 3) if self.requests else 0,
        }


def chunk_rows(rows: int, limit: int) -> list[int]:
    """The forward passes (rows each) a request of `rows` runs as: one, or chunks of `limit` when it is larger."""
    if limit <= 0 or rows <= limit:
        return [rows]
    return [limit] * (rows // limit) + ([rows % limit] if rows % limit else [])


class WorkerPool:
    """`count` threads taking work per model; answers go out on the inproc socket at `results_addr`."""

    def __init__(
        self, ctx: zmq.Context, results_addr: str, agent_id: str, count: int = 1, torch_threads: int | None = None
    ) -> None:
        self.ctx = ctx
        self.torch_threads = torch_threads  # intra-op threads per worker; OpenMP sets this per thread, so each sets it
        self.results_addr = results_addr
        self.agent_id = agent_id
        self._cond = threading.Condition()
        self._queues: dict[int, collections.deque[Job]] = {}  # id(model) -> its queued jobs
        self._ready: collections.deque = collections.deque()  # models with queued jobs that no worker holds
        self._held: set[int] = set()  # models a worker is collecting a batch for
        self._stopping = False
        self.stats: dict[str, BatchStats] = collections.defaultdict(BatchStats)
        # per model: jobs run, cancelled and expired (skipped, never run), most running at once (heartbeat `jobs`)
        self.jobs: dict[str, dict[str, int]] = {}
        self._counts_lock = threading.Lock()
        self.model_stats: dict[tuple[str, str], ModelStats] = {}  # (model, version) -> Triton's counters
        self._running: dict[int, int] = {}  # id(model) -> batches of it running now
        self._free_instances: dict[int, list[int]] = {}  # id(model) -> copies of it no worker is running
        # id(model) -> (runs, slowest recent run's CPU seconds, slowest recent run's wall seconds)
        self._timings: dict[int, tuple[int, float, float]] = {}
        self.min_slots = max(1, count)  # every model may run this many batches at once (or its instances, if more)
        # thread ident -> (model name, started, hung_at, id(model), jobs): the batches running now (monotonic times)
        self._active: dict[int, tuple[str, float, float, int, int]] = {}
        self.hang_bound = (0.0, 0.0)  # (factor, floor): a batch runs past max(factor x its deadline, floor) is hung
        self.threads = [
            threading.Thread(target=self._work, name=f"inference-{i}", daemon=True) for i in range(max(1, count))
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def slots(self, model) -> int:
        """Batches of `model` that may run at once: its copies (config `instances`), or the pool's count if more."""
        return max(self.min_slots, model.config.instances)

    def ensure_threads(self, count: int) -> None:
        """At least `count` inference threads (one per execution slot of every model loaded); started at once if the
        pool runs. Never fewer: threads are not stopped while the agent serves."""
        running = any(thread.is_alive() for thread in self.threads)
        while len(self.threads) < count:
            thread = threading.Thread(target=self._work, name=f"inference-{len(self.threads)}", daemon=True)
            self.threads.append(thread)
            if running:
                thread.start()

    def skip(self, job: Job, reason: str) -> list:
        """The answer frames for a job that is not run: reason "TIMEOUT" (its deadline passed before it started) or
        "CANCELED" (the broker said its client gave up). Counted per model (`jobs`: expired, cancelled)."""
        if reason == "TIMEOUT":
            code, counter = ErrorCode.TIMEOUT, "expired"
            text = f"model '{job.model.name}': the request's deadline passed before agent {self.agent_id} began it"
        else:
            code, counter = ErrorCode.CANCELLED, "cancelled"
            text = f"model '{job.model.name}': cancelled before agent {self.agent_id} began it"
        log.debug("request %s for %s not run: %s", job.trace or "-", job.model.name, reason, extra=job.log_extra())
        self._count(job.model.name, counter)
        self.stats_of(job.model).record_failure(reason)
        header = error_header(job.request_id, code, text, job.model.name)
        return routed(Command.ERROR, job.route, header)

    def cancel(self, route: bytes) -> Job | None:
        """Take the job with this route out of the queue, if no worker has taken it yet; None if none is queued
        (it runs, or is answered already: then the cancel is ignored)."""
        with self._cond:
            for key, queue in self._queues.items():
                for job in queue:
                    if job.route == route:
                        queue.remove(job)
                        if not queue and key not in self._held:
                            del self._queues[key]
                            self._ready = collections.deque(m for m in self._ready if id(m) != key)
                        return job
        return None

    def stats_of(self, model) -> ModelStats:
        """The Triton counters of this model's version (made on first use; found without the lock, as every run
        does twice)."""
        key = (model.name, str(model.version))
        found = self.model_stats.get(key)
        if found is not None:
            return found
        with self._counts_lock:
            found = self.model_stats.get(key)
            if found is None:
                found = self.model_stats[key] = ModelStats(model.name, model.version)
            return found

    def describe_stats(self) -> dict:
        """Heartbeat `stats`: {model: {version: Triton's entry plus "failures" by reason}}."""
        with self._counts_lock:
            every = list(self.model_stats.values())
        described: dict = {}
        for stats in every:
            described.setdefault(stats.name, {})[stats.version] = stats.describe()
        return described

    def _record(self, job: Job, batch_size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One answered job's share of its pass, in Triton's terms; queue = agent queue + broker queue."""
        queue_s = max(0.0, job.started_at - job.queued_at) + job.broker_wait_s
        self.stats_of(job.model).record_success(job.rows, queue_s, input_s, infer_s, output_s)

    def describe_jobs(self) -> dict:
        with self._counts_lock:
            return {name: dict(counts) for name, counts in self.jobs.items()}

    def _count(self, model: str, counter: str, n: int = 1) -> None:
        with self._counts_lock:
            counts = self.jobs.get(model)  # (not setdefault: its default dict would be built on every run)
            if counts is None:
                counts = self.jobs[model] = {"executed": 0, "cancelled": 0, "expired": 0, "peak_concurrent": 0}
            counts[counter] += n

    def _note_running(self, model: str, running: int) -> None:
        with self._counts_lock:
            counts = self.jobs.setdefault(model, {"executed": 0, "cancelled": 0, "expired": 0, "peak_concurrent": 0})
            counts["peak_concurrent"] = max(counts["peak_concurrent"], running)

    def submit(self, job: Job) -> None:
        key = id(job.model)
        with self._cond:
            queue = self._queues.setdefault(key, collections.deque())
            if not queue and key not in self._held:
                self._ready.append(job.model)
            queue.append(job)
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the threads, waiting at most `timeout` in all; False if some are still running (a hung model call:
        they are daemons, so the process may exit without them)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self.threads)

    def hung(self, now: float) -> tuple[str, float] | None:
        """(model, seconds it has run) of a batch running past its hang bound; None if none is."""
        with self._cond:
            for name, started, hung_at, _key, _jobs in self._active.values():
                if now > hung_at:
                    return name, now - started
        return None

    def stuck_jobs(self, now: float) -> int:
        """Requests that will not be answered: those in batches running past their hang bound, and those queued for
        a model that has such a batch (a drain does not wait for them; the broker re-dispatches them)."""
        with self._cond:
            hung = [(key, jobs) for _n, _s, hung_at, key, jobs in self._active.values() if now > hung_at]
            return sum(jobs for _key, jobs in hung) + sum(
                len(self._queues.get(key, ())) for key in {k for k, _ in hung}
            )

    def describe(self) -> dict:
        return {name: stats.describe() for name, stats in self.stats.items() if stats.batches}

    # ---- taking work ------------------------------------------------------------------------------------------

    def _take_ready(self):
        """The first model with queued jobs and a free execution slot, taken out of `_ready`; None if none."""
        for i, model in enumerate(self._ready):
            if self._running.get(id(model), 0) < self.slots(model):
                del self._ready[i]
                return model
        return None

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._stopping and (model := self._take_ready()) is None:
                self._cond.wait()
            if self._stopping:
                return None
            key = id(model)
            queue = self._queues[key]
            batch = [queue.popleft()]  # the head always goes: what waited longest is never passed over
            limit = model.config.max_batch_size  # rows
            if limit > 1:
                rows, delay, deadline = batch[0].rows, model.config.max_queue_delay_us / 1e6, None
                while rows < limit and not self._stopping:
                    if queue:
                        if rows + queue[0].rows > limit:
                            break  # the next request waits for the next batch, at the head of the queue
                        rows += queue[0].rows
                        batch.append(queue.popleft())
                        continue
                    if len(batch) < 2 or delay <= 0:
                        break  # only a burst (two or more taken at once) waits for the batch to fill
                    if deadline is None:
                        self._held.add(key)
                        deadline = time.monotonic() + delay
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._held.discard(key)
            if queue:
                self._ready.append(model)  # the rest is for the next free worker
            else:
                del self._queues[key]
            free = self._free_instances.setdefault(key, list(range(len(getattr(model, "instances", [None])))))
            instance = free.pop() if free else 0  # more workers than copies: they share copy 0, as before
            for job in batch:
                job.instance = instance
            self._running[key] = self._running.get(key, 0) + 1
            self._note_running(model.name, self._running[key])
            return batch

    def _finished(self, model, instance: int) -> None:
        """A batch of `model` is done: its copy is free again."""
        key = id(model)
        with self._cond:
            self._running[key] -= 1
            self._active.pop(threading.get_ident(), None)
            if self._ready:
                self._cond.notify()  # a model that was at its slots may run again
            free = self._free_instances.get(key)
            if free is not None and instance not in free and instance < len(getattr(model, "instances", [None])):
                free.append(instance)

    def _started(self, batch: list[Job], started: float) -> None:
        """Note a running batch and when it counts as hung: past max(factor x its longest request deadline, floor)
        (never, with factor 0)."""
        factor, floor = self.hang_bound
        budget = max(job.deadline - job.queued_at for job in batch)
        hung_at = started + max(factor * budget, floor) if factor > 0 and math.isfinite(budget) else math.inf
        with self._cond:
            self._active[threading.get_ident()] = (
                batch[0].model.name,
                started,
                hung_at,
                id(batch[0].model),
                len(batch),
            )

    def _work(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)  # torch.set_num_threads in the main thread does not reach here
        out = self.ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.LINGER, 0)
        out.connect(self.results_addr)
        try:
            while (taken := self._next_batch()) is not None:
                started = time.monotonic()
                batch = []
                for job in taken:
                    if job.deadline < started:
                        send_frames(out, self.skip(job, "TIMEOUT"), 0)
                    else:
                        job.started_at = started
                        batch.append(job)
                try:
                    if not batch:
                        continue
                    self._started(batch, started)
                    rows = sum(job.rows for job in batch)
                    passes = chunk_rows(rows, batch[0].model.config.max_batch_size) if len(batch) == 1 else [rows]
                    waits = [started - job.queued_at for job in batch]
                    self.stats[batch[0].model.name].add(len(batch), waits, passes)
                    if len(batch) > 1:
                        self._count(batch[0].model.name, "executed", len(batch))
                    for frames in self.run_batch(batch) if len(batch) > 1 else [self.run_timed(batch[0])]:
                        send_frames(out, frames, 0)
                finally:
                    self._finished(taken[0].model, taken[0].instance)
        finally:
            out.close()

    # ---- running ---------------------------------------------------------------------------------------------

    def fast_enough_inline(self, model) -> bool:
        """True for an unbatched model whose recent runs all took under INLINE_MAX_S of CPU time and under
        INLINE_BUDGET_S of wall time (after a few runs to learn it)."""
        runs, cpu, wall = self._timings.get(id(model), (0, 1.0, 1.0))
        return model.config.max_batch_size <= 1 and runs >= 10 and cpu < INLINE_MAX_S and wall < INLINE_BUDGET_S

    def run_timed(self, job: Job) -> list:
        """run(), noting how long the model took: only models known to be fast may run in the I/O thread."""
        job.started_at = start = time.monotonic()
        key = id(job.model)
        known = self._timings.get(key)
        sample = known is None or known[0] < 10 or known[0] % CPU_SAMPLE_EVERY == 0 or known[2] >= INLINE_MAX_S
        cpu_start = time.thread_time() if sample else 0.0
        self._count(job.model.name, "executed")
        frames = self.run(job)
        wall = time.monotonic() - start
        if sample:
            cpu = time.thread_time() - cpu_start
        else:
            cpu = wall if wall < INLINE_MAX_S else None  # (None: not known; the next run is measured)
        runs, slow_cpu, slow_wall = known if known is not None else (0, cpu, wall)
        # slowest recent runs, decaying
        slow_cpu = max(cpu, 0.9 * slow_cpu) if cpu is not None else slow_cpu
        self._timings[key] = (runs + 1, slow_cpu, max(wall, INLINE_WALL_DECAY * slow_wall))
        return frames

    def run(self, job: Job) -> list:
        """The answer frames for one job: REPLY with the outputs, or ERROR saying why the model failed."""
        try:
            began = time.monotonic()
            inputs = self._inputs(job)
            built = time.monotonic()
            passes = chunk_rows(job.rows, job.model.config.max_batch_size)
            if len(passes) > 1:
                outputs = self._run_split(job, inputs, passes)
            else:
                outputs = job.model.infer(inputs, job.instance)
            inferred = time.monotonic()
            frames = self._reply(job, outputs, 1)
        except (InputError, ProtocolError) as exc:  # a BYTES frame whose lengths do not fit, an undecodable image
            return self._failure(job, exc, ErrorCode.BAD_REQUEST)
        except Exception as exc:  # the model's own failure: tell the client, keep serving
            self.stats_of(job.model).record_failure("BACKEND")
            return self._failure(job, exc)
        encoded = time.monotonic()
        times = [(built - began) / len(passes), (inferred - built) / len(passes), (encoded - inferred) / len(passes)]
        for rows in passes:  # Triton's batch_stats: one execution per pass, its rows
            self.stats_of(job.model).record_execution(rows, *times)
        self._record(job, 1, built - began, inferred - built, encoded - inferred)
        return frames

    @staticmethod
    def _run_split(job: Job, inputs: dict, passes: list[int]) -> dict:
        """A request of more rows than max_batch_size (`oversize: "split"`): one pass per chunk of rows, the
        outputs concatenated, as if the model had run it at once."""
        batched = batched_inputs(job.model.config)
        parts, start = [], 0
        for rows in passes:
            chunk = {name: t[start : start + rows] if name in batched else t for name, t in inputs.items()}
            outputs = job.model.infer(chunk, job.instance)
            wrong = {k: list(v.shape) for k, v in outputs.items() if v.dim() == 0 or v.shape[0] != rows}
            if wrong:
                raise ValueError(
                    f"a chunk of {rows} rows gave outputs of shapes {wrong}, not one row per input row: a request of "
                    f"{job.rows} rows cannot be split into chunks of {job.model.config.max_batch_size}"
                )
            parts.append(outputs)
            start += rows
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    def run_batch(self, jobs: list[Job]) -> list[list]:
        """One forward pass for requests whose inputs agree on everything but the first dimension."""
        groups: dict[tuple, list[Job]] = collections.defaultdict(list)
        for job in jobs:
            groups[tuple((m["name"], m["datatype"], tuple(m["shape"][1:])) for m in job.metas)].append(job)
        answers = []
        for group in groups.values():
            if len(group) == 1:
                answers.append(self.run(group[0]))
                continue
            try:
                began = time.monotonic()
                per_job = [self._inputs(job) for job in group]
                stacked = {name: stack_rows([inputs[name] for inputs in per_job]) for name in per_job[0]}
                built = time.monotonic()
                outputs = group[0].model.infer(stacked, group[0].instance)
                inferred = time.monotonic()
                rows = [job.rows for job in group]
                total = sum(rows)
                if any(t.dim() == 0 or t.shape[0] != total for t in outputs.values()):
                    raise ValueError("outputs do not have one row per input row; cannot split a batch")
                start = 0
                replies = []
                for job, n in zip(group, rows):
                    replies.append(self._reply(job, {k: v[start : start + n] for k, v in outputs.items()}, len(group)))
                    start += n
                encoded = time.monotonic()
                times = (built - began, inferred - built, encoded - inferred)
                self.stats_of(group[0].model).record_execution(total, *times)
                for job in group:
                    self._record(job, len(group), *times)
                answers.extend(replies)
            except Exception as exc:
                log.info(
                    "batch of %d for %s failed (%s); running each request alone", len(group), group[0].model.name, exc
                )
                answers.extend(self.run(job) for job in group)
        return answers

    @staticmethod
    def _inputs(job: Job) -> dict:
        """Tensors over the received frames; LoadedModel.infer moves them to the model's device."""
        return as_model_inputs(decode_tensors(job.metas, job.tensors))

    def _reply(self, job: Job, outputs: dict, batch_size: int) -> list:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s for %s answered: %.2f ms queued here, batch of %d",
                job.trace or "-",
                job.model.name,
                (job.started_at - job.queued_at) * 1e3,
                batch_size,
                extra=job.log_extra(),
            )
        if job.outputs is not None:
            outputs = {name: outputs[name] for name in job.outputs}
        metas, frames = encode_tensors(outputs)
        header = Reply(
            job.request_id,
            job.model.name,
            job.model.version,
            self.agent_id,
            metas,
            batch_size,
            int((job.started_at - job.queued_at) * 1e6),  # waiting for a worker or a batch to fill
        ).to_wire()
        return routed(Command.REPLY, job.route, header, frames)

    def _failure(self, job: Job, exc: Exception, code: ErrorCode = ErrorCode.INFERENCE_FAILED) -> list:
        model = job.model
        if code is ErrorCode.BAD_REQUEST:
            log.info("request %s for %s refused: %s", job.trace or "-", model.name, exc, extra=job.log_extra())
            header = error_header(job.request_id, code, str(exc), model.name)
            return routed(Command.ERROR, job.route, header)
        log.warning(
            "model %s v%s failed on request %s: %s: %s",
            model.name,
            model.version,
            job.trace or "-",
            type(exc).__name__,
            exc,
            extra=job.log_extra(),
        )
        text = f"model '{model.name}' version {model.version} failed: {type(exc).__name__}: {exc}"
        header = error_header(job.request_id, ErrorCode.INFERENCE_FAILED, text, model.name)
        return routed(Command.ERROR, job.route, header)
