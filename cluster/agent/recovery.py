"""The agent's recovery by restart: what makes it drain and exit for its supervisor to start it afresh.

A model call that never returns (past max(hang_factor x its request's deadline, hang_min)), or resident memory past
`max_memory`, makes the agent stop taking work, say why (heartbeat `drain_reason`, an error in its log), finish its
other requests within the drain timeout and exit with EXIT_HUNG or EXIT_MEMORY: its supervisor (`cluster up`,
Kubernetes) restarts it, and the broker re-dispatches what it still held. A thread cannot be cancelled, nor memory a
model leaked given back, so a fresh process is the recovery. The watchdog ends a process whose stopping takes too
long, or whose I/O loop itself stopped turning (a model run inline that never returned).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable

from cluster.config import AGENT_DRAIN_TIMEOUT_S, Timings

log = logging.getLogger("cluster.agent")

EXIT_AGENT_ID_IN_USE = 3  # `cluster agent`'s exit status when the broker keeps refusing its id (another has it)
EXIT_HUNG = 4  # ... when a model call never returned (past the hang bound): restart me
EXIT_MEMORY = 5  # ... when its resident memory passed --max-memory: restart me


def resident_bytes() -> int:
    """This process's resident memory (RSS) now; the peak where /proc is missing (not Linux)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Recovery:
    """The restart rules of one agent: `check` each beat, `restart` to drain towards an exit status, `watchdog` for
    a process. It sets `stop` (the agent's stop event) to start the drain."""

    def __init__(self, agent_id: str, timings: Timings, max_memory_mib: float, stop: threading.Event) -> None:
        self.agent_id = agent_id
        self.timings = timings
        self.stop = stop
        self.max_memory = int(max_memory_mib * 1024 * 1024) or None  # bytes; None: no limit
        self.rss = resident_bytes()
        self.drain_reason: str | None = None  # why it drains to exit on its own (hung call, memory); None: it is not
        self.code = 0  # the exit status it drains towards (EXIT_HUNG, EXIT_MEMORY)
        self.loop_turned: float | None = None  # the I/O loop's last pass (the watchdog's view; None: not running)
        self.drain_timeout = AGENT_DRAIN_TIMEOUT_S  # what run() was given

    def check(self, hung: tuple[str, float] | None) -> None:
        """Each beat: note the resident memory; a model call past its hang bound (`hung`: the pool's oldest such
        call, model and seconds), or memory past `max_memory`, makes the agent drain and exit (restart())."""
        self.rss = resident_bytes()
        if hung is not None:
            name, running = hung
            self.restart(
                EXIT_HUNG,
                f"a call of model '{name}' has run for {running:.1f} s and never returned (bound: "
                f"{self.timings.hang_factor:g} x its request's deadline, at least {self.timings.hang_min:g} s)",
            )
        elif self.max_memory is not None and self.rss > self.max_memory:
            self.restart(
                EXIT_MEMORY,
                f"resident memory {self.rss / 2**20:.0f} MiB is past its limit of {self.max_memory / 2**20:.0f} MiB "
                "(--max-memory)",
            )

    def restart(self, code: int, reason: str) -> None:
        """Stop taking work, say why (heartbeat `drain_reason`, log), finish what can be finished within the drain
        timeout and exit with `code`."""
        if self.code:
            return
        self.code, self.drain_reason = code, reason
        log.error(
            "agent %s: %s; draining and exiting (status %d) for its supervisor to restart it",
            self.agent_id,
            reason,
            code,
        )
        self.stop.set()

    def start_watchdog(self, exit_code: Callable[[], int]) -> None:
        """For a process (`cluster agent`): a thread that ends it with os._exit (status `exit_code()`, else the
        restart's, else EXIT_HUNG) when stopping takes longer than the drain timeout and a margin, or when the I/O
        loop itself stopped turning for the hang bound (a model run inline that never returned): then nothing else
        would."""

        def watch() -> None:
            stop_seen = None
            woke = resumed = time.monotonic()
            while True:
                time.sleep(0.5)
                now = time.monotonic()
                if now - woke > 2.0:  # the process was paused (SIGSTOP, a VM stall): that time is no one's fault
                    resumed = now
                    stop_seen = None if stop_seen is None else stop_seen + (now - woke)
                woke = now
                if self.stop.is_set() and stop_seen is None:
                    stop_seen = now
                turned = None if self.loop_turned is None else max(self.loop_turned, resumed)
                stuck_loop = (
                    turned is not None
                    and self.timings.hang_factor > 0
                    and now - turned > max(self.timings.hang_min, 2 * self.timings.expiry)
                )
                late_stop = stop_seen is not None and now - stop_seen > self.drain_timeout + 5.0
                if stuck_loop or late_stop:
                    why = "stopping took too long" if late_stop else "its I/O loop is stuck (a model run inline hung)"
                    log.error("agent %s: %s; exiting now", self.agent_id, why)
                    logging.shutdown()
                    os._exit(exit_code() or self.code or EXIT_HUNG)

        threading.Thread(target=watch, name="agent-watchdog", daemon=True).start()
