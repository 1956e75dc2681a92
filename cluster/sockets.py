"""One socket factory, so every socket on the bus gets the same safety options (the vLLM `make_zmq_socket` idea).

What it sets and why:
- ROUTER_MANDATORY on ROUTERs: a ROUTER otherwise drops messages to unknown or departed peers without a word.
- ROUTER_HANDOVER where peers reconnect with a fixed identity (agents): otherwise the new connection is refused.
  Agents' identities are per process and hold a secret token (protocol.agent_identity), so a handover only gives a
  reconnecting agent its own connection back; a second process with the same agent id (or one that copied its public
  id and instance) has another identity and is refused by the broker.
- MAXMSGSIZE: a peer that sends a larger frame is disconnected before we spend memory on it.
- Explicit high-water marks (never 0 = unbounded) and a short LINGER, so closing never hangs.
- TCP keepalive, and reconnect attempts from a quarter of `link_retry_max` doubling to `link_retry_max` (1 s),
  jittered (ours and ZeroMQ's), so that a restarted broker or manager gets every peer back within about a second,
  whatever the outage lasted, without every agent arriving at the same instant.
- CURVE, when the process runs with a key (`curve=`): `CurveServer` on the sockets that serve (the broker's two
  ROUTERs, the manager's three sockets), with a ZAP domain that says which roles may connect there (cluster/auth.py
  answers the ZAP requests); `CurveClient` on every socket that connects. Without it, the socket runs in the clear.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from cluster.config import LINGER_MS, SOCKET_HWM, Timings, limits


@dataclass(frozen=True)
class CurveServer:
    """CURVE server options: our key pair (z85) and the ZAP domain the authenticator checks connecting keys against."""

    public: str
    secret: str
    domain: str

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret.encode())
        sock.setsockopt(zmq.ZAP_DOMAIN, self.domain.encode())


@dataclass(frozen=True)
class CurveClient:
    """CURVE client options: our key pair and the public key of the server we connect to (z85)."""

    public: str
    secret: str
    server_public: str

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret.encode())


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: str | list[str] | None = None,
    identity: bytes | None = None,
    max_bytes: int | None = None,
    hwm: int = SOCKET_HWM,
    sndhwm: int | None = None,
    handover: bool = False,
    subscribe: bytes | None = None,
    timings: Timings | None = None,
    linger: int = LINGER_MS,
    curve: CurveServer | CurveClient | None = None,
    heartbeat: tuple[float, float] | None = None,
    before_connect: Callable[[zmq.Socket], object] | None = None,
) -> zmq.Socket:
    """A configured socket, bound or connected. Exactly one of bind/connect (connect: one address or several).
    `heartbeat` (interval, timeout in
    seconds): ZMTP pings, so a connection whose peer went silent is closed within `timeout`. `before_connect(sock)`
    runs just before the bind or connect (e.g. to attach a socket monitor that must see the first handshake).
    `sndhwm`: a send high-water mark other than `hwm` (the broker's clients ROUTER: a few replies per client)."""
    if (bind is None) == (connect is None):
        raise ValueError("give exactly one of bind or connect")
    timings = timings or Timings()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger)
    sock.setsockopt(zmq.SNDHWM, hwm if sndhwm is None else sndhwm)  # per peer pipe, in messages
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, limits().max_message_bytes if max_bytes is None else max_bytes)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    # Retrying a peer that is down (connecting sockets): short and capped (Timings.link_retry_max), not the 32 s of
    # the agents' READY backoff: with ZeroMQ's own doubling up to 32 s, agents came back 5-15 s after a 10-20 s
    # outage of the broker or the manager, later the longer the outage.
    max_ms = max(10, int(timings.link_retry_max * 1000))
    initial_ms = max(10, min(int(timings.reconnect_initial * 1000), max_ms // 4))
    sock.setsockopt(zmq.RECONNECT_IVL, max(10, int(initial_ms * random.uniform(0.8, 1.2))))
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(initial_ms, max_ms))
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if curve is not None:
        curve.apply(sock)
    if heartbeat is not None:
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat[0] * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(heartbeat[1] * 1000)))
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if handover:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe if subscribe is not None else b"")
    if before_connect is not None:
        before_connect(sock)
    if bind is not None:
        sock.bind(bind)
    else:
        for address in [connect] if isinstance(connect, str) else connect:
            sock.connect(address)
    return sock


def bound_address(sock: zmq.Socket) -> str:
    """The address a bound socket really listens on: binding tcp://127.0.0.1:0 (or :*) lets the OS pick the port,
    and this says which one it picked (ZMQ_LAST_ENDPOINT)."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


# The hot path's sends and receives, without pyzmq's per-call Python layer (send_multipart's type checks and enum
# flag arithmetic, the sugar Socket.send wrapper, getsockopt's enum lookup): measured at ~12 us instead of ~25 us
# for a 3-frame message sent and received on this machine. The backend's own send/recv do the same ZeroMQ calls.
_raw_send, _raw_recv, _raw_get = zmq.backend.Socket.send, zmq.backend.Socket.recv, zmq.backend.Socket.get
NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def send_frames(sock: zmq.Socket, frames: list, flags: int = NOBLOCK) -> None:
    """send_multipart(frames, flags, copy=False) for the hot path: frames under the socket's copy_threshold are
    copied (cheaper than a zmq.Frame), larger ones (tensors) and received zmq.Frames go zero-copy."""
    more = flags | _SNDMORE
    last = len(frames) - 1
    for i in range(last):
        _raw_send(sock, frames[i], more, copy=False)
    _raw_send(sock, frames[last], flags, copy=False)


def recv_frames(sock: zmq.Socket, copied: int = 0, flags: int = NOBLOCK) -> list:
    """recv_multipart(flags): the first `copied` frames as bytes (identity, preamble, header: small, and bytes cost
    less than a zmq.Frame), the rest as zmq.Frame (tensors: zero-copy, however big). zmq.Again if none waits.
    Each frame is received as a zmq.Frame, whose `more` says if another follows: a getsockopt(RCVMORE) per frame
    costs ~1.3 us in pyzmq 27 (an enum lookup), more than the Frame (issue 23: ~3 us saved on a 3-frame message)."""
    frame = _raw_recv(sock, flags, copy=False)
    parts = [frame.bytes if copied > 0 else frame]
    while frame.more:
        frame = _raw_recv(sock, flags, copy=False)
        parts.append(frame.bytes if len(parts) < copied else frame)
    return parts


def has_message(sock: zmq.Socket) -> bool:
    """A message waits on the socket (ZMQ_EVENTS): cheaper than a recv that fails with zmq.Again."""
    return bool(_raw_get(sock, _EVENTS) & _POLLIN)


def handle_each(messages: list, handle, log: logging.Logger) -> None:
    """The messages of a BATCH, each to `handle` as if it came alone: as `drain` does for messages, whatever one
    raises is logged and that message dropped, never the ones after it."""
    for frames in messages:
        try:
            handle(frames)
        except Exception:
            log.exception("error handling a message of a BATCH; dropped")


def drain(sock: zmq.Socket, handle, limit: int = 256, log: logging.Logger | None = None, copied: int = 0) -> int:
    """Hand up to `limit` waiting messages to `handle`, then return so the caller can serve its other sockets;
    returns how many. A handler that returns a number handled that many (a BATCH's messages): they count towards
    the limit, so a pass stays as short with BATCHes as without. `copied`: see recv_frames. One bad message must
    never take a component down: whatever `handle` raises is logged and the message dropped."""
    n = 0
    while n < limit:
        if n and not has_message(sock):
            return n
        try:
            frames = recv_frames(sock, copied)
        except zmq.Again:
            return n
        try:
            n += handle(frames) or 1
        except Exception:
            n += 1
            (log or logging.getLogger("cluster")).exception("error handling a message; dropped")
    return n
