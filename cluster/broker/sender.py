"""The broker's sends, batched per peer (issue 23, item 2), without any socket: `PeerSends`.

A busy broker makes many messages for the same peer in one pass of its loop (the drain of one socket: up to
DRAIN_BATCH messages): requests for an agent as answers free its slots, replies for a client with many calls out.
Sent one by one, each costs a send syscall and a poll wake-up at the peer. Collected here instead, they go at the end
of the pass as one message per peer: a lone one as it is, two or more as one BATCH (protocol.batch), in order. Nothing
waits for more to come: a message goes at the end of the pass that made it (at low load, as alone as before); more
than MAX_BATCH for one peer go as several BATCHes. Outside a pass (`collecting` False: ticks, events) a message goes
at once.
A client's BATCH holds at most `client_bytes` (CLIENT_BATCH_BYTES; a larger reply goes alone): its pipe counts
messages (CLIENT_SNDHWM), and the broker's memory per client that does not read must stay bounded (outbox.py).

Failures are the caller's, as for single messages: `send_agent(peer, messages)` raises zmq.ZMQError when the agent
cannot take them (gone: EHOSTUNREACH, or its queue full); then `agent_failed(unsent, error)` gets every message of
that batch and of the batches after it for that agent, in order (the Dispatcher's send_failed takes them back).
`send_client(peer, messages)` does its own (a full pipe: the outbox holds them; a gone client: forgotten).
"""

from __future__ import annotations

from collections.abc import Callable

import zmq

from cluster.broker.outbox import frames_size
from cluster.config import CLIENT_BATCH_BYTES
from cluster.protocol import MAX_BATCH, batch

SendMany = Callable[[bytes, list], None]  # (peer, [message frames, identity first]) -> sends, or raises


def outgoing(peer: bytes, messages: list[list]) -> list:
    """The one message that carries `messages` (each [peer, preamble, ...]) to `peer`: a lone one as it is, else a
    BATCH of them, the identity in front."""
    if len(messages) == 1:
        return messages[0]
    return [peer, *batch([m[1:] for m in messages])]


class PeerSends:
    """Messages waiting for the end of the pass, per (to_agent, peer), in the order peers first got one."""

    def __init__(
        self,
        send_agent: SendMany,
        send_client: SendMany,
        agent_failed: Callable[[list[list], zmq.ZMQError], None],
        max_batch: int = MAX_BATCH,
        client_bytes: int = CLIENT_BATCH_BYTES,
    ) -> None:
        self.send_agent, self.send_client, self.agent_failed = send_agent, send_client, agent_failed
        self.max_batch, self.client_bytes = max_batch, client_bytes
        self.queues: dict[tuple[bool, bytes], list[list]] = {}
        self.collecting = False  # in a pass: hold until flush(); else each add goes at once
        self._flushing = False
        # The broker's `stats` query shows these: BATCHes sent (and, counted by the broker, received from agents)
        self.stats = {"batches_to_agents": 0, "batches_to_clients": 0, "batched_messages": 0, "batches_from_agents": 0}

    def send(self, outbox: list) -> None:
        """Messages (to_agent, frames; frames[0] the peer's identity) to send, in order: queued for the end of the
        pass, or (outside a pass) sent now, still one message per peer."""
        queues = self.queues
        for to_agent, frames in outbox:
            key = (to_agent, frames[0])
            queue = queues.get(key)
            if queue is None:
                queues[key] = [frames]
            else:
                queue.append(frames)
        if not self.collecting:
            self.flush()

    def flush(self) -> None:
        """Send what waits, peer by peer (oldest first). What a failure's handler adds goes out in the same flush."""
        if self._flushing:
            return  # the flush below us (a failure handler that sent more) takes it
        self._flushing = True
        try:
            queues = self.queues
            while queues:
                key = next(iter(queues))
                self._send(key, queues.pop(key))
        finally:
            self._flushing = False

    def flush_peer(self, to_agent: bool, peer: bytes) -> None:
        """Send what waits for one peer now: a message that goes around PeerSends (a client's hello) must not pass
        it."""
        messages = self.queues.pop((to_agent, peer), None)
        if messages:
            self._send((to_agent, peer), messages)

    def _send(self, key: tuple[bool, bytes], messages: list[list]) -> None:
        to_agent, peer = key
        if not to_agent:
            for group in self._by_size(messages) if len(messages) > 1 else (messages,):
                if len(group) > 1:
                    self.stats["batches_to_clients"] += 1
                    self.stats["batched_messages"] += len(group)
                self.send_client(peer, group)
            return
        for at in range(0, len(messages), self.max_batch):
            group = messages[at : at + self.max_batch]
            if len(group) > 1:
                self.stats["batches_to_agents"] += 1
                self.stats["batched_messages"] += len(group)
            try:
                self.send_agent(peer, group)
            except zmq.ZMQError as exc:  # this group, the groups after it, and any queued for it since: all back
                rest = self.queues.pop(key, None)
                self.agent_failed(messages[at:] + rest if rest else messages[at:], exc)
                return

    def _by_size(self, messages: list[list]) -> list[list[list]]:
        """A client's messages in runs of at most `client_bytes` and `max_batch` each (a larger one alone), in order."""
        groups, group, size = [], [], 0
        for frames in messages:
            n = frames_size(frames)
            if group and (size + n > self.client_bytes or len(group) >= self.max_batch):
                groups.append(group)
                group, size = [], 0
            group.append(frames)
            size += n
        groups.append(group)
        return groups
