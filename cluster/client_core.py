"""The client's sans-IO part: `ClientCore` encodes requests, matches answers to calls and notices deadlines;
`Call` is one request waiting, `InferResult` one answer. `Client` (client.py) and `AsyncClient` (async_client.py)
are thin adapters over it that own the socket (pyzmq's zmq/auth layout)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from cluster import protocol
from cluster.auth import BusSecurity, HandshakeVerdict
from cluster.codec import decode_tensors, encode_tensors
from cluster.config import Timings, limits
from cluster.errors import (
    AuthenticationError,
    BadRequestError,
    ClusterError,
    InferenceTimeoutError,
    error_from_header,
)
from cluster.protocol import Command, ProtocolError
from cluster.role_settings import ClientSettings
from cluster.settings import from_env
from cluster.sockets import make_socket

DEADLINE_GRACE = 2.0  # the broker answers TIMEOUT at the deadline; the client gives up on its own a little later


@dataclass
class InferResult:
    """The answer to one inference request."""

    model: str
    version: int
    agent: str  # id of the agent that served it
    outputs: dict[str, np.ndarray]  # read-only views over the received bytes
    id: Any = None
    batch_size: int | None = None  # requests in the forward pass that served this one (dynamic batching)
    queue_seconds: float | None = None  # how long it waited in the agent for a worker or a batch

    def as_numpy(self, name: str) -> np.ndarray:
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(f"no output {name!r}; outputs are {sorted(self.outputs)}") from None


@dataclass(eq=False)
class Call:
    """One request waiting for its answer."""

    request_id: int
    message: protocol.Request | protocol.Query
    tensors: list
    deadline: float  # monotonic
    future: Any  # concurrent.futures.Future or asyncio.Future
    model: str | None = None

    @property
    def command(self) -> Command:
        return Command.REQUEST if isinstance(self.message, protocol.Request) else Command.QUERY

    def frames(self) -> list:
        """The message, with the timeout brought down to what is left of the deadline (matters on a resend)."""
        if isinstance(self.message, protocol.Request):
            self.message.timeout = max(0.001, self.deadline - DEADLINE_GRACE - time.monotonic())
            return protocol.message(Command.REQUEST, self.message.to_wire(), self.tensors)
        return protocol.message(Command.QUERY, self.message.to_wire())


class ClientCore:
    """Everything a client does except I/O."""

    def __init__(self, timeout: float, address: str = "", keyed: bool = False) -> None:
        self.timeout = timeout
        self.calls: dict[int, Call] = {}
        self._ids = itertools.count(1)
        self.address = address
        self.keyed = keyed  # this client presents a key
        self.refused: AuthenticationError | None = None  # the last handshake failed: calls fail at once
        self._handshakes = HandshakeVerdict("broker")

    @classmethod
    def for_client(cls, address: str | None, timeout: float | None, keyed: bool) -> ClientCore:
        """The core of a Client or AsyncClient: the address and timeout given, else CLUSTER_BROKER_CLIENTS and
        CLUSTER_REQUEST_TIMEOUT (ClientSettings, read once), else their defaults."""
        if not address or timeout is None:
            defaults = from_env(ClientSettings)
            address = address or defaults.addresses.broker_clients
            timeout = defaults.timings.request_timeout if timeout is None else timeout
        return cls(timeout, address, keyed)

    def on_handshake(self, event: int) -> list[tuple[Call, ClusterError]]:
        """A monitor event. A conclusive handshake failure fails every waiting call (and, until a handshake succeeds,
        every new one) with AuthenticationError; a successful one clears that."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.refused = None
        why = self._handshakes.on_event(event)
        if why is None:
            return []
        if not self.keyed:
            why += "; it runs with keys: pass key= (a key file from `cluster keys add`)"
        self.refused = AuthenticationError(f"{why} (broker {self.address})")
        failed = [(call, self.refused) for call in self.calls.values()]
        self.calls.clear()
        return failed

    def infer_call(
        self, model: str, inputs: Mapping[str, Any], version, timeout, outputs, future, request_id: str | None = None
    ) -> Call:
        if not isinstance(model, str) or not model:
            raise BadRequestError("model must be a non-empty string")
        if not isinstance(inputs, Mapping) or not inputs:
            raise BadRequestError("inputs must be a non-empty mapping of name -> array or tensor")
        try:
            metas, tensors = encode_tensors(inputs)
        except (ValueError, TypeError) as exc:
            raise BadRequestError(f"inputs cannot be sent: {exc}", model) from None
        size = sum(len(t) for t in tensors)
        if size > limits().max_message_bytes:
            limit = limits().max_message_bytes
            raise BadRequestError(f"request of {size} bytes is over the bus limit of {limit} bytes", model)
        timeout = self.timeout if timeout is None else float(timeout)
        request = protocol.Request(
            next(self._ids),
            model,
            metas,
            timeout,
            None if version is None else int(version),
            None if outputs is None else list(outputs),
            None
            if request_id is None
            else str(request_id),  # the caller's name for it, in the broker's and agent's logs
        )
        call = Call(request.id, request, tensors, time.monotonic() + timeout + DEADLINE_GRACE, future, model)
        self.calls[call.request_id] = call
        return call

    def query_call(self, what: protocol.What, timeout, future, **fields) -> Call:
        timeout = Timings().query_timeout if timeout is None else float(timeout)
        query = protocol.Query(next(self._ids), protocol.What(what), fields)
        call = Call(query.id, query, [], time.monotonic() + timeout, future)
        self.calls[call.request_id] = call
        return call

    def on_message(self, frames: list) -> tuple[Call | None, Any]:
        """Match an answer to its call: (call, InferResult | query result | ClusterError). (None, None) if unknown."""
        try:
            cmd = protocol.parse_preamble(frames[0])
            header = protocol.unpack_header(frames[1])
        except (ProtocolError, IndexError):
            return None, None
        call = self.calls.pop(header.get("id"), None) if isinstance(header.get("id"), int) else None
        if call is None:
            return None, None  # a late or duplicate answer
        if cmd == Command.ERROR:
            return call, error_from_header(header)
        if "result" in header:
            return call, protocol.Answer.from_wire(header).result
        try:
            reply = protocol.Reply.from_wire(header, frames[2:])
            queue_us = reply.queue_us
            return call, InferResult(
                reply.model,
                reply.version,
                reply.agent,
                decode_tensors(reply.outputs, frames[2:]),
                call.request_id,
                reply.batch_size,
                None if queue_us is None else queue_us / 1e6,
            )
        except ProtocolError as exc:
            return call, ClusterError(f"malformed answer from the cluster: {exc}", call.model)

    def expired(self, now: float) -> list[tuple[Call, ClusterError]]:
        out = []
        for call in [c for c in self.calls.values() if c.deadline < now]:
            del self.calls[call.request_id]
            what = f"model '{call.model}'" if call.model else "query"
            out.append(
                (
                    call,
                    InferenceTimeoutError(
                        f"{what}: no answer from the broker within the deadline (is it running?)", call.model
                    ),
                )
            )
        return out

    def cancel(self, call: Call) -> None:
        self.calls.pop(call.request_id, None)

    def cancel_message(self, call: Call) -> list | None:
        """The caller gave up on `call`: forget it, and the CANCEL frames that tell the broker (None if the call was
        not waiting any more, or is a query: nothing to cancel)."""
        if self.calls.pop(call.request_id, None) is None or call.command != Command.REQUEST:
            return None
        return protocol.message(Command.CANCEL, protocol.Cancel(call.request_id).to_wire())


# Clients reconnect fast (a restarted broker is one, not hundreds of agents) and may queue many requests.
CLIENT_TIMINGS = Timings(reconnect_initial=0.1, reconnect_max=2.0)


def make_dealer(ctx: zmq.Context, address: str, security: BusSecurity | None, events: int) -> tuple:
    """The client's DEALER and its monitor socket (attached before connecting: the first handshake's outcome counts,
    a refused key most of all)."""
    curve = security.client() if security is not None else None
    monitors = []
    sock = make_socket(
        ctx,
        zmq.DEALER,
        connect=address,
        hwm=100_000,
        linger=0,
        timings=CLIENT_TIMINGS,
        curve=curve,
        before_connect=lambda s: monitors.append(s.get_monitor_socket(events)),
    )
    return sock, monitors[0]


def resolve_all(done) -> None:
    for future, outcome in done:
        resolve(future, outcome)


def resolve(future, outcome) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
