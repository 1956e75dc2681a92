"""Serving HTTP and reporting readiness, below both the edge and `cluster up`'s harness (cluster/local.py).

`serve_http` runs uvicorn on a socket bound first (port 0 works: the OS picks), then writes the ready file with
the URL it really got; `write_ready_file` / `read_ready_file` are that file's two sides (cluster/local.py describes
its JSON). The edge (edge/app.py), the roles' `--ready-file` (cluster/cli/) and LocalCluster all use these.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path

from cluster.atomic import atomic_write


def write_ready_file(path: str | Path, role: str, addresses: dict[str, str], **more) -> None:
    """Say "ready, listening on these addresses": {"role", "pid", "addresses"} (and `more`) as JSON, written
    atomically."""
    atomic_write(path, json.dumps({"role": role, "pid": os.getpid(), "addresses": addresses, **more}).encode())


def read_ready_file(path: str | Path) -> dict | None:
    """The ready file's content, or None while it is not there yet."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket listening on host:port, made with proto IPPROTO_TCP and TCP_NODELAY set. Both matter: asyncio
    sets TCP_NODELAY on an accepted connection only when its proto says TCP (socket.create_server makes proto 0), and
    without it Nagle's algorithm held each response on a keep-alive connection for the client's delayed ACK: about
    40 ms a request (accepted sockets inherit the option from the listener on Linux)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def serve_http(
    app,
    host: str,
    port: int,
    *,
    ready_file: str | Path | None = None,
    role: str = "edge",
    extra_addresses=None,
    **uvicorn_options,
) -> None:
    """uvicorn.run(app, host=host, port=port, ...), but on a socket bound here first, so that port 0 works: the OS
    picks a free port, and once uvicorn serves, `ready_file` gets {role: "http://host:port"}. Blocks until
    SIGINT/SIGTERM (uvicorn's own graceful shutdown). extra_addresses: called once serving, more addresses for the
    ready file (the edge's gRPC, which its lifespan started)."""
    import uvicorn

    config = uvicorn.Config(app, **uvicorn_options)  # sets up uvicorn's logging
    try:
        sock = listening_socket(host, port, config.backlog)
    except OSError as exc:
        logging.getLogger("uvicorn.error").error("cannot listen on %s: %s", http_url(host, port), exc)
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
    url = http_url(host, sock.getsockname()[1])
    if uvicorn_options.get("ssl_certfile"):
        url = "https" + url[len("http") :]  # a TLS edge reports the scheme its clients must use

    class ReportingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                logging.getLogger("uvicorn.error").info("Uvicorn running on %s (Press CTRL+C to quit)", url)
                if ready_file is not None:
                    write_ready_file(ready_file, role, {role: url, **(extra_addresses() if extra_addresses else {})})

    ReportingServer(config).run(sockets=[sock])
