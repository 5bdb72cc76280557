"""Clients that go away: the calls of a connection that was reset and that no worker has
started are withdrawn (they would only hold up the workers, and every other caller with
them), and a client that half-closes after its calls still gets their replies."""
import socket
import time

from speedysvc import connect
from speedysvc.tcp import framing as fr
from conftest import wait_until
import tcp_helpers
from tcp_helpers import MSGPACK, RawClient, busy_channels, guarded, logs_clean, msgpack_args
from tcp_services import TcpEcho

server_logs_clean = tcp_helpers.server_logs_clean


def lines(path) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


@logs_clean
def test_calls_of_a_reset_connection_that_no_worker_started_are_withdrawn(tmp_path):
    """60 connections with 10 calls each in flight (0.1 s of work each: 30 s for two workers)
    reset at once: the calls no worker had started never run, and a shared-memory caller is
    answered long before that work would have been done."""
    marks = str(tmp_path / "marks")
    nap, n_conns, per_conn = 0.1, 60, 10
    with guarded(workers=2) as svc, connect(TcpEcho, timeout=60) as local:
        assert local.echo("before") == "before"
        raws = [RawClient(svc).welcome() for _ in range(n_conns)]
        for raw in raws:
            raw.send(b"".join(mark_and_sleep(i, marks, nap) for i in range(1, per_conn + 1)))
        assert wait_until(lambda: lines(marks) >= 2, timeout=10)
        for raw in raws:
            raw.close(reset=True)
        t0 = time.monotonic()
        assert local.echo("after") == "after"
        waited = time.monotonic() - t0
        queued = n_conns * per_conn * nap / 2
        assert waited < queued / 10, f"a local call waited {waited:.1f} s behind the calls of reset connections"
        # the calls that were running finish; no other starts
        assert wait_until(lambda: not busy_channels(svc), timeout=10)
        ran = lines(marks)
        time.sleep(1.0)
        assert lines(marks) == ran
        assert ran < n_conns * per_conn / 10, f"{ran} of {n_conns * per_conn} calls of reset connections ran"
        # and the gateway serves on
        with RawClient(svc).welcome() as raw:
            raw.call(1, "echo", msgpack_args("still here"))
            status, payload, _ = raw.reply()
            assert status == 0 and MSGPACK.loads(payload) == "still here"


def mark_and_sleep(call_id, marks, nap) -> bytes:
    payload = msgpack_args(marks, nap)
    return fr.call_header(call_id, b"mark_and_sleep", MSGPACK.flags, 0, len(payload)) + payload


@logs_clean
def test_a_client_that_half_closes_after_its_calls_gets_their_replies():
    """``shutdown(SHUT_WR)`` right after a complete call: the reply comes, then the end (each
    of 20 clients, with a call answered at once and one that takes a while)."""
    with guarded(workers=2) as svc:
        raws = []
        for i in range(20):
            raw = RawClient(svc).welcome()
            quick, slow = msgpack_args(f"quick {i}"), msgpack_args(0.3, f"slow {i}")
            raw.call(1, "echo", quick)
            raw.call(2, "sleep", slow)
            raw.sock.shutdown(socket.SHUT_WR)
            raws.append(raw)
        for i, raw in enumerate(raws):
            replies = {f.call_id: MSGPACK.loads(f.payload) for f in raw.read_frames(2)}
            assert replies == {1: f"quick {i}", 2: f"slow {i}"}
            assert raw.read_to_eof(timeout=5) == b""   # then the server closes
            raw.close()
