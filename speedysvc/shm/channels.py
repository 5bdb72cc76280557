"""The channels a calling process owns in a service segment.

A channel is a slot of the service segment's channel table with a data segment of
its own; a process acquires one per call in flight and keeps it for the next call
(``Channels.free``).  ``ShmTransport`` takes and gives back channels; so do
``_shmcore.ShmMethod`` and ``_shmcore.Gateway`` in C, under the GIL, which is what
keeps ``free`` consistent between threads (see the C extension's ``channel.c``).
"""
from __future__ import annotations

import os
import threading

from .. import _shmcore as core
from ..errors import NoFreeChannel, ServiceNotUp
from .segment import INITIAL_CHANNEL_SIZE, DataSegment, ServiceSegment, my_start_time, replace_data_segment


class Channel:
    """One channel this process owns.  ``lost`` once it was given up (to a worker
    still holding an abandoned call, or with a stopped service)."""

    __slots__ = ("slot", "data", "region", "lost")

    def __init__(self, slot: int, data: DataSegment):
        self.slot = slot
        self.lost = False
        self.set_data(data)

    def set_data(self, data: DataSegment) -> None:
        self.data = data
        self.region = data.region


class Channels:
    """A transport's attachment to the service segment and the channels it owns.
    Kept apart from the transport so a finalizer can free them without it."""

    def __init__(self, seg: ServiceSegment):
        self.seg = seg
        self.pid = os.getpid()
        self.owned: dict[int, Channel] = {}
        self.free: list[Channel] = []
        self.region = seg.region
        self.call = seg.region.call
        self.post, self.collect = seg.region.post, seg.region.collect
        self.closed = False

    def acquire(self, service: str) -> Channel:
        seg, pid = self.seg, self.pid
        if not seg.is_current():
            # restarted: a channel here would take a data segment name that is its successor's
            # (see ServiceSegment.free_channel); the caller attaches again
            raise ServiceNotUp(f"service {service!r} was restarted")
        r, n = seg.region, seg.max_channels
        start = (pid * 7919 + threading.get_ident()) % n
        for attempt in range(2):
            for i in range(n):
                slot = (start + i) % n
                off = seg.channel_offset(slot)
                if r.load32(off + core.C_OWNER_PID) == 0 and r.cas32(off + core.C_OWNER_PID, 0, pid):
                    r.store64(off + core.C_OWNER_START, my_start_time())
                    r.store32(off + core.C_STATE, core.ST_IDLE)
                    try:
                        data = replace_data_segment(seg, slot, pid, INITIAL_CHANNEL_SIZE)
                    except BaseException:
                        seg.free_channel(slot, pid)
                        raise
                    ch = self.owned[slot] = Channel(slot, data)
                    return ch
            if attempt == 0 and not seg.reap():
                break
        raise NoFreeChannel(f"service {service!r} has no free channel "
                            f"(all {n} are in use; raise max_channels)")

    def retire(self, ch: Channel) -> None:
        """Free a channel of ours that no call holds, with every data segment it ever had."""
        ch.lost = True
        if self.owned.get(ch.slot) is ch:
            del self.owned[ch.slot]
            self.seg.free_channel(ch.slot, self.pid)

    def release_all(self) -> None:
        """On close: free the channels no call is using now; a call in progress in another
        thread frees its own when it ends (see ``ShmTransport.call``)."""
        self.closed = True
        if os.getpid() != self.pid:
            return
        free, self.free = self.free, []
        for ch in free:
            self.retire(ch)
