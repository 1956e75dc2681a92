"""What the `cluster` commands share: the options several of them take, logging, signals, the ready file, tables."""

from __future__ import annotations

import enum
import logging
import signal

import typer

from cluster import config

BrokerClients = typer.Option(
    config.BROKER_CLIENT_ADDR, envvar="CLUSTER_BROKER_CLIENTS", help="Broker address for clients."
)
BrokerAgents = typer.Option(config.BROKER_AGENT_ADDR, envvar="CLUSTER_BROKER_AGENTS", help="Broker address for agents.")
ManagerHeartbeats = typer.Option(
    config.MANAGER_HEARTBEAT_ADDR,
    envvar="CLUSTER_MANAGER_HEARTBEATS",
    help="Manager heartbeat address (agents publish here).",
)
ManagerEvents = typer.Option(
    config.MANAGER_EVENTS_ADDR,
    envvar="CLUSTER_MANAGER_EVENTS",
    help="Manager registry-event address (the broker subscribes).",
)
ManagerQueries = typer.Option(
    config.MANAGER_QUERY_ADDR, envvar="CLUSTER_MANAGER_QUERIES", help="Manager query address."
)
Interval = typer.Option(
    None, "--heartbeat-interval", envvar="CLUSTER_HEARTBEAT_INTERVAL", help="Seconds between heartbeats (default 1)."
)
Liveness = typer.Option(
    None, "--liveness", envvar="CLUSTER_LIVENESS", help="Missed heartbeats before a peer is dead (default 3)."
)
LogLevel = typer.Option("INFO", "--log-level", envvar="CLUSTER_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR.")


class LogFormatName(str, enum.Enum):
    text = "text"
    json = "json"


LogFormat = typer.Option(
    LogFormatName.text,
    "--log-format",
    envvar="CLUSTER_LOG_FORMAT",
    help="text, or json: one JSON object a line (time, level, component, agent, message, request_id).",
)
Key = typer.Option(
    None,
    "--key",
    envvar="CLUSTER_KEY",
    help="Key file (`cluster keys`): every bus socket uses CURVE with it. The broker and manager take DIR/server.key "
    "and read DIR/members.json. Without it: the bus in the clear.",
)
ReadyFile = typer.Option(
    None,
    "--ready-file",
    help="Once listening, write the addresses really bound and the pid here (JSON). Port 0 in an address: any port.",
)


def _setup_logging(level: str, role: str, fmt: str = "text") -> None:
    """Every logger of this process to stderr, as text or JSON lines (cluster/logs.py)."""
    import logging.config

    from cluster.logs import logging_config

    logging.config.dictConfig(logging_config(role, level, fmt))


def _stop_on_signals(component) -> None:
    """SIGTERM and Ctrl-C stop the component's loop cleanly (it polls with short timeouts)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: component.stop())


def _addresses(**kwargs) -> config.Addresses:
    return config.Addresses(**{k: v for k, v in kwargs.items() if v is not None})


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
    """Log where the role's sockets really listen (port 0 binds any port) and tell LocalCluster (--ready-file)."""
    from cluster.local import write_ready_file
    from cluster.sockets import bound_address

    addresses = {key: bound_address(sock) for key, sock in sockets.items()}
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
