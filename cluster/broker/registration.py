"""Registration, without I/O: who may register as which agent (READY, duplicate ids, keys), and which agents are
expected to register again after the broker (re)starts. The Dispatcher asks and applies the answer (`Ready`): it
adds, updates or removes agents and sends the errors; this module only judges, and keeps its own bookkeeping
(ids held for a taken-over agent, agents expected back).

- with keys on (`allow`, the allow-list): only a key with role agent may speak on the agents' socket, and an agent is
  bound to the key it registered with: READY for an identity registered with another key is refused (until that
  agent expires), and any other message for it from another key is dropped; READY must name the agent id it
  connected with (its routing identity), and an agent whose key is refused (revoked) is told so (ERROR
  UNAUTHENTICATED or PERMISSION_DENIED, to its READY and HEARTBEAT) and dropped at once;
- one live agent per agent id: a READY naming an id that another live process holds (another connection, another
  instance token or another key) is refused with ERROR AGENT_ID_IN_USE to the newcomer and an error in the log;
  the live agent keeps serving and keeps its requests (it is probed, so a dead predecessor goes at once). The same
  process registering again (same instance, on its own connection) is not a duplicate; a READY on another
  connection is, whatever instance it claims (an instance is public: `agents()` shows it);
- a request no live agent can take is held (`holding`) rather than failed while agents re-register after the
  broker (re)starts: the warm-up window (one expiry and one interval from the start, for any model), and after it,
  for the models of the agents the manager says are alive (`expect`, its answer at start-up), until each of them
  has registered again or is declared dead, at most `timings.rejoin_window` from the start. A model the manager's
  desired state does not list is never held.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from cluster import protocol
from cluster.auth import refusal
from cluster.broker.agents import AgentEntry, AgentTable
from cluster.config import Timings
from cluster.keys import AllowList
from cluster.logs import BadInputLog
from cluster.protocol import Command, ErrorCode, Heartbeat, ProtocolError, identity_names

log = logging.getLogger("cluster.broker")
bad_input = BadInputLog(log)  # peers control these messages: never log them at their rate
refused = BadInputLog(log)  # messages refused for their key (keys on), rate-limited on their own


class Ready(NamedTuple):
    """What to do with a READY. `beat` None: drop it (logged why). `refusal` set: refuse it with AGENT_ID_IN_USE
    (that text), after removing `evict` or probing `probe` with a HEARTBEAT. Else register it: `again` (the same
    process saying READY again: update `old`), or add it, after removing `old` (this connection's earlier entry: a
    restarted agent) if set."""

    beat: Heartbeat | None
    metadata: Any = None
    old: AgentEntry | None = None
    again: bool = False
    refusal: str | None = None
    evict: AgentEntry | None = None
    probe: AgentEntry | None = None


_DROP = Ready(None)
TAKEN_OVER = "its connection was taken over by another process presenting its identity"


class Registration:
    def __init__(self, timings: Timings, agents: AgentTable, allow: AllowList | None, started: float) -> None:
        self.timings = timings
        self.agents = agents
        self.allow = allow  # keys on: the allow-list, and every agent message carries its sender's key
        self.started = started
        self.reserved: dict[str, tuple[str | None, float]] = {}  # agent id -> (instance, until): see `_duplicate`
        # agent id -> (instance, model -> versions): alive at the manager, not registered here again yet (expect)
        self.expected: dict[str, tuple[str | None, dict[str, set[int]]]] = {}
        self.answered = False  # the manager said which agents to expect (its answer at start-up)

    # ---- keys ---------------------------------------------------------------------------------------------------

    def key_refusal(self, identity: bytes, cmd: Command, key: str | None) -> tuple[ErrorCode, str] | None:
        """Keys on: why the sender's key may not speak as an agent (revoked since its handshake, or another role's),
        None if it may. The Dispatcher then drops an agent registered with it, and answers READY and HEARTBEAT with
        the reason, so the agent can say why it is refused (at most one a beat)."""
        why = refusal(self.allow, key, "agent")
        if why is not None:
            refused.warning("%s from %r refused: %s", cmd.name, identity, why[1])
        return why

    @staticmethod
    def wrong_key(agent: AgentEntry, cmd: Command) -> None:
        """A message for a registered agent from another key than the one it registered with: dropped."""
        refused.warning(
            "%s for agent %s refused: it comes from another key than the one it registered with",
            cmd.name,
            agent.agent_id,
        )

    def heartbeat(self, agent: AgentEntry, header_frame) -> Heartbeat | None:
        """A registered agent's HEARTBEAT: its new state (the metadata it carries remembered), None if malformed."""
        try:
            header = protocol.unpack_header(header_frame)
            beat = Heartbeat.from_wire(header)
        except ProtocolError as exc:
            log.warning("bad HEARTBEAT from agent %s ignored: %s", agent.agent_id, exc)
            return None
        self.agents.remember_metadata(header.get("metadata"))
        return beat

    # ---- READY --------------------------------------------------------------------------------------------------

    def ready(self, identity: bytes, header_frame, key: str | None, now: float) -> Ready:
        try:
            header = protocol.unpack_header(header_frame)
            beat = Heartbeat.from_wire(header)
            if beat.capacity < 1:
                raise ProtocolError("capacity must be at least 1")
        except ProtocolError as exc:
            bad_input.warning("bad READY from %r dropped: %s", identity, exc)
            return _DROP
        if self.allow is not None and not identity_names(identity, beat.agent):
            refused.warning(
                "READY from %r refused: it names agent %r (keys on: the two must match)", identity, beat.agent
            )
            return _DROP
        old = self.agents.get(identity)  # this connection's entry
        live = self.agents.get_by_id(beat.agent)  # the live agent holding this id, whatever its connection
        if old is not None and old.key != key:
            refused.warning("READY for agent %s refused: it is registered with another key", old.agent_id)
            return _DROP
        conflict = None
        if live is not None and live is not old:
            # A second process started with the same --id, or one that copied the live agent's id and instance
            # (both public): the same process always comes back on its own identity (connection), so another
            # connection is never the live agent, whatever it claims.
            conflict = "in use by another live agent"
        elif live is not None and (live.key != key or not self.agents.same_process(live, beat)):
            if beat.instance is not None and live.beat.instance is not None:
                # Another process presented this process's own routing identity, and ROUTER_HANDOVER gave it the
                # connection: the first one's link is gone. Drop the first (its requests go elsewhere; it
                # reconnects and registers again, see the agent's check_broker) and refuse the newcomer.
                conflict = "taken over by another process presenting the live agent's identity"
        if conflict is None and live is None:
            reserved = self.reserved.get(beat.agent)
            if reserved is not None and reserved[1] > now and reserved[0] != beat.instance:
                conflict = "held for the agent whose connection was taken over, while it reconnects"
        if conflict is not None:
            return self._duplicate(identity, beat, live, conflict, now)
        self.reserved.pop(beat.agent, None)
        self.expected.pop(beat.agent, None)  # back: held requests for its models go to it now
        again = old is not None and self.agents.same_process(old, beat)
        return Ready(beat, header.get("metadata"), old, again)

    def _duplicate(self, identity: bytes, beat: Heartbeat, live: AgentEntry | None, why: str, now: float) -> Ready:
        """READY for an agent id another live process holds: refused, with an ERROR AGENT_ID_IN_USE the newcomer
        logs (it tries again for a grace period, then exits: a restarted agent whose predecessor died gets in once
        the predecessor is gone). The live agent keeps its id, its requests and its credit. It is probed with a
        HEARTBEAT: if its connection is gone (a crashed predecessor), the send fails and it is removed at once,
        rather than at its expiry."""
        who = f"host {beat.host}, pid {beat.pid}, instance {beat.instance}"
        evict = probe = None
        if live is not None and live.identity == identity:
            self.reserved[beat.agent] = (live.beat.instance, now + 3 * self.timings.expiry)
            evict = live
            holder = f"an agent whose connection this one took over ({why})"
        elif live is not None:
            probe = live
            holder = (
                f"a live agent (host {live.beat.host}, pid {live.beat.pid}, instance {live.beat.instance}, "
                f"heard {now - live.last_seen:.1f} s ago)"
            )
        else:
            holder = f"an agent ({why})"
        text = (
            f"agent id '{beat.agent}' is already in use by {holder}; refusing this agent ({who}). "
            "Give every agent its own --id."
        )
        refused.error("READY from %r refused: %s", identity, text)
        return Ready(beat, refusal=text, evict=evict, probe=probe)

    # ---- agents expected back -----------------------------------------------------------------------------------

    def warming_up(self, now: float) -> bool:
        """Just started (or restarted): agents are still re-registering, so "no agent has it" is not known yet.
        Requests wait (within their deadline) instead of failing, so clients ride through a broker restart."""
        return now - self.started < self.timings.expiry + self.timings.heartbeat_interval

    def expect(self, views: list, now: float) -> None:
        """The manager's answer to QUERY {what: agents}, asked at start-up: the agents it hears (their heartbeats),
        which will register here again. Until each has (or is declared dead, or `rejoin_window` from the start has
        passed), requests for what it serves wait rather than fail. Agents already registered, draining, or entries
        that do not parse are left out. An answer after the rejoin window changes nothing."""
        if now >= self.started + self.timings.rejoin_window or not isinstance(views, list):
            return
        self.answered = True
        heard = 0
        for view in views:
            try:
                beat = Heartbeat.from_wire(view)
            except (ProtocolError, TypeError, AttributeError):
                continue
            heard += 1
            if beat.draining or not beat.models or self.agents.get_by_id(beat.agent) is not None:
                continue
            self.expected[beat.agent] = (beat.instance, beat.served_versions())
        held = ""
        if self.expected:
            held = (
                f" ({', '.join(sorted(self.expected))}): holding requests for "
                f"{', '.join(sorted({m for _, models in self.expected.values() for m in models}))} until they are "
                f"(at most {self.timings.rejoin_window:g} s from the start)"
            )
        log.info("the manager hears %d agents, %d not registered here yet%s", heard, len(self.expected), held)

    def serving(self, now: float) -> bool:
        """Past the rejoin logic (what a client's BrokerHello says): no agent the manager named is still expected
        back, and either the manager has answered or the warm-up window is over. Clients prefer a ready broker."""
        if self.expected and now < self.started + self.timings.rejoin_window:
            return False
        return self.answered or not self.warming_up(now)

    def declared_dead(self, agent_id: str, instance: str | None) -> None:
        """The manager says the agent died: it will not register again, so its models' requests are held no longer."""
        expected = self.expected.get(agent_id)
        if expected is not None and (instance is None or expected[0] in (None, instance)):
            del self.expected[agent_id]

    def holding(self, model: str, version: int | None, now: float) -> bool:
        """Whether a request for `model` (`version`) that no live agent can take now waits rather than fails: in the
        warm-up window, or while an agent the manager said is alive and serves it has not registered again; never
        for a model the manager's desired state (once known) does not list: that fails at once, as it does later."""
        if self.agents.undeployed(model):
            return False  # the manager does not want it served: no agent coming back will serve it
        if self.warming_up(now):
            return True  # (the manager's desired state not heard yet, in the warm-up window only: bounded)
        if not self.expected or now >= self.started + self.timings.rejoin_window:
            return False
        return any(
            model in models and (version is None or version in models[model]) for _, models in self.expected.values()
        )

    def end_rejoin_window(self, now: float) -> None:
        if self.expected and now >= self.started + self.timings.rejoin_window:
            log.warning(
                "agents the manager said were alive did not register within %.1f s of the start: %s; requests for "
                "their models are no longer held",
                self.timings.rejoin_window,
                ", ".join(sorted(self.expected)),
            )
            self.expected.clear()
