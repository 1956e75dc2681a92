"""The agent's AnswerRoutes (sans-IO): an answer goes only to the broker that asked; one that finished while the broker
on the link was not known waits for it, and is dropped if the broker turns out to be another. With several links (one
per broker), an answer goes on the link of the broker it names, never on another's."""

from __future__ import annotations

from types import SimpleNamespace

from cluster import protocol
from cluster.agent.link import HOLD, SEND, STALE, AnswerRoutes
from cluster.protocol import PREAMBLE, Command

OLD, NEW = b"o" * protocol.INCARNATION_BYTES, b"n" * protocol.INCARNATION_BYTES


class AnswerGate:
    """One link's view of AnswerRoutes (the single-broker case)."""

    def __init__(self) -> None:
        self.routes, self.link = AnswerRoutes(), SimpleNamespace()
        self.routes.add(self.link)

    held = property(lambda self: self.routes.held)

    def lost(self):
        self.routes.lost(self.link)

    def admit(self, answer):
        verdict, link = self.routes.admit(answer)
        assert link is (self.link if verdict == SEND else None)
        return verdict

    def known(self, incarnation):
        return self.routes.known(self.link, incarnation)


def answer(incarnation: bytes, n: int) -> list:
    route = incarnation + n.to_bytes(protocol.ROUTE_BYTES - protocol.INCARNATION_BYTES, "big")
    return [PREAMBLE[Command.REPLY] + route, b"header"]


def test_answers_go_to_the_broker_on_the_link_and_others_are_stale():
    gate = AnswerGate()
    assert gate.known(OLD) == ([], [])
    assert gate.admit(answer(OLD, 1)) == SEND
    assert gate.admit(answer(NEW, 2)) == STALE
    assert gate.held == []


def test_answers_finished_while_the_link_was_down_wait_for_the_broker_and_go_only_to_their_own():
    gate = AnswerGate()
    gate.known(OLD)
    gate.lost()
    mine, other, mine_too = answer(OLD, 1), answer(NEW, 2), answer(OLD, 3)
    # (`other` names a broker the link never had: stale at once)
    assert [gate.admit(a) for a in (mine, other, mine_too)] == [HOLD, STALE, HOLD]
    send, drop = gate.known(OLD)  # the same broker came back: its own answers go, in order
    assert send == [mine, mine_too] and drop == []
    assert gate.held == [] and gate.admit(answer(OLD, 4)) == SEND


def test_a_new_broker_on_the_link_gets_none_of_the_old_ones_answers():
    gate = AnswerGate()
    gate.known(OLD)
    gate.lost()
    held = answer(OLD, 1)
    assert gate.admit(held) == HOLD
    assert gate.known(NEW) == ([], [held])
    assert gate.known(NEW) == ([], [])  # already known: nothing more to decide
    assert gate.admit(answer(OLD, 2)) == STALE


def two_links():
    """AnswerRoutes over two links, a (broker OLD) and b (broker NEW)."""
    routes = AnswerRoutes()
    a, b = SimpleNamespace(), SimpleNamespace()
    routes.add(a)
    routes.add(b)
    routes.known(a, OLD)
    routes.known(b, NEW)
    return routes, a, b


def test_with_two_links_an_answer_goes_on_its_own_brokers_link_and_waits_while_any_link_is_unknown():
    routes, a, b = two_links()
    assert routes.admit(answer(OLD, 1)) == (SEND, a) and routes.admit(answer(NEW, 2)) == (SEND, b)
    gone = b"g" * protocol.INCARNATION_BYTES
    assert routes.admit(answer(gone, 3)) == (STALE, None)  # no link has that broker
    routes.lost(b)  # b's broker dropped: its answers wait (a broker no link had is stale); a's still go on a
    for_b, other = answer(NEW, 4), answer(gone, 5)
    assert routes.admit(for_b) == (HOLD, None) and routes.admit(other) == (STALE, None)
    assert routes.admit(answer(OLD, 6)) == (SEND, a)
    assert routes.known(b, NEW) == ([for_b], [])  # b is back, the same broker: its own go
    assert routes.held == []


def test_an_answer_held_for_one_link_is_not_sent_on_another_that_comes_back_first():
    routes, a, b = two_links()
    routes.lost(a)
    routes.lost(b)
    for_a = answer(OLD, 1)
    assert routes.admit(for_a) == (HOLD, None)
    restarted = b"r" * protocol.INCARNATION_BYTES
    assert routes.known(b, restarted) == ([], [])  # b's broker restarted: a is not known yet, so for_a waits
    assert routes.held == [for_a]
    assert routes.known(a, OLD) == ([for_a], [])


def test_a_broker_down_for_good_does_not_keep_another_brokers_stale_answers():
    """One link's broker never came up (down for good); the other's restarted. Answers for its old incarnation (in
    flight at the restart, finished after) can go nowhere: dropped, not held for as long as the first stays down."""
    routes = AnswerRoutes()
    down, b = SimpleNamespace(), SimpleNamespace()
    routes.add(down)
    routes.add(b)
    routes.known(b, OLD)
    routes.lost(b)
    before = answer(OLD, 1)
    assert routes.admit(before) == (HOLD, None)  # b's broker may come back as the same one
    assert routes.known(b, NEW) == ([], [before])  # it did not: b's old broker is gone
    late = answer(OLD, 2)
    assert routes.admit(late) == (STALE, None), "an answer for a broker no link has or may get back is dropped"
    assert routes.admit(answer(NEW, 3)) == (SEND, b)
    assert routes.held == []
