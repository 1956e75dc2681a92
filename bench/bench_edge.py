"""Requests per second through the HTTP edge, next to a bare FastAPI app answering the same JSON without the bus.

    python bench/bench_edge.py [--duration 10] [--connections 32] [--threads 2] [--floats 64]

Starts, in one run: a cluster (manager, broker, 2 agents serving `echo`) with the test harness's LocalCluster on a
temporary share, the edge (`python -m edge`, one uvicorn process), and a bare FastAPI app on uvicorn (this file with
--serve-bare) that parses the same Open Inference Protocol request and encodes the same response with edge/oip.py,
but answers y = x itself instead of going over the bus. Then wrk (Debian's) POSTs the same OIP JSON body (`echo`,
FP32 [1, N]) to each with the given connections and prints a table: requests/s, latency percentiles, and the ratio
edge / bare. The difference is the cost of the bus hop (client -> broker -> agent -> broker -> client) and of the
model call. Everything listens on 127.0.0.1 and is stopped (by pid) at the end.
"""


import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
"""


# ---- the bare app: same OIP parsing and encoding, no bus -----------------------------------------------------------


def serve_bare(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI, Request, Response

    from edge import oip

    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> Response:
        try:
            parsed = oip.parse_infer_request(await request.body(), request.headers.get(oip.HEADER_LENGTH))
        except oip.InvalidRequest as exc:
            return Response(json.dumps({"error": str(exc)}), status_code=400, media_type="application/json")
        content, headers = oip.encode_infer_response(name, 1, {"y": parsed.inputs["x"]}, parsed)
        return Response(content, headers=headers)

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---- running things -----------------------------------------------------------------------------------------------


def wait_http(url: str, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def run_wrk(url: str, script: Path, connections: int, threads: int, duration: float) -> dict:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "non2xx": 0, "errors": 0, "raw": out}
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        result["non2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        result["errors"] = sum(map(int, m.groups()))
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            value, unit = float(m.group(1)), m.group(2)
            result[f"p{pct}"] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    return result


def check_answer(url: str, body: str, floats: int) -> None:
    import httpx

    response = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=10)
    response.raise_for_status()
    output = response.json()["outputs"][0]
    assert output["shape"] == [1, floats] and len(output["data"]) == floats, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of an unmeasured wrk run first")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--floats", type=int, default=64, help="FP32 values in the request")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")

    from cluster.demo_models import write_demo_models
    from tests.harness import LocalCluster, free_port

    values = [round(0.5 + i / 7, 4) for i in range(args.floats)]
    body = json.dumps({"id": "bench", "inputs": [{"name": "x", "shape": [1, args.floats], "datatype": "FP32", "data": values}]})
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        tmp = Path(tmp)
        script = tmp / "post.lua"
        script.write_text(LUA.format(body=body))
        print("writing the demo models ...", flush=True)
        write_demo_models(tmp / "share")
        procs: list[subprocess.Popen] = []
        with LocalCluster(tmp / "share", tmp / "logs", heartbeat_interval=1.0) as cluster:
            try:
                cluster.start_manager()
                cluster.start_broker()
                cluster.start_agents(2, CLUSTER_MODELS="echo")
                cluster.wait_for_agents(2, model="echo")
                edge_port, bare_port = free_port(), free_port()
                procs.append(start([sys.executable, "-m", "edge", "--host", "127.0.0.1", "--port", str(edge_port),
                                    "--broker", cluster.addresses.broker_clients, "--log-level", "warning"], tmp / "edge.log"))
                procs.append(start([sys.executable, __file__, "--serve-bare", str(bare_port)], tmp / "bare.log"))
                targets = {
                    "edge -> bus -> 2 agents": f"http://127.0.0.1:{edge_port}",
                    "bare FastAPI (no bus)": f"http://127.0.0.1:{bare_port}",
                }
                results = {}
                for name, base in targets.items():
                    wait_http(base + "/v2/health/live")
                    url = base + "/v2/models/echo/infer"
                    check_answer(url, body, args.floats)
                    print(f"measuring {name}: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s ...", flush=True)
                    if args.warmup > 0:
                        run_wrk(url, script, args.connections, args.threads, args.warmup)
                    results[name] = run_wrk(url, script, args.connections, args.threads, args.duration)
            except BaseException:
                print(cluster.logs())
                for log in ("edge.log", "bare.log"):
                    if (tmp / log).exists():
                        print(f"----- {log} -----\n{(tmp / log).read_text()[-4000:]}")
                raise
            finally:
                for proc in procs:
                    stop(proc)

    print()
    print(f"POST /v2/models/echo/infer, OIP JSON with {args.floats} FP32 values ({len(body)} bytes), "
          f"{args.connections} connections, {args.duration:g} s, {os.cpu_count()} CPUs shared by everything")
    print(f"{'target':<26} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'sock err':>8}")
    for name, r in results.items():
        print(f"{name:<26} {r['rps']:>9.0f} {r.get('p50', float('nan')):>8.2f} {r.get('p90', float('nan')):>8.2f} "
              f"{r.get('p99', float('nan')):>8.2f} {r['non2xx']:>8} {r['errors']:>8}")
    edge, bare = results.values()
    print(f"{'ratio edge / bare':<26} {edge['rps'] / bare['rps']:>9.2f}")


if __name__ == "__main__":
    main()
