"""Stream state machines: one namespace streamed from a draining node to a successor.

Sans-IO like the handshake (the model is h11's ``_state.py``): the engine keeps the records,
these objects keep each stream's state, sequence numbers and credit, and refuse every
transition the table does not allow. Both ends run the same table; each end checks that a
message travels in the right direction (``SENT_BY``).

A stream::

    sender                         receiver
    Offer           ------------>  (offered)
                    <------------  Accept(credit) | Refuse(reason)
    Chunk(seq 0..)  ------------>  applied, then
                    <------------  Ack(seq, outcome, credit)
    End(records)    ------------>  (ended)

Either end may stop an open stream: the sender with ``Cancel`` (deadline, a stalled
receiver), the receiver with ``Refuse`` (it started draining: "withdrawn"; the sender takes
back what is not acknowledged and re-routes it). A receiver answers a Cancel of an open
stream with ``Closed``: the Acks of every chunk it applied precede it on the wire, and
nothing is applied after it. Until then the sender is ``cancelling``: Acks still count, so
it learns exactly which chunks were applied (state that moves exactly once waits for that
answer before it goes anywhere else). Messages crossing such a stop on the wire are late,
not errors: a finished stream absorbs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from handoff._errors import HandoffError, LocalProtocolError, ProtocolError

from ._messages import (
    MAX_CREDIT,
    Accept,
    Ack,
    Cancel,
    Chunk,
    Closed,
    End,
    Message,
    Offer,
    Refuse,
)

__all__ = (
    "SENT_BY",
    "STREAM_TRANSITIONS",
    "InboundStream",
    "OutboundStream",
    "Side",
    "StreamState",
)


class StreamState(Enum):
    """Where one stream is, as either end sees it."""

    OFFERED = "offered"
    OPEN = "open"
    ENDED = "ended"
    """The sender said End: every chunk was sent (and, on the sender, acknowledged)."""
    REFUSED = "refused"
    """The receiver refused the offer, or withdrew from an open stream."""
    CANCELLING = "cancelling"
    """The sender cancelled the open stream and waits for the receiver's Closed."""
    CANCELLED = "cancelled"
    FAILED = "failed"
    """Ended locally: the link went down, a time limit passed, a send failed."""

    @property
    def finished(self) -> bool:
        """True once nothing more happens on the stream."""
        return self not in (StreamState.OFFERED, StreamState.OPEN, StreamState.CANCELLING)


class Side(Enum):
    """The end of a stream."""

    SENDER = "sender"
    RECEIVER = "receiver"


SENT_BY: dict[type[Message], Side] = {
    Offer: Side.SENDER,
    Chunk: Side.SENDER,
    End: Side.SENDER,
    Cancel: Side.SENDER,
    Accept: Side.RECEIVER,
    Refuse: Side.RECEIVER,
    Ack: Side.RECEIVER,
    Closed: Side.RECEIVER,
}

_S = StreamState

# The one table, for both ends: (state, message type) -> next state. Offer creates a stream
# (in OFFERED), so it appears in no row. A message missing from the row of an unfinished
# state is a protocol error; in a finished state every message is late and ignored. A
# Cancel of an open stream leaves both ends CANCELLING: the receiver answers at once with
# Closed, the sender counts the Acks that precede it.
STREAM_TRANSITIONS: dict[StreamState, dict[type[Message], StreamState]] = {
    _S.OFFERED: {Accept: _S.OPEN, Refuse: _S.REFUSED, Cancel: _S.CANCELLED},
    _S.OPEN: {
        Chunk: _S.OPEN,
        Ack: _S.OPEN,
        End: _S.ENDED,
        Refuse: _S.REFUSED,
        Cancel: _S.CANCELLING,
    },
    _S.CANCELLING: {Ack: _S.CANCELLING, Closed: _S.CANCELLED, Refuse: _S.REFUSED},
}


@dataclass(slots=True)
class _Machine:
    stream: int
    side: Side
    state: StreamState = StreamState.OFFERED
    credit: int = 0
    """Chunks the sender may still send before the next acknowledgement."""
    next_seq: int = 0
    """Sequence number of the next chunk."""
    unacked: dict[int, int] = field(default_factory=dict)
    """Chunks sent (or received) and not yet acknowledged: seq -> records."""
    records: int = 0
    """Records in chunks sent (or received) so far."""
    reason: str = ""
    """Why the stream was refused, cancelled or failed."""

    def _step(self, message: Message, *, incoming: bool) -> bool:
        """Check direction and table; move to the next state. False: a late message."""
        sender = SENT_BY.get(type(message))
        if sender is None:
            raise LocalProtocolError(f"{type(message).__name__} is not a stream message")
        expected_from = self.side if not incoming else _other(self.side)
        if sender is not expected_from:
            error = ProtocolError if incoming else LocalProtocolError
            raise error(
                f"stream {self.stream}: {type(message).__name__} travels from the "
                f"{sender.value}, not the {expected_from.value}"
            )
        if self.state.finished:
            if incoming:
                return False
            raise LocalProtocolError(
                f"stream {self.stream} is {self.state.value}: cannot send {type(message).__name__}"
            )
        next_state = STREAM_TRANSITIONS[self.state].get(type(message))
        if next_state is None:
            error = ProtocolError if incoming else LocalProtocolError
            raise error(
                f"stream {self.stream}: {type(message).__name__} is not allowed while "
                f"{self.state.value}"
            )
        self.state = next_state
        if isinstance(message, Refuse | Cancel):
            self.reason = message.reason
        return True

    def fail(self, reason: str) -> bool:
        """End the stream locally (link lost, time limit). False if already finished."""
        if self.state.finished:
            return False
        self.state, self.reason = StreamState.FAILED, reason
        return True


def _other(side: Side) -> Side:
    return Side.RECEIVER if side is Side.SENDER else Side.SENDER


def _check_credit(
    stream: int, credit: int, unacked: int, error: type[HandoffError] = ProtocolError
) -> None:
    if credit + unacked > MAX_CREDIT:
        raise error(f"stream {stream}: credit beyond {MAX_CREDIT} chunks")


class OutboundStream(_Machine):
    """The sender's end of one stream."""

    def __init__(self, stream: int) -> None:
        _Machine.__init__(self, stream, Side.SENDER)
        self.offered = False

    def send(self, message: Message) -> None:
        """Record that ``message`` is being sent; raises :class:`LocalProtocolError` if the
        stream does not allow it (a chunk without credit or out of sequence)."""
        if isinstance(message, Offer):
            # The state alone cannot tell: a stream is OFFERED from its creation on.
            if self.offered or self.state is not StreamState.OFFERED:
                raise LocalProtocolError(f"stream {self.stream} was already offered")
            self.offered = True
        if isinstance(message, Chunk):
            if self.state is StreamState.OPEN and self.credit <= 0:
                raise LocalProtocolError(f"stream {self.stream}: no credit for a chunk")
            if message.seq != self.next_seq:
                raise LocalProtocolError(
                    f"stream {self.stream}: chunk {message.seq} out of order "
                    f"(next is {self.next_seq})"
                )
        if isinstance(message, End) and self.unacked:
            raise LocalProtocolError(f"stream {self.stream}: End before every Ack")
        if not isinstance(message, Offer):
            self._step(message, incoming=False)
        if isinstance(message, Chunk):
            self.credit -= 1
            self.next_seq += 1
            self.unacked[message.seq] = message.records
            self.records += message.records

    def receive(self, message: Message) -> bool:
        """Apply an Accept, Refuse, Ack or Closed from the receiver. False: it is late (the
        stream had already finished here) and changes nothing."""
        if isinstance(message, Ack) and not self.state.finished:
            records = self.unacked.get(message.seq)
            if records is None:
                raise ProtocolError(
                    f"stream {self.stream}: Ack for chunk {message.seq}, which is not awaiting one"
                )
            outcome = message.applied + message.kept + sum(n for _, n in message.dropped)
            if outcome != records:
                raise ProtocolError(
                    f"stream {self.stream}: Ack of chunk {message.seq} accounts for "
                    f"{outcome} records, the chunk held {records}"
                )
        if not self._step(message, incoming=True):
            return False
        if isinstance(message, Accept):
            _check_credit(self.stream, message.credit, 0)
            self.credit = message.credit
        elif isinstance(message, Ack):
            del self.unacked[message.seq]
            _check_credit(self.stream, self.credit + message.credit, len(self.unacked))
            self.credit += message.credit
        return True


class InboundStream(_Machine):
    """The receiver's end of one stream, created by the sender's Offer."""

    def __init__(self, offer: Offer) -> None:
        _Machine.__init__(self, offer.stream, Side.RECEIVER)

    def send(self, message: Message) -> None:
        """Record that ``message`` (Accept, Refuse, Ack, or Closed once the sender's
        Cancel arrived) is being sent."""
        if isinstance(message, Ack) and message.seq not in self.unacked:
            raise LocalProtocolError(f"stream {self.stream}: no chunk {message.seq} to Ack")
        if isinstance(message, Accept | Ack):
            unacked = len(self.unacked) - (1 if isinstance(message, Ack) else 0)
            # Granting too much is this node's own mistake, not the peer's.
            _check_credit(self.stream, self.credit + message.credit, unacked, LocalProtocolError)
        self._step(message, incoming=False)
        if isinstance(message, Accept):
            self.credit = message.credit
        elif isinstance(message, Ack):
            del self.unacked[message.seq]
            self.credit += message.credit

    def receive(self, message: Message) -> bool:
        """Apply a Chunk, End or Cancel from the sender. False: it is late (this end had
        already refused or finished the stream) and must be ignored."""
        if self.state.finished:
            return self._step(message, incoming=True)
        if isinstance(message, Chunk) and self.state is StreamState.OPEN:
            if message.seq != self.next_seq:
                raise ProtocolError(
                    f"stream {self.stream}: chunk {message.seq} out of order "
                    f"(expected {self.next_seq})"
                )
            if self.credit <= 0:
                raise ProtocolError(f"stream {self.stream}: chunk {message.seq} beyond credit")
        if (
            isinstance(message, End)
            and self.state is StreamState.OPEN
            and message.records != self.records
        ):
            raise ProtocolError(
                f"stream {self.stream}: End says {message.records} records, {self.records} arrived"
            )
        self._step(message, incoming=True)
        if isinstance(message, Chunk):
            self.credit -= 1
            self.next_seq += 1
            self.unacked[message.seq] = message.records
            self.records += message.records
        return True
