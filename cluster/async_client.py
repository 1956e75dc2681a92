"""`AsyncClient`: the asyncio adapter over `ClientCore` (client_core.py), one DEALER socket and one reader task."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from cluster.auth import HANDSHAKE_EVENTS, BusSecurity
from cluster.client_core import Call, ClientCore, InferResult, make_dealer, resolve
from cluster.errors import ClusterError, NoAgentAvailableError
from cluster.protocol import What


class AsyncClient:
    """asyncio client: the same calls as Client, as coroutines. One reader task per socket; create it in a loop.

    fail_fast: while the connection to the broker is down (after a first second to connect), calls fail at once with
    NoAgentAvailableError instead of waiting to be sent when it is back; what the HTTP edge wants (an immediate 503).

    The cluster's timeout, InferenceTimeoutError, is a TimeoutError, and so (Python 3.11+) an asyncio.TimeoutError:
    around `asyncio.wait_for(client.infer(...))`, catch InferenceTimeoutError first to tell the two apart.
    """

    CONNECT_GRACE = 1.0  # seconds a fresh client may take to connect before fail_fast applies

    def __init__(
        self,
        address: str | None = None,
        timeout: float | None = None,
        fail_fast: bool = False,
        key: str | None = None,
    ) -> None:
        self.core = ClientCore.for_client(address, timeout, keyed=key is not None)
        self.address = self.core.address
        self.security = BusSecurity.load(key)
        self.fail_fast = fail_fast
        self.connected = False  # the monitor's view: a handshake with the broker succeeded and has not dropped since
        self._started_at = 0.0
        self._ctx: zmq.asyncio.Context | None = None
        self._sock = None
        self._tasks: list[asyncio.Task] = []

    def _ensure_started(self) -> None:
        if self._sock is not None:
            return
        self._ctx = zmq.asyncio.Context()
        self._sock, monitor = make_dealer(
            self._ctx, self.address, self.security, HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED
        )
        self._started_at = time.monotonic()
        self._tasks = [
            asyncio.ensure_future(self._read()),
            asyncio.ensure_future(self._watch(monitor)),
            asyncio.ensure_future(self._expire()),
        ]

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: int | None = None,
        timeout: float | None = None,
        outputs=None,
        request_id: str | None = None,
    ) -> InferResult:
        self._ensure_started()
        self._check_connected(model)
        future = asyncio.get_running_loop().create_future()
        call = self.core.infer_call(model, inputs, version, timeout, outputs, future, request_id)
        return await self._send_and_wait(call)

    async def agents(self, timeout: float | None = None) -> list[dict]:
        return await self._query(What.AGENTS, timeout)

    async def models(self, timeout: float | None = None) -> dict[str, dict]:
        return await self._query(What.MODELS, timeout)

    async def model_metadata(self, name: str, version: int | None = None, timeout: float | None = None) -> dict:
        return await self._query(What.MODEL, timeout, name=name, version=version)

    async def stats(self, timeout: float | None = None) -> dict:
        return await self._query(What.STATS, timeout)

    async def statistics(
        self, name: str | None = None, version: str | None = None, timeout: float | None = None
    ) -> dict:
        """See Client.statistics."""
        return await self._query(What.STATISTICS, timeout, name=name, version=version)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for call in list(self.core.calls.values()):
            resolve(call.future, ClusterError("client closed", call.model))
        self.core.calls.clear()
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close(0)
            self._ctx.term()
            self._sock = None

    async def __aenter__(self) -> AsyncClient:
        self._ensure_started()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _check_connected(self, model: str | None = None) -> None:
        if self.core.refused is not None:
            raise self.core.refused
        if self.fail_fast and not self.connected and time.monotonic() - self._started_at > self.CONNECT_GRACE:
            raise NoAgentAvailableError(f"the broker at {self.address} is not reachable", model)

    async def _query(self, what: str, timeout, **fields):
        self._ensure_started()
        self._check_connected()
        future = asyncio.get_running_loop().create_future()
        call = self.core.query_call(what, timeout, future, **fields)
        return await self._send_and_wait(call)

    async def _send_and_wait(self, call: Call):
        try:
            try:
                await self._sock.send_multipart(call.frames(), zmq.NOBLOCK, copy=False)
            except zmq.Again:
                # No room, or no peer at all (a refused handshake): wait for room, or for the call to be failed.
                send = asyncio.ensure_future(self._sock.send_multipart(call.frames(), copy=False))
                await asyncio.wait({send, call.future}, return_when=asyncio.FIRST_COMPLETED)
                if not send.done():
                    send.cancel()
            return await call.future
        except asyncio.CancelledError:
            # The awaiting task was cancelled (a caller's timeout, a closed HTTP connection, a cancelled gRPC call):
            # tell the broker, so the request leaves its queue or its agent skips it.
            frames = self.core.cancel_message(call)
            if frames is not None:
                try:
                    sent = self._sock.send_multipart(frames, zmq.NOBLOCK)
                    sent.add_done_callback(lambda f: f.cancelled() or f.exception())
                except zmq.ZMQError:
                    pass
            raise
        finally:
            self.core.cancel(call)  # cancelled by the caller: forget it (a late answer is then ignored)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            call, outcome = self.core.on_message(frames)
            if call is not None:
                resolve(call.future, outcome)

    async def _watch(self, monitor) -> None:
        handshakes = 0
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                self.connected = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
                for call, error in self.core.on_handshake(event):
                    resolve(call.future, error)
                if self.connected:
                    handshakes += 1
                    if handshakes > 1:
                        for call in list(self.core.calls.values()):
                            await self._sock.send_multipart(call.frames(), copy=False)
        finally:
            monitor.close(0)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            for call, error in self.core.expired(time.monotonic()):
                resolve(call.future, error)
