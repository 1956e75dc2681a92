"""CURVE on vs off, in the same run: `cluster bench`'s load generator (echo through the bus, 2 agents, concurrency 8)
and sequential requests (concurrency 1, its p50), first in the clear, then with keys; and the per-message cost of
reading a message's key (ZAP User-Id) plus the role check.

    python3 -m bench.curve [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import timeit
from pathlib import Path

import zmq

from cluster import keys, loadgen
from cluster.auth import key_of, refusal
from cluster.local import LocalCluster
from cluster.publish import publish_version


def echo_share(directory: Path) -> Path:
    import torch

    from cluster.demo_models import ECHO_CONFIG, make_echo

    model = directory / "echo.pt"
    torch.jit.save(make_echo(), str(model))
    share = directory / "share"
    share.mkdir()
    publish_version(share, "echo", model, ECHO_CONFIG)
    return share


def run_once(share: Path, workdir: Path, secure: bool, duration: float) -> dict:
    key_dir = workdir / "keys" if secure else None
    with LocalCluster(share, workdir / "logs", heartbeat_interval=1.0, keys=key_dir, log_level="WARNING") as local:
        local.start_manager()
        local.start_broker()
        local.start_agents(2, "--models", "echo")
        local.wait_for_agents(2, model="echo")
        address, key = local.addresses.broker_clients, local.member_key("client")
        loaded = asyncio.run(loadgen.bench_bus(address, "echo", 8, duration, key=key)).summary()
        sequential = asyncio.run(loadgen.bench_bus(address, "echo", 1, duration, key=key)).summary()
    return {"throughput": loaded["throughput"], "p50_c8_ms": loaded["p50_ms"], "seq_p50_ms": sequential["p50_ms"]}


def role_check_cost(workdir: Path) -> tuple[float, float]:
    """ns per message: reading the User-Id of a received frame, and key_of + refusal together."""
    directory = workdir / "micro-keys"
    keys.make_cluster_keys(directory, agents=0)
    allow = keys.AllowList(directory)
    client = keys.KeyFile.load(directory / "client.key")
    server = keys.KeyFile.load(directory / "server.key")
    from cluster.auth import BusSecurity

    ctx = zmq.Context()
    security = BusSecurity(server, allow)
    security.start_authenticator(ctx)
    router = ctx.socket(zmq.ROUTER)
    security.server("clients").apply(router)
    router.bind("tcp://127.0.0.1:0")
    dealer = ctx.socket(zmq.DEALER)
    BusSecurity(client).client().apply(dealer)
    dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    dealer.send(b"x")
    frame = router.recv_multipart(copy=False)[1]
    n = 200_000
    read = min(timeit.repeat(lambda: key_of(frame), number=n, repeat=3)) / n
    both = min(timeit.repeat(lambda: refusal(allow, key_of(frame), "infer"), number=n, repeat=3)) / n
    assert refusal(allow, key_of(frame), "infer") is None
    dealer.close(0)
    router.close(0)
    security.stop()
    ctx.term()
    return read * 1e9, both * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2, help="clear/curve pairs, alternated (the machine is noisy)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-curve-") as tmp:
        tmp = Path(tmp)
        share = echo_share(tmp)
        results = [
            (mode, run_once(share, tmp / f"{mode}-{i}", mode == "curve", args.duration))
            for i in range(args.rounds)
            for mode in ("clear", "curve")
        ]
        read_ns, check_ns = role_check_cost(tmp)
    for mode, r in results:
        print(
            f"{mode:5}: echo, 2 agents: {r['throughput']:.0f} req/s at concurrency 8 (p50 {r['p50_c8_ms']:.2f} ms), "
            f"sequential p50 {r['seq_p50_ms']:.3f} ms"
        )
    print(f"per message: User-Id read {read_ns:.0f} ns, User-Id read + role check {check_ns:.0f} ns")


if __name__ == "__main__":
    main()
