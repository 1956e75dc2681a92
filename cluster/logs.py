"""Logging: for messages peers control (a flood of bad input must not become a flood of log lines), and the two
formats every role writes (`--log-format text|json`; JSON lines carry the component, the agent id and, where there
is one, the request id, so one request can be followed across processes)."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone


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


# ---- formats ---------------------------------------------------------------------------------------------------

LOG_FORMATS = ("text", "json")
CONTEXT: dict[str, str] = {}  # fields every JSON line of this process carries, e.g. {"agent": "gpu-1"} in an agent


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log search: time (UTC, ISO 8601 with ms), level, component (the role), pid,
    agent (an agent's own id), logger, message, request_id (where the record has one: `extra={"request_id": ...}`),
    and the traceback as `exc`. Keys with no value are left out."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "component": self.component,
            "pid": record.process,
            **CONTEXT,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "agent_id", "model"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def logging_config(component: str, level: str = "INFO", fmt: str = "text") -> dict:
    """A logging.config.dictConfig for one role's process: every logger (ours and uvicorn's) to stderr, as text
    (`time role[pid] LEVEL message`) or JSON lines (JsonFormatter)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    formatter = (
        {"()": JsonFormatter, "component": component}
        if fmt == "json"
        else {"format": f"%(asctime)s {component}[%(process)d] %(levelname)s %(message)s"}
    )
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    quiet = {"level": level.upper(), "handlers": ["main"], "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "root": {"level": level.upper(), "handlers": ["main"]},
        "loggers": {name: dict(quiet) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
