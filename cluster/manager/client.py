"""A small blocking client for the manager's query socket: what `cluster deploy`, `models` and the tests use."""

from __future__ import annotations

import itertools
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from cluster import protocol
from cluster.auth import HANDSHAKE_EVENTS, BusSecurity, HandshakeVerdict
from cluster.config import default_address
from cluster.errors import AuthenticationError, ClusterError, InferenceTimeoutError, error_from_header
from cluster.protocol import Answer, Command, ProtocolError, Query


class ManagerClient:
    """key: a member's key file (`cluster keys add`), when the cluster runs with keys; None: in the clear."""

    def __init__(self, address: str | None = None, key: str | None = None) -> None:
        self.address = address or default_address("manager_queries")
        self.security = BusSecurity.load(key)
        self._ids = itertools.count(1)

    def call(self, what: str, timeout: float = 5.0, data: bytes | list | None = None, **fields):
        """Send QUERY {what, **fields} (+ `data`, a model file for 'publish', or a list: the model file, then the
        files `programs` names); the result, or the ClusterError the
        manager answered. One socket per call: these are rare, slow operations, and a fresh socket cannot receive a
        stale answer."""
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.security is not None:
            self.security.client().apply(sock)
        monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
        sock.connect(self.address)
        try:
            request_id = next(self._ids)
            frames = protocol.message(Command.QUERY, Query(request_id, what, fields).to_wire())
            extra = [] if data is None else list(data) if isinstance(data, list) else [data]
            sock.send_multipart([*frames, *extra], copy=data is None)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            handshakes = HandshakeVerdict("manager")
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                ready = dict(poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
                if sock in ready:
                    break
                if monitor not in ready:
                    raise InferenceTimeoutError(
                        f"the manager at {self.address} did not answer '{what}' within {timeout:g} s (is it running?)"
                    )
                why = handshakes.on_event(recv_monitor_message(monitor)["event"])
                if why is not None:  # the key refused, or one side runs with keys and the other not
                    raise AuthenticationError(
                        f"{why} (manager {self.address})"
                        + ("" if self.security else "; it runs with keys: give --key or CLUSTER_KEY")
                    )
            frames = sock.recv_multipart()
            try:
                cmd = protocol.parse_preamble(frames[0])
                answer = protocol.unpack_header(frames[1])
            except (ProtocolError, IndexError) as exc:
                raise ClusterError(f"malformed answer from the manager: {exc}") from None
            if cmd == Command.ERROR:
                raise error_from_header(answer)
            return Answer.from_wire(answer).result
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close()


class AsyncManagerClient:
    """ManagerClient for asyncio (the edge's repository routes): each call runs the blocking one in a worker thread.
    Calls are rare and each waits on a socket of its own, so a thread each is the simple, honest adapter."""

    def __init__(self, address: str | None = None, key: str | None = None) -> None:
        self._client = ManagerClient(address, key)
        self.address = self._client.address

    async def call(self, what: str, timeout: float = 5.0, data: bytes | list | None = None, **fields):
        import asyncio  # here, not at the top: `cluster deploy` and the other commands use only ManagerClient

        return await asyncio.to_thread(self._client.call, what, timeout, data, **fields)
