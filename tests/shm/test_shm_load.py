"""Many clients and workers at once, large payloads, and threads sharing a client."""
import multiprocessing
import os
import threading

import pytest

from speedysvc import LocalService, PayloadTooLarge, connect
from services import Kitchen

MiB = 1 << 20


def client_process(index, calls, queue):
    errors = 0
    try:
        with connect(Kitchen, timeout=60) as c:
            for i in range(calls):
                value = [index, i, "x" * (i % 50)]
                if c.echo_msgpack(value) != value:
                    errors += 1
                if i % 100 == 0 and c.echo_raw(b"%d-%d" % (index, i)) != b"%d-%d" % (index, i):
                    errors += 1
        queue.put((index, errors, None))
    except BaseException as e:  # reported to the test
        queue.put((index, errors, repr(e)))


def test_8_clients_4_workers_5000_calls_each_no_lost_or_mismatched_reply():
    ctx = multiprocessing.get_context("fork")
    with LocalService(Kitchen, workers=4) as svc:
        queue = ctx.Queue()
        procs = [ctx.Process(target=client_process, args=(i, 5000, queue)) for i in range(8)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=240) for _ in procs]
        for p in procs:
            p.join(30)
        assert sorted(r[0] for r in results) == list(range(8))
        assert all(r[2] is None for r in results), results
        assert sum(r[1] for r in results) == 0
        served = svc.segment.workers()
        assert sum(w["calls"] for w in served) >= 8 * 5050
        assert sum(1 for w in served if w["calls"] > 0) >= 2  # more than one worker took calls


def test_threads_share_one_client():
    with LocalService(Kitchen, workers=2), connect(Kitchen) as c:
        bad = []

        def run(t):
            for i in range(1000):
                if c.echo_msgpack([t, i]) != [t, i]:
                    bad.append((t, i))

        threads = [threading.Thread(target=run, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not bad


@pytest.fixture(scope="module")
def kitchen():
    with LocalService(Kitchen, workers=1, max_payload=200 * MiB) as svc:
        yield svc


def test_64_mib_raw_round_trip(kitchen):
    payload = os.urandom(1024) * (64 * 1024)
    with connect(Kitchen) as c:
        assert c.echo_raw(payload) == payload
        assert c.raw_tail(payload) == payload[1:]
        assert c.raw_copy(payload) == payload
        assert c.echo_raw(b"small again") == b"small again"


def test_64_mib_msgpack_and_pickle(kitchen):
    payload = b"\x01\x02" * (32 * MiB)
    with connect(Kitchen) as c:
        assert c.echo_msgpack(payload) == payload
        assert c.echo_pickle({"blob": payload})["blob"] == payload


def test_small_request_large_response_grows_the_channel_on_the_worker_side(kitchen):
    with connect(Kitchen) as c:
        for n in (10, 3 * MiB, 10, 40 * MiB, 100):
            assert c.big(n) == b"z" * n


def test_growing_request_sizes(kitchen):
    with connect(Kitchen) as c:
        for n in (1, MiB - 100, MiB, MiB + 1, 5 * MiB, 17 * MiB + 3):
            assert c.size_of(b"a" * n) == n


def test_payload_limit():
    from services import Limited
    with LocalService(Limited, workers=1, max_payload=2 * MiB), connect(Limited) as c:
        with pytest.raises(PayloadTooLarge, match="request"):
            c.echo_raw(b"x" * (3 * MiB))
        with pytest.raises(PayloadTooLarge, match="response"):
            c.big(3 * MiB)
        assert c.big(MiB) == b"z" * MiB
        assert c.echo_raw(b"ok") == b"ok"
