"""The four roles, each run on its own: `cluster manager`, `broker`, `agent` and `edge`."""

from __future__ import annotations

import logging
import os

import typer

from cluster import config
from cluster.cli.common import (
    BrokerAgents,
    BrokerClients,
    Interval,
    Key,
    Liveness,
    LogFormat,
    LogFormatName,
    LogLevel,
    ManagerEvents,
    ManagerHeartbeats,
    ManagerQueries,
    ReadyFile,
    _addresses,
    _report_ready,
    _security,
    _setup_logging,
    _stop_on_signals,
)

Share = typer.Option(
    None, "--share", envvar="CLUSTER_SHARE", help="Model repository folder (default under the user's data dir)."
)


def manager(
    share: str | None = Share,
    heartbeats: str = ManagerHeartbeats,
    events: str = ManagerEvents,
    queries: str = ManagerQueries,
    heartbeat_interval: float | None = Interval,
    liveness: int | None = Liveness,
    log_level: str = LogLevel,
    log_format: LogFormatName = LogFormat,
    ready_file: str | None = ReadyFile,
    key: str | None = Key,
):
    """Run the lifecycle manager: registry of live agents from their heartbeats."""
    from cluster.manager import Manager

    _setup_logging(log_level, "manager", log_format.value)
    timings = config.timings_from_env(heartbeat_interval=heartbeat_interval, liveness=liveness)
    component = Manager(
        _addresses(manager_heartbeats=heartbeats, manager_events=events, manager_queries=queries),
        timings,
        share=share or config.default_share_dir(),
        security=_security(key),
    )
    _stop_on_signals(component)
    _report_ready(
        ready_file,
        "manager",
        manager_heartbeats=component.heartbeats,
        manager_events=component.events,
        manager_queries=component.queries,
    )
    component.run()


def broker(
    clients: str = BrokerClients,
    agents: str = BrokerAgents,
    events: str = ManagerEvents,
    manager_queries: str = typer.Option(
        config.MANAGER_QUERY_ADDR,
        "--manager-queries",
        envvar="CLUSTER_MANAGER_QUERIES",
        help="The manager's query address: the broker tells it which agents it routes to (for rollouts).",
    ),
    policy: str = typer.Option(
        "round-robin", envvar="CLUSTER_POLICY", help="Routing policy: round-robin or least-outstanding."
    ),
    heartbeat_interval: float | None = Interval,
    liveness: int | None = Liveness,
    max_queue_wait: float | None = typer.Option(
        None,
        "--max-queue-wait",
        help="Load shedding: refuse at once (OVERLOADED) a request expected to wait longer than this many seconds "
        "in the queue (default 5; 0 = off; a model's config max_queue_wait_ms overrides it).",
    ),
    hedge_after: float | None = typer.Option(
        None,
        "--hedge-after",
        metavar="MS",
        help="Hedging: a request at one agent for longer than MS milliseconds is also sent to another agent; the "
        "first answer wins, the other copy is cancelled (default: off; CLUSTER_HEDGE_AFTER in seconds).",
    ),
    log_level: str = LogLevel,
    log_format: LogFormatName = LogFormat,
    ready_file: str | None = ReadyFile,
    key: str | None = Key,
):
    """Run the broker: routes client requests to live agents that have the model."""
    from cluster.broker import Broker

    _setup_logging(log_level, "broker", log_format.value)
    timings = config.timings_from_env(
        heartbeat_interval=heartbeat_interval,
        liveness=liveness,
        max_queue_wait=max_queue_wait,
        hedge_after=None if hedge_after is None else hedge_after / 1000,
    )
    component = Broker(
        _addresses(
            broker_clients=clients, broker_agents=agents, manager_events=events, manager_queries=manager_queries
        ),
        timings,
        policy,
        security=_security(key),
    )
    _stop_on_signals(component)
    _report_ready(ready_file, "broker", broker_clients=component.clients, broker_agents=component.agents_sock)
    component.run()


def agent(
    share: str = typer.Option(
        None,
        envvar="CLUSTER_SHARE",
        help="Model repository: a folder (e.g. an NFS mount) or nfs://server/export "
        "(read with libnfs into a local cache).",
    ),
    cache: str | None = typer.Option(
        None, envvar="CLUSTER_SHARE_CACHE", help="Local cache for an nfs:// share (default under ~/.cache)."
    ),
    broker: str = BrokerAgents,
    heartbeats: str = ManagerHeartbeats,
    agent_id: str | None = typer.Option(None, "--id", envvar="CLUSTER_AGENT_ID", help="Agent id (default host-pid)."),
    capacity: int = typer.Option(4, envvar="CLUSTER_CAPACITY", help="Requests this agent takes at once."),
    workers: int = typer.Option(1, envvar="CLUSTER_WORKERS", help="Inference threads."),
    threads: int = typer.Option(
        1, envvar="CLUSTER_TORCH_THREADS", help="torch intra-op threads per agent (0: torch's default)."
    ),
    device: str = typer.Option("cpu", envvar="CLUSTER_DEVICE", help="cpu, cuda or cuda:N."),
    models: str | None = typer.Option(
        None, envvar="CLUSTER_MODELS", help="Comma-separated model names to serve (default: all in the share)."
    ),
    heartbeat_interval: float | None = Interval,
    liveness: int | None = Liveness,
    log_level: str = LogLevel,
    log_format: LogFormatName = LogFormat,
    key: str | None = Key,
    max_memory: float = typer.Option(
        config.AGENT_MAX_MEMORY_MIB,
        "--max-memory",
        envvar="CLUSTER_MAX_MEMORY",
        help="Resident memory limit in MiB (0: none): past it the agent drains and exits with status 5, to be "
        "restarted by its supervisor.",
    ),
    hang_factor: float | None = typer.Option(
        None,
        "--hang-factor",
        envvar="CLUSTER_HANG_FACTOR",
        help="A model call running longer than this many times its request's deadline (and --hang-min) never "
        "returns: the agent drains and exits with status 4, to be restarted (0: never; default 2).",
    ),
    hang_min: float | None = typer.Option(
        None, "--hang-min", envvar="CLUSTER_HANG_MIN", help="Seconds: no call counts as hung sooner (default 10)."
    ),
    drain_timeout: float = typer.Option(
        config.AGENT_DRAIN_TIMEOUT_S,
        "--drain-timeout",
        envvar="CLUSTER_DRAIN_TIMEOUT",
        help="Seconds a stopping agent finishes its requests before it exits, whatever its models do.",
    ),
):
    """Run an agent: loads the share's models and serves them to the broker."""
    import time

    started = time.perf_counter()
    from cluster.agent import Agent  # torch: most of an agent's start-up (bench/cold_start.py)

    _setup_logging(log_level, "agent", log_format.value)
    logging.getLogger("cluster.agent").info("agent modules (torch) imported in %.2f s", time.perf_counter() - started)
    if max_memory < 0 or drain_timeout < 0:
        typer.echo("--max-memory and --drain-timeout must be >= 0", err=True)
        raise typer.Exit(2)
    try:
        timings = config.timings_from_env(
            heartbeat_interval=heartbeat_interval, liveness=liveness, hang_factor=hang_factor, hang_min=hang_min
        )
    except ValueError as exc:
        typer.echo(f"agent: {exc}", err=True)
        raise typer.Exit(2) from None
    component = Agent(
        share or config.default_share_dir(),
        _addresses(broker_agents=broker, manager_heartbeats=heartbeats),
        timings,
        agent_id=agent_id,
        capacity=capacity,
        workers=workers,
        device=device,
        model_names=[m for m in models.split(",") if m] if models else None,
        cache_dir=cache,
        torch_threads=threads if threads > 0 else None,
        key=key,
        max_memory_mib=max_memory,
    )
    from cluster.logs import CONTEXT

    CONTEXT["agent"] = component.agent_id  # in every JSON line of this process
    _stop_on_signals(component)
    component.start_watchdog()  # stopping never waits on a hung model call past the drain timeout
    component.run(drain_timeout=drain_timeout)
    if component.threads_stuck:  # a thread in a call that never returns: do not wait for it at interpreter exit
        logging.shutdown()
        os._exit(component.exit_code)
    if component.exit_code:
        raise typer.Exit(component.exit_code)
