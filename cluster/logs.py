"""Logging for messages peers control: a flood of bad input must not become a flood of log lines."""

from __future__ import annotations

import logging
import time


class BadInputLog:
    """Warns about bad messages at most `per_second` times a second; says how many it left out when it resumes."""

    def __init__(self, log: logging.Logger, per_second: int = 10) -> None:
        self.log = log
        self.per_second = per_second
        self._window = 0.0
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args) -> None:
        self._emit(logging.WARNING, msg, args)

    def error(self, msg: str, *args) -> None:
        self._emit(logging.ERROR, msg, args)

    def _emit(self, level: int, msg: str, args: tuple) -> None:
        now = time.monotonic()
        if now - self._window >= 1.0:
            if self._suppressed:
                self.log.warning("(%d more bad messages in the last second were not logged)", self._suppressed)
            self._window, self._count, self._suppressed = now, 0, 0
        if self._count < self.per_second:
            self._count += 1
            self.log.log(level, msg, *args)
        else:
            self._suppressed += 1
