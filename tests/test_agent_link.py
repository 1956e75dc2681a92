"""The agent's AnswerGate (sans-IO): an answer goes only to the broker that asked; one that finished while the broker
on the link was not known waits for it, and is dropped if the broker turns out to be another."""

from __future__ import annotations

from cluster import protocol
from cluster.agent.link import HOLD, SEND, STALE, AnswerGate
from cluster.protocol import PREAMBLE, Command

OLD, NEW = b"o" * protocol.INCARNATION_BYTES, b"n" * protocol.INCARNATION_BYTES


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
    assert [gate.admit(a) for a in (mine, other, mine_too)] == [HOLD, HOLD, HOLD]
    send, drop = gate.known(OLD)  # the same broker came back: its own answers go, in order
    assert send == [mine, mine_too] and drop == [other]
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
