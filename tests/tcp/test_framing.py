"""The pure parsers of the TCP protocol (``FrameParser``, ``HelloReader``) fuzzed with hypothesis,
their refusals, and the payload buffer's memory: no process, no socket."""
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from speedysvc import ProtocolError
from speedysvc.tcp import framing as fr
import tcp_helpers
from tcp_helpers import FUZZ, FUZZ_LIMIT, garbage, logs_clean, rss_mib

server_logs_clean = tcp_helpers.server_logs_clean
pytestmark = logs_clean   # no server here, and nothing else may print a traceback either


def pump(parser: fr.FrameParser, data: bytes, chunks: list[int], max_steps=4000) -> list:
    """Feed ``data`` the way a socket does (recv_into the parser's buffer), in the given chunk sizes."""
    step = max(1, len(data) // max_steps)
    frames, pos, i = [], 0, 0
    while pos < len(data):
        buf = parser.get_buffer()
        assert len(buf) > 0, "the parser offered an empty buffer (a reader would stall or see EOF)"
        n = min(len(buf), max(step, chunks[i % len(chunks)]), len(data) - pos)
        i += 1
        buf[:n] = data[pos:pos + n]
        pos += n
        frames.extend(parser.buffer_updated(n))
    return frames


def valid_frame_fields(frame: fr.Frame, accept, limit) -> None:
    assert frame.kind in accept
    assert frame.flags & ~fr.KNOWN_FRAME_FLAGS == 0
    if frame.kind == fr.CALL:
        assert 1 <= len(frame.name) <= fr.MAX_NAME
    else:
        assert frame.name == b""
    assert len(frame.payload) <= (limit + fr.COMPRESSION_OVERHEAD if frame.flags & fr.F_COMPRESSED else limit)


chunkings = st.lists(st.integers(1, 70000) | st.integers(1, 40), min_size=1, max_size=16)


accepts = st.sampled_from([frozenset({fr.CALL}), frozenset({fr.REPLY, fr.GOAWAY})])


def pump_whole_first(parser, data, chunks):
    """Like ``pump``, the way the gateway reads: each chunk is first offered to
    ``whole_frame``, and goes to ``buffer_updated`` only when that declines."""
    frames, pos, i = [], 0, 0
    while pos < len(data):
        buf = parser.get_buffer()
        n = min(len(buf), chunks[i % len(chunks)], len(data) - pos)
        buf[:n] = data[pos:pos + n]
        del buf
        pos, i = pos + n, i + 1
        whole = parser.whole_frame(n)
        if whole is None:
            frames.extend(parser.buffer_updated(n))
        else:
            assert not parser.mid_frame
            frames.append(fr.Frame(*whole))
    return frames


@FUZZ
@given(data=garbage, chunks=chunkings, accept=accepts)
def test_whole_frame_agrees_with_buffer_updated(data, chunks, accept):
    """The gateway's short way for one whole frame in one read gives exactly what the
    general parser gives, frame for frame, error for error."""
    def run(pump_with):
        parser = fr.FrameParser(FUZZ_LIMIT, accept)
        try:
            got = pump_with(parser, data, chunks)
            error = None
        except ProtocolError as e:
            got, error = [], str(e)
        return [(f.kind, f.flags, f.call_id, f.arg, f.timeout_ms, f.name, bytes(f.payload)) for f in got], error
    assert run(pump_whole_first) == run(pump)


def test_whole_frame_only_takes_exactly_one_frame():
    call = fr.call_header(7, b"m", 0, 0, 3) + b"abc"
    for data, expected in [(call, (fr.CALL, 0, 7, 0, 0, b"m", b"abc")), (call[:-1], None), (call + call, None),
                           (fr.reply_header(7, 0, 3) + b"abc", None)]:   # a kind this end does not accept
        parser = fr.FrameParser(1 << 20, frozenset({fr.CALL}))
        buf = parser.get_buffer()
        buf[:len(data)] = data
        del buf
        assert parser.whole_frame(len(data)) == expected
        assert not parser.mid_frame   # nothing consumed either way


@FUZZ
@given(data=garbage, chunks=chunkings, accept=accepts, via_feed=st.booleans())
def test_parser_fuzz_garbage_gives_frames_or_protocol_error(data, chunks, accept, via_feed):
    parser = fr.FrameParser(FUZZ_LIMIT, accept)
    frames = []
    try:
        if via_feed:
            pos, i = 0, 0
            while pos < len(data):
                n = chunks[i % len(chunks)]
                frames.extend(parser.feed(data[pos:pos + n]))
                pos, i = pos + n, i + 1
        else:
            frames = pump(parser, data, chunks)
    except ProtocolError:
        pass                           # the only way a parser may refuse input
    for frame in frames:
        valid_frame_fields(frame, accept, FUZZ_LIMIT)
    consumed = sum(fr.HEADER_SIZE + len(f.name) + len(f.payload) for f in frames)
    assert consumed <= len(data)


frame_specs = st.lists(
    st.tuples(st.sampled_from([fr.CALL, fr.REPLY]), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1), st.binary(min_size=1, max_size=fr.MAX_NAME),
              st.sampled_from([0, fr.F_COMPRESSED]),
              st.one_of(st.integers(0, 200), st.integers(0, 5000),
                        st.integers(fr.SCRATCH_SIZE - fr.HEADER_SIZE - 80, fr.SCRATCH_SIZE + 80),
                        st.integers(fr.SCRATCH_SIZE, 2 * fr.SCRATCH_SIZE))),
    min_size=1, max_size=8)


@FUZZ
@given(specs=frame_specs, chunks=chunkings, seed=st.integers(0, 255), via_feed=st.booleans())
def test_parser_round_trip_in_any_chunking(specs, chunks, seed, via_feed):
    big_source = bytes((seed + i * 7) & 0xFF for i in range(256)) * (2 * fr.SCRATCH_SIZE // 256 + 2)
    sent, wire = [], []
    for i, (kind, call_id, arg, tmo, name, flags, size) in enumerate(specs):
        payload = big_source[i:i + size]
        if kind == fr.CALL:
            wire.append(fr.call_header(call_id, name, arg, tmo, len(payload), flags))
            sent.append((kind, flags, call_id, arg, tmo, name, payload))
        else:
            wire.append(fr.reply_header(call_id, arg, len(payload), flags))
            sent.append((kind, flags, call_id, arg, 0, b"", payload))
        wire.append(payload)
    data = b"".join(wire)
    parser = fr.FrameParser(2 * fr.SCRATCH_SIZE, frozenset({fr.CALL, fr.REPLY}))
    if via_feed:
        got, pos, i = [], 0, 0
        while pos < len(data):
            n = max(chunks[i % len(chunks)], len(data) // 3000)
            got.extend(parser.feed(data[pos:pos + n]))
            pos, i = pos + n, i + 1
    else:
        got = pump(parser, data, chunks)
    assert [(f.kind, f.flags, f.call_id, f.arg, f.timeout_ms, f.name, bytes(f.payload)) for f in got] == sent
    assert not parser.mid_frame


def test_parser_refuses_each_bad_header():
    limit = 1000
    cases = {
        "unknown kind": fr.FRAME.pack(9, 0, 3, 1, 0, 0, 1),
        "kind not accepted here": fr.reply_header(1, 0, 1),
        "unknown flag bit": fr.FRAME.pack(fr.CALL, 0x2, 3, 1, 0, 0, 1),
        "empty method name": fr.FRAME.pack(fr.CALL, 0, 0, 1, 0, 0, 1),
        "method name too long": fr.FRAME.pack(fr.CALL, 0, fr.MAX_NAME + 1, 1, 0, 0, 1),
        "payload above the limit": fr.call_header(1, b"abc", 0, 0, limit + 1),
        "compressed payload above the limit": fr.call_header(1, b"abc", 0, 0,
                                                             limit + fr.COMPRESSION_OVERHEAD + 1, fr.F_COMPRESSED),
        "payload of 2**64-1": fr.call_header(1, b"abc", 0, 0, 2**64 - 1),
    }
    for what, header in cases.items():
        with pytest.raises(ProtocolError):
            fr.FrameParser(limit, frozenset({fr.CALL})).feed(header)
            pytest.fail(f"{what}: accepted")
    with pytest.raises(fr.FrameTooLarge):
        fr.FrameParser(limit, frozenset({fr.CALL})).feed(cases["payload above the limit"])
    # the limits themselves are accepted
    p = fr.FrameParser(limit, frozenset({fr.CALL}))
    assert p.feed(fr.call_header(1, b"x" * fr.MAX_NAME, 0, 0, limit) + b"y" * limit)[0].payload == b"y" * limit
    p.feed(fr.call_header(2, b"x", 0, 0, limit + fr.COMPRESSION_OVERHEAD, fr.F_COMPRESSED))
    assert p.mid_frame


hello_bodies = st.dictionaries(st.text(max_size=20), st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.text(max_size=50), st.binary(max_size=50),
    st.lists(st.integers(0, 10), max_size=5)), max_size=10)


@FUZZ
@given(data=st.binary(max_size=600) | st.builds(lambda h, b: h + b, st.sampled_from(
    [b"SSVC", b"SSVC\x01\x02", fr.HELLO.pack(fr.MAGIC, 1, 2, 5), fr.HELLO.pack(fr.MAGIC, 1, 2, 0xFFFF),
     fr.HELLO.pack(fr.MAGIC, 7, 9, 1)]), st.binary(max_size=300)),
       chunks=chunkings)
def test_hello_reader_fuzz_garbage(data, chunks):
    reader = fr.HelloReader()
    pos, i = 0, 0
    try:
        while pos < len(data):
            n = chunks[i % len(chunks)]
            msg = reader.feed(data[pos:pos + n])
            pos, i = pos + n, i + 1
            if msg is not None:
                msg_type, version, body, leftover = msg
                assert isinstance(body, dict) and isinstance(leftover, bytes)
                assert data.startswith(fr.MAGIC)
                break
    except ProtocolError:
        return
    # nothing refused: what arrived is a (prefix of a) message that starts like one
    assert fr.MAGIC.startswith(data[:4]) or data[:4] == fr.MAGIC


@FUZZ
@given(msg_type=st.integers(0, 255), body=hello_bodies, trailing=st.binary(max_size=200), chunks=chunkings)
def test_hello_reader_round_trip(msg_type, body, trailing, chunks):
    message = fr.pack_hello(msg_type, body)
    data = message + trailing
    reader = fr.HelloReader()
    pos, i, msg = 0, 0, None
    while msg is None:
        assert pos < len(data), "complete message not recognised"
        n = chunks[i % len(chunks)]
        msg = reader.feed(data[pos:pos + n])
        pos, i = pos + n, i + 1
    assert msg[:3] == (msg_type, fr.VERSION, body)
    assert msg[3] == data[len(message):pos]


def test_a_large_payload_buffer_commits_memory_only_as_bytes_arrive():
    # a header may claim up to the payload limit before sending anything: its buffer must not
    # cost that much memory up front
    before = rss_mib(os.getpid())
    buf = fr.lazy_buffer(1 << 30)
    try:
        buf[:4096] = b"x" * 4096
        buf[(1 << 30) - 1] = 7
        assert rss_mib(os.getpid()) - before < 64
        assert buf[0] == ord("x") and buf[(1 << 30) - 1] == 7 and buf[1 << 20] == 0
    finally:
        buf.close()


def test_the_scratch_buffer_grows_only_as_bytes_arrive_and_shrinks_back_between_frames():
    """A header may announce up to SCRATCH_SIZE: the buffer grows as reads fill it (never for
    what a header announces), and ``shrink`` gives it back once the frame is complete."""
    p = fr.FrameParser(1 << 20, frozenset((fr.CALL,)), fr.SERVER_SCRATCH)
    payload = bytes(range(256)) * 800          # 200 KiB: below SCRATCH_SIZE, above the first buffer
    frame = fr.call_header(7, b"echo", 0, 0, len(payload)) + payload
    assert p.buffered == fr.SERVER_SCRATCH
    done, pos = [], 0
    while pos < len(frame):
        buf = p.get_buffer()
        assert len(buf) > 0
        assert p.buffered <= max(fr.SERVER_SCRATCH, 2 * pos + 2 * fr.HEADER_SIZE), (p.buffered, pos)
        n = min(len(buf), 3000, len(frame) - pos)
        buf[:n] = frame[pos:pos + n]
        del buf
        pos += n
        done += p.buffer_updated(n)
        assert p.progress == (len(done), pos if pos < len(frame) else 0)
    assert [(f.call_id, bytes(f.payload)) for f in done] == [(7, payload)] and p.progress == (1, 0)
    assert p.buffered > fr.SERVER_SCRATCH
    p.shrink()
    assert p.buffered == fr.SERVER_SCRATCH
    assert [bytes(f.payload) for f in p.feed(frame[:100] + frame[100:])] == [payload]


def test_a_large_frame_in_progress_holds_what_arrived_and_discard_frees_it():
    p = fr.FrameParser(1 << 30, frozenset((fr.CALL,)), fr.SERVER_SCRATCH)
    p.feed(fr.call_header(1, b"echo", 0, 0, 1 << 30) + b"x" * 1000)
    assert p.mid_frame and p.progress == (0, fr.HEADER_SIZE + 4 + 1000)
    assert p.buffered < fr.SERVER_SCRATCH + 2000
    p.discard()
    assert not p.mid_frame and p.buffered == fr.SERVER_SCRATCH


def test_a_client_receives_a_large_payload_into_the_bytes_it_returns():
    payload = os.urandom(3 * fr.SCRATCH_SIZE + 17)
    frame = fr.reply_header(7, 0, len(payload)) + payload
    for fill in (True, False):
        p = fr.FrameParser(1 << 30, frozenset((fr.REPLY,)), fill_bytes=fill)
        got = []
        for i in range(0, len(frame), 50_000):   # in pieces, as reads bring it
            got += p.feed(frame[i:i + 50_000])
        taken = fr.payload_bytes(got[0])
        assert [f.call_id for f in got] == [7] and bytes(taken) == payload
        # the client's is the bytes object itself; the server's a private mapping, as before
        assert (taken.__class__ is bytes) == fill and got[0].payload is taken
    # ...received in place, not copied out at the end: the memory peaks at one payload's size
    import tracemalloc
    big = bytes(16 << 20)
    frame = fr.reply_header(9, 0, len(big)) + big
    p = fr.FrameParser(1 << 30, frozenset((fr.REPLY,)), fill_bytes=True)
    tracemalloc.start()
    try:
        for i in range(0, len(frame), 1 << 20):
            got = p.feed(memoryview(frame)[i:i + (1 << 20)])
        fr.payload_bytes(got[0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got[0].payload == big and peak < 1.5 * len(big), peak
    p = fr.FrameParser(1 << 30, frozenset((fr.REPLY,)), fill_bytes=True)
    p.feed(fr.reply_header(8, 0, 1 << 30) + b"x" * 1000)   # announced, not sent: not allocated eagerly
    assert p.mid_frame and p.buffered < fr.SCRATCH_SIZE + 2000
    p.discard()
    assert not p.mid_frame


def test_bytes_to_fill_hands_out_its_bytes_only_when_no_view_can_change_them():
    from speedysvc import _shmcore as core
    f = core.BytesToFill(10)
    view = memoryview(f)
    view[:] = b"0123456789"
    copy = f.take()   # a view is alive: a copy, and the view writes to the original only
    view[:1] = b"X"
    assert copy == b"0123456789" and f.take() == b"X123456789"
    view.release()
    f = core.BytesToFill(4)
    with memoryview(f) as v:
        v[:] = b"abcd"
    b = f.take()
    assert b.__class__ is bytes and b == b"abcd" and len(f) == 0
    with pytest.raises(BufferError):
        memoryview(f)
    with pytest.raises(BufferError):
        f.take()
    with pytest.raises(ValueError):
        core.BytesToFill(-1)
    assert core.BytesToFill(0).take() == b""
