"""In-process tests of the key directory (cluster/keys.py), the role checks (cluster/auth.py), and the sans-IO
binding of an agent to its key (the broker's Dispatcher, the manager's Registry). No sockets."""

from __future__ import annotations

import json
import stat

import pytest

from cluster import keys
from cluster.auth import refusal
from cluster.broker import Dispatcher
from cluster.broker.routing import RoundRobin
from cluster.config import Timings
from cluster.manager.registry import Registry
from cluster.protocol import PREAMBLE, ROUTE_BYTES, Command, ErrorCode, Heartbeat, pack, unpack_header


def test_init_add_revoke_list(tmp_path):
    directory = tmp_path / "keys"
    admin = keys.init(directory)
    server = keys.KeyFile.load(directory / "server.key")
    assert admin.role == "admin" and admin.server_public == server.public
    for name in ("server.key", "admin.key"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    alice = keys.add(directory, "alice", "client")
    assert keys.KeyFile.load(directory / "alice.key") == alice
    assert alice.server_public == server.public  # one file is all a member needs
    members = keys.list_members(directory)
    assert {n: m["role"] for n, m in members.items()} == {"server": "server", "admin": "admin", "alice": "client"}
    keys.revoke(directory, "alice")
    assert "alice" not in keys.list_members(directory) and not (directory / "alice.key").exists()
    with pytest.raises(keys.KeyDirError, match="unknown role"):
        keys.add(directory, "bob", "root")
    with pytest.raises(keys.KeyDirError, match="exists already"):
        keys.add(directory, "admin", "admin")
    with pytest.raises(keys.KeyDirError, match="invalid member name"):
        keys.add(directory, "../evil", "client")
    with pytest.raises(keys.KeyDirError, match="cannot be revoked"):
        keys.revoke(directory, "server")
    with pytest.raises(keys.KeyDirError, match="already holds a server key"):
        keys.init(directory)
    with pytest.raises(keys.KeyDirError, match="not a cluster key file"):
        (tmp_path / "junk.key").write_text("{}")
        keys.KeyFile.load(tmp_path / "junk.key")


def test_make_cluster_keys(tmp_path):
    paths = keys.make_cluster_keys(tmp_path / "k", agents=2)
    assert set(paths) == {"server", "admin", "client", "edge", "agent-1", "agent-2"}
    roles = {n: m["role"] for n, m in keys.list_members(tmp_path / "k").items()}
    assert roles == {
        "server": "server",
        "admin": "admin",
        "client": "client",
        "edge": "client",
        "agent-1": "agent",
        "agent-2": "agent",
    }


def test_allow_list_follows_the_file(tmp_path):
    directory = tmp_path / "keys"
    keys.init(directory)
    allow = keys.AllowList(directory)
    alice = keys.add(directory, "alice", "client")
    assert allow.role_of(alice.public) is None  # not reloaded yet
    assert allow.refresh(now=0.0) and allow.role_of(alice.public) == "client"
    keys.revoke(directory, "alice")
    assert not allow.refresh(now=0.5)  # looked at most every RELOAD_EVERY seconds ...
    assert allow.role_of(alice.public) == "client"
    assert allow.refresh(now=1.5) and allow.role_of(alice.public) is None  # ... then it sees the revocation
    (directory / keys.MEMBERS_FILE).write_text("{ half-written")
    admin = keys.KeyFile.load(directory / "admin.key")
    allow.refresh(now=3.0)
    assert allow.role_of(admin.public) == "admin", "an unreadable members.json must keep the last good list"


def test_refusals_name_the_role_and_what_it_needs(tmp_path):
    directory = tmp_path / "keys"
    keys.make_cluster_keys(directory, agents=1)
    allow = keys.AllowList(directory)
    key = {n: m["public"] for n, m in keys.list_members(directory).items()}
    assert refusal(allow, key["client"], "infer") is None
    assert refusal(allow, key["admin"], "deploy") is None
    assert refusal(allow, key["agent-1"], "agent") is None
    code, text = refusal(allow, key["client"], "deploy", "undeploy")
    assert code == ErrorCode.PERMISSION_DENIED
    assert text == "permission denied: undeploy needs an admin key; key 'client' has role 'client'"
    assert refusal(allow, key["client"], "agent")[0] == ErrorCode.PERMISSION_DENIED
    assert refusal(allow, key["agent-1"], "infer")[0] == ErrorCode.PERMISSION_DENIED
    assert refusal(allow, "x" * 40, "infer")[0] == ErrorCode.UNAUTHENTICATED
    assert refusal(allow, None, "query")[0] == ErrorCode.UNAUTHENTICATED


# ---- the broker's Dispatcher with keys on ------------------------------------------------------------------------


def _beat(agent: str) -> bytes:
    return pack(Heartbeat(agent, 2, [{"name": "m", "version": 1}], pid=1, started=1.0).to_wire())


@pytest.fixture
def keyed(tmp_path):
    directory = tmp_path / "keys"
    keys.make_cluster_keys(directory, agents=2)
    members = keys.list_members(directory)
    return keys.AllowList(directory), {n: m["public"] for n, m in members.items()}


def test_dispatcher_takes_agents_only_from_agent_keys_and_binds_them(keyed):
    allow, key = keyed
    d = Dispatcher(Timings(), RoundRobin(), now=0.0, allow=allow)
    t = 10.0
    # A client key (or none, as a revoked one) saying READY is refused: no agent, and it is told why.
    for sender, code in ((key["client"], "PERMISSION_DENIED"), (None, "UNAUTHENTICATED")):
        (told,) = d.agent_message(Command.READY, [b"a1", PREAMBLE[Command.READY], _beat("a1")], t, sender)
        assert (told.peer, told.command, unpack_header(told.frames[2])["code"]) == (b"a1", Command.ERROR, code)
    # READY must name the identity it came with.
    assert d.agent_message(Command.READY, [b"a1", PREAMBLE[Command.READY], _beat("a2")], t, key["agent-1"]) == []
    assert len(d.agents) == 0
    d.agent_message(Command.READY, [b"a1", PREAMBLE[Command.READY], _beat("a1")], t, key["agent-1"])
    assert d.agents.get(b"a1").key == key["agent-1"]
    # Another agent key cannot take a1 over, nor speak for it.
    d.agent_message(Command.READY, [b"a1", PREAMBLE[Command.READY], _beat("a1")], t, key["agent-2"])
    assert d.agents.get(b"a1").key == key["agent-1"]
    out = d.client_request(b"c", 1, "m", None, 30.0, b"h", [b"t"], t)
    route = out[0].frames[1][5 : 5 + ROUTE_BYTES]  # the key the agent answers with (after the preamble; times follow)
    reply = [b"a1", PREAMBLE[Command.REPLY] + route, pack({"id": 1}), b"forged"]
    assert d.agent_message(Command.REPLY, reply, t, key["agent-2"]) == []
    assert route in d.requests, "a reply from another key must not answer the request"
    assert d.agent_message(Command.DISCONNECT, [b"a1", PREAMBLE[Command.DISCONNECT], pack({})], t, key["agent-2"]) == []
    assert d.agents.get(b"a1") is not None
    # The real key: answered.
    answered = d.agent_message(
        Command.REPLY, [b"a1", PREAMBLE[Command.REPLY] + route, pack({"id": 1}), b"y"], t, key["agent-1"]
    )
    assert [s.peer for s in answered] == [b"c"]


def test_registry_binds_agent_ids_to_keys(keyed):
    _, key = keyed
    registry = Registry(expiry=3.0)
    beat = Heartbeat("a1", 1, [])
    assert registry.may_beat("a1", key["agent-1"])
    registry.observe(beat, 0.0, key["agent-1"])
    assert registry.may_beat("a1", key["agent-1"]) and not registry.may_beat("a1", key["agent-2"])
    registry.expire(10.0)  # once it is gone, the id is free again
    assert registry.may_beat("a1", key["agent-2"])


def test_members_file_is_plain_json(tmp_path):
    keys.init(tmp_path / "k")
    data = json.loads((tmp_path / "k" / keys.MEMBERS_FILE).read_text())
    assert set(data) == {"members"} and data["members"]["admin"]["role"] == "admin"


def test_client_core_fails_calls_on_a_refused_handshake():
    """AuthenticationError at once on a conclusive handshake failure; a handshake closed mid-way (NO_DETAIL, also
    what a restarting broker causes) counts only a few in a row."""
    import concurrent.futures

    import zmq

    from cluster import AuthenticationError
    from cluster.auth import NO_DETAIL_LIMIT
    from cluster.client import ClientCore

    core = ClientCore(5.0, "tcp://127.0.0.1:1", keyed=False)
    call = core.query_call("agents", None, concurrent.futures.Future())
    assert core.on_handshake(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) == [] and core.refused is None
    core.on_handshake(zmq.EVENT_HANDSHAKE_SUCCEEDED)  # a success in between: the count starts again
    [(failed, error)] = core.on_handshake(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    assert failed is call and isinstance(error, AuthenticationError) and "pass key=" in str(error)
    assert core.calls == {}
    core.on_handshake(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    assert core.refused is None

    keyed = ClientCore(5.0, "tcp://127.0.0.1:1", keyed=True)
    for _ in range(NO_DETAIL_LIMIT - 1):
        keyed.on_handshake(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    assert keyed.refused is None
    keyed.on_handshake(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    assert isinstance(keyed.refused, AuthenticationError)
    keyed.on_handshake(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    keyed.on_handshake(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    assert "refused this client's key" in str(keyed.refused)


def test_manager_client_gives_up_on_handshakes_that_keep_failing_without_detail():
    """A peer that closes every connection mid-handshake (what a keyless client at a keyed manager at times sees,
    under load) fails the call with AuthenticationError after a few tries, not a 5 s timeout that blames the manager
    for not running. (CI once failed test_security_bus this way.)"""
    import socket
    import threading
    import time

    from cluster import AuthenticationError
    from cluster.manager.client import ManagerClient

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def close_every_connection():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except TimeoutError:
                pass

    closer = threading.Thread(target=close_every_connection, daemon=True)
    closer.start()
    try:
        began = time.monotonic()
        with pytest.raises(AuthenticationError, match="keeps failing"):
            ManagerClient(f"tcp://127.0.0.1:{listener.getsockname()[1]}").call("deployments", timeout=5)
        assert time.monotonic() - began < 4, "gave up only at the deadline"
    finally:
        stop.set()
        closer.join(timeout=5)
        listener.close()
