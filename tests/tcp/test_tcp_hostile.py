"""Hostile TCP clients: garbage, truncated and oversized frames, slow-loris, floods,
wrong secrets, vanishing callers.  Real worker processes, a real TCP gateway
process and real sockets; nothing is mocked.  Whatever a bad client does, its
own connection is the only thing that suffers: every other client (connected
before or after) keeps getting correct answers, quickly.

The pure parsers (``FrameParser``, ``HelloReader``) are fuzzed with hypothesis.

Run with ``SPEEDYSVC_NAMESPACE=tcph`` so these services never meet another test run's.
"""
import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speedysvc import (AuthenticationFailed, BadArguments, DecodeError, LocalService,
                       MethodNotFound, NotAllowed, PayloadTooLarge, ProtocolError, ServiceUnavailable, codecs,
                       connect, connect_async)
from speedysvc.tcp import compression
from speedysvc import _shmcore as core
from speedysvc.tcp import framing as fr
from speedysvc.errors import decode_exception

from conftest import wait_until
from hostile_services import HostileEcho, HostileSecret

MiB = 1 << 20
LIMIT = 1 * MiB                       # max_payload of most services here
MSGPACK, RAW, JSON = codecs.MSGPACK, codecs.RAW, codecs.JSON


# ---- helpers ---------------------------------------------------------------------------------

def serve(cls=HostileEcho, **kw) -> LocalService:
    opts = dict(workers=2, tcp="127.0.0.1:0", tcp_handshake_timeout=1.0, tcp_stall_timeout=1.0,
                max_payload=LIMIT, start_timeout=20)
    opts.update(kw)
    return LocalService(cls, **opts)


def client(svc, cls=HostileEcho, **kw):
    kw.setdefault("timeout", 10)
    return connect(cls, svc.tcp_address, **kw)   # (svc: a LocalService or an InProcessGateway)


def check(c, tag="ok"):
    """A normal client gets correct answers: small, structured and large (> scratch buffer) payloads."""
    assert c.echo(tag) == tag
    assert c.echo({"k": [1, 2.5, None, b"\x00"]}) == {"k": [1, 2.5, None, b"\x00"]}
    big = bytes(range(256)) * 1200      # 300 KiB: goes through the parser's big-frame path both ways
    assert c.echo_raw(big) == big


def timed_check(c, tag="ok") -> float:
    t = time.monotonic()
    assert c.echo(tag) == tag
    return time.monotonic() - t


def memory_mib(pid, field="VmRSS") -> float:
    """A /proc/PID/status memory line: VmRSS, or RssAnon (the process's private memory,
    without the shared-memory segments it touched)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


@contextlib.contextmanager
def pinging(c, every=0.05):
    """Times calls of client ``c`` in a thread while the block runs: yields their latencies."""
    latencies, done = [], threading.Event()

    def ping():
        while not done.is_set():
            latencies.append(timed_check(c, "ping"))
            time.sleep(every)

    th = threading.Thread(target=ping)
    th.start()
    try:
        yield latencies
    finally:
        done.set()
        th.join(30)


def rss_mib(pid) -> float:
    return memory_mib(pid)


def anon_mib(pid) -> float:
    return memory_mib(pid, "RssAnon")


def open_sockets(pid) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def busy_channels(svc) -> dict:
    """Channels whose call is not finished (requested, claimed, abandoned...)."""
    seg = svc.segment
    out = {}
    for slot in range(seg.max_channels):
        off = seg.channel_offset(slot)
        if seg.region.load32(off + core.C_OWNER_PID):
            code = seg.region.load32(off + core.C_STATE) & core.ST_CODE
            if code not in (core.ST_IDLE, core.ST_RESPONSE):
                out[slot] = code
    return out


def server_alive(svc) -> bool:
    return svc.tcp_process is not None and svc.tcp_process.poll() is None


def handshake_messages(data: bytes) -> list:
    """Split bytes into handshake messages (msg_type, body)."""
    out = []
    while data:
        msg = fr.HelloReader().feed(data)
        if msg is None:
            break
        out.append((msg[0], msg[2]))
        data = msg[3]
    return out


class RawClient:
    """Speaks (or abuses) the protocol by hand over a plain socket."""

    def __init__(self, svc_or_address, timeout=5.0, rcvbuf=None, service=HostileEcho.name):
        address = svc_or_address if isinstance(svc_or_address, str) else svc_or_address.tcp_address
        host, port = address[len("tcp://"):].rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, int(port)))
        self.service = service
        self.server_hello = None
        self.parser = fr.FrameParser(1 << 31, frozenset({fr.REPLY, fr.GOAWAY}))
        self.pending = []
        self.compression = None

    # -- handshake --
    def _read_message(self):
        reader = fr.HelloReader()
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the server closed the connection during the handshake")
            msg = reader.feed(data)
            if msg is not None:
                if msg[3]:
                    self.pending.extend(self.parser.feed(msg[3]))
                return msg

    def read_server_hello(self) -> dict:
        msg_type, version, body, _ = self.server_hello = self._read_message()
        assert msg_type == fr.SERVER_HELLO and version == fr.VERSION
        return body

    def client_hello(self, **fields) -> bytes:
        body = {"service": self.service, "compression": "", "compress_min": 4096, "nonce": fr.new_nonce(),
                "proof": None}
        body.update(fields)
        return fr.pack_hello(fr.CLIENT_HELLO, body)

    def handshake(self, **fields) -> tuple:
        """Full handshake; returns the server's answer (msg_type, body)."""
        if self.server_hello is None:
            self.read_server_hello()
        self.sock.sendall(self.client_hello(**fields))
        msg_type, _, body, _ = self._read_message()
        if msg_type == fr.WELCOME:
            self.compression = fields.get("compression") or None
        return msg_type, body

    def welcome(self, **fields) -> "RawClient":
        msg_type, body = self.handshake(**fields)
        assert msg_type == fr.WELCOME, (msg_type, body)
        return self

    # -- frames --
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, call_id, name, payload=b"", codec_flags=MSGPACK.flags, timeout_ms=0, flags=0) -> None:
        if isinstance(name, str):
            name = name.encode()
        self.sock.sendall(fr.call_header(call_id, name, codec_flags, timeout_ms, len(payload), flags) + payload)

    def read_frames(self, n, timeout=10.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.pending) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError(f"closed after {len(self.pending)} of {n} frames")
            self.pending.extend(self.parser.feed(data))
        frames, self.pending = self.pending[:n], self.pending[n:]
        return frames

    def reply(self, timeout=10.0):
        """(status, payload) of the next reply frame."""
        (frame,) = self.read_frames(1, timeout)
        assert frame.kind == fr.REPLY, frame
        payload = bytes(frame.payload)
        if frame.flags & fr.F_COMPRESSED:
            payload = bytes(compression.decompress(self.compression, payload, 1 << 31))
        return frame.arg, payload, frame

    def error_reply(self, timeout=10.0) -> BaseException:
        status, payload, _ = self.reply(timeout)
        assert status == 1, payload
        return decode_exception(payload)

    def read_to_eof(self, timeout=5.0) -> bytes:
        """Everything the server sends until it closes; fails if it does not close in time."""
        deadline = time.monotonic() + timeout
        data = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the server did not close the connection within {timeout} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                break
            except socket.timeout:
                continue
            if not chunk:
                break
            data.append(chunk)
        return b"".join(data)

    def expect_refused(self, timeout=5.0) -> BaseException:
        msgs = handshake_messages(self.read_to_eof(timeout))
        msgs = [m for m in msgs if m[0] != fr.SERVER_HELLO]
        assert msgs and msgs[-1][0] == fr.REFUSED, f"expected a refusal, got {msgs}"
        return decode_exception(msgs[-1][1]["error"])

    def expect_goaway(self, timeout=5.0) -> BaseException:
        frames = self.pending + self.parser.feed(self.read_to_eof(timeout))
        self.pending = []
        goaways = [f for f in frames if f.kind == fr.GOAWAY]
        assert goaways, f"expected a go-away frame, got {frames}"
        assert frames[-1].kind == fr.GOAWAY and goaways[0].call_id == 0
        return decode_exception(goaways[0].payload)

    def close(self, reset=False) -> None:
        if reset:   # abortive close: RST instead of FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def msgpack_args(*args) -> bytes:
    return MSGPACK.dumps(list(args))


@pytest.fixture(autouse=True)
def server_logs_clean(capfd):
    """The gateway and the workers write to our stderr: nothing bad may crash a callback there."""
    yield
    _, err = capfd.readouterr()
    for bad in ("Traceback", "Fatal error", "Exception in callback", "exception was never retrieved"):
        assert bad not in err, f"the server logged {bad!r}:\n{err[-4000:]}"


# ---- the pure parsers, fuzzed ----------------------------------------------------------------

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
FUZZ_LIMIT = 2 * fr.SCRATCH_SIZE + 1000


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


# headers that look nearly right, so fuzzing gets past the first check now and then
plausible_headers = st.builds(
    lambda kind, flags, name_len, call_id, arg, tmo, length: fr.FRAME.pack(kind, flags, name_len, call_id, arg,
                                                                          tmo, length),
    st.sampled_from([0, 1, 1, 1, 2, 2, 3, 4, 255]), st.sampled_from([0, 0, 0, 1, 2, 0x80]),
    st.one_of(st.integers(0, 70), st.just(0xFFFF)), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.one_of(st.integers(0, 300), st.integers(fr.SCRATCH_SIZE - 100, FUZZ_LIMIT + 20), st.just(2**64 - 1)))
garbage = st.lists(st.one_of(st.binary(max_size=300), plausible_headers), max_size=12).map(b"".join)
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


# ---- the gateway's short way (core.Gateway), against the parser ------------------------------

@pytest.fixture
def short_way():
    """A real service (its workers), and a gateway for it that is not listening: the
    short way is driven by hand, one parser buffer at a time."""
    from speedysvc.tcp.server import TcpServer
    with serve(tcp=None, workers=1) as svc:
        server = TcpServer(svc.service, "127.0.0.1", 0, max_payload=LIMIT)
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
    for attr, value in [("closing", True), ("inflight", short_way.max_inflight), ("_waiting", {"c": 1})]:
        saved = getattr(short_way, attr)
        setattr(short_way, attr, value)
        try:
            got, untouched, _ = offer(short_way, call)
        finally:
            setattr(short_way, attr, saved)
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
    st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 10000]), st.binary(max_size=200),
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
    usual = frame is not None and frame[1] == 0 and frame[3] >> codecs.CODEC_SHIFT & 0xFF != codecs.PICKLE.id
    if not usual:
        assert got is None
    else:
        assert got is not None
        assert parse_reply(got).call_id == frame[2]


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


# ---- garbage during the handshake ------------------------------------------------------------

def test_garbage_instead_of_a_handshake_closes_only_that_connection():
    with serve() as svc, client(svc) as before:
        check(before)
        pid = svc.tcp_process.pid
        base = open_sockets(pid)
        tls_client_hello = bytes.fromhex("16030100a5010000a10303") + os.urandom(32) + b"\x00" * 40
        garbage = {
            "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "tls": tls_client_hello,
            "random": b"\x00" + os.urandom(500),
            "magic then a huge length": fr.HELLO.pack(fr.MAGIC, 1, fr.CLIENT_HELLO, 0xFFFF) + b"x" * 100,
            "magic then a body that is not msgpack": fr.HELLO.pack(fr.MAGIC, 1, fr.CLIENT_HELLO, 4) + b"\xc1\xc1\xc1\xc1",
            "magic then a body that is not a map": fr.pack_hello(fr.CLIENT_HELLO, {}).replace(b"\x80", b"\x90"),
            "a call frame instead of a hello": fr.call_header(1, b"echo", MSGPACK.flags, 0, 2) + b"\x91\x01",
        }
        for what, data in garbage.items():
            with RawClient(svc) as raw:
                raw.read_server_hello()
                raw.send(data)
                exc = raw.expect_refused(timeout=3)
                assert isinstance(exc, ProtocolError), (what, exc)
            check(before, what)
        # garbage sent before even reading the server's hello
        with RawClient(svc) as raw:
            raw.send(b"\xff" * 64)
            assert isinstance(raw.expect_refused(timeout=3), ProtocolError)
        assert server_alive(svc)
        assert wait_until(lambda: open_sockets(pid) == base, timeout=5)
        with client(svc) as after:
            check(after)
        check(before)


def test_malformed_client_hellos_are_refused():
    nonce = fr.new_nonce()
    cases = [
        ("wrong service", dict(service="tcph_other"), ServiceUnavailable),
        ("no service", dict(service=None), ServiceUnavailable),
        ("short nonce", dict(nonce=b"123"), ProtocolError),
        ("nonce not bytes", dict(nonce="x" * 32), ProtocolError),
        ("negative compress_min", dict(compress_min=-1), ProtocolError),
        ("compress_min not a number", dict(compress_min="4096"), ProtocolError),
        ("unknown compression", dict(compression="brotli"), ValueError),
        ("compression not a string", dict(compression=7), ValueError),
    ]
    with serve() as svc, client(svc) as before:
        check(before)
        for what, fields, expected in cases:
            with RawClient(svc) as raw:
                msg_type, body = raw.handshake(**fields)
                assert msg_type == fr.REFUSED, what
                exc = decode_exception(body["error"])
                assert isinstance(exc, expected), (what, exc)
        for what, message in [("version 2", fr.HELLO.pack(fr.MAGIC, 2, fr.CLIENT_HELLO, 1) + b"\x80"),
                              ("a welcome from the client", fr.pack_hello(fr.WELCOME, {"proof": None})),
                              ("a server hello from the client", fr.pack_hello(fr.SERVER_HELLO, {"nonce": nonce}))]:
            with RawClient(svc) as raw:
                raw.read_server_hello()
                raw.send(message)
                assert isinstance(raw.expect_refused(), ProtocolError), what
        check(before)
        assert server_alive(svc)


def test_hello_with_an_unhashable_compression_is_refused_cleanly(capfd):
    """A msgpack list where the compression name goes must be refused like any bad
    hello, not crash the connection's callback (``algo not in ALGORITHMS`` raises TypeError)."""
    with serve() as svc, client(svc) as before:
        check(before)
        with RawClient(svc) as raw:
            raw.read_server_hello()
            raw.send(raw.client_hello(compression=["zlib"]))
            data = raw.read_to_eof(timeout=3)
        check(before)
        assert server_alive(svc)
    _, err = capfd.readouterr()
    msgs = handshake_messages(data)
    assert "Fatal error" not in err, f"a callback of the gateway crashed:\n{err[-2000:]}"
    assert msgs and msgs[-1][0] == fr.REFUSED, "the connection was dropped without a refusal"


# ---- bad frames after the handshake ----------------------------------------------------------

def test_garbage_frames_after_the_handshake_get_a_goaway():
    bad = {
        "random bytes": b"\x00" + os.urandom(200),
        "unknown frame kind": fr.FRAME.pack(9, 0, 4, 1, MSGPACK.flags, 0, 0) + b"echo",
        "a reply frame from the client": fr.reply_header(1, 0, 3) + b"abc",
        "a go-away frame from the client": fr.goaway(b"bye"),
        "unknown frame flag": fr.call_header(1, b"echo", MSGPACK.flags, 0, 2, flags=0x4) + b"\x91\x01",
        "empty method name": fr.FRAME.pack(fr.CALL, 0, 0, 1, MSGPACK.flags, 0, 2) + b"\x91\x01",
        "method name too long": fr.call_header(1, b"e" * (fr.MAX_NAME + 1), MSGPACK.flags, 0, 2) + b"\x91\x01",
        "method name of 65535 bytes": fr.FRAME.pack(fr.CALL, 0, 0xFFFF, 1, MSGPACK.flags, 0, 2) + b"e" * 100,
        "a good call then garbage": fr.call_header(1, b"echo", MSGPACK.flags, 0, 2) + b"\x91\x01" + b"\xee" * 40,
    }
    with serve() as svc, client(svc) as before:
        check(before)
        pid = svc.tcp_process.pid
        base = open_sockets(pid)
        for what, data in bad.items():
            with RawClient(svc) as raw:
                raw.welcome()
                raw.call(100, "echo", msgpack_args("first"))
                assert raw.reply()[:2] == (0, MSGPACK.dumps("first")), what
                raw.send(data)
                exc = raw.expect_goaway(timeout=3)
                assert isinstance(exc, ProtocolError), (what, exc)
            check(before, what)
        assert wait_until(lambda: open_sockets(pid) == base, timeout=5)
        with client(svc) as after:
            check(after)


def test_truncated_frames_then_close():
    with serve() as svc, client(svc) as before:
        check(before)
        pid = svc.tcp_process.pid
        base = open_sockets(pid)
        payload = b"p" * 2000
        full = fr.call_header(1, b"echo_raw", RAW.flags, 0, len(payload)) + payload
        big = fr.call_header(2, b"echo_raw", RAW.flags, 0, 700_000) + b"q" * 300_000   # big-frame path
        for cut in (1, fr.HEADER_SIZE - 1, fr.HEADER_SIZE + 3, len(full) - 1):
            for reset in (False, True):
                raw = RawClient(svc).welcome()
                raw.send(full[:cut])
                raw.close(reset=reset)
        for reset in (False, True):
            raw = RawClient(svc).welcome()
            raw.send(big)
            raw.close(reset=reset)
        check(before)
        assert wait_until(lambda: open_sockets(pid) == base, timeout=5), "a truncated connection was kept open"
        with client(svc) as after:
            check(after)
        assert server_alive(svc)


def test_frame_above_max_payload_gets_goaway_without_being_read():
    with serve() as svc, client(svc) as before:
        check(before)
        for header in (fr.call_header(1, b"echo_raw", RAW.flags, 0, LIMIT + 1),
                       fr.call_header(1, b"echo_raw", RAW.flags, 0, 2**64 - 1),
                       fr.call_header(1, b"echo_raw", RAW.flags, 0, LIMIT + fr.COMPRESSION_OVERHEAD + 1,
                                      fr.F_COMPRESSED)):
            with RawClient(svc) as raw:
                raw.welcome(compression="zlib")
                raw.send(header)     # only the header: the server must not wait for the rest
                exc = raw.expect_goaway(timeout=3)
                assert isinstance(exc, PayloadTooLarge), exc
                assert str(LIMIT) in str(exc)
                # the connection is gone: the payload has nowhere to go
                with pytest.raises(OSError):
                    for _ in range(64):
                        raw.send(b"\0" * 65536)
            check(before)
        with client(svc) as after:
            check(after)


def test_oversized_frame_sent_together_with_the_hello_gets_payload_too_large():
    """Frames that arrive in the same packet as the client hello go through another
    path (the hello's leftover); an oversized one must be answered the same way."""
    with serve() as svc, client(svc) as before:
        with RawClient(svc) as raw:
            raw.read_server_hello()
            raw.send(raw.client_hello() + fr.call_header(1, b"echo_raw", RAW.flags, 0, LIMIT + 1))
            msg_type, _, _, _ = raw._read_message()
            assert msg_type == fr.WELCOME
            exc = raw.expect_goaway(timeout=3)
            assert isinstance(exc, PayloadTooLarge), f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
        check(before)
        assert server_alive(svc)


def test_unknown_methods_get_an_error_reply_and_the_connection_goes_on():
    with serve() as svc, client(svc) as before, RawClient(svc) as raw:
        raw.welcome()
        for i, name in enumerate([b"nope", b"\xff\xfe\x00bad utf-8", b"m" * fr.MAX_NAME, b"__init__", b"echo "]):
            raw.call(i + 1, name, msgpack_args(1))
            exc = raw.error_reply()
            assert isinstance(exc, MethodNotFound), (name, exc)
            raw.call(1000 + i, "echo", msgpack_args(i))
            assert raw.reply()[:2] == (0, MSGPACK.dumps(i))
        check(before)


def test_codec_mismatches_and_bad_arguments_get_error_replies():
    cases = [
        ("json flags to a msgpack method", "echo", JSON.flags, b"[1]", DecodeError),
        ("unknown codec id", "echo", 99 << codecs.CODEC_SHIFT, msgpack_args(1), DecodeError),
        ("codec id 0", "echo", 0, msgpack_args(1), DecodeError),
        ("all flag bits set", "echo", 0xFFFFFFFF, msgpack_args(1), Exception),
        ("undecodable msgpack", "echo", MSGPACK.flags, b"\xc1\xc1", DecodeError),
        ("truncated msgpack", "echo", MSGPACK.flags, b"\x92\x01", DecodeError),
        ("arguments not an array", "echo", MSGPACK.flags, MSGPACK.dumps(5), DecodeError),
        ("malformed keyword arguments", "echo", MSGPACK.flags | codecs.FLAG_KWARGS, msgpack_args(1), DecodeError),
        ("keyword arguments to a raw method", "echo_raw", RAW.flags | codecs.FLAG_KWARGS, b"x", DecodeError),
        ("msgpack flags to a json method", "echo_json", MSGPACK.flags, msgpack_args(1), DecodeError),
        ("bad json", "echo_json", JSON.flags, b"[1,", DecodeError),
        ("wrong number of arguments", "size_of", MSGPACK.flags, msgpack_args(1, 2, 3), BadArguments),
        ("pickle over TCP", "echo", codecs.PICKLE.flags, b"\x80\x05N.", NotAllowed),
    ]
    with serve() as svc, client(svc) as before, RawClient(svc) as raw:
        raw.welcome()
        for i, (what, name, codec_flags, payload, expected) in enumerate(cases):
            raw.call(i + 1, name, payload, codec_flags)
            status, data, frame = raw.reply()
            assert frame.call_id == i + 1
            assert status == 1, (what, data)
            exc = decode_exception(data)
            assert isinstance(exc, expected), (what, exc)
            raw.call(500 + i, "echo", msgpack_args(what))
            assert raw.reply()[:2] == (0, MSGPACK.dumps(what)), what
        check(before)
        assert server_alive(svc)


def compressed_raw(algo, data: bytes) -> bytes:
    return bytes(compression.ALGORITHMS[algo][0](data))


def test_hostile_compressed_frames_get_error_replies():
    good = b"abc" * 5000
    with serve() as svc, client(svc) as before:
        check(before)
        for algo in compression.available():
            with RawClient(svc) as raw:
                raw.welcome(compression=algo, compress_min=0)
                cases = [
                    ("states more than the limit", struct.pack("<Q", LIMIT + 1) + compressed_raw(algo, b"x" * 100),
                     PayloadTooLarge),
                    ("states 2**64-1 bytes", struct.pack("<Q", 2**64 - 1) + b"junk", PayloadTooLarge),
                    ("garbage data", struct.pack("<Q", 5000) + os.urandom(300), DecodeError),
                    ("shorter than its length prefix", b"\x01\x02\x03", DecodeError),
                    ("inflates to less than it states", struct.pack("<Q", 50_000) + compressed_raw(algo, good),
                     DecodeError),
                    ("inflates to more than it states (bomb)",
                     struct.pack("<Q", 1000) + compressed_raw(algo, b"\0" * (8 * MiB)), DecodeError),
                    ("empty compressed data", struct.pack("<Q", 10), DecodeError),
                ]
                for i, (what, body, expected) in enumerate(cases):
                    raw.call(i + 1, "echo_raw", body, RAW.flags, flags=fr.F_COMPRESSED)
                    exc = raw.error_reply()
                    assert isinstance(exc, expected), (algo, what, exc)
                    # the connection goes on, compressed both ways
                    raw.call(100 + i, "echo_raw", compression.compress(algo, good), RAW.flags, flags=fr.F_COMPRESSED)
                    status, data, frame = raw.reply()
                    assert status == 0 and frame.flags & fr.F_COMPRESSED, (algo, what)
                    assert data == good
            with client(svc, compression=algo, compress_min=0) as cc:
                check(cc, algo)
                assert cc.echo_raw(good) == good
        # the compressed flag without having negotiated compression
        with RawClient(svc) as raw:
            raw.welcome()
            raw.call(1, "echo_raw", compression.compress("zlib", good), RAW.flags, flags=fr.F_COMPRESSED)
            assert isinstance(raw.error_reply(), (DecodeError, ProtocolError))
            raw.call(2, "echo", msgpack_args("still here"))
            assert raw.reply()[:2] == (0, MSGPACK.dumps("still here"))
        check(before)
        assert server_alive(svc)


# ---- slow-loris ------------------------------------------------------------------------------

def test_clients_that_never_finish_the_handshake_are_dropped():
    with serve(tcp_handshake_timeout=1.0) as svc, client(svc) as c:
        check(c)
        silent = RawClient(svc)                    # reads nothing, sends nothing
        hello_read = RawClient(svc)
        hello_read.read_server_hello()             # reads the server's hello, answers nothing
        dribble = RawClient(svc)                   # sends its hello a byte at a time, for ever
        dribble.read_server_hello()
        hello = dribble.client_hello()
        t0 = time.monotonic()
        latencies, sent = [], 0
        assert len(hello) > 60                     # more bytes than the loop below dribbles
        while time.monotonic() - t0 < 2.6:         # handshake timeout + the once-a-second sweep
            if sent is not None:
                try:
                    dribble.send(hello[sent:sent + 1])
                    sent += 1
                except OSError:
                    sent = None                    # closed by the server: good
            latencies.append(timed_check(c))
            time.sleep(0.05)
        for raw in (silent, hello_read):
            exc = raw.expect_refused(timeout=0.5)
            assert isinstance(exc, ProtocolError) and "handshake" in str(exc), exc
            raw.close()
        dribble.read_to_eof(timeout=0.5)           # dribbling a byte at a time did not keep it open
        dribble.close()
        assert max(latencies) < 0.5, latencies
        check(c)
        with client(svc) as after:
            check(after)


def test_clients_that_stall_halfway_through_a_frame_are_dropped():
    with serve(tcp_stall_timeout=1.0) as svc, client(svc) as c:
        check(c)
        payload = b"z" * 1000
        frame = fr.call_header(1, b"echo_raw", RAW.flags, 0, len(payload)) + payload
        half_header = RawClient(svc).welcome()
        half_payload = RawClient(svc).welcome()
        half_big = RawClient(svc).welcome()
        idle = RawClient(svc).welcome()           # idle between frames: allowed to stay
        t0 = time.monotonic()
        half_header.send(frame[:10])
        half_payload.send(frame[:len(frame) // 2])
        half_big.send(fr.call_header(1, b"echo_raw", RAW.flags, 0, 600_000) + b"b" * 200_000)
        latencies = []
        while time.monotonic() - t0 < 0.8:
            latencies.append(timed_check(c))
            time.sleep(0.05)
        for raw in (half_header, half_payload, half_big):
            exc = raw.expect_goaway(timeout=4)
            assert isinstance(exc, ProtocolError) and "progress" in str(exc), exc
            assert 0.9 < time.monotonic() - t0 < 3.5
            raw.close()
        assert max(latencies) < 0.5, latencies
        idle.call(7, "echo", msgpack_args("idle is fine"))
        assert idle.reply()[:2] == (0, MSGPACK.dumps("idle is fine"))
        idle.close()
        check(c)


def test_a_stalled_client_that_does_not_read_is_still_disconnected():
    """The stall timeout must free the connection even when the client reads
    nothing: a go-away queued behind replies nobody reads never flushes, so a
    plain close() leaves the socket (and its buffered replies) open for as long
    as the client likes, no longer counted among the connections."""
    with serve(tcp_stall_timeout=1.0) as svc, client(svc) as c:
        check(c)
        pid = svc.tcp_process.pid
        base = open_sockets(pid)
        raw = RawClient(svc, rcvbuf=16 << 10).welcome()
        payload = msgpack_args(900 << 10)
        calls = b"".join(fr.call_header(i + 1, b"blob", MSGPACK.flags, 0, len(payload)) + payload for i in range(8))
        raw.send(calls + fr.call_header(99, b"echo_raw", RAW.flags, 0, 100) + b"x" * 10)   # 7 MB of replies,
        t0 = time.monotonic()                                                             # then half a frame
        assert open_sockets(pid) == base + 1
        closed = wait_until(lambda: open_sockets(pid) == base, timeout=4)
        elapsed = time.monotonic() - t0
        check(c)
        raw.close()
        assert closed, f"the stalled connection was still open on the server after {elapsed:.1f} s"


# ---- callers that vanish ---------------------------------------------------------------------

def test_caller_vanishing_mid_call_leaks_nothing(tmp_path):
    with serve() as svc, client(svc) as c:
        check(c)
        pid = svc.tcp_process.pid
        base = open_sockets(pid)
        marks = []
        for i, reset in enumerate((False, True, False)):
            assert wait_until(lambda: not any(w["busy"] for w in svc.segment.workers()), timeout=5)
            mark = tmp_path / f"slow{i}"
            marks.append(mark)
            raw = RawClient(svc).welcome()
            raw.call(1, "sleep", msgpack_args(0.6, None))
            raw.call(2, "mark", msgpack_args(str(mark)))
            time.sleep(0.1)
            raw.close(reset=reset)
            # the other worker serves others meanwhile
            assert timed_check(c, f"during {i}") < 0.5
        assert wait_until(lambda: open_sockets(pid) == base, timeout=5)
        # the abandoned calls ran to their end, and every channel came back
        assert wait_until(lambda: all(m.exists() for m in marks), timeout=8)
        assert wait_until(lambda: not busy_channels(svc), timeout=5), busy_channels(svc)
        assert not any(w["busy"] for w in svc.segment.workers())
        check(c)
        with client(svc) as after:
            check(after)


# ---- authentication --------------------------------------------------------------------------

def test_wrong_or_missing_secret_is_refused_and_nothing_is_served(tmp_path, monkeypatch):
    monkeypatch.delenv("SPEEDYSVC_SECRET", raising=False)
    mark = tmp_path / "served"
    with serve(HostileSecret, tcp_secret="right") as svc:
        good = client(svc, HostileSecret, secret="right")
        assert good.echo("in") == "in"
        with pytest.raises(AuthenticationFailed):
            with client(svc, HostileSecret, secret="wrong") as bad:
                bad.echo(1)
        with pytest.raises(AuthenticationFailed, match="secret"):
            with client(svc, HostileSecret) as bad:
                bad.echo(1)

        payload = msgpack_args(str(mark))
        call = fr.call_header(1, b"mark", MSGPACK.flags, 0, len(payload)) + payload

        def refused(proof, service=HostileSecret.name, extra=call):
            with RawClient(svc, service=service) as raw:
                raw.read_server_hello()
                raw.send(raw.client_hello(proof=proof) + extra)   # a call pipelined behind the hello
                return raw.expect_refused(timeout=3)

        assert isinstance(refused(os.urandom(32)), AuthenticationFailed)
        assert isinstance(refused(None), AuthenticationFailed)
        assert isinstance(refused(b""), AuthenticationFailed)
        assert isinstance(refused("not bytes"), AuthenticationFailed)
        assert isinstance(refused(os.urandom(1000)), AuthenticationFailed)
        # a proof made with the right secret for another connection (a replay) is refused
        with RawClient(svc, service=HostileSecret.name) as first:
            server_nonce = first.read_server_hello()["nonce"]
            client_nonce = fr.new_nonce()
            proof = fr.client_proof(b"right", server_nonce, client_nonce, HostileSecret.name)
            recorded = first.client_hello(nonce=client_nonce, proof=proof)
            first.send(recorded)
            msg_type, _, body, _ = first._read_message()
            assert msg_type == fr.WELCOME
            assert body["proof"] == fr.server_proof(b"right", server_nonce, client_nonce, HostileSecret.name)
        with RawClient(svc, service=HostileSecret.name) as replay:
            replay.read_server_hello()
            replay.send(recorded + call)
            assert isinstance(replay.expect_refused(timeout=3), AuthenticationFailed)
        # frames with no handshake at all
        with RawClient(svc) as raw:
            raw.send(call * 3)
            assert isinstance(raw.expect_refused(timeout=3), ProtocolError)
        # a connection that never authenticates is not served either, and is dropped in time
        with RawClient(svc) as raw:
            raw.read_server_hello()
            assert isinstance(raw.expect_refused(timeout=4), ProtocolError)

        assert good.echo("still in") == "still in"
        with client(svc, HostileSecret, secret="right") as again:
            assert again.echo("new") == "new"
            assert again.mark(str(tmp_path / "legit")) is True
        good.close()
    assert (tmp_path / "legit").exists()
    assert not mark.exists(), "a call from an unauthenticated client was served"


def test_frames_without_a_handshake_are_never_served(tmp_path):
    mark = tmp_path / "served"
    payload = msgpack_args(str(mark))
    call = fr.call_header(1, b"mark", MSGPACK.flags, 0, len(payload)) + payload
    with serve() as svc, client(svc) as before:
        with RawClient(svc) as raw:              # straight away, without reading the server's hello
            raw.send(call)
            assert isinstance(raw.expect_refused(timeout=3), ProtocolError)
        with RawClient(svc) as raw:              # after reading it
            raw.read_server_hello()
            raw.send(call * 5)
            assert isinstance(raw.expect_refused(timeout=3), ProtocolError)
        with RawClient(svc) as raw:              # behind a hello of the wrong type
            raw.read_server_hello()
            raw.send(fr.pack_hello(fr.WELCOME, {"proof": None}) + call)
            assert isinstance(raw.expect_refused(timeout=3), ProtocolError)
        with RawClient(svc) as raw:              # behind a hello for another service
            raw.read_server_hello()
            raw.send(raw.client_hello(service="tcph_secret") + call)
            assert isinstance(raw.expect_refused(timeout=3), ServiceUnavailable)
        check(before)
        assert before.mark(str(tmp_path / "legit")) is True
    assert not mark.exists(), "a call sent without a handshake was served"


# ---- floods ----------------------------------------------------------------------------------

def test_pipelined_calls_never_read_do_not_grow_memory_or_stall_others():
    with serve(tcp_stall_timeout=30.0) as svc, client(svc) as c:
        check(c)
        pid = svc.tcp_process.pid
        rss0 = rss_mib(pid)
        payload = msgpack_args("x" * 2000)
        one = [fr.call_header(i, b"echo", MSGPACK.flags, 0, len(payload)) + payload for i in range(1, 20_001)]
        blob = b"".join(one)                      # 20k calls, ~40 MB, ~40 MB of replies nobody reads
        raw = RawClient(svc, rcvbuf=64 << 10).welcome()
        raw.sock.setblocking(False)
        sent, t0, latencies = 0, time.monotonic(), []
        next_ping = t0
        while sent < len(blob) and time.monotonic() - t0 < 1.5:
            try:
                sent += raw.sock.send(blob[sent:sent + (256 << 10)])
            except BlockingIOError:
                time.sleep(0.005)
            if time.monotonic() >= next_ping:
                latencies.append(timed_check(c, "ping"))
                next_ping = time.monotonic() + 0.1
        assert sent < len(blob), "nothing pushed back: the server read 20k calls whose replies nobody reads"
        for _ in range(5):
            latencies.append(timed_check(c, "ping"))
        check(c)
        grown = rss_mib(pid) - rss0
        assert grown < 64, f"the gateway grew by {grown:.0f} MiB for a client that does not read"
        assert max(latencies) < 1.0, latencies
        raw.close(reset=True)
        check(c)
        with client(svc) as after:
            check(after)
        assert wait_until(lambda: not busy_channels(svc), timeout=5)


def test_many_connections_opened_and_abandoned():
    with serve(tcp_handshake_timeout=5.0, tcp_stall_timeout=5.0) as svc, client(svc) as c:
        check(c)
        pid = svc.tcp_process.pid
        base = open_sockets(pid)
        payload = msgpack_args(0.0)
        call = fr.call_header(1, b"echo", MSGPACK.flags, 0, len(payload)) + payload
        raws = []
        for i in range(200):
            raw = RawClient(svc)
            kind = i % 5
            if kind == 1:
                raw.read_server_hello()
            elif kind >= 2:
                raw.welcome()
            if kind == 3:
                raw.send(call[:30])               # half a frame
            elif kind == 4:
                raw.send(call * 3)                # calls whose replies are never read
            raws.append(raw)
            if i % 50 == 0:
                assert timed_check(c) < 0.5
        assert wait_until(lambda: open_sockets(pid) >= base + 200, timeout=5)
        check(c)
        for i, raw in enumerate(raws):
            raw.close(reset=i % 2 == 0)
        assert wait_until(lambda: open_sockets(pid) == base, timeout=5), \
            f"{open_sockets(pid) - base} abandoned connections still open"
        check(c)
        with client(svc) as after:
            check(after)
        assert server_alive(svc)


# ---- what the normal client refuses to send --------------------------------------------------

def test_oversized_request_is_refused_locally_and_the_connection_goes_on():
    with serve() as svc, client(svc) as c:
        check(c)
        conn = c._transport._conn
        pid = svc.tcp_process.pid
        base = open_sockets(pid)
        t = time.monotonic()
        with pytest.raises(PayloadTooLarge, match=rf"request of {LIMIT + 1} bytes exceeds the service's limit "
                                                  rf"of {LIMIT} bytes"):
            c.echo_raw(b"x" * (LIMIT + 1))
        with pytest.raises(PayloadTooLarge, match="exceeds the service's limit"):
            c.echo("y" * (2 * LIMIT))
        assert time.monotonic() - t < 0.5
        assert c._transport._conn is conn, "the connection was replaced"
        assert c.echo_raw(b"x" * LIMIT) == b"x" * LIMIT          # the limit itself is fine
        check(c)
        assert c._transport._conn is conn
        assert open_sockets(pid) == base
        # compression does not get around the check (the limit is on the request itself)
        with client(svc, compression="zlib", compress_min=0) as cc:
            with pytest.raises(PayloadTooLarge):
                cc.echo_raw(b"\0" * (LIMIT + 1))
            check(cc)

        async def with_asyncio():
            ac = connect_async(HostileEcho, svc.tcp_address, timeout=10)
            try:
                assert await ac.echo("a") == "a"
                with pytest.raises(PayloadTooLarge, match="exceeds the service's limit"):
                    await ac.echo_raw(b"x" * (LIMIT + 1))
                assert await ac.echo("b") == "b"
            finally:
                await ac.aclose()

        asyncio.run(with_asyncio())
        check(c)


# ---- amplification: a few bytes must not buy a lot of server memory or time -----------------

def test_claimed_payload_sizes_do_not_commit_memory_up_front():
    """A frame header is 24 bytes; the memory for its payload should follow the bytes
    that actually arrive, not the length the header claims (docs/tcp-protocol.md:
    "a small frame cannot make it allocate a lot")."""
    limit = 64 * MiB
    with serve(max_payload=limit, tcp_stall_timeout=30.0) as svc, client(svc) as c:
        check(c)
        pid = svc.tcp_process.pid
        rss0 = rss_mib(pid)
        raws = []
        for i in range(4):
            raw = RawClient(svc).welcome()
            raw.send(fr.call_header(1, b"echo_raw", RAW.flags, 0, limit - 1) + b"x" * 100)
            raws.append(raw)
        assert timed_check(c) < 1.0
        time.sleep(0.3)
        grown = rss_mib(pid) - rss0
        for raw in raws:
            raw.close()
        check(c)
        assert grown < 64, (f"four 132-byte messages made the gateway grow by {grown:.0f} MiB "
                            f"(each claimed a {limit - 1}-byte payload)")


def test_compressed_frames_claiming_huge_sizes_do_not_stall_other_clients():
    """A 40-byte compressed frame that states a large original size must not make the
    gateway's event loop allocate and clear that much before finding it is garbage."""
    limit = 256 * MiB
    with serve(max_payload=limit) as svc, client(svc) as c:
        check(c)
        raw = RawClient(svc).welcome(compression="zlib")
        body = struct.pack("<Q", limit) + b"garbage!"
        n = 8
        latencies = []
        started = threading.Event()

        def ping():
            started.set()
            for _ in range(10):
                latencies.append(timed_check(c, "ping"))
                time.sleep(0.05)

        th = threading.Thread(target=ping)
        raw.send(b"".join(fr.call_header(i + 1, b"echo_raw", RAW.flags, 0, len(body), fr.F_COMPRESSED) + body
                          for i in range(n)))
        th.start()
        started.wait()
        for _ in range(n):
            assert isinstance(raw.error_reply(timeout=30), DecodeError)
        th.join(30)
        raw.close()
        check(c)
        assert max(latencies) < 1.0, (f"{n} frames of {fr.HEADER_SIZE + len('echo_raw') + len(body)} bytes "
                                      f"held up another client for {max(latencies):.1f} s")


def test_backpressure_is_not_mistaken_for_a_stall():
    """When the gateway itself stops reading a connection (too many calls in flight),
    the time it does not read must not count as the client stalling mid-frame: here
    the client sends everything at once, yet the gateway drops it for "no progress"."""
    with serve(workers=2, tcp_stall_timeout=1.0) as svc, client(svc) as c:
        check(c)
        long, short = msgpack_args(2.5, None), msgpack_args(0, None)
        calls = [fr.call_header(i + 1, b"sleep", MSGPACK.flags, 0, len(p)) + p
                 for i, p in enumerate([long, long] + [short] * 300)]   # 302 > the gateway's 256 in flight
        frames = b"".join(calls)
        raw = RawClient(svc).welcome()
        cut = len(frames) - len(calls[-1]) // 2
        raw.send(frames[:cut])                    # the last frame in two parts, a moment apart:
        time.sleep(0.1)                           # the gateway has paused reading by then
        raw.send(frames[cut:])
        got, t0, dropped = [], time.monotonic(), None
        try:
            while len(got) < len(calls):
                got += raw.read_frames(1, timeout=30)
        except (EOFError, ConnectionResetError) as e:
            dropped = e
        elapsed = time.monotonic() - t0
        goaways = [decode_exception(f.payload) for f in got if f.kind == fr.GOAWAY]
        raw.close()
        check(c)
        assert not goaways and dropped is None, (
            f"the gateway dropped the connection after {elapsed:.1f} s and "
            f"{sum(f.kind == fr.REPLY for f in got)} of {len(calls)} replies "
            f"({goaways[0] if goaways else dropped!r})")
        assert all(f.kind == fr.REPLY and f.arg == 0 for f in got)


def test_slow_calls_pipelined_by_one_client_do_not_exhaust_the_channels():
    """The gateway must keep its calls in flight below the service's channels
    (docs/tcp-protocol.md: "calls in flight to the workers: half of max_channels;
    further calls wait"), or one TCP client's pipelined calls leave none for
    anybody else, and fail themselves instead of waiting."""
    with serve(workers=2, max_channels=16) as svc, client(svc) as c:
        check(c)
        payload = msgpack_args(0.05, None)
        n = 40
        raw = RawClient(svc).welcome()
        raw.send(b"".join(fr.call_header(i + 1, b"sleep", MSGPACK.flags, 0, len(payload)) + payload
                          for i in range(n)))
        time.sleep(0.2)
        problems = []
        for when in ("during", "after"):
            if when == "after":
                replies = raw.read_frames(n, timeout=30)
                failed = [decode_exception(f.payload) for f in replies if f.arg]
                if failed:
                    problems.append(f"{len(failed)} of {n} pipelined calls failed instead of waiting: {failed[0]}")
            for who, make in (("tcp", lambda: client(svc)), ("shm", lambda: connect(HostileEcho, timeout=20))):
                try:
                    with make() as cl:                # a client arriving now
                        assert cl.echo(who) == who
                except ServiceUnavailable as e:
                    problems.append(f"a new {who} client {when} the flood: {e}")
        raw.close()
        check(c)
        assert not problems, problems


def test_a_large_payload_buffer_commits_memory_only_as_bytes_arrive():
    # a header may claim up to the payload limit before sending anything: its buffer must not
    # cost that much memory up front
    import psutil
    me = psutil.Process()
    before = me.memory_info().rss
    buf = fr.lazy_buffer(1 << 30)
    try:
        buf[:4096] = b"x" * 4096
        buf[(1 << 30) - 1] = 7
        assert me.memory_info().rss - before < 64 << 20
        assert buf[0] == ord("x") and buf[(1 << 30) - 1] == 7 and buf[1 << 20] == 0
    finally:
        buf.close()


def test_many_calls_in_one_read_mixed_with_odd_ones_each_get_their_answer():
    """One write carrying usual calls (posted together, collected after) mixed with calls
    that are not usual (compressed, pickle, an unknown method, undecodable arguments, more
    than there is room for in flight): every call gets its own answer, by id."""
    good = b"abc" * 3000
    with serve(max_channels=8) as svc:   # room for 4 calls in flight from the gateway
        with RawClient(svc) as raw:
            raw.welcome(compression="zlib", compress_min=1 << 20)
            expected, wire = {}, []
            for i in range(1, 61):
                kind = i % 6
                if kind == 1:
                    body = compression.compress("zlib", good)
                    wire.append(fr.call_header(i, b"echo_raw", RAW.flags, 0, len(body), fr.F_COMPRESSED) + body)
                    expected[i] = (0, good)
                elif kind == 2:
                    body = msgpack_args("pickled?")
                    wire.append(fr.call_header(i, b"echo", codecs.PICKLE.flags, 0, len(body)) + body)
                    expected[i] = NotAllowed
                elif kind == 3:
                    body = msgpack_args(i)
                    wire.append(fr.call_header(i, b"no_such_method", MSGPACK.flags, 0, len(body)) + body)
                    expected[i] = MethodNotFound
                elif kind == 4:
                    wire.append(fr.call_header(i, b"echo", MSGPACK.flags, 0, 3) + b"\xc1\xc1\xc1")
                    expected[i] = DecodeError
                else:
                    body = msgpack_args([i, "x" * i])
                    wire.append(fr.call_header(i, b"echo", MSGPACK.flags, 0, len(body)) + body)
                    expected[i] = (0, MSGPACK.dumps([i, "x" * i]))
            raw.send(b"".join(wire))
            got = {}
            for frame in raw.read_frames(len(expected), timeout=20):
                assert frame.kind == fr.REPLY and frame.call_id not in got
                got[frame.call_id] = (frame.arg, bytes(frame.payload))
            assert sorted(got) == sorted(expected)
            for i, want in expected.items():
                status, payload = got[i]
                if isinstance(want, tuple):
                    assert (status, payload) == want, i
                else:
                    assert status == 1 and isinstance(decode_exception(payload), want), (i, decode_exception(payload))
        with client(svc) as after:
            check(after)
        assert not busy_channels(svc), "calls posted together left channels behind"


def test_worker_killed_while_calls_posted_together_are_in_flight():
    """A read brings a slow call and several quick ones (posted together, collected after);
    the worker running the slow one is killed -9: that call gets WorkerDied, every other
    one its answer, the connection goes on and no channel stays busy."""
    import signal
    from speedysvc import WorkerDied
    with serve() as svc, RawClient(svc) as raw:
        raw.welcome()
        body = msgpack_args(30, "never")
        wire = [fr.call_header(1, b"sleep", MSGPACK.flags, 0, len(body)) + body]
        for i in range(2, 12):
            body = msgpack_args(i)
            wire.append(fr.call_header(i, b"echo", MSGPACK.flags, 0, len(body)) + body)
        raw.send(b"".join(wire))
        seg = svc.segment
        assert wait_until(lambda: any(w["busy"] for w in seg.workers()), 10)
        busy = next(w["pid"] for w in seg.workers() if w["busy"])
        os.kill(busy, signal.SIGKILL)
        got = {f.call_id: (f.arg, bytes(f.payload)) for f in raw.read_frames(11, timeout=20)}
        assert sorted(got) == list(range(1, 12))
        status, payload = got.pop(1)
        assert status == 1 and isinstance(decode_exception(payload), WorkerDied), decode_exception(payload)
        assert got == {i: (0, MSGPACK.dumps(i)) for i in range(2, 12)}
        raw.call(20, "echo", msgpack_args("after"))
        assert raw.reply()[:2] == (0, MSGPACK.dumps("after"))
        assert wait_until(lambda: not busy_channels(svc), 10), busy_channels(svc)


# ---- clients that leave their replies unread -------------------------------------------------

def test_a_client_that_pauses_reading_gets_every_reply_when_it_reads_again():
    """Replies a client leaves unread stay in shared memory (large ones) or are not started
    (calls it sends meanwhile): the gateway holds about one reply for it, not all of them;
    when it reads again, every call gets its right answer."""
    big = 4 * MiB
    with serve(max_payload=16 * MiB, tcp_stall_timeout=30.0) as svc, client(svc) as c:
        check(c)
        pid = svc.tcp_process.pid
        rss0 = rss_mib(pid)
        raw = RawClient(svc, rcvbuf=4096).welcome()
        calls, expected = [], {}
        for i in range(1, 61):
            if i % 2:
                args, expected[i] = msgpack_args(big + i), MSGPACK.dumps(b"b" * (big + i))
                calls.append(fr.call_header(i, b"blob", MSGPACK.flags, 0, len(args)) + args)
            else:
                args, expected[i] = msgpack_args(f"small {i}"), MSGPACK.dumps(f"small {i}")
                calls.append(fr.call_header(i, b"echo", MSGPACK.flags, 0, len(args)) + args)
        raw.send(b"".join(calls))
        latencies = []
        for _ in range(10):
            time.sleep(0.1)
            latencies.append(timed_check(c, "meanwhile"))
        grown = rss_mib(pid) - rss0
        got = {}
        for frame in raw.read_frames(len(calls), timeout=60):
            assert frame.kind == fr.REPLY and frame.arg == 0, frame
            got[frame.call_id] = bytes(frame.payload)
        raw.close()
        check(c)
        assert got.keys() == expected.keys()
        assert all(got[i] == expected[i] for i in expected), "a reply does not match its call"
        assert grown < 48, f"the gateway grew by {grown:.0f} MiB for {30 * big >> 20} MiB of unread replies"
        assert max(latencies) < 1.0, latencies
        assert wait_until(lambda: not busy_channels(svc), timeout=5)


def test_a_client_that_reads_nothing_is_disconnected_after_the_stall_timeout():
    """A client that reads none of its replies for tcp_stall_timeout seconds is dropped, and
    the channels its unread answers held serve other clients again."""
    with serve(max_payload=16 * MiB, tcp_stall_timeout=1.0) as svc, client(svc) as c:
        check(c)
        raw = RawClient(svc, rcvbuf=4096).welcome()
        args = msgpack_args(4 * MiB)
        raw.send(b"".join(fr.call_header(i, b"blob", MSGPACK.flags, 0, len(args)) + args for i in range(1, 11)))
        time.sleep(4)                              # reads nothing: dropped after ~1-2 s
        replies, ended = 0, None
        try:
            while True:
                frame, = raw.read_frames(1, timeout=10)
                replies += frame.kind == fr.REPLY
        except (EOFError, ConnectionResetError) as e:
            ended = e
        raw.close()
        assert ended is not None and replies < 10, f"not dropped: {replies} replies read after 4 s"
        check(c)
        # a client that reads its replies gets them all, the parked channels being free again
        with client(svc) as other:
            with ThreadPoolExecutor(8) as pool:
                assert list(pool.map(other.blob, [MiB + i for i in range(16)])) == \
                    [b"b" * (MiB + i) for i in range(16)]
        assert wait_until(lambda: not busy_channels(svc), timeout=5)


def test_large_compressed_calls_at_once_are_inflated_within_the_budget_and_all_answered():
    """Large compressed calls are inflated in threads within a memory budget: the ones beyond
    it wait their turn, none is lost, and other clients go on."""
    size = 64 * MiB
    with serve(max_payload=128 * MiB, tcp=None), \
            InProcessGateway(HostileEcho.name, max_payload=128 * MiB, inflate_budget=size + 64) as gw, \
            client(gw) as c:
        check(c)
        payload = bytes(size // 2) + b"x" * (size // 2)
        clients = [client(gw, compression=algo, timeout=60) for algo in ("zstd", "lz4", "zlib", "snappy")]
        try:
            with pinging(c) as latencies, ThreadPoolExecutor(8) as pool:
                sizes = list(pool.map(lambda i: clients[i % 4].size_of(payload), range(8)))
        finally:
            for cl in clients:
                cl.close()
        assert sizes == [size] * 8
        check(c)
        assert gw.read(lambda s: s.counters["inflate_waits"]) > 0, "no call ever waited for the budget"
        assert gw.read(lambda s: s.inflating) == 0
        assert max(latencies) < 1.0, latencies


def test_unread_replies_to_large_requests_pin_neither_requests_nor_replies():
    """A client that sends large calls and reads none of the replies: once a call's answer is
    in, neither its request nor its answer stays in the gateway's own memory (beyond the one
    reply that filled the connection's write buffer): the answers wait in shared memory."""
    size, n = 4 * MiB, 16
    with serve(max_payload=16 * MiB, tcp_stall_timeout=30.0) as svc, client(svc) as c:
        check(c)
        pid = svc.tcp_process.pid
        anon0 = anon_mib(pid)
        raw = RawClient(svc, rcvbuf=4096).welcome()
        value = bytes(range(256)) * (size // 256)
        args = msgpack_args(0.2, value)            # sleep(0.2, value) returns value: all are read first
        raw.send(b"".join(fr.call_header(i, b"sleep", MSGPACK.flags, 0, len(args)) + args for i in range(1, n + 1)))
        assert wait_until(lambda: not busy_channels(svc), timeout=30)   # every answer is in
        time.sleep(0.5)
        grown = anon_mib(pid) - anon0
        check(c)
        frames = raw.read_frames(n, timeout=60)
        raw.close()
        assert sorted(f.call_id for f in frames) == list(range(1, n + 1))
        assert all(f.arg == 0 and bytes(f.payload) == MSGPACK.dumps(value) for f in frames)
        assert grown < 32, f"the gateway holds {grown:.0f} MiB for {n} answered calls of a client that does not read"


class InProcessGateway:
    """A TcpServer with options LocalService does not pass, on an event loop in a thread, in
    front of a LocalService's workers."""

    def __init__(self, service: str, **kw):
        from speedysvc.tcp.server import TcpServer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = TcpServer(service, "127.0.0.1", 0, **kw)
        self.run(self.server.start())
        self.tcp_address = f"tcp://127.0.0.1:{self.server.port}"

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def read(self, fn):
        """``fn(server)`` called on the server's loop."""
        async def call():
            return fn(self.server)
        return self.run(call())

    def close(self, timeout=10.0):
        try:
            self.run(self.server.close(timeout), timeout + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def compressed_call(raw, call_id, name, payload, algo):
    packed = compression.compress(algo, payload)
    raw.send(fr.call_header(call_id, name.encode(), MSGPACK.flags, 0, len(packed), fr.F_COMPRESSED) + packed)


def test_the_inflate_budget_is_held_while_inflating_not_while_the_call_runs():
    """A large compressed call holds the inflate budget until it is posted to a worker, not
    until it is answered: a slow one does not hold up the next large compressed call."""
    with serve(max_payload=64 * MiB, tcp=None), \
            InProcessGateway(HostileEcho.name, max_payload=64 * MiB, inflate_budget=8 * MiB) as gw:
        slow = RawClient(gw.tcp_address).welcome(compression="zlib")
        compressed_call(slow, 1, "sleep", msgpack_args(3.0, bytes(6 * MiB)), "zlib")
        assert wait_until(lambda: gw.read(lambda s: s.inflight), timeout=5)
        other = RawClient(gw.tcp_address).welcome(compression="zlib")
        t0 = time.monotonic()
        compressed_call(other, 7, "size_of", msgpack_args(bytes(6 * MiB)), "zlib")
        status, payload, _ = other.reply(timeout=10)
        elapsed = time.monotonic() - t0
        assert status == 0 and MSGPACK.loads(payload) == 6 * MiB
        assert elapsed < 1.5, f"the second call waited {elapsed:.1f} s for the first, slow one"
        status, payload, _ = slow.reply(timeout=10)
        assert status == 0 and len(payload) > 6 * MiB
        other.close()
        slow.close()


def test_stopping_the_server_sends_a_reply_that_is_being_compressed():
    """close() lets calls in flight finish, including the compression of their replies."""
    with serve(max_payload=128 * MiB, tcp=None), \
            InProcessGateway(HostileEcho.name, max_payload=128 * MiB) as gw:
        raw = RawClient(gw.tcp_address).welcome(compression="zstd")
        raw.call(1, "blob", msgpack_args(64 * MiB))
        assert wait_until(lambda: gw.read(lambda s: s.inflight + s.compressing), timeout=5)
        gw.run(gw.server.close(20), 60)
        frames = raw.read_frames(2, timeout=20)
        assert [f.kind for f in frames] == [fr.REPLY, fr.GOAWAY]
        assert frames[0].arg == 0 and frames[0].flags & fr.F_COMPRESSED
        payload = compression.decompress("zstd", frames[0].payload, 1 << 30)
        assert bytes(payload) == MSGPACK.dumps(b"b" * (64 * MiB))
        raw.close()


def test_a_client_that_reads_its_replies_slowly_is_not_taken_for_one_that_reads_nothing():
    """The kernel's send buffer (megabytes) drains long before the gateway's own buffer
    shrinks (here ~3 s at 512 KiB/s): a client reading steadily, if slowly, must not be
    dropped as a non-reader."""
    with serve(max_payload=32 * MiB, tcp=None), \
            InProcessGateway(HostileEcho.name, max_payload=32 * MiB, stall_timeout=1.0) as gw:
        raw = RawClient(gw.tcp_address).welcome()
        raw.call(1, "blob", msgpack_args(24 * MiB))
        raw.sock.settimeout(5)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:           # five times the stall timeout
            raw.sock.recv(25 << 10)                # (what the kernel holds for us outlasts a drop)
            time.sleep(0.05)
        assert gw.read(lambda s: (len(s.connections), s.counters["protocol_errors"])) == (1, 0), \
            "a client reading at 512 KiB/s was dropped as one that reads nothing"
        raw.close()


def test_one_client_gets_a_share_of_the_calls_in_flight_not_all():
    """A client that pipelines many slow calls holds at most its share (a quarter) of the
    gateway's calls in flight; the others' calls go on in parallel."""
    with serve(max_channels=8, workers=4) as svc:   # 4 calls in flight, a share of 1
        hog = RawClient(svc).welcome()
        args = msgpack_args(3.0, "slow")
        hog.send(b"".join(fr.call_header(i, b"sleep", MSGPACK.flags, 0, len(args)) + args for i in range(1, 9)))
        time.sleep(0.3)

        def one(i):
            with client(svc) as c:
                return c.sleep(1.0, i)

        t0 = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(one, range(3))) == [0, 1, 2]
        elapsed = time.monotonic() - t0
        hog.close(reset=True)
        assert elapsed < 2.5, f"3 one-second calls took {elapsed:.1f} s beside one client's 8 slow calls"


def test_many_small_compression_bombs_do_not_stall_other_clients():
    """Calls that state under 1 MiB but came in as a few dozen bytes each (a ratio no real
    payload has) are inflated in threads too: thousands of them in a few reads must not keep
    the event loop from other clients."""
    with serve(max_payload=4 * MiB) as svc, client(svc) as c:
        check(c)
        body = compression.compress("zstd", msgpack_args(bytes(512 * 1024 - 64)))
        assert len(body) < 100
        n = 2000
        frames = b"".join(fr.call_header(i, b"size_of", MSGPACK.flags, 0, len(body), fr.F_COMPRESSED) + body
                          for i in range(1, n + 1))
        bomb = RawClient(svc).welcome(compression="zstd")
        with pinging(c, every=0.01) as latencies:
            time.sleep(0.2)
            bomb.send(frames)
            replies = bomb.read_frames(n, timeout=120)
        bomb.close()
        assert all(f.arg == 0 and MSGPACK.loads(f.payload) == 512 * 1024 - 64 for f in replies)
        assert max(latencies) < 0.25, f"{len(frames)} bytes of calls held up another client for {max(latencies):.2f} s"


def test_clients_that_read_nothing_cannot_take_the_calls_in_flight_from_the_others():
    """Answers left unread hold their calls' room.  When other clients' calls wait for it,
    a connection that has taken none of the server's bytes for a second is dropped (not
    after tcp_stall_timeout) and the others' calls run."""
    with serve(max_payload=16 * MiB, max_channels=16, workers=4, tcp_stall_timeout=30.0) as svc:   # 8 in flight
        hogs = []
        args = msgpack_args(8 * MiB)
        for _ in range(12):                        # an unread answer each: together, every call in flight
            hog = RawClient(svc, rcvbuf=4096).welcome()
            hog.send(b"".join(fr.call_header(i, b"blob", MSGPACK.flags, 0, len(args)) + args for i in range(1, 5)))
            hogs.append(hog)
        time.sleep(0.5)

        def one(i):
            with client(svc) as c:
                return c.sleep(1.0, i)

        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:          # as many as the workers
            assert list(pool.map(one, range(4))) == list(range(4))
        elapsed = time.monotonic() - t0
        dropped = 0
        for hog in hogs:   # read: a hog still connected gets its 4 answers, a dropped one a go-away or a reset
            try:
                frames = hog.read_frames(4, timeout=10)
                dropped += any(f.kind == fr.GOAWAY for f in frames)
            except (EOFError, ConnectionResetError):
                dropped += 1
            hog.close()
        assert elapsed < 4.5, f"4 one-second calls took {elapsed:.1f} s beside 12 clients that read nothing"
        assert dropped >= 1, "calls waited, yet no client that reads nothing was dropped"
        assert wait_until(lambda: not busy_channels(svc), timeout=5)


def test_clients_that_read_their_answers_are_not_dropped_when_calls_wait_for_room():
    """Clients pipelining large compressed replies (each compressed in a thread: their answers
    park meanwhile) and reading them as fast as they can are never taken for clients that
    read nothing, even while calls wait for room."""
    with serve(max_payload=16 * MiB, tcp=None, workers=4, max_channels=32), \
            InProcessGateway(HostileEcho.name, max_payload=16 * MiB, max_inflight=8, stall_timeout=30.0) as gw:
        n_clients, n_calls = 8, 8
        args = msgpack_args(os.urandom(3 * MiB // 2))   # incompressible: zlib takes a while on it
        results = {}

        def run(k):
            raw = RawClient(gw.tcp_address, timeout=30).welcome(compression="zlib")
            data = b"".join(fr.call_header(i, b"echo", MSGPACK.flags, 0, len(args)) + args
                            for i in range(1, n_calls + 1))
            sender = threading.Thread(target=raw.sock.sendall, args=(data,), daemon=True)
            sender.start()
            try:
                results[k] = [(f.kind, f.arg) for f in raw.read_frames(n_calls, timeout=60)]
            except Exception as e:
                results[k] = repr(e)
            sender.join(10)
            raw.close()

        threads = [threading.Thread(target=run, args=(k,)) for k in range(n_clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(90)
        assert results == {k: [(fr.REPLY, 0)] * n_calls for k in range(n_clients)}
        assert gw.read(lambda s: s.counters["protocol_errors"]) == 0


def test_an_inflated_call_is_not_kept_in_memory_while_it_runs():
    """Once a large compressed call is inflated into its channel, the gateway keeps no copy
    of it while the worker runs it (each below states 48 MiB and came in as ~50 KB)."""
    with serve(max_payload=64 * MiB, tcp=None, workers=4), \
            InProcessGateway(HostileEcho.name, max_payload=64 * MiB) as gw:
        before = anon_mib(os.getpid())
        raws = []
        for i in range(4):
            raw = RawClient(gw.tcp_address).welcome(compression="zstd")
            compressed_call(raw, 1, "sleep", msgpack_args(3.0, bytes(48 * MiB)), "zstd")
            raws.append(raw)
        assert wait_until(lambda: gw.read(lambda s: s.inflight == 4 and s.inflating == 0), timeout=10)
        time.sleep(0.3)
        held = anon_mib(os.getpid()) - before
        for raw in raws:
            status, payload, _ = raw.reply(timeout=20)
            assert status == 0 and len(payload) > 48 * MiB
            raw.close()
        assert held < 96, f"{held:.0f} MiB held for 4 calls running, each inflated to 48 MiB"


def test_worker_killed_during_a_call_inflated_in_a_thread():
    """A large compressed call (inflated and waited for in a thread) whose worker is killed -9:
    that call gets WorkerDied, the connection goes on, the budget and the calls in flight are
    back to nothing."""
    import signal
    from speedysvc import WorkerDied
    with serve(max_payload=64 * MiB, tcp=None, workers=2) as svc, \
            InProcessGateway(HostileEcho.name, max_payload=64 * MiB) as gw:
        raw = RawClient(gw.tcp_address).welcome(compression="zstd")
        compressed_call(raw, 1, "sleep", msgpack_args(30, bytes(8 * MiB)), "zstd")
        seg = svc.segment
        assert wait_until(lambda: any(w["busy"] for w in seg.workers()), 10)
        os.kill(next(w["pid"] for w in seg.workers() if w["busy"]), signal.SIGKILL)
        status, payload, _ = raw.reply(timeout=20)
        assert status == 1 and isinstance(decode_exception(payload), WorkerDied), decode_exception(payload)
        raw.call(2, "echo", msgpack_args("after"))
        assert raw.reply()[:2] == (0, MSGPACK.dumps("after"))
        assert gw.read(lambda s: (s.inflight, s.inflating, s.parked)) == (0, 0, 0)
        raw.close()


def test_a_client_killed_with_answers_left_unread_gives_their_channels_back():
    """A client whose answers wait in shared memory (it read none) vanishes with a reset: the
    gateway abandons them, its counts of calls in flight go back to nothing, and the channels
    serve the next calls."""
    with serve(max_payload=16 * MiB, tcp=None, workers=2) as svc, \
            InProcessGateway(HostileEcho.name, max_payload=16 * MiB) as gw:
        raw = RawClient(gw.tcp_address, rcvbuf=4096).welcome()
        args = msgpack_args(2 * MiB)
        raw.send(b"".join(fr.call_header(i, b"blob", MSGPACK.flags, 0, len(args)) + args for i in range(1, 7)))
        assert wait_until(lambda: gw.read(lambda s: s.parked) >= 2, timeout=10)
        owned = gw.read(lambda s: len(s.shm._channels.owned))
        raw.close(reset=True)
        assert wait_until(lambda: gw.read(lambda s: (s.inflight, s.parked, len(s.connections))) == (0, 0, 0),
                          timeout=10)
        assert gw.read(lambda s: len(s.shm._channels.free)) == owned   # every channel back, none lost
        with client(gw) as c:
            with ThreadPoolExecutor(6) as pool:
                assert list(pool.map(c.blob, [MiB] * 6)) == [b"b" * MiB] * 6
        assert gw.read(lambda s: len(s.shm._channels.owned)) == owned
        assert wait_until(lambda: not busy_channels(svc), timeout=5)
