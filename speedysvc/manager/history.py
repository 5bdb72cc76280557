"""A service's recent history, for the web interface's charts: one point every
``HISTORY_INTERVAL`` seconds for the last hour, each computed from the counters the
workers keep in the service segment (``ServiceSegment.method_stats``)."""
from __future__ import annotations

import collections
import time

from .. import _shmcore as core

HISTORY_INTERVAL = 2.0          # seconds between two points
HISTORY_POINTS = 1800           # one hour of them


def percentile(buckets: list[int], q: float) -> float | None:
    """The upper bound, in ms, of the histogram bucket holding quantile ``q`` (None: no calls).
    Bucket ``b`` counts calls under 2**b µs; the last one, everything slower."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for b, n in enumerate(buckets):
        seen += n
        if seen >= rank:
            return (2 ** b) / 1000.0
    return (2 ** (len(buckets) - 1)) / 1000.0


class History:
    """The points of the last hour: ``t``, ``workers``, ``pending``, ``busy``, ``cpu``, ``rss``,
    and, from the second one on, ``calls_per_s``, ``errors_per_s``, ``p50_ms``, ``p99_ms`` over
    the interval that ended."""

    def __init__(self, points: int = HISTORY_POINTS, interval: float = HISTORY_INTERVAL):
        self.points: collections.deque = collections.deque(maxlen=points)
        self.interval = interval
        self._last: tuple[float, dict] | None = None   # (when, the counters then)

    def __iter__(self):
        return iter(self.points)

    def latest(self) -> dict:
        return self.points[-1] if self.points else {}

    def due(self, now: float) -> bool:
        return self._last is None or now - self._last[0] >= self.interval

    def record(self, stats: dict[str, dict], now: float, **gauges) -> None:
        """Add a point from the per-method ``stats`` and the ``gauges`` measured now
        (``now``: time.monotonic())."""
        calls = sum(m["calls"] for m in stats.values())
        errors = sum(m["errors"] for m in stats.values())
        buckets = [sum(m["buckets"][b] for m in stats.values()) for b in range(core.M_NBUCKETS)]
        point = {"t": time.time(), **gauges}
        if self._last is not None:
            t0, last = self._last
            dt = max(now - t0, 1e-6)
            point["calls_per_s"] = max(0, calls - last["calls"]) / dt
            point["errors_per_s"] = max(0, errors - last["errors"]) / dt
            delta = [max(0, a - b) for a, b in zip(buckets, last["buckets"])]
            point["p50_ms"], point["p99_ms"] = percentile(delta, 0.5), percentile(delta, 0.99)
            self.points.append(point)
        self._last = (now, {"calls": calls, "errors": errors, "buckets": buckets})
