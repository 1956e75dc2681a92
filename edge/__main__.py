"""python -m edge [--host H] [--port P] [--broker ADDR] [--max-body-bytes N] [--frontend PATH]: run the edge."""

from __future__ import annotations

import argparse
import os

from cluster.config import BROKER_CLIENT_ADDR, EDGE_HOST, EDGE_PORT, env_or
from edge.app import DEFAULT_MAX_BODY, run_edge


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edge", description="Serve the Open Inference Protocol edge.")
    parser.add_argument("--host", default=os.environ.get("CLUSTER_EDGE_HOST", EDGE_HOST), help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("CLUSTER_EDGE_PORT", EDGE_PORT)), help="port (default 8000)")
    parser.add_argument("--broker", default=env_or("BROKER_CLIENTS", BROKER_CLIENT_ADDR), help="the broker's client address")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body (default 64 MiB)")
    parser.add_argument("--frontend", default=None, help="the page served at / (default: frontend.html of the repository)")
    parser.add_argument("--request-timeout", type=float, default=None, help="default inference deadline in seconds")
    parser.add_argument("--log-level", default=os.environ.get("CLUSTER_LOG_LEVEL", "info"))
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    run_edge(
        args.host, args.port, args.broker,
        max_body_bytes=args.max_body_bytes, frontend_path=args.frontend, request_timeout=args.request_timeout,
        log_level=args.log_level, access_log=args.access_log,
    )


if __name__ == "__main__":
    main()
