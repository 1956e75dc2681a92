"""Admission and load shedding, without I/O: whether a request the broker cannot send at once may wait, and why not.

The Dispatcher asks (`client_refusal` for a client's own bounds, `queue_refusal` for the model's queue) and applies
the answer: a `Refusal` is an OVERLOADED it sends the client, None is "go ahead". What it decides:
- a client past its bound on requests here (`client_max_in_flight`), or not reading its replies, is refused;
- load shedding: a request that would wait in the queue longer than its model's bound (`max_queue_wait_ms` in the
  model's config, else `timings.max_queue_wait`), estimated from the queue's length and the model's measured
  service rate (ServiceRate), is refused with a `retry_after`; never before a rate is known;
- past `broker_queue_limit` requests waiting in all, a request is refused.
"""

from __future__ import annotations

from typing import NamedTuple

from cluster.config import RETRY_AFTER_MAX, RETRY_AFTER_MIN, Timings

RATE_WINDOW_S = 1.0  # a model's service rate is measured over windows this long ...
RATE_WEIGHT = 0.3  # ... and each saturated window's rate weighs this much in the moving average (EWMA)
FIRST_RATE_COMPLETIONS = 8  # the first estimate comes sooner: after this many completions with a queue waiting


class ServiceRate:
    """Completions per second of one model, as an EWMA over RATE_WINDOW_S windows. Only windows that ended with
    requests queued count: a model that is not saturated completes what arrives, which says nothing of how fast it
    could go (and would make the estimate refuse too early). `per_second` is None until the first estimate, which
    comes after FIRST_RATE_COMPLETIONS saturated completions rather than a whole window: a flood that arrives faster
    than a window would otherwise queue whole before anything could be refused."""

    def __init__(self, now: float) -> None:
        self.window_start = now
        self.completed = 0
        self.per_second: float | None = None

    def completion(self, now: float, saturated: bool) -> None:
        self.completed += 1
        elapsed = now - self.window_start
        first = self.per_second is None and self.completed >= FIRST_RATE_COMPLETIONS and elapsed > 0
        if elapsed < RATE_WINDOW_S and not first:
            return
        if saturated:
            rate = self.completed / elapsed
            self.per_second = (
                rate if self.per_second is None else (1 - RATE_WEIGHT) * self.per_second + RATE_WEIGHT * rate
            )
        self.window_start, self.completed = now, 0


class Refusal(NamedTuple):
    """An OVERLOADED for the client: why, and when it may come back (None: not known)."""

    text: str
    retry_after: float | None
    shed: bool = False  # refused for the expected wait (load shedding), not for a count


class Admission:
    def __init__(self, timings: Timings, max_queue_wait_ms: dict[str, int]) -> None:
        self.timings = timings
        self.max_queue_wait_ms = max_queue_wait_ms  # model -> its config's bound, from READY (the AgentTable's)
        self.rates: dict[str, ServiceRate] = {}  # model -> its measured service rate

    def client_refusal(self, load: int, congested: bool) -> Refusal | None:
        """A client's new request, against its own bounds: `load` requests of it here already; `congested`: it is
        not reading its replies (the broker holds some for it)."""
        if congested:
            text = (
                "this client is not reading its replies (the broker holds replies it has not taken); read them, "
                "then try again"
            )
            return Refusal(text, 1.0)
        if load >= self.timings.client_max_in_flight:
            return Refusal(
                f"this client has {load} requests in flight, the most one client may have; try again later", 1.0
            )
        return None

    def queue_refusal(self, model: str, queued: int, pending_count: int) -> Refusal | None:
        """A new request of `model` no agent has a free slot for, with `queued` of that model and `pending_count` in
        all waiting: None if it may wait; else why not (shed for the wait, with a retry_after; or the queue full)."""
        wait, bound = self.expected_wait(model, queued), self.queue_wait_bound(model)
        if wait is not None and bound > 0 and wait > bound:
            retry_after = self.retry_after(wait)
            text = (
                f"model '{model}': about {wait:.1f} s of queue ahead, over its {bound:g} s bound; "
                f"try again in {retry_after:g} s"
            )
            return Refusal(text, retry_after, shed=True)
        if pending_count >= self.timings.broker_queue_limit:
            text = f"model '{model}': {pending_count} requests already waiting; try again later"
            return Refusal(text, None if wait is None else self.retry_after(wait))
        return None

    def completion(self, model: str, now: float, saturated: bool) -> None:
        """A request of `model` was answered; `saturated`: others wait in its queue."""
        rate = self.rates.get(model)
        if rate is None:
            rate = self.rates[model] = ServiceRate(now)
        rate.completion(now, saturated)

    @staticmethod
    def retry_after(wait: float) -> float:
        """When a refused client may come back (`retry_after`, seconds): once the queue ahead of it now has been
        served (`wait`: expected_wait, its length over the model's measured rate), within RETRY_AFTER_MIN and
        RETRY_AFTER_MAX. Not merely once the queue is back under its bound (a few ms away at the margin): every
        refused client would come back at once, to be refused again."""
        return round(min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, wait)), 3)

    def queue_wait_bound(self, model: str) -> float:
        """Seconds a request of `model` may expect to wait in the queue (0: no bound): its config's
        max_queue_wait_ms, announced by its agents, else the broker's default."""
        configured = self.max_queue_wait_ms.get(model, 0)
        return configured / 1000 if configured > 0 else self.timings.max_queue_wait

    def expected_wait(self, model: str, queued: int) -> float | None:
        """How long a request queued for `model` now, behind `queued` others, would wait: its place in the queue
        over the model's measured service rate. None while no rate is known (then nothing is refused for its wait)."""
        rate = self.rates.get(model)
        if rate is None or not rate.per_second:
            return None
        return (queued + 1) / rate.per_second
