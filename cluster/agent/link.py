"""The agent's link to the broker: its DEALER and the socket monitor on it, READY and the broker's side of the beats.

A socket monitor on the broker DEALER says when the connection is up: READY goes the moment a connection (a first
one, or one after the broker restarted) completes its handshake, so a restarted broker has every agent back within
about `link_retry_max` (how often the socket tries a broker that is down) of listening, whatever the outage lasted.
While the connection is down the agent sends the broker nothing but answers (no heartbeats: they would pile up and
each make the new broker ask for READY again). If a connected broker goes silent for `liveness` intervals, the agent
sends READY again, backing off from `reconnect_initial` to `reconnect_max` with jitter; silent for two expiries, it
also opens a fresh connection, so a link the broker no longer reads (taken over, half-open) cannot keep it out for
good. An agent not connected to any broker (down, or a wrong address) says so in its log, backing off from one expiry
to AGENT_LINK_WARN_MAX_S.

If another live process already holds the agent's id, the broker answers READY with ERROR AGENT_ID_IN_USE: the agent
logs it as an error, stops beating to the manager, and tries again each interval for `duplicate_grace` seconds (a
restarted agent whose predecessor crashed gets in once the broker has dropped the predecessor); still refused then,
it exits with EXIT_AGENT_ID_IN_USE. With keys on, a key the broker refuses (revoked, or not on the allow-list) is
logged as such: the broker's ERROR UNAUTHENTICATED on a live link, or the CURVE handshake refused on a new one.

An answer goes only to the broker that asked (AnswerRoutes, over every link of the agent: one per broker): a route
starts with its broker's random incarnation, and the broker says its incarnation in its heartbeats. When a link drops
(the broker restarted, or the network), answers for it that finish meanwhile are held until the broker on the new
link is known (its first heartbeat or request), then sent if it is the same broker, dropped (with a log line) if not:
they would otherwise reach the new broker, answering requests it never gave.

Batches (issue 23): a BATCH from the broker is split, each message handled as if it came alone (`receive`). Answers
made in one pass of the agent's loop for one link wait in `out` and go at the end of the pass (`flush`) as one
message: a lone one as it is, two or more as one BATCH. What goes at once (READY, heartbeats, DISCONNECT) sends
what waits first, so the broker hears everything in the order it was made.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from cluster import protocol
from cluster.agent.recovery import EXIT_AGENT_ID_IN_USE
from cluster.clock import pardon
from cluster.config import AGENT_LINK_WARN_MAX_S, AGENT_REFUSED_LOG_S, Timings
from cluster.logs import BadInputLog
from cluster.protocol import BrokerBeat, Command, Disconnect, Error, ErrorCode, ProtocolError, message
from cluster.sockets import CurveClient, drain, handle_each, make_socket, send_frames

log = logging.getLogger("cluster.agent")
bad_input = BadInputLog(log)  # peers control these messages: never log them at their rate
stale = BadInputLog(log)  # answers dropped because the broker they were for is gone

# What the broker DEALER's monitor reports: a handshake that succeeded (with CURVE too: the connection is usable; it
# is the only event that means so) and a connection that dropped.
BROKER_LINK_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
REFUSED_KEY_CODES = frozenset({ErrorCode.UNAUTHENTICATED.value, ErrorCode.PERMISSION_DENIED.value})
INCARNATION = slice(protocol.PREAMBLE_BYTES, protocol.PREAMBLE_BYTES + protocol.INCARNATION_BYTES)  # of an answer
SEND, HOLD, STALE = "send", "hold", "stale"  # AnswerRoutes.admit's verdicts


class AnswerRoutes:
    """Sans-IO: which link each answer goes out on, for every link of the agent (one per broker). Each link's
    `incarnation` is its broker's (None: not known since the link dropped, or not yet), `was` the one it had before it
    dropped. An answer goes on the link whose broker its route names; one for the broker a dropped link had is held
    until that link's broker is known again (sent if it is the same, dropped if not); any other is stale (its broker
    is gone): never sent to another, and not held while some other link stays down."""

    def __init__(self) -> None:
        self.links: list = []
        self.by_incarnation: dict[bytes, object] = {}  # a broker's incarnation -> the link it is on now
        self.held: list[list] = []

    def add(self, link) -> None:
        link.incarnation = link.was = None
        self.links.append(link)

    def lost(self, link) -> None:
        """`link` dropped: the broker on its next connection is not known until it speaks."""
        if self.by_incarnation.get(link.incarnation) is link:
            del self.by_incarnation[link.incarnation]
        if link.incarnation is not None:
            link.was = link.incarnation
        link.incarnation = None

    def awaited(self) -> set[bytes]:
        """The brokers that dropped links had: each may be back on its link."""
        return {link.was for link in self.links if link.incarnation is None and link.was is not None}

    def admit(self, answer: list) -> tuple[str, object]:
        """(SEND, the link), (HOLD, None): kept here until `known`, or (STALE, None): to drop."""
        incarnation = answer[0][INCARNATION]
        link = self.by_incarnation.get(incarnation)
        if link is not None:
            return SEND, link
        if incarnation in self.awaited():
            self.held.append(answer)
            return HOLD, None
        return STALE, None

    def known(self, link, incarnation: bytes) -> tuple[list[list], list[list]]:
        """The broker on `link` is `incarnation`: the held answers to send on it (its own), and those to drop (held
        for a broker no link may get back now)."""
        if incarnation == link.incarnation:
            return [], []
        self.lost(link)
        link.incarnation = incarnation
        self.by_incarnation[incarnation] = link
        if not self.held:
            return [], []
        awaited = self.awaited()
        mine = [a for a in self.held if a[0][INCARNATION] == incarnation]
        drop = [a for a in self.held if a[0][INCARNATION] != incarnation and a[0][INCARNATION] not in awaited]
        self.held = [a for a in self.held if a[0][INCARNATION] in awaited]
        return mine, drop


class BrokerLink:
    """The DEALER to one broker (`sock`) and what the agent knows of the link: connected or not, which broker, when
    it was last heard, whether it refuses us. `ready(link)` gives the READY message (the agent's status, with this
    link's share of its capacity); `routes` is the AnswerRoutes of all the agent's links (links.BrokerLinks); `open`
    runs in the I/O thread, which owns the sockets and registers them in its two pollers through it."""

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        identity: bytes,
        agent_id: str,
        timings: Timings,
        ready: Callable[[BrokerLink], list],
        routes: AnswerRoutes,
    ) -> None:
        self.ctx, self.address, self.identity, self.agent_id, self.timings = ctx, address, identity, agent_id, timings
        self.ready = ready
        self.sock: zmq.Socket | None = None  # opened by open()
        self.monitor: zmq.Socket | None = None  # the socket monitor's PAIR, attached before connecting
        self.curve: CurveClient | None = None
        self._pollers: tuple[zmq.Poller, zmq.Poller] | None = None  # (the hot one: sock, the cold one: monitor)
        self.connected = False  # the monitor's view: a handshake succeeded and the link has not dropped since
        self.down_since: float | None = None  # lost since then (None: up, or never connected)
        self.link_since = time.monotonic()  # warn_unconnected counts from here
        self.warn_backoff = timings.expiry
        self.next_warn: float | None = None
        self.heard_at = self.link_since  # the broker's last message
        self.ready_backoff = timings.reconnect_initial
        self.next_ready = self.link_since + timings.expiry
        self.incarnation: bytes | None = None  # the broker on the link (AnswerRoutes keeps it)
        self.routes = routes
        routes.add(self)
        self.metadata_sent: set[tuple[str, int]] = set()  # (model, version) whose metadata this broker has
        self.on_message: Callable[[list], None] | None = None  # the agent's handler of this broker's messages
        self.out: list[list] = []  # answers made in this pass of the agent's loop, sent at its end (`flush`)
        self.beat = b""  # the header of the broker's latest heartbeat (parsed again only when it changes)
        self.key_refused_logged = -AGENT_REFUSED_LOG_S
        self.refused_since: float | None = None  # the broker refuses our id (AGENT_ID_IN_USE) since then
        self.silent = False  # connected, but not heard for an expiry (frozen, or a vanished machine): as of `check`
        self.duplicate_grace = timings.expiry + 2 * timings.heartbeat_interval

    # ---- the sockets ---------------------------------------------------------------------------------------------

    def open(self, curve: CurveClient | None, hot: zmq.Poller, cold: zmq.Poller) -> None:
        self.curve, self._pollers = curve, (hot, cold)
        self._connect()
        now = time.monotonic()
        self.heard_at, self.ready_backoff, self.next_ready = (
            now,
            self.timings.reconnect_initial,
            now + self.timings.expiry,
        )

    def _connect(self) -> None:
        """The DEALER to the broker, with its monitor (attached before connecting so that the first handshake is seen
        too): READY goes when the handshake succeeds (process_events)."""
        monitors = []
        self.sock = make_socket(
            self.ctx,
            zmq.DEALER,
            connect=self.address,
            identity=self.identity,
            timings=self.timings,
            curve=self.curve,
            before_connect=lambda s: monitors.append(s.get_monitor_socket(BROKER_LINK_EVENTS)),
        )
        self.monitor = monitors[0]
        self.connected, self.down_since, self.link_since = False, None, time.monotonic()
        hot, cold = self._pollers
        hot.register(self.sock, zmq.POLLIN)
        cold.register(self.monitor, zmq.POLLIN)

    def reconnect(self) -> None:
        """A fresh connection to the broker (same identity): the old one may be a link the broker no longer reads
        (handed over, or half-open after a network blip), where READY would wait forever."""
        self._lost()
        hot, cold = self._pollers
        hot.unregister(self.sock)
        cold.unregister(self.monitor)
        self.close(linger=0)
        self._connect()

    def goodbye(self) -> None:
        """DISCONNECT to the broker (stopping), if it can go at once (so do the answers still waiting)."""
        try:
            if self.out:
                out, self.out = self.out, []
                send_frames(self.sock, protocol.as_one(out), zmq.NOBLOCK)
            self.sock.send_multipart(message(Command.DISCONNECT, Disconnect("agent stopping").to_wire()), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def close(self, linger: int = 100) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=linger)

    # ---- what goes to the broker ---------------------------------------------------------------------------------

    def register(self) -> None:
        """READY to the broker."""
        self.flush()
        self.sock.send_multipart(self.ready(self))

    def answer(self, frames: list) -> None:
        """An answer for this broker ([preamble + route, header, ...]): sent at the end of the loop's pass."""
        out = self.out
        out.append(frames)
        if len(out) >= protocol.MAX_BATCH:
            self.flush()

    def flush(self) -> None:
        """The answers waiting, as one message (blocking, as every answer: the DEALER queues while the link is down)."""
        out = self.out
        if out:
            self.out = []
            send_frames(self.sock, protocol.as_one(out), 0)

    def send_beat(self, beat: list) -> bool:
        """The heartbeat to the broker, if connected (queued, it would reach the next broker as a beat from an unknown
        agent: READY goes on connect) and it can go at once (if not, check() registers later). True: sent."""
        if not self.connected:
            return False
        try:
            self.flush()
            self.sock.send_multipart(beat, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def broker_is(self, incarnation: bytes) -> None:
        """The broker on the link is `incarnation` (from its heartbeat or a request's route): answers held since
        the link dropped go to it if they are its own, and are dropped if they were another broker's."""
        send, drop = self.routes.known(self, incarnation)
        for frames in send:
            self.answer(frames)
        for frames in drop:
            self.drop_stale(frames)

    def drop_stale(self, frames: list) -> None:
        stale.warning(
            "agent %s: dropped the answer to request %s: the broker that sent it is no longer connected to this agent "
            "(it restarted); answers go only to the broker that asked",
            self.agent_id,
            frames[0][protocol.PREAMBLE_BYTES :].hex(),
        )

    # ---- what comes from the broker ------------------------------------------------------------------------------

    def receive(self, frames: list) -> int | None:
        """A message from the broker (what `drain` hands over), or each message of a BATCH, to the agent's handler;
        a malformed BATCH is dropped with a log line."""
        if not protocol.is_batch(frames[0]):
            return self.on_message(frames)
        try:
            messages = protocol.unbatch(frames)
        except ProtocolError as exc:
            self.heard(False)
            return bad_input.warning("agent %s: bad BATCH from the broker dropped: %s", self.agent_id, exc)
        for one in messages:  # preamble and header as bytes, as the socket gives them for a lone message
            one[0], one[1] = protocol.as_bytes(one[0]), protocol.as_bytes(one[1])
        handle_each(messages, self.on_message, log)
        return len(messages)  # (drain counts them towards its limit)

    def heard(self, registered: bool) -> None:
        """A message from the broker; `registered`: one only a broker that has us sends (a request, a heartbeat)."""
        self.heard_at = time.monotonic()
        self.ready_backoff = self.timings.reconnect_initial
        if registered:
            self.refused_since = None

    def broker_beat(self, header_frame: bytes) -> None:
        """A broker heartbeat with a header other than the last one: it names the broker's incarnation."""
        self.beat = header_frame
        try:
            incarnation = BrokerBeat.from_wire(protocol.unpack_header(header_frame)).incarnation()
        except ProtocolError:
            incarnation = b""
        if len(incarnation) == protocol.INCARNATION_BYTES:
            self.broker_is(incarnation)

    def broker_error(self, frames: list) -> bool:
        """The broker's ERROR to us (not about a request): AGENT_ID_IN_USE refuses our READY, another live process
        has our id. Logged as an error each time; True past the grace period: the agent should stop."""
        try:
            error = Error.from_wire(protocol.unpack_header(frames[1]) if len(frames) == 2 else {})
        except ProtocolError:
            error = Error.from_wire({})
        code = getattr(error.code, "value", error.code)  # a plain string, or None (from the wire: anything)
        text = error.message[:1000]
        if code in REFUSED_KEY_CODES:
            self.key_refused(f"({code})", text)
            return False
        if code != ErrorCode.AGENT_ID_IN_USE.value:
            bad_input.warning("agent %s: unexpected ERROR from the broker dropped", self.agent_id)
            return False
        now = time.monotonic()
        if self.refused_since is None:
            self.refused_since = now
        if now - self.refused_since >= self.duplicate_grace:
            log.error(
                "agent %s: the broker refused this agent for %.1f s: %s; exiting (status %d)",
                self.agent_id,
                now - self.refused_since,
                text,
                EXIT_AGENT_ID_IN_USE,
            )
            return True
        log.error(
            "agent %s: the broker refused this agent (AGENT_ID_IN_USE): %s; trying again for %.1f s more",
            self.agent_id,
            text,
            self.duplicate_grace - (now - self.refused_since),
        )
        return False

    def key_refused(self, how: str, why: str) -> None:
        """The broker refuses our key (keys on): an error in the log, at most every AGENT_REFUSED_LOG_S."""
        now = time.monotonic()
        if now - self.key_refused_logged < AGENT_REFUSED_LOG_S:
            return
        self.key_refused_logged = now
        log.error(
            "agent %s: the broker refuses this agent's key %s: %s. It gets no requests until an admin allows the key "
            "again (cluster keys add ... --role agent, and give it the new key file); still trying",
            self.agent_id,
            how,
            why,
        )

    # ---- the link's own state ------------------------------------------------------------------------------------

    def process_events(self) -> None:
        """The DEALER's monitor: on a handshake that succeeded (the first connection, or one after the broker
        restarted or the network came back), READY at once; on a drop, note it (no beats to the broker until the
        link is back, and no READY backoff: the socket itself tries again every `link_retry_max` at most)."""
        drain(self.monitor, self._event, 100, log, 2)

    def _event(self, frames: list) -> None:
        try:
            event = parse_monitor_message(frames)["event"]
        except (zmq.ZMQError, ValueError, IndexError):
            return
        now = time.monotonic()
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self.down_since is not None:
                log.info(
                    "agent %s: connected to the broker at %s again after %.1f s; registering",
                    self.agent_id,
                    self.address,
                    now - self.down_since,
                )
            self.connected, self.down_since = True, None
            self.heard_at = now  # give it an expiry to answer before check() says READY again
            self.ready_backoff = self.timings.reconnect_initial
            self.next_ready = now + self.timings.expiry
            self.register()
        elif event == zmq.EVENT_DISCONNECTED:
            self._lost()
            if self.connected:
                log.warning(
                    "agent %s: lost the connection to the broker at %s; registering again when it is back",
                    self.agent_id,
                    self.address,
                )
                self.connected, self.down_since = False, now
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.key_refused("at the handshake", "its key was revoked, or is not on the cluster's allow-list")

    def _lost(self) -> None:
        """The link to the broker dropped: answers finished from now on wait for the broker on the next one."""
        self.routes.lost(self)
        self.beat = b""

    def pardon(self, lost: float, now: float) -> None:
        """The agent itself did not run for `lost` seconds: the broker's silence meanwhile is not the broker's."""
        self.heard_at = pardon(self.heard_at, lost, now)

    def check(self, now: float) -> None:
        """Each beat: a connected broker silent too long gets READY again, backing off (with jitter) while it stays
        silent (and its share of the capacity goes to the other brokers: `silent`). A broker that is down is not
        asked: READY goes when the connection is back (process_events)."""
        self.silent = self.connected and now - self.heard_at > self.timings.expiry
        if not self.connected:
            return
        if now - self.heard_at <= self.timings.expiry or now < self.next_ready:
            return
        silent = now - self.heard_at
        log.warning("agent %s: broker silent for %.1f s (%s); registering again", self.agent_id, silent, self.address)
        if silent > 2 * self.timings.expiry:
            self.reconnect()
        self.register()
        self.next_ready = now + self.ready_backoff * random.uniform(0.8, 1.2)
        self.ready_backoff = min(self.ready_backoff * 2, self.timings.reconnect_max)

    def warn_unconnected(self, now: float) -> None:
        """While no broker connection is up (the broker is down, or the address is wrong), warn in the log, backing
        off from one expiry to AGENT_LINK_WARN_MAX_S: an agent that says nothing looks fine when it serves no one."""
        if self.connected:
            self.warn_backoff = self.timings.expiry
            self.next_warn = None
            return
        since = self.down_since if self.down_since is not None else self.link_since
        if self.next_warn is None:
            self.next_warn = since + self.warn_backoff
        if now < self.next_warn:
            return
        log.warning(
            "agent %s: not connected to the broker at %s for %.0f s (is it running, and is the address right?); "
            "still trying",
            self.agent_id,
            self.address,
            now - since,
        )
        self.warn_backoff = min(2 * self.warn_backoff, AGENT_LINK_WARN_MAX_S)
        self.next_warn = now + self.warn_backoff
