"""AsyncClient's I/O (issue 23): the caller's coroutine sends, the loop's reader callback on the socket's FD reads
(no reader task, no thread), and a send that finds the pipe to its broker full waits in a FIFO.

What must hold: answers arriving while callers keep sending are all read, even with the periodic look at the socket
switched off (ZMQ_FD is edge-triggered: a lost edge strands answers, and the calls then fail at their deadline); a
send that meets the high-water mark waits and goes when room comes, or fails at its deadline, and a waiting send
whose caller is cancelled never goes (and no CANCEL is sent for it). No timing is asserted; deadlines bound waits.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq

from cluster import InferenceTimeoutError, client_core
from cluster import async_client as async_module
from cluster.client import AsyncClient
from tests.harness import until
from tests.test_client_io import FakeBroker

IN_FLIGHT = 64
CALLS = 2000
DEADLINE = 120.0  # seconds for 2,000 calls on a loaded 2-core machine (they take about one)


@pytest.fixture
def no_tick(monkeypatch):
    """The client looks at its socket every ASYNC_CLIENT_TICK_S whatever woke it, which would turn a lost edge of
    the FD into mere slowness: push that look past the calls' deadlines, so a lost one fails them."""
    monkeypatch.setattr(async_module, "ASYNC_CLIENT_TICK_S", 3600.0)


async def echo_many(
    client: AsyncClient,
    calls: int = CALLS,
    in_flight: int = IN_FLIGHT,
    timeout: float = 60,
    output: str = "x",
    width: int = 8,
) -> int:
    """`calls` echo calls, `in_flight` coroutines at a time, each checking its answer (`output`) is its own: the
    number done."""
    done = 0
    next_k = 0

    async def caller() -> None:
        nonlocal done, next_k
        while next_k < calls:
            k = next_k
            next_k += 1
            x = np.full((1, width), k, np.float32)
            got = await client.infer("echo", {"x": x}, timeout=timeout)
            assert got.as_numpy(output).tolist() == x.tolist(), f"call {k} got another call's answer"
            done += 1

    await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(in_flight))), DEADLINE)
    return done


def test_answers_arriving_while_callers_keep_sending_are_all_read(no_tick):
    broker = FakeBroker()
    try:

        async def run() -> int:
            async with AsyncClient(broker.address, timeout=30) as client:
                return await echo_many(client)

        assert asyncio.run(run()) == CALLS
    finally:
        broker.stop()


def test_the_calls_of_one_loop_step_go_as_one_batch_and_a_lone_call_alone():
    broker = FakeBroker()
    try:

        async def run() -> None:
            async with AsyncClient(broker.address, timeout=30) as client:
                await client.infer("echo", {"x": np.zeros(4, np.float32)})  # connected, hello heard
                broker.received.clear()
                inputs = [{"x": np.full(4, k, np.float32)} for k in range(20)]
                answers = await asyncio.gather(*(client.infer("echo", x) for x in inputs))
                assert [a.as_numpy("x")[0] for a in answers] == list(range(20)), "an answer went to another call"
                assert broker.received == [20], f"messages per read: {broker.received}"
                broker.received.clear()
                await client.infer("echo", {"x": np.zeros(4, np.float32)})
                assert broker.received == [1], "a lone call went in a BATCH"

        asyncio.run(run())
    finally:
        broker.stop()


def test_the_io_runs_in_the_loops_callbacks_not_in_tasks():
    """While 64 calls are in flight the only tasks are the callers and the test's own: no reader, watcher or
    expiry task, and no task per send."""
    broker = FakeBroker()
    try:

        async def run() -> tuple[int, int]:
            async with AsyncClient(broker.address, timeout=30) as client:
                x = np.ones((1, 8), np.float32)
                await client.infer("echo", {"x": x})

                async def caller() -> None:
                    for _ in range(50):
                        assert (await client.infer("echo", {"x": x})).as_numpy("x").tolist() == x.tolist()

                callers = [asyncio.ensure_future(caller()) for _ in range(IN_FLIGHT)]
                await asyncio.sleep(0)  # every caller has sent its first call
                seen = len(asyncio.all_tasks())
                await asyncio.wait_for(asyncio.gather(*callers), DEADLINE)
                return seen, len(callers) + 1

        seen, expected = asyncio.run(run())
        assert seen == expected, f"{seen - expected} tasks besides the callers"
    finally:
        broker.stop()


@pytest.mark.cluster
def test_two_thousand_calls_through_a_real_broker_with_64_in_flight(echo_cluster, no_tick):
    echo_cluster.start_manager()
    echo_cluster.start_broker()
    echo_cluster.start_agents(2)
    echo_cluster.wait_for_agents(2, model="echo")

    async def run() -> int:
        async with AsyncClient(echo_cluster.addresses.broker_clients, timeout=30) as client:
            return await echo_many(client, timeout=30, output="y", width=64)

    assert asyncio.run(run()) == CALLS


# ---- a full pipe ----------------------------------------------------------------------------------------------------

BIG = 256 * 1024  # floats: 1 MiB a request, so a few fill the pipe and the TCP buffers


@pytest.fixture
def paused_broker(monkeypatch):
    """A FakeBroker that reads nothing while `paused` (receive HWM 2, small TCP buffers), and clients whose socket
    has a send HWM of 2 and small TCP buffers."""
    make_socket = client_core.make_socket

    def small_pipes(ctx, kind, **options):
        before = options.get("before_connect")

        def small(sock) -> None:
            sock.setsockopt(zmq.SNDBUF, 64 * 1024)
            if before is not None:
                before(sock)

        return make_socket(ctx, kind, **{**options, "hwm": 2, "before_connect": small})

    monkeypatch.setattr(client_core, "make_socket", small_pipes)
    broker = FakeBroker(name=b"paused", receive_hwm=2, receive_buffer=64 * 1024)
    yield broker
    broker.stop()


def big(k: int) -> dict:
    return {"x": np.full((1, BIG), k, np.float32)}


async def fill(client: AsyncClient, broker: FakeBroker, n: int = 24) -> list[asyncio.Task]:
    """Pause the broker and send `n` big calls: some must find the pipe full and wait for room."""
    await client.infer("echo", big(-1))  # the broker is live, and said hello
    broker.paused.set()
    calls = []
    for k in range(n):  # one call a loop step: each its own message (one step's calls go as one BATCH)
        calls.append(asyncio.ensure_future(client.infer("echo", big(k), timeout=120)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert await until(lambda: len(client._waiting) > 0, 30), "no send found the pipe full"
    return calls


def test_a_send_that_meets_a_full_pipe_waits_and_goes_when_room_comes(paused_broker):
    async def run() -> None:
        async with AsyncClient(paused_broker.address, timeout=60) as client:
            calls = await fill(client, paused_broker)
            paused_broker.paused.clear()
            answers = await asyncio.wait_for(asyncio.gather(*calls), DEADLINE)
            for k, answer in enumerate(answers):
                assert answer.as_numpy("x")[0, ::4096].tolist() == [k] * (BIG // 4096), f"call {k}: wrong answer"
            assert not client._waiting

    asyncio.run(run())


def test_a_send_waiting_for_room_fails_at_its_deadline_and_never_goes(paused_broker):
    async def run() -> None:
        async with AsyncClient(paused_broker.address, timeout=60) as client:
            calls = await fill(client, paused_broker)
            late = asyncio.ensure_future(client.infer("echo", big(1000), timeout=0.2))
            with pytest.raises(InferenceTimeoutError):
                await asyncio.wait_for(late, DEADLINE)
            paused_broker.paused.clear()
            await asyncio.wait_for(asyncio.gather(*calls), DEADLINE)
            assert len(paused_broker.requests) == len(calls) + 1, "the call past its deadline was sent after all"

    asyncio.run(run())


def test_a_cancelled_send_waiting_for_room_never_goes_and_sends_no_cancel(paused_broker):
    async def run() -> None:
        async with AsyncClient(paused_broker.address, timeout=60) as client:
            calls = await fill(client, paused_broker)
            doomed = asyncio.ensure_future(client.infer("echo", big(1000), timeout=120))
            await asyncio.sleep(0)  # it sent, or queued behind those waiting
            waiting = list(client.core.calls.values())[-1]
            assert not waiting.sent, "the pipe had room after all"
            doomed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            paused_broker.paused.clear()
            await asyncio.wait_for(asyncio.gather(*calls), DEADLINE)
            assert waiting.request_id not in paused_broker.requests, "the cancelled call was sent after all"
            assert paused_broker.cancelled == [], "a CANCEL went for a request the broker never had"
            assert len(paused_broker.requests) == len(calls) + 1

    asyncio.run(run())
