"""How a process that passes large payloads allocates them: one policy, for clients and workers.

glibc serves an allocation of 128 KiB or more (at first; its threshold then adapts) with a
fresh ``mmap`` and unmaps it at ``free``.  A process that encodes or decodes a 16 MiB payload
per call then takes ~4,000 page faults per buffer, per call: measured on a 16 MiB msgpack echo
over shared memory, that is more than half of the call (737 against 1,627 MB/s).  So every
process that opens a speedysvc transport, and every worker, keeps buffers of up to
``MMAP_THRESHOLD`` in the heap and gives the heap's top back to the kernel only when more than
``TRIM_THRESHOLD`` of it is free: a process may keep up to that much freed memory.

The TCP side receives a large frame into an anonymous private mapping of its own
(``private_mapping``; see ``speedysvc.tcp.framing.lazy_buffer`` for why a mapping).  A fresh
mapping faults in every page on the first write, and the kernel zeroes each: on a 16 MiB raw echo
served by a worker that was a fifth of the call (1,199 against 1,517 MB/s).  So a process keeps
one such mapping, of up to ``KEPT_MAPPING`` bytes, and hands it out again once nothing refers to
it any more (no view, no write in progress): after a large call a process holds up to that much
more memory, and no more however many calls it took.

Opt out with ``SPEEDYSVC_KEEP_LARGE_ALLOCATIONS=0`` (both); glibc's own ``MALLOC_MMAP_THRESHOLD_``
or ``MALLOC_TRIM_THRESHOLD_`` in the environment win over the heap's policy too.
"""
from __future__ import annotations

import mmap
import os
import sys

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
        if os.environ.get(ENV, "1").strip() == "0" or \
                any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
            return False
        core.keep_large_allocations(MMAP_THRESHOLD, TRIM_THRESHOLD)
        _applied = True
    return True


def _opted_out() -> bool:
    return os.environ.get(ENV, "1").strip() == "0"


# The one mapping this process keeps.  It is free when only this module refers to it: every view
# of it (a memoryview, a Py_buffer held by a write in progress) holds a reference to the mapping
# object.  (Taking it needs no lock: a thread that finds it free holds it in a local from then
# on, so any other thread's count is one more.)
_kept = None


def private_mapping(size: int):
    """``(mapping, kept)``: an anonymous private mapping of at least ``size`` bytes, in huge
    pages where the kernel allows them.  ``kept``: it is the one the process keeps for reuse,
    which may be larger than asked and hold earlier bytes (use ``size`` bytes of it, all
    written before they are read; do not close it).  The process keeps the newest mapping of
    at most ``KEPT_MAPPING`` bytes (sizes rounded up to ``KEPT_GRAIN``) that it made while
    the one it kept was free or too small."""
    global _kept
    if _opted_out():
        return _new_mapping(size), False
    kept = _kept
    # (references: the global, this local and the argument: no view of it is alive)
    free = kept is not None and sys.getrefcount(kept) == 3
    if free and len(kept) >= size:
        return kept, True
    if (kept is None or free) and size <= KEPT_MAPPING:
        buf = _new_mapping(-(-size // KEPT_GRAIN) * KEPT_GRAIN)
        _kept = buf
        if free:
            kept.close()
        return buf, True
    return _new_mapping(size), False


def _new_mapping(size: int):
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):   # not Linux, or no transparent huge pages
        pass
    return buf


def is_kept(mapping) -> bool:
    return mapping is _kept and mapping is not None
