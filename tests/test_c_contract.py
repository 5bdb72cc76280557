"""The contract between the C extension and the Python it uses by name.

``_shmcore.PYTHON_NAMES`` lists every attribute, method and dictionary key that C
reads, writes or calls by name (the extension's ``names.h``), by what it belongs to.
Each is checked here on a real instance of its owner, so that renaming one on the
Python side fails this test, not a call at run time; and the constants Python
takes from the extension (``layout.h``) are checked against what uses them.
"""
import asyncio
import socket
import struct

import pytest

from speedysvc import _shmcore as core
from speedysvc.shm import ShmTransport
from speedysvc.shm.channels import Channel, Channels
from speedysvc.tcp import client as tc
from speedysvc.tcp import framing as fr
from speedysvc.tcp.connection import ServerConnection
from speedysvc.tcp.server import TcpServer

OWNERS = {"ShmTransport", "Channels", "Channel", "Admission", "Gateway counters", "FrameParser",
          "BlockingConnection", "TcpTransport", "ServerConnection", "asyncio.Transport", "threading.Lock",
          "socket.socket"}


def test_the_table_lists_each_owner_once_with_names():
    assert set(core.PYTHON_NAMES) == OWNERS
    for owner, names in core.PYTHON_NAMES.items():
        assert names and all(isinstance(n, str) and n for n in names), owner
        assert len(set(names)) == len(names), owner
    with pytest.raises(TypeError):
        core.PYTHON_NAMES["ShmTransport"] = ()   # read-only: it describes the C code


@pytest.fixture(scope="module")
def instances(kitchen):
    """A real instance of every owner in the table."""
    from speedysvc import connect
    from services import Kitchen
    with connect(Kitchen) as c:
        transport = c._transport
        assert isinstance(transport, ShmTransport)
        assert c.echo_msgpack("attached") == "attached"   # a real call: the attachment is made
        chans = transport._channels
        assert isinstance(chans, Channels) and chans.free
        # a connection over a socketpair, as after a handshake (the handshake sets max_payload)
        a, b = socket.socketpair()
        opts = tc.ClientOptions(Kitchen.name, "127.0.0.1", 1)
        opts.max_payload = None
        conn = tc.BlockingConnection(a, opts, b"")
        tcp_transport = tc.TcpTransport(opts)
        server = TcpServer(Kitchen.name)
        try:
            yield {
                "ShmTransport": transport,
                "Channels": chans,
                "Channel": chans.free[-1],
                "Admission": server.admission,
                "TcpServer": server,
                "FrameParser": fr.FrameParser(1 << 20, frozenset((fr.CALL,))),
                "BlockingConnection": conn,
                "TcpTransport": tcp_transport,
                "ServerConnection": ServerConnection(server),
                "asyncio.Transport": asyncio.Transport(),
                "threading.Lock": conn.lock,
                "socket.socket": conn.sock,
            }
        finally:
            server.shm.close()
            conn.close()
            b.close()


@pytest.mark.parametrize("owner", sorted(OWNERS - {"Gateway counters"}))
def test_every_name_c_uses_exists_on_a_real_instance(instances, owner):
    obj = instances[owner]
    if owner == "Channel":
        assert isinstance(obj, Channel)
    missing = [name for name in core.PYTHON_NAMES[owner] if not hasattr(obj, name)]
    assert not missing, f"{type(obj).__qualname__} lacks {missing}, which the C extension uses (names.h)"


def test_every_counter_the_gateway_counts_is_one_the_server_keeps(instances):
    counters = instances["TcpServer"].counters
    missing = [key for key in core.PYTHON_NAMES["Gateway counters"] if key not in counters]
    assert not missing, f"TcpServer.counters lacks {missing}, which the C gateway counts"


def test_the_methods_c_calls_are_callable(instances):
    calls = {"ShmTransport": ("call", "_resume", "_abort"), "Channels": ("retire",), "FrameParser": ("get_buffer",),
             "ServerConnection": ("_hello_buffer", "_posted", "_buffer_updated"), "asyncio.Transport": ("write",),
             "BlockingConnection": ("_failed_to_send", "_read_on", "_unregister", "_pass_reading_on", "close"),
             "TcpTransport": ("call", "_after_alone"),
             "threading.Lock": ("acquire", "release"), "socket.socket": ("fileno",)}
    for owner, names in calls.items():
        assert set(names) <= set(core.PYTHON_NAMES[owner]), owner
        for name in names:
            assert callable(getattr(instances[owner], name)), (owner, name)


def test_the_frame_constants_are_the_extensions():
    assert fr.HEADER_SIZE == fr.FRAME.size == core.FRAME_HEADER
    header = fr.FRAME.pack(fr.CALL, fr.F_COMPRESSED, 3, 0x01020304, 0x05060708, 0x090A0B0C, 0x0D0E0F1011121314)
    assert header[core.FRAME_KIND] == core.FRAME_CALL
    assert header[core.FRAME_FLAGS] == core.FRAME_F_COMPRESSED
    for off, fmt, value in [(core.FRAME_NAME_LEN, "<H", 3), (core.FRAME_CALL_ID, "<I", 0x01020304),
                            (core.FRAME_ARG, "<I", 0x05060708), (core.FRAME_TIMEOUT, "<I", 0x090A0B0C),
                            (core.FRAME_LENGTH, "<Q", 0x0D0E0F1011121314)]:
        assert struct.unpack_from(fmt, header, off) == (value,)
    assert (fr.CALL, fr.REPLY, fr.GOAWAY) == (core.FRAME_CALL, core.FRAME_REPLY, core.FRAME_GOAWAY)
    assert fr.KNOWN_FRAME_FLAGS == core.FRAME_KNOWN_FLAGS and fr.MAX_NAME == core.FRAME_MAX_NAME


def test_call_alone_sees_the_connection_states_python_sets():
    """BlockingConnection's states live in its C base (ConnectionCore): what Python sets there
    is what call_alone reads (it hands a call that is not alone back, with nothing sent), and
    what call_alone sets after a usual call (the reader's turn ended, the call forgotten,
    bytes came just now) is what Python reads."""
    import time
    a, b = socket.socketpair()
    opts = tc.ClientOptions("svc", "127.0.0.1", 1)
    opts.max_payload = None
    conn = tc.BlockingConnection(a, opts, b"")
    try:
        assert isinstance(conn, core.ConnectionCore)
        assert conn.alone is True and conn.reading is False and conn.broken is None and conn.waiting == {}
        assert conn.fork_generation == core.fork_generation()
        frame = fr.call_header(7, b"echo", 0, 0, 2) + b"hi"
        conn.last_read = time.monotonic() + 3600   # (no idle check: nothing to poll)
        for name, value in [("reading", True), ("waiting", {99: None}), ("broken", ConnectionError("gone"))]:
            old = getattr(conn, name)
            setattr(conn, name, value)
            assert core.call_alone(conn, frame, 7, 1.0) is None, name   # not alone
            setattr(conn, name, old)
        b.settimeout(1)
        with pytest.raises(socket.timeout):
            b.recv(1)   # nothing was sent
        reply = fr.reply_header(7, 0, 2) + b"ok"
        b.sendall(reply)   # (already there when call_alone reads)
        before = time.monotonic()
        assert core.call_alone(conn, frame, 7, 1.0) == (0, b"ok")
        assert b.recv(100) == frame
        assert conn.reading is False and conn.waiting == {} and before <= conn.last_read <= time.monotonic()
        with pytest.raises(TypeError):
            core.call_alone(object(), frame, 7, 1.0)   # not a connection
        with pytest.raises(TypeError):
            conn.reading = 1   # a bool, as C keeps it
    finally:
        conn.close()
        b.close()


def test_the_codes_python_compares_with_are_the_extensions():
    from speedysvc.shm import dispatch, transport
    assert (transport.CALL_TOO_BIG, transport.CALL_NOT_SERVING, transport.CALL_PENDING) == \
        (core.CALL_TOO_BIG, core.CALL_NOT_SERVING, core.CALL_PENDING)
    assert (transport.POSTED, transport.POSTED_WOKE, transport.STATUS_OK) == (core.POSTED, core.POSTED_WOKE,
                                                                               core.STATUS_OK)
    assert (dispatch.STATUS_OK, dispatch.STATUS_ERROR) == (core.STATUS_OK, core.STATUS_ERROR)
    # the codes are distinct, and a response in hand is never mistaken for one
    codes = [core.POSTED, core.POSTED_WOKE, core.CALL_TOO_BIG, core.CALL_NOT_SERVING, core.CALL_PENDING,
             core.CALL_READY]
    assert len(set(codes)) == len(codes)
    assert len({core.WORKER_FREE, core.WORKER_IDLE, core.WORKER_BUSY}) == 3


def test_worker_states_as_the_segment_reports_them(kitchen):
    """register_worker and workers() use the extension's worker states (a busy worker is one
    that claimed a call: C writes WORKER_BUSY)."""
    seg = kitchen.segment
    workers = seg.workers()
    assert workers and all(not w["busy"] for w in workers)
    r = seg.region
    states = {r.load32(seg.worker_offset(w["index"]) + core.W_STATE) for w in workers}
    assert states <= {core.WORKER_IDLE, core.WORKER_BUSY}



def test_the_worker_entry_fields_fit_one_entry_without_overlapping():
    fields = sorted([(core.W_PID, 4), (core.W_STATE, 4), (core.W_CALLS, 8), (core.W_BUSY_NS, 8),
                     (core.W_STARTED_NS, 8), (core.W_ERRORS, 8), (core.W_CLAIM_NS, 8), (core.W_START_TICKS, 8),
                     (core.W_METHOD, 4)])
    for (off, size), (following, _) in zip(fields, fields[1:]):
        assert off % size == 0 and off + size <= following, (off, following)
    assert fields[-1][0] + fields[-1][1] <= core.W_SIZE == 64


def test_the_header_fields_do_not_overlap_and_the_hot_words_have_lines_of_their_own():
    fields = sorted([(core.H_MAGIC, 4), (core.H_VERSION, 4), (core.H_MAX_CHANNELS, 4), (core.H_MAX_WORKERS, 4),
                     (core.H_MAX_PAYLOAD, 8), (core.H_OWNER_PID, 4), (core.H_STATE, 4), (core.H_CREATED_NS, 8),
                     (core.H_OWNER_START, 8), (core.H_STATS_OFF, 4), (core.H_MAX_METHODS, 4), (core.H_NAMES_OFF, 4),
                     (core.H_OWNER_FLAGS, 4), (core.H_SEQ, 4), (core.H_SLEEPERS, 4), (core.H_REFUSED, 8),
                     (core.H_LOST, 8), (core.H_TCP_OFF, 4), (core.H_BITMAP, core.MAX_CHANNELS_LIMIT // 8),
                     (core.H_SPIN_UNTIL, 8), (core.H_REASON, core.REASON_SIZE)])
    for (off, size), (following, _) in zip(fields, fields[1:]):
        assert off % min(size, 8) == 0 and off + size <= following, (off, size, following)
    assert fields[-1][0] + fields[-1][1] <= core.H_WORKERS
    # written on every post or claim, when workers sleep or spin, or calls are refused: apart
    lines = {name: getattr(core, name) // 64 for name in ("H_SEQ", "H_REFUSED", "H_BITMAP", "H_SPIN_UNTIL")}
    assert len(set(lines.values())) == len(lines), lines
