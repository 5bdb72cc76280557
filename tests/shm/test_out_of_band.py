"""numpy arrays (and other pickle protocol 5 buffers) through @pickle_method without copies:
the worker reads a large argument in place, as a read-only view of the call's shared memory;
the client gets a result of its own; a view kept past the call stays valid (the channel moves
on) or, for a bare PickleBuffer view, fails loudly.  See docs/shm-protocol.md, "Out-of-band
buffers"."""
import pickle
import struct

import pytest

np = pytest.importorskip("numpy")

from speedysvc import LocalService, codecs, connect, connect_async  # noqa: E402
from speedysvc.codecs import outofband  # noqa: E402
from speedysvc.errors import DecodeError, WorkerDied  # noqa: E402
from shm_services import Arrays, ArraysAlone  # noqa: E402

MiB = 1 << 20


@pytest.fixture(scope="module")
def arrays():
    with LocalService(Arrays, workers=1) as svc:
        yield svc


@pytest.fixture
def client(arrays):
    with connect(Arrays, timeout=60) as c:
        yield c


@pytest.mark.parametrize("dtype,n", [(np.float64, 8192), (np.float64, MiB), (np.int32, 3 * MiB + 7),
                                     (np.uint8, 16 * MiB), (np.float32, 100_000)])
def test_arrays_round_trip_and_are_read_in_place(client, dtype, n):
    a = (np.arange(n) % 251).astype(dtype)
    assert client.total(a) == pytest.approx(float(a.sum()))
    back = client.echo(a)
    assert back.dtype == a.dtype and np.array_equal(back, a)
    assert np.array_equal(client.doubled(a), a * 2)
    if a.nbytes >= codecs.pickle.OUT_OF_BAND_MIN:
        # a read-only view of the call's shared memory, page-aligned there
        assert client.how(a) == ("ndarray", False, False, 0)
    else:
        assert client.how(a)[:2] == ("ndarray", True)


def test_a_result_is_the_client_s_own_and_survives_later_calls(client):
    a, b = np.full(MiB, 1.0), np.full(MiB, 2.0)
    ra = client.doubled(a)
    rb = client.doubled(b)
    for _ in range(3):
        client.echo(np.full(2 * MiB, 7.0))
    assert (ra == 2.0).all() and (rb == 4.0).all()
    assert ra.flags.writeable and ra.flags.owndata is False   # its own buffer, writable
    ra[0] = 5.0


def test_an_array_a_method_keeps_stays_valid_across_later_calls(client):
    a = np.arange(MiB, dtype=np.float64)
    assert client.keep(a) == float(a.sum())
    for k in range(5):                      # later calls on the same channel write their requests
        assert client.total(np.full(2 * MiB, float(k))) == 2 * MiB * k
        assert client.echo(np.full(MiB, -1.0))[0] == -1.0
    assert client.kept_total() == float(a.sum())


def test_a_method_that_keeps_an_array_from_a_channel_of_the_first_size_answers_right():
    # the channel moves to a new segment of the same size as the one the array stays in: the
    # caller reads the answer from the new one (not what its old mapping holds at that offset)
    a = np.arange(20_000, dtype=np.float64)
    with LocalService(ArraysAlone, workers=1), connect(ArraysAlone, timeout=60) as c:
        for k in range(3):
            assert c.keep(a + k) == float((a + k).sum())
            assert c.total(np.full(20_000, 5.0)) == 100_000.0   # the next request, same channel
            assert c.kept_total() == float((a + k).sum())


def test_a_pickle_buffer_view_kept_past_the_call_fails_loudly(client):
    assert client.keep_view(pickle.PickleBuffer(bytearray(b"abcd" * 50_000))) == 200_000
    with pytest.raises(ValueError, match="released memoryview"):
        client.use_kept_view()


def test_a_slice_of_a_pickle_buffer_view_kept_past_the_call_stays_valid(client):
    # a slice shares the view's memory without being exported by it: the worker still sees it
    # kept, and the next call on the channel does not write over it
    assert client.keep_slice(pickle.PickleBuffer(bytearray(b"abcd" * 50_000))) == 200_000
    assert client.keep_view(pickle.PickleBuffer(bytearray(b"wxyz" * 50_000))) == 200_000
    assert client.keep_slice(pickle.PickleBuffer(bytearray(b"abcd" * 50_000))) == 200_000
    assert client.total(np.full(50_000, 7.0)) == 350_000.0
    assert client.use_kept_view() == b"abcd"


def test_arrays_that_are_not_contiguous_or_hold_objects_go_in_the_stream(client):
    strided = np.arange(4 * MiB, dtype=np.float64).reshape(2048, -1)[:, ::2]
    assert np.array_equal(client.echo(strided), strided)
    assert client.how(strided)[:2] == ("ndarray", True)               # unpickled from the stream: writable
    fortran = np.asfortranarray(np.arange(MiB, dtype=np.float64).reshape(1024, -1))
    back = client.echo(fortran)
    assert np.array_equal(back, fortran) and back.flags.f_contiguous
    objects = np.array([{"k": i} for i in range(20_000)], dtype=object)
    assert list(client.echo(objects)) == list(objects)


def test_buffers_beside_ordinary_values_and_keywords(client):
    a = np.arange(MiB, dtype=np.int64)
    value = {"x": a, "y": [a[:10], "text"], "z": bytearray(200_000)}
    back = client.echo(value)
    assert np.array_equal(back["x"], a) and np.array_equal(back["y"][0], a[:10]) and back["y"][1] == "text"
    assert back["z"] == bytearray(200_000)
    # a PickleBuffer arrives as a read-only memoryview of the request
    assert client.how(pickle.PickleBuffer(bytearray(200_000)))[:2] == ("memoryview", False)
    assert client.send(Arrays.total, [], {"a": a}) == float(a.sum())


def test_a_worker_killed_with_a_large_result_in_hand():
    with LocalService(ArraysAlone, workers=2), connect(ArraysAlone, timeout=60) as c:
        with pytest.raises(WorkerDied):
            c.die_with(4 * MiB)
        a = np.arange(4 * MiB, dtype=np.float64)
        assert np.array_equal(c.echo(a), a)            # the other worker, on the same channel
        assert np.array_equal(c.echo(a), a)


def malformed(stream_len, entries, total):
    head = struct.pack("<4sIQ", outofband.MAGIC, len(entries), stream_len)
    table = b"".join(struct.pack("<QQ", off, n) for off, n in entries)
    body = head + table
    return body + bytes(max(0, total - len(body)))


@pytest.mark.parametrize("payload", [
    malformed(10, [(1 << 62, 10)], 70_000),               # a buffer past the payload
    malformed(10, [(40, 70_000)], 70_000),                # overlapping the table and stream
    malformed(1 << 40, [], 70_000),                       # a stream longer than the payload
    struct.pack("<4sIQ", outofband.MAGIC, 1 << 30, 0) + bytes(70_000),   # too many buffers
    malformed(10, [], 70_000),                            # a stream that is not a pickle
])
def test_malformed_out_of_band_requests_get_a_decode_error(client, payload):
    with pytest.raises(DecodeError, match="total"):
        client._transport.call(b"total", payload, codecs.PICKLE.flags, codecs.PICKLE, 30)
    assert client.total(np.ones(100_000)) == 100_000


def test_the_worker_copies_nothing_of_a_large_argument(client):
    small = np.ones(1000)
    big = np.ones(64 * MiB // 8)
    client.rss_during(big)                                # the channel grows once
    before, _ = client.rss_during(small)
    during, total = client.rss_during(big)
    assert total == big.size
    assert during - before < 0.1 * big.nbytes             # the argument was read where it lies


def test_the_asyncio_client_sends_and_gets_arrays():
    import asyncio

    async def main():
        c = connect_async(ArraysAlone, timeout=60)
        try:
            a = np.arange(2 * MiB, dtype=np.float64)
            assert await c.total(a) == float(a.sum())
            assert np.array_equal(await c.echo(a), a)
        finally:
            await c.aclose()

    with LocalService(ArraysAlone, workers=1):
        asyncio.run(main())


def test_arrays_over_tcp_travel_as_pieces_of_the_frame():
    """Over TCP the buffers are sent as they are, beside the stream (the gateway posts the frame's
    payload into shared memory, where the worker reads them in place as over shm)."""
    with LocalService(ArraysAlone, workers=1, tcp="127.0.0.1:0", tcp_secret="s3cret", tcp_allow_pickle=True) as svc:
        with connect(ArraysAlone, svc.tcp_address, secret="s3cret", timeout=60) as c:
            a = np.arange(3 * MiB, dtype=np.float64)
            parts, total = codecs.PICKLE.dumps((a,)).parts(len(b"total"))
            assert any(isinstance(p, memoryview) and p.nbytes == a.nbytes for p in parts)   # not joined
            assert c.total(a) == float(a.sum())
            assert c.how(a) == ("ndarray", False, False, 0)   # read in place, page-aligned, in the worker
            assert np.array_equal(c.echo(a), a)
        with connect(ArraysAlone, svc.tcp_address, secret="s3cret", timeout=60, compression="zstd") as c:
            assert np.array_equal(c.echo(a), a)


def test_small_arrays_beside_a_large_one_stay_in_the_stream(client):
    # only the large buffers go beside the stream: each one takes a page at least there, and a
    # decoder takes at most MAX_BUFFERS of them
    big = np.arange(MiB // 8, dtype=np.float64)
    value = [big] + [np.full(4, float(i)) for i in range(outofband.MAX_BUFFERS + 10)]
    encoded = codecs.pickle._dumps(value)
    assert len(encoded.buffers) == 1 and len(encoded) < 2 * MiB + 64 * len(value)
    back = client.echo(value)
    assert np.array_equal(back[0], big) and all(np.array_equal(a, b) for a, b in zip(back[1:], value[1:]))


def test_a_method_that_keeps_every_argument_costs_one_new_segment_a_call():
    from speedysvc import _shmcore as core
    from conftest import channel_states
    a = np.arange(MiB, dtype=np.float64)                  # 8 MiB: more than a channel as made
    with LocalService(ArraysAlone, workers=1) as svc, connect(ArraysAlone, timeout=60) as c:
        def gen():
            (slot,) = channel_states(svc)
            return svc.segment.region.load32(svc.segment.channel_offset(slot) + core.C_DATA_GEN)
        assert c.keep(a) == float(a.sum())
        before = gen()
        for k in range(4):
            assert c.keep(a + k) == float((a + k).sum())
        # the worker moves the channel once a call (the kept array stays where it is); the
        # caller does not have to grow the new one again for a request of the same size
        assert gen() - before == 4
        assert c.kept_total() == float((a + 3).sum())


def test_over_tcp_a_kept_array_stays_valid_and_the_asyncio_client_gets_arrays():
    """The gateway is a caller like any other: it reads each answer from the segment it is in,
    also after the worker moved the channel away from a kept array."""
    import asyncio
    a = np.arange(20_000, dtype=np.float64)
    with LocalService(ArraysAlone, workers=1, tcp="127.0.0.1:0", tcp_secret="s3cret", tcp_allow_pickle=True) as svc:
        with connect(ArraysAlone, svc.tcp_address, secret="s3cret", timeout=60) as c:
            for k in range(3):
                assert c.keep(a + k) == float((a + k).sum())
                assert c.total(np.full(20_000, 5.0)) == 100_000.0
                assert c.kept_total() == float((a + k).sum())

        async def main():
            ac = connect_async(ArraysAlone, svc.tcp_address, secret="s3cret", timeout=60)
            try:
                return [await ac.echo(a * k) for k in range(3)]
            finally:
                await ac.aclose()

        for k, back in enumerate(asyncio.run(main())):
            assert np.array_equal(back, a * k)
