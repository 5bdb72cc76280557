"""Large msgpack values are encoded straight into the channel's shared memory: a request by the
client's method in C, a result by the worker's loop (speedysvc/_c, IN_PLACE_MIN = 64 KiB).
What must hold: the same values arrive whatever the size, across the threshold and across the
channel's growth; what msgpack's C encoder does not take goes the usual way; and no payload is
encoded into a bytes object first (counted with tracemalloc on each side)."""
import threading
import tracemalloc

import pytest

from speedysvc import LocalService, connect
from speedysvc import _shmcore as core
from speedysvc.errors import EncodeError
from shm_services import Bulky, BulkyAlone

IN_PLACE_MIN = core.IN_PLACE_MIN


@pytest.fixture(scope="module")
def bulky():
    with LocalService(Bulky, workers=2) as svc:
        yield svc


@pytest.fixture
def client(bulky):
    with connect(Bulky, timeout=60) as c:
        yield c


@pytest.mark.parametrize("n", [IN_PLACE_MIN - 64, IN_PLACE_MIN - 4, IN_PLACE_MIN, IN_PLACE_MIN + 1,
                               1 << 20, (4 << 20) + 3, 16 << 20])
def test_values_across_the_threshold_and_the_channel_s_growth_arrive_whole(client, n):
    data = bytes(range(256)) * (n // 256) + b"z" * (n % 256)
    assert client.echo(data) == data                       # grows the channel when it must
    assert client.echo(data) == data                       # then in place, in the grown channel
    assert client.make(n) == b"x" * n
    text = "é" * (n // 2)
    assert client.echo(text) == text
    nested = [{"k": [i, -i, i * 1.5, None, True, "s" * 40]} for i in range(n // 64)]
    assert client.echo(nested) == nested


def test_large_values_interleave_with_small_ones_on_the_same_channel(client):
    big = b"b" * (2 << 20)
    for i in range(20):
        assert client.echo(i) == i
        assert client.echo(big) == big
        assert client.echo([i] * 10) == [i] * 10


def test_what_msgpack_s_c_encoder_does_not_take_goes_the_usual_way(client):
    class Odd:
        pass
    with pytest.raises(EncodeError, match="echo"):
        client.echo([b"x" * (1 << 20), Odd()])
    with pytest.raises(EncodeError, match="return value of make_odd"):
        client.make_odd(1 << 20)
    big_int = [2 ** 70] + [b"y" * (1 << 20)]               # a value msgpack itself refuses
    with pytest.raises(EncodeError):
        client.echo(big_int)
    assert client.echo(b"a" * (1 << 20)) == b"a" * (1 << 20)


def test_threads_with_large_calls_each_get_their_own_value(bulky):
    errors = []

    def run(k):
        try:
            with connect(Bulky, timeout=60) as c:
                for i in range(15):
                    v = bytes([k]) * ((1 << 20) + 1000 * i + k)
                    assert c.echo(v) == v
        except Exception as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_large_request_is_not_encoded_into_a_bytes_object_first(client):
    data = b"q" * (8 << 20)
    assert client.echo(data) == data                       # the channel grows on the first call
    tracemalloc.start()
    try:
        assert len(client.echo(data)) == len(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * len(data)                          # the result only (before: request + result)


def test_a_large_result_is_not_encoded_into_a_bytes_object_first():
    n = 8 << 20
    with LocalService(BulkyAlone, workers=1), connect(BulkyAlone, timeout=60) as c:   # one worker runs all
        assert len(c.make(n)) == n                         # the channel grows once
        assert c.traced(True) == 0
        assert len(c.make(n)) == n
        peak = c.traced(False)
    assert n <= peak < 1.5 * n                             # the result object only (before: it and its encoding)


def test_a_large_call_withdrawn_while_its_service_stops_goes_again_once_it_is_back():
    """A request encoded in place was posted but no worker took it when the service stopped
    (to restart): the call is withdrawn and, once the service serves again, sent again, whole."""
    from conftest import channel_states, wait_until
    data = b"w" * (1 << 20)
    with LocalService(BulkyAlone, workers=1) as svc, connect(BulkyAlone, timeout=60) as busy, \
            connect(BulkyAlone, timeout=60, wait=30) as c:
        assert c.echo(data) == data                        # grown: the next one goes in place
        th = threading.Thread(target=busy.pause, args=(3.0,))
        th.start()
        assert wait_until(lambda: any(w["busy"] for w in svc.segment.workers()))
        got = []

        def call():
            try:
                got.append(c.echo(data))
            except BaseException as e:   # reported below
                got.append(e)

        caller = threading.Thread(target=call)
        caller.start()
        try:
            assert wait_until(lambda: core.ST_REQUEST in {s for _, s in channel_states(svc).values()})
            seg = svc.segment
            seg.set_owner_flag(core.OWNER_RESTARTING, True)
            seg.set_state(core.SVC_STOPPED)
            # the caller withdraws its call (no worker took it) and waits for the service
            assert wait_until(lambda: core.ST_REQUEST not in {s for _, s in channel_states(svc).values()})
            seg.set_state(core.SVC_SERVING)
            seg.set_owner_flag(core.OWNER_RESTARTING, False)
        finally:
            caller.join(30)
            th.join(30)
        assert len(got) == 1 and not isinstance(got[0], BaseException), got
        assert got[0] == data


def test_a_result_over_the_payload_limit_is_refused_even_when_it_fits_the_channel():
    # the channel (1 MiB as made, and doubling as it grows) can hold more than max_payload
    from speedysvc import PayloadTooLarge
    limit = 300_000
    with LocalService(BulkyAlone, workers=1, max_payload=limit), connect(BulkyAlone, timeout=60) as c:
        for n in (limit + 1000, 900_000):
            with pytest.raises(PayloadTooLarge, match="response"):
                c.make(n)
        assert c.make(limit - 100) == b"x" * (limit - 100)


def test_a_request_over_the_payload_limit_is_refused_even_when_it_fits_the_channel():
    from speedysvc import PayloadTooLarge
    limit = 300_000
    with LocalService(BulkyAlone, workers=1, max_payload=limit), connect(BulkyAlone, timeout=60) as c:
        for n in (limit + 1000, 900_000):                  # in place (msgpack's C encoder) and not
            with pytest.raises(PayloadTooLarge, match="request"):
                c.echo(b"r" * n)
            with pytest.raises(PayloadTooLarge, match="request"):
                c.echo(bytearray(b"r" * n))                # (msgpack's own encoder: the usual way)
        assert c.echo(b"r" * (limit - 100)) == b"r" * (limit - 100)
