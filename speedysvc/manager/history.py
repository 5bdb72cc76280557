"""A service's recent history, for the web interface's charts: one point every
``HISTORY_INTERVAL`` seconds for the last hour, each computed from the counters the
workers keep in the service segment (``ServiceSegment.method_stats``).

What a point says must not mislead: a stopped service's points say 0 calls/s and no
latency; a quantile is interpolated within its power-of-two bucket and never above the
slowest call the interval can have held (then it says so: ``*_bound``); counters that
start again from zero (a new segment: the service was restarted) are taken from zero,
not against the old segment's."""
from __future__ import annotations

import collections
import time

from .. import _shmcore as core

HISTORY_INTERVAL = 2.0          # seconds between two points
HISTORY_POINTS = 1800           # one hour of them


def bucket_edges_us(b: int) -> tuple[float, float | None]:
    """The range of histogram bucket ``b``, in µs: [2**(b-1), 2**b), bucket 0 [0, 1); the last
    is open (None: no upper edge)."""
    lo = 0.0 if b == 0 else float(2 ** (b - 1))
    return lo, None if b >= core.M_NBUCKETS - 1 else float(2 ** b)


def top_of(buckets: list[int]) -> float | None:
    """The upper edge, in ms, of the highest bucket holding a call (None: none, or the open last
    bucket): no call counted in ``buckets`` took longer."""
    for b in range(len(buckets) - 1, -1, -1):
        if buckets[b]:
            hi = bucket_edges_us(b)[1]
            return None if hi is None else hi / 1000.0
    return None


def quantile(buckets: list[int], q: float, ceiling_ms: float | None = None) -> tuple[float | None, bool]:
    """(value in ms, bound) of quantile ``q`` of the histogram ``buckets`` (bucket ``b``
    counts calls under 2**b µs and at least 2**(b-1); the last, everything slower): the
    value is interpolated linearly within its bucket, then held at ``ceiling_ms`` (the
    slowest call the histogram can hold) if above it: ``bound`` is then True, the value being
    that upper bound rather than an estimate.  (None, False) when there are no calls."""
    total = sum(buckets)
    if not total:
        return None, False
    rank, seen = q * total, 0
    value = None
    for b, n in enumerate(buckets):
        if n and seen + n >= rank:
            lo, hi = bucket_edges_us(b)
            if hi is None:   # the open last bucket: only the ceiling can say
                value = None
            else:
                value = (lo + (hi - lo) * max(0.0, rank - seen) / n) / 1000.0
            break
        seen += n
    if value is None:
        return (ceiling_ms, True) if ceiling_ms is not None else (bucket_edges_us(len(buckets) - 1)[0] / 1000.0, True)
    if ceiling_ms is not None and value > ceiling_ms:
        return ceiling_ms, True
    return value, False


def percentile(buckets: list[int], q: float, ceiling_ms: float | None = None) -> float | None:
    """``quantile``'s value only."""
    return quantile(buckets, q, ceiling_ms)[0]


def _sub(now: list[int], before: list[int] | None) -> list[int]:
    return list(now) if before is None else [max(0, a - b) for a, b in zip(now, before)]


def _ceiling(delta: list[int], max_ns: int, max_before: int | None) -> float | None:
    """The slowest call ``delta`` (an interval's histogram) can hold, in ms: the method's maximum
    if it rose in the interval (then it is this interval's own), else the lower of the maximum
    seen so far and the top of the highest bucket the interval filled."""
    if max_before is None or max_ns > max_before:
        return max_ns / 1e6 if max_ns else top_of(delta)
    top = top_of(delta)
    return max_ns / 1e6 if top is None else min(max_ns / 1e6, top)


class _Snapshot:
    """The counters of one sample, per method (cumulative, as the segment has them)."""

    __slots__ = ("origin", "methods", "refused", "lost")

    def __init__(self, origin, methods: dict[str, dict], refused: int, lost: int):
        self.origin, self.methods, self.refused, self.lost = origin, methods, refused, lost


def _interval(m: dict, before: dict | None, dt: float) -> dict:
    """One method's figures over an interval: its counters now (``m``) against ``before``."""
    calls = max(0, m["calls"] - before["calls"]) if before else m["calls"]
    errors = max(0, m["errors"] - before["errors"]) if before else m["errors"]
    delta = _sub(m["buckets"], before and before["buckets"])
    ceiling = _ceiling(delta, m["max_ns"], before and before["max_ns"])
    wait_delta = _sub(m.get("wait_buckets") or [0] * core.M_NBUCKETS, before and before.get("wait_buckets"))
    wait_ceiling = _ceiling(wait_delta, m.get("wait_max_ns", 0), before and before.get("wait_max_ns", 0))
    p50, p50_bound = quantile(delta, 0.5, ceiling)
    p99, p99_bound = quantile(delta, 0.99, ceiling)
    wait_p50, wait_p50_bound = quantile(wait_delta, 0.5, wait_ceiling)
    wait_p99, wait_p99_bound = quantile(wait_delta, 0.99, wait_ceiling)
    return {"calls_per_s": calls / dt, "errors_per_s": errors / dt,
            "p50_ms": p50, "p50_bound": p50_bound, "p99_ms": p99, "p99_bound": p99_bound,
            "max_ms": ceiling if calls else None,
            "wait_p50_ms": wait_p50, "wait_p50_bound": wait_p50_bound,
            "wait_p99_ms": wait_p99, "wait_p99_bound": wait_p99_bound,
            "_delta": delta, "_ceiling": ceiling, "_wait_delta": wait_delta, "_wait_ceiling": wait_ceiling}


def stopped_figures() -> dict:
    """What a point says of calls while nothing serves: none."""
    return {"calls_per_s": 0.0, "errors_per_s": 0.0, "p50_ms": None, "p50_bound": False,
            "p99_ms": None, "p99_bound": False, "max_ms": None, "wait_p50_ms": None,
            "wait_p50_bound": False, "wait_p99_ms": None, "wait_p99_bound": False}


class History:
    """The points of the last hour.  Each has ``t`` (time.time()), the gauges ``record`` is
    given (``state``, ``workers``, ``pending``, ``busy``, ``cpu``, ``rss``), and, from the
    second sample on, over the interval that ended: ``calls_per_s``, ``errors_per_s``,
    ``p50_ms``/``p99_ms`` (service time) and ``wait_p50_ms``/``wait_p99_ms`` (wait for a
    worker), each with a ``*_bound`` flag, ``max_ms``, ``refused_per_s``, ``lost_per_s``, and
    ``methods``: per method, the same call figures (docs/http-api.md)."""

    def __init__(self, points: int = HISTORY_POINTS, interval: float = HISTORY_INTERVAL):
        self.points: collections.deque = collections.deque(maxlen=points)
        self.interval = interval
        self._last: tuple[float, _Snapshot] | None = None   # (when, the counters then)
        self.known_methods: list[str] = []

    def __iter__(self):
        return iter(self.points)

    def latest(self) -> dict:
        return self.points[-1] if self.points else {}

    def due(self, now: float) -> bool:
        return self._last is None or now - self._last[0] >= self.interval

    def record(self, stats: dict[str, dict] | None, now: float, *, origin=None, origin_since: float | None = None,
               refused: tuple[int, int] = (0, 0), **gauges) -> None:
        """Add a point from the per-method ``stats`` (None: nothing serves, the service is
        stopped) and the ``gauges`` measured now (``now``: time.monotonic()).  ``origin`` names
        where the counters come from (the segment): when it changes, or a counter went back,
        they started again from zero, at ``origin_since`` (time.monotonic()) if given.
        ``refused``: the (refused, lost) calls so far, which only grow."""
        snap = _Snapshot(origin, stats or {}, *refused)
        point = {"t": time.time(), **gauges}
        if self._last is not None:
            t0, last = self._last
            reset = stats is not None and (origin != last.origin or any(
                m["calls"] < last.methods.get(name, {}).get("calls", 0) for name, m in stats.items()))
            if reset and origin_since is not None:
                t0 = max(t0, min(origin_since, now - 1e-3))
            dt = max(now - t0, 1e-6)
            before = {} if reset else last.methods
            point["refused_per_s"] = max(0, snap.refused - last.refused) / dt
            point["lost_per_s"] = max(0, snap.lost - last.lost) / dt
            if stats is None:
                point.update(stopped_figures())
                point["methods"] = {name: stopped_figures() for name in self.known_methods}
            else:
                self._figures(point, stats, before, dt)
            self.points.append(point)
        self._last = (now, snap)

    def _figures(self, point: dict, stats: dict[str, dict], before: dict[str, dict], dt: float) -> None:
        per = {name: _interval(m, before.get(name), dt) for name, m in sorted(stats.items())}
        if per:
            self.known_methods = list(per)
        n = core.M_NBUCKETS
        delta = [sum(f["_delta"][b] for f in per.values()) for b in range(n)]
        wait_delta = [sum(f["_wait_delta"][b] for f in per.values()) for b in range(n)]
        ceilings = [f["_ceiling"] for f in per.values() if any(f["_delta"])]
        wait_ceilings = [f["_wait_ceiling"] for f in per.values() if any(f["_wait_delta"])]
        ceiling = max(ceilings) if ceilings and None not in ceilings else None
        wait_ceiling = max(wait_ceilings) if wait_ceilings and None not in wait_ceilings else None
        p50, p50_bound = quantile(delta, 0.5, ceiling)
        p99, p99_bound = quantile(delta, 0.99, ceiling)
        wait_p50, wait_p50_bound = quantile(wait_delta, 0.5, wait_ceiling)
        wait_p99, wait_p99_bound = quantile(wait_delta, 0.99, wait_ceiling)
        point.update({
            "calls_per_s": sum(f["calls_per_s"] for f in per.values()),
            "errors_per_s": sum(f["errors_per_s"] for f in per.values()),
            "p50_ms": p50, "p50_bound": p50_bound, "p99_ms": p99, "p99_bound": p99_bound,
            "max_ms": ceiling if any(delta) else None,
            "wait_p50_ms": wait_p50, "wait_p50_bound": wait_p50_bound,
            "wait_p99_ms": wait_p99, "wait_p99_bound": wait_p99_bound,
            "methods": {name: {k: v for k, v in f.items() if not k.startswith("_")} for name, f in per.items()},
        })
