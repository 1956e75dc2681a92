"""The `cluster` command: `cluster up` starts everything and stops all of it (no orphans); `cluster status`; every
command's `--help` documents its options."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import psutil
import pytest
import typer
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import Addresses
from cluster.local import read_ready_file
from tests.harness import LocalCluster, all_gone, wait_for


def _start_up(local: LocalCluster, share, log_path, ready_path, *more: str) -> subprocess.Popen:
    """`cluster up` on ports the OS picks (--any-ports); it says which in `ready_path`."""
    return subprocess.Popen(
        [sys.executable, "-m", "cluster", "up", "--agents", "2", "--share", str(share)]
        + ["--any-ports", "--ready-file", str(ready_path), *more],
        env=local.env(),
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.mark.cluster
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_cluster_up_serves_and_stops_everything(share, tmp_path, how):
    log_path, ready_path = tmp_path / "up.log", tmp_path / "up.ready.json"
    up = _start_up(LocalCluster(share, tmp_path), share, log_path, ready_path)
    try:
        ready = wait_for(lambda: read_ready_file(ready_path) or up.poll() is not None, 120, "cluster up to be ready")
        assert up.poll() is None, log_path.read_text()
        edge_port = int(ready["addresses"].pop("edge").rsplit(":", 1)[1])
        grpc_address = ready["addresses"].pop("grpc")
        local = LocalCluster(share, tmp_path, addresses=Addresses(**ready["addresses"]))
        local.wait_for_agents(2, model="digits")
        import tritonclient.grpc as triton_grpc

        with triton_grpc.InferenceServerClient(grpc_address) as grpc_client:
            assert grpc_client.is_model_ready("digits"), f"gRPC at {grpc_address}: digits not ready"
        children = [p.pid for p in psutil.Process(up.pid).children(recursive=True)]
        assert len(children) == 5, f"expected manager, broker, 2 agents and the edge, got {children}"
        page = wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{edge_port}/", timeout=2), 30, "the edge to serve the page"
        )
        assert page.status_code == 200 and "<canvas" in page.text
        out = subprocess.run(
            [sys.executable, "-m", "cluster", "status", "--timeout", "5"],
            env=local.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "digits" in out.stdout and "echo" in out.stdout and "Agents (2)" in out.stdout, out.stdout
        text = log_path.read_text()
        assert local.addresses.broker_clients in text and f"http://127.0.0.1:{edge_port}/" in text, text
        assert f"gRPC edge (Open Inference Protocol): {grpc_address}" in text, text
        local.stop_all()  # closes the test's client
        os.kill(up.pid, how)
        up.wait(20)
        if how != signal.SIGKILL:
            assert up.returncode == 0, log_path.read_text()
        wait_for(lambda: all_gone(children), 15, "every process `cluster up` started to exit")
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
            up.wait(10)
        for proc in psutil.Process().children(recursive=True):
            if proc.pid != os.getpid() and "cluster" in " ".join(proc.cmdline()):
                proc.kill()


@pytest.mark.cluster
def test_cluster_up_secure_keys_every_role_and_tokens_the_edge(share, tmp_path):
    """`cluster up --secure`: CURVE on the bus (a client without a key is refused, one with the printed client key is
    served), a bearer token on the edge (printed), and both kept in the key directory for the next run."""
    from cluster import AuthenticationError, Client

    keys = tmp_path / "keys"
    log_path, ready_path = tmp_path / "up.log", tmp_path / "up.ready.json"
    up = _start_up(LocalCluster(share, tmp_path), share, log_path, ready_path, "--secure", "--keys", str(keys))
    try:
        ready = wait_for(lambda: read_ready_file(ready_path) or up.poll() is not None, 120, "cluster up to be ready")
        assert up.poll() is None, log_path.read_text()
        edge = ready["addresses"].pop("edge")
        ready["addresses"].pop("grpc")
        token = (keys / "edge.token").read_text().strip()
        banner = log_path.read_text()
        assert f"{keys}/client.key" in banner and f"{keys}/admin.key" in banner and token in banner, banner
        assert oct((keys / "edge.token").stat().st_mode & 0o777) == "0o600"
        local = LocalCluster(share, tmp_path, addresses=Addresses(**ready["addresses"]), keys=keys)
        local.wait_for_agents(2, model="digits")  # through local.client(): the client key
        with Client(ready["addresses"]["broker_clients"], timeout=5) as stranger:
            with pytest.raises(AuthenticationError):
                stranger.agents(timeout=5)
        assert httpx.get(f"{edge}/models", timeout=5).status_code == 401
        response = httpx.get(f"{edge}/models", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert response.status_code == 200 and "digits" in response.json(), response.text
        local.stop_all()
        os.kill(up.pid, signal.SIGTERM)
        assert up.wait(30) == 0, log_path.read_text()
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGKILL)
            up.wait(10)


def test_status_says_clearly_when_the_broker_is_down(tmp_path):
    local = LocalCluster(tmp_path / "share", tmp_path)  # nothing is started: its addresses lead nowhere
    out = subprocess.run(
        [sys.executable, "-m", "cluster", "status", "--timeout", "0.5"],
        env=local.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "cannot reach the broker" in out.stderr


COMMANDS = {"manager", "broker", "agent", "edge", "up", "status", "deploy", "rollback", "undeploy", "models", "bench"}
COMMANDS |= {"canary", "promote", "abort", "rollouts"}


def test_every_command_documents_its_options():
    """Each command's --help lists every option it takes, with a description and the environment variable it reads
    (typer's envvar, or a settings field's variable in its help).
    In-process (the same typer app `python -m cluster` runs), wide enough that rich does not wrap names."""
    commands = typer.main.get_command(app).commands
    assert COMMANDS <= set(commands), f"commands missing from `cluster`: {sorted(COMMANDS - set(commands))}"
    runner = CliRunner()
    for name, command in sorted(commands.items()):
        out = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"})
        assert out.exit_code == 0, f"`cluster {name} --help` exited with {out.exit_code}: {out.output}"
        problems = []
        envvars = []
        for param in command.params:
            if param.param_type_name != "option" or param.hidden:
                continue
            flag = max(param.opts, key=len)
            if flag not in out.output:
                problems.append(f"{flag} is not listed")
            if not param.help:
                problems.append(f"{flag} has no description")
            envvars += [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
            envvars += re.findall(r"\[(CLUSTER_[A-Z_]+);", param.help or "")  # a settings field's (its help names it)
        problems += [f"{envvar} is not named" for envvar in envvars if envvar not in out.output]
        if name != "config" and not any(envvar.startswith("CLUSTER_") for envvar in envvars):  # config: reads all
            problems.append("no option reads a CLUSTER_* environment variable")
        assert not problems, f"`cluster {name} --help`: {'; '.join(problems)}\n{out.output}"


def test_cli_is_a_package_of_small_modules_listing_commands_in_order():
    """cluster/cli/ holds one module per group of commands, none over 600 lines (issue 19); `cluster --help` lists the
    commands in the order they have always had (roles, up, status and health, deploys, bench, keys)."""
    from pathlib import Path

    import cluster.cli

    package = Path(cluster.cli.__file__).parent
    assert package.name == "cli" and Path(cluster.cli.__file__).name == "__init__.py", "cluster.cli is not a package"
    sizes = {path.name: len(path.read_text().splitlines()) for path in package.glob("*.py")}
    assert {"roles.py", "up.py", "health.py", "deploy.py", "bench.py", "keys.py"} <= set(sizes), sorted(sizes)
    assert max(sizes.values()) <= 600, f"cluster/cli/ modules over 600 lines: {sizes}"
    order = ["manager", "broker", "agent", "edge", "up", "status", "health", "deploy", "rollback", "undeploy"]
    order += ["models", "canary", "promote", "abort", "rollouts", "bench", "config", "keys"]
    assert list(typer.main.get_command(app).commands) == order


def test_tables_keep_agent_ids_whole_at_80_columns():
    """`cluster status`, `models` and `deploy` print through one table helper: the first column is never cut."""
    from rich.console import Console

    from cluster.cli import _table

    table = _table("Agents (1)", "id", "host:pid", "device", "models", "load", "beat", "up")
    long_id = "vm-5012345678-abcdef-ghijkl"
    table.add_row(long_id, "vm-5012345678:123456", "cpu", "digits v1, echo v1, mirror v3", "0/16", "0.3 s", "12 s")
    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    assert long_id in text and "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text


def _up_once(env: dict, *args: str) -> subprocess.CompletedProcess:
    """`cluster up` that must refuse at once (nothing started)."""
    return subprocess.run(
        [sys.executable, "-m", "cluster", "up", "--edge-port", "0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cluster_up_names_a_port_in_use_and_its_holder_before_starting_anything(tmp_path, share):
    import socket

    local = LocalCluster(share, tmp_path)  # its addresses: every port 0 (the OS picks), except the one taken below
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = local.env(CLUSTER_BROKER_CLIENTS=f"tcp://127.0.0.1:{port}")
        out = _up_once(env, "--share", str(share))
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"tcp://127.0.0.1:{port} (the broker clients address) is already in use, by pid {os.getpid()}" in out.stderr
    assert "--any-ports" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "cluster up: share" not in out.stdout, "the banner was printed for a cluster that did not start"


def test_cluster_up_refuses_a_share_that_does_not_exist_unless_told_to_create_it(tmp_path):
    local = LocalCluster(tmp_path / "unused", tmp_path)
    env = local.env()
    env.pop("CLUSTER_SHARE", None)
    typo = tmp_path / "typo" / "path"
    out = _up_once(env, "--any-ports", "--share", str(typo))
    assert out.returncode == 2 and "does not exist" in out.stderr and "--create-share" in out.stderr, out.stderr
    assert not typo.exists(), "the mistyped share was created"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    out = _up_once(env, "--any-ports", "--share", str(a_file))
    assert out.returncode == 2 and "cannot use" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.cluster
def test_status_marks_a_stalled_agent(cluster):
    """An agent that holds requests and answers none (frozen here with SIGSTOP) shows as `stalled` in its load column,
    as the broker routes around it; the other agent does not."""
    import numpy as np

    cluster.extra_env["CLUSTER_LIVENESS"] = "100"  # frozen for the test's length, never declared dead meanwhile
    cluster.start_manager()
    cluster.start_broker()
    frozen = cluster.start_agent("agent-a", "--models", "echo")
    cluster.start_agent("agent-b", "--models", "echo")
    cluster.wait_for_agents(2, model="echo")
    client = cluster.client()
    x = {"x": np.ones((1, 4), np.float32)}
    for _ in range(60):  # the broker judges stalls once it has seen 20 answers of the model
        client.infer("echo", x)
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        futures = [client.submit("echo", x, timeout=60) for _ in range(8)]  # round-robin: some go to agent-a
        wait_for(
            lambda: any(a["id"] == "agent-a" and a.get("stalled") for a in client.agents()),
            30,
            f"the broker to find agent-a stalled: {client.agents()}",
        )
        result = CliRunner().invoke(
            app, ["status", "--broker", cluster.addresses.broker_clients], env={"COLUMNS": "200"}
        )
        assert result.exit_code == 0, result.output
        rows = {}
        for line in result.stdout.splitlines():  # the agents table's rows: the id in the first cell
            cells = [c.strip() for c in line.replace("┃", "│").split("│")]
            if len(cells) > 2 and cells[1] in ("agent-a", "agent-b"):
                rows[cells[1]] = line
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert "stalled" in rows["agent-a"] and "stalled" not in rows["agent-b"], result.stdout
    assert all(f.result(timeout=60).as_numpy("y").tolist() == x["x"].tolist() for f in futures)
