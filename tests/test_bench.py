"""`cluster bench` as issue 18 found it: it can drive an edge with tokens (--token / --token-file, HTTP and gRPC),
posts Triton's binary tensor extension over HTTP by default (JSON with --http-json), and Ctrl-C prints the levels
it had measured. The request bodies in-process (a mock transport); the rest against real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest

from cluster import loadgen
from cluster.config import Addresses
from tests.harness import LocalCluster, wait_for

TOKEN = "bench-token"
ECHO_META = {
    "name": "echo",
    "versions": ["1"],
    "platform": "torchscript",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
}


def _recorded_infer(binary: bool) -> httpx.Request:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=ECHO_META)
        seen.append(request)
        return httpx.Response(200, json={"model_name": "echo", "outputs": []})

    async def main():
        door = loadgen.HttpDoor(
            "http://edge", "echo", batch=3, token=TOKEN, binary=binary, transport=httpx.MockTransport(answer)
        )
        async with door:
            await door.call()

    asyncio.run(main())
    assert len(seen) == 1
    return seen[0]


def test_http_bench_posts_binary_tensors_with_the_token_by_default():
    request = _recorded_infer(binary=True)
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/octet-stream"
    length = int(request.headers["inference-header-content-length"])
    header = json.loads(request.content[:length])
    (x,) = header["inputs"]
    assert x["name"] == "x" and x["shape"] == [3, 1] and x["parameters"] == {"binary_data_size": 12}, header
    assert header["outputs"] == [{"name": "y", "parameters": {"binary_data": True}}], header
    assert request.content[length:] == np.zeros((3, 1), np.float32).tobytes()


def test_http_bench_posts_json_when_asked():
    request = _recorded_infer(binary=False)
    assert request.headers["content-type"] == "application/json" and request.headers["authorization"]
    assert "inference-header-content-length" not in request.headers
    assert json.loads(request.content)["inputs"][0]["data"] == [0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def guarded(demo_share, tmp_path_factory):
    """Manager, broker, one agent, and an edge with a token (HTTP and gRPC)."""
    import shutil

    workdir = tmp_path_factory.mktemp("bench-stack")
    shutil.copytree(demo_share, workdir / "share")
    cluster = LocalCluster(workdir / "share", workdir / "logs")
    try:
        cluster.start_manager()
        cluster.start_broker()
        cluster.start_agents(1)
        cluster.wait_for_agents(1, model="echo")
        edges = LocalCluster(
            None,
            workdir / "edge",
            addresses=Addresses(broker_clients=cluster.addresses.broker_clients),
            edge_grpc_port=0,
        )
        cluster.procs.append(edges.start_edge("--token", TOKEN, "--log-level", "warning"))
        cluster.bound.update({"edge": edges.edge_url, "grpc": edges.grpc_address})
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_all()


def _bench(stack, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster", "bench", "echo", "--duration", "0.5", "--warmup", "0.2", *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.cluster
def test_bench_drives_an_edge_with_a_token_over_http_and_grpc(guarded, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"# the edge's token\n{TOKEN}\n")
    doors = (
        ["--http", guarded.edge_url, "--token-file", str(token_file)],  # binary tensors
        ["--http", guarded.edge_url, "--token", TOKEN, "--http-json"],
        ["--grpc", guarded.grpc_address, "--token-file", str(token_file)],
    )
    for door in doors:
        out = _bench(guarded, "--concurrency", "2", "--json", *door)
        assert out.returncode == 0, (door, out.stdout, out.stderr)
        (row,) = json.loads(out.stdout)
        assert row["requests"] > 0 and row["errors"] == 0, (door, row)
    refused = _bench(guarded, "--concurrency", "2", "--http", guarded.edge_url)
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr, refused


@pytest.mark.cluster
def test_an_interrupted_bench_prints_the_levels_it_measured(guarded, tmp_path):
    out_path, err_path = tmp_path / "bench.out", tmp_path / "bench.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        bench = subprocess.Popen(
            [sys.executable, "-m", "cluster", "bench", "echo", "--concurrency", "1,2,4"]
            + ["--duration", "2", "--warmup", "0.2"],
            env=guarded.env(),
            stdout=out,
            stderr=err,
        )
    try:
        wait_for(
            lambda: "concurrency 1:" in out_path.read_text() or bench.poll() is not None, 60, "the first level's line"
        )
        assert bench.poll() is None, f"bench printed nothing before it ended:\n{out_path.read_text()}"
        assert "concurrency 4:" not in out_path.read_text(), "each level should be printed when it is measured"
        os.kill(bench.pid, signal.SIGINT)
        status = bench.wait(30)
        text, errors = out_path.read_text(), err_path.read_text()
        assert status == 130, (status, text, errors)
        assert "concurrency 1:" in text and "req/s" in text, text
        assert "interrupted" in errors and "of 3 levels measured" in errors, errors
        assert "Traceback" not in errors, errors
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
