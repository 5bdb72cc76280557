"""Calling a service over TCP: ``TcpTransport``, used by ``connect(Server, 'tcp://host:port')``.

One connection carries every call of a client, several at once when several
threads call: each call has an id, replies may come back in any order, and
one of the waiting threads reads the socket for all of them (no background
thread).  A connection that broke is replaced on the next call;
calls in flight at the break raise ``ConnectionLost``.
"""
from __future__ import annotations

import itertools
import math
import os
import select
import socket
import ssl
import threading
import time

from . import compression
from . import framing as fr
from ._shmcore import call_alone
from .errors import (AuthenticationFailed, CallTimeout, ConnectionLost, PayloadTooLarge, ProtocolError,
                     ServiceUnavailable, SpeedysvcError, decode_exception, encode_exception)

SECRET_ENV = "SPEEDYSVC_SECRET"
DEFAULT_CONNECT_TIMEOUT = 10.0


def client_ssl_context(tls) -> ssl.SSLContext | None:
    """``tls``: None/False (plain TCP), True (verify against the system's CAs), a
    path to a CA bundle or certificate to trust, or a ready SSLContext."""
    if tls is None or tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is True:
        return ssl.create_default_context()
    if isinstance(tls, (str, os.PathLike)):
        return ssl.create_default_context(cafile=os.fspath(tls))
    raise TypeError(f"tls must be True, a CA file path or an ssl.SSLContext, not {tls!r}")


class ClientOptions:
    """What a client asks of a TCP service; shared by the blocking and the asyncio client."""

    def __init__(self, service: str, host: str, port: int, *, secret=None, tls=None, compression_name=None,
                 compress_min: int = compression.DEFAULT_MIN_SIZE,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT):
        self.service, self.host, self.port = service, host, port
        self.secret = fr.as_secret(secret if secret is not None else os.environ.get(SECRET_ENV))
        self.ssl_context = client_ssl_context(tls)
        self.compression = compression.check(compression_name)
        if not isinstance(compress_min, int) or compress_min < 0:
            raise ValueError(f"compress_min must be a whole number of bytes >= 0, got {compress_min!r}")
        self.compress_min = compress_min
        self.connect_timeout = connect_timeout
        self.address = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    def client_hello(self, hello: tuple) -> tuple[bytes, bytes]:
        """Answer the server's hello: (our hello, our nonce).  Raises if we cannot talk to it."""
        msg_type, version, body, leftover = hello
        if msg_type == fr.REFUSED:
            raise self.refused(body)
        if msg_type != fr.SERVER_HELLO or leftover:
            raise ProtocolError(f"{self.address} sent an unexpected handshake message")
        if fr.VERSION not in body.get("versions", ()):
            raise ProtocolError(f"{self.address} speaks protocol versions {body.get('versions')}, "
                                f"this client {fr.VERSION}: upgrade the older side")
        if body.get("service") != self.service:
            raise ServiceUnavailable(f"{self.address} serves {body.get('service')!r}, not {self.service!r}")
        if self.compression and self.compression not in body.get("compression", ()):
            raise ValueError(f"{self.address} does not support {self.compression} compression; "
                             f"it supports: {', '.join(body.get('compression', ())) or 'none'}")
        server_nonce = body.get("nonce", b"")
        nonce = fr.new_nonce()
        proof = None
        if body.get("auth"):
            if self.secret is None:
                raise AuthenticationFailed(f"{self.address} requires a shared secret: pass secret= to connect() "
                                           f"or set {SECRET_ENV}")
            proof = fr.client_proof(self.secret, server_nonce, nonce, self.service)
        self.server_nonce = server_nonce
        self.max_payload = int(body.get("max_payload", 0)) or None
        self.auth = bool(body.get("auth"))
        if self.secret is not None and not self.auth:
            # a server that does not know the secret must not pass for the service
            raise AuthenticationFailed(f"{self.address} does not ask for the shared secret this client has: "
                                       f"it cannot prove it is the service")
        return fr.pack_hello(fr.CLIENT_HELLO, {"service": self.service, "compression": self.compression or "",
                                               "compress_min": self.compress_min, "nonce": nonce,
                                               "proof": proof}), nonce

    def check_welcome(self, welcome: tuple, nonce: bytes) -> bytes:
        """Check the server's answer to our hello; returns bytes that came after it."""
        msg_type, version, body, leftover = welcome
        if msg_type == fr.REFUSED:
            raise self.refused(body)
        if msg_type != fr.WELCOME:
            raise ProtocolError(f"{self.address} sent an unexpected handshake message")
        if self.auth:
            expected = fr.server_proof(self.secret, self.server_nonce, nonce, self.service)
            if not isinstance(body.get("proof"), bytes) or not fr.hmac.compare_digest(body["proof"], expected):
                raise AuthenticationFailed(f"{self.address} could not prove it knows the shared secret")
        return leftover

    def refused(self, body: dict) -> BaseException:
        exc = decode_exception(body.get("error", b""))
        return exc

    def encode_call(self, call_id: int, name: bytes, payload, flags: int, timeout: float | None) -> list:
        """The frame of one call, as a list of buffers to send."""
        size = fr.payload_size(payload)
        if self.max_payload is not None and size > self.max_payload:
            raise PayloadTooLarge(f"request of {size} bytes exceeds the service's limit of {self.max_payload} bytes")
        fflags = 0
        if self.compression is not None and size >= self.compress_min:
            packed = compression.compress(self.compression, payload)
            if packed is not None:
                payload, size, fflags = packed, len(packed), fr.F_COMPRESSED
        header = fr.call_header(call_id, name, flags, _timeout_ms(timeout), size, fflags)
        if size < fr.SMALL_FRAME:
            return [header + payload if payload.__class__ is bytes else header + bytes(payload)]
        return [header, payload]

    def decode_reply(self, frame: fr.Frame):
        """(status, payload) of a reply frame."""
        if frame.flags & fr.F_COMPRESSED:
            return frame.arg, compression.decompress(self.compression or "", frame.payload,
                                                     self.max_payload or (1 << 62))
        return frame.arg, frame.payload

    def goaway_error(self, frame: fr.Frame) -> BaseException:
        exc = decode_exception(frame.payload)
        return ConnectionLost(f"{self.address} closed the connection: {exc}")


class _Stale(Exception):
    """The connection was found closed before a call was sent on it."""


# A connection that has read nothing for this long is checked with one poll() before a
# call goes out on it: a service that went away meanwhile (a restart) is then connected to
# anew and the call goes through.  Not on every call: the check costs about a tenth of a
# small call's round trip, and a service that goes away within a millisecond of its last
# reply finds the next call as good as in flight (it fails, like any call in flight then).
IDLE_CHECK_AFTER = 0.001

_ids = itertools.count(1)

# bumped in a child process after fork(): a connection made before belongs to the parent
# (cheaper than comparing os.getpid(), a system call, on every call)
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def _timeout_ms(timeout: float | None) -> int:
    """A call's timeout as its frame carries it (milliseconds, 0: none)."""
    return 0 if timeout is None else max(1, min(int(timeout * 1000), 0xFFFFFFFF))


def answer(reply: tuple, codec, name: bytes):
    """A reply's (status, data) as the call's result: decoded with ``codec``, or its error raised."""
    status, data = reply
    if status:
        return codec.remote_error(data)
    try:
        return codec.loads_fast(data)
    except Exception:
        from .shm import _decode_slow
        return _decode_slow(codec, name, data)


def next_call_id() -> int:
    return next(_ids) & 0xFFFFFFFF or next(_ids)


class _Connection:
    """One established connection; replies are matched to calls by id.

    Whichever waiting thread finds nobody reading becomes the reader: it reads
    until its own reply is in, hands each other reply to its caller (waking that
    thread only), then passes the role on to one thread still waiting.

    The usual call, alone on its connection, runs in C (``core.call_alone``, from
    ``TcpTransport.call``) with the same states under the same lock; it hands
    what is not usual back to ``call``, ``_failed_to_send``, ``_read_on`` or
    ``_unregister``."""

    idle_check_after = IDLE_CHECK_AFTER

    def __init__(self, sock: socket.socket, opts: ClientOptions, leftover: bytes):
        self.sock = sock
        self.opts = opts
        self.fork_generation = _fork_generation
        self.parser = fr.FrameParser(opts.max_payload or fr.DEFAULT_MAX_PAYLOAD, frozenset((fr.REPLY, fr.GOAWAY)))
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()
        self.replies: dict[int, tuple] = {}
        # call id -> the condition its thread sleeps on (made only once it has to sleep)
        self.waiting: dict[int, threading.Condition | None] = {}
        self.reading = False
        self.last_read = 0.0   # when bytes last came (time.monotonic()); 0: check before the first call
        self.broken: BaseException | None = None
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

    def call(self, name: bytes, payload, flags: int, timeout: float | None):
        """The reply ``(status, data)`` of one call.  Raises ``_Stale`` when the connection
        was found closed before anything was sent (the caller connects anew)."""
        call_id = next_call_id()
        buffers = self.opts.encode_call(call_id, name, payload, flags, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
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
                    self.replies[frame.call_id] = (1, encode_exception(e, False))
                cond = self.waiting[frame.call_id]
                if cond is not None:
                    cond.notify()


def _read_hello(sock, opts: ClientOptions) -> tuple:
    reader = fr.HelloReader()
    while True:
        data = sock.recv(4096)
        if not data:
            raise ConnectionLost(f"{opts.address} closed the connection during the handshake")
        hello = reader.feed(data)
        if hello is not None:
            return hello


def open_connection(opts: ClientOptions) -> _Connection:
    """Connect, shake hands, and return the connection (raises with a clear message)."""
    try:
        sock = socket.create_connection((opts.host, opts.port), timeout=opts.connect_timeout)
    except OSError as e:
        raise ServiceUnavailable(f"cannot connect to {opts.address}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
        if opts.ssl_context is not None:
            sock = opts.ssl_context.wrap_socket(sock, server_hostname=opts.host)
        message, nonce = opts.client_hello(_read_hello(sock, opts))
        sock.sendall(message)
        leftover = opts.check_welcome(_read_hello(sock, opts), nonce)
        sock.settimeout(None)
        return _Connection(sock, opts, leftover)
    except SpeedysvcError:
        sock.close()
        raise
    except socket.timeout:
        sock.close()
        raise ServiceUnavailable(f"{opts.address} did not complete the handshake within "
                                 f"{opts.connect_timeout} s") from None
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
        self._conn: _Connection | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<TcpTransport {self.opts.address} {self.opts.service!r}>"

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.fork_generation != _fork_generation:
            # forked: the socket is the parent's; close our copy only (no shutdown) and connect anew
            self._lock = threading.Lock()
            self._conn = None
            conn.sock.close()
            conn = None
        return conn if conn is not None else self._reconnect(None)

    def _reconnect(self, stale: _Connection | None) -> _Connection:
        with self._lock:
            if self._closed:
                raise SpeedysvcError("this connection is closed")
            conn = self._conn
            if conn is None or conn is stale:
                if conn is not None:
                    conn.close()
                conn = self._conn = open_connection(self.opts)
            return conn

    def bind_method(self, name: bytes, codec, dumps, timeout: float | None, fallback):
        """A client's method that goes straight to ``call`` (see ``client._ClientMethod``):
        arguments encoded with ``dumps(args)`` (None: the one bytes argument is the
        request); ``fallback(*args, **kwargs)`` takes every other case."""
        call, flags = self.call, codec.flags

        def method(*args, **kwargs):
            if kwargs:
                return fallback(*args, **kwargs)
            if dumps is None:
                if len(args) != 1 or args[0].__class__ is not bytes:
                    return fallback(*args)
                payload = args[0]
            else:
                try:
                    payload = dumps(args)
                except Exception:
                    return fallback(*args)   # raises a clear EncodeError
            return call(name, payload, flags, codec, timeout)

        return method

    def call(self, name: bytes, payload, flags: int, codec, timeout: float | None):
        # the usual call, alone on its connection, goes all the way in C (see _Connection)
        conn = self._conn
        if conn is not None and conn.alone and conn.fork_generation == _fork_generation \
                and payload.__class__ is bytes and len(payload) < conn.alone_limit:
            call_id = next_call_id()
            got = call_alone(conn, fr.call_header(call_id, name, flags, _timeout_ms(timeout), len(payload)) + payload,
                             call_id, timeout)
            if got is not None:
                return answer(got, codec, name)
        conn = self._connection()
        try:
            status, data = conn.call(name, payload, flags, timeout)
        except _Stale:   # it closed while idle (the service restarted?): nothing was sent yet
            conn = self._reconnect(conn)
            try:
                status, data = conn.call(name, payload, flags, timeout)
            except _Stale:   # ...and so did the new one, at once
                raise conn.broken from None
        return answer((status, data), codec, name)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
