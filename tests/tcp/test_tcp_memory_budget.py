"""The gateway's memory budget (docs/tcp-protocol.md, "Memory"), held against peers that try
to pin its memory: thousands of idle connections, frames that announce a gigabyte and then
trickle, and compression bombs that grow the gateway's channels in /dev/shm."""
import time

import pytest

from speedysvc import ProtocolError
from speedysvc.tcp import compression
from speedysvc.tcp import framing as fr
from speedysvc.tcp.sweep import CHANNEL_IDLE
from conftest import wait_until
import tcp_helpers
from tcp_helpers import (MSGPACK, MiB, RAW, RawClient, check, connect_to, logs_clean, msgpack_args, server_mib,
                         server_pids, shm_mib, tcp_service, welcomed_sockets)
from tcp_services import TcpEcho

tcp_mode = tcp_helpers.tcp_mode

# every test here runs with TCP served by the workers and by a gateway process
pytestmark = pytest.mark.usefixtures("tcp_mode")

server_logs_clean = tcp_helpers.server_logs_clean

# the budget, as docs/tcp-protocol.md states it
IDLE_CONNECTION_KIB = 16      # a client past the handshake that sends nothing
SLACK_MIB = 16                # what the allocator keeps, measures taken a moment apart


def test_thousands_of_idle_connections_cost_the_gateway_little():
    """Each idle connection cost ~256 KiB (a parser's scratch buffer made up front): 3,000 of
    them took the gateway from ~300 MiB to ~1 GiB."""
    n = 3000
    with tcp_service(TcpEcho, tcp_stall_timeout=1.0) as svc:
        with connect_to(svc) as c:
            check(c)   # (what the gateway's first calls allocate, it keeps)
        time.sleep(1.5)
        before = server_mib(svc)
        socks = welcomed_sockets(svc, n)
        try:
            time.sleep(1.5)   # (a sweep)
            grown = server_mib(svc) - before
            assert grown < n * IDLE_CONNECTION_KIB / 1024 + SLACK_MIB, \
                f"{n} idle connections cost the gateway {grown:.0f} MiB ({grown * 1024 / n:.0f} KiB each)"
            with connect_to(svc) as c:
                check(c)
        finally:
            for s in socks:
                s.close()


@logs_clean
def test_frames_that_announce_a_gigabyte_and_trickle_are_dropped_and_their_memory_freed():
    """Six frames that announce 1 GiB each, send 32 MiB and then a byte every 0.3 s (never a
    stall of ``stall_timeout``): memory follows the bytes that came, the frames fall under the
    minimum rate and are dropped within two stall timeouts and a sweep, and their memory goes
    with them."""
    burst = 32 * MiB
    with tcp_service(TcpEcho, tcp_stall_timeout=1.0) as svc:   # (max_payload: 1 GiB)
        with connect_to(svc) as c:
            check(c)
        before = server_mib(svc)
        raws = [RawClient(svc, timeout=30).welcome() for _ in range(6)]
        for raw in raws:
            raw.send(fr.call_header(1, b"echo_raw", RAW.flags, 0, (1 << 30) - 64) + bytes(burst))
        t0 = time.monotonic()
        assert wait_until(lambda: server_mib(svc) - before > 6 * burst / MiB * 0.9, timeout=10)
        peak = server_mib(svc) - before
        assert peak < 6 * burst / MiB + SLACK_MIB, f"6 frames of {burst >> 20} MiB so far held {peak:.0f} MiB"
        open_ = set(range(6))
        while open_ and time.monotonic() - t0 < 15:
            for i in list(open_):
                try:
                    raws[i].send(b"\0")
                except OSError:
                    open_.discard(i)
            time.sleep(0.3)
        dropped_after = time.monotonic() - t0
        assert not open_, f"{len(open_)} trickling frames were still read after {dropped_after:.0f} s"
        assert dropped_after < 2 * 1.0 + 1 + 3, f"trickling frames were dropped after {dropped_after:.1f} s"
        exc = raws[0].expect_goaway()
        assert isinstance(exc, ProtocolError) and "bytes/s" in str(exc), exc
        for raw in raws:
            raw.close()
        assert wait_until(lambda: server_mib(svc) - before < SLACK_MIB, timeout=5), \
            f"{server_mib(svc) - before:.0f} MiB still held after the frames were dropped"
        with connect_to(svc) as c:
            check(c)


@logs_clean
def test_channels_that_grew_for_compression_bombs_shrink_back_when_idle():
    """Compressed calls that inflate to 64 MiB grow the gateway's channels (in /dev/shm) to
    hold them; a channel only ever grows, so they kept that memory for the service's
    lifetime.  Idle for ``CHANNEL_IDLE`` seconds, they are given back."""
    size = 64 * MiB
    bomb = compression.compress("zstd", msgpack_args(bytes(size)))
    with tcp_service(TcpEcho, workers=2) as svc:   # (max_payload: 1 GiB)
        pid = server_pids(svc)
        with connect_to(svc) as c:
            check(c)
        base = shm_mib(TcpEcho.name, pid)
        raws = [RawClient(svc, timeout=60).welcome(compression="zstd") for _ in range(4)]
        for raw in raws:
            raw.send(fr.call_header(1, b"size_of", MSGPACK.flags, 0, len(bomb), fr.F_COMPRESSED) + bomb)
        for raw in raws:
            status, payload, _ = raw.reply(timeout=60)
            assert status == 0 and MSGPACK.loads(payload) == size
        grown = shm_mib(TcpEcho.name, pid) - base
        assert grown > 2 * size / MiB, f"the bombs grew the gateway's channels by {grown:.0f} MiB only"
        t0 = time.monotonic()
        assert wait_until(lambda: shm_mib(TcpEcho.name, pid) - base < 4, timeout=CHANNEL_IDLE + 10), \
            f"the gateway's channels still hold {shm_mib(TcpEcho.name, pid) - base:.0f} MiB of /dev/shm"
        assert time.monotonic() - t0 < CHANNEL_IDLE + 3
        for raw in raws:   # connections stay, and large calls go on (on fresh channels)
            raw.send(fr.call_header(2, b"size_of", MSGPACK.flags, 0, len(bomb), fr.F_COMPRESSED) + bomb)
            status, payload, _ = raw.reply(timeout=60)
            assert status == 0 and MSGPACK.loads(payload) == size
            raw.close()
