"""Compression over TCP: every algorithm both ways (and not where it does not pay), frames that
lie about their sizes, compression bombs large and small (inflated in threads, within a memory
budget, never on the event loop), and replies compressed while the gateway stops."""
import os
import random
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from speedysvc import DecodeError, PayloadTooLarge, ProtocolError, codecs, connect, connect_async
from speedysvc.errors import decode_exception
from speedysvc.tcp import compression
from speedysvc.tcp import framing as fr
from conftest import wait_until
import tcp_helpers
from tcp_helpers import (LIMIT, MSGPACK, RAW, CountingProxy, InProcessGateway, MiB, RawClient, anon_mib, check,
                         compressed_call, compressed_raw, connect_to, guarded, logs_clean, msgpack_args, pinging,
                         read_hello, run, server_alive, tcp_service, timed_check)
from tcp_services import TcpEcho, TcpKitchen

serve, kitchen = tcp_helpers.serve, tcp_helpers.kitchen
server_logs_clean = tcp_helpers.server_logs_clean


@pytest.mark.parametrize("algo", compression.available())
def test_compression_both_ways(kitchen, algo):
    assert set(compression.available()) >= {"zlib", "lz4", "snappy", "zstd"}
    compressible = b"speedysvc compresses this line rather well. " * 25_000     # ~1.1 MB
    incompressible = random.Random(algo).randbytes(300_000)
    with CountingProxy(kitchen.tcp_address) as proxy, \
            connect(TcpKitchen, proxy.address, compression=algo, timeout=20) as c:
        assert c.echo_msgpack("hello") == "hello"     # the handshake is done

        up0, down0 = proxy.counts()
        assert c.echo_raw(compressible) == compressible
        up1, down1 = proxy.counts()
        assert up1 - up0 < len(compressible) // 10, "the request was not compressed"
        assert down1 - down0 < len(compressible) // 10, "the reply was not compressed"

        text = ["a line of json text that repeats"] * 5000
        assert c.echo_json(text) == text

        up1, down1 = proxy.counts()
        assert c.echo_raw(incompressible) == incompressible
        up2, down2 = proxy.counts()
        assert up2 - up1 >= len(incompressible)       # sent as it is, not inflated
        assert down2 - down1 >= len(incompressible)
        assert up2 - up1 < len(incompressible) + 1024

        # compressed, yet larger than the receive buffer: arrives into its own buffer
        semi = random.Random(3).randbytes(600_000) + bytes(1_400_000)
        up2, down2 = proxy.counts()
        assert c.echo_raw(semi) == semi
        up3, down3 = proxy.counts()
        assert 600_000 <= up3 - up2 < 1_000_000 and 600_000 <= down3 - down2 < 1_000_000

        up2, _ = proxy.counts()
        small = b"a" * 1000                            # below the threshold: not compressed
        assert c.echo_raw(small) == small
        up3, _ = proxy.counts()
        assert up3 - up2 >= len(small)
        assert proxy.connections == 1

    async def main():
        ac = connect_async(TcpKitchen, kitchen.tcp_address, compression=algo)
        try:
            assert await ac.echo_raw(compressible) == compressible
            assert await ac.echo_raw(incompressible) == incompressible
        finally:
            await ac.aclose()
    run(main())


@logs_clean
def test_hostile_compressed_frames_get_error_replies():
    good = b"abc" * 5000
    with guarded() as svc, connect_to(svc) as before:
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
            with connect_to(svc, compression=algo, compress_min=0) as cc:
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


@logs_clean
def test_compressed_frames_claiming_huge_sizes_do_not_stall_other_clients():
    """A 40-byte compressed frame that states a large original size must not make the
    gateway's event loop allocate and clear that much before finding it is garbage."""
    limit = 256 * MiB
    with guarded(max_payload=limit) as svc, connect_to(svc) as c:
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


@pytest.mark.parametrize("in_workers,body", [(False, "junk"), (True, "junk"), (True, "msgpack")],
                         ids=["gateway", "workers", "workers-valid-msgpack"])
def test_compression_bombs_do_not_stall_other_clients(in_workers, body):
    """An 8 KiB zstd payload that really inflates to 256 MiB is not inflated on the event loop
    (which, under the manager, also supervises every service): six of them, sent in one 50 KiB
    write, would keep the loop from even greeting a new client for as long as inflating them all
    takes (measured here first: the bound follows the machine's speed and load), and cost the
    server ~2.5 GiB.  With the workers serving TCP, the loop shares its process (and the
    interpreter lock) with the worker that decodes the calls: 256 MiB of zeros (a whole msgpack
    value, then bytes after it) once kept it for 0.3 s per call, in msgpack's error, and a valid
    256 MiB binary is copied out without the lock."""
    limit = 256 * MiB
    raw = bytes(limit) if body == "junk" else codecs.MSGPACK.dumps([bytes(limit - 16)])
    bomb = compression.compress("zstd", raw)
    t = time.monotonic()
    assert len(compression.decompress("zstd", bomb, limit)) == len(raw)
    inflate_one = time.monotonic() - t
    with tcp_service(TcpEcho, max_payload=limit, tcp_in_workers=in_workers) as svc:
        host, port = svc.tcp_address.removeprefix("tcp://").rsplit(":", 1)
        client = RawClient(svc, timeout=10).welcome(compression="zstd", compress_min=0)
        sock = client.sock
        latencies, stop = [], threading.Event()

        def greet():    # the event loop alone: connect and read the server's hello
            while not stop.is_set():
                t = time.monotonic()
                with socket.create_connection((host, int(port)), timeout=60) as s:
                    read_hello(s)
                latencies.append(time.monotonic() - t)
                time.sleep(0.02)

        th = threading.Thread(target=greet)
        th.start()
        time.sleep(0.2)
        sock.sendall(b"".join(fr.call_header(i + 1, b"size_of", codecs.MSGPACK.flags, 0, len(bomb),
                                             fr.F_COMPRESSED) + bomb for i in range(6)))
        time.sleep(4)
        stop.set()
        th.join(60)
        replies = client.read_frames(6, timeout=120)
        sock.close()
        # each was answered: the zeros do not decode (a whole value, then more), the binary does
        answers = [(f.arg, bytes(compression.decompress("zstd", f.payload, limit)) if f.flags & fr.F_COMPRESSED
                    else bytes(f.payload)) for f in replies]
        if body == "junk":
            assert all(status != 0 and isinstance(decode_exception(p), DecodeError) and "extra data" in str(
                decode_exception(p)) for status, p in answers), answers
        else:
            assert [(status, codecs.MSGPACK.loads(p)) for status, p in answers] == [(0, limit - 16)] * 6
        # on the loop, the six would hold it for about 6 x inflate_one; in threads, a greeting
        # waits at most for its share of the CPU meanwhile
        assert max(latencies) < 3 * inflate_one, (
            f"{6 * len(bomb)} bytes from one client kept the server's loop from greeting a new client "
            f"for {max(latencies):.2f} s (inflating one bomb here took {inflate_one:.2f} s)")


@logs_clean
def test_many_small_compression_bombs_do_not_stall_other_clients():
    """Calls that state under 1 MiB but came in as a few dozen bytes each (a ratio no real
    payload has) are inflated in threads too: thousands of them in a few reads must not keep
    the event loop from other clients.  (How long another client waits meanwhile depends on
    the machine and its load: it is compared with the time the bombs took, measured here.)"""
    with guarded(max_payload=4 * MiB, tcp=None), \
            InProcessGateway(TcpEcho.name, max_payload=4 * MiB) as gw, connect_to(gw) as c:
        check(c)
        with pinging(c, every=0.01) as quiet:   # the same client's calls without the bombs
            time.sleep(0.5)
        body = compression.compress("zstd", msgpack_args(bytes(512 * 1024 - 64)))
        assert len(body) < 100
        n = 2000
        frames = b"".join(fr.call_header(i, b"size_of", MSGPACK.flags, 0, len(body), fr.F_COMPRESSED) + body
                          for i in range(1, n + 1))
        bomb = RawClient(gw.tcp_address).welcome(compression="zstd")
        with pinging(c, every=0.01) as latencies:
            time.sleep(0.2)
            t0 = time.monotonic()
            bomb.send(frames)
            replies = bomb.read_frames(n, timeout=120)
            took = time.monotonic() - t0
        bomb.close()
        assert all(f.arg == 0 and MSGPACK.loads(f.payload) == 512 * 1024 - 64 for f in replies)
        assert gw.read(lambda s: s.counters["inflated_in_threads"]) == n, "bombs were inflated on the event loop"
        assert max(latencies) < took / 2, (f"{len(frames)} bytes of calls held up another client for "
                                           f"{max(latencies):.2f} s of the {took:.2f} s they took (without "
                                           f"them its calls took at most {max(quiet):.3f} s)")


@logs_clean
def test_large_compressed_calls_at_once_are_inflated_within_the_budget_and_all_answered():
    """Large compressed calls are inflated in threads within a memory budget: the ones beyond
    it wait their turn, none is lost, and other clients go on."""
    size = 64 * MiB
    with guarded(max_payload=128 * MiB, tcp=None), \
            InProcessGateway(TcpEcho.name, max_payload=128 * MiB, inflate_budget=size + 64) as gw, \
            connect_to(gw) as c:
        check(c)
        payload = bytes(size // 2) + b"x" * (size // 2)
        clients = [connect_to(gw, compression=algo, timeout=60) for algo in ("zstd", "lz4", "zlib", "snappy")]
        try:
            with pinging(c) as latencies, ThreadPoolExecutor(8) as pool:
                sizes = list(pool.map(lambda i: clients[i % 4].size_of(payload), range(8)))
        finally:
            for cl in clients:
                cl.close()
        assert sizes == [size] * 8
        check(c)
        assert gw.read(lambda s: s.counters["inflate_waits"]) > 0, "no call ever waited for the budget"
        assert gw.read(lambda s: s.inflate.inflating) == 0
        assert max(latencies) < 1.0, latencies


@logs_clean
def test_the_inflate_budget_is_held_while_inflating_not_while_the_call_runs():
    """A large compressed call holds the inflate budget until it is posted to a worker, not
    until it is answered: a slow one does not hold up the next large compressed call."""
    with guarded(max_payload=64 * MiB, tcp=None), \
            InProcessGateway(TcpEcho.name, max_payload=64 * MiB, inflate_budget=8 * MiB) as gw:
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


@logs_clean
def test_an_inflated_call_is_not_kept_in_memory_while_it_runs():
    """Once a large compressed call is inflated into its channel, the gateway keeps no copy
    of it while the worker runs it (each below states 48 MiB and came in as ~50 KB)."""
    with guarded(max_payload=64 * MiB, tcp=None, workers=4), \
            InProcessGateway(TcpEcho.name, max_payload=64 * MiB) as gw:
        before = anon_mib(os.getpid())
        raws = []
        for i in range(4):
            raw = RawClient(gw.tcp_address).welcome(compression="zstd")
            compressed_call(raw, 1, "sleep", msgpack_args(3.0, bytes(48 * MiB)), "zstd")
            raws.append(raw)
        assert wait_until(lambda: gw.read(lambda s: s.inflight == 4 and s.inflate.inflating == 0), timeout=10)
        time.sleep(0.3)
        held = anon_mib(os.getpid()) - before
        for raw in raws:
            status, payload, _ = raw.reply(timeout=20)
            assert status == 0 and len(payload) > 48 * MiB
            raw.close()
        assert held < 96, f"{held:.0f} MiB held for 4 calls running, each inflated to 48 MiB"


@logs_clean
def test_stopping_the_server_sends_a_reply_that_is_being_compressed():
    """close() lets calls in flight finish, including the compression of their replies."""
    with guarded(max_payload=128 * MiB, tcp=None), \
            InProcessGateway(TcpEcho.name, max_payload=128 * MiB) as gw:
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
