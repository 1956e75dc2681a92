"""The broker's intake of client messages (a mixin of `Broker`, in its own module to keep each under its size limit).

`process_client` reads what a client sent: a probe goes to `hello`; a REQUEST with a head (the hot path) is routed by
its head alone (`accept_head`: protocol.parse_request_head, a struct unpack; its msgpack header is forwarded as
received, never decoded, and read only if a log line about it needs its request_id); a REQUEST with the bare
preamble (an older or hand-written client) by its header (`accept_request`: Request.from_wire); a QUERY goes to
`answer_query`, a CANCEL to the Dispatcher; a BATCH (an AsyncClient's requests of one loop step) is split and each
message handled as if alone. Anything malformed: BAD_REQUEST to that client, never a crash. Keys on:
every message is checked against the allow-list before anything else is judged."""

from __future__ import annotations

import logging
import time

from cluster import protocol
from cluster.auth import key_of, refusal
from cluster.broker.agents import TRACE_IN_HEADER
from cluster.logs import BadInputLog
from cluster.protocol import (
    Cancel,
    Command,
    ErrorCode,
    ProtocolError,
    Request,
    as_bytes,
    has_request_head,
    is_batch,
    message_id,
    parse_request_head,
    unbatch,
)
from cluster.sockets import handle_each

log = logging.getLogger("cluster.broker")
bad_input = BadInputLog(log)
# peers control these messages: never log them at their rate


class ClientIntake:
    """Methods of the Broker (they use its allow-list, dispatcher, outbox, timings and sends)."""

    def process_client(self, frames: list) -> int | None:
        client = as_bytes(frames[0])
        if len(frames) >= 3:
            first = as_bytes(frames[1])
            if has_request_head(first):  # the hot path: a REQUEST routed by its head, its header never decoded
                self.accept_head(client, first, frames)
                return
            if is_batch(first):  # an AsyncClient's requests of one loop step: each as if alone
                return self.process_client_batch(client, frames)
        elif len(frames) == 2 and not len(frames[1]):
            self.hello(client)  # a probe: one empty frame (ZMQ_PROBE_ROUTER on connecting, or a client's check)
            return
        request_id = None
        try:
            if len(frames) < 3:
                raise ProtocolError("message too short: expected preamble and header")
            cmd = protocol.parse_preamble(frames[1])
            header = protocol.unpack_header(frames[2])
            request_id = message_id(header)
            if request_id is None:
                raise ProtocolError("header field 'id' must be an int or a string")
            if self.allow is not None:
                refused = refusal(self.allow, key_of(frames[1]), "query" if cmd == Command.QUERY else "infer")
                if refused is not None:
                    bad_input.warning("refused a %s from client %s: %s", cmd.name, client.hex(), refused[1])
                    self.send_client_error(client, request_id, *refused)
                    return
            if cmd == Command.REQUEST:
                self.accept_request(client, request_id, header, frames[2], frames[3:])
            elif cmd == Command.QUERY:
                self.answer_query(client, request_id, header)
            elif cmd == Command.CANCEL:
                cancel = Cancel.from_wire(header)
                self.deliver(self.dispatcher.client_cancel(client, cancel.id, time.monotonic()))
            else:
                raise ProtocolError(f"clients may not send {cmd.name}")
        except ProtocolError as exc:
            bad_input.warning("bad message from client %s: %s", client.hex(), exc)
            self.send_client_error(client, request_id, ErrorCode.BAD_REQUEST, str(exc))

    def process_client_batch(self, client: bytes, frames: list) -> int | None:
        """A client's BATCH: each message in it handled as if it came alone (a BATCH malformed as a whole:
        BAD_REQUEST without an id, as for any message whose id cannot be read). Keys on: a key refused is told so
        before the BATCH is judged; each message in it is checked again, as any message."""
        if self.allow is not None:
            refused = refusal(self.allow, key_of(frames[1]), "infer")
            if refused is not None:
                bad_input.warning("refused a BATCH from client %s: %s", client.hex(), refused[1])
                self.send_client_error(client, None, *refused)
                return
        try:
            messages = unbatch(frames, 1)
        except ProtocolError as exc:
            bad_input.warning("bad message from client %s: %s", client.hex(), exc)
            self.send_client_error(client, None, ErrorCode.BAD_REQUEST, str(exc))
            return
        handle_each(messages, self.process_client, log)
        return len(messages)

    def accept_head(self, client: bytes, head: bytes, frames: list) -> None:
        """A client's REQUEST with a head (frames: [client, preamble + head, header, *tensors]): routed by the head
        alone (protocol.parse_request_head: BAD_REQUEST naming the field); its header frame is forwarded as received,
        and read only if a log line about it needs its request_id."""
        if self.allow is not None:  # keys on: refused before anything else is judged, as a REQUEST without a head
            refused = refusal(self.allow, key_of(frames[1]), "infer")
            if refused is not None:
                bad_input.warning("refused a REQUEST from client %s: %s", client.hex(), refused[1])
                self.send_client_error(client, protocol.request_head_id(head), *refused)
                return
        try:
            request_id, model, version, timeout, attempt = parse_request_head(head)
        except ProtocolError as exc:
            bad_input.warning("bad message from client %s: %s", client.hex(), exc)
            self.send_client_error(client, protocol.request_head_id(head), ErrorCode.BAD_REQUEST, str(exc))
            return
        self.route_request(client, request_id, model, version, timeout, frames[2], frames[3:], TRACE_IN_HEADER, attempt)

    def accept_request(self, client: bytes, request_id, header: dict, header_frame, tensors: list) -> None:
        """A client's REQUEST: routed by the fields Request.from_wire checks; its header frame is forwarded as is."""
        request = Request.from_wire(header)
        self.route_request(
            client,
            request_id,
            request.model,
            request.version,
            request.timeout,
            header_frame,
            tensors,
            request.request_id,
            request.attempt,
        )

    def route_request(
        self, client: bytes, request_id, model: str, version, timeout, header_frame, tensors: list, trace, attempt: int
    ) -> None:
        """A checked REQUEST (head or header) to the dispatcher; timeout None: the broker's default."""
        now = time.monotonic()
        self.deliver(
            self.dispatcher.client_request(
                client,
                request_id,
                model,
                version,
                self.timings.request_timeout if timeout is None else timeout,
                header_frame,
                tensors,
                now,
                congested=self.outbox.stalled(client, now),
                trace=trace,
                attempt=attempt,
            )
        )
