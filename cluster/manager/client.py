"""A small blocking client for the manager's query socket: what `cluster deploy`, `models` and the tests use."""

from __future__ import annotations

import itertools

import zmq

from cluster import protocol
from cluster.config import MANAGER_QUERY_ADDR, env_or
from cluster.errors import ClusterError, InferenceTimeoutError, error_from_header
from cluster.protocol import Command, ProtocolError


class ManagerClient:
    def __init__(self, address: str | None = None) -> None:
        self.address = address or env_or("MANAGER_QUERIES", MANAGER_QUERY_ADDR)
        self._ids = itertools.count(1)

    def call(self, what: str, timeout: float = 5.0, **fields):
        """Send QUERY {what, **fields}; the result, or the ClusterError the manager answered. One socket per call:
        these are rare, slow operations, and a fresh socket cannot receive a stale answer."""
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        try:
            request_id = next(self._ids)
            header = {"id": request_id, "what": what, **{k: v for k, v in fields.items() if v is not None}}
            sock.send_multipart(protocol.message(Command.QUERY, header))
            if not sock.poll(int(timeout * 1000)):
                raise InferenceTimeoutError(
                    f"the manager at {self.address} did not answer '{what}' within {timeout:g} s (is it running?)"
                )
            frames = sock.recv_multipart()
            try:
                cmd = protocol.parse_preamble(frames[0])
                answer = protocol.unpack_header(frames[1])
            except (ProtocolError, IndexError) as exc:
                raise ClusterError(f"malformed answer from the manager: {exc}") from None
            if cmd == Command.ERROR:
                raise error_from_header(answer)
            return answer.get("result")
        finally:
            sock.close()
