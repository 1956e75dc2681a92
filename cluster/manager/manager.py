"""The lifecycle manager: listens to agents' heartbeats, keeps the registry, tells the broker who lives and dies.

Sockets (all bound by the manager, so agents and the broker can start before or after it):
- SUB  heartbeats: agents' PUB sockets connect here and publish a HEARTBEAT every interval;
- PUB  events: registry changes (agent_joined, agent_dead) and a periodic snapshot, for the broker;
- ROUTER queries: QUERY {what: agents | models} answered with REPLY {result}.

A restarted manager starts with an empty registry and rebuilds it from the next round of beats.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from cluster import protocol
from cluster.config import MAX_CONTROL_BYTES, Addresses, Timings
from cluster.manager.registry import Registry
from cluster.protocol import PREAMBLE, Command, ErrorCode, ProtocolError, error_header, message, require
from cluster.sockets import make_socket

log = logging.getLogger("cluster.manager")

HEARTBEAT_FIELDS = {"agent": str, "models": list, "capacity": int}


def validate_beat(header: dict) -> dict:
    """The fields the registry relies on, checked; other fields travel along as they are."""
    for key, kind in HEARTBEAT_FIELDS.items():
        require(header, key, kind)
    for entry in header["models"]:
        if not isinstance(entry, dict):
            raise ProtocolError("each of 'models' must be a map")
        require(entry, "name", str)
        require(entry, "version", int)
    return header


class Manager:
    def __init__(self, addresses: Addresses | None = None, timings: Timings | None = None, ctx=None) -> None:
        self.addresses = addresses or Addresses()
        self.timings = timings or Timings()
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        control = dict(max_bytes=MAX_CONTROL_BYTES, timings=self.timings)
        self.heartbeats = make_socket(
            self.ctx, zmq.SUB, bind=self.addresses.manager_heartbeats, subscribe=PREAMBLE[Command.HEARTBEAT], **control
        )
        self.events = make_socket(self.ctx, zmq.PUB, bind=self.addresses.manager_events, **control)
        self.queries = make_socket(self.ctx, zmq.ROUTER, bind=self.addresses.manager_queries, **control)
        self.registry = Registry(self.timings.expiry)
        self._stop = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.heartbeats, zmq.POLLIN)
        poller.register(self.queries, zmq.POLLIN)
        tick = min(0.1, self.timings.heartbeat_interval / 4)
        next_tick = time.monotonic()
        next_snapshot = next_tick
        log.info(
            "manager: heartbeats on %s, events on %s, queries on %s",
            self.addresses.manager_heartbeats,
            self.addresses.manager_events,
            self.addresses.manager_queries,
        )
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(max(0, int((next_tick - time.monotonic()) * 1000)) + 1))
                if self.heartbeats in ready:
                    self._drain(self.heartbeats, self.process_heartbeat)
                if self.queries in ready:
                    self._drain(self.queries, self.process_query)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick
                    for event in self.registry.expire(now):
                        log.warning("agent %s dead: silent for %.2f s", event["agent"], event["silent_for"])
                        self.publish(event)
                    if now >= next_snapshot:
                        next_snapshot = now + self.timings.heartbeat_interval
                        self.publish({"event": "snapshot", "agents": sorted(self.registry.agents)})
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for sock in (self.heartbeats, self.events, self.queries):
            sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()

    @staticmethod
    def _drain(sock, handle) -> None:
        for _ in range(1024):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:
                log.exception("error handling a message; dropped")

    def process_heartbeat(self, frames: list[bytes]) -> None:
        try:
            if len(frames) != 2:
                raise ProtocolError(f"heartbeat must have 2 frames, got {len(frames)}")
            protocol.parse_preamble(frames[0])
            beat = validate_beat(protocol.unpack_header(frames[1]))
        except ProtocolError as exc:
            log.warning("bad heartbeat dropped: %s", exc)
            return
        for event in self.registry.observe(beat, time.monotonic()):
            log.info("agent %s joined (host %s, pid %s)", event["agent"], beat.get("host"), beat.get("pid"))
            self.publish({"event": event["event"], "agent": event["agent"]})

    def process_query(self, frames: list[bytes]) -> None:
        peer = frames[0]
        request_id = None
        try:
            if len(frames) != 3:
                raise ProtocolError(f"query must be preamble + header, got {len(frames) - 1} frames")
            if protocol.parse_preamble(frames[1]) != Command.QUERY:
                raise ProtocolError("the manager answers QUERY only")
            header = protocol.unpack_header(frames[2])
            request_id = header.get("id") if isinstance(header.get("id"), (int, str)) else None
            what = require(header, "what", str)
            if what == "agents":
                result = self.registry.describe_agents(time.monotonic())
            elif what == "models":
                result = self.registry.describe_models()
            else:
                raise ProtocolError(f"unknown query {what!r}; ask for 'agents' or 'models'")
            reply = message(Command.REPLY, {"id": request_id, "result": result})
        except ProtocolError as exc:
            log.warning("bad query dropped with an error reply: %s", exc)
            reply = message(Command.ERROR, error_header(request_id, ErrorCode.BAD_REQUEST, str(exc)))
        try:
            self.queries.send_multipart([peer, *reply], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the asker is gone

    def publish(self, event: dict) -> None:
        try:
            self.events.send_multipart(message(Command.EVENT, event), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("event %s dropped: subscribers not keeping up", event.get("event"))
