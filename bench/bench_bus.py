"""Bus benchmark: our client -> broker -> agent path against a bare pyzmq ROUTER-ROUTER echo broker, same run.

    python bench/bench_bus.py [--requests 2000] [--seconds 5] [--in-flight 32]

Both set-ups move the same payload (64 float32) from a client through a broker process to one of 2 worker
processes and back, on loopback TCP. The bare one is the ceiling for a Python broker on this machine: no protocol,
no validation, no model, just frames forwarded. Prints sequential round-trip p50/p99 and throughput with N requests
in flight for both, and our figure as a ratio of the bare one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAYLOAD_FLOATS = 64


# ---- the bare baseline ----------------------------------------------------------------------------------------


def bare_broker(front: str, back: str) -> None:
    ctx = zmq.Context()
    clients, workers = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    clients.bind(front)
    workers.bind(back)
    ready: list[bytes] = []
    turn = 0
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(workers, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if workers in events:
            frames = workers.recv_multipart()
            if frames[1] == b"READY":
                ready.append(frames[0])
            else:
                clients.send_multipart(frames[1:])
        if clients in events and ready:
            frames = clients.recv_multipart()
            worker = ready[turn % len(ready)]
            turn += 1
            workers.send_multipart([worker, *frames])


def bare_worker(back: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(back)
    sock.send(b"READY")
    while True:
        sock.send_multipart(sock.recv_multipart())


def bench_bare(requests: int, seconds: float, in_flight: int) -> dict:
    port_front, port_back = _free_port(), _free_port()
    front, back = f"tcp://127.0.0.1:{port_front}", f"tcp://127.0.0.1:{port_back}"
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=bare_broker, args=(front, back), daemon=True)]
    procs += [spawn.Process(target=bare_worker, args=(back,), daemon=True) for _ in range(2)]
    for p in procs:
        p.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(front)
    payload = np.ones(PAYLOAD_FLOATS, np.float32).tobytes()
    try:
        for _ in range(3000):  # wait for the workers, then warm up
            sock.send(payload)
            if sock.poll(5000):
                sock.recv()
        latencies = []
        for _ in range(requests):
            t = time.perf_counter()
            sock.send(payload)
            sock.recv()
            latencies.append(time.perf_counter() - t)
        done = 0
        for _ in range(in_flight):
            sock.send(payload)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            sock.recv()
            done += 1
            sock.send(payload)
        elapsed = time.perf_counter() - start
        for _ in range(in_flight):
            sock.recv()
        return _summary(latencies, done / elapsed)
    finally:
        sock.close(0)
        ctx.term()
        for p in procs:
            p.kill()
            p.join(5)


# ---- ours -----------------------------------------------------------------------------------------------------------


def bench_cluster(requests: int, seconds: float, in_flight: int, policy: str = "round-robin") -> dict:
    from cluster import Client
    from cluster.demo_models import write_demo_models
    from tests.harness import LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        share = Path(tmp) / "share"
        write_demo_models(share)
        with LocalCluster(share, Path(tmp) / "logs", heartbeat_interval=1.0) as local:
            local.extra_env["CLUSTER_LOG_LEVEL"] = "WARNING"
            local.start_manager()
            local.start_broker("--policy", policy)
            local.start_agents(2, "--capacity", str(max(4, in_flight)))
            local.wait_for_agents(2, model="echo")
            x = np.ones((1, PAYLOAD_FLOATS), np.float32)
            with Client(local.addresses.broker_clients) as client:
                for _ in range(500):
                    client.infer("echo", {"x": x})
                latencies = []
                for _ in range(requests):
                    t = time.perf_counter()
                    client.infer("echo", {"x": x})
                    latencies.append(time.perf_counter() - t)
                done = 0
                pending = {client.submit("echo", {"x": x}) for _ in range(in_flight)}
                start = time.perf_counter()
                while time.perf_counter() - start < seconds:
                    finished, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for f in finished:
                        f.result()
                        done += 1
                        pending.add(client.submit("echo", {"x": x}))
                elapsed = time.perf_counter() - start
                concurrent.futures.wait(pending, timeout=30)
            return _summary(latencies, done / elapsed)


# ---- helpers ------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(latencies: list[float], throughput: float) -> dict:
    ordered = sorted(latencies)
    return {
        "p50_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[int(len(ordered) * 0.99) - 1] * 1e6,
        "throughput": throughput,
    }


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests for the latency figures")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the throughput run")
    parser.add_argument("--in-flight", type=int, default=32, help="requests in flight in the throughput run")
    args = parser.parse_args()
    bare = bench_bare(args.requests, args.seconds, args.in_flight)
    ours = bench_cluster(args.requests, args.seconds, args.in_flight)
    print(f"machine: {machine()}")
    print(f"echo, {PAYLOAD_FLOATS} float32, 2 agents/workers, {args.requests} sequential requests, {args.in_flight} in flight for {args.seconds:.0f} s\n")
    print(f"{'figure':<34}{'cluster':>12}{'bare pyzmq':>12}{'ratio':>8}")
    rows = [
        ("sequential round trip p50 (us)", "p50_us"),
        ("sequential round trip p99 (us)", "p99_us"),
        (f"throughput, {args.in_flight} in flight (req/s)", "throughput"),
    ]
    for label, key in rows:
        print(f"{label:<34}{ours[key]:>12.0f}{bare[key]:>12.0f}{ours[key] / bare[key]:>8.2f}")


if __name__ == "__main__":
    main()
