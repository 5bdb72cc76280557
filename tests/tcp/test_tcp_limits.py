"""Limits and admission at the TCP gateway: payloads over the limit (refused by the client or
answered with a go-away before they are read), sizes a header claims, many connections, and
the calls in flight (backpressure, a share per client, room left for the others)."""
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from speedysvc import (DecodeError, LocalService, MethodNotFound, NotAllowed, PayloadTooLarge, ServiceUnavailable,
                       codecs, connect, connect_async)
from speedysvc.errors import decode_exception
from speedysvc.tcp import compression
from speedysvc.tcp import framing as fr
from conftest import wait_until
import tcp_helpers
from tcp_helpers import (LIMIT, MSGPACK, MiB, RAW, RawClient, busy_channels, check, connect_to, guarded, logs_clean,
                         msgpack_args, open_sockets, run, server_alive, server_mib, server_pids, tcp_service,
                         timed_check)
from tcp_services import TcpEcho, TcpRestart

tcp_mode = tcp_helpers.tcp_mode

# every test here runs with TCP served by the workers and by a gateway process
pytestmark = pytest.mark.usefixtures("tcp_mode")

server_logs_clean = tcp_helpers.server_logs_clean


def test_payload_over_the_service_limit_is_refused_and_the_connection_survives():
    with LocalService(TcpRestart, workers=1, tcp="127.0.0.1:0", max_payload=1 << 20) as svc, \
            connect(TcpRestart, svc.tcp_address, timeout=10) as c:
        assert c.echo(b"x" * 1000) == b"x" * 1000
        with pytest.raises(PayloadTooLarge):
            c.echo(b"x" * (2 << 20))
        assert c.echo("still usable") == "still usable"

        async def main():
            ac = connect_async(TcpRestart, svc.tcp_address)
            try:
                with pytest.raises(PayloadTooLarge):
                    await ac.echo(b"x" * (2 << 20))
                assert await ac.echo("ok") == "ok"
            finally:
                await ac.aclose()
        run(main())


@logs_clean
def test_oversized_request_is_refused_locally_and_the_connection_goes_on():
    with guarded() as svc, connect_to(svc) as c:
        check(c)
        conn = c._transport._conn
        pid = server_pids(svc)
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
        with connect_to(svc, compression="zlib", compress_min=0) as cc:
            with pytest.raises(PayloadTooLarge):
                cc.echo_raw(b"\0" * (LIMIT + 1))
            check(cc)

        async def with_asyncio():
            ac = connect_async(TcpEcho, svc.tcp_address, timeout=10)
            try:
                assert await ac.echo("a") == "a"
                with pytest.raises(PayloadTooLarge, match="exceeds the service's limit"):
                    await ac.echo_raw(b"x" * (LIMIT + 1))
                assert await ac.echo("b") == "b"
            finally:
                await ac.aclose()

        asyncio.run(with_asyncio())
        check(c)


@logs_clean
def test_frame_above_max_payload_gets_goaway_without_being_read():
    with guarded() as svc, connect_to(svc) as before:
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
        with connect_to(svc) as after:
            check(after)


@logs_clean
def test_oversized_frame_sent_together_with_the_hello_gets_payload_too_large():
    """Frames that arrive in the same packet as the client hello go through another
    path (the hello's leftover); an oversized one must be answered the same way."""
    with guarded() as svc, connect_to(svc) as before:
        with RawClient(svc) as raw:
            raw.read_server_hello()
            raw.send(raw.client_hello() + fr.call_header(1, b"echo_raw", RAW.flags, 0, LIMIT + 1))
            msg_type, _, _, _ = raw._read_message()
            assert msg_type == fr.WELCOME
            exc = raw.expect_goaway(timeout=3)
            assert isinstance(exc, PayloadTooLarge), f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
        check(before)
        assert server_alive(svc)


@logs_clean
def test_claimed_payload_sizes_do_not_commit_memory_up_front():
    """A frame header is 24 bytes; the memory for its payload should follow the bytes
    that actually arrive, not the length the header claims (docs/tcp-protocol.md:
    "a small frame cannot make it allocate a lot")."""
    limit = 64 * MiB
    with guarded(max_payload=limit, tcp_stall_timeout=30.0) as svc, connect_to(svc) as c:
        check(c)
        rss0 = server_mib(svc)
        raws = []
        for i in range(4):
            raw = RawClient(svc).welcome()
            raw.send(fr.call_header(1, b"echo_raw", RAW.flags, 0, limit - 1) + b"x" * 100)
            raws.append(raw)
        assert timed_check(c) < 1.0
        time.sleep(0.3)
        grown = server_mib(svc) - rss0
        for raw in raws:
            raw.close()
        check(c)
        assert grown < 64, (f"four 132-byte messages made the gateway grow by {grown:.0f} MiB "
                            f"(each claimed a {limit - 1}-byte payload)")


@logs_clean
def test_many_connections_opened_and_abandoned():
    with guarded(tcp_handshake_timeout=5.0, tcp_stall_timeout=5.0) as svc, connect_to(svc) as c:
        check(c)
        pid = server_pids(svc)
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
        with connect_to(svc) as after:
            check(after)
        assert server_alive(svc)


@logs_clean
def test_backpressure_is_not_mistaken_for_a_stall():
    """When the gateway itself stops reading a connection (too many calls in flight),
    the time it does not read must not count as the client stalling mid-frame: here
    the client sends everything at once, yet the gateway drops it for "no progress"."""
    with guarded(workers=2, tcp_stall_timeout=1.0) as svc, connect_to(svc) as c:
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


@logs_clean
def test_slow_calls_pipelined_by_one_client_do_not_exhaust_the_channels():
    """The gateway must keep its calls in flight below the service's channels
    (docs/tcp-protocol.md: "calls in flight to the workers: half of max_channels;
    further calls wait"), or one TCP client's pipelined calls leave none for
    anybody else, and fail themselves instead of waiting."""
    with guarded(workers=2, max_channels=16) as svc, connect_to(svc) as c:
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
            for who, make in (("tcp", lambda: connect_to(svc)), ("shm", lambda: connect(TcpEcho, timeout=20))):
                try:
                    with make() as cl:                # a client arriving now
                        assert cl.echo(who) == who
                except ServiceUnavailable as e:
                    problems.append(f"a new {who} client {when} the flood: {e}")
        raw.close()
        check(c)
        assert not problems, problems


@logs_clean
def test_one_client_gets_a_share_of_the_calls_in_flight_not_all():
    """A client that pipelines many slow calls holds at most its share (a quarter) of the
    gateway's calls in flight; the others' calls go on in parallel."""
    with guarded(max_channels=8, workers=4) as svc:   # 4 calls in flight, a share of 1
        hog = RawClient(svc).welcome()
        args = msgpack_args(3.0, "slow")
        hog.send(b"".join(fr.call_header(i, b"sleep", MSGPACK.flags, 0, len(args)) + args for i in range(1, 9)))
        time.sleep(0.3)

        def one(i):
            with connect_to(svc) as c:
                return c.sleep(1.0, i)

        t0 = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(one, range(3))) == [0, 1, 2]
        elapsed = time.monotonic() - t0
        hog.close(reset=True)
        assert elapsed < 2.5, f"3 one-second calls took {elapsed:.1f} s beside one client's 8 slow calls"


@logs_clean
def test_many_calls_in_one_read_mixed_with_odd_ones_each_get_their_answer():
    """One write carrying usual calls (posted together, collected after) mixed with calls
    that are not usual (compressed, pickle, an unknown method, undecodable arguments, more
    than there is room for in flight): every call gets its own answer, by id."""
    good = b"abc" * 3000
    with guarded(max_channels=8) as svc:   # room for 4 calls in flight from the gateway
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
        with connect_to(svc) as after:
            check(after)
        assert not busy_channels(svc), "calls posted together left channels behind"


def test_local_service_holds_its_tcp_connection_limit():
    """``LocalService(tcp_max_connections=...)``: clients beyond it are refused (across the workers
    when they serve TCP); a client that leaves makes room for the next."""
    with tcp_service(TcpEcho, workers=2, tcp_max_connections=2) as svc:
        admitted, refused = [], []
        try:
            for _ in range(5):
                c = connect_to(svc, wait=0)
                try:
                    assert c.echo("x") == "x"
                    admitted.append(c)
                except ServiceUnavailable as e:
                    refused.append(str(e))
                    c.close()
            assert len(admitted) == 2 and len(refused) == 3
            assert all("too many TCP clients" in e for e in refused), refused
            admitted.pop().close()

            def another_admitted():
                c = connect_to(svc, wait=0)
                try:
                    c.echo("x")
                except ServiceUnavailable:
                    c.close()
                    return False
                admitted.append(c)
                return True
            assert wait_until(another_admitted, 10)
        finally:
            for c in admitted:
                c.close()
