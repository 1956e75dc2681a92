"""The command-line options every role's command shares (typer), defined once: the `cluster` commands (cluster/cli/)
and `python -m edge` (edge/command.py, below the CLI) both take them from here."""

from __future__ import annotations

import enum

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
