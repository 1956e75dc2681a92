"""The key directory: who may talk on the bus, and with which role. No sockets here (cluster/auth.py uses it).

    DIR/server.key     the key pair the broker and the manager serve with (CURVE server), and connect to each other with
    DIR/NAME.key       one member's key file: JSON {name, role, public, secret, server_public}, all keys in z85;
                       the one file a member needs (its own key pair and the servers' public key)
    DIR/members.json   the allow-list: {"members": {name: {"role": ..., "public": ...}}}; the server's own key is in it
                       with role "server" (the broker's subscription to the manager's events presents it)

Roles: `agent` (registers with the broker, publishes heartbeats), `client` (inference and read-only queries), `admin`
(a client that may also deploy, roll back and undeploy). Every file is written atomically (a temporary file renamed
into place); key files are 0600. `AllowList` is what the broker and the manager read: it follows changes to
members.json (an add or revoke takes effect within about a second) and answers `role_of(public_key)` with one dict
lookup, cheap enough for every message.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq

from cluster.atomic import atomic_write

ROLES = ("agent", "client", "admin")  # what `cluster keys add --role` accepts
SERVER_ROLE = "server"  # the broker and the manager themselves
SERVER_NAME = "server"
MEMBERS_FILE = "members.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RELOAD_EVERY = 1.0  # seconds between looks at members.json


class KeyDirError(ValueError):
    """A key directory or key file that cannot be used; the message says why."""


@dataclass(frozen=True)
class KeyFile:
    """One member's key file: its CURVE key pair and the servers' public key (z85 strings)."""

    name: str
    role: str
    public: str
    secret: str
    server_public: str

    def save(self, path: str | Path) -> None:
        atomic_write(path, (json.dumps(asdict(self), indent=1) + "\n").encode(), mode=0o600)

    @classmethod
    def load(cls, path: str | Path) -> KeyFile:
        try:
            data = json.loads(Path(path).read_text())
            key = cls(**{f: data[f] for f in ("name", "role", "public", "secret", "server_public")})
        except FileNotFoundError:
            raise KeyDirError(f"no key file at {path}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyDirError(f"{path} is not a cluster key file ({type(exc).__name__}: {exc})") from None
        for value in (key.public, key.secret, key.server_public):
            if not isinstance(value, str) or len(value) != 40:
                raise KeyDirError(f"{path} is not a cluster key file (keys must be 40-character z85)")
        return key

    @property
    def is_server(self) -> bool:
        return self.role == SERVER_ROLE


def _keypair() -> tuple[str, str]:
    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def _read_members(directory: Path) -> dict[str, dict]:
    try:
        data = json.loads((directory / MEMBERS_FILE).read_text())
    except FileNotFoundError:
        raise KeyDirError(f"{directory} is not a key directory (no {MEMBERS_FILE}; run `cluster keys init`)") from None
    except ValueError as exc:
        raise KeyDirError(f"{directory / MEMBERS_FILE} is not valid JSON: {exc}") from None
    members = data.get("members") if isinstance(data, dict) else None
    if not isinstance(members, dict):
        raise KeyDirError(f"{directory / MEMBERS_FILE} has no 'members' map")
    return members


def _write_members(directory: Path, members: dict[str, dict]) -> None:
    atomic_write(
        directory / MEMBERS_FILE, (json.dumps({"members": members}, indent=1, sort_keys=True) + "\n").encode(), 0o644
    )


def init(directory: str | Path, admin: str = "admin") -> KeyFile:
    """Create a key directory: the server key pair, the allow-list, and a first admin member. Returns the admin's
    key. Refuses a directory that already holds a server key (it would lock out every member)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if (directory / "server.key").exists():
        raise KeyDirError(f"{directory} already holds a server key; use `cluster keys add` to add members")
    public, secret = _keypair()
    KeyFile(SERVER_NAME, SERVER_ROLE, public, secret, public).save(directory / "server.key")
    _write_members(directory, {SERVER_NAME: {"role": SERVER_ROLE, "public": public}})
    return add(directory, admin, "admin")


def add(directory: str | Path, name: str, role: str) -> KeyFile:
    """A new member: writes DIR/NAME.key and allows its public key for `role`."""
    directory = Path(directory)
    if role not in ROLES:
        raise KeyDirError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
    if not NAME_PATTERN.match(name) or name == SERVER_NAME:
        raise KeyDirError(f"invalid member name {name!r}: letters, digits, '_', '.', '-' (not 'server')")
    members = _read_members(directory)
    if name in members:
        raise KeyDirError(f"member {name!r} exists already; revoke it first to give it a new key")
    server = KeyFile.load(directory / "server.key")
    public, secret = _keypair()
    key = KeyFile(name, role, public, secret, server.public)
    key.save(directory / f"{name}.key")
    members[name] = {"role": role, "public": public}
    _write_members(directory, members)
    return key


def revoke(directory: str | Path, name: str) -> None:
    """Remove a member from the allow-list (and delete its key file)."""
    directory = Path(directory)
    members = _read_members(directory)
    if name == SERVER_NAME:
        raise KeyDirError("the server key cannot be revoked; make a new key directory instead")
    if name not in members:
        raise KeyDirError(f"no member {name!r} in {directory}")
    del members[name]
    _write_members(directory, members)
    (directory / f"{name}.key").unlink(missing_ok=True)


def list_members(directory: str | Path) -> dict[str, dict]:
    """name -> {role, public}, the server included."""
    return _read_members(Path(directory))


def make_cluster_keys(
    directory: str | Path, agents: int = 1, clients: tuple[str, ...] = ("client", "edge")
) -> dict[str, Path]:
    """A complete key directory for a cluster on one machine (`cluster up --secure`, LocalCluster(keys=...)): the
    server key, `admin`, the client members `clients` (the edge's is "edge"), and `agents` agent keys agent-1 ...
    Returns name -> key file path (the server's under "server")."""
    directory = Path(directory)
    init(directory)
    for name in clients:
        add(directory, name, "client")
    for i in range(1, agents + 1):
        add(directory, f"agent-{i}", "agent")
    return {name: directory / f"{name}.key" for name in list_members(directory)}


class AllowList:
    """The allow-list of a key directory, as the broker and manager see it: public key (z85) -> role.

    `role_of` is one dict lookup; `refresh(now)` (called from the role's clock tick: it looks at most every
    RELOAD_EVERY seconds; the ZAP thread forces a look at every handshake) reloads members.json when it changed.
    A members.json that cannot be read keeps the last good list (an operator's half-edited file must not lock
    everyone out or let everyone in)."""

    def __init__(self, directory: str | Path, reload_every: float = RELOAD_EVERY) -> None:
        self.directory = Path(directory)
        self.path = self.directory / MEMBERS_FILE
        self.reload_every = reload_every
        self.roles: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self._stamp: tuple | None = None
        self._next_check = 0.0
        self.load()

    def load(self) -> None:
        stat = self.path.stat()
        members = _read_members(self.directory)
        self.roles = {m["public"]: m["role"] for m in members.values() if isinstance(m, dict) and "public" in m}
        self.names = {m["public"]: name for name, m in members.items() if isinstance(m, dict) and "public" in m}
        self._stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def refresh(self, now: float | None = None, force: bool = False) -> bool:
        """Reload if members.json changed; looks at most every `reload_every` s (force: now; a stat). True if it
        reloaded."""
        now = time.monotonic() if now is None else now
        if now < self._next_check and not force:
            return False
        self._next_check = now + self.reload_every
        try:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_size, stat.st_ino) == self._stamp:
                return False
            self.load()
            return True
        except (OSError, KeyDirError):
            return False

    def role_of(self, public_key: str | None) -> str | None:
        """The role of a z85 public key (the ZAP User-Id of a message), None if it is not allowed."""
        return self.roles.get(public_key)

    def name_of(self, public_key: str | None) -> str:
        return self.names.get(public_key, "an unknown key")
