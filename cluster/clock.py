"""A process's own stalls, so that it judges its peers only over time it ran (DESIGN.md, Liveness).

A process that was paused (SIGSTOP, a VM stall, a long GC pause) finds, on resuming, every peer "silent" for as
long as the pause, while their messages wait unread in its sockets (or still in the kernel: ZeroMQ's I/O thread
was paused too, so a poll right after the resume may not see them yet). The broker, the agents and the manager each
keep a `RunClock`, look at it once per pass of their loop, and move their peers' last-heard times forward by what
it says they did not run: silence is counted only while the judge ran.
"""

from __future__ import annotations

import logging


class RunClock:
    """Notices the owner's stalls: a gap between two `look`s longer than `bound` (what one pass of its loop may
    normally take) is a stall, and its excess over `bound` is time the owner did not run. Only the excess: a loop
    whose passes all take longer than `bound` still counts `bound` of each, so its peers can still expire."""

    def __init__(self, bound: float, now: float, name: str = "", log: logging.Logger | None = None) -> None:
        if bound <= 0:
            raise ValueError("a RunClock's bound must be > 0")
        self.bound = bound
        self.last = now
        self.lost = 0.0  # seconds not run, in all (what `look` has returned)
        self.stalls = 0  # stalls noticed
        self.name = name
        self.log = log
        self.log_from = max(1.0, 4 * bound)  # stalls this long are logged (shorter ones are frequent on a busy host)

    def look(self, now: float) -> float:
        """Once per loop pass, with the monotonic time: the seconds since the last look that the owner did not
        run (0.0 normally). The caller moves its peers' last-heard times forward by that (`pardon`)."""
        gap = now - self.last
        self.last = now
        if gap <= self.bound:
            return 0.0
        lost = gap - self.bound
        self.lost += lost
        self.stalls += 1
        if self.log is not None and gap >= self.log_from:
            self.log.warning(
                "%s paused (did not run) for %.1f s: reading what waits before judging any peer silent",
                self.name or "this process",
                gap,
            )
        return lost


def pardon(last_heard: float, lost: float, now: float) -> float:
    """A peer's last-heard time moved forward by `lost` seconds the judge did not run, never past `now`."""
    return min(now, last_heard + lost)
