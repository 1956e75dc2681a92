"""protocol.batch / unbatch: several messages in one BATCH, and the malformed ones refused."""

import pytest

from cluster.client_core import ClientCore
from cluster.protocol import MAX_BATCH, PREAMBLE, Command, ProtocolError, batch, unbatch


def _messages(n):
    return [[PREAMBLE[Command.REPLY] + bytes([i]) * 16, b"header%d" % i, b"t" * i] for i in range(n)]


def test_batch_round_trip_keeps_each_message_and_puts_the_identity_in_front():
    messages = _messages(3)
    frames = [b"peer", *batch(messages)]
    assert unbatch(frames, 1) == [[b"peer", *m] for m in messages]
    assert unbatch(batch(messages)) == messages


@pytest.mark.parametrize(
    "frames, why",
    [
        ([PREAMBLE[Command.BATCH]], "bad BATCH preamble"),  # no counts
        ([PREAMBLE[Command.BATCH] + b"\x00", b"a"], "bad BATCH preamble"),  # odd count bytes
        ([PREAMBLE[Command.BATCH] + b"\x00\x03", b"a", b"b"], "do not match"),  # counts past the frames
        ([PREAMBLE[Command.BATCH] + b"\x00\x01", b"a"], "do not match"),  # a message of one frame
        ([PREAMBLE[Command.BATCH] + b"\x00\x02", b"a", b"b", b"c"], "after the BATCH"),
        ([PREAMBLE[Command.BATCH] + b"\x00\x02" * (MAX_BATCH + 1)] + [b"x"] * (2 * MAX_BATCH + 2), "over the limit"),
        ([PREAMBLE[Command.BATCH] + b"\x00\x02", PREAMBLE[Command.BATCH] + b"\x00\x01", b"x"], "inside a BATCH"),
        ([PREAMBLE[Command.REPLY] + b"\x00\x02", b"a", b"b"], "bad BATCH preamble"),
    ],
)
def test_a_malformed_batch_is_refused(frames, why):
    with pytest.raises(ProtocolError, match=why):
        unbatch(frames)


def test_batch_refuses_none_and_too_many():
    with pytest.raises(ValueError):
        batch([])
    with pytest.raises(ValueError):
        batch(_messages(MAX_BATCH + 1))


def test_the_client_reads_a_batch_as_its_messages_and_drops_a_malformed_one():
    messages = _messages(2)
    assert ClientCore.messages([b"broker", *batch(messages)]) == [[b"broker", *m] for m in messages]
    assert ClientCore.messages([b"broker", *messages[0]]) == [[b"broker", *messages[0]]]
    assert ClientCore.messages([b"broker", PREAMBLE[Command.BATCH] + b"\x00\x05", b"x"]) == []
