"""Replies for clients that do not read them, without any I/O: a byte budget per client (issue 11, point 3).

ZeroMQ queues what the broker sends a client in that client's pipe, up to the clients ROUTER's SNDHWM messages
(config.CLIENT_SNDHWM); a client that stops reading fills it, and then a send gives EAGAIN (ROUTER_MANDATORY). From then
on the broker holds that client's replies here, in order, up to `budget` bytes, and sends them as its pipe drains
(`flush`, every turn of the loop). A full pipe alone does not mean a client is not reading: on a loaded host the client
(or the broker's own ZeroMQ I/O thread) can fall behind a burst of replies for a moment. A client is `stalled` when its
pipe has taken none of its held replies for `grace` seconds (or it passed its budget): only then are its new requests
refused (OVERLOADED). A reply that would pass the budget is dropped, and the broker cancels the client's other requests:
it is not reading, and each would only cost an agent's work and more memory. A client found gone (EHOSTUNREACH) is
forgotten, with everything held for it. So the broker's memory for one client is at most CLIENT_SNDHWM messages in the
pipe (a reply, or a BATCH of at most CLIENT_BATCH_BYTES) plus `budget` bytes here, whatever the client does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import zmq


def frames_size(frames: list) -> int:
    """Bytes of a message (bytes, memoryviews or zmq.Frames)."""
    return sum(len(getattr(f, "buffer", f)) for f in frames)


class ClientOutbox:
    def __init__(self, budget: int, grace: float = 1.0) -> None:
        self.budget = budget
        self.grace = grace
        self.held: dict[bytes, deque[list]] = {}  # client -> replies waiting for room in its pipe, in order
        self.held_bytes: dict[bytes, int] = {}
        self.progress_at: dict[bytes, float] = {}  # client -> when it was first held, or its pipe last took a reply
        self.over_budget: set[bytes] = set()  # congested clients that had a reply dropped (their requests cancelled)

    def congested(self, client: bytes) -> bool:
        """Replies are held for it: a new one must queue behind them (order is kept)."""
        return client in self.held

    def stalled(self, client: bytes, now: float) -> bool:
        """It is not reading: its pipe took none of its held replies for `grace` s, or it passed its budget."""
        if client not in self.held:
            return False
        return client in self.over_budget or now - self.progress_at.get(client, now) >= self.grace

    @property
    def total_bytes(self) -> int:
        return sum(self.held_bytes.values())

    def hold(self, client: bytes, frames: list, now: float) -> bool:
        """Keep a reply its pipe had no room for; False (dropped) if it would pass the client's budget."""
        self.progress_at.setdefault(client, now)
        size = frames_size(frames)
        if self.held_bytes.get(client, 0) + size > self.budget:
            self.over_budget.add(client)
            self.held.setdefault(client, deque())  # still congested, even with nothing held
            self.held_bytes.setdefault(client, 0)
            return False
        self.held.setdefault(client, deque()).append(frames)
        self.held_bytes[client] = self.held_bytes.get(client, 0) + size
        return True

    def flush(self, send: Callable[[list], None], now: float) -> tuple[list[bytes], list[bytes]]:
        """Send what each congested client's pipe takes now (`send` raises zmq.Again when it is full, another
        ZMQError when the client is gone). Returns (clients whose backlog is all sent, clients found gone)."""
        cleared, gone = [], []
        for client, queue in list(self.held.items()):
            try:
                while queue:
                    send(queue[0])
                    self.held_bytes[client] -= frames_size(queue.popleft())
                    self.progress_at[client] = now
            except zmq.Again:
                continue
            except zmq.ZMQError:
                gone.append(client)
                self.forget(client)
                continue
            self.forget(client)
            cleared.append(client)
        return cleared, gone

    def forget(self, client: bytes) -> None:
        self.held.pop(client, None)
        self.held_bytes.pop(client, None)
        self.progress_at.pop(client, None)
        self.over_budget.discard(client)
