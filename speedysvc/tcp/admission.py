"""Room for a service's TCP calls in the workers: ``Admission``.

At most ``max_inflight`` calls of TCP clients are in flight to the workers at
once (half the service's channels: shared-memory callers always find some), and
one connection at most its ``share`` of them (answers its client leaves unread
keep their channels, and one client that sends slow calls or reads nothing must
leave room for the others).  A call without room waits, and its connection is not
read meanwhile (that client waits; the others go on); waiting calls start as room
comes, one connection after another.
"""
from __future__ import annotations

import collections


class Admission:
    """``_shmcore.Gateway`` reads ``closing``, ``inflight``, ``max_inflight`` and ``waiting``
    to decide whether a call may go the short way (see ``ServerConnection.buffer_updated``)."""

    def __init__(self, max_inflight: int, share: int):
        self.max_inflight = max_inflight
        self.share = share
        self.inflight = 0
        self.closing = False      # the server is closing: no call starts any more
        # calls waiting for room, per connection (frames in order), served round-robin
        self.waiting: collections.OrderedDict = collections.OrderedDict()

    def has_room(self, conn, posted: int = 0) -> bool:
        """Whether a call of ``conn`` may start now, beside ``posted`` others not counted yet
        (a connection with calls waiting has none: they go first)."""
        return (self.inflight + posted < self.max_inflight and conn not in self.waiting
                and conn.inflight + posted < self.share)

    def began(self, conn) -> None:
        self.inflight += 1
        conn.inflight += 1

    def ended(self, conn) -> None:
        self.inflight -= 1
        conn.inflight -= 1

    def wait(self, conn, frame, first: bool = False) -> None:
        """No room for the call now: it waits (``first``: ahead of the connection's others),
        and its connection is not read meanwhile."""
        frames = self.waiting.get(conn)
        if frames is None:
            frames = self.waiting[conn] = collections.deque()
        frames.appendleft(frame) if first else frames.append(frame)
        if not conn.paused_by_server:
            conn.paused_by_server = True
            conn.transport.pause_reading()   # that client waits; the others go on

    def next(self):
        """``(conn, frame)``: the next waiting call that has room now, taking connections in
        turn (one whose last waiting call this is is read again), or None."""
        if not self.waiting or self.inflight >= self.max_inflight:
            return None
        for conn, frames in self.waiting.items():
            if conn.inflight < self.share:
                break
        else:
            return None   # every connection waiting has its share in flight
        frame = frames.popleft()
        if frames:
            self.waiting.move_to_end(conn)
        else:
            del self.waiting[conn]
            conn.paused_by_server = False
            conn.resume()
        return conn, frame

    def withdraw(self) -> list:
        """Every waiting call, as ``(conn, frame)``, taken out (the server is closing)."""
        calls = [(conn, frame) for conn, frames in self.waiting.items() for frame in frames]
        self.waiting.clear()
        return calls

    def others_wait(self, conn) -> bool:
        """Whether calls of connections other than ``conn`` wait for room."""
        return any(c is not conn for c in self.waiting)
