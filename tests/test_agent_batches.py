"""Issue 23, item 2, at the agent: a BATCH from the broker is split and each request handled as if it came alone;
the answers made in one pass of the loop go back on the link as one BATCH (a lone one as it is)."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from cluster import protocol
from cluster.codec import decode_tensors, encode_tensors
from cluster.protocol import PREAMBLE, Command, ErrorCode, pack
from cluster.sockets import drain

INCARNATION = b"i" * protocol.INCARNATION_BYTES


def route_of(n: int) -> bytes:
    return INCARNATION + n.to_bytes(protocol.ROUTE_BYTES - protocol.INCARNATION_BYTES, "big")


def request_frames(n: int, value: float, header: bytes | None = None) -> list:
    """A REQUEST for echo, as the broker sends it: [preamble + route frame, header, tensor]."""
    metas, tensors = encode_tensors({"x": np.full((1, 4), value, np.float32)})
    header = header if header is not None else pack(protocol.Request(n, "echo", metas, 30.0).to_wire())
    return [PREAMBLE[Command.REQUEST] + protocol.request_route(route_of(n), 30.0, 0.0), header, *tensors]


@pytest.fixture
def inline_agent(share):
    """An agent of capacity 16 serving echo, its link a PAIR to `broker`; every request runs inline (the I/O
    thread), as a measured-fast model does under load, so each pass's answers are known when it ends."""
    from cluster.agent.agent import Agent
    from cluster.role_settings import AgentSettings

    ctx = zmq.Context.instance()
    agent = Agent(AgentSettings(share=str(share), agent_id="a1", torch_threads=0, capacity=16, models="echo"))
    agent.load_models()
    agent.status()
    link = agent.links.first
    link.sock, broker = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    broker.bind(f"inproc://batches-{id(agent)}")
    link.sock.connect(f"inproc://batches-{id(agent)}")
    link.connected, link.monitor = True, ctx.socket(zmq.PAIR)
    agent.inline, agent._inline_until = True, float("inf")
    agent.pool.fast_enough_inline = lambda model: True
    try:
        yield agent, link, broker
    finally:
        for sock in (link.sock, link.monitor, broker):
            sock.close(linger=0)
        agent.pool.stop(timeout=1.0)
        agent.loader.stop(timeout=1.0)


def one_pass(link) -> None:
    """What the agent's loop does with the link's socket in one pass: drain it, then send that pass's answers."""
    assert link.sock.poll(2000), "nothing reached the agent"
    drain(link.sock, link.receive, 256, None, 2)
    link.flush()


def test_a_batch_of_requests_is_answered_as_one_batch_each_answer_right_and_in_order(inline_agent):
    agent, link, broker = inline_agent
    requests = [request_frames(n, float(n)) for n in range(1, 6)]
    bad = request_frames(6, 6.0, header=b"\xc1")  # not msgpack: BAD_REQUEST, answered in its place
    broker.send_multipart(protocol.batch([*requests, bad]))
    one_pass(link)
    assert broker.poll(2000), "no answer to the BATCH"
    got = broker.recv_multipart()
    assert got[0][: protocol.PREAMBLE_BYTES] == PREAMBLE[Command.BATCH], "six answers in one pass: one BATCH"
    answers = protocol.unbatch(got)
    assert [a[0] for a in answers[:5]] == [PREAMBLE[Command.REPLY] + route_of(n) for n in range(1, 6)]
    for n, answer in enumerate(answers[:5], 1):
        header = protocol.unpack_header(answer[1])
        outputs = decode_tensors(header["outputs"], answer[2:])
        assert header["id"] == n and np.array_equal(outputs["y"], np.full((1, 4), float(n), np.float32))
    assert answers[5][0] == PREAMBLE[Command.ERROR] + route_of(6)
    assert protocol.unpack_header(answers[5][1])["code"] == ErrorCode.BAD_REQUEST.value
    assert not broker.poll(100), "an answer went twice"


def test_a_lone_request_is_answered_alone_and_a_malformed_batch_is_dropped(inline_agent):
    agent, link, broker = inline_agent
    broker.send_multipart(request_frames(1, 1.0))
    one_pass(link)
    assert broker.poll(2000)
    assert broker.recv_multipart()[0] == PREAMBLE[Command.REPLY] + route_of(1), "a lone answer goes as it is"
    good = protocol.batch([request_frames(2, 2.0), request_frames(3, 3.0)])
    broker.send_multipart(good[:-1])  # its counts promise a frame that is not there
    one_pass(link)
    assert not broker.poll(200), "a malformed BATCH was answered"
    broker.send_multipart(good)  # the agent is still fine
    one_pass(link)
    assert broker.poll(2000)
    answers = protocol.unbatch(broker.recv_multipart())
    assert [a[0] for a in answers] == [PREAMBLE[Command.REPLY] + route_of(n) for n in (2, 3)]


def test_answers_wait_for_the_end_of_the_pass_but_a_heartbeat_sends_them_first(inline_agent):
    """Order on the link is kept: a beat (sent at once) never overtakes an answer made before it."""
    agent, link, broker = inline_agent
    broker.send_multipart(protocol.batch([request_frames(1, 1.0), request_frames(2, 2.0)]))
    assert link.sock.poll(2000)
    drain(link.sock, link.receive, 256, None, 2)
    assert not broker.poll(100), "answers went before the end of the pass"
    agent.beats = zmq.Context.instance().socket(zmq.PUB)
    try:
        agent.send_heartbeat()
    finally:
        agent.beats.close(linger=0)
    first, second = (broker.recv_multipart() if broker.poll(2000) else None for _ in range(2))
    assert first is not None and first[0][: protocol.PREAMBLE_BYTES] == PREAMBLE[Command.BATCH]
    assert second is not None and second[0] == PREAMBLE[Command.HEARTBEAT]


# ---- item 4: the CPU clock read rarely on the inline path ----------------------------------------------------------


def test_inline_timing_reads_the_cpu_clock_rarely_and_still_catches_a_model_gone_slow(monkeypatch):
    """time.thread_time is a syscall: run_timed reads it while it learns a model, every CPU_SAMPLE_EVERY runs and
    after a run slow in wall time; a model that turns slow is still kept off the I/O thread within two runs."""
    import time
    from types import SimpleNamespace

    from cluster.agent import runner
    from cluster.agent.runner import Job, WorkerPool

    pool = WorkerPool(zmq.Context.instance(), "inproc://unused", "a1")
    model = SimpleNamespace(name="m", version=1, config=SimpleNamespace(max_batch_size=0, inputs=[]))
    cpu_per_run = [0.0]

    thread_time = time.thread_time

    def run(job):  # the model: spins for cpu_per_run seconds of this thread's CPU
        end = thread_time() + cpu_per_run[0]
        while thread_time() < end:
            pass
        return []

    pool.run = run
    reads = [0]

    def counted():
        reads[0] += 1
        return thread_time()

    monkeypatch.setattr(runner.time, "thread_time", counted)
    for _ in range(100):
        pool.run_timed(Job(b"r", 1, model, [], [], None))
    assert pool.fast_enough_inline(model), "a fast model runs inline"
    assert reads[0] <= 2 * (10 + 100 // runner.CPU_SAMPLE_EVERY + 2), f"{reads[0]} reads of the CPU clock in 100 runs"
    cpu_per_run[0] = 3 * runner.INLINE_MAX_S  # it turns slow (CPU-bound)
    for _ in range(2):
        pool.run_timed(Job(b"r", 1, model, [], [], None))
    assert not pool.fast_enough_inline(model), "a model gone slow still runs inline"


def test_a_request_whose_handler_raises_costs_only_itself_in_a_batch(inline_agent, monkeypatch):
    """One message of a BATCH that raises in its handler (here: a fault planted in the agent's intake for request 2)
    is dropped alone, logged; the messages after it in the same BATCH are still answered."""
    agent, link, broker = inline_agent
    real = agent.accept_request

    def faulty(frames, route_frame, link_):
        if protocol.unpack_header(frames[1])["id"] == 2:
            raise RuntimeError("planted fault")
        return real(frames, route_frame, link_)

    monkeypatch.setattr(agent, "accept_request", faulty)
    broker.send_multipart(protocol.batch([request_frames(n, float(n)) for n in (1, 2, 3)]))
    one_pass(link)
    assert broker.poll(2000), "no answer to the BATCH"
    answers = protocol.unbatch(broker.recv_multipart())
    assert [a[0] for a in answers] == [PREAMBLE[Command.REPLY] + route_of(n) for n in (1, 3)]


def test_a_datatype_that_is_no_string_is_bad_request_not_a_crash(inline_agent):
    agent, link, broker = inline_agent
    header = pack({"id": 9, "model": "echo", "timeout": 30.0, "inputs": [{"name": "x", "datatype": [], "shape": [4]}]})
    broker.send_multipart([*request_frames(9, 1.0, header=header)])
    one_pass(link)
    assert broker.poll(2000), "no answer"
    answer = broker.recv_multipart()
    assert answer[0] == PREAMBLE[Command.ERROR] + route_of(9)
    error = protocol.unpack_header(answer[1])
    assert error["code"] == ErrorCode.BAD_REQUEST.value and "datatype" in error["message"], error
