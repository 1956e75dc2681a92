"""The Python client: `Client` (blocking, thread-safe) and `AsyncClient` (asyncio), over one socket each.

    from cluster import Client
    with Client("tcp://127.0.0.1:5555") as client:
        result = client.infer("digits", {"image": images})      # numpy arrays or torch tensors
        client.infer("classifier", {"image": np.array([jpeg_bytes], dtype=object)})  # BYTES: bytes (or str)
        result.as_numpy("probs"), result.version, result.agent

Layout (pyzmq's zmq/auth idea): `ClientCore` (client_core.py) is the sans-IO part (encode requests, match answers to
calls, notice deadlines); `Client` (here) and `AsyncClient` (async_client.py) are thin adapters that own the
socket. Many requests share one socket and are told apart by request id.

Several brokers: `Client("tcp://b1:5555,tcp://b2:5555")` connects to each (one ROUTER socket addressing them by name;
client_core.py says how a broker is chosen and lost). When a broker is lost (its connection drops, its heartbeats
stop, or it restarts), every call outstanding there is sent again at once to another broker (or to it, once it is
back): inference is idempotent, and the first answer wins. `client.brokers()` lists what the client knows of each.

With keys (`key="path/NAME.key"`, a member's key file from `cluster keys add`), the socket connects with CURVE. A
broker that refuses the key (or that runs with keys while this client has none) fails the handshake; the socket
monitor reports it, and every call then fails at once with AuthenticationError rather than at its deadline.
"""

from __future__ import annotations

import concurrent.futures
import errno
import queue
import select
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from cluster.async_client import AsyncClient
from cluster.auth import BusSecurity
from cluster.client_core import (
    CHECK_INTERVAL,
    CHECK_WINDOW,
    Call,
    ClientCore,
    InferResult,
    make_router,
    resolve,
    resolve_all,
)
from cluster.errors import ClusterError, InferenceTimeoutError
from cluster.protocol import What
from cluster.sockets import has_message, recv_frames, send_frames

__all__ = [  # what importers of cluster.client use (its classes live in client_core.py and async_client.py too)
    "AsyncClient",
    "Call",
    "Client",
    "ClientCore",
    "InferResult",
]

CLIENT_DRAIN_LIMIT = 1024  # answers one holder of the socket lock receives before letting others use the socket
CLIENT_WAKE_INTERVAL = 0.1  # seconds between the I/O thread's (and the reading caller's) looks at deadlines
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: the enums cost more than the getsockopt


class Client:
    """Blocking client, safe to share between threads, over one ROUTER socket connected to every broker.

    The calling thread does its own I/O (a thread switch per call costs more than the bus): every use of the socket
    is serialized by `_sock_lock`, a caller sends its request itself, and an infer() or query caller that finds
    nobody reading becomes the reader (leader/follower): it waits on the socket's FD, drains every ready answer,
    resolves everybody's futures, and steps down once its own is answered. The I/O thread reads only while calls
    wait and no caller reads (or a broker's hello may come); it also checks the brokers after a disconnect (a send
    that finds one gone re-sends what was outstanding there, whoever makes it), fails calls on a refused handshake or
    past their deadline, sends CANCELs and closes the socket.

    ZMQ_FD is edge-triggered: any use of the socket may consume the signal of an answer that has arrived. So every
    use is followed, still under the lock, by a look at ZMQ_EVENTS: the reader (or, with no reader, whoever holds
    the lock) drains; anyone else pokes the reader. After ZMQ_EVENTS shows nothing to read, the next answer
    signals the FD again.
    """

    def __init__(self, address: str | None = None, timeout: float | None = None, key: str | None = None) -> None:
        self.core = ClientCore.for_client(address, timeout, keyed=key is not None)
        self.address = self.core.address
        self.security = BusSecurity.load(key)
        self._lock = threading.Lock()  # guards core.calls; taken after _sock_lock, never before it
        self._sock_lock = threading.Lock()  # serializes every use of the socket (and _reader, _io_reads)
        self._reader: int | None = None  # thread id of the caller reading the socket, if any
        self._io_reads = False  # the I/O thread's poll includes the socket's FD
        self._uses = 0  # sends on the socket so far (the reader skips a last drain when nobody else used it)
        self._drained_at = 0  # _uses when a drain last found the socket empty (its FD armed)
        self._outbox: queue.SimpleQueue[Call | list] = queue.SimpleQueue()  # calls that could not go now; CANCELs
        self._wake_r, self._wake_w = _pipe()  # wakes the I/O thread
        self._lead_r, self._lead_w = _pipe()  # wakes the reading caller
        self._closed = threading.Event()
        self._ctx = zmq.Context()
        self._sock, self._monitor = make_router(self._ctx, self.address, self.security)
        self._check_until = 0.0  # after a disconnect: check the brokers until then (while one may be gone)
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
        return self._query(What.AGENTS, timeout)

    def models(self, timeout: float | None = None) -> dict[str, dict]:
        """Model name -> {"versions": [...], "agents": [agent ids]} for every model a live agent serves."""
        return self._query(What.MODELS, timeout)

    def model_metadata(self, name: str, version: int | None = None, timeout: float | None = None) -> dict:
        """{name, platform, inputs, outputs, version, versions, ready} of a model (newest version by default).

        Raises ModelNotFoundError for a model (or version) no agent has ever announced."""
        return self._query(What.MODEL, timeout, name=name, version=version)

    def stats(self, timeout: float | None = None) -> dict:
        """The broker's counters: requests, redispatched, timeouts, agents_lost, and agents, in_flight, queued now."""
        return self._query(What.STATS, timeout)

    def statistics(self, name: str | None = None, version: str | None = None, timeout: float | None = None) -> dict:
        """Triton's per-model statistics as each live agent last reported them (heartbeat), plus the broker's
        counters: {"agents": {agent id: {model: {version: entry}}}, "broker": {..., "queue_depth": {model: n}}}.
        An agent that left is not in it (its counts leave the sums). ModelNotFoundError for an unknown model."""
        return self._query(What.STATISTICS, timeout, name=name, version=version)

    def brokers(self) -> list[dict]:
        """What this client knows of each broker that said hello: [{name, incarnation, ready, live, outstanding}]."""
        with self._lock:
            return self.core.describe_brokers()

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
        """Send `call` from this thread (to its broker; a call waiting for a broker is sent when one says hello).
        With lead=True, become the reader if nobody reads: True if so. A call that cannot go at once (no room, a
        refused key) goes to the I/O thread, which waits for room or fails it; so does a submit() that finds the
        socket busy (queueing on the lock behind the I/O thread's drain cost more throughput than the hand-over)."""
        if self._closed.is_set():
            with self._lock:
                self.core.cancel(call)
            raise ClusterError("client is closed")
        refused = self.core.refused
        if refused is not None:
            with self._lock:
                self.core.cancel(call)
            resolve(call.future, refused)
            return False
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
            sent = self._put_locked(call, done)
            self._uses += 1
            if self._reader is None:
                if sent and lead:
                    self._reader = threading.get_ident()
                    leading = True
                done += self._drain_locked()
                wake = not leading and not self._io_reads  # the I/O thread must read (or send) for this call
            else:
                poke = self._readable_locked()
        finally:
            self._sock_lock.release()
        resolve_all(done)
        if not sent:
            self._outbox.put(call)
            wake = True
        if wake:
            _poke(self._wake_w)
        if poke:
            _poke(self._lead_w)
        return leading

    def _put_locked(self, call: Call, done: list) -> bool:
        """Send `call` to its broker unless it went already (the caller holds _sock_lock); False if there is no room
        (zmq.Again: the caller hands it to the I/O thread). A broker found gone (EHOSTUNREACH) is lost: this call
        and every other outstanding there go to another broker (`done` gets those out of attempts)."""
        while call.broker is not None and not call.sent and self.core.calls.get(call.request_id) is call:
            try:
                send_frames(self._sock, call.wire())
                call.sent = True
            except zmq.Again:
                return False
            except zmq.ZMQError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                self._lost_locked(call.broker, done)
        return True

    def _lost_locked(self, broker: bytes, done: list) -> None:
        """A send found `broker` gone (the caller holds _sock_lock): what was outstanding there goes elsewhere."""
        with self._lock:
            failed = self.core.broker_lost(broker)
        done.extend((c.future, error) for c, error in failed)
        self._flush_locked(done)

    def _flush_locked(self, done: list) -> None:
        """Send the calls the core says must go now (lost elsewhere, or waiting for a broker); one without room goes
        to the I/O thread."""
        while self.core.resend:
            with self._lock:
                calls = self.core.take_resend()
            for call in calls:
                if not self._put_locked(call, done):
                    self._outbox.put(call)
                    _poke(self._wake_w)

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
                    resolve_all((c.future, error) for c, error in expired)
                    break
                signalled = False
                for fd, _ in poller.poll(min(CLIENT_WAKE_INTERVAL, remaining) * 1000 + 1):
                    if fd == self._fd:
                        signalled = True
                    else:
                        _clear(self._lead_r)
                with self._sock_lock:
                    done = self._drain_locked(signalled)
                resolve_all(done)
        finally:
            with self._sock_lock:
                self._reader = None
                # Anyone who used the socket since our last drain may have taken the FD's signal for an answer
                # (they poked us, but we are leaving): drain, so that the FD signals the next reader again.
                done = self._drain_locked() if self._uses != self._drained_at else []
                with self._lock:
                    waiting = bool(self.core.calls)
                wake = waiting and not self._io_reads
            resolve_all(done)
            if wake:
                _poke(self._wake_w)

    def _readable_locked(self) -> bool:
        """An answer waits (the caller holds _sock_lock): also processes the socket's commands, which re-arms its FD."""
        return self._sock is not None and has_message(self._sock)

    def _drain_locked(self, signalled: bool = False) -> list:
        """Receive every answer waiting (the caller holds _sock_lock), up to CLIENT_DRAIN_LIMIT: (future, outcome)
        pairs to resolve once the lock is released. Ends on ZMQ_EVENTS showing nothing more, which re-arms the FD;
        at the limit, the reader is poked instead. `signalled`: the FD said so, so try a receive first."""
        out = []
        sock = self._sock
        if sock is None:
            return out
        for _ in range(CLIENT_DRAIN_LIMIT):
            if not signalled and not has_message(sock):
                self._drained_at = self._uses
                return out
            signalled = False
            try:
                frames = recv_frames(sock, 3)  # name, preamble, header as bytes; tensors zero-copy
            except zmq.Again:
                self._drained_at = self._uses
                return out
            with self._lock:
                for message in self.core.messages(frames):
                    call, outcome = self.core.on_message(message)
                    if call is not None:
                        out.append((call.future, outcome))
                    elif outcome:  # a hello: calls out of attempts
                        out.extend((c.future, error) for c, error in outcome)
            if self.core.resend:  # a hello: calls that waited for a broker, or were lost at its old incarnation
                self._flush_locked(out)
        # More may wait, and the FD will not say so: whoever reads must look again without waiting for it.
        _poke(self._lead_w if self._reader is not None else self._wake_w)
        return out

    def _after_use_locked(self) -> tuple[list, bool]:
        """After the I/O thread used the socket (holding _sock_lock): what to resolve; whether to poke the reader."""
        if self._reader is None:
            return self._drain_locked(), False
        return [], self._readable_locked()

    def _on_monitor(self, monitor) -> int | None:
        """Handle one monitor event (a failed handshake fails the waiting calls; a disconnect starts checking the
        brokers); returns the event (None if there was none: _send_one may have taken it already)."""
        try:
            message = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return None
        event = message["event"]
        endpoint = message.get("endpoint", b"").decode(errors="replace")
        with self._lock:
            self.core.on_connection(event, endpoint)
            refused = self.core.on_handshake(event) if event != zmq.EVENT_DISCONNECTED else []
        peer = self.core.peer_for(endpoint)  # (may ask the resolver: not under the lock)
        self._fail(refused)
        if event == zmq.EVENT_DISCONNECTED:
            if peer is not None:  # that connection's broker is gone: what was outstanding there goes elsewhere
                done: list = []
                self._use(lambda sock: self._lost_locked(peer, done))
                if done:
                    resolve_all(done)
                    _poke(self._lead_w)
            self._check_until = time.monotonic() + CHECK_WINDOW
            self._check()
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and peer is not None:
            self._probe([peer])  # a reconnection: the broker says hello (PROBE_ROUTER probes only the first)
        return event

    def _check(self) -> None:
        """A connection dropped: probe every live broker (an empty frame: it answers hello); one a send finds gone
        (EHOSTUNREACH) is lost. ZMQ_EVENTS first: the socket takes in its pending commands, a closed pipe's among
        them. libzmq may still report the disconnect up to ~1 ms before the ROUTER forgets the peer (sends meanwhile
        are accepted and lost), so the I/O thread checks again every CHECK_INTERVAL while fewer connections are up
        than brokers are live, and a lost broker's calls are all sent again, not only those a send failed for."""
        done: list = []

        def probe(sock) -> None:
            sock.getsockopt(_EVENTS)
            for broker in list(self.core.live):
                try:
                    sock.send_multipart([broker.name, b""], zmq.NOBLOCK)
                except zmq.Again:
                    pass
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EHOSTUNREACH:
                        self._lost_locked(broker.name, done)
            if not self.core.suspect():
                self._check_until = 0.0

        self._use(probe)
        if done:
            resolve_all(done)
            _poke(self._lead_w)

    def _probe(self, brokers: list[bytes]) -> None:
        """Ask these brokers for a hello again (best effort: one gone is found by the checks)."""

        def probe(sock) -> None:
            for name in brokers:
                try:
                    sock.send_multipart([name, b""], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

        self._use(probe)

    def _fail(self, failed: list) -> None:
        """Resolve calls the I/O thread gave up on; the reading caller may be one of them: wake it."""
        if failed:
            resolve_all((call.future, error) for call, error in failed)
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
        resolve_all(done)
        if poke:
            _poke(self._lead_w)
        return True

    def _send_one(self, monitor, call: Call | list) -> None:
        """Send a call the caller could not (no room at its broker then); fail it at once if the broker refused our
        key. While a send cannot go, watch the monitor (a refused handshake fails the call) and whether the client
        is closing, and try again. The socket lock is not held while waiting."""
        if isinstance(call, list):  # a CANCEL: best effort, nobody waits for it

            def cancel(sock) -> None:
                try:
                    sock.send_multipart(call, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

            self._use(cancel)
            return
        sent: list = []
        done: list = []

        def send(sock) -> None:
            if self._put_locked(call, done):
                sent.append(True)

        while self.core.refused is None and not self._closed.is_set() and not call.future.done():
            if not self._use(send):
                break
            resolve_all(done)
            done.clear()
            if sent:
                return
            if monitor.poll(100):
                self._on_monitor(monitor)
        with self._lock:
            self.core.cancel(call)
        self._fail([(call, self.core.refused or ClusterError("client closed", call.model))])

    def _io_loop(self) -> None:
        monitor = self._monitor
        pollers = (zmq.Poller(), zmq.Poller())  # without and with the socket's FD
        for poller in pollers:
            poller.register(monitor, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
        pollers[1].register(self._fd, zmq.POLLIN)
        signalled = False  # the last poll saw the socket's FD
        next_expiry = time.monotonic() + CLIENT_WAKE_INTERVAL
        try:
            while not self._closed.is_set():
                with self._sock_lock:
                    with self._lock:
                        waiting = bool(self.core.calls) or self.core.wants_news()
                    reading = self._io_reads = waiting and self._reader is None
                    done = self._drain_locked(signalled) if reading else []
                resolve_all(done)
                wake_at = next_expiry
                if self._check_until:
                    wake_at = min(wake_at, time.monotonic() + CHECK_INTERVAL)
                wait_ms = max(0, int((wake_at - time.monotonic()) * 1000) + 1)
                ready = dict(pollers[reading].poll(wait_ms))
                signalled = self._fd in ready
                if self._wake_r.fileno() in ready:
                    _clear(self._wake_r)
                while not self._outbox.empty():  # the only consumer: not empty means get() will not block
                    self._send_one(monitor, self._outbox.get())
                if monitor in ready:
                    self._on_monitor(monitor)
                now = time.monotonic()
                if self._check_until:
                    if now < self._check_until:
                        self._check()
                    else:
                        self._check_until = 0.0
                if now >= next_expiry:  # every CLIENT_WAKE_INTERVAL, however busy
                    next_expiry = now + CLIENT_WAKE_INTERVAL
                    with self._lock:
                        expired = self.core.expired(now)
                        unready = self.core.unready_due(now)
                    self._fail(expired)
                    if unready:
                        self._probe(unready)
        finally:
            with self._sock_lock:
                with self._lock:
                    waiting = self.core.fail_all()
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
