"""`cluster bench`: the load generator (cluster/loadgen.py) through the bus, HTTP or gRPC."""

from __future__ import annotations

from pathlib import Path

import typer

from cluster.options import need_role, settings_command
from cluster.role_settings import BenchSettings


@settings_command(BenchSettings)
def bench(
    settings: BenchSettings,
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
    token_file: Path | None = typer.Option(
        None, "--token-file", help="File holding the edge's bearer token (the first line that is not a # comment)."
    ),
    ca_file: str | None = typer.Option(
        None,
        "--ca-file",
        help="CA certificate (PEM) of a TLS edge: HTTPS for --http (default: the system's CAs), TLS for --grpc.",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON list of the levels on stdout, for machines."),
):
    """Load generator, in the manner of Triton's perf_analyzer: for each level, throughput, p50/p90/p99 latency, and
    where the time went (queueing vs compute, from the agents' statistics), through the bus, HTTP or gRPC. Each level
    is printed when it is measured; Ctrl-C stops the sweep and prints the levels measured (exit status 130)."""
    import asyncio
    import json

    from cluster import ClusterError, loadgen

    broker, key, token = settings.addresses.broker_clients, settings.key, settings.bench_token

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
        from edge.tokens import read_token_file  # not edge.security: that imports FastAPI

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
    if http or grpc:
        need_role("bench" if http else "edge", what=f"cluster bench {'--http' if http else '--grpc'}")
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
