"""The broker's sends to clients (a mixin of `Broker`, which owns the sockets): a client's replies into its ZeroMQ
pipe, else held in the ClientOutbox within its byte budget (outbox.py says why), and a client found gone forgotten."""

from __future__ import annotations

import errno
import logging
import time

import zmq

from cluster.broker.sender import outgoing
from cluster.logs import BadInputLog
from cluster.sockets import send_frames

log = logging.getLogger("cluster.broker")
bad_input = BadInputLog(log)  # a client that does not read is told about at most at this log's rate

TRIM_AFTER_S = (0.5, 2.0)  # after a client that held memory leaves: give freed memory back to the OS (malloc_trim)


class ClientReplies:
    """Needs `clients` (the ROUTER), `outbox`, `dispatcher`, `deliver` and `_trims` of the Broker."""

    def send_to_client(self, client: bytes, messages: list[list]) -> None:
        """Replies for a client, as one message: into its pipe if it has room and nothing is held for it, else each
        held in the outbox, in order, within its byte budget (`hold_reply`: past it, its requests are cancelled)."""
        if not self.outbox.congested(client):
            try:
                send_frames(self.clients, outgoing(client, messages))
                return
            except zmq.Again:
                pass  # its pipe is full (CLIENT_SNDHWM messages it has not read): hold them
            except zmq.ZMQError as exc:
                log.debug("reply to client %s dropped: %s", client.hex(), exc)
                if exc.errno == errno.EHOSTUNREACH:
                    self.client_gone(client)
                return
        for frames in messages:
            self.hold_reply(client, frames)

    def hold_reply(self, client: bytes, frames: list) -> None:
        was_over = client in self.outbox.over_budget
        if self.outbox.hold(client, frames, time.monotonic()) or was_over:
            return
        held = self.outbox.held_bytes.get(client, 0)
        bad_input.warning(
            "client %s does not read its replies (%.1f MiB held for it, its budget): dropping its replies and "
            "cancelling its requests",
            client.hex(),
            held / 2**20,
        )
        self.dispatcher.stats["client_replies_dropped"] += 1
        self.deliver(self.dispatcher.drop_client(client, time.monotonic()))

    def flush_outbox(self) -> None:
        """Send held replies as clients' pipes take them; forget clients found gone."""
        _, gone = self.outbox.flush(lambda frames: send_frames(self.clients, frames), time.monotonic())
        for client in gone:
            self.client_gone(client)

    def client_gone(self, client: bytes) -> None:
        """A send found the client gone (EHOSTUNREACH): forget what was held for it, cancel what it still has here,
        and give the memory back to the OS soon (libzmq frees its pipe as the connection closes)."""
        held = self.outbox.held_bytes.get(client, 0)
        self.outbox.forget(client)
        self.deliver(self.dispatcher.drop_client(client, time.monotonic()))
        if held or not self._trims:
            now = time.monotonic()
            self._trims = [now + delay for delay in TRIM_AFTER_S]
