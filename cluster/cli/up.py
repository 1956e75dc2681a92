"""`cluster up`: the whole cluster on this machine, supervised (restarts with backoff), optionally with keys."""

from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path

import typer

from cluster import config
from cluster.cli.common import _setup_logging
from cluster.options import need_role, settings_command
from cluster.ports import is_any_port
from cluster.role_settings import UpSettings
from cluster.settings import to_env
from cluster.sizes import host_memory


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


@settings_command(UpSettings)
def up(
    settings: UpSettings,
    agents: int = typer.Option(2, "--agents", help="How many agents to start."),
    create_share: bool = typer.Option(
        False, "--create-share", help="Make the --share folder if it does not exist (with the demo models)."
    ),
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
):
    """Start the manager, the broker (--brokers N: N of them), N agents and the HTTP edge on this machine, and keep them
    running: a process that fails is restarted with backoff (CLUSTER_RESTART_*); a crash loop of the manager, the edge
    or the last broker stops everything (exit status 1). Ctrl-C or SIGTERM stops them all (exit status 0)."""
    import tempfile

    need_role("agent", "edge", what="cluster up")
    from cluster.local import LocalCluster, StartError, any_port, ports_in_use, write_ready_file
    from cluster.supervisor import Supervisor

    _setup_logging(settings.log_level, "up", settings.log_format)
    edge_port, grpc_port, threads = settings.edge_port, settings.edge_grpc_port, settings.torch_threads
    try:
        addresses = broker_addresses(settings.addresses, settings.brokers)
    except ValueError as exc:
        typer.echo(f"cluster up: {exc}", err=True)
        raise typer.Exit(2) from None
    if any_ports:
        addresses = config.Addresses(
            **{
                k: config.ADDRESS_SEPARATOR.join(any_port(a) for a in config.address_list(v))
                for k, v in dataclasses.asdict(addresses).items()
            }
        )
    else:  # before anything starts: a port in use (another `cluster up`?) is said in one line, not a traceback
        wanted = {}
        for k, v in dataclasses.asdict(addresses).items():
            several = config.address_list(v)
            for i, address in enumerate(several):
                wanted[f"the {k.replace('_', ' ')} address" + (f" of broker-{i}" if len(several) > 1 else "")] = address
        host = settings.edge_host
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
    share_dir = _up_share(settings.share, create_share)
    key_dir = token_file = None
    if secure or settings.key_dir is not None:
        key_dir, token_file = _secure_state(
            Path(settings.key_dir) if settings.key_dir else share_dir.with_name(share_dir.name + "-keys")
        )
    policy = settings.restart
    if threads is None:
        threads = config.up_torch_threads(agents)
    # SIGTERM like Ctrl-C: stop everything, wherever we are. SIGINT explicitly too: started with `&` from a script,
    # a process inherits SIGINT ignored, and Python then installs no handler of its own
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    stopped_by_signal = False
    with tempfile.TemporaryDirectory(prefix="cluster-up-") as workdir:
        local = LocalCluster(
            str(share_dir),
            workdir,
            heartbeat_interval=settings.timings.heartbeat_interval,
            liveness=None,
            reconnect=None,
            log_level=settings.log_level,
            extra_env=to_env(settings, only=["log_format"]),  # every process it starts logs the same way
            addresses=addresses,
            edge_host=settings.edge_host,
            edge_port=0 if any_ports else edge_port,
            edge_grpc_port=None if not grpc_port else 0 if any_ports else grpc_port,
            inherit_output=True,
            die_with_parent=True,  # no orphans, even when `cluster up` is killed with SIGKILL
            keys=key_dir,
        )
        try:
            local.start_manager()
            for _ in range(settings.brokers):
                local.start_broker()
            # The agents share this host's RAM: by default each offers its share of it for placement
            budget = settings.memory_budget or (str(host_memory() // agents) if host_memory() and agents else None)
            budget = ["--memory-budget", budget] if budget else []
            for i in range(agents):
                # the agent's own default id (host-pid)
                local.start("agent", "--threads", str(threads), *budget, name=f"agent-{i + 1}")
            if edge_port:
                local.start_edge(*_secure_edge_args(key_dir))
            a, edge_url, grpc_address = local.addresses, local.edge_url, local.grpc_address
            several = ""
            if settings.brokers > 1:
                several = f"  {settings.brokers} brokers, in this order: {', '.join(b.name for b in local.brokers)}\n"
            typer.echo(
                f"cluster up: share {share_dir}\n"
                f"  clients (Client / AsyncClient): {a.broker_clients}\n"
                + several
                + f"  broker for agents:              {a.broker_agents}\n"
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


def broker_addresses(addresses: config.Addresses, brokers: int) -> config.Addresses:
    """`cluster up --brokers N`: broker_clients and broker_agents as comma lists of each broker's own address, in the
    brokers' order: as given when they list N; from one address, broker i on its port + i x UP_BROKER_PORT_STEP (port 0
    stays 0: the OS picks). ValueError for another count, a transport without ports, or two brokers on one address."""
    lists = {}
    for key in ("broker_clients", "broker_agents"):
        given = config.address_list(getattr(addresses, key))
        if len(given) == 1 and brokers > 1:
            host, _, port = given[0].rpartition(":")
            if not given[0].startswith("tcp://") or not port.isdigit():
                raise ValueError(f"{given[0]} ({key}): give each of the {brokers} brokers its address, comma-separated")
            step = config.UP_BROKER_PORT_STEP if int(port) else 0
            given = [f"{host}:{int(port) + i * step}" for i in range(brokers)]
        elif len(given) != brokers:
            raise ValueError(f"{key} names {len(given)} addresses for {brokers} brokers (one, or one per broker)")
        lists[key] = given
    taken = [*lists["broker_clients"], *lists["broker_agents"]]
    taken += [v for k, v in dataclasses.asdict(addresses).items() if k not in lists]
    fixed = [a for a in taken if not is_any_port(a)]
    doubled = sorted({a for a in fixed if fixed.count(a) > 1})
    if doubled:
        raise ValueError(f"{', '.join(doubled)}: two of the cluster's sockets would listen there")
    return dataclasses.replace(addresses, **{k: config.ADDRESS_SEPARATOR.join(v) for k, v in lists.items()})


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

    from cluster.atomic import atomic_write
    from cluster.keys import add, list_members, make_cluster_keys

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
