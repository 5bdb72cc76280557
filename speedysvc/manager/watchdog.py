"""The call watchdog: a worker that has spent longer than ``call_timeout`` on one call is
killed (and restarted like any worker that died)."""
from __future__ import annotations


def overdue(registered: list[dict], limit: float, now_ns: int) -> list[int]:
    """The pids of the workers of ``registered`` (``ServiceSegment.workers()``) that have been
    in their current call for more than ``limit`` seconds (``now_ns``: time.monotonic_ns())."""
    if not limit:
        return []
    return [r["pid"] for r in registered
            if r["busy"] and r["claim_ns"] and (now_ns - r["claim_ns"]) / 1e9 > limit]
