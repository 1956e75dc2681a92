"""What the Dispatcher hands the broker's socket loop: `Send` (one message, to an agent or a client), the errors it
makes up for clients, and the one thing it reads of an agent's answer."""

from __future__ import annotations

from typing import NamedTuple

from cluster import protocol
from cluster.protocol import PREAMBLE, Command, Error, ErrorCode, ProtocolError, error_header, pack


class Send(NamedTuple):
    """One message for the broker to send: `frames` start with the peer's ROUTER identity; `to_agent` picks the
    agents' socket, else the clients'."""

    to_agent: bool
    frames: list

    @property
    def peer(self) -> bytes:
        return self.frames[0]

    @property
    def command(self) -> Command:
        return protocol.parse_routed(self.frames[1])[0]


def client_error(
    client: bytes, request_id, code: ErrorCode, text: str, model: str | None = None, retry_after: float | None = None
) -> Send:
    header = error_header(request_id, code, text, model, retry_after)
    return Send(False, [client, PREAMBLE[Command.ERROR], pack(header)])


def error_code(header_frame) -> ErrorCode | str | None:
    """The code of an agent's ERROR header: MODEL_NOT_FOUND (it unloaded the version since its last beat) and BUSY
    (no free slot: its share changed under the broker) change what the broker does; None if unreadable."""
    try:
        return Error.from_wire(protocol.unpack_header(header_frame)).code
    except ProtocolError:
        return None
