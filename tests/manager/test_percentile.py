"""``quantile`` (speedysvc.manager.history): the latency quantiles the manager reports (p50, p99)
from the workers' histograms, whose bucket ``b`` counts calls under 2**b µs (and at least
2**(b-1) µs; bucket 0, under 1 µs): interpolated within the bucket, and never above the slowest
call the histogram can hold (then flagged as that bound)."""
import pytest

from speedysvc import _shmcore as core
from speedysvc.manager.history import History, percentile, quantile

N = core.M_NBUCKETS


def hist(**at):
    """A full-length histogram: hist(b5=3) has 3 calls in bucket 5."""
    out = [0] * N
    for k, n in at.items():
        out[int(k[1:])] = n
    return out


@pytest.mark.parametrize("buckets", [[], [0], [0] * N])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.99, 1.0])
def test_no_calls_no_percentile(buckets, q):
    assert percentile(buckets, q) is None
    assert quantile(buckets, q) == (None, False)


@pytest.mark.parametrize("buckets, q, ms", [
    # bucket 0 is [0, 1) µs
    (hist(b0=1), 1.0, 0.001),
    (hist(b0=2), 0.5, 0.0005),
    # bucket 10 is [512, 1024) µs: the quantile's rank within it, linearly
    (hist(b10=100), 0.5, 0.768),
    (hist(b10=100), 0.99, (512 + 512 * 0.99) / 1000),
    (hist(b10=100), 1.0, 1.024),
    # the bucket in which the running count reaches the rank, then the rank within it
    (hist(b1=50, b2=50), 0.5, 0.002),           # the top of bucket 1
    (hist(b1=50, b2=50), 0.75, 0.003),          # half-way into bucket 2: [2, 4) µs
    (hist(b1=99, b3=1), 0.99, 0.002),
    (hist(b1=99, b3=1), 0.995, 0.006),          # half-way into [4, 8) µs
])
def test_interpolated_within_the_bucket(buckets, q, ms):
    assert percentile(buckets, q) == pytest.approx(ms)


def test_never_above_the_slowest_call_and_says_so():
    """A 20 ms method: every call in [16.384, 32.768) ms; the bucket's interpolation would say up
    to 32.6 ms, above the slowest call (20.3 ms)."""
    buckets = hist(b15=1000)
    value, bound = quantile(buckets, 0.99, ceiling_ms=20.3)
    assert value == 20.3 and bound
    value, bound = quantile(buckets, 0.01, ceiling_ms=20.3)
    assert value == pytest.approx(16.384 + 16.384 * 0.01) and not bound


def test_the_open_last_bucket_takes_the_maximum():
    assert quantile(hist(**{f"b{N - 1}": 3}), 0.5, ceiling_ms=200_000.0) == (200_000.0, True)


def test_quantiles_never_decrease_with_q():
    buckets = hist(b0=3, b2=7, b3=1, b6=12, b8=1)
    values = [percentile(buckets, q / 100, 0.2) for q in range(1, 101)]
    assert values == sorted(values) and values[-1] <= 0.2


def stats(calls, bucket, max_ns, **more):
    return {"m": {"calls": calls, "errors": 0, "total_ns": 0, "max_ns": max_ns,
                  "buckets": hist(**{f"b{bucket}": calls}), "wait_ns": 0, "wait_max_ns": 0,
                  "wait_buckets": hist(b0=calls), **more}}


def test_history_points_take_a_new_origin_from_zero():
    """Counters of a new segment (a restart) are taken from zero, not against the old ones."""
    h = History()
    h.record(stats(1000, 10, 900_000), 0.0, origin="a")
    h.record(stats(3000, 10, 900_000), 2.0, origin="a")
    assert h.latest()["calls_per_s"] == 1000
    h.record(stats(1800, 10, 900_000), 4.0, origin="b", origin_since=3.0)
    assert h.latest()["calls_per_s"] == 1800   # 1800 calls since the new segment began, 1 s ago
    h.record(stats(3800, 10, 900_000), 6.0, origin="b")
    assert h.latest()["calls_per_s"] == 1000


def test_history_point_bounded_by_the_intervals_highest_bucket():
    """The method's maximum was reached long ago (in bucket 12): this interval's calls, all in
    bucket 10, are bounded by that bucket's top, not by the old maximum."""
    h = History()
    first = stats(10, 12, 3_000_000)
    h.record(first, 0.0, origin="a")
    later = stats(10, 12, 3_000_000)
    later["m"]["calls"] = 110
    later["m"]["buckets"][10] = 100
    h.record(later, 2.0, origin="a")
    p = h.latest()
    assert p["max_ms"] == 1.024 and p["p99_ms"] <= 1.024
    assert p["methods"]["m"]["calls_per_s"] == 50


def test_a_stopped_point_has_no_latency():
    h = History()
    h.record(stats(10, 10, 900_000), 0.0, origin="a")
    h.record(None, 2.0, refused=(4, 0), state="stopped")
    p = h.latest()
    assert p["calls_per_s"] == 0 and p["p99_ms"] is None and p["refused_per_s"] == 2
    assert p["methods"] == {}   # (no method seen in an interval yet)
