"""end_phase (the worker loop's `finally` after a call it handed to Python) marks the entry idle
even when the phase is no longer the loop's: after serve_one's reply (publish_reply ends the SHM
phase) the TCP thread may have taken the turn (tcp_begin: W_STATE BUSY, W_PHASE TCP)."""
import os

from speedysvc import _shmcore as core
from speedysvc.shm import segment


def test_end_phase_does_not_mark_a_tcp_call_idle():
    seg = segment.ServiceSegment.create(f"phase_state_{os.getpid()}")
    try:
        idx = seg.register_worker(os.getpid())
        r, off = seg.region, seg.worker_offset(idx)
        # the reply of a Python-path call went out: phase IDLE; the TCP thread takes its turn
        assert r.tcp_begin(idx, -1)
        assert r.load32(off + core.W_PHASE) & core.PHASE_TCP
        assert r.load32(off + core.W_STATE) == core.WORKER_BUSY
        # ... and only then does the loop's `finally: region.end_phase(index)` run
        r.end_phase(idx)
        assert r.load32(off + core.W_PHASE) & core.PHASE_TCP          # (the CAS left the phase alone)
        assert r.load32(off + core.W_STATE) == core.WORKER_BUSY, "a worker running a TCP call shows idle"
        r.tcp_end(idx, -1, 0)
    finally:
        seg.destroy()
