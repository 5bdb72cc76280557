"""Serving a service to TCP clients: ``TcpServer`` accepts connections and hands
each call to the service's own worker pool over shared memory, so TCP and
shared-memory clients share one copy of the service's state.

One asyncio loop serves every connection (no thread per connection).  A call
is posted to a worker and answered inline when the worker replies within the
caller's short spin; a slower call is waited for in a small thread pool
(``max_waiting_threads``) while the loop goes on.  The wire format is in
``framing`` and docs/tcp-protocol.md.

The service manager runs one ``TcpServer`` per service with ``bind_tcp`` in its
own loop; ``python -m speedysvc.tcp.serve`` runs one on its own (LocalService
uses that).
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import resource
import socket
import ssl
import struct
import time
from concurrent.futures import ThreadPoolExecutor

from .. import _shmcore as core
from .. import codecs
from ..errors import (AuthenticationFailed, DecodeError, NoFreeChannel, NotAllowed, PayloadTooLarge, ProtocolError,
                      ServiceUnavailable, SpeedysvcError, encode_exception)
from ..shm import DEFAULT_MAX_PAYLOAD, ShmTransport
from ..transport import is_loopback
from . import compression
from . import framing as fr

log = logging.getLogger("speedysvc.tcp")

SECRET_ENV = "SPEEDYSVC_TCP_SECRET"
SMALL_WRITE = 64 << 10        # below this, header and payload go out in one write
LARGE_PAYLOAD = 1 << 20       # (de)compressing this much or more is done in a thread, not on the loop
# ...and inflating a call that states more than INFLATE_RATIO times the bytes it came in (above
# SMALL_WRITE): the loop never spends on a call much more than on the bytes a client sent
INFLATE_RATIO = 32
POST_AHEAD = 32               # calls of one read posted before their answers are collected
CLOSE_GRACE = 5.0             # seconds a closed connection gets to flush its last bytes
TCP_INFO_SIZE, TCPI_BYTES_ACKED = 136, 120   # Linux's struct tcp_info: its size, tcpi_bytes_acked (u64)


class Passthrough(codecs.Codec):
    """A codec (never registered) that leaves the worker's answer as it is: (status, bytes)."""
    name = "passthrough"

    @staticmethod
    def loads_fast(data):
        return core.STATUS_OK, bytes(data)

    loads = loads_fast

    @staticmethod
    def remote_error(data):
        return core.STATUS_ERROR, bytes(data)


PASSTHROUGH = Passthrough()


def _seconds(timeout_ms: int) -> float | None:
    """A frame's timeout field (milliseconds, 0: none) in seconds."""
    return timeout_ms / 1000 if timeout_ms else None


def raise_fd_limit() -> int:
    """Thousands of connections need thousands of descriptors: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class TcpServer:
    """Accepts TCP clients of one service (``service``: its shared-memory name)."""

    def __init__(self, service: str, host: str, port: int, *, secret=None, ssl_context: ssl.SSLContext | None = None,
                 allow_pickle: bool = False, max_payload: int = DEFAULT_MAX_PAYLOAD, max_connections: int = 10000,
                 max_inflight: int = 256, handshake_timeout: float = 10.0, stall_timeout: float = 30.0,
                 max_waiting_threads: int = 64, inflate_budget: int = 256 << 20, max_inflight_per_connection=None):
        self.service = service
        self.host, self.port = host, port
        self.secret = fr.as_secret(secret)
        if self.secret is None and not is_loopback(host):
            raise ValueError(f"a TCP service bound to {host} (not loopback) needs a shared secret "
                             f"(tcp_secret in service.ini, or the {SECRET_ENV} environment variable)")
        if allow_pickle and self.secret is None:
            raise ValueError("pickle over TCP is only allowed to authenticated clients: set a secret too")
        self.ssl_context = ssl_context
        self.allow_pickle = allow_pickle
        self.max_payload = max_payload
        self.max_connections = max_connections
        self.max_inflight = max_inflight
        # one connection's share: answers its client leaves unread keep their channels, and
        # one client that sends slow calls or reads nothing must leave room for the others
        self.max_inflight_per_connection = max_inflight_per_connection or max(1, max_inflight // 4)
        self.handshake_timeout = handshake_timeout
        self.stall_timeout = stall_timeout
        self.max_waiting_threads = max_waiting_threads
        # large compressed calls are inflated in threads, while the sizes they state sum to at
        # most this (one is always allowed): the rest wait, their connections not read
        self.inflate_budget = inflate_budget
        self.inflating = 0
        self.parked = 0   # calls in flight whose answers wait for their clients to read (Connection.parked)
        self.compressing = 0   # replies being compressed in threads (``close`` waits for them too)
        self.shm = ShmTransport(service)
        self.counters = {"connections_total": 0, "calls": 0, "errors": 0, "refused": 0,
                         "auth_failures": 0, "protocol_errors": 0, "answered_inline": 0, "bytes_in": 0, "bytes_out": 0,
                         "replies_parked": 0, "inflate_waits": 0}
        # the usual call, in C: see ServerConnection.buffer_updated
        # (codecs that are not network-safe go the long way, which checks the client may use them)
        self.gateway = core.Gateway(self.shm, self, self.counters, codecs.CODEC_SHIFT,
                                    codecs.mask(lambda codec: not codec.network_safe))
        self.executor: ThreadPoolExecutor | None = None
        self.connections: set[ServerConnection] = set()
        self.closing = False
        self.inflight = 0
        # calls waiting for room (max_inflight), per connection, served round-robin
        self._waiting: collections.OrderedDict[ServerConnection, collections.deque] = collections.OrderedDict()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()

    def __repr__(self) -> str:
        return f"<TcpServer {self.service!r} on {self.host}:{self.port}>"

    async def start(self) -> "TcpServer":
        loop = asyncio.get_running_loop()
        raise_fd_limit()
        self.executor = ThreadPoolExecutor(self.max_waiting_threads, thread_name_prefix="speedysvc-tcp-wait")
        self._server = await loop.create_server(lambda: ServerConnection(self), self.host, self.port,
                                                ssl=self.ssl_context, reuse_address=True, backlog=1024,
                                                ssl_handshake_timeout=self.handshake_timeout
                                                if self.ssl_context else None)
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.call_later(1.0, self._sweep)
        self._idle.set()
        log.info("%s: accepting TCP clients on %s:%d%s%s", self.service, self.host, self.port,
                 " with TLS" if self.ssl_context else "", " (secret required)" if self.secret else "")
        return self

    async def close(self, timeout: float = 10.0, reason: str = "the service is stopping") -> None:
        """Stop accepting; calls in flight get up to ``timeout`` seconds to finish,
        then every client is told why and disconnected."""
        if self._server is None:
            return
        self.closing = True
        self._server.close()
        for conn, frames in self._waiting.items():
            for frame in frames:
                conn.reply_error(frame.call_id, ServiceUnavailable(f"service {self.service!r}: {reason}"))
        self._waiting.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%s: %d TCP call(s) still running after %s s", self.service, self.inflight, timeout)
        for conn in list(self.connections):
            conn.go_away(ServiceUnavailable(f"service {self.service!r}: {reason}"))
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._server = None
        self.shm.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def status(self) -> dict:
        return {"host": self.host, "port": self.port, "tls": self.ssl_context is not None,
                "secret": self.secret is not None, "connections": len(self.connections),
                "inflight": self.inflight, "parked": self.parked, **self.counters}

    # -- calls -----------------------------------------------------------------------------
    def submit(self, conn: "ServerConnection", frame: fr.Frame) -> None:
        if self.closing:
            conn.reply_error(frame.call_id, ServiceUnavailable(f"service {self.service!r} is stopping"))
            return
        if self.inflight >= self.max_inflight or conn in self._waiting \
                or conn.inflight >= self.max_inflight_per_connection:
            self._wait(conn, frame)
            return
        self._run(conn, frame)

    def _wait(self, conn: "ServerConnection", frame: fr.Frame, first: bool = False) -> None:
        """No room for the call now: it waits, and its connection is not read meanwhile."""
        frames = self._waiting.get(conn)
        if frames is None:
            frames = self._waiting[conn] = collections.deque()
        frames.appendleft(frame) if first else frames.append(frame)
        if not conn.paused_by_server:
            conn.paused_by_server = True
            conn.transport.pause_reading()   # that client waits; the others go on

    def _drain(self) -> None:
        """Run waiting calls while there is room, one connection after another."""
        share = self.max_inflight_per_connection
        while self._waiting and self.inflight < self.max_inflight:
            for conn, frames in self._waiting.items():
                if conn.inflight < share:
                    break
            else:
                return   # every connection waiting has its share in flight
            frame = frames.popleft()
            if frames:
                self._waiting.move_to_end(conn)
            else:
                del self._waiting[conn]
                conn.paused_by_server = False
                conn.resume()
            if not conn.closed and not self._run(conn, frame):
                break   # no channel free after all: wait for a call to finish

    def _run(self, conn: "ServerConnection", frame: fr.Frame) -> bool:
        """Start one call (answer it if it is quick); False if it went back to wait for room."""
        if conn.backlogged:   # the client leaves its replies unread: start nothing more of it
            conn.hold(frame)
            return True
        if not conn.may_decode(frame.arg):
            conn.reply_error(frame.call_id, NotAllowed(
                f"{frame.name.decode(errors='replace')}() uses {codecs.codec_of(frame.arg).name}, which this "
                f"service does not accept over TCP"
                + ("" if self.secret else " (it would need a secret and tcp_allow_pickle)")))
            return True
        payload = frame.payload
        if frame.flags & fr.F_COMPRESSED:
            if conn.compression is None:
                conn.reply_error(frame.call_id, DecodeError("a compressed payload, but the handshake chose "
                                                            "no compression"))
                return True
            try:
                size = compression.stated_size(payload, self.max_payload)
                if size >= LARGE_PAYLOAD or size > SMALL_WRITE and size > INFLATE_RATIO * len(payload):
                    return self._inflate(conn, frame, size)
                payload = compression.decompress(conn.compression, payload, self.max_payload)
            except (DecodeError, PayloadTooLarge) as e:
                conn.reply_error(frame.call_id, e)
                return True
        timeout = _seconds(frame.timeout_ms)
        try:
            done, result = self.shm.begin(frame.name, payload, frame.arg, PASSTHROUGH, timeout)
        except NoFreeChannel as e:
            if frame.flags & fr.F_COMPRESSED:   # (if it waits, it is not inflated twice)
                frame.payload, frame.flags = payload, frame.flags & ~fr.F_COMPRESSED
            return self._no_channel(conn, frame, e)
        except Exception as e:
            conn.reply_error(frame.call_id, e)
            return True
        self._started(conn, frame.call_id, done, result)
        return True

    def _no_channel(self, conn: "ServerConnection", frame: fr.Frame, exc: NoFreeChannel) -> bool:
        """No channel is free for a call: it waits for one of ours, if we hold any, else fails."""
        if self.inflight:
            self._wait(conn, frame, first=True)
            return False
        conn.reply_error(frame.call_id, exc)
        return True

    def _inflate(self, conn: "ServerConnection", frame: fr.Frame, size: int) -> bool:
        """A large compressed call: inflated and posted in a thread, so that the loop (every
        other client) does not wait for it, within ``inflate_budget`` bytes at once."""
        if self.inflating and self.inflating + size > self.inflate_budget:
            self.counters["inflate_waits"] += 1
            self._wait(conn, frame, first=True)
            return False
        try:
            channel = self.shm.reserve()   # (so that nothing is inflated for a call that cannot be posted)
        except NoFreeChannel as e:
            return self._no_channel(conn, frame, e)
        except Exception as e:
            conn.reply_error(frame.call_id, e)
            return True
        self.inflating += size
        self._began(conn)
        algo, limit, timeout = conn.compression, self.max_payload, _seconds(frame.timeout_ms)
        loop = asyncio.get_running_loop()

        def budget_freed() -> None:   # the inflated call is in shared memory (or gone)
            self.inflating -= size
            self._drain()

        def inflate_post_and_wait():
            try:
                try:
                    payload = compression.decompress(algo, frame.payload, limit, lazy=True)
                except BaseException:
                    self.shm.unreserve(channel)
                    raise
                done, result = self.shm.begin(frame.name, payload, frame.arg, PASSTHROUGH, timeout, channel)
                del payload
            finally:
                try:
                    loop.call_soon_threadsafe(budget_freed)
                except RuntimeError:   # (the loop is closed: the server is gone)
                    pass
            if not done:
                result.wait()
            return done, result

        def posted(fut: asyncio.Future) -> None:
            if fut.cancelled():   # never ran (the server is closing)
                self.inflating -= size
                self.shm.unreserve(channel)
            if self._call_failed(conn, frame.call_id, fut):
                return
            self.counters["calls"] += 1
            done, result = fut.result()
            if not done:
                self._answered(conn, frame.call_id, result)
                return
            conn.reply(frame.call_id, *result)
            self._ended(conn)

        loop.run_in_executor(self.executor, inflate_post_and_wait).add_done_callback(posted)
        return True

    def submit_all(self, conn: "ServerConnection", frames: list) -> None:
        """The calls of one read: the usual ones are all posted first and their answers
        collected after, so that workers run them while the rest are being posted (and a
        worker that shares this process's CPU runs them one after another instead of
        taking turns with it call by call).  A call that is not usual goes through
        ``submit``, after the answers to those posted before it are in."""
        posted = []
        try:
            for frame in frames:
                if len(posted) >= POST_AHEAD:   # (then a client that reads nothing gets no more started)
                    self._collect(conn, posted)
                if not self._usual(conn, frame.flags, frame.arg, len(posted)):
                    self._collect(conn, posted)
                    self.submit(conn, frame)
                    continue
                try:
                    posted.append((frame.call_id, self.shm.post(frame.name, frame.payload, frame.arg,
                                                                _seconds(frame.timeout_ms))))
                except NoFreeChannel:   # the posted ones hold channels: collect them, then the usual way
                    self._collect(conn, posted)
                    self.submit(conn, frame)
                except Exception as e:
                    conn.reply_error(frame.call_id, e)
        finally:
            self._collect(conn, posted)

    def _collect(self, conn: "ServerConnection", posted: list) -> None:
        """Answer (or wait in a thread for) the calls ``submit_all`` posted; empties ``posted``."""
        while posted:
            call_id, p = posted.pop(0)
            try:
                done, result = self.shm.collect(p, PASSTHROUGH)
            except Exception as e:
                conn.reply_error(call_id, e)
                continue
            self._started(conn, call_id, done, result)

    def _usual(self, conn: "ServerConnection", flags: int, arg: int, posted: int = 0) -> bool:
        """Whether a call of several read together can be posted at once (``submit_all``): not
        compressed, not pickle, room for it beside ``posted`` others, and its connection
        has no calls waiting for room (they go first) and reads its replies.  ``submit`` takes every other."""
        return not (flags or self.closing or self.inflight + posted >= self.max_inflight or conn in self._waiting
                    or conn.inflight + posted >= self.max_inflight_per_connection
                    or conn.backlogged or not conn.may_decode(arg))

    def _started(self, conn: "ServerConnection", call_id: int, done: bool, result) -> None:
        """A call was posted: answer it now, or wait for its answer in a thread."""
        self.counters["calls"] += 1
        if done:
            self.counters["answered_inline"] += 1
            conn.reply(call_id, *result)
            return
        self._began(conn)
        fut = asyncio.get_running_loop().run_in_executor(self.executor, result.wait)
        fut.add_done_callback(functools.partial(self._finished, conn, call_id, result))

    def _began(self, conn: "ServerConnection") -> None:
        self.inflight += 1
        conn.inflight += 1
        self._idle.clear()

    def _ended(self, conn: "ServerConnection") -> None:
        self.inflight -= 1
        conn.inflight -= 1
        self._settled()

    def _settled(self) -> None:
        """A call in flight ended: room for a waiting one."""
        self._drain()
        if self.inflight == self.parked and not self.compressing:   # (``close`` does not wait for clients to read)
            self._idle.set()

    def go_on(self, conn: "ServerConnection", nbytes: int, posted: tuple) -> None:
        """The rest of a call that ``gateway`` (the short way, in C: see ``ServerConnection.buffer_updated``)
        posted but did not see answered at once: ``posted`` is (channels, channel, outcome)."""
        chans, ch, got = posted
        _, _, call_id, arg, timeout_ms, name, payload = conn.parser.whole_frame(nbytes)
        try:
            done, result = self.shm.resume_begin(chans, ch, got, name, payload, arg, PASSTHROUGH, _seconds(timeout_ms))
        except Exception as e:
            conn.reply_error(call_id, e)
            return
        self._started(conn, call_id, done, result)

    def _finished(self, conn: "ServerConnection", call_id: int, pending, fut: asyncio.Future) -> None:
        """The answer to a call waited for in a thread is in its channel (or the call failed)."""
        if fut.cancelled():
            pending.abandon()   # never ran (the server is closing): the channel is not lost
        if not self._call_failed(conn, call_id, fut):
            self._answered(conn, call_id, pending)

    def _call_failed(self, conn: "ServerConnection", call_id: int, fut: asyncio.Future) -> bool:
        """Whether the thread that ran for a call in flight failed (or never ran): if so the
        call ends with an error reply."""
        if fut.cancelled():
            error = ServiceUnavailable(f"service {self.service!r} is stopping")
        elif fut.exception() is not None:
            error = fut.exception()
        else:
            return False
        conn.reply_error(call_id, error)
        self._ended(conn)
        return True

    def _answered(self, conn: "ServerConnection", call_id: int, pending) -> None:
        """A call in flight was answered (``pending`` waited for): send the answer, or park it."""
        if conn.closed:
            pending.abandon()   # (nobody to send it to: not even copied out)
        elif pending.size and conn.backlogged:
            self._park(conn, call_id, pending)
            return
        else:
            self._deliver(conn, call_id, pending)
            return
        self._ended(conn)

    def _park(self, conn: "ServerConnection", call_id: int, pending) -> None:
        """The client has not read the replies before this one: the answer stays in shared
        memory, holding its channel, until it does (``unblock``), so that a client that reads
        nothing pins no more of the gateway's memory than one reply.  It still counts as a call
        in flight (its channel is taken): see ``_sweep`` for clients that read nothing while
        others' calls wait for room."""
        conn.parked.append((call_id, pending))
        self.parked += 1
        self.counters["replies_parked"] += 1
        self._settled()

    def _deliver(self, conn: "ServerConnection", call_id: int, pending, parked: bool = False) -> None:
        """Copy a waited-for answer out of shared memory and send it."""
        if parked:
            self.parked -= 1
        try:
            result = pending.take()
        except Exception as e:
            conn.reply_error(call_id, e)
        else:
            conn.reply(call_id, *result)
        self._ended(conn)

    def unblock(self, conn: "ServerConnection") -> None:
        """The client reads its replies again: send the parked ones and start the calls held
        back, as long as it keeps up; then read it again."""
        while conn.parked and not conn.backlogged and not conn.closed:
            self._deliver(conn, *conn.parked.popleft(), parked=True)
        while conn.held and not conn.backlogged and not conn.closed:
            self.submit(conn, conn.held.popleft())
        conn.resume()

    def release(self, conn: "ServerConnection") -> None:
        """A connection ended: its parked answers will never be sent, its held calls never run."""
        conn.held.clear()
        while conn.parked:
            _, pending = conn.parked.popleft()
            self.parked -= 1
            self.inflight -= 1
            conn.inflight -= 1
            pending.abandon()
        self._settled()

    # -- housekeeping ----------------------------------------------------------------------
    def _sweep(self) -> None:
        """Once a second: drop clients that stall a handshake or a frame (slow-loris), or that
        read none of their replies: for ``stall_timeout``, or for a second while their unread
        answers hold room that other clients' calls wait for."""
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.parser is None and now - conn.opened > self.handshake_timeout:
                conn.refuse(ProtocolError(f"handshake not completed within {self.handshake_timeout} s"))
            elif (conn.parser is not None and conn.parser.mid_frame and not conn.paused
                  and now - conn.last_progress > self.stall_timeout):
                # (a connection we do not read is not stalling)
                conn.go_away(ProtocolError(f"no progress within a frame for {self.stall_timeout} s"))
                self.counters["protocol_errors"] += 1
            elif conn.paused_by_writes and not conn.closed:
                if conn.reads_replies():
                    conn.write_progress = now
                elif now - conn.write_progress > self.stall_timeout:
                    # it reads none of its replies: they hold channels and memory
                    log.warning("%s: TCP client %s read none of its replies for %s s; disconnected",
                                self.service, conn.peer, self.stall_timeout)
                    conn.go_away(ProtocolError(f"replies left unread for {self.stall_timeout} s"))
                    self.counters["protocol_errors"] += 1
                elif (conn.parked and now - conn.write_progress >= min(1.0, self.stall_timeout)
                      and any(c is not conn for c in self._waiting)):
                    log.warning("%s: TCP client %s left %d answers unread while other clients' calls waited; "
                                "disconnected", self.service, conn.peer, len(conn.parked))
                    conn.go_away(ProtocolError(f"{len(conn.parked)} answers left unread while other clients' "
                                               f"calls waited for room"))
                    self.counters["protocol_errors"] += 1
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)


class ServerConnection(asyncio.BufferedProtocol):
    """One TCP client: the handshake, then its frames."""

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
        self.inflight = 0
        self.closed = False
        self.paused_by_server = False
        self.paused_by_writes = False
        self.unsent, self.acked, self.write_progress = 0, 0, 0.0   # see reads_replies
        self.compressing = 0                        # replies being compressed in a thread
        self.parked: collections.deque = collections.deque()   # (call id, waited-for answer) not yet sent
        self.held: collections.deque = collections.deque()     # calls not started: replies unread
        self.batch: list | None = None
        self.batch_bytes = 0
        self.short_way = None   # the server's gateway, once the handshake chose no compression
        self.share = server.max_inflight_per_connection

    def may_decode(self, flags: int) -> bool:
        """Whether a call whose request ``flags`` name its codec may go to a worker: one that is
        not network-safe (pickle) only from an authenticated client of a service that allows
        it.  (A codec unknown here may: the worker answers it with a clear error.)"""
        codec = codecs.codec_of(flags)
        return codec is None or codec.network_safe or (self.server.allow_pickle and self.authenticated)

    # -- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        server = self.server
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        server.counters["connections_total"] += 1
        if len(server.connections) >= server.max_connections:
            self.refuse(ServiceUnavailable(f"service {server.service!r} has too many TCP clients "
                                           f"({server.max_connections}); try again later"))
            return
        server.connections.add(self)
        transport.write(fr.pack_hello(fr.SERVER_HELLO, {
            "versions": list(fr.SUPPORTED_VERSIONS), "service": server.service,
            "compression": compression.available(), "auth": server.secret is not None,
            "nonce": self.nonce, "max_payload": server.max_payload}))

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.release(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.parser is not None:
            return self.parser.get_buffer()
        return memoryview(self.hello_buf)

    def buffer_updated(self, nbytes: int) -> None:
        # Usually the bytes that came are one whole call, uncompressed, not pickle, with room
        # for it: the short way.  A small call crosses the gateway twice per round trip and
        # each layer of Python costs there (on a small VM, most of the gateway's share of the
        # call), so ``core.Gateway`` checks the frame, takes a channel, posts the call straight
        # from the read buffer, spins briefly and builds the reply frame, all in C.  It
        # returns None with nothing done for any other case (the parser takes it), or what a
        # call posted but not answered at once needs to go on.
        short_way = self.short_way
        if short_way is not None and not self.closed and self.inflight < self.share:
            posted = short_way(self.parser, nbytes)
            if posted.__class__ is bytes:
                self.transport.write(posted)
                return
            if posted is not None:
                self.server.go_on(self, nbytes, posted)
                return
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
        return False   # close our side too; replies still in flight are dropped

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
        if not (self.closed or self.paused):
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
        self.compression, self.compress_min = algo, compress_min
        self.parser = fr.FrameParser(server.max_payload, frozenset((fr.CALL,)))
        if algo is None:   # (replies of a compressing connection may need compressing)
            self.short_way = server.gateway
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
        server.compressing += 1
        server._idle.clear()

        def send(fut: asyncio.Future) -> None:
            self.compressing -= 1
            server.compressing -= 1
            if not (fut.cancelled() or self.closed):
                packed = None if fut.exception() is not None else fut.result()
                if packed is None:
                    self._send(call_id, status, data, 0)
                else:
                    self._send(call_id, status, packed, fr.F_COMPRESSED)
                if not self.backlogged:
                    server.unblock(self)
            server._settled()

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
        with_tb = not isinstance(exc, SpeedysvcError)
        self.reply(call_id, core.STATUS_ERROR, encode_exception(exc, with_tb))

    def refuse(self, exc: BaseException) -> None:
        """End a connection during the handshake, telling the client why."""
        self.server.counters["refused"] += 1
        self._close_with(fr.pack_hello(fr.REFUSED, {"error": encode_exception(exc, False)}))

    def go_away(self, exc: BaseException) -> None:
        """End an established connection, telling the client why."""
        self._close_with(fr.goaway(encode_exception(exc, False)))

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
        self.server.connections.discard(self)
        self.server.release(self)


def make_ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key or None)
    return ctx
