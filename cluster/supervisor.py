"""What `cluster up` does when one of its processes dies, as systemd's Restart=on-failure: the logic, without
processes or clocks (LocalCluster.supervise feeds it and does what it decides).

    supervisor = Supervisor(RestartPolicy())
    supervisor.started("broker-1", now)
    decision = supervisor.exited("broker-1", now, -9)   # Decision(action=RESTART, delay=0.5, ...)
    supervisor.due(now + 0.5)                           # ["broker-1"]: restart it now (then call started again)

- A failure (non-zero exit status, or death by a signal other than SIGTERM, SIGINT, SIGHUP, SIGPIPE) is restarted
  after a backoff: `backoff_initial`, doubling with each failure in a row, up to `backoff_max`. Each `backoff_decay`
  seconds a process stayed up before it failed takes one doubling back, and `backoff_reset` seconds start the doubling
  again: a process that served between kills restarts fast, one that dies within seconds of its start backs off.
- A process restarted `crash_restarts` times within `crash_window` seconds is in a crash loop: its next failure is
  given up on (GIVE_UP), and it is not restarted again.
- A clean exit (status 0, or SIGTERM, SIGINT, SIGHUP, SIGPIPE: someone asked it to stop) is not restarted (CLEAN).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from cluster.config import RestartPolicy

RESTART = "restart"
GIVE_UP = "give up"
CLEAN = "clean exit"

CLEAN_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE})  # as systemd's


def describe_status(status: int | None) -> str:
    """A Popen return code in words: "exit status 3", "killed by SIGKILL"."""
    if status is None:
        return "exit status unknown"
    if status >= 0:
        return f"exit status {status}"
    try:
        return f"killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"killed by signal {-status}"


def is_clean(status: int | None) -> bool:
    """systemd's clean exit: status 0, or killed by SIGTERM, SIGINT, SIGHUP or SIGPIPE."""
    return status == 0 or (status is not None and status < 0 and -status in CLEAN_SIGNALS)


@dataclass(frozen=True)
class Decision:
    """What to do about one exit."""

    name: str
    action: str  # RESTART, GIVE_UP or CLEAN
    status: int | None  # the exit status (negative: the signal that killed it)
    uptime: float  # seconds it ran
    delay: float = 0.0  # RESTART: seconds to wait before restarting it
    restarts: int = 0  # restarts within the crash window, this one included

    @property
    def how(self) -> str:
        return describe_status(self.status)


@dataclass
class _Child:
    started_at: float
    failures: int = 0  # failures in a row (each doubles the backoff)
    restarts: list[float] = field(default_factory=list)  # when it was restarted, within the crash window
    due: float | None = None  # when to restart it; None: it runs, or it is done with
    given_up: bool = False


class Supervisor:
    """Restart / backoff / give-up decisions for named processes, from "started at t" and "exited at t with status s"
    events; times are any monotonic clock's seconds."""

    def __init__(self, policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self._children: dict[str, _Child] = {}

    def started(self, name: str, now: float) -> None:
        """`name` was started (or restarted) at `now`."""
        child = self._children.setdefault(name, _Child(started_at=now))
        child.started_at, child.due, child.given_up = now, None, False

    def exited(self, name: str, now: float, status: int | None) -> Decision:
        """`name` exited at `now` with `status` (a Popen return code): restart it (when: `due`), or not."""
        child = self._children.setdefault(name, _Child(started_at=now))
        uptime = max(0.0, now - child.started_at)
        if is_clean(status):
            child.due = None
            return Decision(name, CLEAN, status, uptime)
        policy = self.policy
        if uptime >= policy.backoff_reset:
            child.failures = 0
        elif policy.backoff_decay > 0:
            child.failures = max(0, child.failures - int(uptime // policy.backoff_decay))
        child.restarts = [t for t in child.restarts if now - t < policy.crash_window]
        if len(child.restarts) >= policy.crash_restarts:
            child.due, child.given_up = None, True
            return Decision(name, GIVE_UP, status, uptime, restarts=len(child.restarts))
        delay = min(policy.backoff_initial * 2 ** min(child.failures, 32), policy.backoff_max)
        child.failures += 1
        child.restarts.append(now)
        child.due = now + delay
        return Decision(name, RESTART, status, uptime, delay=delay, restarts=len(child.restarts))

    def due(self, now: float) -> list[str]:
        """The processes whose restart time has come, soonest first; each is returned once (call `started` when it is
        started again)."""
        names = sorted((c.due, n) for n, c in self._children.items() if c.due is not None and c.due <= now)
        for _, name in names:
            self._children[name].due = None
        return [name for _, name in names]

    def next_due(self) -> float | None:
        """When the next restart is due (None: none is waiting)."""
        return min((c.due for c in self._children.values() if c.due is not None), default=None)

    def given_up(self) -> list[str]:
        """The processes given up on (in a crash loop)."""
        return sorted(n for n, c in self._children.items() if c.given_up)
