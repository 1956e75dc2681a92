"""CURVE on the bus, end to end on real processes (issue 9, "The bus"): keys, roles, revocation, rogue agents,
identity bound to a key, what is on the wire, and the bus fuzz against a secured broker.

Every cluster here runs with `LocalCluster(keys=DIR)`: the manager and the broker serve with DIR/server.key, each
agent has a key of its own (role agent), `cluster.client()` presents DIR/client.key and `manager_query` DIR/admin.key.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest
import zmq

from cluster import AuthenticationError, Client, PermissionDeniedError, keys, protocol
from cluster.manager.client import ManagerClient
from cluster.protocol import PREAMBLE, Command
from tests.harness import LocalCluster, wait_for

pytestmark = pytest.mark.cluster

ECHO = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}


@pytest.fixture
def secure(request, share, tmp_path):
    """A LocalCluster with keys on (nothing started yet); logs shown on failure."""
    local = LocalCluster(share, tmp_path / "logs", keys=tmp_path / "keys")
    yield local
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    local.stop_all()
    if failed:
        print(local.logs())


def start(cluster: LocalCluster, agents: int = 1, model: str = "echo") -> None:
    cluster.start_manager()
    cluster.start_broker()
    cluster.start_agents(agents, "--models", model)
    cluster.wait_for_agents(agents, model=model)


def curve_dealer(ctx, address: str, key_file, identity: bytes | None = None) -> zmq.Socket:
    """A raw DEALER presenting `key_file` (None: no key), as a rogue peer would build one."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if key_file is not None:
        key = keys.KeyFile.load(key_file)
        sock.curve_serverkey = key.server_public.encode()
        sock.curve_publickey = key.public.encode()
        sock.curve_secretkey = key.secret.encode()
    sock.connect(address)
    return sock


def ready_message(agent_id: str, capacity: int = 64) -> list[bytes]:
    beat = {"agent": agent_id, "capacity": capacity, "models": [{"name": "echo", "version": 1, "default": True}]}
    beat["metadata"] = []
    return protocol.message(Command.READY, beat)


# ---- 1. keys: allowed, missing, revoked -------------------------------------------------------------------------


def test_client_keys_allowed_missing_and_revoked(secure):
    start(secure)
    address = secure.addresses.broker_clients
    with Client(address, key=secure.member_key("client")) as client:
        assert client.infer("echo", ECHO).as_numpy("y").tolist() == [[0, 1, 2, 3]]

    keys.add(secure.keys, "dave", "client")
    revoked = secure.workdir / "dave.key"
    os.replace(secure.keys / "dave.key", revoked)
    keys.revoke(secure.keys, "dave")
    for what, key in (("no key", None), ("a revoked key", str(revoked))):
        started = time.monotonic()
        with Client(address, key=key, timeout=30) as client:
            with pytest.raises(AuthenticationError) as refused:
                client.infer("echo", ECHO)
        took = time.monotonic() - started
        assert took < 2.0, f"{what}: AuthenticationError took {took:.2f} s"
        assert "key" in str(refused.value), f"{what}: unclear message {refused.value}"

    # A running client whose key is revoked stops being served within 5 s (the allow-list is re-read, and every
    # message is checked: the handshake it passed earlier does not keep it in).
    keys.add(secure.keys, "carol", "client")
    carol = Client(address, key=str(secure.keys / "carol.key"), timeout=10)
    try:
        assert carol.infer("echo", ECHO).agent
        keys.revoke(secure.keys, "carol")
        revoked_at = time.monotonic()

        def refused():
            try:
                carol.infer("echo", ECHO, timeout=2)
                return False
            except AuthenticationError:
                return True

        wait_for(refused, 5, "the revoked client to be refused")
        assert time.monotonic() - revoked_at < 5
    finally:
        carol.close()


# ---- 2. rogue agents --------------------------------------------------------------------------------------------


def test_rogue_agents_are_never_routed_a_request(secure):
    start(secure, agents=1)
    ctx = zmq.Context()
    keys.add(secure.keys, "mallory", "client")
    rogues = {
        "client key": curve_dealer(ctx, secure.addresses.broker_agents, secure.keys / "mallory.key", b"rogue-1"),
        "no key": curve_dealer(ctx, secure.addresses.broker_agents, None, b"rogue-2"),
        # an agent key of its own, claiming the real agent's id while it is connected
        "stolen id": curve_dealer(
            ctx, secure.addresses.broker_agents, secure.role_key("agent", "thief"), secure.procs[-1].name.encode()
        ),
    }
    for name, sock in rogues.items():
        for _ in range(2):  # twice: libzmq reads the first frame of a refused duplicate's next message as its id
            try:  # NOBLOCK: a DEALER whose handshake the broker refused already has no pipe, and a send would hang
                sock.send_multipart(
                    ready_message(name.replace(" ", "-") if name != "stolen id" else secure.procs[-1].name), zmq.NOBLOCK
                )
            except zmq.Again:
                pass
    client = secure.client()
    served = {client.infer("echo", ECHO).agent for _ in range(60)}
    assert served == {secure.procs[-1].name}, served
    for name, sock in rogues.items():
        got = []
        while sock.poll(0):
            got.append(sock.recv_multipart())
        assert not any(f[0][:5] == PREAMBLE[Command.REQUEST] for f in got), f"rogue with {name} was sent a request"
    agents = {a["id"] for a in client.agents()}
    assert agents == {secure.procs[-1].name}, agents
    for sock in rogues.values():
        sock.close()
    ctx.term()


def test_agent_killed_and_restarted_with_its_key_comes_back(secure):
    """With keys on the agents' ROUTER does not hand identities over; a real agent killed with kill -9 and started
    again with the same id and key must still get its id back within a few heartbeat intervals of starting."""
    start(secure, agents=1)
    agent = secure.procs[-1]
    client = secure.client()
    assert client.infer("echo", ECHO).agent == agent.name
    secure.kill(agent)
    again = secure.restart(agent)
    expiry = secure.heartbeat_interval * secure.liveness

    def served_by_it():
        result = client.infer("echo", ECHO, timeout=2)
        return result.agent == again.name and any(a["pid"] == again.pid for a in client.agents())

    # It serves once it has loaded (torch import: seconds), then within a few intervals of its READY.
    wait_for(served_by_it, 60 + 4 * expiry, "the restarted agent to serve again under its id")


# ---- 3. manager commands by role ----------------------------------------------------------------------------------


def test_client_key_cannot_deploy_admin_key_can(secure):
    start(secure, agents=1, model="digits")
    queries = secure.addresses.manager_queries
    as_client = ManagerClient(queries, key=secure.member_key("client"))
    assert "digits" in as_client.call("deployments")  # read-only: allowed
    assert "canaries" in as_client.call("rollouts")  # read-only: allowed
    for what, fields in (("undeploy", {}), ("rollback", {}), ("deploy", {"version": 1}), ("canary", {}), ("abort", {})):
        with pytest.raises(PermissionDeniedError) as denied:
            as_client.call(what, name="digits", **fields)
        message = str(denied.value)
        assert f"{what} needs an admin key" in message and "'client'" in message, message
    with pytest.raises(PermissionDeniedError, match="publish needs an admin key"):  # a model file sent to publish
        as_client.call("publish", data=b"torchscript", name="sneaky", file="model.pt", config=None)
    assert "sneaky" not in as_client.call("deployments") and not (secure.share / "models" / "sneaky").exists()
    as_admin = ManagerClient(queries, key=secure.member_key("admin"))
    report = as_admin.call("deploy", timeout=60, name="digits", version=1)
    assert report["ok"], report
    with pytest.raises(AuthenticationError):
        ManagerClient(queries).call("deployments", timeout=5)  # no key: no connection completes


# ---- 4. on the wire -----------------------------------------------------------------------------------------------

MARKER = bytes(range(0x40, 0x80))  # 64 bytes, a run that does not occur by chance


class LoopbackCapture:
    """Every packet on `lo` while it runs (an AF_PACKET raw socket: the tests run as root), in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.data += self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return bytes(self.data)


@pytest.mark.skipif(os.geteuid() != 0, reason="an AF_PACKET capture needs root")
@pytest.mark.parametrize("with_keys", [False, True], ids=["clear", "curve"])
def test_tensor_bytes_on_the_wire(share, tmp_path, with_keys):
    with LocalCluster(share, tmp_path / "logs", keys=tmp_path / "keys" if with_keys else None) as cluster:
        start(cluster)
        client = cluster.client()
        inputs = {"x": np.frombuffer(MARKER * 4, dtype=np.float32).reshape(4, 16)}
        client.infer("echo", inputs)  # connected and warm before the capture
        capture = LoopbackCapture()
        try:
            result = client.infer("echo", inputs)
        finally:
            wire = capture.stop()
        assert result.as_numpy("y").tobytes() == MARKER * 4
        assert len(wire) > 4 * len(MARKER), "the capture saw nothing"
        if with_keys:
            assert MARKER not in wire, "the tensor's bytes crossed loopback in the clear with keys on"
        else:
            assert MARKER in wire, "the capture did not see the tensor in the clear (is it capturing?)"


# ---- 6. the bus fuzz against a secured broker ----------------------------------------------------------------------

FUZZ_EXAMPLES = 300  # per socket (tests/test_fuzz.py runs 1,500 on the unsecured bus)


@pytest.mark.timeout(600)
def test_fuzz_a_secured_broker_before_and_after_the_handshake(secure):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.test_fuzz import drain, fuzz

    start(secure, agents=1)
    a = secure.addresses
    ports = {
        name: int(getattr(a, name).rsplit(":", 1)[1])
        for name in ("broker_clients", "broker_agents", "manager_heartbeats", "manager_queries")
    }

    # Before the handshake: raw TCP garbage, and a valid ZMTP 3.0 greeting start (signature, version 3.0, the
    # mechanism name padded to 20 bytes: NULL or CURVE) followed by garbage.
    def greeting(mechanism: bytes) -> bytes:
        return b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + mechanism.ljust(20, b"\0")

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from(sorted(ports)),
        st.sampled_from([b"", greeting(b"NULL"), greeting(b"CURVE")]),
        st.binary(max_size=300),
    )
    def raw(port_name, prefix, garbage):
        with socket.create_connection(("127.0.0.1", ports[port_name]), timeout=2) as conn:
            try:
                conn.sendall(prefix + garbage)
                conn.settimeout(0.05)
                conn.recv(1024)
            except OSError:
                pass  # the peer closing on us is the expected answer

    raw()

    # After the handshake: allowed keys sending fuzz messages on the sockets their role reaches.
    ctx = zmq.Context()
    keys.add(secure.keys, "fuzz-agent", "agent")
    clients = curve_dealer(ctx, a.broker_clients, secure.member_key("client"))
    agents = curve_dealer(ctx, a.broker_agents, secure.keys / "fuzz-agent.key", b"fuzz-agent")
    queries = curve_dealer(ctx, a.manager_queries, secure.member_key("client"))
    fuzz(lambda f: (clients.send_multipart(f), drain(clients)), FUZZ_EXAMPLES)
    fuzz(lambda f: (agents.send_multipart(f), drain(agents)), FUZZ_EXAMPLES)
    fuzz(lambda f: (queries.send_multipart(f), drain(queries)), FUZZ_EXAMPLES)
    for sock in (clients, agents, queries):
        sock.close()
    ctx.term()

    client = secure.client()
    assert client.infer("echo", ECHO).as_numpy("y").tolist() == [[0, 1, 2, 3]]
    assert secure.manager_query("deployments") is not None
    for proc in secure.procs:
        if proc.role in ("manager", "broker") and not proc.retired:
            assert proc.alive(), f"{proc.name} died:\n{proc.log()[-3000:]}"
            assert "Traceback" not in proc.log(), f"{proc.name} hit an unexpected exception:\n{proc.log()[-3000:]}"
