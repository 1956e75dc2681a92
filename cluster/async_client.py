"""`AsyncClient`: the asyncio adapter over `ClientCore` (client_core.py), one ROUTER socket connected to every broker
and one reader task."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Mapping
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from cluster.auth import BusSecurity
from cluster.client_core import CHECK_INTERVAL, CHECK_WINDOW, Call, ClientCore, InferResult, make_router, resolve
from cluster.errors import ClusterError, NoAgentAvailableError
from cluster.protocol import What


class AsyncClient:
    """asyncio client: the same calls as Client, as coroutines. One reader task per socket; create it in a loop.

    fail_fast: while no broker is live (after a first second to connect), calls fail at once with
    NoAgentAvailableError instead of waiting to be sent when one is back; what the HTTP edge wants (an immediate 503).
    Several brokers (a comma list): as Client (client_core.py).

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
        self._started_at = 0.0
        self._check_until = 0.0  # after a disconnect: check the brokers until then (while one may be gone)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock = None
        self._tasks: list[asyncio.Task] = []

    def _ensure_started(self) -> None:
        if self._sock is not None:
            return
        self._ctx = zmq.asyncio.Context()
        self._sock, monitor = make_router(self._ctx, self.address, self.security)
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

    @property
    def connected(self) -> bool:
        """Some broker is live (it said hello, and no send or check has found it gone since)."""
        return bool(self.core.live)

    def brokers(self) -> list[dict]:
        """What this client knows of each broker that said hello (see Client.brokers)."""
        return self.core.describe_brokers()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for call in self.core.fail_all():
            resolve(call.future, ClusterError("client closed", call.model))
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
            which = "the broker at {} is" if len(self.core.addresses) == 1 else "the brokers at {} are"
            raise NoAgentAvailableError(f"{which.format(self.address)} not reachable", model)

    async def _query(self, what: str, timeout, **fields):
        self._ensure_started()
        self._check_connected()
        future = asyncio.get_running_loop().create_future()
        call = self.core.query_call(what, timeout, future, **fields)
        return await self._send_and_wait(call)

    async def _send_and_wait(self, call: Call):
        try:
            if not self._put(call):
                # No room at its broker: wait for room, or for the call to be failed.
                send = asyncio.ensure_future(self._sock.send_multipart(call.wire(), copy=False))
                await asyncio.wait({send, call.future}, return_when=asyncio.FIRST_COMPLETED)
                if send.done() and not send.cancelled() and send.exception() is None:
                    call.sent = True
                else:
                    send.cancel()
            return await call.future
        except asyncio.CancelledError:
            # The awaiting task was cancelled (a caller's timeout, a closed HTTP connection, a cancelled gRPC call):
            # tell the broker, so the request leaves its queue or its agent skips it.
            frames = self.core.cancel_message(call)
            if frames is not None:
                self._post(frames)
            raise
        finally:
            self.core.cancel(call)  # cancelled by the caller: forget it (a late answer is then ignored)

    def _post(self, frames: list) -> bool | None:
        """Send now without waiting: True if sent, None if no room, False if the broker is gone (EHOSTUNREACH)."""
        try:
            sent = self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            return False if exc.errno == errno.EHOSTUNREACH else None
        if not sent.done():  # queued behind a waiting send: its outcome is not known yet
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())
            return True
        exc = sent.exception()
        if exc is None:
            return True
        return False if isinstance(exc, zmq.ZMQError) and exc.errno == errno.EHOSTUNREACH else None

    def _put(self, call: Call) -> bool:
        """Send `call` to its broker unless it went already; False if there is no room. A broker found gone is lost:
        what was outstanding there goes to another broker (a call waiting for one is sent when one says hello)."""
        while call.broker is not None and not call.sent and self.core.calls.get(call.request_id) is call:
            outcome = self._post(call.wire())
            if outcome is None:
                return False
            if outcome:
                call.sent = True
            else:
                self._lost(call.broker)
        return True

    def _lost(self, broker: bytes) -> None:
        for call, error in self.core.broker_lost(broker):
            resolve(call.future, error)
        self._flush()

    def _flush(self) -> None:
        """Send what the core says must go now; a call without room waits for it in its own task."""
        while self.core.resend:
            for call in self.core.take_resend():
                if not self._put(call):
                    asyncio.ensure_future(self._send_later(call))

    async def _send_later(self, call: Call) -> None:
        try:
            await self._sock.send_multipart(call.wire(), copy=False)
            call.sent = True
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH and self.core.calls.get(call.request_id) is call:
                self._lost(call.broker)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            for message in self.core.messages(frames):
                call, outcome = self.core.on_message(message)
                if call is not None:
                    resolve(call.future, outcome)
                elif outcome:  # a hello: calls out of attempts
                    for failed, error in outcome:
                        resolve(failed.future, error)
            if self.core.resend:
                self._flush()

    async def _watch(self, monitor) -> None:
        checking: asyncio.Task | None = None
        try:
            while True:
                message = parse_monitor_message(await monitor.recv_multipart())
                event = message["event"]
                endpoint = message.get("endpoint", b"").decode(errors="replace")
                self.core.on_connection(event, endpoint)
                peer = self.core.peer_for(endpoint)
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED and peer is not None:
                    self._post([peer, b""])  # a reconnection: the broker says hello (PROBE_ROUTER probes the first)
                if event == zmq.EVENT_DISCONNECTED:
                    if peer is not None:  # that connection's broker is gone: what was outstanding there goes elsewhere
                        self._lost(peer)
                    self._check_until = time.monotonic() + CHECK_WINDOW
                    if checking is None or checking.done():
                        checking = asyncio.ensure_future(self._check())
                    continue
                for call, error in self.core.on_handshake(event):
                    resolve(call.future, error)
        finally:
            if checking is not None:
                checking.cancel()
            monitor.close(0)

    async def _check(self) -> None:
        """A connection dropped: probe each live broker until the one gone is found (see Client._check)."""
        while time.monotonic() < self._check_until:
            self._sock.getsockopt(zmq.EVENTS)
            for broker in list(self.core.live):
                if self._post([broker.name, b""]) is False:
                    self._lost(broker.name)
            if not self.core.suspect():
                return
            await asyncio.sleep(CHECK_INTERVAL)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for call, error in self.core.expired(now):
                resolve(call.future, error)
            for name in self.core.unready_due(now):
                self._post([name, b""])
