"""The TCP gateway's bookkeeping, without sockets: room for calls (Admission), answers left
unread (Parking) and the inflate budget."""
import collections

from speedysvc.tcp.admission import Admission
from speedysvc.tcp.inflate import InflateBudget
from speedysvc.tcp.parking import Parking


class Conn:
    """What Admission and Parking read of a connection."""

    def __init__(self, name):
        self.name, self.inflight, self.paused_by_server, self.reading = name, 0, False, True
        self.parked, self.backlogged, self.closed, self.resumed = collections.deque(), False, False, 0
        self.transport = self

    def pause_reading(self):
        self.reading = False

    def resume(self):
        self.resumed += 1
        self.reading = True

    def __repr__(self):
        return self.name


def test_room_counts_all_calls_and_each_connection_share():
    room = Admission(max_inflight=3, share=2)
    a, b = Conn("a"), Conn("b")
    assert room.has_room(a) and room.has_room(a, posted=1) and not room.has_room(a, posted=2)
    room.began(a)
    room.began(a)
    assert (room.inflight, a.inflight) == (2, 2)
    assert not room.has_room(a) and room.has_room(b)   # a has its share; b does not
    room.began(b)
    assert not room.has_room(b)                        # 3 in all
    room.ended(a)
    assert room.has_room(b) and room.has_room(a)


def test_waiting_calls_stop_their_connection_and_start_in_turn():
    room = Admission(max_inflight=1, share=1)
    a, b = Conn("a"), Conn("b")
    room.began(a)
    for conn, frame in [(a, "a1"), (a, "a2"), (b, "b1")]:
        room.wait(conn, frame)
    assert not a.reading and not b.reading
    assert not room.has_room(Conn("c")) and room.next() is None   # no room
    room.ended(a)
    assert not room.has_room(a)                        # a has calls waiting: they go first
    assert room.next() == (a, "a1")                    # a, then b: round-robin
    room.began(a)
    room.ended(a)
    assert room.next() == (b, "b1") and b.resumed == 1 and b.reading   # b's last: it is read again
    room.began(b)
    room.ended(b)
    assert room.next() == (a, "a2") and a.resumed == 1
    assert room.next() is None and not room.waiting


def test_a_call_put_back_goes_first_and_closing_withdraws_every_waiting_call():
    room = Admission(max_inflight=1, share=1)
    a = Conn("a")
    room.wait(a, "a1")
    room.wait(a, "a0", first=True)
    assert room.withdraw() == [(a, "a0"), (a, "a1")] and not room.waiting


def test_a_connection_at_its_share_does_not_block_the_others():
    room = Admission(max_inflight=4, share=1)
    a, b = Conn("a"), Conn("b")
    room.began(a)
    room.wait(a, "a1")
    room.wait(b, "b1")
    assert room.others_wait(a) and room.others_wait(b)
    assert room.next() == (b, "b1")                    # a has its share in flight: b goes
    assert room.next() is None                         # a still has its share
    assert not room.others_wait(a) and room.others_wait(b)   # only a waits now


def test_parked_answers_are_counted_until_sent_or_dropped():
    counters = {"replies_parked": 0}
    parking = Parking(counters)
    a = Conn("a")
    parking.park(a, 1, "p1")
    parking.park(a, 2, "p2")
    assert (parking.count, counters["replies_parked"]) == (2, 2)
    a.backlogged = True
    assert parking.next(a) is None                     # its client still does not read
    a.backlogged = False
    assert parking.next(a) == (1, "p1") and parking.count == 1
    assert list(parking.drop(a)) == ["p2"] and parking.count == 0 and not a.parked
    assert counters["replies_parked"] == 2


def test_the_inflate_budget_lets_one_call_through_whatever_its_size():
    budget = InflateBudget(100)
    assert budget.fits(10 ** 9)                         # nothing inflating: one is always allowed
    budget.take(60)
    assert budget.fits(40) and not budget.fits(41)
    budget.free(60)
    assert budget.inflating == 0
    MiB = 1 << 20
    assert InflateBudget.needs_thread(MiB, MiB)         # 1 MiB or more
    assert not InflateBudget.needs_thread(64 << 10, 1)  # up to 64 KiB: on the loop, whatever the ratio
    assert InflateBudget.needs_thread((64 << 10) + 33, 2)   # above, and more than 32 times what came
    assert not InflateBudget.needs_thread(512 << 10, 16 << 10)
