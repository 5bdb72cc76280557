"""Calling a service over TCP: ``TcpTransport``, used by ``connect(Server, 'tcp://host:port')``.

One connection carries every call of a client, several at once when several
threads call: each call has an id, replies may come back in any order, and
one of the waiting threads reads the socket for all of them (no background
thread).  A connection that broke is replaced on the next call;
calls in flight at the break raise ``ConnectionLost``.
"""
from __future__ import annotations

import math
import select
import socket
import ssl
import threading
import time

from .._shmcore import STATUS_ERROR, ConnectionCore, TcpMethod, call_usual, fork_generation
from ..errors import (CallTimeout, ConnectionLost, ProtocolError, ServiceNotUp, ServiceUnavailable,
                      SpeedysvcError, encode_exception)
from ..transport import Address
from ..waiting import Waiting
from . import framing as fr
from .protocol import (ClientOptions, Resending, answer, cannot_connect, connect_budget, next_call_id, options_of,
                       resendable, timeout_ms)


class _Stale(Exception):
    """The connection was found closed before a call was sent on it."""


# A connection that has read nothing for this long is checked with one poll() before a
# call goes out on it: a service that went away meanwhile (a restart) is then connected to
# anew and the call goes through.  Not on every call: the check costs about a tenth of a
# small call's round trip, and a service that goes away within a millisecond of its last
# reply finds the next call as good as in flight (it fails, like any call in flight then).
IDLE_CHECK_AFTER = 0.001



class BlockingConnection(ConnectionCore):
    """One established connection; replies are matched to calls by id.

    Whichever waiting thread finds nobody reading becomes the reader: it reads
    until its own reply is in, hands each other reply to its caller (waking that
    thread only), then passes the role on to one thread still waiting.

    The usual call, alone on its connection, runs in C (``core.call_alone``, from a
    ``core.TcpMethod`` or ``TcpTransport._call``) with the same states under the same lock;
    it hands what is not usual back to ``call``, ``_failed_to_send``, ``_read_on`` or
    ``_unregister``.  The states it shares with C are the fields of its base,
    ``core.ConnectionCore`` (``sock``, ``parser``, ``lock``, ``send_lock``, ``waiting``,
    ``broken``, ``reading``, ``retired``, ``alone``, ``last_read``, ``idle_check_after``,
    ``alone_limit``, ``fork_generation``): C reads them without a lookup by name."""

    def __init__(self, sock: socket.socket, opts: ClientOptions, leftover: bytes):
        self.sock = sock
        self.opts = opts
        # bumped in a child process after fork(): a connection made before belongs to the parent
        # (cheaper than comparing os.getpid(), a system call, on every call)
        self.fork_generation = fork_generation()
        self.parser = fr.FrameParser(opts.max_payload or fr.DEFAULT_MAX_PAYLOAD, frozenset((fr.REPLY, fr.GOAWAY)),
                                     fill_bytes=True)
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()
        self.replies: dict[int, tuple] = {}
        # call id -> the condition its thread sleeps on (made only once it has to sleep)
        self.waiting: dict[int, threading.Condition | None] = {}
        self.reading = False
        self.last_read = 0.0   # when bytes last came (time.monotonic()); 0: check before the first call
        self.idle_check_after = IDLE_CHECK_AFTER
        self.broken: BaseException | None = None
        self.retired = False   # taken out of use (see ``retire``): closed when its last call ends
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.alone = not self.tls   # core.call_alone may take its usual call (not over TLS)
        # what core.call_alone may send: a frame that needs no compression, under the limit
        self.alone_limit = min(fr.SMALL_FRAME, (opts.max_payload or fr.SMALL_FRAME) + 1,
                               fr.SMALL_FRAME if opts.compression is None else opts.compress_min)
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN | select.POLLPRI)
        if leftover:
            self._deliver(self.parser.feed(leftover))

    def close(self) -> None:
        with self.lock:
            if self.broken is None:
                self.broken = ConnectionLost(f"connection to {self.opts.address} was closed")
            self._wake_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes a thread waiting in poll()
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def retire(self) -> None:
        """No new call comes on this connection: it closes once its calls in flight are over."""
        with self.lock:
            self.retired = True
            if self.waiting:
                return   # (the last call's ``_unregister`` closes it)
        self.close()

    def _wake_all(self) -> None:
        for cond in self.waiting.values():
            if cond is not None:
                cond.notify()

    def _break(self, exc: BaseException) -> None:
        """Under ``lock``: the connection is unusable; every waiting call fails, and a thread
        blocked reading it wakes up (the socket is shut down)."""
        if self.broken is None:
            self.broken = exc if isinstance(exc, ConnectionLost) else ConnectionLost(
                f"connection to {self.opts.address} was lost ({exc}); the call may or may not have run")
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._wake_all()

    def _cut_short(self) -> None:
        """Under ``lock``: an exception (a signal handler's) ended a read before what it
        received reached the parser, or a reply reached its caller: the stream cannot be
        trusted any more.  Calls waiting on it fail; the next call connects anew."""
        self.reading = False
        self._break(ConnectionLost(f"a read from {self.opts.address} was interrupted; the connection was dropped "
                                   f"and calls in flight on it may or may not have run"))

    def _check_idle(self) -> None:
        """Under ``lock``, with no call in flight (and nothing read for ``IDLE_CHECK_AFTER``):
        is the connection still open?  Late replies (to calls that timed out) are read and
        dropped; only an end, a go-away or an error count, and then ``_Stale`` says that
        nothing was sent on it."""
        try:
            while self._readable(0):
                self._deliver(self._recv())
                if self.broken is not None:
                    break
        except (OSError, ProtocolError) as e:
            self._break(e)
        except BaseException:
            self._cut_short()
            raise
        if self.broken is not None:
            raise _Stale

    def call(self, name: bytes, payload, flags: int, timeout: float | None, deadline: float | None = None):
        """The reply ``(status, data)`` of one call (``deadline``: when its ``timeout`` ends, if
        it began before).  Raises ``_Stale`` when the connection was found closed before
        anything was sent (the caller connects anew)."""
        call_id = next_call_id()
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        buffers = self.opts.encode_call(call_id, name, payload, flags,
                                        None if deadline is None else max(0.0, deadline - time.monotonic()))
        lock = self.lock
        registered = reader = False   # in ``waiting``; holding the reader's turn
        try:
            with lock:
                if self.broken is not None:
                    raise _Stale
                # the usual case: no other call on this connection, so this thread reads its
                # own reply at once, with no hand-over between threads
                if not self.waiting and not self.reading:
                    if time.monotonic() - self.last_read > IDLE_CHECK_AFTER:
                        self._check_idle()
                    self.reading = reader = True
                self.waiting[call_id] = None
                registered = True
            try:
                with self.send_lock:
                    for buf in buffers:
                        self.sock.sendall(buf)
            except BaseException as e:
                self._send_failed(e, reader)
            if reader:
                try:
                    if deadline is None and not self.tls and self.broken is None:
                        # one blocking read, which usually brings exactly our reply
                        parser = self.parser
                        n = self._receive()
                        whole = parser.whole_frame(n) if n else None
                        if whole is not None and whole[0] == fr.REPLY and whole[2] == call_id and not whole[1]:
                            with lock:
                                self.reading = reader = False
                                del self.waiting[call_id]
                                registered = False
                                if self.waiting:
                                    self._pass_reading_on()
                                last = self.retired and not self.waiting
                            if last:
                                self.close()
                            return whole[3], whole[6]
                        frames = parser.buffer_updated(n) if n else self._lost()
                    else:
                        frames = self._read(None if deadline is None else deadline - time.monotonic())
                    error = None
                except (OSError, ProtocolError) as e:
                    frames, error = [], e
                # (any other exception: the finally below drops the connection)
                with lock:
                    reply = self._end_turn(call_id, frames, error)
                    reader = False
                    if reply is not None:
                        return reply
            return self._wait(call_id, deadline, timeout)
        finally:
            if registered or reader:
                self._unregister(call_id, reader)

    def _unregister(self, call_id: int, reader: bool) -> None:
        """A call is over (answered, failed or interrupted): forget it.  ``reader``: it still
        held the reader's turn, which an exception ended halfway."""
        with self.lock:
            if reader:
                self._cut_short()
            self.waiting.pop(call_id, None)
            self.replies.pop(call_id, None)
            if not self.reading:
                self._pass_reading_on()
            last = self.retired and not self.waiting
        if last:
            self.close()

    def _send_failed(self, e: BaseException, reader: bool):
        """Sending a call's frame failed or was interrupted, maybe halfway: nothing more can
        follow it on this connection.  Raises (``e``, or ``broken`` for an OSError)."""
        with self.lock:
            if reader:
                self.reading = False
            self._break(e)
        if isinstance(e, OSError):
            raise self.broken from None
        raise e

    def _failed_to_send(self, call_id: int, e: BaseException):
        """``core.call_alone`` could not send its call: as ``call`` does."""
        try:
            self._send_failed(e, True)
        finally:
            self._unregister(call_id, True)   # (if the above was interrupted, this ends the turn)

    def _read_on(self, call_id: int, n: int | None, error: BaseException | None, deadline: float | None,
                 timeout: float | None):
        """``call`` from where ``core.call_alone`` stopped: it holds the reader's turn for
        ``call_id``, sent the frame and read once, and what came (``n`` bytes in the parser's
        buffer; None: nothing within the timeout, or ``error``) is not exactly its reply."""
        reader = True
        try:
            frames = []
            if error is None and n is not None:
                try:
                    frames = self.parser.buffer_updated(n) if n else self._lost()
                except (OSError, ProtocolError) as e:
                    error = e
            with self.lock:
                reply = self._end_turn(call_id, frames, error)
                reader = False
                if reply is not None:
                    return reply
            return self._wait(call_id, deadline, timeout)
        finally:
            self._unregister(call_id, reader)

    def _end_turn(self, call_id: int, frames: list, error: BaseException | None):
        """Under ``lock``: a call's turn as the reader ends with what its read brought
        (``frames``, or ``error``, which breaks the connection); its reply, if that came."""
        if error is not None:
            self._break(error)
        else:
            self._deliver(frames)
        self.reading = False
        return self.replies.pop(call_id, None)

    def _pass_reading_on(self) -> None:
        """Under ``lock``, with nobody reading: wake one sleeping caller still without a reply."""
        for call_id, cond in self.waiting.items():
            if cond is not None and call_id not in self.replies:
                cond.notify()
                return

    def _wait(self, call_id: int, deadline: float | None, timeout: float | None):
        lock = self.lock
        with lock:
            while True:
                reply = self.replies.pop(call_id, None)
                if reply is not None:
                    return reply
                if self.broken is not None:
                    raise self.broken
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CallTimeout(f"call to {self.opts.address} timed out after {timeout} s")
                if self.reading:
                    cond = self.waiting[call_id]
                    if cond is None:
                        cond = self.waiting[call_id] = threading.Condition(lock)
                    cond.wait(remaining)
                    continue
                self.reading = True
                lock.release()
                interrupted = True
                try:
                    try:
                        frames = self._read(remaining)
                        error = None
                    except (OSError, ProtocolError) as e:
                        frames, error = [], e
                    interrupted = False
                finally:
                    lock.acquire()
                    self.reading = False
                    if interrupted:   # what the read received may be lost, and the stream with it
                        self._cut_short()
                if error is not None:
                    self._break(error)
                else:
                    self._deliver(frames)

    def _readable(self, timeout: float | None) -> bool:
        if self.tls and self.sock.pending():
            return True
        return bool(self.poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))))

    def _read(self, timeout: float | None) -> list:
        """Read what has arrived (waiting up to ``timeout``); the frames now complete."""
        if timeout is None:
            return self._recv()   # a blocking read: one system call, not poll() and then recv()
        return self._recv() if self._readable(timeout) else []

    def _receive(self) -> int:
        """One blocking read into the parser's buffer; how many bytes came (0: the end)."""
        buf = self.parser.get_buffer()
        n = self.sock.recv_into(buf, len(buf))
        del buf
        self.last_read = time.monotonic()
        return n

    def _recv(self) -> list:
        n = self._receive()
        return self.parser.buffer_updated(n) if n else self._lost()

    def _lost(self):
        raise ConnectionLost(f"{self.opts.address} closed the connection; a call in flight may or may not have run")

    def _deliver(self, frames) -> None:
        """Under ``lock`` (or before anyone else can see us)."""
        for frame in frames:
            if frame.kind == fr.GOAWAY:
                self._break(self.opts.goaway_error(frame))
            elif frame.call_id in self.waiting:
                try:
                    self.replies[frame.call_id] = self.opts.decode_reply(frame)
                except Exception as e:   # a reply that does not decompress fails its call only
                    self.replies[frame.call_id] = (STATUS_ERROR, encode_exception(e, False))
                cond = self.waiting[frame.call_id]
                if cond is not None:
                    cond.notify()


def _read_hello(sock, opts: ClientOptions, end: float) -> tuple:
    reader = fr.HelloReader()
    while True:
        _time_left(sock, end)
        data = sock.recv(4096)
        if not data:
            raise ConnectionLost(f"{opts.address} closed the connection during the handshake")
        hello = reader.feed(data)
        if hello is not None:
            return hello


def _time_left(sock, end: float) -> None:
    """The socket's timeout for its next operation: what is left until ``end``."""
    left = end - time.monotonic()
    if left <= 0:
        raise socket.timeout
    sock.settimeout(left)


RESET_RETRY = 0.01   # seconds between connects reset before the server's hello


class _ResetBeforeHello(Exception):
    """The connection was reset (or closed) before the server said a word."""


def open_connection(opts: ClientOptions, deadline: float | None = None,
                    timeout: float | None = None) -> BlockingConnection:
    """Connect, shake hands, and return the connection (raises with a clear message): within
    the connect timeout, and by ``deadline`` (the call's, ``timeout`` from when it began) too.

    A connection reset before the server's hello is tried again within that time: a service
    whose workers accept connections (SO_REUSEPORT) resets those still queued in the listener of
    a worker that stops (Linux, unless net.ipv4.tcp_migrate_req moves them to another one)."""
    budget, too_late = connect_budget(opts, deadline, timeout)
    end = time.monotonic() + budget
    if budget <= 0:
        raise too_late()
    while True:
        try:
            return _open_once(opts, end, too_late)
        except _ResetBeforeHello as e:
            if time.monotonic() + RESET_RETRY >= end:
                raise ConnectionLost(f"connection to {opts.address} was reset before the handshake: "
                                     f"{e.__cause__ or 'closed'}") from None
            time.sleep(RESET_RETRY)


def _open_once(opts: ClientOptions, end: float, too_late) -> BlockingConnection:
    budget = end - time.monotonic()
    if budget <= 0:
        raise too_late()
    try:
        sock = socket.create_connection((opts.host, opts.port), timeout=budget)
    except socket.timeout:
        raise too_late() from None
    except OSError as e:
        raise cannot_connect(opts, e) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
        if opts.ssl_context is not None:
            _time_left(sock, end)   # (the TLS handshake)
            sock = opts.ssl_context.wrap_socket(sock, server_hostname=opts.tls_name)
        try:
            first = _read_hello(sock, opts, end)
        except ConnectionResetError as e:
            raise _ResetBeforeHello() from e
        except ConnectionLost as e:   # (closed before a byte of the hello)
            raise _ResetBeforeHello() from e
        message, nonce = opts.client_hello(first)
        _time_left(sock, end)
        sock.sendall(message)
        leftover = opts.check_welcome(_read_hello(sock, opts, end), nonce)
        sock.settimeout(None)
        return BlockingConnection(sock, opts, leftover)
    except (SpeedysvcError, _ResetBeforeHello):
        sock.close()
        raise
    except socket.timeout:
        sock.close()
        raise too_late() from None
    except ssl.SSLError as e:
        sock.close()
        raise ServiceUnavailable(f"TLS with {opts.address} failed: {e}") from None
    except OSError as e:
        sock.close()
        raise ConnectionLost(f"connection to {opts.address} failed during the handshake: {e}") from None
    except BaseException:
        sock.close()
        raise


class TcpTransport:
    """Calls a service on another host (or this one) over TCP.  Thread-safe."""

    scheme = "tcp"

    def __init__(self, opts: ClientOptions):
        self.opts = opts
        self._lock = threading.Lock()
        self._conn: BlockingConnection | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<TcpTransport {self.opts.address} {self.opts.service!r}>"

    def _connection(self, deadline: float | None = None, timeout: float | None = None) -> BlockingConnection:
        conn = self._conn
        if conn is not None and conn.fork_generation != fork_generation():
            # forked: the socket is the parent's; close our copy only (no shutdown) and connect anew
            self._lock = threading.Lock()
            self._conn = None
            conn.sock.close()
            conn = None
        return conn if conn is not None else self._reconnect(None, deadline, timeout)

    def _reconnect(self, stale: BlockingConnection | None, deadline: float | None,
                   timeout: float | None) -> BlockingConnection:
        """A connection in place of ``stale`` (None: of none), opened by the call with ``deadline``
        (see ``open_connection``) unless another thread did it meanwhile."""
        wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._lock.acquire(timeout=wait):   # (another thread is connecting)
            raise CallTimeout(f"call to {self.opts.address} timed out after {timeout} s while connecting")
        try:
            if self._closed:
                raise SpeedysvcError("this connection is closed")
            conn = self._conn
            if conn is None or conn is stale:
                if conn is not None:
                    conn.close()
                    self._conn = None
                conn = self._conn = open_connection(self.opts, deadline, timeout)
            return conn
        finally:
            self._lock.release()

    def bind_method(self, name: bytes, codec, dumps, timeout: float | None, fallback):
        """A client's method whose usual call runs in C (see ``core.TcpMethod``): arguments
        encoded with ``dumps(args)`` (None: the one bytes argument is the request), the reply
        decoded with ``codec.loads_fast``; ``fallback(*args, **kwargs)`` does the same in
        Python and takes every other case, ``call`` every call it cannot send alone."""
        return TcpMethod(self, name, codec, dumps, codec.loads_fast, codec.flags, timeout, timeout_ms(timeout),
                         fallback, answer)

    def call(self, name: bytes, payload, flags: int, codec, timeout: float | None, _waiting: bool = False):
        # (when the call began: a call the server never started is sent again within its timeout)
        began = time.monotonic()
        try:
            return self._call(name, payload, flags, codec, timeout, _waiting)
        except Exception as e:
            return self._after_alone(e, began, name, payload, flags, codec, timeout)

    def _after_alone(self, error: Exception, began: float, name: bytes, payload, flags: int, codec,
                     timeout: float | None):
        """A call that began at ``began`` raised ``error`` (in ``call``, or in ``core.TcpMethod``):
        sent again if its server never started it (see ``_again``), else ``error`` raised."""
        if not resendable(error):
            raise error
        return self._again(error, began, name, payload, flags, codec, timeout)

    def _again(self, error: BaseException, began: float, name: bytes, payload, flags: int, codec,
               timeout: float | None):
        """A call the server answered as never started because it is stopping (a worker that
        leaves in a rolling restart, or a gateway being restarted): sent again on a new
        connection, as long as the call's timeout (without one: the connect timeout) leaves
        time; the port is still served by the workers that stay or come.  When nothing accepts
        connections any more (the whole service stops, or a gateway restarts), the error is
        raised as it came: a service stopped on purpose is not waited for.  A server merely
        full (``NoFreeChannel``) is not asked again: its caller decides."""
        resending = Resending(self.opts, began, timeout, error)
        while True:
            self._retire()
            attempt = resending.timeout()
            try:
                return self._call(name, payload, flags, codec, attempt, True)
            except Exception as e:
                time.sleep(resending.failed(e))

    def _retire(self) -> None:
        """The connection that answered a call as not started (its server is stopping) takes no
        new call: the next one connects anew.  Its calls in flight finish on it (the server
        answers them, then closes it).  (Should another thread have connected anew meanwhile,
        that connection is retired instead: it costs a connection, never a call.)"""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.retire()

    def _call(self, name: bytes, payload, flags: int, codec, timeout: float | None, _waiting: bool = False):
        # the usual call, alone on its connection, goes all the way in C (see BlockingConnection)
        if payload.__class__ is bytes:
            got = call_usual(self, name, flags, timeout, timeout_ms(timeout), payload)
            if got is not None:
                return answer(got, codec, name)
        # the call's timeout bounds connecting (and the handshake) too
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            conn = self._connection(deadline, timeout)
            try:
                status, data = conn.call(name, payload, flags, timeout, deadline)
            except _Stale:   # it closed while idle (the service restarted?): nothing was sent yet
                conn = self._reconnect(conn, deadline, timeout)
                try:
                    status, data = conn.call(name, payload, flags, timeout, deadline)
                except _Stale:   # ...and so did the new one, at once
                    raise conn.broken from None
        except ServiceNotUp as e:   # refused: nothing listens (yet); the call was not sent
            if _waiting:
                raise
            return self._when_up(e, name, payload, flags, codec, timeout)
        return answer((status, data), codec, name)

    def _when_up(self, error: ServiceNotUp, name: bytes, payload, flags: int, codec, timeout: float | None):
        """Wait for the service to accept connections (see ``speedysvc.waiting``), then call."""
        wait = Waiting(self.opts.service, self.opts.wait, timeout)
        if wait.bound <= 0:
            raise error
        reason = f"nothing accepts connections at {self.opts.address}"
        while True:
            time.sleep(wait.pause(reason))
            left = wait.remaining(reason)
            try:
                return self._call(name, payload, flags, codec, left, True)
            except ServiceNotUp:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def open_tcp(address: Address, options: dict) -> TcpTransport:
    """The ``tcp://`` scheme's factory (see ``speedysvc.transport``)."""
    return TcpTransport(options_of(address, options))
