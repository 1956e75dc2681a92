"""The blocking Client's caller-thread I/O (issue 13): callers send and read the DEALER socket themselves, one at a
time under a lock, the first waiting caller reading for everybody (leader/follower), the I/O thread reading only when
no caller does. Hammered from many threads against an in-process fake broker (a ROUTER in a thread: answers at
once, swallows what it is told to, can be restarted on the same port) and against a real cluster.

What must hold: answers never cross between threads (each thread's payload is its own), no wake-up is lost (all
complete within a deadline), deadlines still fire while other calls proceed, and a broker restart mid-flight still
has every waiting call re-sent. No timing is asserted; deadlines only bound the waits.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq

from cluster import ClusterError, InferenceTimeoutError, protocol
from cluster import client as client_module
from cluster.client import Client
from cluster.protocol import Command
from tests.harness import wait_for

THREADS = 16
CALLS = 200
HAMMER_DEADLINE = 240.0  # seconds for the whole hammer on a loaded 2-core machine (it takes a few)


def split_batch(received: list) -> list[list]:
    """[route, *frames] as received by a fake broker's ROUTER: itself, or a BATCH's messages (an AsyncClient sends
    the requests of one loop step as one), each with the route in front."""
    if len(received) > 2 and received[1][: protocol.PREAMBLE_BYTES] == protocol.PREAMBLE[Command.BATCH]:
        return protocol.unbatch(received, 1)
    return [received]


class FakeBroker:
    """A ROUTER in a thread speaking the client side of the protocol: echoes REQUESTs to model "echo" (and to
    "hold", once released), never answers model "sleep" (the client's deadline must fire), counts and swallows
    model "swallow" while `swallowing`, and answers QUERYs with their own fields; a probe (an empty frame) gets a
    READY BrokerHello with this run's incarnation. Runs on a fixed port, so a new one takes over after stop().
    Records the ids of the REQUESTs and CANCELs it read; reads nothing while `paused` (with a small `receive_hwm`
    and `receive_buffer`, its clients' pipes then fill up)."""

    def __init__(
        self, port: int = 0, name: bytes = b"fake", receive_hwm: int = 100_000, receive_buffer: int | None = None
    ) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTING_ID, name)  # the bound side names itself (clients address it by name)
        self.name = name
        self.incarnation = os.urandom(8).hex()
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, receive_hwm)
        if receive_buffer is not None:
            self.sock.setsockopt(zmq.RCVBUF, receive_buffer)
        if port:
            self.sock.bind(f"tcp://127.0.0.1:{port}")
            self.port = port
        else:
            self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.swallowing = True
        self.swallowed = 0
        self.held: list[list] = []  # answers to model "hold", sent in order by release()
        self._release: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.requests: list[int] = []  # the ids of the REQUESTs read, in order
        self.cancelled: list[int] = []  # the ids of the CANCELs read
        self.received: list[int] = []  # messages in each message read (a BATCH: more than one)
        self.paused = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-broker", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        released = 0
        while not self._stop.is_set():
            while not self._release.empty():
                released += self._release.get()
            while released and self.held:
                self.sock.send_multipart(self.held.pop(0))
                released -= 1
            if self.paused.is_set():
                self._stop.wait(0.01)
                continue
            if not self.sock.poll(20):
                continue
            for _ in range(256):
                if self.paused.is_set():
                    break
                try:
                    received = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                messages = split_batch(received)
                self.received.append(len(messages))
                for route, *frames in messages:
                    reply = self._answer(frames)
                    if len(frames) > 1 and protocol.unpack_header(frames[1]).get("model") == "hold":
                        self.held.append([route, *reply])
                    elif reply is not None:
                        self.sock.send_multipart([route, *reply])

    def _answer(self, frames: list) -> list | None:
        if frames == [b""]:
            hello = protocol.BrokerHello(self.name.decode(), self.incarnation, True)
            return protocol.message(Command.READY, hello.to_wire())
        cmd = protocol.parse_preamble(frames[0][: protocol.PREAMBLE_BYTES])  # (a REQUEST's head follows)
        header = protocol.unpack_header(frames[1])
        if cmd == Command.CANCEL:
            self.cancelled.append(header["id"])
            return None
        if cmd == Command.QUERY:
            return protocol.message(Command.REPLY, {"id": header["id"], "result": header})
        self.requests.append(header["id"])
        model = header["model"]
        if model == "sleep" or (model == "swallow" and self.swallowing):
            self.swallowed += model == "swallow"
            return None
        reply = {"id": header["id"], "model": model, "version": 1, "agent": "fake", "outputs": header["inputs"]}
        return protocol.message(Command.REPLY, reply, frames[2:])

    @property
    def cancels(self) -> int:
        return len(self.cancelled)

    def release(self, n: int = 1) -> None:
        """Answer the next `n` held "hold" requests."""
        self._release.put(n)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def broker():
    brokers = [FakeBroker()]
    yield brokers
    for b in brokers:
        b.stop()


def one_call(client: Client, thread: int, i: int) -> None:
    """One of infer, submit or a query, its payload this thread's and this call's own; checks its answer is too."""
    kind = i % 4
    x = np.full((1, 8), thread * 10_000 + i, np.float32)
    if kind == 0:
        assert client.infer("echo", {"x": x}, timeout=60).as_numpy("x").tolist() == x.tolist()
    elif kind == 1:
        got = client.submit("echo", {"x": x}, timeout=60).result(timeout=HAMMER_DEADLINE)
        assert got.as_numpy("x").tolist() == x.tolist()
    elif kind == 2:
        name = f"t{thread}-{i}"
        assert client.model_metadata(name, version=i, timeout=60)["name"] == name
    else:  # several at once from one thread, answered in any order
        futures = [client.submit("echo", {"x": x + k}, timeout=60) for k in range(3)]
        for k, future in enumerate(futures):
            assert future.result(timeout=HAMMER_DEADLINE).as_numpy("x").tolist() == (x + k).tolist()


def hammer(client: Client, threads: int = THREADS, calls: int = CALLS, each=one_call) -> None:
    """`threads` threads making `calls` calls each; every call checks its own answer. Fails on the first error, or if
    they are not all done by HAMMER_DEADLINE (a lost wake-up)."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        jobs = [pool.submit(lambda t=t: [each(client, t, i) for i in range(calls)]) for t in range(threads)]
        done, pending = concurrent.futures.wait(jobs, timeout=HAMMER_DEADLINE)
        assert not pending, f"{len(pending)} threads not done within {HAMMER_DEADLINE} s: a lost wake-up?"
        for job in done:
            job.result()


@pytest.fixture
def no_fallback(monkeypatch):
    """The reader and the I/O thread look again every CLIENT_WAKE_INTERVAL even when nothing woke them, which would
    turn a lost wake-up into mere slowness: push that look past the calls' deadlines, so a lost one fails them."""
    monkeypatch.setattr(client_module, "CLIENT_WAKE_INTERVAL", 3600.0)


@pytest.mark.parametrize("drain_limit", [client_module.CLIENT_DRAIN_LIMIT, 1])
def test_many_threads_never_cross_answers_nor_lose_a_wakeup(broker, no_fallback, monkeypatch, drain_limit):
    """16 threads x 200 mixed calls; also with one answer per turn at the socket (the reader must come back for
    the rest without a signal from the FD)."""
    monkeypatch.setattr(client_module, "CLIENT_DRAIN_LIMIT", drain_limit)
    with Client(broker[0].address, timeout=60) as client:
        hammer(client)
        assert client.core.calls == {}
        assert client.infer("echo", {"x": np.ones(3, np.float32)}).agent == "fake"  # still in order after


def test_sequential_calls_from_one_thread(broker, no_fallback):
    """The lone caller reads its own answers; nothing is left waiting between calls."""
    with Client(broker[0].address, timeout=60) as client:
        for i in range(500):
            x = np.full(4, i, np.int64)
            assert client.infer("echo", {"x": x}).as_numpy("x").tolist() == x.tolist()
        assert client.core.calls == {}


def test_a_reader_stepping_down_hands_reading_to_the_io_thread(broker, no_fallback):
    """A caller reads while a submitted call waits; it gets its own answer and steps down; the submitted call's
    answer, coming later, is read by the I/O thread."""
    fake = broker[0]
    with Client(fake.address, timeout=60) as client:
        reader = concurrent.futures.ThreadPoolExecutor(1)
        first = reader.submit(client.infer, "hold", {"x": np.zeros(2, np.float32)})
        wait_for(lambda: len(fake.held) == 1, 30, "the first call to reach the broker (its caller now reads)")
        second = client.submit("hold", {"x": np.ones(2, np.float32)})
        wait_for(lambda: len(fake.held) == 2, 30, "the second call to reach the broker")
        fake.release()
        assert first.result(timeout=60).as_numpy("x").tolist() == [0, 0]
        fake.release()
        assert second.result(timeout=60).as_numpy("x").tolist() == [1, 1]
        reader.shutdown()


def test_deadlines_fire_for_readers_and_followers_while_others_proceed(broker):
    """Calls to a model that never answers fail with InferenceTimeoutError, whether their caller is reading for
    everybody at the time or waiting for another to; meanwhile calls from other threads keep completing."""
    progress = {"calls": 0}
    stop = threading.Event()
    with Client(broker[0].address, timeout=60) as client:

        def busy() -> None:
            x = np.ones(4, np.float32)
            while not stop.is_set():
                client.infer("echo", {"x": x})
                progress["calls"] += 1

        def sleeper() -> str:
            try:
                client.infer("sleep", {"x": np.ones(1, np.float32)}, timeout=0.2)
            except InferenceTimeoutError:
                return "timed out"
            return "answered"

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            busy_jobs = [pool.submit(busy) for _ in range(3)]
            sleepers = [pool.submit(sleeper) for _ in range(4)]
            try:
                before = progress["calls"]
                wait_for(lambda: progress["calls"] > before + 100, 60, "other calls to go on meanwhile")
                done, _ = concurrent.futures.wait(sleepers, timeout=60)
                assert [s.result() for s in done] == ["timed out"] * 4
            finally:
                stop.set()
            for job in busy_jobs:
                job.result(timeout=60)
        with pytest.raises(InferenceTimeoutError):  # a lone caller, reading for itself
            client.infer("sleep", {"x": np.ones(1, np.float32)}, timeout=0.1)
        lone = client.submit("sleep", {"x": np.ones(1, np.float32)}, timeout=0.1)  # read by the I/O thread
        with pytest.raises(InferenceTimeoutError):
            lone.result(timeout=60)
        assert client.core.calls == {}


def test_broker_restart_mid_flight_resends_every_waiting_call(broker):
    """Calls the first broker swallowed are answered by the next one on the same port: the client re-sends every
    waiting call on the new handshake, whichever thread reads."""
    first = broker[0]
    with Client(first.address, timeout=60) as client:
        assert client.infer("echo", {"x": np.ones(2, np.float32)}).agent == "fake"  # connected
        results: dict = {}

        def caller(t: int) -> None:
            x = np.full(4, t, np.float32)
            results[t] = client.infer("swallow", {"x": x}, timeout=60).as_numpy("x").tolist() == x.tolist()

        threads = [threading.Thread(target=caller, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        submitted = [client.submit("swallow", {"x": np.full(4, 100 + k, np.float32)}, timeout=60) for k in range(8)]
        wait_for(lambda: first.swallowed == 16, 30, "the first broker to have swallowed all 16 calls")
        first.stop()
        broker.append(FakeBroker(first.port))
        broker[-1].swallowing = False
        for thread in threads:
            thread.join(60)
        assert results == dict.fromkeys(range(8), True)
        for k, future in enumerate(submitted):
            assert future.result(timeout=60).as_numpy("x").tolist() == [100.0 + k] * 4


def test_cancel_and_close_with_callers_waiting(broker):
    """A cancelled future still sends CANCEL; close() fails every caller still waiting, reader included."""
    client = Client(broker[0].address, timeout=60)
    # (a call made before the broker said hello waits in the client: cancelling it has nothing to tell a broker)
    wait_for(client.brokers, 30, "the broker's hello")
    future = client.submit("sleep", {"x": np.ones(1, np.float32)})
    assert future.cancel()
    wait_for(lambda: broker[0].cancels == 1, 30, "the broker to get the CANCEL")

    outcomes = []

    def waiter() -> None:
        try:
            client.infer("sleep", {"x": np.ones(1, np.float32)})
        except ClusterError as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=waiter) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(client.core.calls) == 4, 30, "4 callers waiting")
    client.close()
    for thread in threads:
        thread.join(30)
    assert outcomes == ["ClusterError"] * 4
    with pytest.raises(ClusterError):
        client.infer("echo", {"x": np.ones(1, np.float32)})


# ---- real processes -------------------------------------------------------------------------------------------


def echo_call(client: Client, thread: int, i: int) -> None:
    x = np.full((1, 4), thread * 10_000 + i, np.float32)
    if i % 10 == 9:
        assert "requests" in client.stats(timeout=30)
    elif i % 2:
        assert client.submit("echo", {"x": x}, timeout=60).result(timeout=90).as_numpy("y").tolist() == x.tolist()
    else:
        assert client.infer("echo", {"x": x}, timeout=60).as_numpy("y").tolist() == x.tolist()


@pytest.mark.cluster
def test_hammer_a_real_cluster_through_a_frozen_agent_and_a_broker_restart(cluster):
    """16 threads x 200 mixed calls on echo over 2 agents, while one agent is frozen (SIGSTOP: a call routed to
    it with a short timeout times out, others go on) and the broker is restarted (calls in flight complete)."""
    cluster.start_manager()
    broker = cluster.start_broker()
    agents = cluster.start_agents(2)
    cluster.wait_for_agents(2, model="echo")
    client = cluster.client(timeout=60)
    x = np.ones((1, 4), np.float32)

    # Frozen agent: short calls spread over both agents; those the frozen one holds time out, the rest are answered.
    os.kill(agents[0].popen.pid, signal.SIGSTOP)
    try:
        outcomes = {"answered": 0, "timed out": 0}

        def short(_: int) -> None:
            try:
                client.infer("echo", {"x": x}, timeout=1.0)
                outcomes["answered"] += 1
            except InferenceTimeoutError:
                outcomes["timed out"] += 1

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(short, range(16), timeout=120))
        assert outcomes["answered"] >= 1 and sum(outcomes.values()) == 16, outcomes
    finally:
        os.kill(agents[0].popen.pid, signal.SIGCONT)

    cluster.wait_for_agents(2, model="echo", timeout=60)
    stopped = threading.Event()

    def restart_midway() -> None:
        wait_for(lambda: cluster_calls["n"] > THREADS * CALLS // 3, HAMMER_DEADLINE, "a third of the calls")
        cluster.kill(broker)
        cluster.start_broker()
        stopped.set()

    cluster_calls = {"n": 0}

    def counted(client: Client, thread: int, i: int) -> None:
        echo_call(client, thread, i)
        cluster_calls["n"] += 1

    restarter = threading.Thread(target=restart_midway)
    restarter.start()
    hammer(client, each=counted)
    restarter.join(60)
    assert stopped.is_set(), "the broker was restarted during the hammer"
    assert client.core.calls == {}


DROPPED_MID_MESSAGE = """
import time, zmq
from zmq.utils.monitor import parse_monitor_message
from cluster.client_core import make_router
ctx = zmq.Context()
broker = ctx.socket(zmq.ROUTER)
broker.setsockopt(zmq.ROUTING_ID, b"b1")
broker.setsockopt(zmq.LINGER, 0)
port = broker.bind_to_random_port("tcp://127.0.0.1")
sock, monitor = make_router(ctx, f"tcp://127.0.0.1:{port}", None)
deadline = time.monotonic() + 10
while not broker.poll(5):
    sock.getsockopt(zmq.EVENTS)  # the client's socket takes in its new connection (and sends its probe)
    assert time.monotonic() < deadline, "no probe from the client"
client_id, _ = broker.recv_multipart()
broker.send_multipart([client_id, b"one", b"two", b"three"])
deadline = time.monotonic() + 10
while not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # the ROUTER reads the message's first frame ahead
    assert time.monotonic() < deadline, "no message"
    time.sleep(0.005)
broker.close(0)
while True:
    assert monitor.poll(10_000), "no disconnect reported"
    if parse_monitor_message(monitor.recv_multipart())["event"] == zmq.EVENT_DISCONNECTED:
        break
for _ in range(20):  # the socket takes in its commands (the dropped connection's among them) while mid-message
    sock.getsockopt(zmq.EVENTS)
    time.sleep(0.005)
print(sock.recv_multipart(zmq.NOBLOCK)[1:])
"""


def test_a_connection_dropped_while_a_message_is_half_read_does_not_abort_the_client():
    """The client's ROUTER has read the first frame of a broker's message ahead (ZMQ_EVENTS, as any poll does) when
    that broker's connection drops: with ZMQ_IMMEDIATE, libzmq 4.3.5 ended the pipe at once and aborted the process
    on the next frame (`!_more`, fq.cpp:80). Now the message is read whole. In a child process: an abort is a
    failure here, not the end of the test session."""
    child = subprocess.run(
        [sys.executable, "-c", DROPPED_MID_MESSAGE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert child.returncode != -signal.SIGABRT, f"the client process aborted: {child.stderr[-2000:]}"
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == "[b'one', b'two', b'three']"
