"""One TCP client of a service, as the gateway serves it: the handshake, then its frames in
and its replies out (``ServerConnection``, an asyncio protocol).  ``TcpServer`` decides
what becomes of each call; this module knows the wire and the connection's own state:
whether it is read, whether its client reads its replies, what it holds back."""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING

from .. import _shmcore as core
from .. import codecs
from ..errors import AuthenticationFailed, PayloadTooLarge, ProtocolError, ServiceNotUp, ServiceUnavailable, \
    SpeedysvcError, encode_exception
from . import compression
from . import framing as fr
from .compression import LARGE_PAYLOAD

if TYPE_CHECKING:
    from .server import TcpServer

log = logging.getLogger("speedysvc.tcp")

SMALL_WRITE = fr.SMALL_FRAME  # below this, header and payload go out in one write
CLOSE_GRACE = 5.0             # seconds a closed connection gets to flush its last bytes
TCP_INFO_SIZE, TCPI_BYTES_ACKED = 136, 120   # Linux's struct tcp_info: its size, tcpi_bytes_acked (u64)


class ServerConnection(core.ServerConnectionCore, asyncio.BufferedProtocol):
    """One TCP client: the handshake, then its frames.  The callbacks of every read,
    ``get_buffer`` and ``buffer_updated``, are its C base's (``core.ServerConnectionCore``),
    which keeps ``parser``, ``transport``, ``short_way``, ``closed``, ``inflight`` and ``share``
    and hands all but the short way to ``_hello_buffer``, ``_posted`` and ``_buffer_updated``."""

    def __init__(self, server: TcpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.opened = self.last_progress = time.monotonic()
        self.hello = fr.HelloReader()
        self.hello_buf = bytearray(fr.HELLO.size + fr.MAX_HELLO_BODY)
        self.parser: fr.FrameParser | None = None
        self.nonce = fr.new_nonce()
        self.compression: str | None = None
        self.compress_min = compression.DEFAULT_MIN_SIZE
        self.authenticated = False
        self.not_run = False    # the client asked to know which calls never started (F_NOT_RUN)
        self.inflight = 0
        self.closed = False
        self.paused_by_server = False
        self.paused_by_writes = False
        self.unsent, self.acked, self.write_progress = 0, 0, 0.0   # see reads_replies
        self.compressing = 0                        # replies being compressed in a thread
        self.parked: collections.deque = collections.deque()   # (call id, waited-for answer) not yet sent
        self.held: collections.deque = collections.deque()     # calls not started: replies unread
        self.waits: dict = {}   # calls waited for in threads: {concurrent future: PendingCall}
        self.eof = False        # the client half-closed: close once its calls are answered
        self.rate_mark = None   # (when, frames complete, bytes of the frame in progress): see sweep
        self.batch: list | None = None
        self.batch_bytes = 0
        self.short_way = None   # the server's gateway, once the handshake chose no compression
        self.share = server.options.per_connection

    def may_decode(self, flags: int) -> bool:
        """Whether a call whose request ``flags`` name its codec may go to a worker: a codec that
        is not network-safe (pickle), or that this process does not know (it cannot tell whether
        it is), only from an authenticated client of a service that allows it."""
        codec = codecs.codec_of(flags)
        return (codec is not None and codec.network_safe) or (self.server.options.allow_pickle
                                                             and self.authenticated)

    # -- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        server = self.server
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        server.counters["connections_total"] += 1
        if not self._room_for_client():
            return
        # A connection in the handshake (not authenticated yet, when a secret is required) does
        # not count as a client: they have a small limit of their own, beyond which each new one
        # closes the oldest, so that connections that never complete the handshake cannot keep
        # clients that can out.
        # This one counts first, then the sum is read: in a worker, of two workers taking the
        # last place at once, at least one sees the other's count (see TcpServer.become_client).
        handshaking = server.handshaking
        handshaking[self] = None
        server.connections.add(self)
        server.counts_changed()
        if server.handshakes() > server.options.max_handshakes:
            oldest = next(iter(handshaking))
            if oldest is self:
                # (in a worker: the others hold the handshakes; the newest goes, not one of theirs)
                self.refuse(ServiceUnavailable(f"service {server.service!r} has too many TCP connections in "
                                               f"the handshake ({server.options.max_handshakes})"))
                return
            server.counters["handshakes_evicted"] += 1
            oldest.refuse(ServiceUnavailable(
                f"service {server.service!r} has too many TCP connections in the handshake "
                f"({server.options.max_handshakes}); this one was the oldest"))
        transport.write(fr.pack_hello(fr.SERVER_HELLO, {
            "versions": list(fr.SUPPORTED_VERSIONS), "service": server.service,
            "compression": compression.available(), "auth": server.secret is not None,
            "nonce": self.nonce, "max_payload": server.options.max_payload}))

    def _room_for_client(self) -> bool:
        """Whether one more client fits under ``max_connections`` (clients past the handshake);
        refuses this connection if not.  (A first look, at connect: ``become_client`` decides,
        past the handshake.)"""
        server = self.server
        if server.clients() < server.options.max_connections:
            return True
        self.refuse(ServiceUnavailable(f"service {server.service!r} has too many TCP clients "
                                       f"({server.options.max_connections}); try again later"))
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.parser is not None:
            self.parser.discard()   # (a frame that will never be complete)
        self.server.handshaking.pop(self, None)
        self.server.connections.discard(self)
        self.server.counts_changed()
        self.server.release(self)

    def _hello_buffer(self, sizehint: int) -> memoryview:
        """get_buffer before the handshake is over (after it, the parser's)."""
        return memoryview(self.hello_buf)

    # Usually the bytes that came are one whole call, uncompressed, not pickle, with room for
    # it: the short way.  A small call crosses the gateway twice per round trip and each layer
    # of Python costs there (on a small VM, most of the gateway's share of the call), so
    # ``core.Gateway`` checks the frame, takes a channel, posts the call straight from the read
    # buffer, spins briefly and builds the reply frame, all in C; ``buffer_updated`` (C, the
    # base's) offers it the bytes and writes the reply frame it returns.  The short way returns
    # None with nothing done for any other case (``_buffer_updated`` takes it), or what a call
    # posted but not answered at once needs to go on (``_posted``).

    def _posted(self, nbytes: int, posted) -> None:
        self.server.go_on(self, nbytes, posted)

    def _buffer_updated(self, nbytes: int) -> None:
        self.last_progress = time.monotonic()
        self.server.counters["bytes_in"] += nbytes
        if self.closed:
            return
        if self.parser is None:
            try:
                done = self.hello.feed(self.hello_buf[:nbytes])
            except ProtocolError as e:
                self.refuse(e)
                return
            if done is not None:
                try:
                    self._on_client_hello(*done)
                except Exception as e:   # a hello of the right shape with values of the wrong types
                    log.debug("malformed client hello from %s: %r", self.peer, e)
                    self.refuse(ProtocolError("malformed client hello"))
            return
        self._frames(self.parser.buffer_updated, nbytes)

    def _frames(self, parse, data) -> None:
        """Parse what arrived and submit the calls now complete; a bad frame ends the connection."""
        try:
            frames = parse(data)
        except fr.FrameTooLarge as e:
            self.server.counters["protocol_errors"] += 1
            self.go_away(PayloadTooLarge(str(e)))
            return
        except ProtocolError as e:
            self.server.counters["protocol_errors"] += 1
            self.go_away(e)
            return
        # replies to calls answered at once go out together, in one write
        self.batch, self.batch_bytes = [], 0
        try:
            if len(frames) == 1:
                self.server.submit(self, frames[0])
            elif frames:
                self.server.submit_all(self, frames)
        finally:
            if not self.closed:
                self._flush()
            self.batch = None

    def eof_received(self):
        # A client that half-closes (shutdown(SHUT_WR)) after its last call still gets the
        # replies to its calls; then we close.  (Not over TLS, where asyncio closes anyway.)
        self.eof = True
        if self.parser is None or self.server.ssl_context is not None or not self.answering:
            return False   # close (what was written is sent first)
        return True

    @property
    def answering(self) -> bool:
        """Whether calls of this connection are still to be answered."""
        return bool(self.inflight or self.held or self.compressing or self.parked
                    or self in self.server.admission.waiting)

    def close_when_answered(self) -> None:
        """After the client half-closed: close once no call of it is left to answer."""
        if not self.closed and not self.answering:
            self.transport.close()

    def pause_writing(self) -> None:
        # the client does not read its replies: stop reading its calls until it does
        self.paused_by_writes = True
        self.reads_replies()
        self.write_progress = time.monotonic()
        self.transport.pause_reading()

    def reads_replies(self) -> bool:
        """Whether the client took some of our bytes since this was last asked: the bytes the
        kernel says it acknowledged grew (a client that reads slowly empties the kernel's
        send buffer, megabytes, long before ours shrinks), or our write buffer shrank."""
        sock = self.transport.get_extra_info("socket")
        try:
            acked = struct.unpack_from("<Q", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE),
                                       TCPI_BYTES_ACKED)[0]
        except (OSError, AttributeError, struct.error):   # (not TCP, or an older kernel)
            acked = 0
        unsent = self.transport.get_write_buffer_size()
        progress = acked > self.acked or unsent < self.unsent
        self.acked, self.unsent = acked, unsent
        return progress

    def resume_writing(self) -> None:
        self.paused_by_writes = False
        self.server.unblock(self)

    @property
    def backlogged(self) -> bool:
        """Replies wait to be sent: start no more calls, and leave large answers in shared memory."""
        return self.paused_by_writes or self.compressing > 0

    @property
    def paused(self) -> bool:
        """Not read because of us (its calls wait for room, or it does not read its replies)."""
        return self.paused_by_server or self.paused_by_writes or bool(self.held)

    def hold(self, frame: fr.Frame) -> None:
        """A call not to start until the client reads its replies (``TcpServer.unblock``)."""
        self.held.append(frame)
        self.transport.pause_reading()

    def resume(self) -> None:
        self.last_progress = time.monotonic()   # a pause is not a stall
        if not (self.closed or self.paused or self.eof):
            self.transport.resume_reading()

    # -- handshake -------------------------------------------------------------------------
    def _on_client_hello(self, msg_type, version, body, leftover) -> None:
        server = self.server
        if msg_type != fr.CLIENT_HELLO:
            self.refuse(ProtocolError(f"expected a client hello, got message type {msg_type}"))
            return
        if version not in fr.SUPPORTED_VERSIONS:
            self.refuse(ProtocolError(f"protocol version {version} is not supported; this service speaks "
                                      f"{', '.join(map(str, fr.SUPPORTED_VERSIONS))} (upgrade speedysvc)"))
            return
        if body.get("service") != server.service:
            self.refuse(ServiceUnavailable(f"this port serves {server.service!r}, not {body.get('service')!r}"))
            return
        algo = body.get("compression") or None
        if algo is not None and (not isinstance(algo, str) or algo not in compression.ALGORITHMS):
            self.refuse(ValueError(f"compression {algo!r} is not supported here; supported: "
                                   f"{', '.join(compression.available())}"))
            return
        compress_min = body.get("compress_min", compression.DEFAULT_MIN_SIZE)
        client_nonce = body.get("nonce")
        if not isinstance(compress_min, int) or compress_min < 0 or not isinstance(client_nonce, bytes) \
                or len(client_nonce) != fr.NONCE_SIZE:
            self.refuse(ProtocolError("malformed client hello"))
            return
        welcome = {"proof": None}
        # a client that asks is told which calls never started (F_NOT_RUN), so it may send them
        # elsewhere; an older client is not sent a flag it would not know
        if body.get("not_run") is True:
            self.not_run = welcome["not_run"] = True
        if server.secret is not None:
            sent = body.get("proof")
            expected = fr.client_proof(server.secret, self.nonce, client_nonce, server.service)
            if not fr.same_proof(sent, expected):
                server.counters["auth_failures"] += 1
                log.warning("%s: TCP client %s failed authentication", server.service, self.peer)
                self.refuse(AuthenticationFailed(
                    f"service {server.service!r} requires a shared secret and the client's is "
                    f"{'wrong' if sent else 'missing'}"))
                return
            self.authenticated = True
            welcome["proof"] = fr.server_proof(server.secret, self.nonce, client_nonce, server.service)
        if not server.become_client(self):
            self.refuse(ServiceUnavailable(f"service {server.service!r} has too many TCP clients "
                                           f"({server.options.max_connections}); try again later"))
            return
        self.compression, self.compress_min = algo, compress_min
        self.parser = fr.FrameParser(server.options.max_payload, frozenset((fr.CALL,)), fr.SERVER_SCRATCH)
        if algo is None:   # (replies of a compressing connection may need compressing)
            self.short_way = server.gateway if server.local is None else server.local_way
        self.transport.write(fr.pack_hello(fr.WELCOME, welcome))
        self.hello = self.hello_buf = None
        if leftover:
            self._frames(self.parser.feed, leftover)

    # -- answers ---------------------------------------------------------------------------
    def reply(self, call_id: int, status: int, data) -> None:
        if self.closed:
            return
        flags = 0
        if self.compression is not None and len(data) >= self.compress_min:
            if len(data) >= LARGE_PAYLOAD:
                self._compress_then_send(call_id, status, data)
                return
            packed = compression.compress(self.compression, data)
            if packed is not None:
                data, flags = packed, fr.F_COMPRESSED
        self._send(call_id, status, data, flags)

    def _compress_then_send(self, call_id: int, status: int, data) -> None:
        """A large reply is compressed in a thread; the connection is backlogged meanwhile."""
        server = self.server
        self.compressing += 1
        server.compressing_began()

        def send(fut: asyncio.Future) -> None:
            self.compressing -= 1
            server.compressing_ended()
            if not (fut.cancelled() or self.closed):
                packed = None if fut.exception() is not None else fut.result()
                if packed is None:
                    self._send(call_id, status, data, 0)
                else:
                    self._send(call_id, status, packed, fr.F_COMPRESSED)
                if not self.backlogged:
                    server.unblock(self)
            server.settled()

        asyncio.get_running_loop().run_in_executor(server.executor, compression.compress, self.compression,
                                                   data).add_done_callback(send)

    def _send(self, call_id: int, status: int, data, flags: int) -> None:
        if status:
            self.server.counters["errors"] += 1
        header = fr.reply_header(call_id, status, len(data), flags)
        self.server.counters["bytes_out"] += len(header) + len(data)
        if len(data) < SMALL_WRITE:
            if self.batch is not None:
                self.batch.append(header + data)
                self.batch_bytes += len(header) + len(data)
                if self.batch_bytes >= SMALL_WRITE:   # (so that a client that reads nothing is noticed)
                    self._flush()
            else:
                self.transport.write(header + data)
        else:
            self._flush()
            self.transport.write(header)
            self.transport.write(memoryview(data))   # what is not sent at once is copied once, not twice

    def _flush(self) -> None:
        if self.batch:
            self.transport.write(b"".join(self.batch) if len(self.batch) > 1 else self.batch[0])
            self.batch.clear()
            self.batch_bytes = 0

    def reply_error(self, call_id: int, exc: BaseException) -> None:
        if isinstance(exc, ServiceNotUp):
            # the call never reached a worker (not posted, or withdrawn unclaimed as the service
            # stopped: when workers that serve TCP lose their manager, say): flagged so, it may go
            # to another endpoint
            self.reply_not_run(call_id, exc)
            return
        with_tb = not isinstance(exc, SpeedysvcError)
        self.reply(call_id, core.STATUS_ERROR, encode_exception(exc, with_tb))

    def reply_not_run(self, call_id: int, exc: BaseException) -> None:
        """An error reply to a call that was never started (the server is stopping, no channel
        is free): flagged so, if the client asked in its hello."""
        if not self.closed:
            self._send(call_id, core.STATUS_ERROR, encode_exception(exc, False),
                       fr.F_NOT_RUN if self.not_run else 0)

    def refuse(self, exc: BaseException, stopping: bool = False) -> None:
        """End a connection during the handshake, telling the client why (``stopping``: the
        server closes, so the client may connect again and reach one that stays)."""
        self.server.counters["refused"] += 1
        body = {"error": encode_exception(exc, False)}
        if stopping:
            body["stopping"] = True
        self._close_with(fr.pack_hello(fr.REFUSED, body))

    def go_away(self, exc: BaseException, not_run: bool = False) -> None:
        """End an established connection, telling the client why (``not_run``: and that none
        of its calls still without an answer was started, if it asked to know)."""
        self._close_with(fr.goaway(encode_exception(exc, False), fr.F_NOT_RUN if not_run and self.not_run else 0))

    def _close_with(self, last: bytes) -> None:
        if not self.closed:
            self.closed = True
            self.transport.write(last)
            self.transport.close()
            # a client that does not read would keep the socket and its unsent replies forever
            if self.paused_by_writes:
                self.transport.abort()
            else:
                asyncio.get_running_loop().call_later(CLOSE_GRACE, self.transport.abort)
        self.server.handshaking.pop(self, None)
        self.server.connections.discard(self)
        self.server.counts_changed()
        self.server.release(self)
