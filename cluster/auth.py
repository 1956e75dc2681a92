"""CURVE on the bus: which key each socket presents, who may connect where (ZAP), and who may do what (roles).

A process started with `--key FILE` runs every bus socket with CURVE (sockets.CurveServer / CurveClient). The broker
and the manager hold the server key (DIR/server.key) and read the allow-list next to it (keys.AllowList); each runs
one ZAP authenticator thread (pyzmq's ThreadAuthenticator with a credentials callback over the allow-list), which
decides at the handshake whether a key may connect to that socket at all:

    ZAP domain  sockets                                                   roles that may connect
    clients     broker's client ROUTER, manager's query ROUTER             client, admin, server (a starting broker
                                                                          asks the manager which agents are alive)
    agents      broker's agent ROUTER                                      agent
    heartbeats  manager's heartbeat SUB                                    agent, server (a broker's PUB of its
                                                                          reports connects there)
    events      manager's event PUB (the broker and the agents subscribe)  agent, server

The handshake runs once per connection, so an allowed key stays connected after it is revoked. Every message
where it matters is therefore checked too (`refusal`): ZeroMQ attaches the ZAP user id (here: the sender's public
key in z85, pyzmq's default `curve_user_id`) to each message it receives, read with `key_of(frame)`; the role is
one dict lookup in the allow-list. Without a key none of this runs: no CURVE, no User-Id, no checks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq

from cluster.keys import SERVER_ROLE, AllowList, KeyFile
from cluster.protocol import ErrorCode
from cluster.sockets import CurveClient, CurveServer

log = logging.getLogger("cluster.auth")

CLIENT_ROLES = frozenset({"client", "admin"})
DOMAINS: dict[str, frozenset[str]] = {
    "clients": CLIENT_ROLES | {SERVER_ROLE},
    "agents": frozenset({"agent"}),
    "heartbeats": frozenset({"agent", SERVER_ROLE}),
    "events": frozenset({"agent", SERVER_ROLE}),
}
# What each role may do, per message: action -> roles.
PERMISSIONS: dict[str, frozenset[str]] = {
    "infer": CLIENT_ROLES,  # REQUEST to the broker
    "query": CLIENT_ROLES,  # QUERY to the broker; agents / models / deployments at the manager
    "agent": frozenset({"agent"}),  # READY, HEARTBEAT, REPLY, ERROR, DISCONNECT to the broker; manager heartbeats
    "deploy": frozenset({"admin"}),  # deploy, rollback, undeploy, publish at the manager
    "report": frozenset({SERVER_ROLE}),  # a broker's report to the manager (EVENT broker_report), its QUERY agents
}


# What each handshake failure a client's socket monitor reports means. NO_DETAIL is also what a connection closed
# mid-handshake reports (a peer restarting): conclusive only after a few in a row with no success between (a wrong
# server key fails every handshake this way, and so, at times, does a client without a key at a peer with keys).
HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the {peer} refused this client's key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the handshake failed: the {peer} and this client disagree on security "
    "(one runs with keys, the other without)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake with the {peer} keeps failing (a wrong or missing key?)",
}
HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | sum(HANDSHAKE_FAILED)  # what a client's monitor listens for
NO_DETAIL_LIMIT = 3  # consecutive NO_DETAIL failures after which a client gives up


class HandshakeVerdict:
    """Sans-IO: reads a client socket's handshake monitor events and says when they are conclusive (why, or None).
    Shared by the broker's client (cluster/client.py) and the manager's (cluster/manager/client.py)."""

    def __init__(self, peer: str) -> None:
        self.peer = peer  # "broker" or "manager", for the message
        self._no_detail = 0  # NO_DETAIL failures since the last success

    def on_event(self, event: int) -> str | None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._no_detail = 0
            return None
        if event not in HANDSHAKE_FAILED:
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._no_detail += 1
            if self._no_detail < NO_DETAIL_LIMIT:
                return None
        return HANDSHAKE_FAILED[event].format(peer=self.peer)


def key_of(frame) -> str | None:
    """The ZAP user id (the sender's public key, z85) ZeroMQ attached to a received frame; None without CURVE."""
    try:
        return frame.get("User-Id")
    except (AttributeError, zmq.ZMQError):
        return None


def refusal(allow: AllowList, key: str | None, action: str, what: str | None = None) -> tuple[ErrorCode, str] | None:
    """None if the key may do `action` (a PERMISSIONS entry), else (error code, message) saying why not; `what`
    names the operation in the message (default: the action). One dict lookup when allowed."""
    role = allow.roles.get(key)
    if role in PERMISSIONS[action]:
        return None
    if role is None:
        return ErrorCode.UNAUTHENTICATED, "this key is not on the cluster's allow-list (revoked?)"
    roles = " or ".join(sorted(PERMISSIONS[action]))
    article = "an" if roles[0] in "aeiou" else "a"
    return (
        ErrorCode.PERMISSION_DENIED,
        f"permission denied: {what or action} needs {article} {roles} key; "
        f"key '{allow.name_of(key)}' has role '{role}'",
    )


class _AllowListCallback:
    """pyzmq's credentials provider: `callback(domain, key)` is asked at each handshake (in the ZAP thread)."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow

    def callback(self, domain: str, key: bytes) -> bool:
        self.allow.refresh(force=True)  # handshakes are rare: a stat each, so a revoked key is refused at once
        role = self.allow.role_of(key.decode("ascii"))
        allowed = role in DOMAINS.get(domain, ())
        if not allowed:
            name = self.allow.name_of(key.decode("ascii"))
            log.warning("refused a connection on '%s' from %s (role %s)", domain, name, role)
        return allowed


class BusSecurity:
    """One process's CURVE settings, from its key file: the options for its sockets and, for the broker and the
    manager (the server key), the allow-list and the ZAP authenticator."""

    def __init__(self, key: KeyFile, allow: AllowList | None = None) -> None:
        self.key = key
        self.allow = allow
        self._authenticator = None

    @classmethod
    def load(cls, path: str | Path | None) -> BusSecurity | None:
        """From a key file (--key / CLUSTER_KEY); None when no key is given (the bus runs in the clear). A server key
        brings the allow-list of its directory."""
        if not path:
            return None
        key = KeyFile.load(path)
        return cls(key, AllowList(Path(path).parent) if key.is_server else None)

    def server(self, domain: str) -> CurveServer:
        if self.allow is None:
            raise ValueError(f"{self.key.name}'s key is not the server key: it cannot serve")
        return CurveServer(self.key.public, self.key.secret, domain)

    def client(self) -> CurveClient:
        return CurveClient(self.key.public, self.key.secret, self.key.server_public)

    def start_authenticator(self, ctx: zmq.Context) -> None:
        """The ZAP handler for every server socket of `ctx`: one thread, started before the sockets bind."""
        from zmq.auth.thread import ThreadAuthenticator

        authenticator = ThreadAuthenticator(ctx, log=logging.getLogger("cluster.zap"))
        authenticator.start()
        callback = _AllowListCallback(self.allow)
        for domain in DOMAINS:
            authenticator.configure_curve_callback(domain, callback)
        self._authenticator = authenticator

    def stop(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def refresh(self, now: float) -> None:
        if self.allow is not None:
            self.allow.refresh(now)
