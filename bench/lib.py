"""What every benchmark shares: settings, the result table, starting processes, the two request loops through
cluster.Client, wrk, and the machine description.

Every process a benchmark starts comes from the package's one harness, `cluster.local.LocalCluster`: the cluster's
roles (`start_manager`, ...) and the helper processes that are not roles (bare brokers, bare FastAPI apps, simulators:
bench/sims.py, through `start_sim`), each with its log file, stopped by pid by `stop_all`.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from cluster.local import LocalCluster, Proc

BENCH_DIR = Path(__file__).resolve().parent

# ---- set-up shared by several benchmarks --------------------------------------------------------------------------

ECHO_FLOATS = 64
IN_FLIGHT = 64
AGENT_OMP_FIX = {"OMP_NUM_THREADS": "1"}  # control runs: one OpenMP thread in the agents' worker threads too
WRK_CONNECTIONS = 32
WRK_THREADS = 2


@dataclass
class Settings:
    quick: bool
    rounds: int  # alternating ours/baseline rounds where a benchmark repeats (median reported)
    seq_requests: int
    seconds: float  # closed-loop measurement window
    warmup: float
    wrk_seconds: float
    wrk_warmup: float
    batch_seconds: float
    cpu_seconds: float
    route_seconds: float

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(True, 1, 300, 1.5, 0.5, 3, 1, 3, 4, 3)
        return cls(False, 3, 2000, 4, 1, 6, 1, 8, 10, 8)

    def rounds_suffix(self) -> str:
        """What a figure's name says when it is a median over rounds."""
        return f" (median of {self.rounds})" if self.rounds > 1 else ""


# ---- the table ------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    ours: str
    baseline: str
    ratio: str = "-"
    target: str = "-"
    holds: str = "-"


@dataclass
class Suite:
    """What a run has measured so far: the rows of the table and the notes under it."""

    settings: Settings
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)

    def note(self, text: str) -> None:
        self.notes.append(text)
        log(f"note: {text}")


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[suite {time.monotonic() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio_row(
    figure: str, ours: float, base: float, unit_digits: int, target: str, check=None, base_text: str | None = None
) -> Row:
    ratio = ours / base if base else float("nan")
    holds = "-" if check is None else ("yes" if math.isfinite(ratio) and check(ratio) else "no")
    return Row(
        figure,
        fmt(ours, unit_digits),
        base_text or fmt(base, unit_digits),
        f"{ratio:.2f}x" if math.isfinite(ratio) else "n/a",
        target,
        holds,
    )


def percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


HEADERS = ("figure", "ours", "baseline", "ratio", "target", "holds")


def _cells(row: Row) -> tuple[str, ...]:
    return (row.figure, row.ours, row.baseline, row.ratio, row.target, row.holds)


def table_text(rows: list[Row]) -> str:
    cells = [HEADERS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i in (0, 4, 5) else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_markdown(rows: list[Row]) -> str:
    def esc(v: str) -> str:
        return v.replace("|", "\\|")

    lines = ["| " + " | ".join(HEADERS) + " |", "| --- | ---: | ---: | ---: | --- | --- |"]
    lines += ["| " + " | ".join(esc(v) for v in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


# ---- processes ------------------------------------------------------------------------------------------------------


def slow_rounds_for(seconds: float) -> int:
    """Rounds of cluster.demo_models.Slow for a forward pass of about `seconds` on one torch thread here (the agents
    run torch with one thread)."""
    import torch

    from cluster.demo_models import Slow

    model = torch.jit.script(Slow())
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.zeros(1, 1)
        model(x, torch.tensor([1000]))
        start = time.perf_counter()
        model(x, torch.tensor([50_000]))
        return max(1, int(50_000 / (time.perf_counter() - start) * seconds))
    finally:
        torch.set_num_threads(previous)


def publish_slow(share: Path, config: dict) -> None:
    """cluster.demo_models.Slow published to `share` as model "slow" with `config`."""
    import torch

    from cluster.demo_models import Slow
    from cluster.publish import publish_version

    model = share.parent / "slow.pt"
    torch.jit.script(Slow()).save(str(model))
    publish_version(share, "slow", model, config)
    model.unlink()


@contextlib.contextmanager
def local_cluster(share: Path, workdir: Path) -> Iterator[LocalCluster]:
    """Our cluster's processes as every benchmark runs them (heartbeats once a second, warnings only in the logs),
    each stopped by pid when the block ends; their logs are shown first if the benchmark failed."""
    cluster = LocalCluster(share, workdir, heartbeat_interval=1.0, extra_env={"CLUSTER_LOG_LEVEL": "WARNING"})
    try:
        yield cluster
    except BaseException:
        log(cluster.logs())
        raise
    finally:
        cluster.stop_all()


def start_sim(cluster: LocalCluster, name: str, role: str, *args: str, stop_as: str = "baseline", **env) -> Proc:
    """Start `python3 bench/sims.py ROLE ARGS` as one of `cluster`'s processes (log `name`.log in its workdir). A role
    that listens (sims.LISTENING) binds port 0: this returns once it serves, with what it got in `proc.addresses`.
    stop_as: the role it is stopped with by stop_all ("agent" for simulated agents: before the broker they talk to;
    "edge": first; the default, after the cluster)."""
    from bench.sims import LISTENING

    argv = [sys.executable, str(BENCH_DIR / "sims.py"), role, *args]
    return cluster.spawn(name, argv, role=stop_as, ready=role in LISTENING, **env)


def check_running(cluster: LocalCluster) -> None:
    """RuntimeError, with its log, if one of `cluster`'s processes exited without being stopped."""
    for proc in cluster.exited():
        raise RuntimeError(f"{proc.name} (pid {proc.pid}) exited with {proc.returncode}: {proc.log()[-600:]}")


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


# ---- request loops through cluster.Client ------------------------------------------------------------------------


def sequential(client, model: str, inputs: dict, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        t = time.perf_counter()
        client.infer(model, inputs, timeout=60)
        latencies.append(time.perf_counter() - t)
    return latencies


def closed_loop(client, model: str, inputs: dict, in_flight: int, seconds: float, warmup: float) -> dict:
    """Keep `in_flight` requests outstanding through Client.submit for warmup + seconds; figures over the window.

    Each completion is stamped by its done callback, in whichever thread read the reply (the client's I/O thread or a
    caller reading for everybody); the main thread only tops the window up."""
    done = threading.Semaphore(0)
    records: list[tuple[float, float, str]] = []  # (submitted, completed, agent)
    errors: dict[str, int] = {}

    def finished(future, t0: float) -> None:
        t1 = time.perf_counter()
        exc = future.exception()
        if exc is None:
            records.append((t0, t1, future.result().agent))
        else:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        done.release()

    def submit() -> None:
        t0 = time.perf_counter()
        client.submit(model, inputs, timeout=60).add_done_callback(lambda f, t0=t0: finished(f, t0))

    for _ in range(in_flight):
        submit()
    start = time.perf_counter() + warmup
    end = start + seconds
    while time.perf_counter() < end:
        if not done.acquire(timeout=60):
            raise RuntimeError(f"{model}: no answer for 60 s")
        submit()
    for _ in range(in_flight):
        if not done.acquire(timeout=60):
            raise RuntimeError(f"{model}: in-flight requests not answered within 60 s")
    window = [r for r in records if start <= r[1] <= end]
    if not window:
        raise RuntimeError(f"{model}: no request finished within the {seconds:g} s window ({len(records)} in all)")
    latencies = [t1 - t0 for t0, t1, _ in window if t0 >= start]
    agents: dict[str, int] = {}
    for _, _, agent in window:
        agents[agent] = agents.get(agent, 0) + 1
    if errors:
        raise RuntimeError(f"{model}: errors during the run: {errors}")
    return {
        "throughput": len(window) / seconds,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "agents": agents,
    }


# ---- HTTP -----------------------------------------------------------------------------------------------------------


WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
"""


def wrk_script(path: Path, body: str) -> Path:
    """A wrk Lua script that POSTs `body` as JSON."""
    path.write_text(WRK_LUA.format(body=body))
    return path


def run_wrk(url: str, script: Path, seconds: float) -> dict:
    """wrk -t WRK_THREADS -c WRK_CONNECTIONS for `seconds`: req/s, p50/p99 (ms), non-2xx answers, socket errors."""
    out = subprocess.run(
        ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not found:
        raise RuntimeError(f"cannot read wrk's output: {out[-500:]}")
    result = {"rps": float(found.group(1)), "non2xx": 0, "errors": 0}
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        result["non2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        result["errors"] = sum(map(int, m.groups()))
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            value, unit = float(m.group(1)), m.group(2)
            result[f"p{pct}_ms"] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    return result


# ---- the machine ----------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import psutil

    info = {}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        info["CPU"] = m.group(1).strip() if m else platform.processor() or platform.machine()
    except OSError:
        info["CPU"] = platform.processor() or platform.machine()
    info["cores"] = f"{os.cpu_count()} logical ({len(os.sched_getaffinity(0))} usable by this process)"
    info["memory"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    info["OS"] = f"{platform.system()} {platform.release()}"
    try:
        import torch

        torch_version = torch.__version__
    except Exception:
        torch_version = "n/a"
    info["Python"] = platform.python_version()
    info["torch"] = torch_version
    info["pyzmq / libzmq"] = f"{zmq.__version__} / {zmq.zmq_version()}"
    versions = []
    for pkg in ("fastapi", "uvicorn", "httpx", "msgpack", "numpy"):
        try:
            from importlib.metadata import version

            versions.append(f"{pkg} {version(pkg)}")
        except Exception:
            pass
    info["other"] = ", ".join(versions)
    try:
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5)
        info["wrk"] = (wrk.stdout + wrk.stderr).strip().splitlines()[0]
    except Exception:
        info["wrk"] = "n/a"
    info["load average at start"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    info["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return info
