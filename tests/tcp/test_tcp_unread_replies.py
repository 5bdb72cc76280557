"""Clients that leave their replies unread (or read them slowly): the gateway holds about one
reply for each, the answers wait in shared memory, a client that reads nothing is dropped in
time (sooner when others' calls wait for room), and nothing is lost or leaked."""
import os
import socket
import threading
import time

import pytest
from concurrent.futures import ThreadPoolExecutor

import msgpack

from speedysvc import codecs
from speedysvc import _shmcore as core
from speedysvc.tcp import framing as fr
from conftest import channel_states, wait_until
import tcp_helpers
from tcp_helpers import (InProcessGateway, MSGPACK, MiB, RawClient, anon_mib, busy_channels, check, connect_to, guarded,
                         logs_clean, msgpack_args, server_mib, server_pids, tcp_service, timed_check)
from tcp_services import TcpEcho

tcp_mode = tcp_helpers.tcp_mode

# every test here runs with TCP served by the workers and by a gateway process
pytestmark = pytest.mark.usefixtures("tcp_mode")

server_logs_clean = tcp_helpers.server_logs_clean


@logs_clean
def test_pipelined_calls_never_read_do_not_grow_memory_or_stall_others():
    with guarded(tcp_stall_timeout=30.0) as svc, connect_to(svc) as c:
        check(c)
        rss0 = server_mib(svc)
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
        grown = server_mib(svc) - rss0
        assert grown < 64, f"the gateway grew by {grown:.0f} MiB for a client that does not read"
        assert max(latencies) < 1.0, latencies
        raw.close(reset=True)
        check(c)
        with connect_to(svc) as after:
            check(after)
        assert wait_until(lambda: not busy_channels(svc), timeout=5)


@logs_clean
def test_a_client_that_pauses_reading_gets_every_reply_when_it_reads_again():
    """Replies a client leaves unread stay in shared memory (large ones) or are not started
    (calls it sends meanwhile): the gateway holds about one reply for it, not all of them;
    when it reads again, every call gets its right answer."""
    big = 4 * MiB
    with guarded(max_payload=16 * MiB, tcp_stall_timeout=30.0) as svc, connect_to(svc) as c:
        check(c)
        rss0 = server_mib(svc)
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
        grown = server_mib(svc) - rss0
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


@logs_clean
def test_a_client_that_reads_nothing_is_disconnected_after_the_stall_timeout():
    """A client that reads none of its replies for tcp_stall_timeout seconds is dropped, and
    the channels its unread answers held serve other clients again."""
    with guarded(max_payload=16 * MiB, tcp_stall_timeout=1.0) as svc, connect_to(svc) as c:
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
        with connect_to(svc) as other:
            with ThreadPoolExecutor(8) as pool:
                assert list(pool.map(other.blob, [MiB + i for i in range(16)])) == \
                    [b"b" * (MiB + i) for i in range(16)]
        assert wait_until(lambda: not busy_channels(svc), timeout=5)


@logs_clean
def test_unread_replies_to_large_requests_pin_neither_requests_nor_replies():
    """A client that sends large calls and reads none of the replies: once a call's answer is
    in, neither its request nor its answer stays in the gateway's own memory (beyond the one
    reply that filled the connection's write buffer): the answers wait in shared memory."""
    size, n = 4 * MiB, 16
    with guarded(max_payload=16 * MiB, tcp_stall_timeout=30.0) as svc, connect_to(svc) as c:
        check(c)
        pid = server_pids(svc)
        anon0 = anon_mib(pid)
        raw = RawClient(svc, rcvbuf=4096).welcome()
        value = bytes(range(256)) * (size // 256)
        args = msgpack_args(0.2, value)            # sleep(0.2, value) returns value: all are read first
        # (sent from a thread: a server stops reading a client whose replies back up, and may
        # do so before it read all of these; it takes the rest only as the client reads)
        sender = threading.Thread(target=raw.send, args=(
            b"".join(fr.call_header(i, b"sleep", MSGPACK.flags, 0, len(args)) + args for i in range(1, n + 1)),))
        sender.start()
        time.sleep(0.5)
        assert wait_until(lambda: not busy_channels(svc), timeout=30)   # every answer read is in
        time.sleep(0.5)
        grown = anon_mib(pid) - anon0
        check(c)
        frames = raw.read_frames(n, timeout=60)
        sender.join(30)
        raw.close()
        assert sorted(f.call_id for f in frames) == list(range(1, n + 1))
        assert all(f.arg == 0 and bytes(f.payload) == MSGPACK.dumps(value) for f in frames)
        assert grown < 32, f"the gateway holds {grown:.0f} MiB for {n} answered calls of a client that does not read"


@logs_clean
def test_a_client_that_reads_its_replies_slowly_is_not_taken_for_one_that_reads_nothing():
    """The kernel's send buffer (megabytes) drains long before the gateway's own buffer
    shrinks (here ~3 s at 512 KiB/s): a client reading steadily, if slowly, must not be
    dropped as a non-reader."""
    with guarded(max_payload=32 * MiB, tcp=None), \
            InProcessGateway(TcpEcho.name, max_payload=32 * MiB, stall_timeout=1.0) as gw:
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


@logs_clean
def test_clients_that_read_nothing_cannot_take_the_calls_in_flight_from_the_others():
    """Answers left unread hold their calls' room.  When other clients' calls wait for it,
    a connection that has taken none of the server's bytes for a second is dropped (not
    after tcp_stall_timeout) and the others' calls run."""
    with guarded(max_payload=16 * MiB, max_channels=16, workers=4, tcp_stall_timeout=30.0) as svc:   # 8 in flight
        hogs = []
        args = msgpack_args(8 * MiB)
        for _ in range(12):                        # an unread answer each: together, every call in flight
            hog = RawClient(svc, rcvbuf=4096).welcome()
            hog.send(b"".join(fr.call_header(i, b"blob", MSGPACK.flags, 0, len(args)) + args for i in range(1, 5)))
            hogs.append(hog)
        # the room is full once the server makes no more progress on the hogs' calls: 8 answers
        # unread in the gateway's channels, or the workers' counts of calls standing still with
        # calls in flight (on a loaded machine the server may take a while to read 384 MiB)
        seen = [None, time.monotonic()]

        def room_full():
            if not svc.tcp_in_workers:
                return sum(code == core.ST_RESPONSE for _, code in channel_states(svc).values()) >= 8
            totals = svc.segment.tcp_totals()
            now = (totals["calls"], totals["inflight"])
            if now != seen[0]:
                seen[:] = [now, time.monotonic()]
                return False
            return totals["inflight"] > 0 and time.monotonic() - seen[1] >= 0.5
        assert wait_until(room_full, timeout=30)

        def one(i):
            with connect_to(svc) as c:
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
        # the gateway's room is one: the calls ran because a client that reads nothing was
        # dropped.  With the workers serving, the room is leased out among them, and a call may
        # find a worker with room left without anyone being dropped: that the calls ran is the point
        if not svc.tcp_in_workers:
            assert dropped >= 1, "calls waited, yet no client that reads nothing was dropped"
        assert wait_until(lambda: not busy_channels(svc), timeout=5)


@logs_clean
def test_clients_that_read_their_answers_are_not_dropped_when_calls_wait_for_room():
    """Clients pipelining large compressed replies (each compressed in a thread: their answers
    park meanwhile) and reading them as fast as they can are never taken for clients that
    read nothing, even while calls wait for room."""
    with guarded(max_payload=16 * MiB, tcp=None, workers=4, max_channels=32), \
            InProcessGateway(TcpEcho.name, max_payload=16 * MiB, max_inflight=8, stall_timeout=30.0) as gw:
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


@logs_clean
def test_a_client_killed_with_answers_left_unread_gives_their_channels_back():
    """A client whose answers wait in shared memory (it read none) vanishes with a reset: the
    gateway abandons them, its counts of calls in flight go back to nothing, and the channels
    serve the next calls."""
    with guarded(max_payload=16 * MiB, tcp=None, workers=2) as svc, \
            InProcessGateway(TcpEcho.name, max_payload=16 * MiB) as gw:
        raw = RawClient(gw.tcp_address, rcvbuf=4096).welcome()
        args = msgpack_args(2 * MiB)
        raw.send(b"".join(fr.call_header(i, b"blob", MSGPACK.flags, 0, len(args)) + args for i in range(1, 7)))
        assert wait_until(lambda: gw.read(lambda s: s.parking.count) >= 2, timeout=10)
        owned = gw.read(lambda s: len(s.shm._channels.owned))
        raw.close(reset=True)
        assert wait_until(lambda: gw.read(lambda s: (s.inflight, s.parking.count, len(s.connections))) == (0, 0, 0),
                          timeout=10)
        assert gw.read(lambda s: len(s.shm._channels.free)) == owned   # every channel back, none lost
        with connect_to(gw) as c:
            with ThreadPoolExecutor(6) as pool:
                assert list(pool.map(c.blob, [MiB] * 6)) == [b"b" * MiB] * 6
        assert gw.read(lambda s: len(s.shm._channels.owned)) == owned
        assert wait_until(lambda: not busy_channels(svc), timeout=5)


def test_replies_a_client_never_reads_are_bounded():
    """docs/tcp-protocol.md: "replies a client does not read: the transport's write buffer; the
    server stops reading that client's calls".  Every call already read still runs: its reply
    must not go to an unbounded write buffer, or 1.4 KB of calls would pin >1 GiB in the gateway
    for as long as the client keeps the socket open."""
    with tcp_service(TcpEcho) as svc:
        sock = RawClient(svc, timeout=10).welcome(compression="", compress_min=0).sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        args = msgpack.packb([32 * MiB])
        sock.sendall(b"".join(fr.call_header(i + 1, b"blob", codecs.MSGPACK.flags, 0, len(args)) + args
                              for i in range(40)))
        before = server_mib(svc)
        time.sleep(6)
        grown = server_mib(svc) - before
        sock.close()
        assert grown < 256, f"{40 * (len(args) + 28)} bytes of calls never read pinned {grown:.0f} MiB in the gateway"
