"""The agent's links to its brokers: one BrokerLink (link.py) per address of `broker_agents`, each doing what one link
does (READY on connect, refused ids and keys, reconnect), and what is decided over all of them.

Capacity shares: two brokers must never both believe they own all of an agent's slots, so the agent splits its
capacity (in all, and each model's) over its connected links (handshake done, not refusing it, not silent past an
expiry: a frozen broker's share goes to the others): n links, c slots: each gets c // n, the first c % n (in address
order) one more; a share of 0 becomes 1 (over-committed: the agent answers BUSY past its real capacity). Each
link's READY and HEARTBEAT carry its share; the manager's beat carries the whole. When a link comes up or goes
down, every connected link is told its new share at once (`changed`).

Answers: each goes out on the link whose broker its route names (link.AnswerRoutes), never on another's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import zmq

from cluster.agent.link import SEND, STALE, AnswerRoutes, BrokerLink
from cluster.config import Timings, address_list
from cluster.sockets import CurveClient


def share_of(slots: int, index: int, links: int) -> int:
    """Link `index`'s share (of `links`, in address order) of `slots`: slots // links, one more for the first
    slots % links, at least 1."""
    return max(1, slots // links + (index < slots % links))


def capacity_share(capacity: int, model_capacity: dict[str, int], index: int, links: int) -> tuple[int, dict]:
    """Link `index`'s share of the agent's capacity and of each model's: (capacity, model_capacity)."""
    if links <= 1:
        return capacity, model_capacity
    return share_of(capacity, index, links), {m: share_of(n, index, links) for m, n in model_capacity.items()}


class BrokerLinks:
    """Every link of the agent (sorted by address), the AnswerRoutes over them, and who shares the capacity."""

    def __init__(
        self,
        ctx: zmq.Context,
        addresses: str,
        identity: bytes,
        agent_id: str,
        timings: Timings,
        ready: Callable[[BrokerLink], list],
    ) -> None:
        self.routes = AnswerRoutes()
        self.links = [
            BrokerLink(ctx, address, identity, agent_id, timings, ready, self.routes)
            for address in sorted(address_list(addresses))
        ]
        self.members: tuple[BrokerLink, ...] = ()  # the links sharing the capacity, as of the last `changed`

    def handle(self, handler: Callable[..., None]) -> None:
        """Each link's messages go to `handler(frames, link=link)` (by link.receive: what `drain` calls)."""
        for link in self.links:
            link.on_message = functools.partial(handler, link=link)

    def __iter__(self):
        return iter(self.links)

    @property
    def first(self) -> BrokerLink:
        return self.links[0]

    def open(self, curve: CurveClient | None, hot: zmq.Poller, cold: zmq.Poller) -> None:
        for link in self.links:
            link.open(curve, hot, cold)

    def goodbye(self) -> None:
        for link in self.links:
            link.goodbye()

    def close(self) -> None:
        for link in self.links:
            link.close()

    # ---- capacity shares -----------------------------------------------------------------------------------------

    def sharing(self) -> list[BrokerLink]:
        """The links the capacity is split over: connected, not refusing this agent, and heard within an expiry."""
        return [link for link in self.links if link.connected and link.refused_since is None and not link.silent]

    def changed(self) -> bool:
        """True (once) when the links sharing the capacity changed since the last call: time to re-announce."""
        members = tuple(self.sharing())
        if members == self.members:
            return False
        self.members = members
        return True

    def share(self, link: BrokerLink, capacity: int, model_capacity: dict[str, int]) -> tuple[int, dict]:
        """`link`'s share of the capacity (counted among the sharing links, itself included)."""
        members = self.sharing()
        if link not in members:
            members = sorted([*members, link], key=lambda one: one.address)
        return capacity_share(capacity, model_capacity, members.index(link), len(members))

    def status(self, link: BrokerLink, status: dict) -> dict:
        """`status` (a heartbeat, as sent) as `link`'s broker is told it: with its share of the capacity."""
        capacity, model_capacity = self.share(link, status["capacity"], status["model_capacity"])
        if capacity == status["capacity"] and model_capacity == status["model_capacity"]:
            return status
        return dict(status, capacity=capacity, model_capacity=model_capacity)

    def refused(self) -> bool:
        """Every broker refuses this agent's id (another live process has it): the manager keeps the live one."""
        return all(link.refused_since is not None for link in self.links)

    # ---- answers ---------------------------------------------------------------------------------------------------

    def answer(self, frames: list) -> None:
        """A worker's answer for no link known now: held until one is (AnswerRoutes), or dropped as stale."""
        verdict, link = self.routes.admit(frames)
        if verdict is SEND:
            link.answer(frames)
        elif verdict is STALE:
            self.first.drop_stale(frames)

    # ---- each beat -------------------------------------------------------------------------------------------------

    def pardon(self, lost: float, now: float) -> None:
        for link in self.links:
            link.pardon(lost, now)

    def check(self, now: float) -> None:
        for link in self.links:
            link.check(now)
            link.warn_unconnected(now)
