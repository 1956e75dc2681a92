"""What the `cluster` commands share: the options several of them take, logging, signals, the ready file, tables."""

from __future__ import annotations

import logging
import signal

import typer

from cluster.options import ReadyFile  # noqa: F401 (the commands import it from here)


def _setup_logging(level: str, role: str, fmt: str = "text") -> None:
    """Every logger of this process to stderr, as text or JSON lines (cluster/logs.py)."""
    import logging.config

    from cluster.logs import logging_config

    logging.config.dictConfig(logging_config(role, level, fmt))


def _stop_on_signals(component) -> None:
    """SIGTERM and Ctrl-C stop the component's loop cleanly (it polls with short timeouts)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: component.stop())


def _security(key: str | None):
    """The CURVE settings of a role started with --key (None: in the clear); a bad key file stops it with a message."""
    from cluster.auth import BusSecurity
    from cluster.keys import KeyDirError

    try:
        return BusSecurity.load(key)
    except KeyDirError as exc:
        typer.echo(f"--key: {exc}", err=True)
        raise typer.Exit(2) from None


def _report_ready(ready_file: str | None, role: str, **sockets) -> None:
    """Log where the role's sockets really listen (port 0 binds any port) and tell LocalCluster (--ready-file). A
    value that is a string is an address already (e.g. the broker's metrics URL)."""
    from cluster.local import write_ready_file
    from cluster.sockets import bound_address

    addresses = {key: sock if isinstance(sock, str) else bound_address(sock) for key, sock in sockets.items()}
    listening = ", ".join(f"{key} {address}" for key, address in addresses.items())
    logging.getLogger(f"cluster.{role}").info("%s listening: %s", role, listening)
    if ready_file:
        write_ready_file(ready_file, role, addresses)


def _table(title: str, *columns: str):
    """A rich table that never cuts a cell with an ellipsis: the first column (an agent id, a model name) stays on
    one line, whole, at 80 columns too; the others wrap."""
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, no_wrap=i == 0, overflow="fold")
    return table
