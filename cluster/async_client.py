"""`AsyncClient`: the asyncio adapter over `ClientCore` (client_core.py), one ROUTER socket connected to every broker,
its I/O done in the event loop's own callbacks (no reader task, no thread).

How it uses the socket (a plain zmq.Socket, not zmq.asyncio: its futures and send queue cost more than the bus):
- A caller's coroutine sends its request itself, non-blocking. A send that finds no room (the pipe to that broker at
  its high-water mark: zmq.Again) waits in `_waiting`, a FIFO tried again when the socket's FD wakes the loop and
  every ASYNC_CLIENT_SEND_RETRY_S while anything waits; it fails at its call's deadline like any call.
- Requests sent in one step of the loop (the callers it woke) to the same broker go as one BATCH at the end of
  that step (`_queue`, `_send_queued`, a `call_soon`): one send and one wake-up of the broker for many. A lone one
  goes as it is, one loop step later: nothing waits for more to come.
- `loop.add_reader(ZMQ_FD)` runs `_service`, which reads every answer waiting (ZMQ_EVENTS & POLLIN) and resolves
  the callers' futures. ZMQ_FD is edge-triggered, and any use of the socket (a send too) may swallow the edge of an
  answer that arrived meanwhile: so every use is followed by `_service`, which ends only on ZMQ_EVENTS showing
  nothing to read (the next arrival then signals the FD again).
- The socket monitor has its own add_reader; deadlines and unready brokers are looked at every ASYNC_CLIENT_TICK_S.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from cluster.auth import BusSecurity
from cluster.client_core import CHECK_INTERVAL, CHECK_WINDOW, Call, ClientCore, InferResult, make_router, resolve
from cluster.config import ASYNC_CLIENT_DRAIN_LIMIT, ASYNC_CLIENT_SEND_RETRY_S, ASYNC_CLIENT_TICK_S
from cluster.errors import ClusterError, NoAgentAvailableError
from cluster.protocol import MAX_BATCH, What, as_one
from cluster.sockets import recv_frames, send_frames

_raw_get = zmq.backend.Socket.get
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class AsyncClient:
    """asyncio client: the same calls as Client, as coroutines. Create (or enter) it in the loop that uses it.

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
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: list[int] = []  # the FDs the loop watches for us
        self._timers: dict[str, asyncio.TimerHandle] = {}  # "tick", "retry", "check" -> its pending callback
        self._waiting: deque[Call | list] = deque()  # sends that found no room (calls; CANCEL frames), in order
        self._servicing = False  # _service is running (a send it makes does not start another)
        self._retrying = False  # _retry is running (a call it finds lost joins the FIFO it is going through)
        self._outgoing: dict[bytes, list[Call]] = {}  # broker -> requests made in this loop step, sent at its end

    def _ensure_started(self) -> None:
        if self._sock is not None:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._ctx = zmq.Context()
        self._sock, self._monitor = make_router(self._ctx, self.address, self.security)
        self._started_at = time.monotonic()
        self._fds = [self._sock.getsockopt(zmq.FD), self._monitor.getsockopt(zmq.FD)]
        loop.add_reader(self._fds[0], self._service)
        loop.add_reader(self._fds[1], self._on_monitor)
        self._timers["tick"] = loop.call_later(ASYNC_CLIENT_TICK_S, self._tick)
        # Read what came before the loop watched the FDs: a pipe signals only once a read has found it empty.
        self._on_monitor()
        self._service()

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
        call = self.core.infer_call(model, inputs, version, timeout, outputs, self._loop.create_future(), request_id)
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
        if self._sock is not None:
            for fd in self._fds:
                self._loop.remove_reader(fd)
            for timer in self._timers.values():
                timer.cancel()
            self._fds, self._timers = [], {}
        self._waiting.clear()
        self._outgoing.clear()
        for call in self.core.fail_all():
            resolve(call.future, ClusterError("client closed", call.model))
        if self._sock is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(0)
            self._ctx.term()
            self._sock = self._monitor = None

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
        call = self.core.query_call(what, timeout, self._loop.create_future(), **fields)
        return await self._send_and_wait(call)

    async def _send_and_wait(self, call: Call):
        try:
            self._queue(call)  # sent at the end of this loop step, or waiting for room (or for a broker)
            return await call.future
        except asyncio.CancelledError:
            # The awaiting task was cancelled (a caller's timeout, a closed HTTP connection, a cancelled gRPC call):
            # tell the broker, so the request leaves its queue or its agent skips it (not if it never went).
            sent = call.sent
            frames = self.core.cancel_message(call)
            if frames is not None and sent and self._sock is not None:
                if self._post(frames) is None:
                    self._wait_for_room(frames)
                self._service()
            raise
        finally:
            self.core.cancel(call)  # cancelled by the caller: forget it (a late answer is then ignored)

    # -- sends --

    def _post(self, frames: list) -> bool | None:
        """Send now without waiting: True if sent, None if no room, False if the broker is gone (EHOSTUNREACH)."""
        try:
            send_frames(self._sock, frames)
        except zmq.ZMQError as exc:
            return False if exc.errno == errno.EHOSTUNREACH else None
        return True

    def _queue(self, call: Call) -> None:
        """A new call: sent with the others made in this loop step to its broker (`_send_queued`), unless sends wait
        for room already (it goes behind them) or no broker is live (it waits for one in the core)."""
        if call.broker is None or self._waiting:
            self._put(call)
            self._service()  # the send may have swallowed the FD's edge of an answer: read what waits
            return
        if not self._outgoing:
            self._loop.call_soon(self._send_queued)
        self._outgoing.setdefault(call.broker, []).append(call)

    def _send_queued(self) -> None:
        """The end of a loop step: each broker gets its calls made in that step as one message (a BATCH of up to
        MAX_BATCH; a lone one as it is). No room: they wait for it, in order; a broker found gone: the core sends them
        elsewhere (as for any lost call). Calls answered, expired or cancelled meanwhile are not sent."""
        outgoing, self._outgoing = self._outgoing, {}
        try:
            for broker, calls in outgoing.items():
                self._send_to(broker, calls)
        finally:
            self._service()  # the sends may have swallowed the FD's edge of an answer: read what waits

    def _send_to(self, broker: bytes, calls: list[Call]) -> None:
        calls_now = self.core.calls
        ready = []  # (call, its frames); a call whose frames cannot be built fails alone, at once
        for call in calls:
            if call.sent or call.broker != broker or calls_now.get(call.request_id) is not call:
                continue
            try:
                ready.append((call, call.frames()))
            except Exception as exc:
                self.core.cancel(call)
                resolve(call.future, ClusterError(f"request cannot be sent: {exc}", call.model))
        for at in range(0, len(ready), MAX_BATCH):
            chunk = ready[at : at + MAX_BATCH]
            outcome = self._post([broker, *as_one([frames for _, frames in chunk])]) if not self._waiting else None
            if outcome:
                for call, _ in chunk:
                    call.sent = True
                continue
            if outcome is None:  # no room: each waits for it, in order, behind what waits already
                for call, _ in ready[at:]:
                    self._wait_for_room(call)
            else:
                self._lost(broker)  # they are sent again elsewhere, with the broker's other calls
            return

    def _put(self, call: Call) -> None:
        """Send `call` to its broker unless it went already; no room: it waits in `_waiting` (behind those waiting
        already). A broker found gone is lost: what was outstanding there goes to another broker (a call waiting for
        one is sent when one says hello)."""
        while call.broker is not None and not call.sent and self.core.calls.get(call.request_id) is call:
            if self._waiting and not self._retrying:  # keep the order: behind the sends waiting for room
                self._wait_for_room(call)
                self._retry()  # (tried again at once)
                return
            outcome = self._post(call.wire())
            if outcome is None:
                self._wait_for_room(call)
                return
            if outcome:
                call.sent = True
            else:
                self._lost(call.broker)

    def _wait_for_room(self, item: Call | list) -> None:
        self._waiting.append(item)
        if "retry" not in self._timers and self._loop is not None:
            self._timers["retry"] = self._loop.call_later(ASYNC_CLIENT_SEND_RETRY_S, self._on_retry_timer)

    def _on_retry_timer(self) -> None:
        del self._timers["retry"]
        self._service()
        if self._waiting and self._sock is not None:
            self._timers["retry"] = self._loop.call_later(ASYNC_CLIENT_SEND_RETRY_S, self._on_retry_timer)

    def _retry(self) -> None:
        """Send what waits for room, in order; a broker still without room keeps the rest of its sends waiting.
        Calls answered, expired or cancelled meanwhile, or sent again elsewhere already, are dropped from the FIFO."""
        if self._retrying:
            return
        self._retrying = True
        full: set[bytes] = set()
        keep: deque = deque()
        waiting = self._waiting
        try:
            self._retry_through(waiting, full, keep)
        finally:
            keep.extend(waiting)
            self._waiting = keep
            self._retrying = False

    def _retry_through(self, waiting: deque, full: set, keep: deque) -> None:
        while waiting:
            item = waiting.popleft()
            if isinstance(item, list):  # a CANCEL: best effort
                if item[0] in full:
                    keep.append(item)
                elif self._post(item) is None:
                    full.add(item[0])
                    keep.append(item)
                continue
            call = item
            if call.sent or call.broker is None or self.core.calls.get(call.request_id) is not call:
                continue
            if call.broker in full:
                keep.append(call)
                continue
            outcome = self._post(call.wire())
            if outcome is None:
                full.add(call.broker)
                keep.append(call)
            elif outcome:
                call.sent = True
            else:
                self._lost(call.broker)  # its calls go elsewhere: those without room join `waiting`, tried below

    def _lost(self, broker: bytes) -> None:
        for call, error in self.core.broker_lost(broker):
            resolve(call.future, error)
        self._flush()

    def _flush(self) -> None:
        """Send what the core says must go now (lost elsewhere, or waiting for a broker)."""
        while self.core.resend:
            for call in self.core.take_resend():
                self._put(call)

    # -- reads --

    def _service(self) -> None:
        """The socket's FD woke the loop, or we used the socket: send what waits for room, then read and resolve
        every answer waiting until ZMQ_EVENTS shows none (which re-arms the edge-triggered FD). A pass reads at most
        ASYNC_CLIENT_DRAIN_LIMIT messages, then lets the loop run other callbacks and goes on."""
        if self._servicing or self._sock is None:
            return  # the pass running looks at ZMQ_EVENTS again after its own sends
        self._servicing = True
        sock = self._sock
        core = self.core
        try:
            if self._waiting:
                self._retry()
            for _ in range(ASYNC_CLIENT_DRAIN_LIMIT):
                if not _raw_get(sock, _EVENTS) & _POLLIN:
                    return
                try:
                    frames = recv_frames(sock, 3)
                except zmq.Again:
                    return
                for message in core.messages(frames):
                    call, outcome = core.on_message(message)
                    if call is not None:
                        future = call.future
                        if not future.done():
                            if isinstance(outcome, BaseException):
                                future.set_exception(outcome)
                            else:
                                future.set_result(outcome)
                    elif outcome:  # a hello: calls out of attempts
                        for failed, error in outcome:
                            resolve(failed.future, error)
                if core.resend:  # a hello: calls that waited for a broker, or were lost at its old incarnation
                    self._flush()
            self._loop.call_soon(self._service)  # more may wait, and the FD will not say so
        finally:
            self._servicing = False

    # -- the monitor, deadlines, checks --

    def _on_monitor(self) -> None:
        """Every event the monitor socket holds (read until none: its FD is edge-triggered too)."""
        while self._monitor is not None:
            try:
                message = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self._monitor_event(message)
            self._service()

    def _monitor_event(self, message: dict) -> None:
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
            if "check" not in self._timers:
                self._check()
            return
        for call, error in self.core.on_handshake(event):
            resolve(call.future, error)

    def _check(self) -> None:
        """A connection dropped: probe each live broker until the one gone is found (see Client._check)."""
        self._timers.pop("check", None)
        if self._sock is None or time.monotonic() >= self._check_until:
            return
        self._sock.getsockopt(zmq.EVENTS)
        for broker in list(self.core.live):
            if self._post([broker.name, b""]) is False:
                self._lost(broker.name)
        self._service()
        if self.core.suspect():
            self._timers["check"] = self._loop.call_later(CHECK_INTERVAL, self._check)

    def _tick(self) -> None:
        """Every ASYNC_CLIENT_TICK_S: calls past their deadline fail (waiting for room or not), unready brokers are
        asked again, and the socket is looked at (cheap insurance for an edge nobody saw)."""
        if self._sock is None:
            return
        self._timers["tick"] = self._loop.call_later(ASYNC_CLIENT_TICK_S, self._tick)
        now = time.monotonic()
        for call, error in self.core.expired(now):
            resolve(call.future, error)
        for name in self.core.unready_due(now):
            self._post([name, b""])
        self._service()
