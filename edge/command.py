"""The edge's command line: `python -m edge` runs it, without importing the cluster's CLI (cluster/cli/).

`cluster edge` is this same command (cluster/cli/ registers `edge` from here), so its options are written once;
`main` runs it.
"""

from __future__ import annotations

import typer

from cluster import config
from cluster.options import BrokerClients, Key, LogFormat, LogFormatName, LogLevel, ReadyFile


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
    import edge  # run_edge looked up on the package when called (tests replace it there)

    edge.run_edge(
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


def command():
    """The click command of `edge` (a one-command Typer app is the command itself: no subcommand name)."""
    app = typer.Typer(add_completion=False)
    app.command(name="edge")(edge)
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """Run the edge command with `argv` (default: sys.argv[1:])."""
    command().main(args=argv, prog_name="python -m edge")
