"""One process that LocalCluster (cluster/local.py) started: what it runs, its log, and stopping it by pid
(SIGTERM, then SIGKILL after a deadline). Apart from the harness so that its bookkeeping reads on its own."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("cluster.local")  # the harness's logger, whose lines these are

STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL


class StartError(RuntimeError):
    """A role process exited, or did not get ready in time, while LocalCluster started it."""

    def __init__(self, message: str, proc: Proc) -> None:
        super().__init__(message)
        self.proc = proc


@dataclass(eq=False)
class Proc:
    """One process LocalCluster started: what it runs, and how to stop it (by pid)."""

    role: str
    name: str
    argv: tuple[str, ...]  # the whole command line
    popen: subprocess.Popen
    log_path: Path | None  # None: its output goes to this process's stdout/stderr
    args: tuple[str, ...] = ()  # a role's own arguments (LocalCluster.restart starts it again with them) ...
    env: dict[str, str] = field(default_factory=dict)  # ... and the environment given to this start only
    addresses: dict[str, str] = field(default_factory=dict)  # from its ready file; empty for agents
    retired: bool = False  # stopped, killed or restarted on purpose: exited() does not count it
    started_at: float = field(default_factory=time.monotonic)  # when it was started (time.monotonic())

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def url(self) -> str:
        """An edge's http(s)://host:port."""
        return self.addresses["edge"]

    @property
    def port(self) -> int:
        """An edge's TCP port."""
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGTERM by pid, without waiting."""
        self.retired = True
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def kill(self, timeout: float = 10.0) -> None:
        """kill -9 by pid, and reap it."""
        self.retired = True
        if self.alive():
            self.popen.kill()
        self.popen.wait(timeout)

    def wait(self, timeout: float) -> int:
        """Wait up to `timeout` s for it to exit; SIGKILL it if it has not. Returns the exit status."""
        try:
            return self.popen.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in time; SIGKILL", self.name, self.pid)
            self.kill()
            return self.popen.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM by pid, wait, SIGKILL if it does not go; returns the exit status."""
        self.terminate()
        return self.wait(timeout)
