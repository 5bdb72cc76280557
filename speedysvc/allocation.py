"""How a process that passes large payloads allocates them: one policy, for clients and workers.

glibc serves an allocation of 128 KiB or more (at first; its threshold then adapts) with a
fresh ``mmap`` and unmaps it at ``free``.  A process that encodes or decodes a 16 MiB payload
per call then takes ~4,000 page faults per buffer, per call: measured on a 16 MiB msgpack echo
over shared memory, that is more than half of the call (737 against 1,627 MB/s).  So every
process that opens a speedysvc transport, and every worker, keeps buffers of up to
``MMAP_THRESHOLD`` in the heap and gives the heap's top back to the kernel only when more than
``TRIM_THRESHOLD`` of it is free: a process may keep up to that much freed memory.

The TCP side receives a large frame into an anonymous private mapping of its own
(``large_buffer``; see ``speedysvc.tcp.framing.lazy_buffer`` for why a mapping).  A fresh
mapping faults in every page on the first write, and the kernel zeroes each: on a 16 MiB raw echo
served by a worker that was a fifth of the call (1,199 against 1,517 MB/s).  So a process keeps
one such mapping, of up to ``KEPT_MAPPING`` bytes, and hands it out again once no view of it is
alive (none kept by a handler, no write in progress): after a large call a process holds up to
that much more memory, and no more however many calls it took.

Opt out with ``SPEEDYSVC_KEEP_LARGE_ALLOCATIONS=0`` (both); glibc's own ``MALLOC_MMAP_THRESHOLD_``
or ``MALLOC_TRIM_THRESHOLD_`` in the environment win over the heap's policy too.
"""
from __future__ import annotations

import mmap
import os
import threading

from . import _shmcore as core

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
KEPT_MAPPING = 32 << 20   # the largest private mapping a process keeps for the next large payload
KEPT_GRAIN = 2 << 20      # a kept mapping's size is a multiple of this (a huge page)
ENV = "SPEEDYSVC_KEEP_LARGE_ALLOCATIONS"

_applied = False


def keep_large_allocations() -> bool:
    """Apply the policy once per process (unless opted out); whether it is in force."""
    global _applied
    if not _applied:
        if _opted_out() or \
                any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
            return False
        core.keep_large_allocations(MMAP_THRESHOLD, TRIM_THRESHOLD)
        _applied = True
    return True


def _opted_out() -> bool:
    return os.environ.get(ENV, "1").strip() == "0"


# The one mapping this process keeps, and the lock under which it is found free and a view of it
# taken (two threads may receive large frames: the event loop's and an inflating one).
_kept = None
_kept_lock = threading.Lock()


def _new_lock() -> None:
    global _kept_lock
    _kept_lock = threading.Lock()   # (a child of fork: another thread may have held it)


os.register_at_fork(after_in_child=_new_lock)


def _in_use(mapping) -> bool:
    """Whether a view of ``mapping`` is alive: a memoryview (and whatever holds one: a handler,
    a reply being written, a PickleBuffer) or a Py_buffer C code holds.  An mmap counts the
    buffers it exported and refuses to resize while any is; a resize to its own size changes
    nothing (mremap returns at once)."""
    try:
        mapping.resize(len(mapping))
    except BufferError:
        return True
    return False


def large_buffer(length: int, lead: int = 0):
    """A writable buffer of exactly ``length`` bytes that starts ``lead`` bytes after a page
    boundary, in an anonymous private mapping (huge pages where the kernel allows them): the
    mapping this process keeps, if it is free and large enough, else a new one.  A buffer of
    the kept mapping holds earlier bytes: write all of it before reading any.  The process keeps
    the newest mapping of at most ``KEPT_MAPPING`` bytes (rounded up to ``KEPT_GRAIN``) made
    while the one it kept was free; a larger or a busy one gives a mapping of its own
    (``framing.free_buffer`` unmaps it)."""
    global _kept
    size = length + lead
    if size <= KEPT_MAPPING and not _opted_out():
        with _kept_lock:
            kept = _kept
            if kept is None or not _in_use(kept):
                if kept is None or len(kept) < size:
                    kept = _kept = _new_mapping(-(-size // KEPT_GRAIN) * KEPT_GRAIN)   # (the old one goes)
                return memoryview(kept)[lead:size]
    buf = _new_mapping(size)
    return memoryview(buf)[lead:] if lead else buf


def _new_mapping(size: int):
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):   # not Linux, or no transparent huge pages
        pass
    return buf


def is_kept(mapping) -> bool:
    return mapping is _kept and mapping is not None
