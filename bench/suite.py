"""The whole benchmark suite in one command: every figure next to a baseline measured in the same run.

    python bench/suite.py [--quick] [--only 1,2,...] [--out bench/RESULTS.md]

Runs, each with its own processes (started here, stopped by pid in try/finally) on 127.0.0.1:

 1. sequential round trip to `echo` (64 float32) through cluster.Client, 2 agents: p50/p99, vs a bare pyzmq
    ROUTER-ROUTER echo broker + 2 workers (bench_bus.py) on the same path;
 2. throughput with 64 requests in flight (agents --capacity 64), same set-up, vs the bare broker;
 3. HTTP with wrk (32 connections, OIP JSON body for `echo`, 64 floats): the edge vs (a) a bare FastAPI app that
    answers the same JSON itself and (b) the seed's design, a FastAPI load balancer forwarding with one shared
    httpx.AsyncClient round-robin to 2 FastAPI inference servers running the echo TorchScript model; the same
    uvicorn settings for every server (UVICORN_SETTINGS);
 4. dynamic batching on vs off for a TorchScript MLP (4 x Linear 2048x2048, >= 2 ms per sample on one thread),
    published twice (same weights), 64 in flight, 2 agents;
 5. 4 MiB tensors through `echo`, 8 in flight, 2 agents: payload bytes per second, vs the bare pyzmq path;
 6. scale: (a) the manager's CPU with 1,000 simulated agents heartbeating once a second, vs a bare SUB socket that
    decodes the same beats; (b) the broker with 100 simulated agents vs 2 (same simulator), 64 in flight;
 7. routing: 3 agents, one 10x slower for the same request (its own share), round-robin vs least-outstanding.

Prints one table (figure, ours, baseline, ratio, target, holds) to stdout, progress to stderr, and writes the same
table as Markdown, with the machine it ran on, to bench/RESULTS.md. Targets are the TARGET_* constants below.
`--quick` shortens every run to a smoke check (about 2 minutes); the full run takes about 10.

The script also runs the helper processes it needs (`--role ...`, not for direct use).
"""

# no `from __future__ import annotations`: FastAPI must see the real Request type in the helper servers' routes
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCH_DIR))

# ---- targets ------------------------------------------------------------------------------------------------------

TARGET_SEQ_P50_MAX_RATIO = 1.5  # 1: our sequential p50 <= 1.5x the bare broker's
TARGET_THROUGHPUT_MIN_RATIO = 0.7  # 2: our throughput, 64 in flight >= 0.7x the bare broker's
TARGET_EDGE_VS_BARE_MIN_RATIO = 0.6  # 3a: edge req/s >= 0.6x a bare FastAPI app's
TARGET_EDGE_VS_HTTPX_MIN_RATIO = 10.0  # 3b: edge req/s >= 10x the httpx load balancer design's
TARGET_MIN_SAMPLE_MS = 2.0  # 4: one forward pass of one sample costs at least this (else batching is moot)
TARGET_BATCHING_MIN_SPEEDUP = 3.0  # 4: throughput with batching >= 3x without
TARGET_BATCHING_P99_MAX_RATIO = 1.0  # 4: p99 with batching no worse than without
TARGET_BIG_TENSOR_MIN_RATIO = 0.5  # 5: 4 MiB payload bytes/s >= 0.5x the bare pyzmq path
TARGET_MANAGER_MAX_CPU_PCT = 10.0  # 6a: manager CPU with 1,000 agents beating 1/s < 10% of one core
TARGET_BROKER_SCALE_MIN_RATIO = 0.8  # 6b: throughput with 100 agents >= 0.8x with 2

# ---- set-up constants -------------------------------------------------------------------------------------------

ECHO_FLOATS = 64
IN_FLIGHT = 64
MLP_WIDTH = 2048
MLP_LAYERS = 4
BIG_FLOATS = 1024 * 1024  # 4 MiB of float32
BIG_IN_FLIGHT = 8
SIM_BEAT_AGENTS = 1000
SIM_BROKER_AGENTS = 100
SIM_AGENT_CAPACITY = 4
ROUTE_IN_FLIGHT = 16
ROUTE_CAPACITY = 16  # high enough that the capacity cap does not hide what the policy does
WORK_WIDTH = 512
WORK_FAST_ITERS = 100  # ~1 ms on one thread here
WORK_SLOW_ITERS = 1000  # ~10 ms: the slow agent's copy of the same model name and version
AGENT_OMP_FIX = {"OMP_NUM_THREADS": "1"}  # control runs: one OpenMP thread in the agents' worker threads too
WRK_CONNECTIONS = 32
WRK_THREADS = 2
# one uvicorn configuration for every HTTP server in benchmark 3 (uvloop/httptools are not installed here, so these
# are also what "auto" would pick; naming them keeps the comparison fair if they get installed)
UVICORN_SETTINGS = dict(host="127.0.0.1", workers=1, loop="asyncio", http="h11", log_level="warning", access_log=False)


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
    def make(cls, quick: bool) -> "Settings":
        if quick:
            return cls(True, 1, 300, 1.5, 0.5, 3, 1, 3, 4, 3)
        return cls(False, 3, 2000, 4, 1, 6, 1, 8, 10, 8)


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


def ratio_row(figure: str, ours: float, base: float, unit_digits: int, target: str, check=None, base_text: str | None = None) -> Row:
    ratio = ours / base if base else float("nan")
    holds = "-" if check is None else ("yes" if math.isfinite(ratio) and check(ratio) else "no")
    return Row(figure, fmt(ours, unit_digits), base_text or fmt(base, unit_digits),
               f"{ratio:.2f}x" if math.isfinite(ratio) else "n/a", target, holds)


def percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


# ---- processes ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Helper processes started by this script; stop_all() stops each by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            )
        self.procs.append((name, popen, log_path))
        return popen

    def role(self, name: str, role: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        return self.start(name, [sys.executable, str(Path(__file__).resolve()), "--role", role, *args], env)

    @staticmethod
    def stop(popen: subprocess.Popen, timeout: float = 10.0) -> None:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(popen.pid, signal.SIGKILL)
                popen.wait(5)

    def stop_all(self) -> None:
        for _, popen, _ in reversed(self.procs):
            try:
                self.stop(popen)
            except Exception as exc:  # keep stopping the others
                log(f"could not stop pid {popen.pid}: {exc}")

    def check_alive(self) -> None:
        for name, popen, log_path in self.procs:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} (pid {popen.pid}) exited with {popen.returncode}: {tail(log_path)}")

    def logs(self) -> str:
        return "\n".join(f"----- {name} (pid {p.pid}, exit {p.returncode}) -----\n{tail(path, 3000)}" for name, p, path in self.procs)


def tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def local_cluster(share: Path, workdir: Path):
    from tests.harness import LocalCluster

    cluster = LocalCluster(share, workdir, heartbeat_interval=1.0)
    cluster.extra_env["CLUSTER_LOG_LEVEL"] = "WARNING"
    return cluster


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


# ---- models and shares ----------------------------------------------------------------------------------------------


def make_echo_share(share: Path) -> Path:
    """A share with only `echo` (no digits training)."""
    import torch

    from cluster.demo_models import ECHO_CONFIG, make_echo
    from cluster.repository import publish_version

    path = share.parent / "echo.pt"
    torch.jit.save(make_echo(), str(path))
    publish_version(share, "echo", path, config=ECHO_CONFIG, version=1)
    return share / "models" / "echo" / "1" / "model.pt"


def _tensor_config(name: str, width: int, max_batch: int = 0, delay_us: int = 0) -> dict:
    return {
        "name": name,
        "platform": "torchscript",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, width]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, width]}],
        "max_batch_size": max_batch,
        "max_queue_delay_us": delay_us,
        "instances": 1,
    }


def build_mlp(path: Path):
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = []
        for _ in range(MLP_LAYERS):
            layers += [nn.Linear(MLP_WIDTH, MLP_WIDTH), nn.ReLU()]
        module = torch.jit.script(nn.Sequential(*layers).eval())
    torch.jit.save(module, str(path))
    return module


def build_work(path: Path, iters: int):
    """A TorchScript model whose cost is `iters` small matrix-vector products, whatever the input."""
    import torch

    source = f"""
import torch
class Work(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range({int(iters)}):
            h = torch.tanh(h @ self.w)
        return h
"""
    module_path = path.parent / f"work_{iters}.py"  # torch.jit.script reads the source of the class
    module_path.write_text(source)
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"work_{iters}", module_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(WORK_WIDTH, WORK_WIDTH, generator=g) / WORK_WIDTH**0.5
    scripted = torch.jit.script(mod.Work(w).eval())
    torch.jit.save(scripted, str(path))
    return scripted


def time_forward(module, x, repeats: int) -> float:
    """Median seconds of one forward pass, one torch thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(3):
                module(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - t)
        return float(np.median(times))
    finally:
        torch.set_num_threads(before)


# ---- load drivers ---------------------------------------------------------------------------------------------------


def sequential(client, model: str, inputs: dict, n: int) -> list[float]:
    latencies = []
    for _ in range(n):
        t = time.perf_counter()
        client.infer(model, inputs, timeout=60)
        latencies.append(time.perf_counter() - t)
    return latencies


def closed_loop(client, model: str, inputs: dict, in_flight: int, seconds: float, warmup: float) -> dict:
    """Keep `in_flight` requests outstanding through Client.submit for warmup + seconds; figures over the window.

    Each completion is stamped in the client's I/O thread (done callback); the main thread only tops the window up."""
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


class BareBus:
    """bench_bus.py's bare pyzmq ROUTER-ROUTER echo broker and 2 workers, and a DEALER client to drive them."""

    def __init__(self, procs: Procs) -> None:
        self.front, self.back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        procs.role("bare-broker", "bare-broker", self.front, self.back)
        for i in range(2):
            procs.role(f"bare-worker-{i}", "bare-worker", self.back)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(self.front)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Both workers registered: a few hundred requests all answered."""
        payload = np.ones(ECHO_FLOATS, np.float32).tobytes()
        deadline = time.monotonic() + timeout
        self.sock.send(payload)
        while not self.sock.poll(100):
            if time.monotonic() > deadline:
                raise RuntimeError("bare broker did not answer")
        self.sock.recv()
        time.sleep(0.5)  # the second worker
        for _ in range(500):
            self.sock.send(payload)
            if not self.sock.poll(10_000):
                raise RuntimeError("bare broker stopped answering")
            self.sock.recv()

    def sequential(self, payload: bytes, n: int) -> list[float]:
        latencies = []
        for _ in range(n):
            t = time.perf_counter()
            self.sock.send(payload, copy=False)
            self.sock.recv(copy=False)
            latencies.append(time.perf_counter() - t)
        return latencies

    def throughput(self, payload: bytes, in_flight: int, seconds: float, warmup: float) -> float:
        sock = self.sock
        for _ in range(in_flight):
            sock.send(payload, copy=False)
        start = time.perf_counter() + warmup
        end = start + seconds
        done = 0
        while True:
            if not sock.poll(60_000):
                raise RuntimeError("bare broker stopped answering")
            sock.recv(copy=False)
            now = time.perf_counter()
            if now > end:
                break
            if now >= start:
                done += 1
            sock.send(payload, copy=False)
        for _ in range(in_flight - 1):
            if not sock.poll(60_000):
                raise RuntimeError("bare broker stopped answering")
            sock.recv(copy=False)
        return done / seconds

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


# ---- 1 + 2: echo round trip and throughput --------------------------------------------------------------------------


@contextlib.contextmanager
def echo_stacks(prefix: str):
    """Our cluster (manager, broker, 2 agents serving echo) and the bare pyzmq bus, both up; stopped by pid after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        tmp = Path(tmp)
        make_echo_share(tmp / "share")
        procs = Procs(tmp / "logs")
        cluster = local_cluster(tmp / "share", tmp / "logs")
        bare = None
        try:
            cluster.start_manager()
            cluster.start_broker()
            cluster.start_agents(2, "--capacity", str(IN_FLIGHT))
            bare = BareBus(procs)
            cluster.wait_for_agents(2, model="echo")
            bare.wait_ready()
            yield cluster, bare
        except BaseException:
            log(cluster.logs() + "\n" + procs.logs())
            raise
        finally:
            if bare is not None:
                bare.close()
            procs.stop_all()
            cluster.stop_all()


def bench_echo(suite: Suite) -> None:
    from cluster import Client

    s = suite.settings
    with echo_stacks("suite-bench_echo-") as (cluster, bare):
        x = np.ones((1, ECHO_FLOATS), np.float32)
        payload = x.tobytes()
        results = {"ours_p50": [], "ours_p99": [], "bare_p50": [], "bare_p99": [], "ours_tput": [], "bare_tput": []}
        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            sequential(client, "echo", {"x": x}, 500)  # warm-up
            for r in range(s.rounds):
                log(f"1/2 echo: round {r + 1}/{s.rounds}: sequential ({s.seq_requests} requests each)")
                lat = bare.sequential(payload, s.seq_requests)
                results["bare_p50"].append(percentile(lat, 50) * 1e6)
                results["bare_p99"].append(percentile(lat, 99) * 1e6)
                lat = sequential(client, "echo", {"x": x}, s.seq_requests)
                results["ours_p50"].append(percentile(lat, 50) * 1e6)
                results["ours_p99"].append(percentile(lat, 99) * 1e6)
                log(f"1/2 echo: round {r + 1}/{s.rounds}: {IN_FLIGHT} in flight for {s.seconds:g} s each")
                results["bare_tput"].append(bare.throughput(payload, IN_FLIGHT, s.seconds, s.warmup))
                results["ours_tput"].append(closed_loop(client, "echo", {"x": x}, IN_FLIGHT, s.seconds, s.warmup)["throughput"])
        med = {k: float(np.median(v)) for k, v in results.items()}
        rounds = f" (median of {s.rounds})" if s.rounds > 1 else ""
        suite.add(
            ratio_row(f"1. echo 64 FP32, sequential p50 (us){rounds}", med["ours_p50"], med["bare_p50"], 0,
                      f"<= {TARGET_SEQ_P50_MAX_RATIO}x bare", lambda r: r <= TARGET_SEQ_P50_MAX_RATIO),
            ratio_row(f"1. echo 64 FP32, sequential p99 (us){rounds}", med["ours_p99"], med["bare_p99"], 0, "-"),
            ratio_row(f"2. echo 64 FP32, {IN_FLIGHT} in flight (req/s){rounds}", med["ours_tput"], med["bare_tput"], 0,
                      f">= {TARGET_THROUGHPUT_MIN_RATIO}x bare", lambda r: r >= TARGET_THROUGHPUT_MIN_RATIO),
        )
        suite.note("1/2: baseline = bench_bus.py's bare pyzmq ROUTER-ROUTER broker + 2 DEALER workers (no protocol, "
                   "no model); per-round figures: " + json.dumps({k: [round(x) for x in v] for k, v in results.items()}))


# ---- 5: 4 MiB tensors -----------------------------------------------------------------------------------------------


def bench_big(suite: Suite) -> None:
    from cluster import Client

    s = suite.settings
    with echo_stacks("suite-bench_big-") as (cluster, bare):
        x = np.random.default_rng(0).random((1, BIG_FLOATS), dtype=np.float32)
        payload = x.tobytes()
        mib = len(payload) / 2**20
        ours, base = [], []
        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            check = client.infer("echo", {"x": x})
            if not np.array_equal(check.as_numpy("y"), x):
                raise RuntimeError("echo of the 4 MiB tensor came back different")
            for r in range(s.rounds):
                log(f"5 big tensors: round {r + 1}/{s.rounds}: {BIG_IN_FLIGHT} in flight for {s.seconds:g} s each")
                base.append(bare.throughput(payload, BIG_IN_FLIGHT, s.seconds, s.warmup) * mib)
                ours.append(closed_loop(client, "echo", {"x": x}, BIG_IN_FLIGHT, s.seconds, s.warmup)["throughput"] * mib)
        rounds = f" (median of {s.rounds})" if s.rounds > 1 else ""
        suite.add(ratio_row(f"5. echo 4 MiB FP32, {BIG_IN_FLIGHT} in flight (MiB/s){rounds}", float(np.median(ours)),
                            float(np.median(base)), 0, f">= {TARGET_BIG_TENSOR_MIN_RATIO}x bare",
                            lambda r: r >= TARGET_BIG_TENSOR_MIN_RATIO))
        suite.note(f"5: payload MiB/s = 4 MiB x answered requests per second; rounds ours {[round(v) for v in ours]}, "
                   f"bare {[round(v) for v in base]}")


# ---- 3: HTTP --------------------------------------------------------------------------------------------------------

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
"""


def edge_available() -> str | None:
    """None if the edge can be started, else why not."""
    try:
        import edge.app as app

        if not callable(getattr(app, "create_app", None)):
            return "edge/app.py has no create_app(broker_address)"
    except Exception as exc:
        return f"edge not importable ({type(exc).__name__}: {exc})"
    return None


def wait_http(url: str, popen: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {popen.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def check_echo_answer(url: str, body: str, values: list[float]) -> None:
    import httpx

    response = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    response.raise_for_status()
    output = response.json()["outputs"][0]
    if output["shape"] != [1, len(values)] or not np.allclose(output["data"], values):
        raise RuntimeError(f"{url} answered a wrong echo: {str(output)[:200]}")


def run_wrk(url: str, script: Path, seconds: float) -> dict:
    out = subprocess.run(
        ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
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


def bench_http(suite: Suite) -> None:
    s = suite.settings
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed")
    edge_missing = edge_available()
    values = [round(0.5 + i / 7, 4) for i in range(ECHO_FLOATS)]
    body = json.dumps({"id": "bench", "inputs": [{"name": "x", "shape": [1, ECHO_FLOATS], "datatype": "FP32", "data": values}]})
    with tempfile.TemporaryDirectory(prefix="suite-http-") as tmp:
        tmp = Path(tmp)
        model_file = make_echo_share(tmp / "share")
        script = tmp / "post.lua"
        script.write_text(WRK_LUA.format(body=body))
        procs = Procs(tmp / "logs")
        cluster = local_cluster(tmp / "share", tmp / "logs")
        try:
            ports = {name: free_port() for name in ("bare", "infer-1", "infer-2", "lb", "edge")}
            servers = {
                "bare": procs.role("bare-app", "serve-bare", str(ports["bare"])),
                "infer-1": procs.role("infer-1", "serve-infer", str(ports["infer-1"]), str(model_file)),
                "infer-2": procs.role("infer-2", "serve-infer", str(ports["infer-2"]), str(model_file)),
                "lb": procs.role("httpx-lb", "serve-lb", str(ports["lb"]),
                                 f"http://127.0.0.1:{ports['infer-1']},http://127.0.0.1:{ports['infer-2']}"),
            }
            if edge_missing is None:
                cluster.start_manager()
                cluster.start_broker()
                cluster.start_agents(2, "--capacity", str(IN_FLIGHT))
                cluster.wait_for_agents(2, model="echo")
                servers["edge"] = procs.role("edge", "serve-edge", str(ports["edge"]), cluster.addresses.broker_clients)
            targets = {"bare": "bare FastAPI app", "lb": "httpx LB + 2 FastAPI servers"}
            if "edge" in servers:
                targets["edge"] = "edge -> bus -> 2 agents"
            for name in ("infer-1", "infer-2", *targets):
                wait_http(f"http://127.0.0.1:{ports[name]}/v2/health/live", servers[name])
            runs: dict[str, list[dict]] = {name: [] for name in targets}
            for name in targets:
                check_echo_answer(f"http://127.0.0.1:{ports[name]}/v2/models/echo/infer", body, values)
            for r in range(s.rounds):  # alternate the servers, so a noisy moment does not land on one of them only
                for name, label in targets.items():
                    url = f"http://127.0.0.1:{ports[name]}/v2/models/echo/infer"
                    log(f"3 http: round {r + 1}/{s.rounds}: {label}: wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} "
                        f"-d{s.wrk_seconds:g}s (after {s.wrk_warmup:g} s warm-up)")
                    run_wrk(url, script, s.wrk_warmup)
                    result = run_wrk(url, script, s.wrk_seconds)
                    runs[name].append(result)
                    if result["non2xx"] or result["errors"]:
                        suite.note(f"3: {label}: {result['non2xx']} non-2xx answers, {result['errors']} socket errors")
            results = {name: {k: float(np.median([x.get(k, float("nan")) for x in rs])) for k in ("rps", "p50_ms", "p99_ms")}
                       for name, rs in runs.items()}
            suite.note("3: req/s per round: " + json.dumps({name: [round(x["rps"]) for x in rs] for name, rs in runs.items()}))
            bare, lb = results["bare"], results["lb"]
            rounds = f" (median of {s.rounds})" if s.rounds > 1 else ""
            if "edge" in results:
                edge = results["edge"]
                suite.add(
                    ratio_row(f"3a. HTTP OIP echo, wrk 32 conns: edge vs bare FastAPI (req/s){rounds}", edge["rps"], bare["rps"], 0,
                              f">= {TARGET_EDGE_VS_BARE_MIN_RATIO}x bare", lambda r: r >= TARGET_EDGE_VS_BARE_MIN_RATIO),
                    ratio_row(f"3b. HTTP OIP echo, wrk 32 conns: edge vs httpx LB design (req/s){rounds}", edge["rps"], lb["rps"], 0,
                              f">= {TARGET_EDGE_VS_HTTPX_MIN_RATIO:g}x httpx", lambda r: r >= TARGET_EDGE_VS_HTTPX_MIN_RATIO),
                    Row("3. HTTP wrk p99 latency (ms): edge vs bare / httpx", fmt(edge.get("p99_ms"), 1),
                        f"{fmt(bare.get('p99_ms'), 1)} / {fmt(lb.get('p99_ms'), 1)}"),
                )
            else:
                suite.add(
                    Row("3a. HTTP OIP echo, wrk 32 conns: edge vs bare FastAPI (req/s)", edge_missing, fmt(bare["rps"]), "n/a",
                        f">= {TARGET_EDGE_VS_BARE_MIN_RATIO}x bare", "n/a"),
                    Row("3b. HTTP OIP echo, wrk 32 conns: edge vs httpx LB design (req/s)", "edge not available", fmt(lb["rps"]),
                        "n/a", f">= {TARGET_EDGE_VS_HTTPX_MIN_RATIO:g}x httpx", "n/a"),
                )
            suite.note("3: all HTTP servers: uvicorn " + ", ".join(f"{k}={v}" for k, v in UVICORN_SETTINGS.items() if k != "host")
                       + f"; wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}; body {len(body)} bytes; bare app parses and encodes with "
                       "edge/oip.py and answers y = x; httpx design: one shared httpx.AsyncClient (64 keep-alive connections), "
                       "round-robin over 2 uvicorn FastAPI servers running the echo TorchScript model on the JSON data")
        except BaseException:
            log(cluster.logs() + "\n" + procs.logs())
            raise
        finally:
            procs.stop_all()
            cluster.stop_all()


# ---- 4: dynamic batching --------------------------------------------------------------------------------------------


def batching_run(share: Path, workdir: Path, module, s: Settings, env: dict) -> dict:
    """2 agents (with `env`) serving mlp_single and mlp_batched: sequential latency, then 64 in flight off and on."""
    import torch

    from cluster import Client

    cluster = local_cluster(share, workdir)
    try:
        cluster.start_manager()
        cluster.start_broker()
        cluster.start_agents(2, "--capacity", str(IN_FLIGHT), **env)
        cluster.wait_for_agents(2, model="mlp_batched")
        cluster.wait_for_agents(2, model="mlp_single")
        x = np.random.default_rng(0).random((1, MLP_WIDTH), dtype=np.float32)
        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            for name in ("mlp_single", "mlp_batched"):
                with torch.inference_mode():
                    expected = module(torch.from_numpy(x)).numpy()
                if not np.allclose(client.infer(name, {"x": x}).as_numpy("y"), expected, atol=1e-4):
                    raise RuntimeError(f"{name} answered wrongly")
            sequential(client, "mlp_single", {"x": x}, 10)
            seq = sequential(client, "mlp_single", {"x": x}, 50 if s.quick else 200)
            log(f"4 batching{' ' + str(env) if env else ''}: off, {IN_FLIGHT} in flight for {s.batch_seconds:g} s")
            off = closed_loop(client, "mlp_single", {"x": x}, IN_FLIGHT, s.batch_seconds, max(1.0, s.warmup))
            log(f"4 batching{' ' + str(env) if env else ''}: on, {IN_FLIGHT} in flight for {s.batch_seconds:g} s")
            on = closed_loop(client, "mlp_batched", {"x": x}, IN_FLIGHT, s.batch_seconds, max(1.0, s.warmup))
            stats = {a["id"]: (a.get("batching") or {}).get("mlp_batched", {}) for a in client.agents()}
        mean_batch = [v.get("mean_batch") for v in stats.values()]
        return {"seq_p50_ms": percentile(seq, 50) * 1e3, "off": off, "on": on, "mean_batch": mean_batch}
    except BaseException:
        log(cluster.logs())
        raise
    finally:
        cluster.stop_all()


def bench_batching(suite: Suite) -> None:
    import torch

    from cluster.repository import publish_version

    s = suite.settings
    with tempfile.TemporaryDirectory(prefix="suite-batch-") as tmp:
        tmp = Path(tmp)
        share = tmp / "share"
        model_path = tmp / "mlp.pt"
        module = build_mlp(model_path)
        one = time_forward(module, torch.randn(1, MLP_WIDTH), 30)
        batch = time_forward(module, torch.randn(IN_FLIGHT, MLP_WIDTH), 5)
        publish_version(share, "mlp_batched", model_path, config=_tensor_config("mlp_batched", MLP_WIDTH, IN_FLIGHT, 2000), version=1)
        publish_version(share, "mlp_single", model_path, config=_tensor_config("mlp_single", MLP_WIDTH), version=1)
        suite.add(Row(f"4. MLP {MLP_LAYERS}x{MLP_WIDTH}: one sample, 1 torch thread, in-process (ms)", fmt(one * 1e3, 2),
                      f"batch of {IN_FLIGHT}: {batch * 1e3:.1f} ms ({batch * 1e3 / IN_FLIGHT:.2f}/sample)", "-",
                      f">= {TARGET_MIN_SAMPLE_MS:g} ms", "yes" if one * 1e3 >= TARGET_MIN_SAMPLE_MS else "no"))
        runs = {}
        for label, env in (("default", {}), ("omp1", AGENT_OMP_FIX)):
            runs[label] = r = batching_run(share, tmp / f"logs-{label}", module, s, env)
            off, on = r["off"], r["on"]
            if label == "default":
                suite.add(
                    Row("4. mlp_single sequential through the cluster, p50 (ms) vs in-process", fmt(r["seq_p50_ms"], 2),
                        fmt(one * 1e3, 2), f"{r['seq_p50_ms'] / (one * 1e3):.2f}x"),
                    ratio_row(f"4. batching on vs off, {IN_FLIGHT} in flight (req/s)", on["throughput"], off["throughput"], 0,
                              f">= {TARGET_BATCHING_MIN_SPEEDUP:g}x off", lambda v: v >= TARGET_BATCHING_MIN_SPEEDUP),
                    ratio_row(f"4. batching on vs off, {IN_FLIGHT} in flight, p99 (ms)", on["p99_ms"], off["p99_ms"], 1,
                              "<= 1.0x off (no worse)", lambda v: v <= TARGET_BATCHING_P99_MAX_RATIO),
                )
            else:
                suite.add(
                    Row("4. control, agents OMP_NUM_THREADS=1: sequential p50 (ms) vs in-process", fmt(r["seq_p50_ms"], 2),
                        fmt(one * 1e3, 2), f"{r['seq_p50_ms'] / (one * 1e3):.2f}x"),
                    ratio_row("4. control, agents OMP_NUM_THREADS=1: batching on vs off (req/s)", on["throughput"],
                              off["throughput"], 0, "- (control)"),
                    ratio_row("4. control, agents OMP_NUM_THREADS=1: batching on vs off, p99 (ms)", on["p99_ms"],
                              off["p99_ms"], 1, "- (control)"),
                )
            suite.note(f"4 ({label} agents{', env ' + str(env) if env else ''}): p50 on {on['p50_ms']:.1f} ms, off {off['p50_ms']:.1f} ms; "
                       f"mean batch per agent {r['mean_batch']}")
        suite.note(f"4: batched model max_batch_size {IN_FLIGHT}, max_queue_delay_us 2000; both configs publish the same "
                   "model.pt; the control run starts the same agents with OMP_NUM_THREADS=1, to check that the agents' "
                   "`--threads 1` reaches their inference threads (it did not before each worker thread set it; the runs agree now)")


# ---- 6a: the manager with 1,000 agents ------------------------------------------------------------------------------


def bench_manager_scale(suite: Suite) -> None:
    s = suite.settings
    with tempfile.TemporaryDirectory(prefix="suite-manager-") as tmp:
        tmp = Path(tmp)
        (tmp / "share" / "models").mkdir(parents=True)
        procs = Procs(tmp / "logs")
        cluster = local_cluster(tmp / "share", tmp / "logs")
        try:
            manager = cluster.start_manager()
            bare_addr = f"tcp://127.0.0.1:{free_port()}"
            bare = procs.role("bare-sub", "bare-sub", bare_addr)
            sim = procs.role("sim-beats", "sim-beats", f"{cluster.addresses.manager_heartbeats},{bare_addr}", str(SIM_BEAT_AGENTS), "1.0")
            log(f"6a manager: waiting for {SIM_BEAT_AGENTS} simulated agents in the registry")
            deadline = time.monotonic() + 60
            while True:
                procs.check_alive()
                try:
                    n = len(cluster.manager_query("models", timeout=5).get("echo", {}).get("agents", []))
                except Exception:
                    n = 0
                if n >= SIM_BEAT_AGENTS:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {n} of {SIM_BEAT_AGENTS} simulated agents registered in 60 s")
                time.sleep(0.5)
            time.sleep(2)  # past the joins
            log(f"6a manager: measuring CPU for {s.cpu_seconds:g} s")
            pids = {"manager": manager.pid, "bare": bare.pid, "sim": sim.pid}
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            t = time.monotonic()
            time.sleep(s.cpu_seconds)
            wall = time.monotonic() - t
            pct = {k: (cpu_seconds(p) - before[k]) / wall * 100 for k, p in pids.items()}
            alive = len(cluster.manager_query("models", timeout=5).get("echo", {}).get("agents", []))
            procs.check_alive()
            suite.add(Row(f"6a. manager CPU, {SIM_BEAT_AGENTS} agents beating 1/s (% of a core)", fmt(pct["manager"], 1),
                          fmt(pct["bare"], 1), f"{pct['manager'] / pct['bare']:.2f}x" if pct["bare"] > 0 else "n/a",
                          f"< {TARGET_MANAGER_MAX_CPU_PCT:g}%", "yes" if pct["manager"] < TARGET_MANAGER_MAX_CPU_PCT else "no"))
            suite.note(f"6a: baseline = a bare pyzmq SUB that msgpack-decodes the same beats into a dict (same publisher, "
                       f"same time); the simulator used {pct['sim']:.1f}% of a core; {alive} agents alive at the end")
        except BaseException:
            log(cluster.logs() + "\n" + procs.logs())
            raise
        finally:
            procs.stop_all()
            cluster.stop_all()


# ---- 6b: the broker with 100 agents ---------------------------------------------------------------------------------


def broker_with_sim_agents(n_agents: int, s: Settings, tmp: Path) -> float:
    from cluster import Client

    workdir = tmp / f"agents-{n_agents}-{time.monotonic_ns()}"
    (tmp / "share").mkdir(exist_ok=True)
    procs = Procs(workdir)
    cluster = local_cluster(tmp / "share", workdir)
    try:
        cluster.start_broker()
        per_proc = [n_agents // 2 + (1 if i < n_agents % 2 else 0) for i in range(2)]
        for i, count in enumerate(per_proc):
            procs.role(f"sim-agents-{i}", "sim-agents", cluster.addresses.broker_agents, f"sim{i}-", str(count), str(SIM_AGENT_CAPACITY))
        cluster.wait_for_agents(n_agents, model="echo")
        x = np.ones((1, ECHO_FLOATS), np.float32)
        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            sequential(client, "echo", {"x": x}, 200)
            result = closed_loop(client, "echo", {"x": x}, IN_FLIGHT, s.seconds, s.warmup)
        procs.check_alive()
        return result["throughput"]
    except BaseException:
        log(cluster.logs() + "\n" + procs.logs())
        raise
    finally:
        procs.stop_all()
        cluster.stop_all()


def bench_broker_scale(suite: Suite) -> None:
    s = suite.settings
    many, few = [], []
    with tempfile.TemporaryDirectory(prefix="suite-broker-") as tmp:
        for r in range(s.rounds):
            log(f"6b broker: round {r + 1}/{s.rounds}: 2 simulated agents, {IN_FLIGHT} in flight for {s.seconds:g} s")
            few.append(broker_with_sim_agents(2, s, Path(tmp)))
            log(f"6b broker: round {r + 1}/{s.rounds}: {SIM_BROKER_AGENTS} simulated agents, {IN_FLIGHT} in flight")
            many.append(broker_with_sim_agents(SIM_BROKER_AGENTS, s, Path(tmp)))
    rounds = f" (median of {s.rounds})" if s.rounds > 1 else ""
    suite.add(ratio_row(f"6b. broker, {SIM_BROKER_AGENTS} vs 2 simulated agents, {IN_FLIGHT} in flight (req/s){rounds}",
                        float(np.median(many)), float(np.median(few)), 0,
                        f">= {TARGET_BROKER_SCALE_MIN_RATIO}x 2 agents", lambda r: r >= TARGET_BROKER_SCALE_MIN_RATIO))
    suite.note(f"6b: simulated agents (capacity {SIM_AGENT_CAPACITY}, echo without torch) spread over 2 processes; a fresh "
               f"broker per run; rounds {SIM_BROKER_AGENTS} agents {[round(v) for v in many]}, 2 agents {[round(v) for v in few]}")


# ---- 7: routing with a slow agent -----------------------------------------------------------------------------------


def routing_run(policy: str, share_fast: Path, share_slow: Path, s: Settings, workdir: Path, env: dict) -> dict:
    from cluster import Client

    cluster = local_cluster(share_fast, workdir)
    try:
        cluster.start_manager()
        cluster.start_broker("--policy", policy)
        for name in ("fast-1", "fast-2"):
            cluster.start_agent(name, "--capacity", str(ROUTE_CAPACITY), **env)
        cluster.start_agent("slow-1", "--capacity", str(ROUTE_CAPACITY), CLUSTER_SHARE=str(share_slow), **env)
        cluster.wait_for_agents(3, model="work")
        x = np.ones((1, WORK_WIDTH), np.float32)
        with Client(cluster.addresses.broker_clients, timeout=60) as client:
            sequential(client, "work", {"x": x}, 30)
            return closed_loop(client, "work", {"x": x}, ROUTE_IN_FLIGHT, s.route_seconds, s.warmup)
    except BaseException:
        log(cluster.logs())
        raise
    finally:
        cluster.stop_all()


def bench_routing(suite: Suite) -> None:
    import torch

    from cluster.repository import publish_version

    s = suite.settings
    with tempfile.TemporaryDirectory(prefix="suite-route-") as tmp:
        tmp = Path(tmp)
        costs = {}
        for kind, iters in (("fast", WORK_FAST_ITERS), ("slow", WORK_SLOW_ITERS)):
            path = tmp / f"work-{kind}.pt"
            module = build_work(path, iters)
            costs[kind] = time_forward(module, torch.ones(1, WORK_WIDTH), 20) * 1e3
            publish_version(tmp / f"share-{kind}", "work", path, config=_tensor_config("work", WORK_WIDTH), version=1)
        slow = f"{WORK_SLOW_ITERS // WORK_FAST_ITERS}x"
        # One OpenMP thread in the agents, as bench 4's control. (Before the agents set torch's thread count in their
        # worker threads, 3 agents x 2 spinning OpenMP threads on 2 cores collapsed: 0 requests in 3 s.)
        for label, env in (("omp1", AGENT_OMP_FIX),):
            results = {}
            for policy in ("round-robin", "least-outstanding"):
                log(f"7 routing ({label} agents): {policy}, {ROUTE_IN_FLIGHT} in flight for {s.route_seconds:g} s")
                results[policy] = routing_run(policy, tmp / "share-fast", tmp / "share-slow", s, tmp / f"logs-{label}-{policy}", env)
            rr, lo = results["round-robin"], results["least-outstanding"]
            what = ", agents OMP_NUM_THREADS=1"
            suite.add(
                ratio_row(f"7. routing, 1 of 3 agents {slow} slow{what}: p99 (ms), least-outstanding vs round-robin",
                          lo["p99_ms"], rr["p99_ms"], 1, "- (report)"),
                ratio_row(f"7. routing{what}: p50 (ms), least-outstanding vs round-robin", lo["p50_ms"], rr["p50_ms"], 1, "- (report)"),
                ratio_row(f"7. routing{what}: throughput (req/s), least-outstanding vs round-robin", lo["throughput"],
                          rr["throughput"], 0, "- (report)"),
            )
            cut = (1 - lo["p99_ms"] / rr["p99_ms"]) * 100 if rr["p99_ms"] else float("nan")
            share = {p: {a: f"{100 * n / sum(r['agents'].values()):.0f}%" for a, n in sorted(r["agents"].items())} for p, r in results.items()}
            suite.note(f"7 ({label} agents{', env ' + str(env) if env else ''}): least-outstanding cuts p99 by {cut:.0f}%; "
                       f"requests per agent: {json.dumps(share)}")
    suite.note(f"7: model `work` costs {costs['fast']:.2f} ms (fast share) / {costs['slow']:.2f} ms (the slow agent's share, "
               f"same name and version) per call on one thread in-process; agents --capacity {ROUTE_CAPACITY}, "
               f"{ROUTE_IN_FLIGHT} in flight, a fresh cluster per policy")


# ---- helper roles (run as subprocesses) -----------------------------------------------------------------------------


def role_bare_broker(front: str, back: str) -> None:
    from bench_bus import bare_broker

    bare_broker(front, back)


def role_bare_worker(back: str) -> None:
    from bench_bus import bare_worker

    bare_worker(back)


def _serve(app, port: int) -> None:
    import uvicorn

    uvicorn.run(app, port=port, **UVICORN_SETTINGS)


def role_serve_edge(port: str, broker: str) -> None:
    from edge.app import create_app

    _serve(create_app(broker), int(port))


def _live_route(app) -> None:
    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}


def role_serve_bare(port: str) -> None:
    """A bare FastAPI app answering the OIP echo request itself: the same JSON parsing and encoding as the edge
    (edge/oip.py), y = x, no bus."""
    from fastapi import FastAPI, Request, Response

    app = FastAPI()
    _live_route(app)
    try:
        from edge import oip
    except Exception:
        oip = None

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> Response:
        body = await request.body()
        if oip is not None:
            try:
                parsed = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH))
            except oip.InvalidRequest as exc:
                return Response(json.dumps({"error": str(exc)}), status_code=400, media_type="application/json")
            content, headers = oip.encode_infer_response(name, 1, {"y": parsed.inputs["x"]}, parsed)
            return Response(content, headers=headers)
        request_json = json.loads(body)
        tensor = request_json["inputs"][0]
        x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        out = {"model_name": name, "model_version": "1", "id": request_json.get("id"),
               "outputs": [{"name": "y", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
        return Response(json.dumps(out), media_type="application/json")

    _serve(app, int(port))


def role_serve_infer(port: str, model_path: str) -> None:
    """One of the seed design's inference servers: FastAPI + the echo TorchScript model on the request's JSON data."""
    import torch
    from fastapi import FastAPI, Request, Response

    torch.set_num_threads(1)
    model = torch.jit.load(model_path)
    app = FastAPI()
    _live_route(app)

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> Response:
        body = await request.json()
        tensor = body["inputs"][0]
        x = torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"])
        with torch.inference_mode():
            y = model(x)
        out = {"model_name": name, "model_version": "1", "id": body.get("id"),
               "outputs": [{"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.reshape(-1).tolist()}]}
        return Response(json.dumps(out), media_type="application/json")

    _serve(app, int(port))


def role_serve_lb(port: str, upstreams: str) -> None:
    """The seed's load balancer: FastAPI forwarding each request round-robin with one shared httpx.AsyncClient."""
    import itertools
    from contextlib import asynccontextmanager

    import httpx
    from fastapi import FastAPI, Request, Response

    urls = itertools.cycle(upstreams.split(","))
    state = {}

    @asynccontextmanager
    async def lifespan(app):
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            state["client"] = client
            yield

    app = FastAPI(lifespan=lifespan)
    _live_route(app)

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> Response:
        upstream = await state["client"].post(
            f"{next(urls)}/v2/models/{name}/infer", content=await request.body(), headers={"Content-Type": "application/json"}
        )
        return Response(upstream.content, status_code=upstream.status_code, media_type="application/json")

    _serve(app, int(port))


def _agent_status(agent_id: str, started: float, capacity: int, models: list[dict]) -> dict:
    """A heartbeat header with the fields and sizes of cluster/agent/agent.py's Agent.status()."""
    return {
        "agent": agent_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": "cpu",
        "in_flight": 0,
        "capacity": capacity,
        "batching": {},
        "draining": False,
        "uptime": round(time.monotonic() - started, 3),
        "started": started,
        "serving_since": started,
        "interval": 1.0,
        "serves_only": None,
        "models": models,
        "staged": [],
        "failed": [],
    }


def role_bare_sub(bind: str) -> None:
    """The 6a baseline: receive every beat and msgpack-decode it into a dict, nothing else."""
    import msgpack

    from cluster.protocol import PREAMBLE, Command

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, PREAMBLE[Command.HEARTBEAT])
    sock.bind(bind)
    registry = {}
    while True:
        frames = sock.recv_multipart()
        beat = msgpack.unpackb(frames[1], raw=False)
        registry[beat["agent"]] = (beat, time.monotonic())


def role_sim_beats(connect: str, count: str, interval: str) -> None:
    """`count` agents, each heartbeating every `interval` seconds, from one PUB socket, spread evenly over time."""
    from cluster.protocol import PREAMBLE, Command, pack

    count, interval = int(count), float(interval)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    for address in connect.split(","):
        sock.connect(address)
    started = time.time()
    mono = time.monotonic()
    models = [{"name": "digits", "version": 1, "default": True}, {"name": "echo", "version": 1, "default": True}]
    ids = [f"sim-{socket.gethostname()}-{i:05d}" for i in range(count)]
    slice_s = 0.01
    per_slice = max(1, round(count * slice_s / interval))
    next_at = time.monotonic()
    i = 0
    while True:
        for _ in range(per_slice):
            status = _agent_status(ids[i % count], started, SIM_AGENT_CAPACITY, models)
            status["uptime"] = round(time.monotonic() - mono, 3)
            sock.send_multipart([PREAMBLE[Command.HEARTBEAT], pack(status)])
            i += 1
        next_at += slice_s
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def role_sim_agents(broker: str, prefix: str, count: str, capacity: str) -> None:
    """`count` simulated agents on DEALER sockets: READY with `echo`, a HEARTBEAT every second, and every REQUEST
    answered at once with a valid REPLY (same tensors back, renamed y)."""
    from cluster import protocol
    from cluster.protocol import PREAMBLE, Command, pack

    count, capacity = int(count), int(capacity)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ctx = zmq.Context()
    started = time.time()
    models = [{"name": "echo", "version": 1, "default": True}]
    metadata = [{"name": "echo", "platform": "torchscript", "version": 1,
                 "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
                 "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}]}]
    socks = {}
    for i in range(count):
        agent_id = f"{prefix}{i:04d}"
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, agent_id.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.connect(broker)
        socks[sock] = agent_id

    def ready(sock) -> None:
        header = _agent_status(socks[sock], started, capacity, models)
        header["metadata"] = metadata
        sock.send_multipart(protocol.message(Command.READY, header))

    for sock in socks:
        ready(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    reply_preamble, request_preamble = PREAMBLE[Command.REPLY], PREAMBLE[Command.REQUEST]
    next_beat = time.monotonic() + 1.0
    while not stop.is_set():
        for sock, _ in poller.poll(100):
            agent_id = socks[sock]
            for _ in range(64):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                preamble = frames[0].bytes
                if preamble == request_preamble:
                    header = protocol.unpack_header(frames[2])
                    outputs = [{"name": "y", "datatype": m["datatype"], "shape": m["shape"]} for m in header["inputs"]]
                    reply = {"id": header["id"], "model": header["model"], "version": 1, "agent": agent_id, "outputs": outputs}
                    sock.send_multipart([reply_preamble, frames[1], pack(reply), *frames[3:]], copy=False)
                elif preamble == PREAMBLE[Command.DISCONNECT]:
                    ready(sock)
        now = time.monotonic()
        if now >= next_beat:
            next_beat = now + 1.0
            for sock, agent_id in socks.items():
                sock.send_multipart(protocol.message(Command.HEARTBEAT, _agent_status(agent_id, started, capacity, models)))
    for sock in socks:
        try:
            sock.send_multipart(protocol.message(Command.DISCONNECT, {"reason": "simulator stopping"}), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        sock.close(linger=100)
    ctx.term()


ROLES = {
    "bare-broker": role_bare_broker,
    "bare-worker": role_bare_worker,
    "serve-edge": role_serve_edge,
    "serve-bare": role_serve_bare,
    "serve-infer": role_serve_infer,
    "serve-lb": role_serve_lb,
    "bare-sub": role_bare_sub,
    "sim-beats": role_sim_beats,
    "sim-agents": role_sim_agents,
}


# ---- report ---------------------------------------------------------------------------------------------------------


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


HEADERS = ("figure", "ours", "baseline", "ratio", "target", "holds")


def table_text(rows: list[Row]) -> str:
    cells = [HEADERS] + [(r.figure, r.ours, r.baseline, r.ratio, r.target, r.holds) for r in rows]
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
    lines += ["| " + " | ".join(esc(v) for v in (r.figure, r.ours, r.baseline, r.ratio, r.target, r.holds)) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(path: Path, suite: Suite, info: dict, elapsed: float, argv: list[str]) -> None:
    missed = [r for r in suite.rows if r.holds == "no"]
    failed = [r for r in suite.rows if r.ours.startswith("failed")]
    text = [
        "# Benchmark results",
        "",
        f"`python bench/suite.py{' ' + ' '.join(argv) if argv else ''}` ({'quick smoke run' if suite.settings.quick else 'full run'}), "
        f"{elapsed / 60:.1f} minutes. Every figure is next to a baseline measured in the same run on the same machine "
        "(2 shared cores: absolute numbers are noisy, ratios less so). Targets are the TARGET_* constants in `bench/suite.py`.",
        "",
        table_markdown(suite.rows),
        "",
        f"Targets missed: {len(missed)}" + (" (" + "; ".join(r.figure for r in missed) + ")" if missed else "")
        + (f"; benchmarks failed: {len(failed)}" if failed else ""),
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in suite.notes],
        "",
    ]
    path.write_text("\n".join(text))


BENCHMARKS = [
    ("1", "1+2. echo round trip and throughput vs bare pyzmq", bench_echo),
    ("3", "3. HTTP edge vs bare FastAPI and the httpx design", bench_http),
    ("4", "4. dynamic batching on vs off", bench_batching),
    ("5", "5. 4 MiB tensors vs bare pyzmq", bench_big),
    ("6a", "6a. manager with 1,000 simulated agents", bench_manager_scale),
    ("6b", "6b. broker with 100 vs 2 simulated agents", bench_broker_scale),
    ("7", "7. routing with a slow agent", bench_routing),
]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        ROLES[sys.argv[2]](*sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorten every run (smoke check, about 2 minutes)")
    parser.add_argument("--only", default=None, help="comma-separated benchmark keys to run: " + ", ".join(k for k, _, _ in BENCHMARKS))
    parser.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"), help="Markdown report (default bench/RESULTS.md)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    suite = Suite(Settings.make(args.quick))
    info = machine_info()
    log(f"{'quick' if args.quick else 'full'} run on {info['CPU']}, {info['cores']}")
    for key, title, bench in BENCHMARKS:
        if only and key not in only:
            continue
        log(f"--- {title}")
        t = time.monotonic()
        try:
            bench(suite)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            log(f"{title} failed:\n{traceback.format_exc()}")
            suite.add(Row(title, f"failed: {reason}", "-", "-", "-", "failed"))  # rows it measured before failing stay
        log(f"--- {title}: {time.monotonic() - t:.0f} s")
    elapsed = time.monotonic() - suite.started
    info["load average at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(table_text(suite.rows))
    print(f"\n{'quick' if args.quick else 'full'} run: {elapsed:.0f} s; machine: {info['CPU']}, {info['cores']}, {info['memory']}")
    argv = [a for a in sys.argv[1:]]
    write_markdown(Path(args.out), suite, info, elapsed, argv)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
