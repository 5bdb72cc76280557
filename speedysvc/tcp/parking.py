"""Answers left in shared memory for clients that do not read their replies: ``Parking``.

When a connection is backlogged (its client leaves replies unread: asyncio paused
writing, or a reply is being compressed), an answer waited for in a thread stays
in its channel instead of being copied out, holding the channel and counting as a
call in flight, until the client reads again (``TcpServer.unblock``) or goes
(``TcpServer.release``).  A client that reads nothing then pins no more of the
gateway's memory than one reply; the sweeper drops it if others wait for room.
"""
from __future__ import annotations


class Parking:
    def __init__(self, counters: dict):
        self.counters = counters
        self.count = 0   # answers parked, all connections together

    def park(self, conn, call_id: int, pending) -> None:
        conn.parked.append((call_id, pending))
        self.count += 1
        self.counters["replies_parked"] += 1

    def next(self, conn):
        """``(call_id, pending)``: the next answer parked for ``conn`` if it reads its replies
        again (and is open), or None."""
        if not conn.parked or conn.backlogged or conn.closed:
            return None
        self.count -= 1
        return conn.parked.popleft()

    def drop(self, conn):
        """The answers parked for ``conn`` (which ended), one at a time, each taken out as it is
        given: they will never be sent."""
        while conn.parked:
            _, pending = conn.parked.popleft()
            self.count -= 1
            yield pending
