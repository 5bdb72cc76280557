"""``percentile`` (speedysvc.manager.pool): the latency quantiles the manager reports (p50, p99)
from the workers' histograms, whose bucket ``b`` counts calls under 2**b µs."""
import pytest

from speedysvc import _shmcore as core
from speedysvc.manager.history import percentile


@pytest.mark.parametrize("buckets", [[], [0], [0] * core.M_NBUCKETS])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.99, 1.0])
def test_no_calls_no_percentile(buckets, q):
    assert percentile(buckets, q) is None


@pytest.mark.parametrize("buckets, q, ms", [
    # one bucket: every quantile is its bound (2**0 µs = 0.001 ms)
    ([1], 0.0, 0.001),
    ([1], 0.5, 0.001),
    ([1], 1.0, 0.001),
    ([7], 0.99, 0.001),
    # every call in the last bucket
    ([0] * 10 + [7], 0.5, 1.024),
    ([0] * 10 + [7], 1.0, 1.024),
    ([0] * (core.M_NBUCKETS - 1) + [1], 0.99, 2 ** (core.M_NBUCKETS - 1) / 1000),
    # the bucket in which the running count reaches q of the calls (ties go to the lower bucket)
    ([50, 50], 0.5, 0.001),
    ([50, 50], 0.51, 0.002),
    ([50, 50], 0.99, 0.002),
    ([1, 1, 1], 0.5, 0.002),            # rank 1.5 of 3
    ([1, 98, 1], 0.99, 0.002),
    ([1, 98, 1], 0.995, 0.004),
    ([99, 0, 1], 0.99, 0.001),
    ([99, 0, 1], 0.995, 0.004),
    ([99, 0, 1], 1.0, 0.004),           # q=1: the highest bucket with a call...
    ([0, 3, 0, 0], 1.0, 0.002),         # ...not the last bucket there is
    ([3, 1], 0.0, 0.001),
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5], 0.5, 1048.576),   # 2**20 µs in ms
])
def test_the_bucket_that_holds_the_quantile(buckets, q, ms):
    assert percentile(buckets, q) == pytest.approx(ms)


def test_quantiles_never_decrease_with_q():
    buckets = [3, 0, 7, 1, 0, 0, 12, 0, 1]
    values = [percentile(buckets, q / 100) for q in range(1, 101)]
    assert values == sorted(values)
    assert values[0] == percentile(buckets, 0.01) == 0.001 and values[-1] == 2 ** 8 / 1000
