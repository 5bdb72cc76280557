"""Slow-loris and vanishing peers: a client that never finishes its handshake, stalls halfway
through a frame (reading or not) or vanishes mid-call is dropped in time and leaks nothing,
while an idle, well-behaved client keeps its connection and others are served quickly."""
import socket
import time

import pytest

from speedysvc import ProtocolError, connect
from speedysvc.errors import decode_exception
from speedysvc.tcp import framing as fr
from conftest import wait_until
import tcp_helpers
from tcp_helpers import (MSGPACK, RAW, RawClient, busy_channels, check, connect_to, guarded, logs_clean, msgpack_args,
                         open_sockets, read_hello, server_pids, timed_check)
from tcp_services import TcpRestart

tcp_mode = tcp_helpers.tcp_mode

# every test here runs with TCP served by the workers and by a gateway process
pytestmark = pytest.mark.usefixtures("tcp_mode")

serve = tcp_helpers.serve
server_logs_clean = tcp_helpers.server_logs_clean


def read_until_closed(sock, timeout):
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_handshake_and_stall_timeouts_drop_stuck_clients_but_keep_idle_ones(serve):
    svc = serve(TcpRestart, workers=1, tcp_handshake_timeout=1, tcp_stall_timeout=1)
    host, port = svc.tcp_address.removeprefix("tcp://").rsplit(":", 1)
    with connect(TcpRestart, svc.tcp_address, timeout=10) as good, \
            socket.create_connection((host, int(port))) as silent, \
            socket.create_connection((host, int(port))) as staller:
        assert good.echo("before") == "before"
        conn = good._transport._conn

        # never answers the server's hello
        msg_type, _, body, _ = read_hello(silent)
        assert msg_type == fr.SERVER_HELLO and body["service"] == TcpRestart.name

        # shakes hands, then sends half a call header and stops
        msg_type, _, body, _ = read_hello(staller)
        staller.sendall(fr.pack_hello(fr.CLIENT_HELLO, {"service": TcpRestart.name, "compression": "",
                                                        "compress_min": 4096, "nonce": fr.new_nonce(),
                                                        "proof": None}))
        assert read_hello(staller)[0] == fr.WELCOME
        staller.sendall(fr.call_header(1, b"echo", 0, 0, 10)[:7])

        t = time.monotonic()
        rest = read_until_closed(silent, 5)
        assert time.monotonic() - t < 3.5
        refused = fr.HelloReader().feed(rest)
        assert refused[0] == fr.REFUSED
        assert "handshake" in str(decode_exception(refused[2]["error"]))

        rest = read_until_closed(staller, 5)
        assert time.monotonic() - t < 3.5
        frames = fr.FrameParser(1 << 20, frozenset((fr.REPLY, fr.GOAWAY))).feed(rest)
        assert [f.kind for f in frames] == [fr.GOAWAY]
        assert "progress" in str(decode_exception(frames[0].payload))

        time.sleep(max(0.0, 2.5 - (time.monotonic() - t)))
        # the idle, well-behaved client kept its connection
        assert good.echo("after") == "after"
        assert good._transport._conn is conn


@logs_clean
def test_clients_that_never_finish_the_handshake_are_dropped():
    with guarded(tcp_handshake_timeout=1.0) as svc, connect_to(svc) as c:
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
        with connect_to(svc) as after:
            check(after)


@logs_clean
def test_clients_that_stall_halfway_through_a_frame_are_dropped():
    with guarded(tcp_stall_timeout=1.0) as svc, connect_to(svc) as c:
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


@logs_clean
def test_a_stalled_client_that_does_not_read_is_still_disconnected():
    """The stall timeout must free the connection even when the client reads
    nothing: a go-away queued behind replies nobody reads never flushes, so a
    plain close() leaves the socket (and its buffered replies) open for as long
    as the client likes, no longer counted among the connections."""
    with guarded(tcp_stall_timeout=1.0) as svc, connect_to(svc) as c:
        check(c)
        pid = server_pids(svc)
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


@logs_clean
def test_caller_vanishing_mid_call_leaks_nothing(tmp_path):
    with guarded() as svc, connect_to(svc) as c:
        check(c)
        pid = server_pids(svc)
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
        with connect_to(svc) as after:
            check(after)


@logs_clean
def test_a_slow_upload_above_the_minimum_rate_is_served():
    """The minimum rate (16 KiB/s by default, over each stall timeout) drops a trickle, not a
    slow client: a frame sent at ~100 KB/s for four stall timeouts is answered."""
    with guarded(tcp_stall_timeout=1.0) as svc:
        payload = bytes(range(256)) * 1600           # 400 KiB
        frame = fr.call_header(3, b"echo_raw", RAW.flags, 0, len(payload)) + payload
        with RawClient(svc).welcome() as raw:
            for i in range(0, len(frame), 25_000):
                raw.send(frame[i:i + 25_000])
                time.sleep(0.25)
            status, echoed, _ = raw.reply()
            assert status == 0 and echoed == payload
