"""Where the bus's CPU goes (issue 23): CPU per request of every thread of the client, the broker and the agents
(echo, 64 FP32, 2 agents), sequential through `Client`, 64 in flight through `Client`, and 64 coroutines through
`AsyncClient`; with --py-spy OUTDIR, py-spy profiles of each process too (raw stacks and their top entries).

    python3 -m bench.bus_profile [--seconds 5] [--py-spy OUTDIR]

Thread CPU comes from /proc (psutil): a ZeroMQ I/O thread ("ZMQbg/IO/0") is counted apart from the Python threads.
py-spy (`pip install py-spy`, not a dependency) samples the Python stacks; the time it puts on a line that sends
includes the time the thread waited for the CPU after waking ZeroMQ's I/O thread (on 2 cores, most of it)."""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from bench.echo import Payloads, async_throughput, echo_stacks
from bench.lib import ECHO_FLOATS, IN_FLIGHT, closed_loop, percentile, sequential


def thread_cpu(pids: dict[str, int]) -> dict[str, dict[int, tuple[str, float, float]]]:
    """process name -> thread id -> (thread name, user s, system s)."""
    out = {}
    for name, pid in pids.items():
        threads = {}
        for t in psutil.Process(pid).threads():
            try:
                comm = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
            except OSError:
                comm = "?"
            threads[t.id] = (comm, t.user_time, t.system_time)
        out[name] = threads
    return out


def per_request(before: dict, after: dict, requests: int) -> dict[str, str]:
    """process -> 'thread: us per request (sys %)' for threads that used any CPU."""
    lines = {}
    for proc, threads in after.items():
        parts = []
        for tid, (comm, user, system) in threads.items():
            _, user0, system0 = before[proc].get(tid, (comm, 0.0, 0.0))
            used = (user - user0) + (system - system0)
            if used * 1e6 / requests >= 0.5:
                parts.append(f"{comm} {used * 1e6 / requests:.1f} us ({100 * (system - system0) / used:.0f}% sys)")
        lines[proc] = ", ".join(parts) or "-"
    return lines


def spy(pids: dict[str, int], outdir: Path, seconds: float) -> list[subprocess.Popen]:
    outdir.mkdir(parents=True, exist_ok=True)
    argv = ["py-spy", "record", "-r", "200", "-d", str(max(1, int(seconds))), "--format", "raw", "--nonblocking"]
    return [
        subprocess.Popen([*argv, "-p", str(pid), "-o", str(outdir / f"{name}.raw")], stdout=subprocess.DEVNULL)
        for name, pid in pids.items()
    ]


def top(raw: Path, n: int = 15) -> str:
    """The `n` lines with the most samples on top of the stack (self time), in % of the process's samples."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        counts[stack.rsplit(";", 1)[-1]] += int(count)
    rows = [f"{raw.stem}: {total} samples"] + [f"  {100 * c / total:5.1f}% {f}" for f, c in counts.most_common(n)]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement window of each load")
    parser.add_argument("--py-spy", type=Path, default=None, help="also profile each process with py-spy, here")
    args = parser.parse_args(argv)
    from cluster import Client

    x = np.ones((1, ECHO_FLOATS), np.float32)
    with echo_stacks("bench-bus-profile-") as (cluster, _bare):
        pids = {p.name: p.pid for p in cluster.procs if p.role in ("broker", "agent")} | {"client": os.getpid()}

        def measure(label: str, load) -> None:
            spies = spy(pids, args.py_spy / label, args.seconds) if args.py_spy else []
            before = thread_cpu(pids)
            requests, extra = load()
            after = thread_cpu(pids)
            print(f"\n{label}: {requests} requests, {extra}")
            for proc, line in per_request(before, after, requests).items():
                print(f"  {proc}: {line}")
            for proc in spies:
                proc.wait(60)
            for raw in sorted((args.py_spy / label).glob("*.raw")) if args.py_spy else []:
                print(top(raw))

        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            sequential(client, "echo", {"x": x}, 300)  # warm-up

            def one_at_a_time():
                latencies, end = [], time.perf_counter() + args.seconds
                while time.perf_counter() < end:
                    latencies += sequential(client, "echo", {"x": x}, 100)
                return len(latencies), f"p50 {percentile(latencies, 50) * 1e6:.0f} us"

            def in_flight():
                result = closed_loop(client, "echo", {"x": x}, IN_FLIGHT, args.seconds, 0.0)
                return round(result["throughput"] * args.seconds), f"{result['throughput']:.0f} req/s"

            measure("sequential-client", one_at_a_time)
            measure("64-in-flight-client", in_flight)

        def coroutines():
            rate = async_throughput(cluster.addresses.broker_clients, Payloads(), IN_FLIGHT, args.seconds, 0.0)
            return round(rate * args.seconds), f"{rate:.0f} req/s"

        measure("64-coroutines-asyncclient", coroutines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
