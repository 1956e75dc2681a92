"""One frozen settings class per role: what `cluster <role>` (and `python -m edge`) builds once from its flags, its
CLUSTER_* variables and the defaults (cluster/settings.py reads them), and what the role then takes whole:
`Broker(settings)`, `Manager(settings)`, `Agent(settings)`, `create_app(settings, ...)`, `UpSettings` for
`cluster up`. A field's flag is the same on every command that takes it; `ROLES` lists the classes for `cluster config`
and the README's table.

Adding a setting: a field here (default, help, unit, check, flag), and the code that uses it; its variable comes from
the naming rule, its option, --help line, `cluster config` row and README row from the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cluster.config import (
    AGENT_DRAIN_TIMEOUT_S,
    AGENT_MAX_MEMORY_MIB,
    BROKER_METRICS_HOST,
    BROKER_METRICS_PORT,
    EDGE_GRPC_PORT,
    EDGE_HOST,
    EDGE_PORT,
    UP_BROKER_PORT_STEP,
    Addresses,
    Limits,
    RestartPolicy,
    Timings,
)
from cluster.logs import LOG_FORMATS
from cluster.settings import above, at_least, group, one_of, setting
from cluster.sizes import is_size

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
POLICIES = ("round-robin", "least-outstanding")  # broker/routing.py's POLICIES (a layer up); a test keeps them equal


def log_level():
    return setting(
        "INFO",
        "DEBUG, INFO, WARNING or ERROR.",
        flag="--log-level",
        check=(lambda v: v.upper() in LOG_LEVELS, "a level"),
    )


def log_format():
    return setting(
        "text",
        "text, or json: one JSON object a line (time, level, component, agent, message, request_id).",
        flag="--log-format",
        check=one_of(LOG_FORMATS),
    )


def key():
    return setting(
        None,
        "Key file (`cluster keys`): every bus socket uses CURVE with it. The broker and manager take DIR/server.key "
        "and read DIR/members.json. Without it: the bus in the clear.",
        flag="--key",
    )


def edge_host():
    return setting(EDGE_HOST, "Address the edge listens on (127.0.0.1: this machine only).", flag="--edge-host")


def edge_port():
    return setting(EDGE_PORT, "HTTP port of the edge (`cluster up`: 0, no edge).", flag="--edge-port")


def edge_grpc_port():
    return setting(
        EDGE_GRPC_PORT,
        "Port of the edge's Open Inference Protocol over gRPC (0: no gRPC; -1: any free port, see the ready file).",
        flag="--grpc-port",
    )


def key_dir():
    return setting(None, "Key directory (from `cluster keys init`, or `cluster up --secure`).", flag="--key-dir")


def share(help: str = "Model repository folder (default under the user's data dir)."):
    return setting(None, help, flag="--share")


def memory_budget(help: str):
    return setting(
        None,
        help,
        unit="bytes",
        flag="--memory-budget",
        check=(is_size, "bytes, or a number with K, M, G (or Ki, Mi, Gi)"),
    )


@dataclass(frozen=True)
class ManagerSettings:
    """`cluster manager`: the registry of live agents and the desired state on the share."""

    flag_aliases: ClassVar[dict] = {
        "addresses.manager_heartbeats": ("--heartbeats",),
        "addresses.manager_events": ("--events",),
        "addresses.manager_queries": ("--queries",),
    }

    share: str | None = share()
    addresses: Addresses = group(
        Addresses,
        flags=("manager_heartbeats", "manager_events", "manager_queries"),
    )
    timings: Timings = group(Timings, flags=("heartbeat_interval", "liveness"))
    limits: Limits = group(Limits)
    log_level: str = log_level()
    log_format: str = log_format()
    key: str | None = key()


@dataclass(frozen=True)
class BrokerSettings:
    """`cluster broker`: routes client requests to live agents that have the model."""

    flag_aliases: ClassVar[dict] = {
        "addresses.broker_clients": ("--clients",),
        "addresses.broker_agents": ("--agents",),
        "addresses.manager_events": ("--events",),
    }

    addresses: Addresses = group(
        Addresses,
        flags=("broker_clients", "broker_agents", "manager_events", "manager_queries", "manager_heartbeats"),
    )
    broker_name: str | None = setting(
        None,
        "This broker's name (its routing id at clients; unique among the cluster's brokers); default: host:port of "
        "its clients' address (on a port the OS picks: host:any-<random>).",
        flag="--name",
    )
    policy: str = setting(
        "round-robin", "Routing policy: round-robin or least-outstanding.", flag="--policy", check=one_of(POLICIES)
    )
    metrics_port: int = setting(
        BROKER_METRICS_PORT,
        "Port of this broker's Prometheus metrics, http://HOST:PORT/metrics (0: off; -1: any free port, see the ready "
        "file).",
        flag="--metrics-port",
        check=at_least(-1),
    )
    metrics_host: str | None = setting(
        None,
        "Address the broker's metrics listen on (default: the host of its clients' address, e.g. 0.0.0.0 in a pod; "
        f"{BROKER_METRICS_HOST} when that is not tcp://).",
        flag="--metrics-host",
    )
    timings: Timings = group(Timings, flags=("heartbeat_interval", "liveness", "max_queue_wait", "hedge_after"))
    limits: Limits = group(Limits)
    log_level: str = log_level()
    log_format: str = log_format()
    key: str | None = key()


@dataclass(frozen=True)
class AgentSettings:
    """`cluster agent`: loads the share's models and serves them to the broker."""

    flag_aliases: ClassVar[dict] = {
        "addresses.broker_agents": ("--broker",),
        "addresses.manager_heartbeats": ("--heartbeats",),
    }

    share: str | None = share(
        "Model repository: a folder (e.g. an NFS mount) or nfs://server/export (read with libnfs into a local cache)."
    )
    share_cache: str | None = setting(None, "Local cache for an nfs:// share (default under ~/.cache).", flag="--cache")
    addresses: Addresses = group(
        Addresses,
        flags=("broker_agents", "manager_heartbeats"),
    )
    agent_id: str | None = setting(None, "Agent id (default host-pid).", flag="--id")
    capacity: int = setting(
        4, "Requests this agent takes at once.", unit="requests", flag="--capacity", check=at_least(1)
    )
    workers: int = setting(1, "Inference threads.", unit="threads", flag="--workers", check=at_least(1))
    torch_threads: int = setting(
        1,
        "torch intra-op threads per agent (0: torch's default).",
        unit="threads",
        flag="--threads",
        check=at_least(0),
    )
    device: str = setting("cpu", "cpu, cuda or cuda:N.", flag="--device")
    models: str | None = setting(
        None, "Comma-separated model names to serve (default: all in the share).", flag="--models"
    )
    timings: Timings = group(Timings, flags=("heartbeat_interval", "liveness", "hang_factor", "hang_min"))
    limits: Limits = group(Limits)
    max_memory: float = setting(
        AGENT_MAX_MEMORY_MIB,
        "Resident memory limit (0: none): past it the agent drains and exits with status 5, to be restarted.",
        unit="MiB",
        flag="--max-memory",
        check=at_least(0),
    )
    memory_budget: str | None = memory_budget(
        "Bytes of models this agent may hold, e.g. 8Gi or 512M (K, M, G: powers of 1000; Ki, Mi, Gi: of 1024): the "
        "manager places `replicas: N` models within it. Default: the device's memory (CUDA), else the host's RAM "
        "(`cluster up`: the host's RAM / --agents, each)."
    )
    drain_timeout: float = setting(
        AGENT_DRAIN_TIMEOUT_S,
        "A stopping agent finishes its requests for this long, then exits.",
        unit="s",
        flag="--drain-timeout",
        check=at_least(0),
    )
    agent_inline: bool = setting(
        True, "Run short model calls on the agent's loop thread (0: always on an inference thread)."
    )
    log_level: str = log_level()
    log_format: str = log_format()
    key: str | None = key()

    @property
    def model_names(self) -> list[str] | None:
        return [m for m in self.models.split(",") if m] if self.models else None


@dataclass(frozen=True)
class UpSettings:
    """`cluster up`: the whole cluster on this machine, supervised."""

    flag_aliases: ClassVar[dict] = {"key_dir": ("--keys",)}

    share: str | None = share(
        "Model repository folder (default under the user's data dir); it must exist, unless --create-share."
    )
    brokers: int = setting(
        1,
        "Brokers to start (active-active; each with its own ports: broker i on the broker addresses' ports + "
        f"{UP_BROKER_PORT_STEP} x i, or the i-th of comma-separated CLUSTER_BROKER_CLIENTS / _AGENTS); agents and "
        "clients use every one.",
        flag="--brokers",
        check=at_least(1),
    )
    torch_threads: int | None = setting(
        None,
        "torch intra-op threads per agent (default: the machine's cores / --agents, at least 1; 0: torch's default).",
        unit="threads",
        flag="--threads",
        check=at_least(0),
    )
    edge_host: str = edge_host()
    edge_port: int = edge_port()
    edge_grpc_port: int = edge_grpc_port()
    key_dir: str | None = key_dir()
    memory_budget: str | None = memory_budget("Each agent's --memory-budget (default: the host's RAM / --agents).")
    addresses: Addresses = group(Addresses)
    timings: Timings = group(Timings, flags=("heartbeat_interval",))
    restart: RestartPolicy = group(RestartPolicy)
    log_level: str = log_level()
    log_format: str = log_format()


@dataclass(frozen=True)
class EdgeSettings:
    """`cluster edge` (= `python -m edge`): the HTTP and gRPC edge in front of the bus (edge/app.py)."""

    flag_aliases: ClassVar[dict] = {
        "edge_host": ("--host",),
        "edge_port": ("--port",),
        "addresses.broker_clients": ("--broker",),
        "addresses.manager_queries": ("--manager",),
    }
    edge_host: str = edge_host()
    edge_port: int = edge_port()
    addresses: Addresses = group(Addresses, flags=("broker_clients", "manager_queries"))
    max_body_bytes: int = setting(
        64 * 1024 * 1024,
        "Largest request body, after decompression.",
        unit="bytes",
        flag="--max-body-bytes",
        env="CLUSTER_EDGE_MAX_BODY",
        check=at_least(1),
    )
    max_json_body: int = setting(
        32 * 1024 * 1024,
        "Largest JSON: a body without the binary extension, or the JSON part of one with it (never "
        "above --max-body-bytes).",
        unit="bytes",
        flag="--max-json-body",
        env="CLUSTER_EDGE_MAX_JSON_BODY",
        check=at_least(1),
    )
    edge_frontend: str | None = setting(
        None, "The page served at / (default: the repository's frontend.html).", flag="--frontend"
    )
    timings: Timings = group(Timings, flags=("request_timeout",))
    edge_query_timeout: float = setting(
        2.0,
        "How long health, metadata and the cluster views wait for the broker.",
        unit="s",
        flag="--edge-query-timeout",
        check=above(0),
    )
    edge_access_log: bool = setting(False, "Log every request.", flag="--access-log")
    edge_token: tuple[str, ...] = setting(
        (),
        "Bearer token every route but health and the page then needs (repeatable; several comma-separated).",
        flag="--token",
    )
    edge_token_file: tuple[str, ...] = setting((), "File of tokens, one a line (repeatable).", flag="--token-file")
    edge_admin_token: tuple[str, ...] = setting(
        (), "Token that may also change the cluster (repeatable); accepted wherever --token is.", flag="--admin-token"
    )
    edge_admin_token_file: tuple[str, ...] = setting((), "File of admin tokens, one a line.", flag="--admin-token-file")
    edge_allowed_hosts: tuple[str, ...] = setting(
        (),
        "Host name served besides localhost/127.0.0.1/[::1] (repeatable; '*': any, only behind a proxy).",
        flag="--allowed-host",
    )
    edge_cors_origins: tuple[str, ...] = setting(
        (),
        "Browser origin (https://host:port) whose pages may call the edge (repeatable; default: none).",
        flag="--cors-origin",
    )
    edge_ssl_certfile: str | None = setting(None, "TLS certificate (PEM): serve HTTPS.", flag="--ssl-certfile")
    edge_ssl_keyfile: str | None = setting(None, "TLS private key (PEM) of --ssl-certfile.", flag="--ssl-keyfile")
    edge_grpc_port: int = edge_grpc_port()
    edge_grpc_host: str | None = setting(None, "Address gRPC listens on (default: --edge-host).", flag="--grpc-host")
    edge_manager_key: str | None = setting(
        None,
        "Key file the edge presents to the manager (default: --key); repository loads need an admin key.",
        flag="--manager-key",
    )
    log_level: str = log_level()
    log_format: str = log_format()
    key: str | None = key()


@dataclass(frozen=True)
class KeysSettings:
    """`cluster keys`: key directories."""

    key_dir: str | None = key_dir()


@dataclass(frozen=True)
class ClientSettings:
    """A bus client (Client, AsyncClient, ManagerClient) made without an address: these variables."""

    addresses: Addresses = group(Addresses)
    timings: Timings = group(Timings)
    limits: Limits = group(Limits)


@dataclass(frozen=True)
class ManagerQuerySettings:
    """`cluster rollback`, `undeploy`, `models`: calls on the manager's query socket."""

    flag_aliases: ClassVar[dict] = {"addresses.manager_queries": ("--manager",)}
    addresses: Addresses = group(Addresses, flags=("manager_queries",))
    key: str | None = key()


@dataclass(frozen=True)
class DeploySettings(ManagerQuerySettings):
    """`cluster deploy`: publishes on the share (or through the manager) and rolls out."""

    share: str | None = share(
        "The share's folder, to publish into it directly; without it the file goes to the manager over the bus and "
        "the manager publishes it on its share."
    )


@dataclass(frozen=True)
class StatusSettings:
    """`cluster status`: the brokers (from the manager), the live agents and their models (from the broker)."""

    flag_aliases: ClassVar[dict] = {
        "addresses.broker_clients": ("--broker",),
        "addresses.manager_queries": ("--manager",),
    }
    addresses: Addresses = group(Addresses, flags=("broker_clients", "manager_queries"))
    key: str | None = key()


@dataclass(frozen=True)
class HealthSettings:
    """`cluster health ROLE`: an exec probe."""

    flag_aliases: ClassVar[dict] = {
        "addresses.broker_clients": ("--broker",),
        "addresses.manager_queries": ("--manager",),
    }
    addresses: Addresses = group(Addresses, flags=("broker_clients", "manager_queries"))
    agent_id: str | None = setting(None, "Agent id (default host-pid).", flag="--id")
    health_edge_url: str = setting(
        f"http://127.0.0.1:{EDGE_PORT}", "The edge `cluster health edge` asks.", flag="--url"
    )
    health_key: str | None = setting(
        None,
        "Key file of `cluster health` (else CLUSTER_KEY's): the manager answers its server key; the broker and agent "
        "checks ask the broker, which wants a client or admin key.",
        flag="--key",
    )
    key: str | None = setting(None, "Key file (`cluster keys`): every bus socket uses CURVE with it.")


@dataclass(frozen=True)
class BenchSettings:
    """`cluster bench`: load against the bus or the edge."""

    flag_aliases: ClassVar[dict] = {"addresses.broker_clients": ("--broker",)}
    addresses: Addresses = group(Addresses, flags=("broker_clients",))
    key: str | None = key()
    bench_token: str | None = setting(
        None,
        "The edge's bearer token, for --http and --grpc (prefer --token-file or the variable: `ps` shows this).",
        flag="--token",
    )


# every role's settings, by command name (`cluster config ROLE`, the README's table)
ROLES = {
    "manager": ManagerSettings,
    "broker": BrokerSettings,
    "agent": AgentSettings,
    "edge": EdgeSettings,
    "up": UpSettings,
    "client": ClientSettings,
    "status": StatusSettings,
    "health": HealthSettings,
    "deploy": DeploySettings,
    "rollback": ManagerQuerySettings,
    "undeploy": ManagerQuerySettings,
    "models": ManagerQuerySettings,
    "bench": BenchSettings,
    "keys": KeysSettings,
}
