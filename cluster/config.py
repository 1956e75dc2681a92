"""Every address, timing and limit of the cluster, in one place.

Each setting has a default here and an environment variable that overrides it, so a test (or an operator) can run
the whole cluster with, say, 100 ms heartbeats without touching code. Command-line options override both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

# --- default addresses (loopback only unless told otherwise) ---------------------------------------------------
DEFAULT_HOST = "127.0.0.1"
BROKER_CLIENT_ADDR = f"tcp://{DEFAULT_HOST}:5555"  # clients (Client, AsyncClient, edge) connect here
BROKER_AGENT_ADDR = f"tcp://{DEFAULT_HOST}:5556"  # agents connect their DEALER here
MANAGER_HEARTBEAT_ADDR = f"tcp://{DEFAULT_HOST}:5557"  # agents PUB heartbeats here (manager binds SUB)
MANAGER_EVENTS_ADDR = f"tcp://{DEFAULT_HOST}:5558"  # manager PUBlishes registry changes here (broker SUBs)
MANAGER_QUERY_ADDR = f"tcp://{DEFAULT_HOST}:5559"  # manager answers agents/models queries here (ROUTER)
EDGE_HOST = DEFAULT_HOST
EDGE_PORT = 8000
EDGE_GRPC_PORT = 8001  # the edge's OIP gRPC (Triton's and KServe's usual port)
# The edge watches for an HTTP client's disconnect (to cancel its request on the bus) from this long after the request
# went on the bus: most are answered sooner, and a watcher for every request cost a tenth of the edge's CPU (py-spy)
EDGE_DISCONNECT_WATCH_AFTER = 0.05  # seconds

# --- limits -------------------------------------------------------------------------------------------------------
# data sockets: the largest frame a peer may send (ZMQ_MAXMSGSIZE; larger: the peer is disconnected)
MAX_MESSAGE_BYTES = int(os.environ.get("CLUSTER_MAX_MESSAGE_BYTES", 256 * 1024 * 1024))
MAX_CONTROL_BYTES = 1024 * 1024  # heartbeat and event sockets
# the manager's query socket: a model file sent to be published (`cluster deploy` without --share, a Triton load with
# files) travels in one message, so this is also the largest model that can be deployed that way
MAX_UPLOAD_BYTES = int(os.environ.get("CLUSTER_MAX_UPLOAD_BYTES", 256 * 1024 * 1024))
MAX_HEADER_BYTES = 1024 * 1024  # a msgpack header larger than this is refused before decoding
MAX_TENSORS = 64  # tensors in one request or reply
MAX_DIMS = 16  # dimensions of one tensor
# Limits the bus and the edge share (cluster/protocol.py checks them on the bus, edge/oip*.py and edge/grpc_service.py
# before a request reaches it), defined here once so that the two cannot drift apart
MAX_DIM = 2**40  # every dimension of a tensor's shape is below this
MAX_NAME = 256  # characters of a tensor's name
MAX_REQUEST_TIMEOUT_S = 24 * 3600.0  # the longest deadline a request may ask for
ROLLOUT_TIMEOUT_S = 300.0  # seconds each agent has to stage a new version, when a deploy or load names no timeout
# A model version is a number from 1 (0 only for folders published by hand) to MAX_VERSION: an int32 like a Triton
# client's, so every language and every JSON reader holds it exactly
MAX_VERSION = 2**31 - 1
# A publish's temporary folder (`<share>/models/<name>/.tmp-*`) untouched this long was left by a publisher that was
# killed (kill -9, power loss); the next publish of that model removes it
STALE_PUBLISH_SECONDS = float(os.environ.get("CLUSTER_STALE_PUBLISH_SECONDS", 3600))
MODEL_COPY_CHUNK = 64 * 1024 * 1024  # bytes per sendfile() when an agent copies a model file into a sealed memfd
LOAD_THREADS = 2  # model versions an agent loads at once (at start and in rollouts): copying and hashing release the
# GIL, so a second model need not wait for the first (2 x 100 MB + digits: 0.46 -> 0.34 s)
SOCKET_HWM = 10_000  # ZeroMQ high-water mark per socket (messages); queues are bounded in the app too
LINGER_MS = 200  # how long a closing socket may flush
# The broker's pipe to each client holds at most this many replies (ZeroMQ SNDHWM, per peer): past it a send gives
# EAGAIN and the broker holds replies itself, within the client's byte budget (Timings.client_reply_budget).
CLIENT_SNDHWM = 64
# An agent's loop waits on its two hot sockets (the broker's requests, the workers' answers) and looks at the others
# (the broker link's monitor, manager subscriptions and events, finished loads) this often: zmq_poll costs two
# syscalls per socket per wait, and those rarely have anything (a READY on reconnect waits at most this long).
AGENT_COLD_POLL_S = 0.02
# The manager could not save its desired state (share full, folder gone): it undid the change and tries the save again
# this often while what it serves differs from the file (it keeps answering meanwhile).
STATE_SAVE_RETRY_S = 2.0
# `cluster deploy` asks the manager first (is it there, does it take this model and config) with this deadline, before
# it sends a model file or publishes one, so a wrong --manager or a typo costs seconds, not the rollout timeout.
DEPLOY_CHECK_TIMEOUT_S = 5.0
# A pass of a role's loop (broker, agent, manager) that took longer than this (or half a heartbeat interval, if less)
# means the process did not run for the excess (SIGSTOP, a VM stall, a GC pause): its peers' silence during it is not
# counted against them (cluster/clock.py, RunClock). Normal passes take a tick (0.1 s at most) plus the work.
OWN_PAUSE_BOUND = 0.5
# A request refused for its expected wait (load shedding) is told to come back once the queue ahead of it now has been
# served (its length over the model's measured rate), within these bounds (seconds): told "just over the bound's
# excess" (0.1 s, 89% of refusals in a 10x flood), every refused client came straight back to be refused again.
RETRY_AFTER_MIN = 0.1
RETRY_AFTER_MAX = 30.0
# An agent whose key the broker refuses (revoked) says so in its log at most this often (it is refused at every beat).
AGENT_REFUSED_LOG_S = 30.0
# An agent stopping (SIGTERM, or to be restarted) finishes its requests for at most this long, then exits, whatever
# its inference threads do (a hung model call never blocks the exit: `cluster agent --drain-timeout`).
AGENT_DRAIN_TIMEOUT_S = 10.0
# Optional limit on an agent's resident memory (MiB; 0 = none): past it the agent drains and exits with EXIT_MEMORY
# for its supervisor to restart it (a model that leaks). `cluster agent --max-memory`, CLUSTER_MAX_MEMORY.
AGENT_MAX_MEMORY_MIB = 0
# An agent not connected to its broker warns in its log after this long, then again at doubling intervals up to the max
AGENT_LINK_WARN_MAX_S = 60.0


@dataclass(frozen=True)
class Timings:
    """Heartbeats, liveness and deadlines. All in seconds."""

    heartbeat_interval: float = 1.0  # agents beat this often (to the manager and the broker)
    liveness: int = 3  # a peer silent for liveness * interval is dead
    reconnect_initial: float = 1.0  # an agent whose broker is connected but silent sends READY again after this;
    reconnect_max: float = 32.0  # ... doubling up to this, with jitter (a broker that is down: see link_retry_max)
    # How often a connecting socket (agents -> broker and manager, broker -> manager, clients -> broker) tries again
    # to reach a peer that is down: from a quarter of this (or reconnect_initial, if less) doubling up to this, plus
    # ZeroMQ's jitter (up to the first interval). Short, so that a restarted broker or manager has every agent back
    # within about this long whatever the outage lasted (a refused TCP connect costs nothing, and the jitter spreads
    # the agents); an agent sends READY the moment its connection is up (agent.py).
    link_retry_max: float = 1.0
    # A restarted broker asks the manager which agents are alive and holds requests for their models (within each
    # request's deadline) until they have registered again or are declared dead, at most this long after it started.
    rejoin_window: float = 10.0
    request_timeout: float = 30.0  # default deadline of an inference request
    query_timeout: float = 5.0  # deadline of an agents()/models() query
    max_dispatch_attempts: int = 3  # how often the broker re-dispatches a request whose agent died
    broker_queue_limit: int = 10_000  # requests the broker holds waiting for a free agent, past that: OVERLOADED
    max_queue_wait: float = 5.0  # load shedding: a request expected to wait longer in the broker's queue is refused
    # at once (OVERLOADED with retry_after); a model's config `max_queue_wait_ms` overrides it; 0 = no bound
    client_max_in_flight: int = 4096  # requests one client may have at the broker (queued or at agents): OVERLOADED
    client_reply_budget: int = 32 * 1024 * 1024  # bytes of replies the broker holds for a client that does not read
    # them (its pipe is full, CLIENT_SNDHWM); past it, its replies are dropped and its requests cancelled
    client_read_grace: float = 1.0  # a client whose pipe took none of its held replies for this long is not reading:
    # its new requests get OVERLOADED until it reads (a full pipe alone is often a reading client behind a burst)
    # A stalled agent (holds requests, makes no progress; frozen, or its inference stuck) stops getting new requests
    # long before it is declared dead: an agent whose oldest request here is older than max(stall_factor x that
    # model's recent p99 service time, stall_floor), and which answered nothing for that long, is skipped by routing
    # (it stays alive and keeps its requests) until it answers again. Not judged before a model's p99 is known.
    stall_factor: float = 4.0  # a healthy agent's oldest request is rarely older than ~2 x p99 (one batch running,
    # one filling); 4 x leaves room for jitter without waiting long
    stall_floor: float = 0.1  # never "stalled" sooner: scheduler and GC pauses on a loaded host reach tens of ms
    hedge_after: float = 0.0  # hedging: a request at one agent longer than this is also sent to another eligible
    # agent, the first answer wins (the other copy is cancelled); 0 = off (`cluster broker --hedge-after MS`)
    # A model call that never returns (a Python thread cannot be cancelled): past max(hang_factor x its request's
    # deadline, hang_min) seconds running, the agent stops taking work, says why (heartbeat `drain_reason`, log) and
    # exits with EXIT_HUNG for its supervisor to restart it (`cluster agent --hang-factor/--hang-min`); 0 = never.
    hang_factor: float = 2.0
    hang_min: float = 10.0  # a short deadline never makes a legitimately slow call "hung" sooner than this

    @property
    def expiry(self) -> float:
        """Seconds of silence after which a peer is declared dead."""
        return self.heartbeat_interval * self.liveness

    @property
    def pause_bound(self) -> float:
        """A loop pass longer than this is a stall of the process itself (RunClock): OWN_PAUSE_BOUND, or half a
        heartbeat interval if less, so that a stall always counts well before a peer would expire."""
        return min(OWN_PAUSE_BOUND, self.heartbeat_interval / 2)


_ENV_PREFIX = "CLUSTER_"


def timings_from_env(environ: dict[str, str] | None = None, **overrides) -> Timings:
    """Timings from CLUSTER_<FIELD> environment variables (e.g. CLUSTER_HEARTBEAT_INTERVAL=0.2), then overrides."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in fields(Timings):
        raw = environ.get(_ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = type(f.default)(float(raw))  # int fields accept "3" and "3.0"
    values.update({k: v for k, v in overrides.items() if v is not None})
    timings = replace(Timings(), **values)
    if timings.heartbeat_interval < 0.01:
        raise ValueError("heartbeat interval must be at least 10 ms")
    if timings.link_retry_max < 0.01 or timings.rejoin_window < 0:
        raise ValueError("link_retry_max must be at least 10 ms, rejoin_window >= 0")
    if timings.liveness < 1:
        raise ValueError("liveness must be at least 1")
    if timings.max_queue_wait < 0:
        raise ValueError("max_queue_wait must be >= 0 (0: no bound)")
    if timings.client_max_in_flight < 1 or timings.client_reply_budget < 0:
        raise ValueError("client_max_in_flight must be >= 1, client_reply_budget >= 0")
    if timings.stall_factor < 1 or timings.stall_floor <= 0 or timings.hedge_after < 0:
        raise ValueError("stall_factor must be >= 1, stall_floor > 0, hedge_after >= 0 (0: off)")
    if timings.hang_factor < 0 or timings.hang_min < 0:
        raise ValueError("hang_factor must be >= 0 (0: off), hang_min >= 0")
    if timings.broker_queue_limit < 0 or timings.max_dispatch_attempts < 1 or timings.request_timeout <= 0:
        raise ValueError("broker_queue_limit must be >= 0, max_dispatch_attempts >= 1, request_timeout > 0")
    return timings


@dataclass(frozen=True)
class RestartPolicy:
    """How `cluster up` restarts a role process that died (cluster/supervisor.py), as systemd's Restart=on-failure:
    a process that exits with a failure (non-zero status, or killed by a signal other than SIGTERM, SIGINT, SIGHUP,
    SIGPIPE) is restarted after a backoff; a clean exit is not. All in seconds."""

    backoff_initial: float = 0.5  # delay before the first restart; doubles with each failure in a row ...
    backoff_max: float = 10.0  # ... up to this
    backoff_reset: float = 10.0  # a process that stayed up this long before it died starts again at backoff_initial
    # each backoff_decay seconds a process stayed up takes one doubling back: a process that served between kills
    # restarts fast, one that dies within seconds of its start still backs off (and trips the crash-loop rule)
    backoff_decay: float = 2.0
    crash_window: float = 60.0  # a process restarted crash_restarts times within this window is in a crash loop:
    crash_restarts: int = 5  # its next failure is reported and it is not restarted again


def restart_policy_from_env(environ: dict[str, str] | None = None) -> RestartPolicy:
    """RestartPolicy from CLUSTER_RESTART_<FIELD> variables (e.g. CLUSTER_RESTART_BACKOFF_MAX=5)."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in fields(RestartPolicy):
        raw = environ.get(f"{_ENV_PREFIX}RESTART_{f.name.upper()}")
        if raw is not None:
            values[f.name] = type(f.default)(float(raw))
    policy = replace(RestartPolicy(), **values)
    if not 0 < policy.backoff_initial <= policy.backoff_max or policy.backoff_reset < 0 or policy.backoff_decay < 0:
        raise ValueError(
            "restart backoff: need 0 < backoff_initial <= backoff_max, backoff_reset >= 0 and backoff_decay >= 0"
        )
    if policy.crash_window <= 0 or policy.crash_restarts < 1:
        raise ValueError("crash loop: need crash_window > 0 and crash_restarts >= 1")
    return policy


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def up_torch_threads(agents: int, cores: int | None = None) -> int:
    """torch intra-op threads per agent for `cluster up` with `agents` agents on `cores` cores (default: this
    machine's): the cores shared out, at least 1, so one request at a time uses the machine without the agents
    oversubscribing it."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, agents))


def env_or(name: str, default: str) -> str:
    """An address or path from CLUSTER_<NAME>, else the default."""
    return os.environ.get(_ENV_PREFIX + name, default)


def default_share_dir() -> str:
    """Where `cluster up` keeps its local model share unless --share says otherwise (the user's data dir)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return env_or("SHARE", os.path.join(base, "cluster", "share"))


@dataclass(frozen=True)
class Addresses:
    """Where each component listens; one object so every CLI command and test passes the same set around."""

    broker_clients: str = field(default_factory=lambda: env_or("BROKER_CLIENTS", BROKER_CLIENT_ADDR))
    broker_agents: str = field(default_factory=lambda: env_or("BROKER_AGENTS", BROKER_AGENT_ADDR))
    manager_heartbeats: str = field(default_factory=lambda: env_or("MANAGER_HEARTBEATS", MANAGER_HEARTBEAT_ADDR))
    manager_events: str = field(default_factory=lambda: env_or("MANAGER_EVENTS", MANAGER_EVENTS_ADDR))
    manager_queries: str = field(default_factory=lambda: env_or("MANAGER_QUERIES", MANAGER_QUERY_ADDR))
