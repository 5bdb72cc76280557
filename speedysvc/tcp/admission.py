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

    def trim(self) -> None:
        """(``SharedAdmission``: give back room not needed.)"""

    def others_wait(self, conn) -> bool:
        """Whether calls of connections other than ``conn`` wait for room."""
        return any(c is not conn for c in self.waiting)


class SharedAdmission(Admission):
    """The admission of a worker that serves TCP (``tcp.inworker``): ``max_inflight`` holds
    across every worker of the service, not per worker.

    Each worker holds a *lease*, a share of the service's ``limit`` published in its TCP record
    (layout.h, T_LEASE), and ``max_inflight`` (what ``has_room``, ``next`` and
    ``_shmcore.Gateway`` compare the worker's calls in flight with) is that lease: the usual
    call is still checked in C against two numbers of this process.  A worker that needs room
    beyond its lease grows it: it stores the larger lease first, then reads the sum of the
    leases, and takes it back when that passes the limit.  The stores and loads are
    sequentially consistent, so of two workers growing at once the later one to store sees the
    other's lease: the leases never sum past the limit (both may take theirs back, and look
    again shortly: ``short``).  A lease shrinks as calls end (to none when the worker has no
    call in flight), so that idle workers leave the room to busy ones; a worker killed -9 leaks
    none of it (reaping clears its record)."""

    def __init__(self, limit: int, share: int, shared):
        super().__init__(0, share)
        self.limit, self.shared = limit, shared
        self.step = max(1, limit // 16)   # a lease grows by this much at least (fewer sums read)
        self.short = False   # a call waits for room the other workers' leases hold (published)

    def _lease(self, value: int) -> None:
        self.max_inflight = value
        self.shared.lease(value)

    def _grow(self, needed: int) -> bool:
        """A lease of ``needed`` calls at least, if the other workers' leave room for it."""
        if self.shared.off is None:   # (not registered yet: no record to lease with)
            self._set_short(True)
            return False
        held = self.max_inflight
        for want in (min(self.limit, max(needed, held + self.step)), needed):
            if want <= held:
                continue
            self._lease(want)
            if self.shared.leased() <= self.limit:
                self._set_short(False)
                return True
        self._lease(held)
        self._set_short(True)
        return False

    def _set_short(self, on: bool) -> None:
        if on != self.short:
            self.short = on
            self.shared.short(on)

    def others_wait(self, conn) -> bool:
        """Whether calls of other connections wait for room, here or in another worker (whose
        room a connection of ours that reads none of its answers may hold)."""
        return super().others_wait(conn) or self.shared.others_short()

    def has_room(self, conn, posted: int = 0) -> bool:
        if conn in self.waiting or conn.inflight + posted >= self.share:
            return False
        return self.inflight + posted < self.max_inflight or self._grow(self.inflight + posted + 1)

    def ended(self, conn) -> None:
        super().ended(conn)
        self.trim()

    def trim(self) -> None:
        """Give back the part of the lease the calls in flight do not need (calls leased for
        may also have been answered at once, never counting as in flight)."""
        if not self.waiting:
            self._set_short(False)
        if not self.inflight and not self.waiting:
            if self.max_inflight:
                self._lease(0)
        elif self.max_inflight > self.inflight + 2 * self.step:
            self._lease(self.inflight + self.step)

    def next(self):
        if self.waiting and self.inflight >= self.max_inflight and not self._grow(self.inflight + 1):
            return None
        got = super().next()
        if not self.waiting:
            self._set_short(False)
        return got

    def withdraw(self) -> list:
        self._set_short(False)
        return super().withdraw()

    def release(self) -> None:
        """The server closed: the worker's lease goes back."""
        if self.shared.off is not None:
            self._lease(0)
