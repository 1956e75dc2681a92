"""One socket factory, so every socket on the bus gets the same safety options (the vLLM `make_zmq_socket` idea).

What it sets and why:
- ROUTER_MANDATORY on ROUTERs: a ROUTER otherwise drops messages to unknown or departed peers without a word.
- ROUTER_HANDOVER where peers reconnect with a fixed identity (agents): otherwise the new connection is refused.
- MAXMSGSIZE: a peer that sends a larger frame is disconnected before we spend memory on it.
- Explicit high-water marks (never 0 = unbounded) and a short LINGER, so closing never hangs.
- TCP keepalive, and reconnect backoff from `reconnect_initial` doubling to `reconnect_max`, jittered so that a
  restarted broker is not stampeded by every agent at the same instant.
"""

from __future__ import annotations

import logging
import random

import zmq

from cluster.config import LINGER_MS, MAX_MESSAGE_BYTES, SOCKET_HWM, Timings


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    identity: bytes | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
    hwm: int = SOCKET_HWM,
    handover: bool = False,
    subscribe: bytes | None = None,
    timings: Timings | None = None,
    linger: int = LINGER_MS,
) -> zmq.Socket:
    """A configured socket, bound or connected. Exactly one of bind/connect."""
    if (bind is None) == (connect is None):
        raise ValueError("give exactly one of bind or connect")
    timings = timings or Timings()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    initial_ms = int(timings.reconnect_initial * 1000)
    sock.setsockopt(zmq.RECONNECT_IVL, max(10, int(initial_ms * random.uniform(0.8, 1.2))))
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(initial_ms, int(timings.reconnect_max * 1000)))
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if handover:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe if subscribe is not None else b"")
    if bind is not None:
        sock.bind(bind)
    else:
        sock.connect(connect)
    return sock


def bound_address(sock: zmq.Socket) -> str:
    """The address a bound socket really listens on: binding tcp://127.0.0.1:0 (or :*) lets the OS pick the port,
    and this says which one it picked (ZMQ_LAST_ENDPOINT)."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def drain(sock: zmq.Socket, handle, limit: int = 256, log: logging.Logger | None = None) -> None:
    """Hand up to `limit` waiting messages to `handle`, then return so the caller can serve its other sockets.
    One bad message must never take a component down: whatever `handle` raises is logged and the message dropped."""
    for _ in range(limit):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        try:
            handle(frames)
        except Exception:
            (log or logging.getLogger("cluster")).exception("error handling a message; dropped")
