"""`cluster status` (the live agents and their models) and `cluster health ROLE` (an exec probe)."""

from __future__ import annotations

import enum

import typer

from cluster import config
from cluster.cli.common import _table
from cluster.options import settings_command
from cluster.protocol import What
from cluster.role_settings import HealthSettings, StatusSettings
from cluster.sizes import format_bytes


@settings_command(StatusSettings)
def status(
    settings: StatusSettings, timeout: float = typer.Option(5.0, help="Seconds to wait for the broker and the manager.")
):
    """Print the brokers (from the manager), the live agents and the models they serve."""
    broker, key = settings.addresses.broker_clients, settings.key
    from rich.console import Console

    from cluster import Client, ClusterError

    with Client(broker, key=key) as client:
        try:
            agents = client.agents(timeout=timeout)
            models = client.models(timeout=timeout)
        except ClusterError as exc:
            typer.echo(f"cannot reach the broker at {broker}: {exc}", err=True)
            raise typer.Exit(1) from None
    console = Console()
    _print_brokers(console, settings.addresses.manager_queries, key, timeout)
    table = _table(f"Agents ({len(agents)})", "id", "host:pid", "device", "models", "load", "memory", "beat", "up")
    for a in sorted(agents, key=lambda a: a["id"]):
        table.add_row(
            a["id"],
            f"{a.get('host')}:{a.get('pid')}",
            str(a.get("device")),
            ", ".join(f"{m['name']} v{m['version']}{_runs(a, m)}" for m in a.get("models", [])),
            f"{a.get('in_flight')}/{a.get('capacity')}" + (" stalled" if a.get("stalled") else ""),
            _memory(a),
            f"{a.get('heartbeat_age', 0):.1f} s",
            f"{a.get('uptime', 0):.0f} s",
        )
    console.print(table)
    table = _table(f"Models ({len(models)})", "model", "versions", "agents")
    for name, info in sorted(models.items()):
        table.add_row(name, ", ".join(map(str, info["versions"])), ", ".join(info["agents"]))
    console.print(table)


def _runs(agent: dict, model: dict) -> str:
    """ " (aoti)", " (exported)", ...: what the agent runs for that version (heartbeat model_info), if it says."""
    versions = (agent.get("model_info") or {}).get(model["name"])
    info = versions.get(str(model["version"])) if isinstance(versions, dict) else None
    return f" ({info['runs']})" if isinstance(info, dict) and isinstance(info.get("runs"), str) else ""


def _print_brokers(console, manager: str, key: str | None, timeout: float) -> None:
    """The brokers table, from the manager's `brokers` answer (each broker's latest report); a manager that does not
    answer is said on stderr, and the rest of the status still prints."""
    from cluster import ClusterError
    from cluster.manager.client import ManagerClient

    try:
        brokers = ManagerClient(manager, key=key).call(What.BROKERS, timeout=timeout)
    except ClusterError as exc:
        typer.echo(f"brokers: not known, the manager at {manager} does not answer: {exc}", err=True)
        return
    table = _table(f"Brokers ({len(brokers)})", "name", "agents", "in flight", "queued", "report")
    for b in brokers:
        load = b.get("load") or {}
        gaps = f", {b['gaps']} missed" if b.get("gaps") else ""
        table.add_row(
            str(b.get("name")),
            f"{len(b.get('agents', []))}: " + ", ".join(b.get("agents", [])) if b.get("agents") else "0",
            str(load.get("in_flight", "?")),
            str(load.get("queued", "?")),
            f"{b.get('heard_age', 0):.1f} s ago (#{b.get('seq')}{gaps})",
        )
    console.print(table)


def _memory(agent: dict) -> str:
    """An agent's resident memory (and limit) for `cluster status`, its models' memory of its budget; why it drains,
    when it drains on its own."""
    rss, limit = agent.get("rss"), agent.get("max_memory")
    text = "-" if not isinstance(rss, int) else f"{rss / 2**20:.0f} MiB"
    if isinstance(limit, int):
        text += f" / {limit / 2**20:.0f}"
    budget, held = agent.get("memory_budget"), agent.get("model_info") or {}
    if isinstance(budget, int):  # placement's view: bytes of the models it holds, of its --memory-budget
        used = sum(
            v["memory"]
            for versions in held.values()
            if isinstance(versions, dict)
            for v in versions.values()
            if isinstance(v, dict) and isinstance(v.get("memory"), int)
        )
        text += f"; models {format_bytes(used)} of {format_bytes(budget)}"
    if agent.get("drain_reason"):
        text += f" (restarting: {agent['drain_reason']})"
    return text


class HealthRole(str, enum.Enum):
    manager = "manager"
    broker = "broker"
    agent = "agent"
    edge = "edge"


def _local_address(address: str) -> str:
    """A bind address as a probe connects to it: tcp://0.0.0.0:P and tcp://*:P mean this machine (the probe runs in
    the role's own pod or container), so they become tcp://127.0.0.1:P; any other address is used as it is."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:"):
        if address.startswith(wildcard):
            return "tcp://127.0.0.1:" + address[len(wildcard) :]
    return address


def health_check(
    role: str,
    *,
    broker: str = config.BROKER_CLIENT_ADDR,
    manager: str = config.MANAGER_QUERY_ADDR,
    agent_id: str | None = None,
    edge_url: str = f"http://127.0.0.1:{config.EDGE_PORT}",
    timeout: float = 3.0,
    key: str | None = None,
    ok_if_broker_down: bool = False,
) -> tuple[bool, str]:
    """`cluster health ROLE`: (serving?, one line saying why). One query with a short deadline:

    - manager: an `agents` query to its query socket answered (a server key may ask it, so the manager's own
      CLUSTER_KEY works as the probe's key);
    - broker: a `stats` query to its client socket answered (with keys: a client or admin key);
    - agent: the broker's `agents` answer lists an agent with this id (with keys: a client or admin key);
      ok_if_broker_down: a broker that does not answer says nothing about the agent (serving: True), for a liveness
      probe that must not restart every agent while the broker is away;
    - edge: GET /v2/health/ready answers 200 (what an HTTP probe asks; for places without one).
    """
    from cluster import ClusterError

    try:
        if role == "manager":
            from cluster.manager.client import ManagerClient

            address = _local_address(manager)
            agents = ManagerClient(address, key=key).call(What.AGENTS, timeout=timeout)
            return True, f"manager {address}: serving ({len(agents)} live agents)"
        if role in ("broker", "agent"):
            from cluster import Client

            address = _local_address(broker)
            with Client(address, timeout=timeout, key=key) as client:
                if role == "broker":
                    stats = client.stats(timeout=timeout)
                    return True, (
                        f"broker {address}: serving ({stats.get('agents', '?')} agents, "
                        f"{stats.get('in_flight', '?')} in flight, {stats.get('queued', '?')} queued)"
                    )
                if not agent_id:
                    return False, "agent: no agent id to look for (give --id or CLUSTER_AGENT_ID)"
                try:
                    agents = client.agents(timeout=timeout)
                except ClusterError as exc:
                    if not ok_if_broker_down:
                        raise
                    why = " ".join(str(exc).split())
                    return True, f"agent {agent_id}: cannot tell, the broker {address} does not answer ({why})"
            mine = next((a for a in agents if a.get("id") == agent_id), None)
            if mine is None:
                return False, f"agent {agent_id}: not registered at the broker {address} ({len(agents)} others are)"
            served = ", ".join(f"{m['name']} v{m['version']}" for m in mine.get("models", [])) or "no models"
            return True, f"agent {agent_id}: registered at the broker {address}, serves {served}"
        if role == "edge":
            import ssl
            import urllib.error
            import urllib.request

            url = edge_url.rstrip("/") + "/v2/health/ready"
            context = ssl._create_unverified_context() if url.startswith("https:") else None  # a probe, not a client
            try:
                with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
                    return True, f"edge {url}: ready (HTTP {answer.status})"
            except urllib.error.HTTPError as exc:
                return False, f"edge {url}: not ready (HTTP {exc.code})"
            except (OSError, ValueError) as exc:
                return False, f"edge {url}: not serving: {getattr(exc, 'reason', exc)}"
        return False, f"unknown role {role!r}: manager, broker, agent or edge"
    except ClusterError as exc:
        where = {"manager": _local_address(manager), "edge": edge_url}.get(role, _local_address(broker))
        return False, f"{role} {where}: not serving: {' '.join(str(exc).split())}"


@settings_command(HealthSettings)
def health(
    settings: HealthSettings,
    role: HealthRole = typer.Argument(..., help="manager, broker, agent or edge."),
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds to wait for the answer."),
    ok_if_broker_down: bool = typer.Option(
        False,
        "--ok-if-broker-down",
        help="agent: exit 0 when the broker does not answer (it cannot tell), 1 only when the broker answers without "
        "this agent: a liveness probe that does not restart every agent while the broker is away.",
    ),
):
    """Exit 0 if ROLE is serving, 1 if not, with one line saying why: an exec probe for Kubernetes (or any
    supervisor). The manager and the broker must answer a query within --timeout; an agent must be registered at the
    broker under its id; the edge must answer /v2/health/ready. Addresses 0.0.0.0 or * mean this machine."""
    broker, manager = settings.addresses.broker_clients, settings.addresses.manager_queries
    agent_id, edge_url, key = settings.agent_id, settings.health_edge_url, settings.health_key or settings.key
    ok, line = health_check(
        role.value,
        broker=broker,
        manager=manager,
        agent_id=agent_id,
        edge_url=edge_url,
        timeout=timeout,
        key=key,
        ok_if_broker_down=ok_if_broker_down,
    )
    typer.echo(line, err=not ok)
    raise typer.Exit(0 if ok else 1)
