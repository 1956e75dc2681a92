"""The Python client: `Client` (blocking, thread-safe) and `AsyncClient` (asyncio), over one DEALER socket each.

    from cluster import Client
    with Client("tcp://127.0.0.1:5555") as client:
        result = client.infer("digits", {"image": images})      # numpy arrays or torch tensors
        result.as_numpy("probs"), result.version, result.agent

Layout (pyzmq's zmq/auth idea): `ClientCore` is the sans-IO part (encode requests, match answers to calls, notice
deadlines); `Client` and `AsyncClient` are thin adapters that own the socket. Many requests share one socket and
are told apart by request id. If the connection to the broker drops and comes back (a broker restart), every call
still waiting is sent again: inference is idempotent, and the first answer wins.

With keys (`key="path/NAME.key"`, a member's key file from `cluster keys add`), the socket connects with CURVE. A
broker that refuses the key (or that runs with keys while this client has none) fails the handshake; the socket
monitor reports it, and every call then fails at once with AuthenticationError rather than at its deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import select
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from cluster import protocol
from cluster.auth import HANDSHAKE_EVENTS, BusSecurity, HandshakeVerdict
from cluster.codec import decode_tensors, encode_tensors
from cluster.config import Timings, default_address, limits, timings_from_env
from cluster.errors import (
    AuthenticationError,
    BadRequestError,
    ClusterError,
    InferenceTimeoutError,
    NoAgentAvailableError,
    error_from_header,
)
from cluster.protocol import MAX_REQUEST_ID, Command, ProtocolError
from cluster.sockets import make_socket

DEADLINE_GRACE = 2.0  # the broker answers TIMEOUT at the deadline; the client gives up on its own a little later
CLIENT_DRAIN_LIMIT = 1024  # answers one holder of the socket lock receives before letting others use the socket
CLIENT_WAKE_INTERVAL = 0.1  # seconds between the I/O thread's (and the reading caller's) looks at deadlines
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: the enums cost more than the getsockopt


@dataclass
class InferResult:
    """The answer to one inference request."""

    model: str
    version: int
    agent: str  # id of the agent that served it
    outputs: dict[str, np.ndarray]  # read-only views over the received bytes
    id: Any = None
    batch_size: int | None = None  # requests in the forward pass that served this one (dynamic batching)
    queue_seconds: float | None = None  # how long it waited in the agent for a worker or a batch

    def as_numpy(self, name: str) -> np.ndarray:
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(f"no output {name!r}; outputs are {sorted(self.outputs)}") from None


@dataclass(eq=False)
class Call:
    """One request waiting for its answer."""

    request_id: int
    header: dict
    tensors: list
    deadline: float  # monotonic
    future: Any  # concurrent.futures.Future or asyncio.Future
    model: str | None = None
    command: Command = Command.REQUEST

    def frames(self) -> list:
        """The message, with the timeout brought down to what is left of the deadline (matters on a resend)."""
        if self.command == Command.REQUEST:
            self.header["timeout"] = max(0.001, self.deadline - DEADLINE_GRACE - time.monotonic())
        return protocol.message(self.command, self.header, self.tensors)


class ClientCore:
    """Everything a client does except I/O."""

    def __init__(self, timeout: float, address: str = "", keyed: bool = False) -> None:
        self.timeout = timeout
        self.calls: dict[int, Call] = {}
        self._ids = itertools.count(1)
        self.address = address
        self.keyed = keyed  # this client presents a key
        self.refused: AuthenticationError | None = None  # the last handshake failed: calls fail at once
        self._handshakes = HandshakeVerdict("broker")

    def on_handshake(self, event: int) -> list[tuple[Call, ClusterError]]:
        """A monitor event. A conclusive handshake failure fails every waiting call (and, until a handshake succeeds,
        every new one) with AuthenticationError; a successful one clears that."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.refused = None
        why = self._handshakes.on_event(event)
        if why is None:
            return []
        if not self.keyed:
            why += "; it runs with keys: pass key= (a key file from `cluster keys add`)"
        self.refused = AuthenticationError(f"{why} (broker {self.address})")
        failed = [(call, self.refused) for call in self.calls.values()]
        self.calls.clear()
        return failed

    def infer_call(
        self, model: str, inputs: Mapping[str, Any], version, timeout, outputs, future, request_id: str | None = None
    ) -> Call:
        if not isinstance(model, str) or not model:
            raise BadRequestError("model must be a non-empty string")
        if not isinstance(inputs, Mapping) or not inputs:
            raise BadRequestError("inputs must be a non-empty mapping of name -> array or tensor")
        try:
            metas, tensors = encode_tensors(inputs)
        except (ValueError, TypeError) as exc:
            raise BadRequestError(f"inputs cannot be sent: {exc}", model) from None
        size = sum(len(t) for t in tensors)
        if size > limits().max_message_bytes:
            limit = limits().max_message_bytes
            raise BadRequestError(f"request of {size} bytes is over the bus limit of {limit} bytes", model)
        timeout = self.timeout if timeout is None else float(timeout)
        header = {"id": next(self._ids), "model": model, "timeout": timeout, "inputs": metas}
        if version is not None:
            header["version"] = int(version)
        if outputs is not None:
            header["outputs"] = list(outputs)
        if request_id is not None:  # the caller's name for it, in the broker's and the agent's logs
            header["request_id"] = str(request_id)[:MAX_REQUEST_ID]
        call = Call(header["id"], header, tensors, time.monotonic() + timeout + DEADLINE_GRACE, future, model)
        self.calls[call.request_id] = call
        return call

    def query_call(self, what: str, timeout, future, **fields) -> Call:
        timeout = Timings().query_timeout if timeout is None else float(timeout)
        header = {"id": next(self._ids), "what": what, **{k: v for k, v in fields.items() if v is not None}}
        call = Call(header["id"], header, [], time.monotonic() + timeout, future, command=Command.QUERY)
        self.calls[call.request_id] = call
        return call

    def on_message(self, frames: list) -> tuple[Call | None, Any]:
        """Match an answer to its call: (call, InferResult | query result | ClusterError). (None, None) if unknown."""
        try:
            cmd = protocol.parse_preamble(frames[0])
            header = protocol.unpack_header(frames[1])
        except (ProtocolError, IndexError):
            return None, None
        call = self.calls.pop(header.get("id"), None) if isinstance(header.get("id"), int) else None
        if call is None:
            return None, None  # a late or duplicate answer
        if cmd == Command.ERROR:
            return call, error_from_header(header)
        if "result" in header:
            return call, header["result"]
        try:
            metas = protocol.validate_tensor_metas(header.get("outputs"), frames[2:], "outputs")
            queue_us = header.get("queue_us")
            return call, InferResult(
                header.get("model"),
                header.get("version"),
                header.get("agent"),
                decode_tensors(metas, frames[2:]),
                call.request_id,
                header.get("batch_size"),
                queue_us / 1e6 if isinstance(queue_us, (int, float)) else None,
            )
        except ProtocolError as exc:
            return call, ClusterError(f"malformed answer from the cluster: {exc}", call.model)

    def expired(self, now: float) -> list[tuple[Call, ClusterError]]:
        out = []
        for call in [c for c in self.calls.values() if c.deadline < now]:
            del self.calls[call.request_id]
            what = f"model '{call.model}'" if call.model else "query"
            out.append(
                (
                    call,
                    InferenceTimeoutError(
                        f"{what}: no answer from the broker within the deadline (is it running?)", call.model
                    ),
                )
            )
        return out

    def cancel(self, call: Call) -> None:
        self.calls.pop(call.request_id, None)

    def cancel_message(self, call: Call) -> list | None:
        """The caller gave up on `call`: forget it, and the CANCEL frames that tell the broker (None if the call was
        not waiting any more, or is a query: nothing to cancel)."""
        if self.calls.pop(call.request_id, None) is None or call.command != Command.REQUEST:
            return None
        return protocol.message(Command.CANCEL, {"id": call.request_id})


# Clients reconnect fast (a restarted broker is one, not hundreds of agents) and may queue many requests.
CLIENT_TIMINGS = Timings(reconnect_initial=0.1, reconnect_max=2.0)


def _make_dealer(ctx: zmq.Context, address: str, security: BusSecurity | None, events: int) -> tuple:
    """The client's DEALER and its monitor socket (attached before connecting: the first handshake's outcome counts,
    a refused key most of all)."""
    curve = security.client() if security is not None else None
    monitors = []
    sock = make_socket(
        ctx,
        zmq.DEALER,
        connect=address,
        hwm=100_000,
        linger=0,
        timings=CLIENT_TIMINGS,
        curve=curve,
        before_connect=lambda s: monitors.append(s.get_monitor_socket(events)),
    )
    return sock, monitors[0]


class Client:
    """Blocking client, safe to share between threads, over one DEALER socket.

    The calling thread does its own I/O (a thread switch per call costs more than the bus): every use of the socket
    is serialized by `_sock_lock`, a caller sends its request itself, and an infer() or query caller that finds
    nobody reading becomes the reader (leader/follower): it waits on the socket's FD, drains every ready answer,
    resolves everybody's futures, and steps down once its own is answered. The I/O thread reads only while calls
    wait and no caller reads; it also re-sends on a reconnection, fails calls on a refused handshake or past their
    deadline, sends CANCELs and closes the socket.

    ZMQ_FD is edge-triggered: any use of the socket may consume the signal of an answer that has arrived. So every
    use is followed, still under the lock, by a look at ZMQ_EVENTS: the reader (or, with no reader, whoever holds
    the lock) drains; anyone else pokes the reader. After ZMQ_EVENTS shows nothing to read, the next answer
    signals the FD again.
    """

    def __init__(self, address: str | None = None, timeout: float | None = None, key: str | None = None) -> None:
        self.address = address or default_address()
        self.security = BusSecurity.load(key)
        self.core = ClientCore(
            timings_from_env().request_timeout if timeout is None else timeout, self.address, key is not None
        )
        self._lock = threading.Lock()  # guards core.calls; taken after _sock_lock, never before it
        self._sock_lock = threading.Lock()  # serializes every use of the DEALER socket (and _reader, _io_reads)
        self._reader: int | None = None  # thread id of the caller reading the socket, if any
        self._io_reads = False  # the I/O thread's poll includes the socket's FD
        self._uses = 0  # sends on the socket so far (the reader skips a last drain when nobody else used it)
        self._drained_at = 0  # _uses when a drain last found the socket empty (its FD armed)
        self._outbox: queue.SimpleQueue[Call | list] = queue.SimpleQueue()  # calls that could not go now; CANCELs
        self._wake_r, self._wake_w = _pipe()  # wakes the I/O thread
        self._lead_r, self._lead_w = _pipe()  # wakes the reading caller
        self._closed = threading.Event()
        self._ctx = zmq.Context()
        self._sock, self._monitor = _make_dealer(self._ctx, self.address, self.security, HANDSHAKE_EVENTS)
        self._fd = self._sock.getsockopt(zmq.FD)
        self._thread = threading.Thread(target=self._io_loop, name="cluster-client-io", daemon=True)
        self._thread.start()

    # -- public API --

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: int | None = None,
        timeout: float | None = None,
        outputs=None,
        request_id: str | None = None,
    ) -> InferResult:
        """Run `model` on `inputs` (name -> numpy array or torch tensor) and wait for the answer. `request_id`: a
        name for the request that the broker's and the agent's logs carry (to follow it across processes)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            call = self.core.infer_call(model, inputs, version, timeout, outputs, future, request_id)
        if self._send(call, lead=True):
            self._lead(call)
        return self._wait(future)

    def submit(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: int | None = None,
        timeout: float | None = None,
        outputs=None,
        request_id: str | None = None,
    ) -> concurrent.futures.Future:
        """Send without waiting: a Future that resolves to an InferResult or raises a ClusterError.
        `future.cancel()` tells the broker (CANCEL): the request leaves its queue, or its agent skips it if it has
        not started it yet. Done callbacks run in whichever thread read the answer: the I/O thread, or any thread
        calling this client (keep them short)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            call = self.core.infer_call(model, inputs, version, timeout, outputs, future, request_id)
        self._send(call)
        future.add_done_callback(lambda done: self._cancelled(call) if done.cancelled() else None)
        return future

    def agents(self, timeout: float | None = None) -> list[dict]:
        """The live agents, each with its heartbeat fields (id, host, pid, device, models, in_flight, ...)."""
        return self._query("agents", timeout)

    def models(self, timeout: float | None = None) -> dict[str, dict]:
        """Model name -> {"versions": [...], "agents": [agent ids]} for every model a live agent serves."""
        return self._query("models", timeout)

    def model_metadata(self, name: str, version: int | None = None, timeout: float | None = None) -> dict:
        """{name, platform, inputs, outputs, version, versions, ready} of a model (newest version by default).

        Raises ModelNotFoundError for a model (or version) no agent has ever announced."""
        return self._query("model", timeout, name=name, version=version)

    def stats(self, timeout: float | None = None) -> dict:
        """The broker's counters: requests, redispatched, timeouts, agents_lost, and agents, in_flight, queued now."""
        return self._query("stats", timeout)

    def statistics(self, name: str | None = None, version: str | None = None, timeout: float | None = None) -> dict:
        """Triton's per-model statistics as each live agent last reported them (heartbeat), plus the broker's
        counters: {"agents": {agent id: {model: {version: entry}}}, "broker": {..., "queue_depth": {model: n}}}.
        An agent that left is not in it (its counts leave the sums). ModelNotFoundError for an unknown model."""
        return self._query("statistics", timeout, name=name, version=version)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            _poke(self._wake_w)
            _poke(self._lead_w)
            self._thread.join(5)
            for pipe in (self._wake_r, self._wake_w, self._lead_r, self._lead_w):
                pipe.close()
            self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- internals --

    def _query(self, what: str, timeout, **fields):
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            call = self.core.query_call(what, timeout, future, **fields)
        if self._send(call, lead=True):
            self._lead(call)
        return self._wait(future)

    def _wait(self, future: concurrent.futures.Future):
        if future.done():  # the usual case for a caller that read its own answer
            return future.result()
        # The I/O thread fails every call at its deadline; this outer bound only guards against a dead I/O thread.
        done, _ = concurrent.futures.wait([future], timeout=24 * 3600)
        if not done:
            raise InferenceTimeoutError("no answer: the client's I/O thread is not running")
        return future.result()

    def _cancelled(self, call: Call) -> None:
        """A future cancelled by its caller: the I/O thread sends the CANCEL (not the cancelling thread, which may
        be inside a done callback)."""
        with self._lock:
            frames = self.core.cancel_message(call)
        if frames is not None and not self._closed.is_set():
            self._outbox.put(frames)
            _poke(self._wake_w)

    def _send(self, call: Call, lead: bool = False) -> bool:
        """Send `call` from this thread. With lead=True, become the reader if nobody reads: True if so. A call that
        cannot go at once (no room, no connection yet, a refused key) goes to the I/O thread, which waits for room
        or fails it; so does a submit() that finds the socket busy (queueing on the lock behind the I/O thread's
        drain cost more throughput than the hand-over)."""
        if self._closed.is_set():
            with self._lock:
                self.core.cancel(call)
            raise ClusterError("client is closed")
        refused = self.core.refused
        if refused is not None:
            with self._lock:
                self.core.cancel(call)
            _resolve(call.future, refused)
            return False
        frames = call.frames()
        if not lead and not self._sock_lock.acquire(blocking=False):
            # Busy (most often the I/O thread draining answers): hand it over rather than queue on the lock.
            self._outbox.put(call)
            _poke(self._wake_w)
            return False
        if lead:
            self._sock_lock.acquire()
        sent = leading = wake = poke = False
        done: list = []
        try:
            if self._sock is None:  # closed under us
                with self._lock:
                    self.core.cancel(call)
                raise ClusterError("client is closed")
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                sent = True
            except zmq.Again:
                pass
            self._uses += 1
            if self._reader is None:
                if sent and lead:
                    self._reader = threading.get_ident()
                    leading = True
                done = self._drain_locked()
                wake = not leading and not self._io_reads  # the I/O thread must read (or send) for this call
            else:
                poke = self._readable_locked()
        finally:
            self._sock_lock.release()
        _resolve_all(done)
        if not sent:
            self._outbox.put(call)
            wake = True
        if wake:
            _poke(self._wake_w)
        if poke:
            _poke(self._lead_w)
        return leading

    def _lead(self, call: Call) -> None:
        """Read the socket in this thread until `call` is answered (or past its deadline), then step down: the I/O
        thread reads for whoever still waits."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._lead_r, select.POLLIN)
        future = call.future
        try:
            while not future.done() and not self._closed.is_set():
                remaining = call.deadline - time.monotonic()
                if remaining <= 0:
                    with self._lock:
                        expired = self.core.expired(time.monotonic())
                    _resolve_all((c.future, error) for c, error in expired)
                    break
                signalled = False
                for fd, _ in poller.poll(min(CLIENT_WAKE_INTERVAL, remaining) * 1000 + 1):
                    if fd == self._fd:
                        signalled = True
                    else:
                        _clear(self._lead_r)
                with self._sock_lock:
                    done = self._drain_locked(signalled)
                _resolve_all(done)
        finally:
            with self._sock_lock:
                self._reader = None
                # Anyone who used the socket since our last drain may have taken the FD's signal for an answer
                # (they poked us, but we are leaving): drain, so that the FD signals the next reader again.
                done = self._drain_locked() if self._uses != self._drained_at else []
                with self._lock:
                    waiting = bool(self.core.calls)
                wake = waiting and not self._io_reads
            _resolve_all(done)
            if wake:
                _poke(self._wake_w)

    def _readable_locked(self) -> bool:
        """An answer waits (the caller holds _sock_lock): also processes the socket's commands, which re-arms its FD."""
        return self._sock is not None and bool(self._sock.getsockopt(_EVENTS) & _POLLIN)

    def _drain_locked(self, signalled: bool = False) -> list:
        """Receive every answer waiting (the caller holds _sock_lock), up to CLIENT_DRAIN_LIMIT: (future, outcome)
        pairs to resolve once the lock is released. Ends on ZMQ_EVENTS showing nothing more, which re-arms the FD;
        at the limit, the reader is poked instead. `signalled`: the FD said so, so try a receive first."""
        out = []
        sock = self._sock
        if sock is None:
            return out
        for _ in range(CLIENT_DRAIN_LIMIT):
            if not signalled and not sock.getsockopt(_EVENTS) & _POLLIN:
                self._drained_at = self._uses
                return out
            signalled = False
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._drained_at = self._uses
                return out
            with self._lock:
                call, outcome = self.core.on_message(frames)
            if call is not None:
                out.append((call.future, outcome))
        # More may wait, and the FD will not say so: whoever reads must look again without waiting for it.
        _poke(self._lead_w if self._reader is not None else self._wake_w)
        return out

    def _after_use_locked(self) -> tuple[list, bool]:
        """After the I/O thread used the socket (holding _sock_lock): what to resolve; whether to poke the reader."""
        if self._reader is None:
            return self._drain_locked(), False
        return [], self._readable_locked()

    def _on_monitor(self, monitor) -> int | None:
        """Handle one monitor event (a failed handshake fails the waiting calls); returns the event (None if there
        was none: _send_one may have taken it already)."""
        try:
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))["event"]
        except zmq.Again:
            return None
        with self._lock:
            refused = self.core.on_handshake(event)
        self._fail(refused)
        return event

    def _fail(self, failed: list) -> None:
        """Resolve calls the I/O thread gave up on; the reading caller may be one of them: wake it."""
        if failed:
            _resolve_all((call.future, error) for call, error in failed)
            _poke(self._lead_w)

    def _use(self, use) -> bool:
        """Run `use(sock)` under the socket lock, then drain or poke the reader; False if the socket is closed."""
        with self._sock_lock:
            if self._sock is None:
                return False
            try:
                use(self._sock)
            finally:
                self._uses += 1
                done, poke = self._after_use_locked()
        _resolve_all(done)
        if poke:
            _poke(self._lead_w)
        return True

    def _send_one(self, monitor, call: Call | list) -> None:
        """Send a call the caller could not; fail it at once if the broker refused our key. A DEALER whose handshake
        failed has no peer to queue for: while a send cannot go, watch the monitor (a refused handshake fails the
        call) and whether the client is closing, and try again. The socket lock is not held while waiting."""
        if isinstance(call, list):  # a CANCEL: best effort, nobody waits for it

            def cancel(sock) -> None:
                try:
                    sock.send_multipart(call, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

            self._use(cancel)
            return
        frames = call.frames()
        sent = []

        def send(sock) -> None:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                sent.append(True)
            except zmq.Again:
                pass

        while self.core.refused is None and not self._closed.is_set() and not call.future.done():
            if not self._use(send):
                break
            if sent:
                return
            if monitor.poll(100):
                self._on_monitor(monitor)
        with self._lock:
            self.core.cancel(call)
        self._fail([(call, self.core.refused or ClusterError("client closed", call.model))])

    def _resend(self, monitor) -> None:
        """A reconnection: whatever was in flight on the old broker is lost; send every waiting call again."""
        with self._lock:
            waiting = list(self.core.calls.values())
        later = []

        def send(sock) -> None:
            for call in waiting:
                try:
                    sock.send_multipart(call.frames(), zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    later.append(call)

        self._use(send)
        for call in later:
            self._send_one(monitor, call)

    def _io_loop(self) -> None:
        monitor = self._monitor
        pollers = (zmq.Poller(), zmq.Poller())  # without and with the socket's FD
        for poller in pollers:
            poller.register(monitor, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
        pollers[1].register(self._fd, zmq.POLLIN)
        handshakes = 0
        signalled = False  # the last poll saw the socket's FD
        next_expiry = time.monotonic() + CLIENT_WAKE_INTERVAL
        try:
            while not self._closed.is_set():
                with self._sock_lock:
                    with self._lock:
                        waiting = bool(self.core.calls)
                    reading = self._io_reads = waiting and self._reader is None
                    done = self._drain_locked(signalled) if reading else []
                _resolve_all(done)
                wait_ms = max(0, int((next_expiry - time.monotonic()) * 1000) + 1)
                ready = dict(pollers[reading].poll(wait_ms))
                signalled = self._fd in ready
                if self._wake_r.fileno() in ready:
                    _clear(self._wake_r)
                while not self._outbox.empty():  # the only consumer: not empty means get() will not block
                    self._send_one(monitor, self._outbox.get())
                if monitor in ready:
                    event = self._on_monitor(monitor)
                    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # the connection came (back) up
                        handshakes += 1
                        if handshakes > 1:
                            self._resend(monitor)
                now = time.monotonic()
                if now >= next_expiry:  # every CLIENT_WAKE_INTERVAL, however busy
                    next_expiry = now + CLIENT_WAKE_INTERVAL
                    with self._lock:
                        expired = self.core.expired(now)
                    self._fail(expired)
        finally:
            with self._sock_lock:
                with self._lock:
                    waiting = list(self.core.calls.values())
                    self.core.calls.clear()
                sock, self._sock = self._sock, None
                sock.disable_monitor()
                monitor.close(0)
                sock.close(0)
            self._fail([(call, ClusterError("client closed", call.model)) for call in waiting])


def _pipe() -> tuple[socket.socket, socket.socket]:
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    return r, w


def _poke(pipe: socket.socket) -> None:
    try:
        pipe.send(b"\0")
    except (BlockingIOError, OSError):
        pass  # already signalled, or closing


def _clear(pipe: socket.socket) -> None:
    try:
        while pipe.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _resolve_all(done) -> None:
    for future, outcome in done:
        _resolve(future, outcome)


def _resolve(future, outcome) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


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
        self.address = address or default_address()
        self.security = BusSecurity.load(key)
        self.core = ClientCore(
            timings_from_env().request_timeout if timeout is None else timeout, self.address, key is not None
        )
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
        self._sock, monitor = _make_dealer(
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
        return await self._query("agents", timeout)

    async def models(self, timeout: float | None = None) -> dict[str, dict]:
        return await self._query("models", timeout)

    async def model_metadata(self, name: str, version: int | None = None, timeout: float | None = None) -> dict:
        return await self._query("model", timeout, name=name, version=version)

    async def stats(self, timeout: float | None = None) -> dict:
        return await self._query("stats", timeout)

    async def statistics(
        self, name: str | None = None, version: str | None = None, timeout: float | None = None
    ) -> dict:
        """See Client.statistics."""
        return await self._query("statistics", timeout, name=name, version=version)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for call in list(self.core.calls.values()):
            _resolve(call.future, ClusterError("client closed", call.model))
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
                _resolve(call.future, outcome)

    async def _watch(self, monitor) -> None:
        handshakes = 0
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                self.connected = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
                for call, error in self.core.on_handshake(event):
                    _resolve(call.future, error)
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
                _resolve(call.future, error)
