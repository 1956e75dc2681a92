"""A client that stops reading (issue 11, point 3): what it costs the broker's memory.

A raw ZeroMQ DEALER sends `--requests` requests for a model that answers `--reply-kib` KiB each and never reads an
answer (its receive high-water mark is 1 message, so almost nothing is taken off the broker's hands: the worst case
for the broker). Meanwhile a normal client asks `echo` every 50 ms. Printed: the broker's RSS before the flood, at
its peak, once the broker is idle with the greedy client still connected ("held"), and after the greedy client
disconnects ("after"), with what the normal client saw. The broker runs without load shedding (--max-queue-wait 0),
so that every request is accepted unless the per-client bounds refuse it. Nothing is asserted here
(tests/test_slow_reader.py does).

    python3 -m bench.slow_reader [--requests 5000] [--reply-kib 256]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import zmq

from bench.lib import local_cluster, log
from cluster import protocol
from cluster.demo_models import BIG_CONFIG, ECHO_CONFIG, Big, make_echo
from cluster.errors import ClusterError
from cluster.protocol import Command
from cluster.publish import publish_version


def publish(share: Path) -> None:
    for name, module, config in (("big", torch.jit.script(Big()), BIG_CONFIG), ("echo", make_echo(), ECHO_CONFIG)):
        path = share / f"{name}.pt"
        module.save(str(path))
        publish_version(share, name, path, config)
        path.unlink()


def greedy_dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)  # take (almost) nothing off the broker's hands
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(address)
    return sock


def send_requests(sock: zmq.Socket, count: int, values: int) -> None:
    n = np.array([values], dtype=np.int64)
    meta = [{"name": "n", "datatype": "INT64", "shape": [1]}]
    for i in range(count):
        header = {"id": i, "model": "big", "timeout": 120.0, "inputs": meta}
        sock.send_multipart(protocol.message(Command.REQUEST, header, [n.tobytes()]))


class Sampler:
    """The broker's RSS every 0.1 s, in a thread: the peak so far."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class NormalClient:
    """Asks echo every 50 ms in a thread; counts what succeeded and what failed, and the slowest answer."""

    def __init__(self, client) -> None:
        self.client, self.ok, self.failed, self.slowest = client, 0, [], 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        x = {"x": np.ones((1, 4), np.float32)}
        while not self._stop.wait(0.05):
            start = time.monotonic()
            try:
                self.client.infer("echo", x, timeout=10)
                self.ok += 1
            except ClusterError as exc:
                self.failed.append(f"{type(exc).__name__}: {exc}")
            self.slowest = max(self.slowest, time.monotonic() - start)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def wait_idle(client, expected: int, timeout: float) -> bool:
    """Until the broker has seen `expected` requests (its `requests` count, refused ones included) and has nothing
    in flight or queued (every greedy request answered, refused or dropped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.stats()
        if stats["requests"] + stats.get("client_refused", 0) >= expected and not stats["in_flight"] + stats["queued"]:
            return True
        time.sleep(0.2)
    return False


def run(requests: int, reply_kib: int, workdir: Path) -> dict:
    share = workdir / "share"
    share.mkdir()
    publish(share)
    with local_cluster(share, workdir / "logs") as cluster:
        cluster.start_manager()
        # Load shedding off (as a model with a fast measured rate could have it): the broker must hold its own
        # against a client that does not read, whatever its queue estimate says.
        broker = cluster.start_broker(CLUSTER_MAX_QUEUE_WAIT="0")
        cluster.start_agents(1, "--capacity", "8")
        cluster.wait_for_agents(1, model="big")
        client = cluster.client()
        warm = {"n": np.array([reply_kib * 256], np.int64)}
        for _ in range(20):
            client.infer("big", warm)
            client.infer("echo", {"x": np.ones((1, 4), np.float32)})
        base = client.stats()
        base = base["requests"] + base.get("client_refused", 0)
        sampler = Sampler(broker.pid)
        before = sampler.rss()
        normal = NormalClient(client)
        ctx = zmq.Context()
        greedy = greedy_dealer(ctx, cluster.addresses.broker_clients)
        started = time.monotonic()
        send_requests(greedy, requests, reply_kib * 256)
        idle = wait_idle(client, base + requests, 300)
        settled = time.monotonic() - started
        held = sampler.rss()
        counts = client.stats()
        greedy.close(linger=0)
        ctx.term()
        left = time.monotonic()
        after = sampler.rss()
        while time.monotonic() - left < 10 and after > before + 50:  # give it up to 10 s to come back down
            time.sleep(0.2)
            after = sampler.rss()
        time.sleep(1.0)
        after = sampler.rss()
        normal.stop()
        sampler.stop()
        return {
            "before": before,
            "peak": sampler.peak,
            "held": held,
            "after": after,
            "settled_s": settled,
            "idle": idle,
            "counts": counts,
            "normal_ok": normal.ok,
            "normal_failed": normal.failed,
            "normal_slowest_s": normal.slowest,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--reply-kib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(args.requests, args.reply_kib, Path(tmp))
    log(
        f"slow reader: {args.requests} requests x {args.reply_kib} KiB replies, never read\n"
        f"  broker RSS: before {r['before']:.0f} MiB, peak {r['peak']:.0f} MiB, held (greedy still connected, broker "
        f"idle after {r['settled_s']:.1f} s{'' if r['idle'] else ', NOT idle'}) {r['held']:.0f} MiB, "
        f"after it left {r['after']:.0f} MiB\n"
        f"  normal client meanwhile: {r['normal_ok']} ok, {len(r['normal_failed'])} failed, slowest "
        f"{r['normal_slowest_s']:.2f} s {r['normal_failed'][:3]}\n"
        f"  broker counts: {r['counts']}"
    )


if __name__ == "__main__":
    main()
