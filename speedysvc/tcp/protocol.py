"""The client's half of the TCP protocol, shared by the blocking and the asyncio client:
the handshake (``ClientOptions.client_hello``, ``check_welcome``), call frames out and
replies in, and a reply's value.  The wire format itself is in ``framing``.
"""
from __future__ import annotations

import errno
import os
import ssl
import time

from ..errors import (AuthenticationFailed, CallTimeout, ConnectionLost, NoFreeChannel, PayloadTooLarge,
                      ProtocolError, ServiceNotUp, ServiceUnavailable, decode_exception)
from ..codecs.outofband import OutOfBand
from ..waiting import check_wait
from .. import _shmcore
from . import compression
from . import framing as fr

SECRET_ENV = "SPEEDYSVC_SECRET"
DEFAULT_CONNECT_TIMEOUT = 10.0

# a TCP call's id: one sequence for every TCP client of the process, in C and Python
next_call_id = _shmcore.next_call_id


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
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, wait: float | None = None):
        self.service, self.host, self.port = service, host, port
        self.wait = check_wait(wait)   # see speedysvc.waiting
        self.secret = fr.as_secret(secret if secret is not None else os.environ.get(SECRET_ENV))
        self.ssl_context = client_ssl_context(tls)
        self.compression = compression.check(compression_name)
        if not isinstance(compress_min, int) or compress_min < 0:
            raise ValueError(f"compress_min must be a whole number of bytes >= 0, got {compress_min!r}")
        self.compress_min = compress_min
        self.connect_timeout = connect_timeout
        self.address = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        self.tls_name = host   # the name TLS checks the certificate against (an address's host name)

    def client_hello(self, hello: tuple) -> tuple[bytes, bytes]:
        """Answer the server's hello: (our hello, our nonce).  Raises if we cannot talk to it."""
        msg_type, version, body, leftover = hello
        if msg_type == fr.REFUSED:
            raise self.refused(body)
        if msg_type == fr.SERVER_HELLO and leftover:
            # a server that stops as we connect refuses us right after its hello (both may come
            # in one read)
            try:
                after = fr.HelloReader().feed(leftover)
            except ProtocolError:
                after = None
            if after is not None and after[0] == fr.REFUSED:
                raise self.refused(after[2])
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
                                               "proof": proof, "not_run": True}), nonce

    def check_welcome(self, welcome: tuple, nonce: bytes) -> bytes:
        """Check the server's answer to our hello; returns bytes that came after it."""
        msg_type, version, body, leftover = welcome
        if msg_type == fr.REFUSED:
            raise self.refused(body)
        if msg_type != fr.WELCOME:
            raise ProtocolError(f"{self.address} sent an unexpected handshake message")
        # whether the server marks the calls it never started (F_NOT_RUN); an older one does not
        self.not_run = body.get("not_run") is True
        if self.auth:
            expected = fr.server_proof(self.secret, self.server_nonce, nonce, self.service)
            if not fr.same_proof(body.get("proof"), expected):
                raise AuthenticationFailed(f"{self.address} could not prove it knows the shared secret")
        return leftover

    def refused(self, body: dict) -> BaseException:
        exc = decode_exception(body.get("error", b""))
        # (a server that closes refused us: no call was sent; one that stays may take it)
        return not_run(exc) if body.get("stopping") is True else exc

    def encode_call(self, call_id: int, name: bytes, payload, flags: int, timeout: float | None) -> list:
        """The frame of one call, as a list of buffers to send."""
        pieces = None
        if payload.__class__ is OutOfBand:   # sent as its pieces, each buffer as it is
            pieces, size = payload.parts(len(name))
            if self.compression is not None and size >= self.compress_min:
                payload, pieces = b"".join(bytes(p) for p in pieces), None
        else:
            size = fr.payload_size(payload)
        if self.max_payload is not None and size > self.max_payload:
            raise PayloadTooLarge(f"request of {size} bytes exceeds the service's limit of {self.max_payload} bytes")
        fflags = 0
        if pieces is not None:
            return [fr.call_header(call_id, name, flags, timeout_ms(timeout), size, fflags)] + pieces
        if self.compression is not None and size >= self.compress_min:
            packed = compression.compress(self.compression, payload)
            if packed is not None:
                payload, size, fflags = packed, len(packed), fr.F_COMPRESSED
        header = fr.call_header(call_id, name, flags, timeout_ms(timeout), size, fflags)
        if size < fr.SMALL_FRAME:
            return [header + payload if payload.__class__ is bytes else header + bytes(payload)]
        return [header, payload]

    def decode_reply(self, frame: fr.Frame):
        """(status, payload) of a reply frame; the status is ``STATUS_NOT_RUN`` for an error
        reply to a call the server never started (see ``answer``)."""
        status = STATUS_NOT_RUN if frame.flags & fr.F_NOT_RUN and frame.arg else frame.arg
        payload = fr.payload_bytes(frame)
        if frame.flags & fr.F_COMPRESSED:
            return status, compression.decompress(self.compression or "", payload, self.max_payload or (1 << 62))
        return status, payload

    def goaway_error(self, frame: fr.Frame) -> BaseException:
        exc = decode_exception(fr.payload_bytes(frame))
        if frame.flags & fr.F_NOT_RUN:
            return not_run(ConnectionLost(f"{self.address} closed the connection: {exc}; the calls still "
                                          f"without an answer never started"))
        return ConnectionLost(f"{self.address} closed the connection: {exc}")


# A reply's status as the client keeps it for an error reply flagged F_NOT_RUN (never on the
# wire, where a status is 0 or 1): ``answer`` raises the error marked ``not_run``.
STATUS_NOT_RUN = 0x100


def not_run(exc: BaseException) -> BaseException:
    """``exc`` marked as the error of a call that provably never started on the server (it
    may be sent again, elsewhere): ``exc.not_run`` is True."""
    exc.not_run = True
    return exc


# A call the server never started because it was stopping is sent again (by a client of one
# address, blocking or asyncio) after a pause that grows from the first to the last (a rolling
# restart: at once, to a worker that stays).
NOT_RUN_FIRST_PAUSE = 0.005
NOT_RUN_LAST_PAUSE = 0.25


def resendable(e: BaseException) -> bool:
    """A call the server answered as never started because it is stopping (not one it is merely
    too full for, ``NoFreeChannel``: its caller decides)."""
    return getattr(e, "not_run", False) and not isinstance(e, NoFreeChannel)


class Resending:
    """How a client of one address (blocking or asyncio) sends again a call its stopping server
    never started: on a new connection, as long as the call's timeout (without one: the connect
    timeout) leaves time, after pauses growing from ``NOT_RUN_FIRST_PAUSE`` to
    ``NOT_RUN_LAST_PAUSE``.  When nothing accepts connections any more (``ServiceNotUp``: the
    service stops, or a gateway restarts) the first error is raised as it came: a service
    stopped on purpose is not waited for.  The caller loops::

        while True:
            retire the connection; try: return call(..., r.timeout()) except Exception as e: sleep(r.failed(e))
    """

    def __init__(self, opts: "ClientOptions", began: float, timeout: float | None, error: BaseException):
        self.bound = began + (opts.connect_timeout if timeout is None else timeout)
        self.limited, self.error, self.pause = timeout is not None, error, NOT_RUN_FIRST_PAUSE

    def timeout(self) -> float | None:
        """The next attempt's timeout; raises the last error when no time is left."""
        left = self.bound - time.monotonic()
        if left <= 0:
            raise self.error
        return left if self.limited else None

    def failed(self, e: BaseException) -> float:
        """An attempt failed with ``e``: raises what ends the call, else the pause before the next."""
        if isinstance(e, ServiceNotUp):
            raise self.error from None
        if not resendable(e):
            raise e
        self.error = e
        pause, self.pause = self.pause, min(self.pause * 2, NOT_RUN_LAST_PAUSE)
        return min(pause, max(0.0, self.bound - time.monotonic()))


def connect_budget(opts: ClientOptions, deadline: float | None, timeout: float | None) -> tuple[float, object]:
    """How long connecting and the handshake may take for a call with ``deadline`` (its
    ``timeout`` from now, or None): ``(seconds, the error to raise when they run out)``.  The
    connect timeout bounds them, and so does the call's own timeout when it is shorter: a
    call never waits for a connection longer than it would for its answer."""
    if deadline is not None:
        left = deadline - time.monotonic()
        if left < opts.connect_timeout:
            return max(0.0, left), lambda: CallTimeout(
                f"call to {opts.address} timed out after {timeout} s while connecting")
    return opts.connect_timeout, lambda: ServiceUnavailable(
        f"{opts.address} did not complete the handshake within {opts.connect_timeout} s")


def cannot_connect(opts: ClientOptions, e: OSError) -> ServiceUnavailable:
    """The error for a connection that could not be made: ServiceNotUp (the client waits for
    the service) when it was refused, as while nothing listens yet or a restart is under way;
    ServiceUnavailable (at once) for anything else."""
    text = str(e)
    # (asyncio joins the errors of each address it tried: refused only if each one was)
    refused = isinstance(e, ConnectionRefusedError) or (
        text.startswith("Multiple exceptions: ") and text.count("[Errno ") == text.count(f"[Errno {errno.ECONNREFUSED}]"))
    return (ServiceNotUp if refused else ServiceUnavailable)(f"cannot connect to {opts.address}: {e.strerror or e}")


def timeout_ms(timeout: float | None) -> int:
    """A call's timeout as its frame carries it (milliseconds, 0: none)."""
    return 0 if timeout is None else max(1, min(int(timeout * 1000), 0xFFFFFFFF))


def answer(reply: tuple, codec, name: bytes):
    """A reply's (status, data) as the call's result: decoded with ``codec``, or its error raised."""
    status, data = reply
    if status:
        if status == STATUS_NOT_RUN:
            try:
                codec.remote_error(data)
            except BaseException as e:
                not_run(e)
                raise
        return codec.remote_error(data)
    return codec.decode_result(name, data)


def python_method(call, name: bytes, codec, dumps, timeout: float | None, fallback):
    """A client's method in Python that goes straight to ``call(name, payload, flags, codec,
    timeout)`` (see ``client._ClientMethod``): arguments encoded with ``dumps(args)`` (None:
    the one bytes argument is the request); ``fallback(*args, **kwargs)`` takes every other
    case.  (The several-endpoint client's; one endpoint's is ``core.TcpMethod``.)"""
    flags = codec.flags

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


def options_of(address, options: dict) -> ClientOptions:
    """connect()'s transport arguments for ``address`` as ``ClientOptions``."""
    kw = dict(options)
    if "compression" in kw:
        kw["compression_name"] = kw.pop("compression")
    return ClientOptions(address.service, address.host, address.port, **kw)
