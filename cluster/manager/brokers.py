"""The brokers the manager hears, without I/O: each broker PUBlishes a `BrokerReport` (EVENT broker_report) to the
manager's heartbeat address every heartbeat interval and whenever the set of agents it routes to changes.

The manager keeps the latest report per broker name (its incarnation, sequence number, the reports it missed, when
it last heard it), drops a broker silent for `expiry`, and its rollouts' broker view is the union of the live
brokers' agent lists: an agent serves if any broker routes to it (agents register with every broker). None when no
broker reports: rollouts then wait for every agent the manager hears, as before brokers reported.

PUB/SUB drops at the high-water mark and while a subscriber joins, so a gap in `seq` is counted (a metric of the
link), not an error; the next report replaces the lost one whole. A report from an incarnation that the name had
before the current one means two live brokers share a name (a configuration mistake): logged, and the newest
report still wins, so the view stays a union of what was reported lately.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cluster.clock import pardon
from cluster.logs import BadInputLog
from cluster.protocol import BrokerReport

log = logging.getLogger("cluster.manager")
clashes = BadInputLog(log, per_second=1)

RETIRED_KEPT = 8  # earlier incarnations remembered per name (to tell two brokers with one name from a restart)


@dataclass
class BrokerRecord:
    name: str
    incarnation: str
    seq: int
    agents: set[str]
    load: dict
    heard: float  # the manager's clock (monotonic) when its latest report arrived
    heard_at: float  # wall time of that report (Deployments.at_broker compares it with agents' join times)
    gaps: int = 0  # reports of this incarnation that never arrived (seq jumped)
    reports: int = 1  # reports taken from this incarnation
    retired: list[str] = field(default_factory=list)  # the name's earlier incarnations, oldest first


class Brokers:
    """Broker name -> its latest report. Events in: `observe` (a report), `paused` (the manager did not run),
    `expire` (the clock). Out: `view()` (the union of agents, or None), `describe(now)` (the `brokers` answer)."""

    def __init__(self, expiry: float) -> None:
        self.expiry = expiry
        self.brokers: dict[str, BrokerRecord] = {}

    def observe(self, report: BrokerReport, now: float, wall: float) -> bool:
        """Take a report; True if the union of agents may have changed (a new broker, or another agent list)."""
        record = self.brokers.get(report.broker)
        agents = set(report.agents)
        if record is None:
            self.brokers[report.broker] = BrokerRecord(
                report.broker, report.incarnation, report.seq, agents, report.load, now, wall
            )
            log.info("broker %s reporting (incarnation %s, %d agents)", report.broker, report.incarnation, len(agents))
            return True
        if report.incarnation != record.incarnation:
            if report.incarnation in record.retired:
                clashes.error(
                    "two brokers report under the name %s (incarnations %s and %s): give each its own --name",
                    report.broker,
                    report.incarnation,
                    record.incarnation,
                )
                record.retired.remove(report.incarnation)
            else:
                log.info("broker %s restarted (incarnation %s)", report.broker, report.incarnation)
            record.retired = (record.retired + [record.incarnation])[-RETIRED_KEPT:]
            record.incarnation, record.gaps, record.reports = report.incarnation, 0, 0
        elif report.seq <= record.seq:
            return False  # a duplicate or an older one (seq counts up per incarnation): the latest stands
        else:
            record.gaps += report.seq - record.seq - 1
        changed = agents != record.agents
        record.seq, record.agents, record.load = report.seq, agents, report.load
        record.heard, record.heard_at = now, wall
        record.reports += 1
        return changed

    def paused(self, lost: float, now: float) -> None:
        """The manager did not run for `lost` seconds: reports sent meanwhile are unread, not missing."""
        for record in self.brokers.values():
            record.heard = pardon(record.heard, lost, now)

    def expire(self, now: float) -> list[str]:
        """Drop brokers silent for longer than the expiry; their names."""
        gone = [name for name, r in self.brokers.items() if now - r.heard > self.expiry]
        for name in gone:
            record = self.brokers.pop(name)
            log.warning("broker %s silent for %.2f s: its agents leave the view", name, now - record.heard)
        return gone

    def view(self) -> set[str] | None:
        """The agents any live broker routes to; None when no broker reports."""
        if not self.brokers:
            return None
        return set().union(*(r.agents for r in self.brokers.values()))

    def oldest_report(self) -> float:
        """Wall time of the oldest of the live brokers' latest reports (an agent that joined later than an interval
        before it may not be in every report yet)."""
        return min((r.heard_at for r in self.brokers.values()), default=float("inf"))

    def describe(self, now: float) -> list[dict]:
        """The `brokers` answer: one entry per live broker, by name."""
        return [
            {
                "name": r.name,
                "incarnation": r.incarnation,
                "seq": r.seq,
                "gaps": r.gaps,
                "heard_age": round(now - r.heard, 3),
                "agents": sorted(r.agents),
                "load": r.load,
            }
            for r in sorted(self.brokers.values(), key=lambda r: r.name)
        ]
