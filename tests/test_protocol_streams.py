"""The stream state machines (``handoff.protocol._streams``), without sockets or an engine.

Every (state, message) pair of the one table is driven on both ends; then the checks that
are not in the table (direction, sequence, credit, accounting, End's record count); then
the stops of an open stream (withdrawal, cancel) and messages that cross them on the wire.
A hypothesis state machine runs a sender and a receiver through an in-order wire with
random withdrawals, cancels and lost links, and checks that the two never disagree about
an acknowledged chunk.
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from handoff._errors import LocalProtocolError, ProtocolError
from handoff.protocol import (
    SENT_BY,
    STREAM_TRANSITIONS,
    Accept,
    Ack,
    Cancel,
    Chunk,
    Closed,
    Done,
    End,
    Heartbeat,
    InboundStream,
    Message,
    Offer,
    OutboundStream,
    Refuse,
    Side,
    StreamState,
)
from handoff.protocol._messages import MAX_CREDIT

S = 7  # the stream id of every machine below
UNFINISHED = [state for state in StreamState if not state.finished]
FINISHED = [state for state in StreamState if state.finished]
# Offer creates a stream, it is no transition: tested on its own below.
KINDS: list[type[Message]] = [kind for kind in SENT_BY if kind is not Offer]

Machine = OutboundStream | InboundStream


def offer(records: int = 10) -> Offer:
    return Offer(S, "users", "mapping", 1, records)


def chunk(seq: int, records: int = 2) -> Chunk:
    return Chunk(S, seq, records, 0.0, b"x" * records)


def ack(seq: int, applied: int, *, kept: int = 0, dropped: int = 0, credit: int = 1) -> Ack:
    reasons = (("expired", dropped),) if dropped else ()
    return Ack(S, seq, applied, kept, reasons, credit)


def outbound(state: StreamState, *, outstanding: bool = False) -> OutboundStream:
    """A sender's machine in ``state`` reached the legal way; with ``outstanding``, an open
    stream has chunk 0 (3 records) sent and not acknowledged."""
    machine = OutboundStream(S)
    machine.send(offer())
    if state is StreamState.REFUSED:
        assert machine.receive(Refuse(S, "not tracked"))
    elif state is StreamState.CANCELLED:
        machine.send(Cancel(S, "deadline"))
    elif state is StreamState.FAILED:
        assert machine.fail("link lost")
    elif state is not StreamState.OFFERED:
        assert machine.receive(Accept(S, 4))
        if state is StreamState.ENDED:
            machine.send(End(S, 0))
        elif outstanding:
            machine.send(chunk(0, 3))
        if state is StreamState.CANCELLING:
            machine.send(Cancel(S, "stalled"))
    assert machine.state is state
    return machine


def inbound(state: StreamState, *, outstanding: bool = False) -> InboundStream:
    """A receiver's machine in ``state``; with ``outstanding``, an open stream has received
    chunk 0 (3 records) and not acknowledged it yet."""
    machine = InboundStream(offer())
    if state is StreamState.REFUSED:
        machine.send(Refuse(S, "not tracked"))
    elif state is StreamState.CANCELLED:
        assert machine.receive(Cancel(S, "deadline"))
    elif state is StreamState.FAILED:
        assert machine.fail("link lost")
    elif state is not StreamState.OFFERED:
        machine.send(Accept(S, 4))
        if state is StreamState.ENDED:
            assert machine.receive(End(S, 0))
        elif outstanding:
            assert machine.receive(chunk(0, 3))
        if state is StreamState.CANCELLING:
            assert machine.receive(Cancel(S, "stalled"))
    assert machine.state is state
    return machine


def build(side: Side, state: StreamState, *, outstanding: bool = False) -> Machine:
    if side is Side.SENDER:
        return outbound(state, outstanding=outstanding)
    return inbound(state, outstanding=outstanding)


def valid(kind: type[Message], machine: Machine) -> Message:
    """A message of ``kind`` that passes every check but the table's."""
    if kind is Accept:
        return Accept(S, 4)
    if kind is Refuse:
        return Refuse(S, "draining")
    if kind is Cancel:
        return Cancel(S, "deadline")
    if kind is Chunk:
        return chunk(machine.next_seq)
    if kind is Ack:
        seq = min(machine.unacked, default=0)
        return ack(seq, machine.unacked.get(seq, 1))
    if kind is End:
        return End(S, machine.records)
    if kind is Closed:
        return Closed(S)
    raise AssertionError(kind)


def act(machine: Machine, message: Message) -> bool | None:
    """Send ``message`` from the machine's end if that end sends it, else receive it."""
    if SENT_BY[type(message)] is machine.side:
        machine.send(message)
        return None
    return machine.receive(message)


def state_of(machine: Machine) -> StreamState:
    """The state, read where mypy would keep an earlier check's narrowing."""
    return machine.state


def snapshot(machine: Machine) -> tuple[object, ...]:
    return (
        machine.state,
        machine.credit,
        machine.next_seq,
        dict(machine.unacked),
        machine.records,
        machine.reason,
    )


# -- the table ------------------------------------------------------------------------------


def test_the_table_has_a_row_for_each_unfinished_state_and_only_stream_messages() -> None:
    assert set(STREAM_TRANSITIONS) == set(UNFINISHED)
    for row in STREAM_TRANSITIONS.values():
        assert set(row) <= set(KINDS)
    assert {SENT_BY[kind] for kind in SENT_BY} == set(Side)


@pytest.mark.parametrize("side", list(Side))
@pytest.mark.parametrize("state", UNFINISHED)
@pytest.mark.parametrize("kind", KINDS)
def test_every_pair_of_the_table(side: Side, state: StreamState, kind: type[Message]) -> None:
    machine = build(side, state, outstanding=kind is Ack)
    message = valid(kind, machine)
    incoming = SENT_BY[kind] is not side
    expected = STREAM_TRANSITIONS[state].get(kind)
    if expected is None:
        before = snapshot(machine)
        with pytest.raises(ProtocolError if incoming else LocalProtocolError):
            act(machine, message)
        assert snapshot(machine) == before
    else:
        result = act(machine, message)
        assert machine.state is expected
        assert result is (True if incoming else None)


@pytest.mark.parametrize("side", list(Side))
@pytest.mark.parametrize("state", FINISHED)
@pytest.mark.parametrize("kind", KINDS)
def test_finished_streams_ignore_late_messages_and_send_nothing(
    side: Side, state: StreamState, kind: type[Message]
) -> None:
    machine = build(side, state)
    before = snapshot(machine)
    if SENT_BY[kind] is side:
        with pytest.raises(LocalProtocolError):
            machine.send(valid(kind, machine))
    else:
        assert machine.receive(valid(kind, machine)) is False
    assert snapshot(machine) == before


@pytest.mark.parametrize("side", list(Side))
@pytest.mark.parametrize("state", FINISHED)
def test_late_messages_are_ignored_whatever_they_say(side: Side, state: StreamState) -> None:
    """What crosses a stop on the wire was valid when sent; here nothing checks it."""
    machine = build(side, state)
    before = snapshot(machine)
    if side is Side.SENDER:
        late: list[Message] = [
            ack(5, 1000),
            Accept(S, MAX_CREDIT),
            Refuse(S, "late"),
            Closed(S),
        ]
    else:
        late = [chunk(9, 50), End(S, 12345), Cancel(S, "late")]
    for message in late:
        assert machine.receive(message) is False
    assert snapshot(machine) == before


@pytest.mark.parametrize("side", list(Side))
@pytest.mark.parametrize("state", list(StreamState))
@pytest.mark.parametrize("kind", [*KINDS, Offer])
def test_a_message_from_the_wrong_end_is_an_error_in_every_state(
    side: Side, state: StreamState, kind: type[Message]
) -> None:
    if SENT_BY[kind] is not side:
        # Seen from the other end: sending what only the peer sends.
        machine = build(side, state, outstanding=True)
        message = offer() if kind is Offer else valid(kind, machine)
        with pytest.raises(LocalProtocolError, match="travels from"):
            machine.send(message)
    else:
        # Receiving what only this end sends.
        machine = build(side, state, outstanding=True)
        message = offer() if kind is Offer else valid(kind, machine)
        before = snapshot(machine)
        with pytest.raises(ProtocolError, match="travels from"):
            machine.receive(message)
        assert snapshot(machine) == before


@pytest.mark.parametrize("side", list(Side))
@pytest.mark.parametrize("message", [Done(3), Heartbeat()])
def test_messages_that_belong_to_no_stream_are_refused(side: Side, message: Message) -> None:
    machine = build(side, StreamState.OPEN)
    with pytest.raises(LocalProtocolError, match="not a stream message"):
        machine.receive(message)
    with pytest.raises(LocalProtocolError, match="not a stream message"):
        machine.send(message)


def test_an_offer_is_sent_once_and_never_arrives_on_a_stream_in_progress() -> None:
    sender = OutboundStream(S)
    sender.send(offer())
    assert sender.state is StreamState.OFFERED
    with pytest.raises(LocalProtocolError, match="already offered"):
        sender.send(offer())
    sender.receive(Accept(S, 2))
    with pytest.raises(LocalProtocolError, match="already offered"):
        sender.send(offer())

    receiver = InboundStream(offer(42))
    assert receiver.state is StreamState.OFFERED
    with pytest.raises(ProtocolError, match="not allowed while offered"):
        receiver.receive(offer())
    receiver.send(Accept(S, 2))
    with pytest.raises(ProtocolError, match="not allowed while open"):
        receiver.receive(offer())
    receiver.send(Refuse(S, "draining"))
    assert receiver.receive(offer()) is False


def test_fail_ends_an_unfinished_stream_once() -> None:
    machine = outbound(StreamState.OPEN, outstanding=True)
    assert machine.fail("link lost")
    assert (machine.state, machine.reason) == (StreamState.FAILED, "link lost")
    assert machine.unacked == {0: 3}  # the engine takes these back and re-routes them
    assert not machine.fail("again")
    assert machine.reason == "link lost"
    ended = outbound(StreamState.ENDED)
    assert not ended.fail("too late")
    assert ended.state is StreamState.ENDED


# -- sequence -------------------------------------------------------------------------------


def test_the_sender_sends_chunks_in_sequence() -> None:
    machine = outbound(StreamState.OPEN)
    with pytest.raises(LocalProtocolError, match="out of order"):
        machine.send(chunk(1))
    machine.send(chunk(0, 3))
    with pytest.raises(LocalProtocolError, match="out of order"):
        machine.send(chunk(0))
    machine.send(chunk(1, 4))
    assert (machine.next_seq, machine.unacked, machine.records) == (2, {0: 3, 1: 4}, 7)


def test_the_receiver_takes_chunks_only_in_sequence() -> None:
    machine = inbound(StreamState.OPEN)
    with pytest.raises(ProtocolError, match="out of order"):
        machine.receive(chunk(1))
    assert machine.receive(chunk(0, 3))
    with pytest.raises(ProtocolError, match="out of order"):
        machine.receive(chunk(0, 3))  # a duplicate
    with pytest.raises(ProtocolError, match="out of order"):
        machine.receive(chunk(2))  # a gap
    assert (machine.next_seq, machine.records) == (1, 3)


def test_acks_name_a_chunk_awaiting_one() -> None:
    sender = outbound(StreamState.OPEN)
    sender.send(chunk(0, 3))
    sender.send(chunk(1, 2))
    with pytest.raises(ProtocolError, match="not awaiting one"):
        sender.receive(ack(2, 2))  # never sent
    # Out of order is fine: each chunk is acknowledged once, whenever it was applied.
    assert sender.receive(ack(1, 2))
    with pytest.raises(ProtocolError, match="not awaiting one"):
        sender.receive(ack(1, 2))  # twice
    assert sender.receive(ack(0, 3))
    assert sender.unacked == {}

    receiver = inbound(StreamState.OPEN)
    with pytest.raises(LocalProtocolError, match="no chunk 0"):
        receiver.send(ack(0, 1))
    receiver.receive(chunk(0, 3))
    receiver.send(ack(0, 3))
    with pytest.raises(LocalProtocolError, match="no chunk 0"):
        receiver.send(ack(0, 3))


# -- credit ---------------------------------------------------------------------------------


def test_the_sender_spends_credit_and_gets_it_back_with_acks() -> None:
    machine = outbound(StreamState.OFFERED)
    machine.receive(Accept(S, 2))
    machine.send(chunk(0))
    machine.send(chunk(1))
    assert machine.credit == 0
    with pytest.raises(LocalProtocolError, match="no credit"):
        machine.send(chunk(2))
    machine.receive(ack(0, 2, credit=0))
    assert machine.credit == 0  # an Ack may grant nothing: the receiver is busy
    machine.receive(ack(1, 2, credit=3))
    assert machine.credit == 3
    machine.send(chunk(2))
    assert machine.credit == 2


def test_a_chunk_beyond_credit_is_a_protocol_error_on_the_receiver() -> None:
    machine = inbound(StreamState.OFFERED)
    machine.send(Accept(S, 1))
    assert machine.receive(chunk(0))
    with pytest.raises(ProtocolError, match="beyond credit"):
        machine.receive(chunk(1))
    machine.send(ack(0, 2, credit=1))
    assert machine.receive(chunk(1))


@pytest.mark.parametrize(
    ("applied", "kept", "dropped"),
    [(2, 0, 0), (4, 0, 0), (1, 1, 0), (0, 0, 4), (3, 1, 1), (0, 0, 0)],
)
def test_an_ack_that_does_not_add_up_is_a_protocol_error_on_the_sender(
    applied: int, kept: int, dropped: int
) -> None:
    machine = outbound(StreamState.OPEN)
    machine.send(chunk(0, 3))
    before = snapshot(machine)
    with pytest.raises(ProtocolError, match="accounts for"):
        machine.receive(ack(0, applied, kept=kept, dropped=dropped))
    assert snapshot(machine) == before


@pytest.mark.parametrize(
    ("applied", "kept", "dropped"), [(3, 0, 0), (0, 3, 0), (0, 0, 3), (1, 1, 1)]
)
def test_an_ack_that_adds_up_is_taken(applied: int, kept: int, dropped: int) -> None:
    machine = outbound(StreamState.OPEN)
    machine.send(chunk(0, 3))
    assert machine.receive(ack(0, applied, kept=kept, dropped=dropped))
    assert machine.unacked == {}


def test_dropped_counts_of_several_reasons_add_up_together() -> None:
    machine = outbound(StreamState.OPEN)
    machine.send(chunk(0, 6))
    with pytest.raises(ProtocolError, match="accounts for 5"):
        machine.receive(Ack(S, 0, 1, 0, (("expired", 2), ("receiver full", 2)), 1))
    assert machine.receive(Ack(S, 0, 1, 1, (("expired", 2), ("receiver full", 2)), 1))


def test_credit_above_max_credit_is_refused_on_both_ends() -> None:
    sender = outbound(StreamState.OFFERED)
    with pytest.raises(ProtocolError, match="credit beyond"):
        sender.receive(Accept(S, MAX_CREDIT + 1))
    sender = outbound(StreamState.OFFERED)
    sender.receive(Accept(S, MAX_CREDIT))
    sender.send(chunk(0))
    sender.send(chunk(1))
    # Two chunks in flight and MAX_CREDIT - 2 left: an Ack may return one, not two.
    with pytest.raises(ProtocolError, match="credit beyond"):
        sender.receive(ack(0, 2, credit=2))
    sender = outbound(StreamState.OFFERED)
    sender.receive(Accept(S, MAX_CREDIT))
    sender.send(chunk(0))
    assert sender.receive(ack(0, 2, credit=1))
    assert sender.credit == MAX_CREDIT

    # The receiver granting too much is this process's own mistake.
    receiver = inbound(StreamState.OFFERED)
    with pytest.raises(LocalProtocolError, match="credit beyond"):
        receiver.send(Accept(S, MAX_CREDIT + 1))
    assert receiver.state is StreamState.OFFERED
    receiver.send(Accept(S, MAX_CREDIT))
    receiver.receive(chunk(0))
    with pytest.raises(LocalProtocolError, match="credit beyond"):
        receiver.send(ack(0, 2, credit=2))
    receiver.send(ack(0, 2, credit=1))
    assert receiver.credit == MAX_CREDIT


# -- End ------------------------------------------------------------------------------------


def test_end_waits_for_every_ack_on_the_sender() -> None:
    machine = outbound(StreamState.OPEN)
    machine.send(chunk(0, 3))
    with pytest.raises(LocalProtocolError, match="End before every Ack"):
        machine.send(End(S, 3))
    machine.receive(ack(0, 3))
    machine.send(End(S, 3))
    assert machine.state is StreamState.ENDED


@pytest.mark.parametrize("said", [0, 4, 6, 100])
def test_end_with_the_wrong_record_count_is_a_protocol_error(said: int) -> None:
    machine = inbound(StreamState.OPEN)
    machine.receive(chunk(0, 3))
    machine.send(ack(0, 3))
    machine.receive(chunk(1, 2))
    machine.send(ack(1, 2))
    with pytest.raises(ProtocolError, match=f"End says {said} records, 5 arrived"):
        machine.receive(End(S, said))
    assert machine.state is StreamState.OPEN
    assert machine.receive(End(S, 5))
    assert state_of(machine) is StreamState.ENDED


# -- stops and what crosses them -------------------------------------------------------------


def test_a_receiver_withdraws_from_an_open_stream_and_the_sender_keeps_what_is_unacked() -> None:
    sender, receiver = outbound(StreamState.OFFERED), inbound(StreamState.OFFERED)
    receiver.send(Accept(S, 4))
    sender.receive(Accept(S, 4))
    for seq, records in enumerate((3, 2)):
        sender.send(chunk(seq, records))
        receiver.receive(chunk(seq, records))
    receiver.send(ack(0, 3))
    receiver.send(Refuse(S, "draining"))  # chunk 1 arrived but was not applied
    assert (receiver.state, receiver.reason) == (StreamState.REFUSED, "draining")
    assert sender.receive(ack(0, 3))
    assert sender.receive(Refuse(S, "draining"))
    assert (sender.state, sender.reason) == (StreamState.REFUSED, "draining")
    assert sender.unacked == {1: 2}  # to send elsewhere


def test_chunks_and_end_crossing_a_withdrawal_are_ignored() -> None:
    sender, receiver = outbound(StreamState.OPEN), inbound(StreamState.OPEN)
    sender.send(chunk(0, 3))
    assert receiver.receive(chunk(0, 3))
    receiver.send(ack(0, 3))
    # On the wire at once: the sender's chunk 1, then its chunk 2; the receiver's Refuse.
    sender.send(chunk(1, 2))
    sender.send(chunk(2, 2))
    receiver.send(Refuse(S, "draining"))
    assert receiver.receive(chunk(1, 2)) is False
    assert receiver.receive(chunk(2, 2)) is False
    assert receiver.records == 3  # neither was taken
    assert sender.receive(ack(0, 3))
    assert sender.receive(Refuse(S, "draining"))
    assert sender.unacked == {1: 2, 2: 2}


def test_end_crossing_a_withdrawal_leaves_both_ends_agreeing() -> None:
    sender, receiver = outbound(StreamState.OPEN), inbound(StreamState.OPEN)
    sender.send(chunk(0, 3))
    receiver.receive(chunk(0, 3))
    receiver.send(ack(0, 3))
    sender.receive(ack(0, 3))
    sender.send(End(S, 3))
    receiver.send(Refuse(S, "draining"))
    assert receiver.receive(End(S, 3)) is False
    assert sender.receive(Refuse(S, "draining")) is False
    # Every chunk was acknowledged before either stop: nothing to take back, nothing lost.
    assert (sender.state, sender.unacked) == (StreamState.ENDED, {})
    assert (receiver.state, receiver.unacked) == (StreamState.REFUSED, {})


def test_acks_crossing_a_cancel_count_and_closed_settles_the_rest() -> None:
    """The sender learns exactly which chunks the receiver applied: those acknowledged
    before its Closed. The rest were not applied and may go elsewhere, exactly once."""
    sender, receiver = outbound(StreamState.OPEN), inbound(StreamState.OPEN)
    sender.send(chunk(0, 3))
    sender.send(chunk(1, 2))
    receiver.receive(chunk(0, 3))
    receiver.send(ack(0, 3))
    sender.send(Cancel(S, "drain deadline"))
    assert sender.state is StreamState.CANCELLING
    assert receiver.receive(chunk(1, 2))  # on the wire before the Cancel: it arrives
    assert receiver.receive(Cancel(S, "drain deadline"))
    assert receiver.state is StreamState.CANCELLING
    receiver.send(Closed(S))  # chunk 1 arrived, and was not applied: no Ack for it
    assert state_of(receiver) is StreamState.CANCELLED
    assert sender.receive(ack(0, 3))
    assert sender.unacked == {1: 2}
    assert sender.receive(Closed(S))
    assert (state_of(sender), sender.unacked) == (StreamState.CANCELLED, {1: 2})
    with pytest.raises(LocalProtocolError):
        receiver.send(Closed(S))  # once


def test_closed_is_only_an_answer_to_a_cancel() -> None:
    sender = outbound(StreamState.OPEN, outstanding=True)
    with pytest.raises(ProtocolError, match="Closed is not allowed while open"):
        sender.receive(Closed(S))
    receiver = inbound(StreamState.OPEN)
    with pytest.raises(LocalProtocolError, match="Closed is not allowed while open"):
        receiver.send(Closed(S))


def test_cancel_crossing_a_withdrawal() -> None:
    # The withdrawal answers the Cancel as Closed would: nothing unacknowledged was applied.
    sender, receiver = outbound(StreamState.OPEN), inbound(StreamState.OPEN)
    sender.send(Cancel(S, "drain deadline"))
    receiver.send(Refuse(S, "draining"))
    assert receiver.receive(Cancel(S, "drain deadline")) is False
    assert sender.receive(Refuse(S, "draining"))
    assert (sender.state, receiver.state) == (StreamState.REFUSED, StreamState.REFUSED)


def test_an_accept_crossing_a_cancel_of_the_offer() -> None:
    sender, receiver = outbound(StreamState.OFFERED), inbound(StreamState.OFFERED)
    sender.send(Cancel(S, "no answer in time"))
    receiver.send(Accept(S, 4))
    assert sender.receive(Accept(S, 4)) is False
    assert sender.credit == 0
    assert receiver.receive(Cancel(S, "no answer in time"))
    receiver.send(Closed(S))
    assert receiver.state is StreamState.CANCELLED
    assert sender.receive(Closed(S)) is False  # late: the sender never opened it


# -- both ends through a wire, at random ---------------------------------------------------


class StreamPair(RuleBasedStateMachine):
    """A sender and a receiver machine joined by an in-order, lossless wire that a link
    failure cuts. The 'engines' around them follow the rules the real ones do: the sender
    sends chunks within its credit and End once all are acknowledged; the receiver accepts
    or refuses an offer, applies chunks and acknowledges them (later, in any order), and
    may withdraw; the sender may cancel; the link may go down."""

    def __init__(self) -> None:
        super().__init__()
        self.sender = OutboundStream(S)
        self.receiver: InboundStream | None = None
        self.to_receiver: deque[Message] = deque()
        self.to_sender: deque[Message] = deque()
        self.sent_acks: dict[int, Ack] = {}
        """Every Ack the receiver sent, by chunk."""
        self.taken_acks: dict[int, Ack] = {}
        """Every Ack the sender took (not late)."""
        self.ignored_acks: dict[int, Ack] = {}
        self.lost_acks: dict[int, Ack] = {}
        self.chunks_sent: dict[int, int] = {}
        self.chunks_applied: dict[int, int] = {}
        self.applied_when_stopped: int | None = None
        self.unacked_when_stopped: dict[int, int] | None = None
        self.link_lost = False
        self.settled = False
        """The sender cancelled, and the receiver's Closed (or Refuse) answered it."""
        self._send(offer(0))

    def _send(self, message: Message) -> None:
        self.sender.send(message)
        self.to_receiver.append(message)
        if isinstance(message, Chunk):
            self.chunks_sent[message.seq] = message.records

    def _answer(self, message: Message) -> None:
        assert self.receiver is not None
        self.receiver.send(message)
        self.to_sender.append(message)
        if isinstance(message, Ack):
            self.sent_acks[message.seq] = message

    def _actions(self) -> list[str]:
        """What may happen next. Progress comes twelve times over: stops (End, cancel,
        withdrawal, a lost link) are rarer, so that streams get going before most of them end."""
        sender, receiver = self.sender, self.receiver
        progress: list[str] = []
        if self.to_receiver:
            progress.append("deliver_to_receiver")
        if self.to_sender:
            progress.append("deliver_to_sender")
        if sender.state is StreamState.OPEN and sender.credit > 0:
            progress.append("send_chunk")
        if receiver is not None and not receiver.state.finished and receiver.unacked:
            progress.append("acknowledge")
        stops: list[str] = []
        receiver_done = receiver is None or receiver.state.finished
        if sender.state is StreamState.OPEN and not sender.unacked:
            stops.append("send_end")
        if sender.state in (StreamState.OFFERED, StreamState.OPEN):
            stops.append("cancel")
        if receiver is not None and receiver.state is StreamState.OPEN and not receiver.unacked:
            # The engine acknowledges every chunk as it applies it, so a withdrawal never
            # leaves a chunk applied and unacknowledged behind.
            stops.append("withdraw")
        if not self.link_lost and not (sender.state.finished and receiver_done):
            stops.append("lose_the_link")
        return progress * 12 + stops

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        actions = self._actions()
        if not actions:
            return  # both ends have stopped and the wire is empty
        action = data.draw(st.sampled_from(actions), label="action")
        event(action)
        if action == "send_chunk":
            self._send(chunk(self.sender.next_seq, data.draw(st.integers(1, 5), label="records")))
        elif action == "send_end":
            self._send(End(S, self.sender.records))
        elif action == "cancel":
            self._send(Cancel(S, "drain deadline"))
        elif action == "deliver_to_sender":
            self._deliver_to_sender()
        elif action == "deliver_to_receiver":
            accept = data.draw(st.integers(0, 7), label="accept unless 0") != 0
            self._deliver_to_receiver(accept, data.draw(st.integers(1, 4), label="credit"))
        elif action == "acknowledge":
            self._acknowledge(data)
        elif action == "withdraw":
            self._answer(Refuse(S, "draining"))
        else:
            self._lose_the_link()

    def _deliver_to_sender(self) -> None:
        message = self.to_sender.popleft()
        was = self.sender.state
        taken = self.sender.receive(message)
        if not taken:
            # Late only because the sender stopped first, never otherwise.
            assert was.finished
            assert self.sender.state is was
        if isinstance(message, Closed | Refuse) and taken and was is StreamState.CANCELLING:
            self.settled = True
            event("a cancel was settled by the receiver's answer")
        if isinstance(message, Ack):
            (self.taken_acks if taken else self.ignored_acks)[message.seq] = message
            if not taken:
                event("an Ack crossed the sender's stop")
                # A withdrawal or End is sent after the receiver's acks: only a Cancel
                # (or this end failing) can cross one.
                assert was in (StreamState.CANCELLED, StreamState.FAILED)

    def _deliver_to_receiver(self, accept: bool, credit: int) -> None:
        message = self.to_receiver.popleft()
        if isinstance(message, Offer):
            self.receiver = InboundStream(message)
            self._answer(Accept(S, credit) if accept else Refuse(S, "does not track it"))
            return
        assert self.receiver is not None
        was = self.receiver.state
        taken = self.receiver.receive(message)
        if not taken:
            assert was.finished
            assert self.receiver.state is was
            if isinstance(message, Chunk):
                event("a Chunk crossed the receiver's stop")
        elif isinstance(message, Chunk):
            self.chunks_applied[message.seq] = message.records
        if self.receiver.state is StreamState.CANCELLING:
            self._answer(Closed(S))  # at once, after the Acks of what it applied

    def _acknowledge(self, data: st.DataObject) -> None:
        assert self.receiver is not None
        seq = data.draw(st.sampled_from(sorted(self.receiver.unacked)), label="seq")
        records = self.receiver.unacked[seq]
        applied = data.draw(st.integers(0, records), label="applied")
        kept = data.draw(st.integers(0, records - applied), label="kept")
        credit = data.draw(st.integers(0, 2), label="credit")
        self._answer(ack(seq, applied, kept=kept, dropped=records - applied - kept, credit=credit))

    def _lose_the_link(self) -> None:
        self.link_lost = True
        self.sender.fail("went down")
        if self.receiver is not None:
            self.receiver.fail("went down")
        for message in self.to_sender:
            if isinstance(message, Ack):
                self.lost_acks[message.seq] = message
        self.to_sender.clear()
        self.to_receiver.clear()

    # -- what must always hold --

    @invariant()
    def both_ends_agree_about_acknowledged_chunks(self) -> None:
        for seq, taken in self.taken_acks.items():
            assert self.sent_acks[seq] == taken
            assert seq not in self.sender.unacked
        in_flight = {m.seq: m for m in self.to_sender if isinstance(m, Ack)}
        # Each Ack the receiver sent is taken, on its way, lost with the link, or crossed
        # the sender's own stop; in the last three cases the sender still holds its chunk.
        assert self.sent_acks.keys() == (
            self.taken_acks.keys() | in_flight.keys() | self.lost_acks.keys()
            | self.ignored_acks.keys()
        )  # fmt: skip
        for seq in self.sent_acks.keys() - self.taken_acks.keys():
            assert seq in self.sender.unacked

    @invariant()
    def a_settled_cancel_leaves_exactly_the_unapplied_chunks(self) -> None:
        """After Closed, the sender's unacknowledged chunks are exactly those the receiver
        never acknowledged: state that moves exactly once can go elsewhere, once."""
        if self.settled:
            assert not (self.sender.unacked.keys() & self.sent_acks.keys())
            assert self.sender.unacked.keys() == self.chunks_sent.keys() - self.sent_acks.keys()

    @invariant()
    def acknowledged_records_match(self) -> None:
        def records(acks: dict[int, Ack]) -> int:
            return sum(a.applied + a.kept + sum(n for _, n in a.dropped) for a in acks.values())

        acknowledged = sum(self.chunks_sent[seq] for seq in self.taken_acks)
        assert acknowledged == records(self.taken_acks)
        pending = {m.seq: m for m in self.to_sender if isinstance(m, Ack)}
        assert records(self.sent_acks) == acknowledged + records(pending) + records(
            self.lost_acks
        ) + records(self.ignored_acks)
        if not self.to_sender and not self.lost_acks and not self.ignored_acks:
            assert acknowledged == records(self.sent_acks)

    @invariant()
    def every_record_is_acknowledged_or_still_held_by_the_sender(self) -> None:
        unacked = sum(self.sender.unacked.values())
        acknowledged = sum(self.chunks_sent[seq] for seq in self.taken_acks)
        assert self.sender.records == acknowledged + unacked
        assert self.sender.records == sum(self.chunks_sent.values())

    @invariant()
    def the_receiver_applies_only_chunks_it_was_sent_in_order(self) -> None:
        assert list(self.chunks_applied) == list(range(len(self.chunks_applied)))
        for seq, records in self.chunks_applied.items():
            assert self.chunks_sent[seq] == records
        if self.receiver is not None:
            assert self.receiver.records == sum(self.chunks_applied.values())

    @invariant()
    def a_stopped_sender_takes_no_more_acks(self) -> None:
        # Its unacknowledged chunks are taken back (re-routed or snapshotted) at the stop:
        # an Ack counted after it would count their records twice.
        if not self.sender.state.finished:
            return
        if self.unacked_when_stopped is None:
            self.unacked_when_stopped = dict(self.sender.unacked)
        assert self.sender.unacked == self.unacked_when_stopped

    @invariant()
    def a_stopped_receiver_applies_nothing_more(self) -> None:
        receiver = self.receiver
        if receiver is None or not receiver.state.finished:
            return
        if self.applied_when_stopped is None:
            self.applied_when_stopped = len(self.chunks_applied)
        assert len(self.chunks_applied) == self.applied_when_stopped
        if receiver.state is StreamState.REFUSED:
            # It withdrew (or refused the offer) with every applied chunk acknowledged.
            assert self.sent_acks.keys() == self.chunks_applied.keys()

    @invariant()
    def credit_stays_within_bounds(self) -> None:
        for machine in (self.sender, self.receiver):
            if machine is not None:
                assert machine.credit >= 0
                assert machine.credit + len(machine.unacked) <= MAX_CREDIT

    @invariant()
    def an_ended_stream_is_complete_on_both_ends(self) -> None:
        if self.receiver is not None and self.receiver.state is StreamState.ENDED:
            assert self.sender.state is StreamState.ENDED
            assert self.receiver.records == self.sender.records
            assert self.sender.unacked == {} == self.receiver.unacked
            assert self.taken_acks.keys() == set(self.chunks_sent)

    def teardown(self) -> None:
        # Deliver what is left: both ends must settle without an error.
        while True:
            if self.to_receiver:
                self._deliver_to_receiver(False, 1)
            elif self.to_sender:
                self._deliver_to_sender()
            else:
                break
        self.both_ends_agree_about_acknowledged_chunks()
        self.acknowledged_records_match()


StreamPair.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_stream_pair = StreamPair.TestCase
