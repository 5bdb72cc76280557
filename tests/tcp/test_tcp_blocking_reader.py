"""The blocking client's reading: one thread at a time takes the reader's turn for everyone's
replies, a call alone on its connection goes all the way in C (``core.call_alone``), and
whatever interrupts a read or a send (a signal handler's exception, another thread breaking or
closing the connection) drops the connection rather than leave the stream out of step."""
import signal
import socket
import threading
import time

import pytest

from speedysvc import ConnectionLost, codecs, connect
from speedysvc.tcp import framing as fr
import tcp_helpers
from tcp_helpers import CountingProxy, Interrupted, MiB, call_in_thread, fake_service, tcp_service
from tcp_services import TcpEcho, TcpKitchen

serve, kitchen = tcp_helpers.serve, tcp_helpers.kitchen


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs signals")
def test_a_call_without_timeout_interrupted_while_waiting_ends_cleanly(kitchen):
    """A call with no timeout waits in a blocking read; an exception from a signal handler
    ends that call at once.  Its turn as the reader ended halfway, so the connection is
    dropped; later calls connect anew and get their own answers, not the late one."""
    import signal as _signal
    c = connect(TcpKitchen, kitchen.tcp_address)   # no timeout: the blocking read, not poll()
    try:
        assert c.echo_msgpack("warm") == "warm"
        conn = c._transport._conn
        old = _signal.signal(_signal.SIGALRM, lambda *a: (_ for _ in ()).throw(Interrupted()))
        try:
            _signal.setitimer(_signal.ITIMER_REAL, 0.3)
            t = time.monotonic()
            with pytest.raises(Interrupted):
                c.sleep(1.0, "late")
            assert time.monotonic() - t < 0.9
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            _signal.signal(_signal.SIGALRM, old)
        assert c.echo_msgpack("next") == "next"
        time.sleep(1.0)                              # the late reply has come by now
        assert c.echo_msgpack("after") == "after"
        assert c._transport._conn is not conn
    finally:
        c.close()


def test_breaking_a_connection_wakes_the_thread_reading_it():
    """A thread blocked reading a connection that another thread finds broken (a send cut
    short, a go-away) wakes up with ConnectionLost instead of waiting for bytes that will
    never come."""
    listener, th, address = fake_service(lambda call_id, payload: [])   # never answers
    try:
        c = connect(TcpKitchen, address)   # no timeout
        conn = c._transport._conn = c._transport._connection()
        t, outcome = call_in_thread(c.echo_msgpack, "never answered")
        time.sleep(0.3)
        with conn.lock:
            assert conn.reading
            conn._break(ConnectionLost("broken by another thread"))
        t.join(5)
        assert not t.is_alive(), "the reader still waits on a broken connection"
        assert isinstance(outcome.get("error"), ConnectionLost), outcome
        c.close()
    finally:
        listener.close()


def _msgpack_echo_replies(call_id, payload):
    """For ``fake_service``: echo a msgpack call's one argument; "split" comes in two pieces."""
    import msgpack
    arg = msgpack.unpackb(payload)[0]
    body = msgpack.packb(arg)
    reply = fr.reply_header(call_id, 0, len(body)) + body
    return [reply[:fr.HEADER_SIZE + 2], reply[fr.HEADER_SIZE + 2:]] if arg == "split" else [reply]


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize("piece", [1, 2])
def test_a_read_interrupted_after_bytes_came_drops_the_connection(timeout, piece):
    """An exception (a signal handler's) between receiving bytes and parsing them would
    lose those bytes and leave the stream out of step, so that later replies are misread or
    never found.  The connection is dropped instead: the next call connects anew.  The
    reply comes in two pieces: the first is read by the call's usual path (in C) and
    parsed by ``_read_on``, the second is read and parsed in ``_wait``."""
    listener, th, address = fake_service(_msgpack_echo_replies)
    try:
        with connect(TcpKitchen, address, timeout=timeout) as c:
            assert c.echo_msgpack("warm") == "warm"
            conn = c._transport._conn
            parser = conn.parser
            real = parser.buffer_updated
            calls = []

            def interrupted(n):
                calls.append(n)
                if len(calls) == piece:
                    raise Interrupted()
                return real(n)

            parser.buffer_updated = interrupted
            with pytest.raises(Interrupted):
                c.echo_msgpack("split")
            assert len(calls) == piece
            parser.buffer_updated = real
            for arg in ["after", "split", "plain"]:
                assert c.echo_msgpack(arg) == arg
            assert c._transport._conn is not conn
    finally:
        listener.close()


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_the_usual_call_runs_in_c_and_the_rest_in_python(kitchen, timeout):
    """A call alone on its connection goes all the way in ``core.call_alone`` (even after the
    connection was idle: its idle check is done there too); a call that is not alone (another
    thread's call is in flight) goes through ``_Connection.call``, and both get their answers."""
    with connect(TcpKitchen, kitchen.tcp_address, timeout=timeout) as c:
        assert c.echo_msgpack("warm") == "warm"
        conn = c._transport._conn
        real, python_calls = conn.call, []

        def counted(*args):
            python_calls.append(args[0])
            return real(*args)

        conn.call = counted
        for i in range(20):
            assert c.echo_msgpack(i) == i
            assert c.echo_raw(b"r%d" % i) == b"r%d" % i
        time.sleep(0.01)   # idle for longer than IDLE_CHECK_AFTER
        assert c.echo_msgpack("after idle") == "after idle"
        assert python_calls == []
        slow = threading.Thread(target=lambda: c.sleep(0.5, "slow"))
        slow.start()
        from conftest import wait_until
        assert wait_until(lambda: conn.reading, timeout=5)
        assert c.echo_msgpack("beside") == "beside"
        slow.join()
        assert python_calls == [b"echo_msgpack"]
        assert c._transport._conn is conn


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_replies_in_pieces_or_after_strangers_reach_the_right_call(timeout):
    """A reply split across reads, or preceded in the same read by a reply to a call
    nobody waits for (one that timed out), still reaches its call; with no timeout the
    client reads with one blocking recv() and takes the short way only for exactly its
    own reply."""
    import msgpack

    def replies(call_id, payload):
        arg = msgpack.unpackb(payload)[0]
        body = msgpack.packb(arg)
        reply = fr.reply_header(call_id, 0, len(body)) + body
        if arg == "split":
            return [reply[:fr.HEADER_SIZE + 2], reply[fr.HEADER_SIZE + 2:]]
        if arg == "stranger first":
            stray = msgpack.packb("not yours")
            return [fr.reply_header(call_id ^ 0x5A5A, 0, len(stray)) + stray + reply]
        if arg == "stranger alone first":
            stray = msgpack.packb("not yours")
            return [fr.reply_header(call_id ^ 0x5A5A, 0, len(stray)) + stray, reply]
        if arg == "two pieces of header":
            return [reply[:5], reply[5:]]
        return [reply]

    listener, th, address = fake_service(replies)
    try:
        with connect(TcpKitchen, address, timeout=timeout) as c:
            for arg in ["plain", "split", "stranger first", "stranger alone first", "two pieces of header",
                        "plain again"]:
                assert c.echo_msgpack(arg) == arg
    finally:
        listener.close()
        th.join(5)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs signals")
def test_interrupted_send_does_not_poison_the_connection():
    """KeyboardInterrupt (or any exception from a signal handler) during ``sendall`` of a large
    call breaks the connection, as an OSError does: else the next call's bytes would become the
    rest of the interrupted frame's payload and every later call would hang."""
    with tcp_service(TcpEcho) as svc:
        proxy = CountingProxy(svc.tcp_address)
        old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(Interrupted()))
        try:
            with connect(TcpEcho, proxy.address, timeout=3) as c:
                assert c.echo("warm") == "warm"
                proxy.go.clear()                       # the gateway stops receiving: sendall blocks
                signal.setitimer(signal.ITIMER_REAL, 0.3)
                with pytest.raises(Interrupted):
                    c.echo_raw(b"x" * (64 * MiB))
                proxy.go.set()
                time.sleep(0.2)
                assert c.echo("after") == "after"     # (on a connection out of step: CallTimeout)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            proxy.close()


def _alone_connection(max_payload=None):
    """A client connection over a socketpair, its far end standing in for the gateway."""
    from speedysvc.tcp import client as tc
    a, b = socket.socketpair()
    opts = tc.ClientOptions(TcpEcho.name, "127.0.0.1", 1)
    opts.max_payload = max_payload
    conn = tc.BlockingConnection(a, opts, b"")
    conn.last_read = time.monotonic() + 1e6   # (no idle check: nothing stands behind a socketpair)
    return conn, b


@pytest.mark.parametrize("way", ["C", "Python"])
def test_a_retired_connection_closes_when_its_last_call_ends(way):
    """retire() while the only call in flight waits for its reply (a server answered another
    call as not started): the connection closes when that call ends, whether the call went
    through call_alone (C) or BlockingConnection.call (Python)."""
    from speedysvc._shmcore import call_alone
    conn, far = _alone_connection()
    out = {}
    frame = fr.call_header(7, b"echo", 0, 0, 2) + b"hi"
    run = (lambda: call_alone(conn, frame, 7, None)) if way == "C" else (lambda: conn.call(b"echo", b"hi", 0, 5.0))
    t = threading.Thread(target=lambda: out.setdefault("r", run()))
    t.start()
    try:
        head = far.recv(100)   # sent: the call waits for its reply
        call_id = fr.FRAME.unpack_from(head, 0)[3]
        conn.retire()          # a call is in flight: closed when it ends
        assert conn.sock.fileno() != -1
        far.sendall(fr.reply_header(call_id, 0, 2) + b"ok")
        t.join(5)
        assert out["r"][0] == 0 and bytes(out["r"][1]) == b"ok" and conn.waiting == {}
        assert conn.sock.fileno() == -1, "a retired connection was left open after its last call"
    finally:
        conn.close()
        far.close()


def test_call_alone_never_reads_a_socket_opened_after_its_own_was_closed():
    """A call waiting with a timeout while another thread closes its connection must not read
    from whatever socket takes the closed one's descriptor number next: it looks the
    descriptor up again before each system call, as the socket module does (EBADF)."""
    from speedysvc._shmcore import call_alone
    stolen = []
    for _ in range(60):
        conn, far = _alone_connection()
        seen = {}

        def read_on(call_id, n, error, deadline, timeout, conn=conn, seen=seen):
            seen["bytes"] = bytes(conn.parser._buf[:n]) if n else b""
            raise ConnectionError("stop")

        conn._read_on = read_on
        t = threading.Thread(target=lambda: pytest.raises(ConnectionError, call_alone, conn,
                                                          fr.call_header(7, b"echo", 0, 0, 2) + b"hi", 7, 5.0))
        t.start()
        far.recv(100)          # sent: the call waits in poll()
        time.sleep(0.001)
        conn.close()           # shutdown (which wakes it), then close: the number is free
        c, d = socket.socketpair()
        d.sendall(b"NEW-CONNECTION")
        t.join(10)
        assert not t.is_alive()
        stolen += [seen["bytes"]] if seen.get("bytes", b"").startswith(b"NEW") else []
        for s in (far, c, d):
            s.close()
    assert stolen == []


def test_an_exception_as_the_c_path_hands_over_still_drops_the_connection():
    """An exception that becomes pending while the usual call waits in C (a signal handler's,
    here an asynchronous one) is raised as the Python code it hands over to starts, before that
    code's own clean-up is armed: the call's registration and the reader's turn must still
    end (the connection is dropped), or every later call on it would wait forever."""
    import ctypes
    from speedysvc.tcp import client as tc
    from speedysvc._shmcore import call_alone

    class Injected(Exception):
        pass

    conn, far = _alone_connection()
    out = {}

    def caller():
        try:
            out["r"] = call_alone(conn, fr.call_header(7, b"echo", 0, 0, 2) + b"hi", 7, None)
        except BaseException as e:
            out["e"] = e

    t = threading.Thread(target=caller)
    t.start()
    far.recv(1000)
    time.sleep(0.2)          # in recv(), without the GIL
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(Injected))
    far.sendall((fr.reply_header(7, 0, 2) + b"ok")[:10])   # half a reply: handed over to _read_on
    t.join(10)
    assert isinstance(out.get("e"), Injected)
    assert conn.reading is False and conn.waiting == {} and conn.broken is not None
    with pytest.raises(tc._Stale):   # the next call finds it broken at once (and reconnects)
        conn.call(b"echo", b"hi", 0, None)
    far.close()


def test_call_alone_errors_stay_what_they_are():
    """An error while the connection's lock is held comes out as itself (not as a SystemError
    from releasing the lock with it pending), and the lock is released; a socket closed under
    an idle connection is left to the Python path, which reconnects."""
    from speedysvc._shmcore import ConnectionCore, call_alone

    class NoParser(ConnectionCore):
        def __init__(self):
            self.lock, self.broken, self.reading, self.waiting = threading.Lock(), None, False, {}

    odd = NoParser()
    with pytest.raises(AttributeError):
        call_alone(odd, b"x" * 30, 1, None)
    assert not odd.lock.locked()
    with pytest.raises(TypeError):
        call_alone(object(), b"x" * 30, 1, None)   # not a connection
    conn, far = _alone_connection()
    conn.last_read = 0.0   # idle: checked with poll() first
    conn.sock.close()
    assert call_alone(conn, b"x" * 30, 1, None) is None
    assert not conn.lock.locked() and conn.reading is False and conn.waiting == {}
    far.close()


def test_size_limits_beyond_64_bits_of_signed_int_work_in_both_c_paths():
    """A max_payload of 2**63 or more ("no limit") is what the Python parser accepts; the C
    paths read it as an unsigned 64-bit size, clamped, instead of failing every call."""
    from speedysvc._shmcore import Gateway, call_alone
    conn, far = _alone_connection(max_payload=2 ** 64)

    def gateway():
        far.recv(100)
        far.sendall(fr.reply_header(7, 0, 2) + b"ok")

    t = threading.Thread(target=gateway)
    t.start()
    assert call_alone(conn, fr.call_header(7, b"echo", 0, 0, 2) + b"hi", 7, 5.0) == (0, b"ok")
    t.join()
    far.close()
    conn.close()

    class Server:
        closing, inflight, max_inflight, waiting = False, 0, 10, {}

    class NotAttached:
        _channels = None

    parser = fr.FrameParser(2 ** 64, frozenset({fr.CALL}))
    frame = fr.call_header(1, b"echo", codecs.MSGPACK.flags, 0, 2) + b"hi"
    buf = parser.get_buffer()
    buf[:len(frame)] = frame
    del buf
    # checked, then declined only because there is no attachment to post it on
    assert Gateway(NotAttached(), Server(), {}, codecs.CODEC_SHIFT,
                   ~codecs.mask(lambda c: c.network_safe) & (2 ** 64 - 1))(parser, len(frame)) is None
    assert parser.whole_frame(len(frame)) is not None


@pytest.mark.parametrize("client", ["blocking", "blocking, no timeout", "asyncio"])
def test_a_large_reply_in_pieces_arrives_whole_and_one_cut_short_is_a_lost_call(client):
    """A reply larger than the parser's scratch buffer is received into the bytes the call
    returns, over several reads; a server that dies halfway through one (the connection ends
    mid-frame) loses that call (ConnectionLost: it may have run), and the next call connects
    anew and gets its answer."""
    import asyncio
    import os
    big = os.urandom(3 * fr.SCRATCH_SIZE + 5)

    def replies(call_id, payload):
        arg = bytes(payload)
        if arg == b"big":
            reply = fr.reply_header(call_id, 0, len(big)) + big
            third = len(reply) // 3
            return [reply[:third], reply[third:2 * third], reply[2 * third:]]
        if arg == b"cut":
            return [fr.reply_header(call_id, 0, len(big)) + big[:len(big) // 2], None]
        return [fr.reply_header(call_id, 0, len(arg)) + arg]

    listener, th, address = fake_service(replies)
    try:
        if client == "asyncio":
            from speedysvc import connect_async

            async def main():
                ac = connect_async(TcpKitchen, address, timeout=10, wait=0)
                try:
                    got = await ac.echo_raw(b"big")
                    assert got.__class__ is bytes and got == big
                    with pytest.raises(ConnectionLost):
                        await ac.echo_raw(b"cut")
                    assert await ac.echo_raw(b"small") == b"small"
                finally:
                    await ac.aclose()
            asyncio.run(main())
        else:
            with connect(TcpKitchen, address, timeout=None if "no timeout" in client else 10, wait=0) as c:
                got = c.echo_raw(b"big")
                assert got.__class__ is bytes and got == big
                with pytest.raises(ConnectionLost):
                    c.echo_raw(b"cut")
                assert c.echo_raw(b"small") == b"small"
    finally:
        listener.close()
        th.join(5)
