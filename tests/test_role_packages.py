"""Each role runs with only what its slim install brings (issue 24): the real `python -m cluster ROLE` processes,
started with tests/role_only/sitecustomize.py refusing every installed module outside the role's packages
(cluster/dependencies.py: CORE, plus the role's extra), serve a real request end to end. A module the role reaches
for that its extra lacks fails its start or its request here, naming the module, before an operator's edge node
without torch would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton

from cluster.local import LocalCluster
from tests.installed import REPO_ROOT, closure, role_requirements

ROLE_ONLY = REPO_ROOT / "tests" / "role_only"


def only(role: str) -> dict[str, str]:
    """The environment that gives a process only `role`'s packages."""
    return {"PYTHONPATH": str(ROLE_ONLY), "CLUSTER_TEST_ONLY_PACKAGES_OF": role}


def role_env(role: str) -> dict[str, str]:
    """This process's environment, for a child that runs the repository's code with only `role`'s packages."""
    return {**os.environ, **only(role), "PYTHONPATH": f"{ROLE_ONLY}{os.pathsep}{REPO_ROOT}"}


def run_as(role: str, code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=role_env(role),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_slim_roles_bring_no_torch_and_the_edge_no_model_code():
    """What each role's install pulls in, from this environment's metadata: torch only with the agent, FastAPI and
    gRPC only with the edge, and nothing of scikit-learn or scipy anywhere (the tests' extra alone has them)."""
    installs = {role: closure(role_requirements(role)) for role in ("broker", "edge", "agent")}
    assert "torch" not in installs["broker"] and "torch" not in installs["edge"], installs
    assert "torch" in installs["agent"] and "pillow" in installs["agent"], installs["agent"]
    assert {"fastapi", "grpcio", "uvicorn"} <= installs["edge"], installs["edge"]
    assert not {"fastapi", "grpcio", "uvicorn"} & (installs["agent"] | installs["broker"]), installs
    for role, packages in installs.items():
        assert not {"scikit-learn", "scipy"} & packages, (role, sorted(packages))


def test_the_blocker_refuses_what_a_role_lacks_and_lets_the_rest_through():
    """The check below is only worth something if the refusal is real: a broker process cannot import torch or
    fastapi, an edge process cannot import torch or PIL, and both import their own packages."""
    probe = """
        import importlib, sys
        for name in sys.argv[1].split(","):
            importlib.import_module(name)
        for name in sys.argv[2].split(","):
            try:
                importlib.import_module(name)
            except ImportError as exc:
                print("refused", name, exc)
            else:
                print("imported", name)
    """
    broker = run_as("broker", probe, "zmq,msgpack,numpy,typer,rich,prometheus_client,cluster.broker", "torch,fastapi")
    assert broker.returncode == 0, broker.stderr
    assert broker.stdout.count("refused") == 2 and "not in the broker install" in broker.stdout, broker.stdout
    edge = run_as("edge", probe, "fastapi,uvicorn,grpc,tritonclient.grpc,orjson,edge.app", "torch,PIL,httpx")
    assert edge.returncode == 0, edge.stderr
    assert edge.stdout.count("refused") == 3, edge.stdout


@pytest.mark.cluster
def test_every_role_serves_with_only_its_own_packages(demo_share, tmp_path):
    """Manager, broker, agent and edge, each with only its role's packages: REST (JSON) and gRPC inference through
    the edge, /metrics of the edge and the broker, and a Client in a process with CORE alone."""
    share = tmp_path / "share"
    shutil.copytree(demo_share, share)
    cluster = LocalCluster(share, tmp_path / "logs", edge_grpc_port=0)
    try:
        cluster.start_manager(**only("manager"))
        broker = cluster.start_broker("--metrics-port", "-1", **only("broker"))
        cluster.start_agents(1, **only("agent"))
        cluster.wait_for_agents(1, model="digits")
        cluster.start_edge("--log-level", "warning", **only("edge"))
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1.5, 2.5, 3.5]}]}
        request = urllib.request.Request(
            f"{cluster.edge_url}/v2/models/echo/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.load(answer)["outputs"][0]["data"] == [1.5, 2.5, 3.5]
        image = np.zeros((2, 8, 8), dtype=np.float32)
        with triton.InferenceServerClient(cluster.grpc_address) as client:
            tensor = triton.InferInput("image", [2, 8, 8], "FP32")
            tensor.set_data_from_numpy(image)
            probs = client.infer("digits", [tensor]).as_numpy("probs")
        assert probs.shape == (2, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4), probs
        with urllib.request.urlopen(f"{cluster.edge_url}/metrics", timeout=30) as answer:
            assert b"nv_inference_request_success" in answer.read()
        with urllib.request.urlopen(broker.addresses["metrics"], timeout=30) as answer:
            assert answer.status == 200
        client = run_as(
            "client",
            """
            import sys
            import numpy as np
            from cluster import Client
            with Client(sys.argv[1], timeout=30) as client:
                y = client.infer("echo", {"x": np.arange(4, dtype=np.float32)[None]}).as_numpy("y")
            print(y.tolist())
            """,
            cluster.addresses.broker_clients,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == "[[0.0, 1.0, 2.0, 3.0]]", client.stdout
        assert not cluster.exited(), cluster.logs()
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_all()


def test_a_role_command_without_its_packages_names_what_to_install(monkeypatch):
    """`cluster edge` (or agent, up) on an install that lacks the role's packages stops at once with exit status 2,
    naming the missing requirement and the extra to install, instead of a traceback from deep in an import."""
    from typer.testing import CliRunner

    import cluster.dependencies
    from cluster.cli import app

    assert cluster.dependencies.missing("agent", "edge", "bench") == [], "this environment has every role"
    monkeypatch.setitem(cluster.dependencies.ROLES, "edge", ["no-such-distribution-here>=1", "fastapi>=0.110"])
    assert cluster.dependencies.missing("edge") == ["no-such-distribution-here>=1"]
    for command in (["edge"], ["up"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert "needs no-such-distribution-here>=1, not installed here" in result.output, result.output
        assert "slim[" in result.output and "Install by role" in result.output, result.output


def test_bench_over_http_reads_its_token_file_with_the_bench_packages_alone(tmp_path):
    """`cluster bench --http URL --token-file F` on a `./slim[bench]` install (httpx, no FastAPI): the token file is
    read and the load sent (to a closed port here: a connection error, exit status 2), not a ModuleNotFoundError
    from reading the file with the edge's FastAPI module."""
    token_file = tmp_path / "token"
    token_file.write_text("# the edge's token\nsecret\n")
    argv = ["bench", "echo", "--http", "http://127.0.0.1:1", "--token-file", str(token_file)]
    argv += ["--concurrency", "1", "--duration", "0.2", "--warmup", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "cluster", *argv],
        env=role_env("bench"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "bench failed: ConnectError" in done.stderr, done.stderr[-2000:]
    assert "ModuleNotFoundError" not in done.stderr, done.stderr[-2000:]
