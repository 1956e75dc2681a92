"""Placement without I/O: which live agents hold a copy of each model that asks for `replicas: N`.

The manager (deployments.py) gathers what it knows (the agents from their heartbeats, each model's copies wanted and
bytes per copy) and keeps the answer in the desired state (`ModelDeployment.agents`); the agents load what is placed
on them. A model with `replicas` "all" (None) is on every agent that takes part, as before placement existed: it is
never placed, but its bytes count against each agent's budget.

Rules: a copy stays where it is while its agent lives and is not draining (sticky: no reload, no cold cache); a
missing copy goes to the eligible agent with the most free bytes (budget less what is placed on it), bigger models
first; an agent started with --models only gets those. Copies that fit nowhere are left out: the model serves on
fewer agents and `short` says why, until an agent with room comes (each plan tries again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.sizes import format_bytes


@dataclass
class Host:
    """An agent as placement sees it (from its latest heartbeat)."""

    agent: str
    budget: int | None  # bytes of models it may hold; None (an agent from before budgets): no limit
    serves_only: list[str] | None = None  # started with --models: only these
    draining: bool = False

    def takes(self, model: str) -> bool:
        return not self.draining and (self.serves_only is None or model in self.serves_only)

    @property
    def room(self) -> float:
        return math.inf if self.budget is None else self.budget


@dataclass
class Want:
    """A deployed model: copies wanted (None: every agent) and bytes one copy needs, and how that was known."""

    replicas: int | None
    need: int
    how: str = "measured"  # "memory_mb", "measured" (the most any agent reported), "estimated" (file sizes)


@dataclass
class Plan:
    agents: dict[str, list[str] | None]  # model -> the agents that hold it (None: every agent)
    short: dict[str, str] = field(default_factory=dict)  # model -> why it has fewer copies than wanted


class PlacementError(Exception):
    """A deploy that cannot be placed; the message names what is short."""


def used_bytes(wants: dict[str, Want], hosts: dict[str, Host], agents: dict[str, list[str] | None]) -> dict[str, int]:
    """Bytes placed on each host: its placed copies, and every model held by all agents that it takes."""
    used = dict.fromkeys(hosts, 0)
    for name, want in wants.items():
        holders = agents.get(name)
        for agent, host in hosts.items():
            if (holders is None and want.replicas is None and host.takes(name)) or (holders and agent in holders):
                used[agent] += want.need
    return used


def plan(
    wants: dict[str, Want],
    hosts: dict[str, Host],
    current: dict[str, list[str] | None],
    settled: bool = True,
) -> Plan:
    """The agents of every model in `wants`, from `current` (the placement in force). Before `settled` (a manager just
    started, which has not heard every agent yet), a copy on an agent not heard from stays where it is."""
    agents: dict[str, list[str] | None] = {}
    for name, want in wants.items():
        if want.replicas is None:
            agents[name] = None
            continue
        kept = [
            a for a in current.get(name) or [] if (a in hosts and hosts[a].takes(name)) or not (settled or a in hosts)
        ]
        agents[name] = kept[: want.replicas]
    result = Plan(agents)
    used = used_bytes(wants, hosts, agents)
    for name in sorted(wants, key=lambda n: (-wants[n].need, n)):  # the big ones first: they are the hard ones
        want, holders = wants[name], agents[name]
        if holders is None:
            continue
        while len(holders) < want.replicas:
            free = {a: h.room - used[a] for a, h in hosts.items() if h.takes(name) and a not in holders}
            fits = [a for a, room in free.items() if room >= want.need]
            if not fits:
                result.short[name] = shortfall(name, want, hosts, used, holders)
                break
            best = max(fits, key=lambda a: (free[a], [-ord(c) for c in a]))  # most free; ties: the first id
            holders.append(best)
            used[best] += want.need
    return result


def shortfall(name: str, want: Want, hosts: dict[str, Host], used: dict[str, int], holders: list[str]) -> str:
    """E.g. "model 'A' needs 2 copies of 3.0 GiB (...); room on 1 agent: agent-1 has 3.5 GiB free, agent-2 1.0 GiB";
    with copies placed: "...; placed on agent-1; room for another on 0 agents: agent-2 has 1.0 GiB free"."""
    copies = f"{want.replicas} cop{'y' if want.replicas == 1 else 'ies'} of {format_bytes(want.need)}"
    head = f"model '{name}' needs {copies} ({_how(want.how)})"
    if holders:
        head += f"; placed on {', '.join(holders)}"
    eligible = {a: hosts[a].room - used[a] for a in hosts if hosts[a].takes(name) and a not in holders}
    if not eligible:
        others = [
            f"{a} ({'draining' if h.draining else 'serves only ' + ','.join(map(str, h.serves_only or []))})"
            for a, h in sorted(hosts.items())
            if a not in holders
        ]
        return f"{head}; no {'other ' if holders else ''}live agent can hold it" + (
            f": {', '.join(others)}" if others else ""
        )
    ranked = sorted(eligible.items(), key=lambda item: (-item[1], item[0]))
    room = sum(1 for _, free in ranked if free >= want.need)
    parts = [
        f"{a} has {format_bytes(max(free, 0))} free" if i == 0 else f"{a} {format_bytes(max(free, 0))}"
        for i, (a, free) in enumerate(ranked[:8])
    ]
    more = f", and {len(ranked) - 8} more" if len(ranked) > 8 else ""
    where = "room for another on" if holders else "room on"
    return f"{head}; {where} {room} agent{'' if room == 1 else 's'}: {', '.join(parts)}{more}"


def _how(how: str) -> str:
    return {"memory_mb": "memory_mb in its config", "measured": "measured at load"}.get(
        how, "estimated from its files: set memory_mb to say"
    )


def check_fits(
    name: str, want: Want, wants: dict[str, Want], hosts: dict[str, Host], current: dict
) -> list[str] | None:
    """The agents a deploy of `name` would be placed on (None: every agent); PlacementError naming the shortfall when
    it cannot have every copy it wants."""
    result = plan(dict(wants, **{name: want}), hosts, current)
    if name in result.short:  # named against the whole ask: each agent's room beside the other models
        others = {n: w for n, w in wants.items() if n != name}
        raise PlacementError(shortfall(name, want, hosts, used_bytes(others, hosts, result.agents), []))
    return result.agents[name]
