"""The gateway's short way in C (``core.Gateway``) for one whole usual call frame in one read,
driven by hand one parser buffer at a time, against the Python parser: it answers exactly
what the parser sees as one usual call, and declines everything else untouched."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from speedysvc import MethodNotFound, codecs
from speedysvc.errors import decode_exception
from speedysvc.tcp import framing as fr
import tcp_helpers
from tcp_helpers import FUZZ, JSON, LIMIT, MSGPACK, RAW, garbage, guarded, logs_clean, msgpack_args

server_logs_clean = tcp_helpers.server_logs_clean
pytestmark = logs_clean


@pytest.fixture
def short_way():
    """A real service (its workers), and a gateway for it that is not listening: the
    short way is driven by hand, one parser buffer at a time."""
    from speedysvc.tcp.server import TcpServer
    with guarded(tcp=None, workers=1) as svc:
        server = TcpServer(svc.service, max_payload=LIMIT)
        server.shm.call(b"echo", msgpack_args(1), MSGPACK.flags, MSGPACK, 10)   # attached, one channel free
        try:
            yield server
        finally:
            server.shm.close()


def offer(server, data: bytes, parser=None):
    """What the short way makes of ``data`` arriving as one read: its answer, and whether
    it left the parser, the channels and the counters as it found them."""
    parser = parser or fr.FrameParser(LIMIT, frozenset({fr.CALL}))
    buf = parser.get_buffer()
    buf[:len(data)] = data
    del buf
    free, counters = len(server.shm._channels.free), dict(server.counters)
    got = server.gateway(parser, len(data))
    if got.__class__ is tuple:   # (counted by the gateway's Python, which this leaves out)   # posted, not answered within the spin: finish it as the gateway would
        chans, ch, outcome = got
        whole = parser.whole_frame(len(data))
        done, result = server.shm.resume_begin(chans, ch, outcome, whole[5], whole[6], whole[3], server_passthrough(),
                                             None)
        status, body = result if done else result()
        got = fr.reply_header(whole[2], status, len(body)) + body
    untouched = parser._end == 0 and not parser.mid_frame and len(server.shm._channels.free) == free
    return got, untouched, counters


def server_passthrough():
    from speedysvc.tcp.server import PASSTHROUGH
    return PASSTHROUGH


def parse_reply(data: bytes) -> fr.Frame:
    parser = fr.FrameParser(LIMIT, frozenset({fr.REPLY}))
    (frame,) = parser.feed(data)
    assert not parser.mid_frame
    return frame


def offer_inline(server, data: bytes):
    """``offer`` until the worker answers within the gateway's spin (it does once it is
    awake), so that the answer and its counting are the short way's own."""
    for _ in range(200):
        before = dict(server.counters)
        got, untouched, _ = offer(server, data)
        if server.counters["answered_inline"] > before["answered_inline"]:
            return got, untouched, before
    pytest.fail("the worker never answered within the gateway's spin")


def test_short_way_answers_the_usual_call(short_way):
    call = fr.call_header(77, b"echo", MSGPACK.flags, 0, len(msgpack_args(b"hi"))) + msgpack_args(b"hi")
    got, untouched, before = offer_inline(short_way, call)
    reply = parse_reply(got)
    assert (reply.call_id, reply.arg, MSGPACK.loads(reply.payload)) == (77, 0, b"hi")
    assert untouched
    after = short_way.counters
    assert after["calls"] == before["calls"] + 1 and after["answered_inline"] == before["answered_inline"] + 1
    assert after["bytes_in"] == before["bytes_in"] + len(call)
    assert after["bytes_out"] == before["bytes_out"] + len(got)
    # an error the worker answers travels as a reply with its status, and is counted
    call = fr.call_header(78, b"no_such_method", MSGPACK.flags, 0, 1) + msgpack_args()
    got, untouched, before = offer_inline(short_way, call)
    reply = parse_reply(got)
    assert reply.call_id == 78 and reply.arg != 0 and untouched
    assert isinstance(decode_exception(reply.payload), MethodNotFound)
    assert short_way.counters["errors"] == before["errors"] + 1


def test_short_way_declines_what_is_not_usual(short_way):
    """None, with nothing consumed, posted or counted: the parser then takes the bytes
    (and says what is wrong with them, if anything)."""
    args = msgpack_args(b"x")
    call = fr.call_header(5, b"echo", MSGPACK.flags, 0, len(args)) + args
    declined = {
        "compressed": fr.call_header(5, b"echo", MSGPACK.flags, 0, len(args), fr.F_COMPRESSED) + args,
        "pickle": fr.call_header(5, b"echo", codecs.PICKLE.flags, 0, len(args)) + args,
        "a byte short": call[:-1],
        "a byte more": call + b"\x00",
        "two frames": call + call,
        "a reply": fr.reply_header(5, 0, len(args)) + args,
        "no name": fr.FRAME.pack(fr.CALL, 0, 0, 5, MSGPACK.flags, 0, len(args)) + args,
        "name too long": fr.FRAME.pack(fr.CALL, 0, fr.MAX_NAME + 1, 5, MSGPACK.flags, 0, len(args))
        + b"n" * (fr.MAX_NAME + 1) + args,
        "over max_payload": fr.FRAME.pack(fr.CALL, 0, 4, 5, MSGPACK.flags, 0, LIMIT + 1) + b"echo",
        "header only": call[:fr.HEADER_SIZE - 1],
    }
    for what, data in declined.items():
        got, untouched, before = offer(short_way, data)
        assert got is None and untouched and short_way.counters == before, what
    # ...and the gateway's own state: stopping, full, or calls already waiting for room
    admission = short_way.admission
    for attr, value in [("closing", True), ("inflight", admission.max_inflight), ("waiting", {"c": 1})]:
        saved = getattr(admission, attr)
        setattr(admission, attr, value)
        try:
            got, untouched, _ = offer(short_way, call)
        finally:
            setattr(admission, attr, saved)
        assert got is None and untouched, attr
    # a parser already holding part of an earlier frame
    parser = fr.FrameParser(LIMIT, frozenset({fr.CALL}))
    assert parser.feed(call[:10]) == []
    buf = parser.get_buffer()
    buf[:len(call)] = call
    del buf
    assert short_way.gateway(parser, len(call)) is None
    assert offer(short_way, call)[1]   # and the usual call still goes through after all that


short_way_frames = st.builds(
    lambda name, codec, call_id, tmo, payload, flags: fr.FRAME.pack(fr.CALL, flags, len(name), call_id, codec, tmo,
                                                                    len(payload)) + name + payload,
    st.sampled_from([b"echo", b"size_of", b"no_such", b"\xff\xfe"]) | st.binary(min_size=1, max_size=fr.MAX_NAME),
    st.sampled_from([c.flags for c in (MSGPACK, RAW, JSON, codecs.PICKLE)]) | st.integers(0, 2**32 - 1),
    # (no timeout short enough to fire: whether a call outlives 1 ms depends on the machine's load,
    # and one that times out leaves its channel to the worker, so the next finds none free)
    st.integers(0, 2**32 - 1), st.sampled_from([0, 10000]), st.binary(max_size=200),
    st.sampled_from([0, 0, 0, fr.F_COMPRESSED]))


@FUZZ
@given(data=garbage | short_way_frames)
def test_short_way_fuzz_agrees_with_the_parser(short_way, data):
    """Whatever one read brings, the short way either declines it untouched or answers
    exactly the one whole, usual call frame the parser sees in it."""
    whole = fr.FrameParser(LIMIT, frozenset({fr.CALL}))
    buf = whole.get_buffer()
    buf[:len(data)] = data
    del buf
    frame = whole.whole_frame(len(data)) if len(data) <= fr.SCRATCH_SIZE else None
    got, untouched, _ = offer(short_way, data) if len(data) <= fr.SCRATCH_SIZE else (None, True, None)
    assert untouched
    codec = codecs.codec_of(frame[3]) if frame is not None else None
    usual = frame is not None and frame[1] == 0 and codec is not None and codec.network_safe
    if not usual:
        assert got is None
    else:
        assert got is not None
        assert parse_reply(got).call_id == frame[2]
