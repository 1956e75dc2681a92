"""The four roles, each run on its own: `cluster manager`, `broker`, `agent` and `edge`. Each command's options are
its settings class's flags (cluster/role_settings.py): the command builds the settings once and the role takes them."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import typer

from cluster import config
from cluster.cli.common import ReadyFile, _report_ready, _security, _setup_logging, _stop_on_signals
from cluster.options import need_role, settings_command
from cluster.role_settings import AgentSettings, BrokerSettings, ManagerSettings


@settings_command(ManagerSettings)
def manager(settings: ManagerSettings, ready_file: str | None = ReadyFile):
    """Run the lifecycle manager: registry of live agents from their heartbeats."""
    from cluster.manager import Manager

    _setup_logging(settings.log_level, "manager", settings.log_format)
    settings = replace(settings, share=settings.share or config.default_share_dir())
    component = Manager(settings, security=_security(settings.key))
    _stop_on_signals(component)
    _report_ready(
        ready_file,
        "manager",
        manager_heartbeats=component.heartbeats,
        manager_events=component.events,
        manager_queries=component.queries,
    )
    component.run()


@settings_command(BrokerSettings)
def broker(settings: BrokerSettings, ready_file: str | None = ReadyFile):
    """Run the broker: routes client requests to live agents that have the model."""
    from cluster.broker import Broker

    _setup_logging(settings.log_level, "broker", settings.log_format)
    component = Broker(settings, security=_security(settings.key))
    _stop_on_signals(component)
    metrics = {"metrics": component.metrics_url} if component.metrics_url else {}
    _report_ready(
        ready_file, "broker", broker_clients=component.clients, broker_agents=component.agents_sock, **metrics
    )
    component.run()


@settings_command(AgentSettings)
def agent(settings: AgentSettings):
    """Run an agent: loads the share's models and serves them to the broker."""
    import time

    need_role("agent", what="cluster agent")
    started = time.perf_counter()
    from cluster.agent import Agent  # torch: most of an agent's start-up (bench/cold_start.py)

    _setup_logging(settings.log_level, "agent", settings.log_format)
    logging.getLogger("cluster.agent").info("agent modules (torch) imported in %.2f s", time.perf_counter() - started)
    component = Agent(replace(settings, share=settings.share or config.default_share_dir()))
    from cluster.logs import CONTEXT

    CONTEXT["agent"] = component.agent_id  # in every JSON line of this process
    _stop_on_signals(component)
    component.start_watchdog()  # stopping never waits on a hung model call past the drain timeout
    component.run(drain_timeout=settings.drain_timeout)
    if component.threads_stuck:  # a thread in a call that never returns: do not wait for it at interpreter exit
        logging.shutdown()
        os._exit(component.exit_code)
    if component.exit_code:
        raise typer.Exit(component.exit_code)
