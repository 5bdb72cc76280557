"""How a process that passes large payloads allocates them: one policy, for clients and workers.

glibc serves an allocation of 128 KiB or more (at first; its threshold then adapts) with a
fresh ``mmap`` and unmaps it at ``free``.  A process that encodes or decodes a 16 MiB payload
per call then takes ~4,000 page faults per buffer, per call: measured on a 16 MiB msgpack echo
over shared memory, that is more than half of the call (737 against 1,627 MB/s).  So every
process that opens a speedysvc transport, and every worker, keeps buffers of up to
``MMAP_THRESHOLD`` in the heap and gives the heap's top back to the kernel only when more than
``TRIM_THRESHOLD`` of it is free: a process may keep up to that much freed memory.

Opt out with ``SPEEDYSVC_KEEP_LARGE_ALLOCATIONS=0``; glibc's own ``MALLOC_MMAP_THRESHOLD_``
or ``MALLOC_TRIM_THRESHOLD_`` in the environment win over this policy too.
"""
from __future__ import annotations

import os

from . import _shmcore as core

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
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
