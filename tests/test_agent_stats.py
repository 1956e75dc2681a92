"""The agent's Triton statistics counters, in-process."""

import numpy as np
import pytest
import torch
import zmq

from cluster.agent.loaded_model import load_model
from cluster.agent.runner import Job, WorkerPool
from cluster.codec import encode_tensors
from cluster.publish import publish_version
from cluster.repository import ModelRepository
from cluster.statistics import ModelStats, merge
from tests.harness import wait_for
from tests.test_batching import PICKY_CONFIG, Picky


def test_counts_and_ns_follow_triton():
    stats = ModelStats("echo", 1)
    stats.record_execution(2, 0.001, 0.002, 0.003)
    for _ in range(2):
        stats.record_success(1, 0.0005, 0.001, 0.002, 0.003)
    stats.record_failure("BACKEND")
    entry = stats.to_triton()
    assert entry["version"] == "1" and entry["inference_count"] == 2 and entry["execution_count"] == 1
    assert entry["inference_stats"]["success"]["count"] == 2
    assert entry["inference_stats"]["compute_infer"] == {"count": 2, "ns": 4_000_000}
    assert entry["inference_stats"]["fail"]["count"] == 1
    assert entry["batch_stats"] == [
        {
            "batch_size": 2,
            "compute_input": {"count": 1, "ns": 1_000_000},
            "compute_infer": {"count": 1, "ns": 2_000_000},
            "compute_output": {"count": 1, "ns": 3_000_000},
        }
    ]


def test_merge_sums_agents():
    a, b = ModelStats("echo", 1), ModelStats("echo", 1)
    a.record_execution(1, 0, 0.001, 0)
    a.record_success(1, 0, 0, 0.001, 0)
    b.record_execution(1, 0, 0.002, 0)
    b.record_success(1, 0, 0, 0.002, 0)
    b.record_execution(4, 0, 0.001, 0)
    total = merge([a.to_triton(), b.to_triton()])
    assert total["inference_count"] == 2 and total["execution_count"] == 3
    assert total["inference_stats"]["compute_infer"] == {"count": 2, "ns": 3_000_000}
    assert [x["batch_size"] for x in total["batch_stats"]] == [1, 4]
    assert total["batch_stats"][0]["compute_infer"] == {"count": 2, "ns": 3_000_000}


def test_worker_pool_counts_successes_failures_rows_and_queue(tmp_path):
    """Three requests taken as one batch, one of them bad (the batch falls back to one pass each), plus one past its
    deadline: Triton's counts follow (rows, passes, BACKEND and TIMEOUT failures, the broker's wait in queue)."""
    path = tmp_path / "picky.pt"
    torch.jit.script(Picky()).save(str(path))
    publish_version(tmp_path, "picky", path, {"name": "picky", **PICKY_CONFIG})
    model = load_model(ModelRepository(tmp_path), "picky", 1)
    ctx = zmq.Context()
    results = ctx.socket(zmq.PULL)
    results.bind("inproc://test-stats-results")
    pool = WorkerPool(ctx, "inproc://test-stats-results", "test-agent")
    inputs = [np.ones((2, 3), np.float32), -np.ones((1, 3), np.float32), np.ones((3, 3), np.float32)]
    for i, x in enumerate(inputs):
        metas, frames = encode_tensors({"x": x})
        pool.submit(Job(bytes([i]) * 8, i, model, metas, [bytes(f) for f in frames], None, broker_wait_s=0.5))
    metas, frames = encode_tensors({"x": inputs[0]})
    pool.submit(Job(b"\x09" * 8, 9, model, metas, [bytes(f) for f in frames], None, deadline=0.0))
    pool.start()
    try:
        for _ in range(4):
            assert results.poll(10_000), "no answer from the worker"
            results.recv_multipart()
    finally:
        pool.stop()
        results.close()
        ctx.term()
    entry = pool.describe_stats()["picky"]["1"]
    assert entry["inference_count"] == 5 and entry["execution_count"] == 2, entry
    assert entry["inference_stats"]["success"]["count"] == 2, entry
    assert entry["inference_stats"]["fail"]["count"] == 2 and entry["failures"] == {"BACKEND": 1, "TIMEOUT": 1}
    assert entry["inference_stats"]["queue"]["ns"] >= 2 * 500_000_000, entry  # the broker's wait is in it
    # the failed batch's requests ran alone: passes of 2 and 3 rows (batch_stats are keyed by rows, as Triton's)
    assert entry["last_inference"] > 0 and [b["batch_size"] for b in entry["batch_stats"]] == [2, 3], entry


def test_broker_statistics_view_from_heartbeats_and_metadata_announced_after_ready():
    """The broker's `statistics` answer is each live agent's latest `stats`, limited to a model (and version) when
    one is named; an unknown model is refused. A model an agent loads after its READY reaches the broker's `model`
    view from the metadata riding on its next heartbeat."""
    from cluster.broker import Dispatcher
    from cluster.broker.agents import UnknownModel
    from cluster.broker.routing import RoundRobin
    from cluster.config import Timings
    from cluster.protocol import PREAMBLE, Command, Heartbeat, pack

    d = Dispatcher(Timings(), RoundRobin(), now=0.0)
    echo = ModelStats("echo", 1)
    echo.record_success(1, 0.0, 0.0, 0.001, 0.0)
    meta = {"name": "late", "version": 1, "platform": "torchscript", "inputs": [], "outputs": []}
    for agent, models, extra in (("a", [("echo", 1)], {}), ("b", [("echo", 1), ("late", 1)], {"metadata": [meta]})):
        entries = [{"name": n, "version": v} for n, v in models]
        stats = {"echo": {"1": echo.to_triton()}}
        wire = Heartbeat(agent, 2, entries, pid=1, started=1.0, stats=stats).to_wire()
        d.agent_message(Command.READY, [agent.encode(), PREAMBLE[Command.READY], pack(wire)], 10.0)
        d.agent_message(Command.HEARTBEAT, [agent.encode(), PREAMBLE[Command.HEARTBEAT], pack(wire | extra)], 10.5)
    view = d.agents.describe_statistics("echo", "1")
    assert set(view) == {"a", "b"} and view["a"]["echo"]["1"]["inference_stats"]["success"]["count"] == 1
    assert d.agents.describe_statistics("echo", "7") == {"a": {}, "b": {}}
    with pytest.raises(UnknownModel, match="nowhere"):
        d.agents.describe_statistics("nowhere")
    assert d.agents.describe_model("late", None)["platform"] == "torchscript"


class _FakeModel:
    """A model for WorkerPool tests: echoes x; with a gate, each call waits for it (a slow or hung call)."""

    def __init__(self, name: str, gate=None) -> None:
        import threading
        from types import SimpleNamespace

        self.name, self.version, self.gate, self.entered = name, 1, gate, threading.Event()
        self.config = SimpleNamespace(max_batch_size=0, instances=1, max_queue_delay_us=0)

    def infer(self, inputs: dict, instance: int = 0) -> dict:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        return {"y": inputs["x"]}


def test_each_model_has_its_own_execution_slots_and_a_call_past_its_bound_is_hung():
    """Issue 18.6/18.7: two calls of a model that blocks do not take the thread another model needs (a model runs
    at most its slots at once; the pool has a thread per slot of every model), and a call past max(factor x its
    deadline, floor) is reported hung, with what queues behind it."""
    import threading
    import time

    gate = threading.Event()
    blocked, fast = _FakeModel("blocked", gate), _FakeModel("fast")
    ctx = zmq.Context()
    results = ctx.socket(zmq.PULL)
    results.bind("inproc://test-slots-results")
    pool = WorkerPool(ctx, "inproc://test-slots-results", "test-agent")
    pool.hang_bound = (2.0, 0.05)
    pool.ensure_threads(pool.slots(blocked) + pool.slots(fast))  # what the agent does for its loaded models
    metas, frames = encode_tensors({"x": np.ones((1, 2), np.float32)})

    def job(rid: int, model) -> Job:
        j = Job(bytes([rid]) * 8, rid, model, metas, [bytes(f) for f in frames], None)
        j.deadline = j.queued_at + 0.01
        return j

    pool.start()
    try:
        pool.submit(job(1, blocked))
        pool.submit(job(2, blocked))  # waits for the blocked model's one slot, not for a thread of its own
        assert blocked.entered.wait(10), "the blocked model's first call did not start"
        pool.submit(job(3, fast))
        assert results.poll(10_000), "the fast model waited behind the blocked one"
        answer = results.recv_multipart()
        assert b"fast" in answer[1], answer
        # The fast call's answer goes out just before its worker clears its running-batch entry: wait for that.
        wait_for(
            lambda: pool.stuck_jobs(time.monotonic() + 1.0) == 2,
            10,
            "only the blocked model's two calls counted as stuck (the running one and the one queued behind it)",
        )
        assert pool.hung(time.monotonic() + 1.0)[0] == "blocked"
        gate.set()
        for _ in range(2):
            assert results.poll(10_000), "the blocked model's calls did not finish once released"
            results.recv_multipart()
        # As above: each answer goes out just before its worker clears its entry.
        wait_for(lambda: pool.hung(time.monotonic() + 1.0) is None, 10, "a finished call still counted as hung")
    finally:
        gate.set()
        assert pool.stop(), "the pool's threads did not stop"
        results.close()
        ctx.term()
