"""The `cluster` command: run each role on its own, or the whole cluster on this machine with `cluster up`.

Every address and timing can come from an option or from an environment variable (CLUSTER_*); `--help` on each
command lists them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import signal
import sys
from pathlib import Path

import typer

from cluster import config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="A model-serving cluster for PyTorch.")

# ---- options shared by the commands -----------------------------------------------------------------------------

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


# ---- the roles ----------------------------------------------------------------------------------------------------


Share = typer.Option(
    None, "--share", envvar="CLUSTER_SHARE", help="Model repository folder (default under the user's data dir)."
)


@app.command()
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


@app.command()
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


@app.command()
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


@app.command()
def edge(
    host: str = typer.Option(
        config.EDGE_HOST, envvar="CLUSTER_EDGE_HOST", help="Address to listen on (127.0.0.1: this machine only)."
    ),
    port: int = typer.Option(config.EDGE_PORT, envvar="CLUSTER_EDGE_PORT", help="HTTP port."),
    broker: str = BrokerClients,
    max_body_bytes: int | None = typer.Option(
        None,
        envvar="CLUSTER_EDGE_MAX_BODY",
        help="Largest request body in bytes, after decompression (default 64 MiB).",
    ),
    max_json_body: int | None = typer.Option(
        None,
        "--max-json-body",
        envvar="CLUSTER_EDGE_MAX_JSON_BODY",
        help="Largest JSON in bytes: a body without the binary extension, or the JSON part of one with it "
        "(default 32 MiB; never above --max-body-bytes).",
    ),
    frontend: str | None = typer.Option(
        None, "--frontend", help="The page served at / (default: the repository's frontend.html)."
    ),
    request_timeout: float | None = typer.Option(
        None, envvar="CLUSTER_REQUEST_TIMEOUT", help="Default inference deadline in seconds (default 30)."
    ),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
    log_level: str = LogLevel,
    log_format: LogFormatName = LogFormat,
    ready_file: str | None = ReadyFile,
    token: list[str] = typer.Option(
        [],
        "--token",
        envvar="CLUSTER_EDGE_TOKEN",
        help="Bearer token every route but health and the page then needs (repeatable; several comma-separated).",
    ),
    token_file: list[str] = typer.Option(
        [], "--token-file", envvar="CLUSTER_EDGE_TOKEN_FILE", help="File of tokens, one a line (repeatable)."
    ),
    admin_token: list[str] = typer.Option(
        [],
        "--admin-token",
        envvar="CLUSTER_EDGE_ADMIN_TOKEN",
        help="Token that may also change the cluster (repeatable); accepted wherever --token is.",
    ),
    admin_token_file: list[str] = typer.Option(
        [], "--admin-token-file", envvar="CLUSTER_EDGE_ADMIN_TOKEN_FILE", help="File of admin tokens, one a line."
    ),
    allowed_host: list[str] = typer.Option(
        [],
        "--allowed-host",
        envvar="CLUSTER_EDGE_ALLOWED_HOSTS",
        help="Host name served besides localhost/127.0.0.1/[::1] (repeatable; '*': any, only behind a proxy).",
    ),
    cors_origin: list[str] = typer.Option(
        [],
        "--cors-origin",
        envvar="CLUSTER_EDGE_CORS_ORIGINS",
        help="Browser origin (https://host:port) whose pages may call the edge (repeatable; default: none).",
    ),
    ssl_certfile: str | None = typer.Option(
        None, "--ssl-certfile", envvar="CLUSTER_EDGE_SSL_CERTFILE", help="TLS certificate (PEM): serve HTTPS."
    ),
    ssl_keyfile: str | None = typer.Option(
        None, "--ssl-keyfile", envvar="CLUSTER_EDGE_SSL_KEYFILE", help="TLS private key (PEM) of --ssl-certfile."
    ),
    key: str | None = Key,
    grpc_port: int = typer.Option(
        config.EDGE_GRPC_PORT,
        "--grpc-port",
        envvar="CLUSTER_EDGE_GRPC_PORT",
        help="Port of the Open Inference Protocol over gRPC (0: no gRPC; -1: any free port, see the ready file).",
    ),
    grpc_host: str | None = typer.Option(
        None, "--grpc-host", envvar="CLUSTER_EDGE_GRPC_HOST", help="Address gRPC listens on (default: --host)."
    ),
    manager: str = typer.Option(
        config.MANAGER_QUERY_ADDR,
        "--manager",
        envvar="CLUSTER_MANAGER_QUERIES",
        help="The manager's query address: the repository extension (load, unload, index) and rollout metrics.",
    ),
    manager_key: str | None = typer.Option(
        None,
        "--manager-key",
        envvar="CLUSTER_EDGE_MANAGER_KEY",
        help="Key file the edge presents to the manager (default: --key); repository loads need an admin key.",
    ),
):
    """Run the HTTP edge: Open Inference Protocol (KServe V2) REST and gRPC, /metrics, /agents, and the page at /."""
    from edge import run_edge

    run_edge(
        host,
        port,
        broker,
        max_body_bytes=max_body_bytes,
        max_json_bytes=max_json_body,
        frontend_path=frontend,
        request_timeout=request_timeout,
        log_level=log_level,
        log_format=log_format.value,
        access_log=access_log,
        ready_file=ready_file,
        tokens=token,
        token_files=token_file,
        admin_tokens=admin_token,
        admin_token_files=admin_token_file,
        allowed_hosts=allowed_host,
        cors_origins=cors_origin,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        key=key,  # the edge's bus client presents this key
        grpc_port=grpc_port,
        grpc_host=grpc_host,
        manager_address=manager,
        manager_key=manager_key,
    )


# ---- the whole cluster on one machine ------------------------------------------------------------------------


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


@app.command()
def up(
    agents: int = typer.Option(2, "--agents", help="How many agents to start."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        envvar="CLUSTER_TORCH_THREADS",
        help="torch intra-op threads per agent (default: the machine's cores / --agents, at least 1; 0: torch's "
        "default).",
    ),
    edge_port: int = typer.Option(
        config.EDGE_PORT, "--edge-port", envvar="CLUSTER_EDGE_PORT", help="HTTP port of the edge (0: no edge)."
    ),
    grpc_port: int = typer.Option(
        config.EDGE_GRPC_PORT, "--grpc-port", envvar="CLUSTER_EDGE_GRPC_PORT", help="gRPC port of the edge (0: none)."
    ),
    share: str | None = typer.Option(
        None,
        envvar="CLUSTER_SHARE",
        help="Model repository folder (default under the user's data dir); it must exist, unless --create-share.",
    ),
    create_share: bool = typer.Option(
        False, "--create-share", help="Make the --share folder if it does not exist (with the demo models)."
    ),
    heartbeat_interval: float | None = Interval,
    log_level: str = LogLevel,
    log_format: LogFormatName = LogFormat,
    any_ports: bool = typer.Option(
        False,
        "--any-ports",
        help="Let the OS pick every port (bus and edge), e.g. for a second cluster here; the banner says which.",
    ),
    ready_file: str | None = typer.Option(
        None,
        "--ready-file",
        help="Once the manager, the broker and the edge listen, write every address and the pid here (JSON).",
    ),
    secure: bool = typer.Option(
        False,
        "--secure",
        help="CURVE on the bus (every role with its own key) and a bearer token on the edge; prints the keys to use.",
    ),
    keys: Path | None = typer.Option(
        None,
        "--keys",
        envvar="CLUSTER_KEY_DIR",
        help="Key directory for --secure (made if missing; default: beside the share, SHARE-keys).",
    ),
):
    """Start the manager, the broker, N agents and the HTTP edge on this machine, and keep them running: a process
    that fails is restarted with backoff (CLUSTER_RESTART_*); a crash loop of the manager, the broker or the edge stops
    everything (exit status 1). Ctrl-C or SIGTERM stops them all (exit status 0)."""
    import tempfile

    from cluster.local import LocalCluster, StartError, any_port, ports_in_use, write_ready_file
    from cluster.supervisor import Supervisor

    _setup_logging(log_level, "up", log_format.value)
    os.environ["CLUSTER_LOG_FORMAT"] = log_format.value  # every process it starts logs the same way
    addresses = config.Addresses()
    if any_ports:
        addresses = config.Addresses(**{k: any_port(v) for k, v in dataclasses.asdict(addresses).items()})
    else:  # before anything starts: a port in use (another `cluster up`?) is said in one line, not a traceback
        wanted = {f"the {k.replace('_', ' ')} address": v for k, v in dataclasses.asdict(addresses).items()}
        host = config.env_or("EDGE_HOST", config.EDGE_HOST)
        for what, port in (("the HTTP edge", edge_port), ("the gRPC edge", grpc_port if edge_port else 0)):
            if port:
                wanted[what] = f"tcp://{host}:{port}"
        taken = ports_in_use(wanted)
        if taken:
            for line in taken:
                typer.echo(f"cluster up: {line}", err=True)
            typer.echo(
                "cluster up: is a cluster already running here? Stop it, or start this one with --any-ports.", err=True
            )
            raise typer.Exit(1)
    share_dir = _up_share(share, create_share)
    key_dir = token_file = None
    if secure or keys is not None:
        key_dir, token_file = _secure_state(keys or share_dir.with_name(share_dir.name + "-keys"))
    policy = config.restart_policy_from_env()
    if threads is None:
        threads = config.up_torch_threads(agents)
    if threads < 0:
        typer.echo("cluster up: --threads takes 0 (torch's default) or more", err=True)
        raise typer.Exit(2)
    # SIGTERM like Ctrl-C: stop everything, wherever we are. SIGINT explicitly too: started with `&` from a script,
    # a process inherits SIGINT ignored, and Python then installs no handler of its own
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    stopped_by_signal = False
    with tempfile.TemporaryDirectory(prefix="cluster-up-") as workdir:
        local = LocalCluster(
            str(share_dir),
            workdir,
            heartbeat_interval=heartbeat_interval,
            liveness=None,
            reconnect=None,
            log_level=log_level,
            addresses=addresses,
            edge_host=config.env_or("EDGE_HOST", config.EDGE_HOST),
            edge_port=0 if any_ports else edge_port,
            edge_grpc_port=None if not grpc_port else 0 if any_ports else grpc_port,
            inherit_output=True,
            die_with_parent=True,  # no orphans, even when `cluster up` is killed with SIGKILL
            keys=key_dir,
        )
        try:
            local.start_manager()
            local.start_broker()
            for i in range(agents):
                # the agent's own default id (host-pid)
                local.start("agent", "--threads", str(threads), name=f"agent-{i + 1}")
            if edge_port:
                local.start_edge(*_secure_edge_args(key_dir))
            a, edge_url, grpc_address = local.addresses, local.edge_url, local.grpc_address
            typer.echo(
                f"cluster up: share {share_dir}\n"
                f"  clients (Client / AsyncClient): {a.broker_clients}\n"
                f"  broker for agents:              {a.broker_agents}\n"
                f"  manager heartbeats / events / queries: "
                f"{a.manager_heartbeats} {a.manager_events} {a.manager_queries}\n"
                + (f"  HTTP edge (Open Inference Protocol): {edge_url}/v2   page: {edge_url}/\n" if edge_url else "")
                + (f"  gRPC edge (Open Inference Protocol): {grpc_address}\n" if grpc_address else "")
                + f"  {agents} agents, {threads or 'torch default'} torch threads each; `cluster status` shows them. "
                "A process that fails is restarted; Ctrl-C stops everything."
                + (
                    f"\n  secure: keys in {key_dir} (CURVE on every bus socket); use --key {key_dir}/client.key "
                    f"(inference, queries) or --key {key_dir}/admin.key (deploy, rollback, undeploy);\n"
                    f"  the edge wants Authorization: Bearer {token_file.read_text().strip()}"
                    f"  (also in {token_file});\n"
                    f"  its repository routes (load, unload) want the admin token in {key_dir / EDGE_ADMIN_TOKEN}"
                    if key_dir
                    else ""
                )
            )
            reported = dict(dataclasses.asdict(a), **({"edge": edge_url} if edge_url else {}))
            if grpc_address:
                reported["grpc"] = grpc_address

            def report(running) -> None:  # the ready file names each process and its pid, rewritten on restarts
                if ready_file:
                    children = {name: {"role": p.role, "pid": p.pid} for name, p in running.items()}
                    write_ready_file(ready_file, "up", reported, children=children)

            report(local.running())
            gone = local.supervise(Supervisor(policy), say=logging.getLogger("cluster.up").log, on_restart=report)
            logging.getLogger("cluster.up").error("no %s any more; stopping everything (exit status 1)", gone.role)
        except KeyboardInterrupt:
            stopped_by_signal = True
        except StartError as exc:
            typer.echo(f"cluster up: {exc}; stopping", err=True)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the stopping short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            local.stop_all()
            typer.echo("cluster stopped")
    raise typer.Exit(0 if stopped_by_signal else 1)


def _up_share(share: str | None, create: bool) -> Path:
    """`cluster up`'s share: the default one is made on first use; one given with --share must exist (a typo must
    not quietly start a fresh, empty cluster), unless --create-share. The demo models go into a share without
    models. An unusable path is said in one line (exit status 2)."""
    from cluster.demo_models import write_demo_models
    from cluster.repository import ModelRepository

    share_dir = Path(share or config.default_share_dir())
    if share is not None and not share_dir.exists() and not create:
        typer.echo(
            f"cluster up: the share {share_dir} does not exist; check the path, or add --create-share to make a "
            "new share there (with the demo models)",
            err=True,
        )
        raise typer.Exit(2)
    try:
        if share_dir.exists() and not share_dir.is_dir():
            raise NotADirectoryError(f"{share_dir} is not a folder")
        share_dir.mkdir(parents=True, exist_ok=True)
        if not ModelRepository(share_dir).model_names():
            typer.echo(f"Writing the demo models (digits, echo) into {share_dir} ...")
            write_demo_models(share_dir)
    except OSError as exc:
        typer.echo(f"cluster up: cannot use {share_dir} as the share: {exc}", err=True)
        raise typer.Exit(2) from None
    return share_dir


EDGE_TOKEN = "edge.token"  # `cluster up --secure`: the edge's bearer token (inference, views), in the key directory
EDGE_ADMIN_TOKEN = "edge.admin-token"  # ... its admin token (also the repository routes: load, unload)
EDGE_MANAGER_KEY = "edge-manager"  # ... the admin key it presents to the manager for those loads and unloads


def _secure_state(key_dir: Path) -> tuple[Path, Path]:
    """`cluster up --secure`: the key directory (server, admin, client and edge keys; agents' keys are added as they
    start), the edge's admin key for the manager, and the edge's token files, made on first use and kept, so the keys
    and the tokens stay valid across runs (a directory from an earlier version gets what it lacks)."""
    import secrets

    from cluster.keys import add, list_members, make_cluster_keys
    from cluster.repository import atomic_write

    if not (key_dir / "members.json").exists():
        make_cluster_keys(key_dir, agents=0)
    if EDGE_MANAGER_KEY not in list_members(key_dir):
        add(key_dir, EDGE_MANAGER_KEY, "admin")
    for name in (EDGE_TOKEN, EDGE_ADMIN_TOKEN):
        if not (key_dir / name).exists():
            atomic_write(key_dir / name, (secrets.token_urlsafe(24) + "\n").encode(), mode=0o600)
    return key_dir, key_dir / EDGE_TOKEN


def _secure_edge_args(key_dir: Path | None) -> list[str]:
    """The edge's options under `cluster up --secure`: its tokens, and the admin key it presents to the manager for
    the repository routes (its bus key for the broker stays a client key: it serves inference, not deploys)."""
    if key_dir is None:
        return []
    return [
        "--token-file",
        str(key_dir / EDGE_TOKEN),
        "--admin-token-file",
        str(key_dir / EDGE_ADMIN_TOKEN),
        "--manager-key",
        str(key_dir / f"{EDGE_MANAGER_KEY}.key"),
    ]


@app.command()
def status(
    broker: str = BrokerClients,
    timeout: float = typer.Option(5.0, help="Seconds to wait for the broker."),
    key: str | None = Key,
):
    """Print the live agents and the models they serve."""
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
    table = _table(f"Agents ({len(agents)})", "id", "host:pid", "device", "models", "load", "memory", "beat", "up")
    for a in sorted(agents, key=lambda a: a["id"]):
        table.add_row(
            a["id"],
            f"{a.get('host')}:{a.get('pid')}",
            str(a.get("device")),
            ", ".join(f"{m['name']} v{m['version']}" for m in a.get("models", [])),
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


def _memory(agent: dict) -> str:
    """An agent's resident memory (and limit) for `cluster status`; why it drains, when it drains on its own."""
    rss, limit = agent.get("rss"), agent.get("max_memory")
    text = "-" if not isinstance(rss, int) else f"{rss / 2**20:.0f} MiB"
    if isinstance(limit, int):
        text += f" / {limit / 2**20:.0f}"
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
            agents = ManagerClient(address, key=key).call("agents", timeout=timeout)
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


@app.command()
def health(
    role: HealthRole = typer.Argument(..., help="manager, broker, agent or edge."),
    broker: str = typer.Option(
        config.BROKER_CLIENT_ADDR,
        "--broker",
        envvar="CLUSTER_BROKER_CLIENTS",
        help="The broker's client address (broker, agent). 0.0.0.0 or * means this machine.",
    ),
    manager: str = typer.Option(
        config.MANAGER_QUERY_ADDR,
        "--manager",
        envvar="CLUSTER_MANAGER_QUERIES",
        help="The manager's query address (manager). 0.0.0.0 or * means this machine.",
    ),
    agent_id: str | None = typer.Option(
        None, "--id", envvar="CLUSTER_AGENT_ID", help="The agent's id (agent): it must be registered at the broker."
    ),
    edge_url: str = typer.Option(
        f"http://127.0.0.1:{config.EDGE_PORT}", "--url", envvar="CLUSTER_HEALTH_EDGE_URL", help="The edge (edge)."
    ),
    timeout: float = typer.Option(3.0, "--timeout", help="Seconds to wait for the answer."),
    ok_if_broker_down: bool = typer.Option(
        False,
        "--ok-if-broker-down",
        help="agent: exit 0 when the broker does not answer (it cannot tell), 1 only when the broker answers without "
        "this agent: a liveness probe that does not restart every agent while the broker is away.",
    ),
    key: str | None = typer.Option(
        None,
        "--key",
        envvar=["CLUSTER_HEALTH_KEY", "CLUSTER_KEY"],
        help="Key file for a cluster with keys (CLUSTER_HEALTH_KEY, else CLUSTER_KEY): the manager answers its "
        "server key; the broker and agent checks ask the broker, which wants a client or admin key.",
    ),
):
    """Exit 0 if ROLE is serving, 1 if not, with one line saying why: an exec probe for Kubernetes (or any
    supervisor). The manager and the broker must answer a query within --timeout; an agent must be registered at the
    broker under its id; the edge must answer /v2/health/ready."""
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


def _table(title: str, *columns: str):
    """A rich table that never cuts a cell with an ellipsis: the first column (an agent id, a model name) stays on
    one line, whole, at 80 columns too; the others wrap."""
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, no_wrap=i == 0, overflow="fold")
    return table


# ---- deployments -------------------------------------------------------------------------------------------------

ManagerAddress = typer.Option(
    config.MANAGER_QUERY_ADDR, "--manager", envvar="CLUSTER_MANAGER_QUERIES", help="Manager query address."
)


def _print_rollout(report: dict, what: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    table = _table(
        f"{what} {report['model']} v{report['version']}"
        + (f" (was v{report['previous']})" if report.get("previous") else ""),
        "agent",
        "outcome",
    )
    first_with: dict[str, str] = {}  # a reason every agent gives (a model that cannot load) is printed once
    for agent_id, outcome in report["agents"].items():
        if outcome == "ok":
            table.add_row(agent_id, "[green]ok[/green]")
        elif outcome in first_with:
            table.add_row(agent_id, f"[red]failed: the same as {first_with[outcome]}[/red]")
        else:
            first_with[outcome] = agent_id
            table.add_row(agent_id, f"[red]failed: {escape(outcome)}[/red]")
    Console().print(table)
    for agent_id, why in (report.get("left_out") or {}).items():
        typer.echo(f"not waited for: {agent_id} ({why})")
    if report.get("note"):
        typer.echo(report["note"])
    head = f"{what} of {report['model']} v{report['version']}"
    agents = f"{len(report['agents'])} agent{'s' if len(report['agents']) != 1 else ''}"
    if report["ok"]:
        typer.echo(f"{head} done in {report['seconds']:.2f} s on {agents}")
        return
    kept = (
        f"every agent keeps serving v{report['previous']}"
        if report.get("previous") is not None
        else f"{report['model']} stays undeployed (it had no earlier version)"
    )
    removed = f"; v{report['version']} was taken off the share" if report.get("removed") else ""
    typer.echo(f"{head} FAILED after {report['seconds']:.2f} s on {agents}: {kept}{removed}")


def _manager_call(manager: str, what: str, wait: float, key: str | None = None, data: bytes | None = None, **fields):
    from cluster import ClusterError
    from cluster.manager.client import ManagerClient

    try:
        return ManagerClient(manager, key=key).call(what, timeout=wait, data=data, **fields)
    except ClusterError as exc:
        typer.echo(f"{what} failed: {exc}", err=True)
        raise typer.Exit(2) from None


def _deploy_check(manager: str, key: str | None, what: str, doing: str = "deploy", **fields) -> None:
    """Before a deploy sends or publishes anything (or a rollback waits for its rollout): the manager answers `what`
    within seconds, or the command ends here (a wrong --manager, a manager that is down, a key it refuses, a config
    or name it refuses)."""
    from cluster import ClusterError, InferenceTimeoutError
    from cluster.manager.client import ManagerClient

    try:
        ManagerClient(manager, key=key).call(what, timeout=config.DEPLOY_CHECK_TIMEOUT_S, **fields)
    except InferenceTimeoutError:
        typer.echo(
            f"cannot {doing}: no answer from the manager at {manager} within {config.DEPLOY_CHECK_TIMEOUT_S:g} s; "
            "is it running, and is that its query address (--manager, CLUSTER_MANAGER_QUERIES)?",
            err=True,
        )
        raise typer.Exit(2) from None
    except ClusterError as exc:
        typer.echo(f"cannot {doing}: {exc}", err=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _publish_progress(path: Path):
    """publish_version's progress callback: a bar on a terminal; None elsewhere (scripts, CI), where the transient bar
    would show nothing and importing rich would still cost a fresh process ~0.2 s."""
    if not sys.stdout.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(f"publishing {path.name}", total=path.stat().st_size)
        yield lambda done, total: progress.update(task, completed=done, total=total)


@app.command()
def deploy(
    path: Path = typer.Argument(
        ..., exists=True, dir_okay=False, help="The model file: .pt (TorchScript) or .pt2 (torch.export)."
    ),
    name: str = typer.Option(..., "--name", help="Model name."),
    config_file: Path | None = typer.Option(
        None,
        "--config",
        exists=True,
        dir_okay=False,
        help="config.json (inputs, outputs, serving settings; ours or Triton's, as JSON or config.pbtxt); "
        "required for a new model.",
    ),
    share: str | None = typer.Option(
        None,
        "--share",
        envvar="CLUSTER_SHARE",
        help="The share's folder, to publish into it directly; without it the file goes to the manager over the bus "
        "and the manager publishes it on its share.",
    ),
    manager: str = ManagerAddress,
    timeout: float = typer.Option(300.0, help="Seconds to wait for every agent to load and warm up the new version."),
    key: str | None = Key,
):
    """Publish a new version atomically on the share, roll it out to every agent, print each agent's outcome.
    The name and config are checked here, and the manager asked whether it is there (and takes them), within
    seconds, before any model file is sent or published."""

    from cluster.model_config import ModelConfig, RepositoryError, read_config_file
    from cluster.repository import MODEL_FILES, ModelRepository, check_name, publish_version

    model_config = None
    try:
        check_name(name)
    except RepositoryError as exc:
        typer.echo(f"cannot deploy: {exc}", err=True)
        raise typer.Exit(2) from None
    if config_file is not None:
        try:
            model_config = read_config_file(config_file, name)  # ours or Triton's, JSON or config.pbtxt
            ModelConfig.from_dict(model_config, name=name)  # names, shapes, datatypes: refused before any upload
        except (ValueError, RepositoryError) as exc:
            typer.echo(f"{config_file} is not a model config: {exc}", err=True)
            raise typer.Exit(2) from None
    if share is None:  # no share here: the manager publishes on its own
        file_name = {".pt": "model.pt", ".pt2": "model.pt2"}.get(path.suffix.lower())
        size = path.stat().st_size
        if file_name not in MODEL_FILES:
            typer.echo(f"cannot publish {path}: expected a .pt (TorchScript) or .pt2 (torch.export) file", err=True)
            raise typer.Exit(2)
        if size > config.MAX_UPLOAD_BYTES:
            typer.echo(
                f"cannot send {path} ({size} bytes) over the bus: the limit is {config.MAX_UPLOAD_BYTES} bytes "
                "(CLUSTER_MAX_UPLOAD_BYTES, on the manager too); or give --share to publish into the share directly",
                err=True,
            )
            raise typer.Exit(2)
        _deploy_check(manager, key, "publish_check", name=name, file=file_name, config=model_config)
        typer.echo(f"sending {path.name} ({size / 2**20:.1f} MiB) to the manager at {manager} ...")
        report = _manager_call(
            manager,
            "publish",
            timeout + 120,
            key,
            data=path.read_bytes(),
            name=name,
            file=file_name,
            config=model_config,
            rollout_timeout=timeout,
        )
        typer.echo(f"the manager published {name} version {report['version']}; rolled out:")
        _print_rollout(report, "deploy")
        raise typer.Exit(0 if report["ok"] else 1)
    _deploy_check(manager, key, "rollouts")  # it must be there to roll out what is published next
    share_dir = Path(share)
    new_model = not ModelRepository(share_dir).versions(name)
    with _publish_progress(path) as progress:
        try:
            version = publish_version(share_dir, name, path, model_config, progress=progress)
        except RepositoryError as exc:
            typer.echo(f"cannot publish: {exc}", err=True)
            raise typer.Exit(2) from None
    typer.echo(f"published {name} version {version} to {share_dir}; rolling out ...")
    report = _manager_call(
        manager,
        "deploy",
        timeout + 30,
        key,
        name=name,
        version=version,
        rollout_timeout=timeout,
        discard_on_failure="model" if new_model else "version",  # a rejected version does not stay on the share
    )
    _print_rollout(report, "deploy")
    raise typer.Exit(0 if report["ok"] else 1)


@app.command()
def rollback(
    name: str = typer.Argument(..., help="Model name."),
    to: int | None = typer.Option(None, "--to", help="Version to go back to (default: the one served before)."),
    manager: str = ManagerAddress,
    timeout: float = typer.Option(300.0, help="Seconds to wait for every agent."),
    key: str | None = Key,
):
    """Roll a model back to an earlier version, with the same zero-drop rollout as deploy."""
    _deploy_check(manager, key, "rollouts", "roll back")  # there at all: in seconds, not after --timeout + 30 s
    report = _manager_call(manager, "rollback", timeout + 30, key, name=name, to=to, rollout_timeout=timeout)
    _print_rollout(report, "rollback")
    raise typer.Exit(0 if report["ok"] else 1)


@app.command()
def undeploy(name: str = typer.Argument(..., help="Model name."), manager: str = ManagerAddress, key: str | None = Key):
    """Stop serving a model everywhere (agents finish what is in flight, then unload it). The share keeps its files."""
    _manager_call(manager, "undeploy", 10, key, name=name)
    typer.echo(f"undeployed {name}")


@app.command()
def models(manager: str = ManagerAddress, key: str | None = Key):
    """What is deployed, at which version, on which agents."""
    from rich.console import Console

    deployments = _manager_call(manager, "deployments", 5, key)
    table = _table("Deployments", "model", "version", "staged", "history", "agents (versions served)")
    for name, d in sorted(deployments.items()):
        agents = ", ".join(f"{a} (v{','.join(map(str, vs))})" for a, vs in sorted(d["agents"].items())) or "none"
        table.add_row(
            name, str(d["version"] or "-"), str(d["staged"] or "-"), ", ".join(map(str, d["history"])) or "-", agents
        )
    Console().print(table)


@app.command()
def bench(
    model: str = typer.Argument(..., help="Model to drive."),
    concurrency: str = typer.Option(
        "8", "--concurrency", "-c", help="Closed loop: requests in flight; a list sweeps them (1,2,4,8,16,32,64)."
    ),
    rate: str | None = typer.Option(
        None, "--rate", help="Open loop instead: requests per second, whatever the answers do; a list sweeps them."
    ),
    duration: float = typer.Option(10.0, "--duration", "-d", help="Seconds to measure each level (after a warm-up)."),
    warmup: float = typer.Option(1.0, "--warmup", help="Seconds of load before each level is measured."),
    batch: int = typer.Option(1, help="Rows per request (the first variable dimension)."),
    http: str | None = typer.Option(None, "--http", help="Drive the HTTP edge at this URL instead of the bus."),
    grpc: str | None = typer.Option(None, "--grpc", help="Drive the edge's gRPC service at HOST:PORT instead."),
    http_json: bool = typer.Option(
        False,
        "--http-json",
        help="With --http: post OIP JSON instead of Triton's binary tensor extension (what tensor clients send).",
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="CLUSTER_BENCH_TOKEN",
        help="The edge's bearer token, for --http and --grpc (prefer --token-file or the variable: `ps` shows this).",
    ),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="File holding the edge's bearer token (the first line that is not a # comment)."
    ),
    ca_file: str | None = typer.Option(
        None,
        "--ca-file",
        help="CA certificate (PEM) of a TLS edge: HTTPS for --http (default: the system's CAs), TLS for --grpc.",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON list of the levels on stdout, for machines."),
    broker: str = BrokerClients,
    key: str | None = Key,
):
    """Load generator, in the manner of Triton's perf_analyzer: for each level, throughput, p50/p90/p99 latency, and
    where the time went (queueing vs compute, from the agents' statistics), through the bus, HTTP or gRPC. Each level
    is printed when it is measured; Ctrl-C stops the sweep and prints the levels measured (exit status 130)."""
    import asyncio
    import json

    from cluster import ClusterError, loadgen

    try:
        if rate is not None:
            levels = [loadgen.Level(rate=float(r)) for r in rate.split(",") if r.strip()]
        else:
            levels = [loadgen.Level(concurrency=int(c)) for c in concurrency.split(",") if c.strip()]
        if not levels or any((lv.rate or lv.concurrency or 0) <= 0 for lv in levels):
            raise ValueError("levels must be positive")
    except ValueError:
        typer.echo("bench: --concurrency and --rate take positive numbers, comma-separated (e.g. 1,2,4)", err=True)
        raise typer.Exit(2) from None
    if http and grpc:
        typer.echo("bench: give --http or --grpc, not both", err=True)
        raise typer.Exit(2)
    if token_file is not None:
        from edge.security import read_token_file

        try:
            token = next(iter(read_token_file(token_file)), None)
        except (OSError, ValueError) as exc:
            typer.echo(f"bench: cannot read the token file {token_file}: {exc}", err=True)
            raise typer.Exit(2) from None
        if not token:
            typer.echo(f"bench: the token file {token_file} holds no token", err=True)
            raise typer.Exit(2)
    if (token or ca_file or http_json) and not (http or grpc):
        typer.echo("bench: --token, --token-file, --ca-file and --http-json are for --http or --grpc", err=True)
        raise typer.Exit(2)
    most = max(lv.concurrency or 1 for lv in levels)
    if http:
        door = loadgen.HttpDoor(
            http,
            model,
            batch,
            concurrency=max(most, 64 if rate else most),
            token=token,
            binary=not http_json,
            ca_file=ca_file,
        )
        path = f"HTTP {http} ({'JSON' if http_json else 'binary tensors'})"
    elif grpc:
        door, path = loadgen.GrpcDoor(grpc, model, batch, token=token, ca_file=ca_file), f"gRPC {grpc}"
    else:
        door, path = loadgen.BusDoor(broker, model, batch, key=key), f"bus {broker}"

    rows: list[dict] = []

    def say(row: dict) -> None:
        if not as_json:
            typer.echo("  " + loadgen.format_row(row))

    async def run() -> None:
        async with door:
            if not as_json:
                typer.echo(
                    f"{model} via {path}, {duration:g} s a level (after {warmup:g} s of warm-up), batch {batch}:"
                )
            await loadgen.sweep(door, levels, duration, warmup, rows=rows, on_row=say)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:  # Ctrl-C: what was measured is still worth having
        if as_json:
            typer.echo(json.dumps([dict(row, model=model, via=path) for row in rows]))
        typer.echo(f"bench: interrupted; {len(rows)} of {len(levels)} levels measured", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # the door's errors: ClusterError, httpx, gRPC, OSError
        if not isinstance(exc, (ClusterError, OSError)) and type(exc).__module__.split(".")[0] not in (
            "httpx",
            "tritonclient",
            "grpc",
        ):
            raise
        typer.echo(f"bench failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps([dict(row, model=model, via=path) for row in rows]))
    raise typer.Exit(1 if all(row["errors"] and not row["requests"] for row in rows) else 0)


# ---- keys ---------------------------------------------------------------------------------------------------------

keys_app = typer.Typer(no_args_is_help=True, help="Key directories for CURVE on the bus: members, roles, revocation.")
app.add_typer(keys_app, name="keys")
KeyDir = typer.Option(None, "--dir", envvar="CLUSTER_KEY_DIR", help="The key directory (from `cluster keys init`).")


@keys_app.callback()
def keys_group(ctx: typer.Context, directory: Path | None = KeyDir):
    """Key directories for CURVE on the bus: `init DIR`, then `add`, `revoke` and `list` members (--dir DIR)."""
    ctx.obj = directory  # `cluster keys --dir DIR add ...` works too


def _key_dir(ctx: typer.Context, directory: Path | None) -> Path:
    directory = directory or ctx.obj
    if directory is None:
        typer.echo("keys: give the key directory with --dir DIR (or CLUSTER_KEY_DIR)", err=True)
        raise typer.Exit(2)
    return directory


def _keys_call(fn, directory: Path, *args):
    from cluster.keys import KeyDirError

    try:
        return fn(directory, *args)
    except KeyDirError as exc:
        typer.echo(f"keys: {exc}", err=True)
        raise typer.Exit(2) from None


@keys_app.command("init")
def keys_init(directory: Path = typer.Argument(..., help="Where to create the key directory.")):
    """Create a key directory: server.key (the broker and manager serve with it), admin.key, and the allow-list."""
    from cluster import keys

    admin = _keys_call(keys.init, directory)
    typer.echo(f"key directory {directory}: server key {directory / 'server.key'}, admin key {directory / 'admin.key'}")
    typer.echo(f"admin public key {admin.public}")


@keys_app.command("add")
def keys_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Member name; its key file is DIR/NAME.key."),
    role: str = typer.Option(..., "--role", help="agent, client or admin."),
    directory: Path = KeyDir,
):
    """Create a member's key file and allow its key for ROLE (takes effect within seconds, no restart)."""
    from cluster import keys

    directory = _key_dir(ctx, directory)
    key = _keys_call(keys.add, directory, name, role)
    typer.echo(f"added {name} ({role}): {directory / (name + '.key')}")
    typer.echo(f"public key {key.public}")


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, name: str = typer.Argument(..., help="Member name."), directory: Path = KeyDir):
    """Remove a member from the allow-list: its connections are refused within seconds."""
    from cluster import keys

    _keys_call(keys.revoke, _key_dir(ctx, directory), name)
    typer.echo(f"revoked {name}")


@keys_app.command("list")
def keys_list(ctx: typer.Context, directory: Path = KeyDir):
    """Members of the key directory and their roles."""
    from cluster import keys

    for name, member in sorted(_keys_call(keys.list_members, _key_dir(ctx, directory)).items()):
        typer.echo(f"{name:24} {member.get('role', '?'):8} {member.get('public', '')}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
