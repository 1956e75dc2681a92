"""Every address, timing and limit of the cluster, in one place.

The settings groups every role shares (Addresses, Timings, Limits, RestartPolicy) are settings classes
(cluster/settings.py): each field has its default, check, unit and help here, and its CLUSTER_<FIELD> variable by the
one rule, so a test (or an operator) can run the whole cluster with, say, 100 ms heartbeats without touching code.
Command-line options override both. The roles' own settings classes are in cluster/role_settings.py.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from typing import ClassVar

from cluster import settings
from cluster.settings import above, at_least, setting

# --- default addresses (loopback only unless told otherwise) ---------------------------------------------------
DEFAULT_HOST = "127.0.0.1"
BROKER_CLIENT_ADDR = f"tcp://{DEFAULT_HOST}:5555"  # clients (Client, AsyncClient, edge) connect here
BROKER_AGENT_ADDR = f"tcp://{DEFAULT_HOST}:5556"  # agents connect their DEALER here
MANAGER_HEARTBEAT_ADDR = f"tcp://{DEFAULT_HOST}:5557"  # agents PUB heartbeats here (manager binds SUB)
MANAGER_EVENTS_ADDR = f"tcp://{DEFAULT_HOST}:5558"  # manager PUBlishes registry changes here (broker SUBs)
MANAGER_QUERY_ADDR = f"tcp://{DEFAULT_HOST}:5559"  # manager answers agents/models queries here (ROUTER)
# Several brokers (active-active): broker_clients and broker_agents may name several, comma-separated
# ("tcp://b1:5555,tcp://b2:5555"); every client and agent connects to each (address_list)
ADDRESS_SEPARATOR = ","
# `cluster up --brokers N` from one broker address: broker i listens on its ports + i x this (5565 and 5566, ...)
UP_BROKER_PORT_STEP = 10
# A client's links to its brokers carry ZMTP heartbeats this often, and a broker silent this long is lost (a frozen
# or vanished machine that sends no TCP reset): what was outstanding there is sent to another broker at once
CLIENT_LINK_HEARTBEAT_S = 0.1
CLIENT_LINK_TIMEOUT_S = 0.3
# AsyncClient (loop.add_reader on its socket): answers read in one pass before other tasks get the loop, and how
# often a send that found no room (the pipe to a broker at its high-water mark) is tried again, besides every time
# the socket's FD wakes the loop (deadlines are looked at every ASYNC_CLIENT_TICK_S)
ASYNC_CLIENT_DRAIN_LIMIT = 256
ASYNC_CLIENT_SEND_RETRY_S = 0.005
ASYNC_CLIENT_TICK_S = 0.1
# A broker's own Prometheus metrics (cluster/broker/metrics.py): off by default (port 0), this machine only
BROKER_METRICS_HOST = DEFAULT_HOST
BROKER_METRICS_PORT = 0
EDGE_HOST = DEFAULT_HOST
EDGE_PORT = 8000
EDGE_GRPC_PORT = 8001  # the edge's OIP gRPC (Triton's and KServe's usual port)
# The edge watches for an HTTP client's disconnect (to cancel its request on the bus) from this long after the request
# went on the bus: most are answered sooner, and a watcher for every request cost a tenth of the edge's CPU (py-spy)
EDGE_DISCONNECT_WATCH_AFTER = 0.05  # seconds

# --- limits -------------------------------------------------------------------------------------------------------
# data sockets: the largest frame a peer may send (ZMQ_MAXMSGSIZE; larger: the peer is disconnected)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # the default; the limit in force: limits().max_message_bytes
MAX_CONTROL_BYTES = 1024 * 1024  # heartbeat and event sockets
# the manager's query socket: a model file sent to be published (`cluster deploy` without --share, a Triton load with
# files) travels in one message, so this is also the largest model that can be deployed that way
MAX_UPLOAD_BYTES = 256 * 1024 * 1024  # the default; the limit in force: limits().max_upload_bytes
MAX_HEADER_BYTES = 1024 * 1024  # a msgpack header larger than this is refused before decoding
MAX_TENSORS = 64  # tensors in one request or reply
MAX_DIMS = 16  # dimensions of one tensor
# A BYTES input's built-in image decode (config `decode`): the most pixels (width x height) one image may decode to,
# checked from its header before any pixel is decoded, so a decompression bomb is refused (a config may set less).
DECODE_MAX_PIXELS = 64 * 1024 * 1024
# ... and the most all the images of one forward pass may decode to together (a request, or a batch of them): each
# image under its limit, many small files that each inflate to DECODE_MAX_PIXELS would still take gigabytes.
DECODE_MAX_TOTAL_PIXELS = 4 * DECODE_MAX_PIXELS
# `cluster deploy --compile` (AOTInductor): the largest batch a package is compiled for when the config sets no
# max_batch_size, and how close its outputs must be to the exported program's on a sample (checked at compile time;
# inductor fuses and reorders float arithmetic, so equality is not expected).
COMPILE_MAX_BATCH = 1024
COMPILE_RTOL = 1e-3
COMPILE_ATOL = 1e-4
COMPILE_TIMEOUT_S = 1800.0  # the manager's compile of an upload (edge load route, `compile`), in a child process
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
STALE_PUBLISH_SECONDS = 3600.0  # the default; in force: limits().stale_publish_seconds
MODEL_COPY_CHUNK = 64 * 1024 * 1024  # bytes per sendfile() when an agent copies a model file into a sealed memfd
LOAD_THREADS = 2  # model versions an agent loads at once (at start and in rollouts): copying and hashing release the
# GIL, so a second model need not wait for the first (2 x 100 MB + digits: 0.46 -> 0.34 s)
SOCKET_HWM = 10_000  # ZeroMQ high-water mark per socket (messages); queues are bounded in the app too
LINGER_MS = 200  # how long a closing socket may flush
# The broker's pipe to each client holds at most this many replies (ZeroMQ SNDHWM, per peer): past it a send gives
# EAGAIN and the broker holds replies itself, within the client's byte budget (Timings.client_reply_budget).
CLIENT_SNDHWM = 64
# Replies to one client made in one pass of the broker's loop go as one BATCH of at most this many bytes (a larger
# reply alone), so that its pipe still holds at most CLIENT_SNDHWM x max(this, one reply) bytes (issue 23, item 2).
CLIENT_BATCH_BYTES = 64 * 1024
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
# Canary rollouts (cluster/canary/, `cluster deploy --canary`, `cluster canary`): the defaults of a run
CANARY_STEPS = (10, 50, 100)  # live weights in percent, one step after another; reaching 100 promotes the canary
CANARY_STEP_SECONDS = 30.0  # the least time a step runs before it may pass (it also needs Criteria.min_requests)
CANARY_FLOOR_SHARE = 0.25  # while mirroring, this share of the mirrored copies go to the stable version itself instead
# (the noise floor that drift is judged against: batching and hardware make a version differ from itself)
SHADOW_COMPARE_QUEUE = 256  # answer pairs waiting for the broker's comparison thread; past it a pair is not compared
SHADOW_COMPARE_BYTES = 64 * 1024 * 1024  # ... and their answers' bytes (one pair is always let in, however large)
CANARY_SHADOW_ONLY = 0.1  # the fraction a shadow-only run (`--shadow-only`) mirrors when it names none
CANARY_RUNS_KEPT = 20  # finished canary runs the manager keeps for `cluster rollouts` (in memory)
# An agent not connected to its broker warns in its log after this long, then again at doubling intervals up to the max
AGENT_LINK_WARN_MAX_S = 60.0


@dataclass(frozen=True)
class Timings:
    """Heartbeats, liveness and deadlines. All in seconds. Every role reads these (CLUSTER_<FIELD>)."""

    heartbeat_interval: float = setting(
        1.0,
        "Agents beat this often (to the manager and the broker).",
        unit="s",
        check=at_least(0.01),
        flag="--heartbeat-interval",
    )
    liveness: int = setting(
        3, "Missed heartbeats before a peer is dead.", unit="beats", check=at_least(1), flag="--liveness"
    )
    reconnect_initial: float = setting(
        1.0, "An agent whose broker is connected but silent sends READY again after this, doubling ...", unit="s"
    )
    reconnect_max: float = setting(32.0, "... up to this, with jitter.", unit="s")
    # How often a connecting socket (agents -> broker and manager, broker -> manager, clients -> broker) tries again
    # to reach a peer that is down: from a quarter of this (or reconnect_initial, if less) doubling up to this, plus
    # ZeroMQ's jitter (up to the first interval). Short, so that a restarted broker or manager has every agent back
    # within about this long whatever the outage lasted (a refused TCP connect costs nothing, and the jitter spreads
    # the agents); an agent sends READY the moment its connection is up (agent.py).
    link_retry_max: float = setting(
        1.0,
        "How often at most a connecting socket tries again a broker or manager that is down.",
        unit="s",
        check=at_least(0.01),
    )
    # A restarted broker asks the manager which agents are alive and holds requests for their models (within each
    # request's deadline) until they have registered again or are declared dead, at most this long after it started.
    rejoin_window: float = setting(
        10.0,
        "How long at most a restarted broker holds requests for agents the manager says are alive.",
        unit="s",
        check=at_least(0),
    )
    request_timeout: float = setting(
        30.0, "Default deadline of an inference request.", unit="s", check=above(0), flag="--request-timeout"
    )
    query_timeout: float = setting(5.0, "Deadline of an agents()/models() query.", unit="s")
    max_dispatch_attempts: int = setting(
        3, "How often the broker re-dispatches a request whose agent died.", check=at_least(1)
    )
    broker_queue_limit: int = setting(
        10_000,
        "Requests the broker holds waiting for a free agent; past that: OVERLOADED.",
        unit="requests",
        check=at_least(0),
    )
    max_queue_wait: float = setting(
        5.0,
        "Load shedding: refuse at once (OVERLOADED) a request expected to wait longer in the broker's queue "
        "(0: no bound; a model's config max_queue_wait_ms overrides it).",
        unit="s",
        check=at_least(0),
        flag="--max-queue-wait",
    )
    client_max_in_flight: int = setting(
        4096,
        "Requests one client may have at the broker (queued or at agents); past that: OVERLOADED.",
        unit="requests",
        check=at_least(1),
    )
    client_reply_budget: int = setting(
        32 * 1024 * 1024,
        "Bytes of replies the broker holds for a client that does not read them (then drops them "
        "and cancels its requests).",
        unit="bytes",
        check=at_least(0),
    )
    client_read_grace: float = setting(
        1.0,
        "A client whose pipe took none of its held replies for this long is not reading: OVERLOADED until it reads.",
        unit="s",
    )
    # A stalled agent (holds requests, makes no progress; frozen, or its inference stuck) stops getting new requests
    # long before it is declared dead: an agent whose oldest request here is older than max(stall_factor x that
    # model's recent p99 service time, stall_floor), and which answered nothing for that long, is skipped by routing
    # (it stays alive and keeps its requests) until it answers again. Not judged before a model's p99 is known.
    # A healthy agent's oldest request is rarely older than ~2 x p99 (one batch running, one filling); 4 x leaves room
    # for jitter without waiting long. The floor: scheduler and GC pauses on a loaded host reach tens of ms.
    stall_factor: float = setting(
        4.0,
        "An agent whose oldest request is older than this x the model's p99 (and stall_floor) is skipped.",
        unit="x p99",
        check=at_least(1),
    )
    stall_floor: float = setting(0.1, 'Never "stalled" sooner than this.', unit="s", check=above(0))
    hedge_after: float = setting(
        0.0,
        "Hedging: a request at one agent longer than this is also sent to another; the first answer wins (0: off).",
        unit="s",
        check=at_least(0),
        flag="--hedge-after",
    )
    # A model call that never returns (a Python thread cannot be cancelled): past max(hang_factor x its request's
    # deadline, hang_min) seconds running, the agent stops taking work, says why (heartbeat `drain_reason`, log) and
    # exits with EXIT_HUNG for its supervisor to restart it; 0 = never.
    hang_factor: float = setting(
        2.0,
        "A model call running longer than this x its request's deadline (and hang_min) is hung: the agent "
        "exits with status 4, to be restarted (0: never).",
        unit="x deadline",
        check=at_least(0),
        flag="--hang-factor",
    )
    hang_min: float = setting(10.0, "No call counts as hung sooner.", unit="s", check=at_least(0), flag="--hang-min")
    canary_digest_interval: float = setting(
        0.25,
        "While a canary runs, each broker sends the manager its per-version counts this often (the judge looks "
        "at each).",
        unit="s",
        check=at_least(0.01),
    )

    @property
    def expiry(self) -> float:
        """Seconds of silence after which a peer is declared dead."""
        return self.heartbeat_interval * self.liveness

    @property
    def pause_bound(self) -> float:
        """A loop pass longer than this is a stall of the process itself (RunClock): OWN_PAUSE_BOUND, or half a
        heartbeat interval if less, so that a stall always counts well before a peer would expire."""
        return min(OWN_PAUSE_BOUND, self.heartbeat_interval / 2)

    def problems(self) -> str | None:
        if self.hedge_after >= self.request_timeout:
            # most likely a value in ms: --hedge-after took ms before it took seconds like every other duration
            return (
                f"hedge_after={self.hedge_after:g} s is not under request_timeout={self.request_timeout:g} s, so no "
                "request would ever be hedged: it is in seconds (e.g. 0.05 for 50 ms)"
            )
        return None


def timings_from_env(environ: dict[str, str] | None = None, **overrides) -> Timings:
    """Timings from CLUSTER_<FIELD> environment variables (e.g. CLUSTER_HEARTBEAT_INTERVAL=0.2), then overrides."""
    return settings.load(Timings, environ, overrides)[0]


@dataclass(frozen=True)
class RestartPolicy:
    """How `cluster up` restarts a role process that died (cluster/supervisor.py), as systemd's Restart=on-failure:
    a process that exits with a failure (non-zero status, or killed by a signal other than SIGTERM, SIGINT, SIGHUP,
    SIGPIPE) is restarted after a backoff; a clean exit is not. All in seconds. Variables CLUSTER_RESTART_<FIELD>."""

    env_prefix: ClassVar[str] = "RESTART_"
    backoff_initial: float = setting(
        0.5,
        "`cluster up`: delay before a failed process's first restart; doubles with each failure in a row.",
        unit="s",
        check=above(0),
    )
    backoff_max: float = setting(10.0, "... up to this.", unit="s")
    backoff_reset: float = setting(
        10.0,
        "A process that stayed up this long before it died starts again at backoff_initial.",
        unit="s",
        check=at_least(0),
    )
    # a process that served between kills restarts fast, one that dies within seconds of its start still backs off
    # (and trips the crash-loop rule)
    backoff_decay: float = setting(
        2.0, "Each this many seconds a process stayed up takes one doubling back.", unit="s", check=at_least(0)
    )
    crash_window: float = setting(
        60.0,
        "A process restarted crash_restarts times within this window is in a crash loop (given up on).",
        unit="s",
        check=above(0),
    )
    crash_restarts: int = setting(5, "Restarts within crash_window that make a crash loop.", check=at_least(1))

    def problems(self) -> str | None:
        if self.backoff_initial > self.backoff_max:
            return "restart backoff: need 0 < backoff_initial <= backoff_max, backoff_reset >= 0 and backoff_decay >= 0"
        return None


def restart_policy_from_env(environ: dict[str, str] | None = None) -> RestartPolicy:
    """RestartPolicy from CLUSTER_RESTART_<FIELD> variables (e.g. CLUSTER_RESTART_BACKOFF_MAX=5)."""
    return settings.from_env(RestartPolicy, environ)


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


def default_share_dir() -> str:
    """Where a share is kept unless --share (CLUSTER_SHARE) says otherwise: the user's data dir (XDG_DATA_HOME)."""
    base = settings.xdg_dir("XDG_DATA_HOME", ".local/share")
    return os.path.join(base, "cluster", "share")


@dataclass(frozen=True)
class Addresses:
    """Where each component listens; one object so every CLI command and test passes the same set around."""

    broker_clients: str = setting(
        BROKER_CLIENT_ADDR,
        "Broker address for clients (several brokers: comma-separated, a client connects to each).",
        flag="--broker-clients",
    )
    broker_agents: str = setting(
        BROKER_AGENT_ADDR,
        "Broker address for agents (several brokers: comma-separated, an agent registers with each).",
        flag="--broker-agents",
    )
    manager_heartbeats: str = setting(
        MANAGER_HEARTBEAT_ADDR,
        "Manager heartbeat address (agents publish heartbeats, brokers their reports).",
        flag="--manager-heartbeats",
    )
    manager_events: str = setting(
        MANAGER_EVENTS_ADDR, "Manager registry-event address (the broker subscribes).", flag="--manager-events"
    )
    manager_queries: str = setting(MANAGER_QUERY_ADDR, "Manager query address.", flag="--manager-queries")


@dataclass(frozen=True)
class Limits:
    """Sizes every process of the cluster agrees on (read from the environment once, on first use: `limits()`)."""

    max_message_bytes: int = setting(
        MAX_MESSAGE_BYTES,
        "Largest frame on data sockets (a larger one disconnects the peer).",
        unit="bytes",
        check=above(0),
    )
    max_upload_bytes: int = setting(
        MAX_UPLOAD_BYTES,
        "Largest model file `cluster deploy` sends over the bus (manager's query socket).",
        unit="bytes",
        check=above(0),
    )
    stale_publish_seconds: float = setting(
        STALE_PUBLISH_SECONDS,
        "A publish's temporary folder untouched this long was left by a killed publisher: removed.",
        unit="s",
        check=at_least(0),
    )


def address_list(addresses: str) -> list[str]:
    """The addresses in a setting that may name several ("tcp://b1:5555,tcp://b2:5555"), in order, without blanks
    or repeats; ValueError if it names none."""
    out: list[str] = []
    for part in addresses.split(ADDRESS_SEPARATOR):
        part = part.strip()
        if part and part not in out:
            out.append(part)
    if not out:
        raise ValueError(f"no address in {addresses!r}")
    return out


def default_broker_name(address: str) -> str:
    """A broker's name when --name does not give one: this host and the port of its clients' address (unique among
    the brokers of a cluster, stable across its restarts)."""
    port = address.rsplit(":", 1)[-1] if address.startswith("tcp://") else address.rsplit("/", 1)[-1]
    return f"{socket.gethostname()}:{port}"


def default_address(name: str = "broker_clients") -> str:
    """The address a client made without one uses: CLUSTER_BROKER_CLIENTS (or the variable of `name`), else the
    default."""
    return getattr(settings.from_env(Addresses), name)


@functools.cache
def limits() -> Limits:
    """This process's Limits (CLUSTER_MAX_MESSAGE_BYTES ...), read once, when first needed (not at import)."""
    return settings.from_env(Limits)
