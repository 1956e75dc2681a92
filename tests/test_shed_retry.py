"""Load shedding's retry_after (issue 18 point 8), in process: a refused client is told to come back once the queue
ahead of it has been served (queue length over the model's measured rate), bounded, not a fixed 0.1 s whatever the
queue (in a 10x flood 89-95% of refusals carried 0.1 s, so every refused client came straight back to be refused
again; bench/flood_recovery.py measures it on real processes)."""

from __future__ import annotations

import pytest

from cluster.broker import Dispatcher
from cluster.config import RETRY_AFTER_MAX, RETRY_AFTER_MIN
from cluster.errors import error_from_header
from cluster.protocol import unpack_header
from tests.test_broker_logic import client_errors, dispatcher, ready, request
from tests.test_cancel_shed import saturate


def refusal_retry_after(d: Dispatcher, rid: int, now: float) -> float | None:
    (refusal,) = [s for s in request(d, rid, now=now) if not s.to_agent]
    return error_from_header(unpack_header(refusal.frames[2])).retry_after


def test_retry_after_follows_the_queue_not_a_fixed_floor():
    d = dispatcher(max_queue_wait=2.0, broker_queue_limit=1000)
    ready(d, "a1", capacity=1)
    now, rid = saturate(d)
    rate = d.rates["m"].per_second
    while not client_errors(request(d, rid, now=now)):  # fill the queue to its 2 s bound
        rid += 1
    rid += 1
    first = refusal_retry_after(d, rid, now)
    assert first == pytest.approx((d.pending_count + 1) / rate, abs=0.01) and first > 2.0, first
    # The model got slower (a quarter of the rate): the same queue now takes four times as long to serve.
    d.rates["m"].per_second = rate / 4
    assert refusal_retry_after(d, rid + 1, now) == pytest.approx(4 * first, rel=0.01)


def test_retry_after_is_bounded():
    assert Dispatcher.retry_after(0.001) == RETRY_AFTER_MIN
    assert Dispatcher.retry_after(2.345) == 2.345
    assert Dispatcher.retry_after(10_000.0) == RETRY_AFTER_MAX


def test_a_full_broker_queue_also_says_when_to_come_back_once_a_rate_is_known():
    d = dispatcher(max_queue_wait=0.0, broker_queue_limit=40)  # no wait bound: only the queue's length refuses
    ready(d, "a1", capacity=1)
    now, rid = saturate(d, seconds=1)
    while not client_errors(request(d, rid, now=now)):
        rid += 1
    retry_after = refusal_retry_after(d, rid + 1, now)
    assert retry_after == pytest.approx((d.pending_count + 1) / d.rates["m"].per_second, abs=0.01), retry_after
