"""Serving a service to TCP clients: ``TcpServer`` accepts connections and hands
each call to the service's own worker pool over shared memory, so TCP and
shared-memory clients share one copy of the service's state.

One asyncio loop serves every connection (no thread per connection).  A call
is posted to a worker and answered inline when the worker replies within the
caller's short spin; a slower call is waited for in a small thread pool
(``max_waiting_threads``) while the loop goes on.  The wire format is in
``framing`` and docs/tcp-protocol.md.

``TcpServer`` follows each call from its frame to its reply; the rest has a
module each: the connection and its wire (``connection``), room for calls
(``admission``), answers left unread (``parking``), large compressed calls
(``inflate``) and the once-a-second sweep (``sweep``).  The service manager runs
one ``TcpServer`` per service with ``bind_tcp`` in its own loop; ``python -m
speedysvc.tcp.serve`` runs one on its own (LocalService uses that).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import resource
import time
from concurrent.futures import ThreadPoolExecutor

from .. import _shmcore as core
from .. import codecs
from ..errors import DecodeError, NoFreeChannel, NotAllowed, PayloadTooLarge, ServiceUnavailable
from ..shm import ShmTransport
from . import compression, sweep
from . import framing as fr
from .admission import Admission, SharedAdmission
from .connection import ServerConnection
from .inflate import InflateBudget, inflate_post_and_wait
from .options import ServeOptions
from .parking import Parking

log = logging.getLogger("speedysvc.tcp")

# (in a worker) how soon calls waiting for room held by the other workers look for it again
LOOK_AGAIN = 0.01
POST_AHEAD = 32               # calls of one read posted before their answers are collected


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

    def __init__(self, service: str, options: ServeOptions | None = None, *, local=None, reuse_port: bool = False,
                 **changes):
        """``options`` (default: ``ServeOptions()``), with ``changes`` to its fields.  In a worker
        (``inworker``): ``local`` runs a call in this process when the worker is idle, and
        ``reuse_port`` shares the port with the other workers' servers."""
        options = options or ServeOptions()
        self.options = opts = options.replace(**changes) if changes else options
        self.service = service
        self.host, self.port = opts.host, opts.port
        self.secret = fr.as_secret(opts.secret)
        self.ssl_context = opts.ssl_context()
        self.shm = ShmTransport(service)
        self.counters = {"connections_total": 0, "calls": 0, "errors": 0, "refused": 0, "unavailable": 0,
                         "handshakes_evicted": 0,
                         "auth_failures": 0, "protocol_errors": 0, "answered_inline": 0, "bytes_in": 0, "bytes_out": 0,
                         "replies_parked": 0, "inflated_in_threads": 0, "inflate_waits": 0}
        # (in a worker: max_inflight holds across the workers, each within a lease of it)
        self.admission = Admission(opts.max_inflight, opts.per_connection) if local is None else \
            SharedAdmission(opts.max_inflight, opts.per_connection, local.shared)
        self._look_again: asyncio.TimerHandle | None = None
        self.parking = Parking(self.counters)
        self.inflate = InflateBudget(opts.inflate_budget)
        self.compressing = 0   # replies being compressed in threads (``close`` waits for them too)
        # the usual call, in C: see ServerConnection.buffer_updated.  Codecs that are not known
        # here to be network-safe go the long way, which checks the client may use them.
        self.gateway = core.Gateway(self.shm, self.admission, self.counters, codecs.CODEC_SHIFT,
                                    ~codecs.mask(lambda codec: codec.network_safe) & (2 ** 64 - 1))
        self.local, self.reuse_port = local, reuse_port
        # (in a worker) this worker's TCP record, and the totals the limits are held to
        self.shared = local.shared if local is not None else None
        # (in a worker) the usual call run in this process, in C, or posted by ``gateway`` when
        # the worker is busy: the connections' short way (see ServerConnection.buffer_updated)
        self.local_way = None if local is None else core.LocalWay(
            local.region, local.dispatcher.handlers, self.gateway, self.admission, self.counters, local.finish,
            min(opts.max_payload, local.max_payload))
        self.executor: ThreadPoolExecutor | None = None
        self.connections: set[ServerConnection] = set()
        # those of them still in the handshake, oldest first (dict: ordered), not counted in max_connections
        self.handshaking: dict[ServerConnection, None] = {}
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()

    def __repr__(self) -> str:
        return f"<TcpServer {self.service!r} on {self.host}:{self.port}>"

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    async def start(self) -> "TcpServer":
        loop = asyncio.get_running_loop()
        raise_fd_limit()
        self.executor = ThreadPoolExecutor(self.options.max_waiting_threads, thread_name_prefix="speedysvc-tcp-wait")
        self._server = await loop.create_server(lambda: ServerConnection(self), self.host, self.port,
                                                ssl=self.ssl_context, reuse_address=True, backlog=1024,
                                                reuse_port=self.reuse_port or None,
                                                ssl_handshake_timeout=self.options.handshake_timeout
                                                if self.ssl_context else None)
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.call_later(sweep.INTERVAL, self._sweep)
        self._idle.set()
        self.counts_changed()
        log.info("%s: accepting TCP clients on %s:%d%s%s", self.service, self.host, self.port,
                 " with TLS" if self.ssl_context else "", " (secret required)" if self.secret else "")
        return self

    async def close(self, timeout: float = 10.0, reason: str = "the service is stopping") -> None:
        """Stop accepting; calls in flight get up to ``timeout`` seconds to finish,
        then every client is told why and disconnected."""
        if self._server is None:
            return
        self.admission.closing = True
        self._server.close()
        if self.shared is not None:
            self.shared.listening(False)
        for conn, frame in self.admission.withdraw():
            self.counters["unavailable"] += 1
            conn.reply_not_run(frame.call_id, ServiceUnavailable(f"service {self.service!r}: {reason}"))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%s: %d TCP call(s) still running after %s s", self.service, self.inflight, timeout)
        for conn in list(self.connections):
            exc = ServiceUnavailable(f"service {self.service!r}: {reason}")
            if conn.parser is None:   # still in its handshake: refused (a go-away frame is no hello message)
                conn.refuse(exc, stopping=True)
            else:   # with none of its calls under way, whatever it sent since was never started
                conn.go_away(exc, not_run=not conn.inflight and not conn.compressing)
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._look_again is not None:
            self._look_again.cancel()
        if self.shared is not None:
            self.admission.release()
        self._server = None
        self.counts_changed()
        self.shm.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def status(self) -> dict:
        return {"host": self.host, "port": self.port, "tls": self.ssl_context is not None,
                "secret": self.secret is not None, "connections": len(self.connections),
                "handshaking": len(self.handshaking),
                "inflight": self.inflight, "parked": self.parking.count, **self.counters}

    # -- connections, and in a worker their counts shared with the other workers ------------
    def clients(self) -> int:
        """Connections past the handshake, in every worker that serves this service's port."""
        if self.shared is not None and self.shared.off is not None:
            return self.shared.total(core.T_CLIENTS)
        return len(self.connections) - len(self.handshaking)

    def handshakes(self) -> int:
        """Connections in the handshake, in every worker that serves this service's port."""
        if self.shared is not None and self.shared.off is not None:
            return self.shared.total(core.T_HANDSHAKING)
        return len(self.handshaking)

    def become_client(self, conn: ServerConnection) -> bool:
        """``conn``, past its handshake, becomes a client if one more fits under
        ``max_connections``; False (it stays in the handshake, to be refused) if not.

        In a worker, the other workers admit clients at the same time.  A check of the sum
        and then a count would let two of them take the last place each; so this worker counts
        the client first (publishes its gauges with it), then reads the sum, and takes its count
        back when that passes the limit.  The loads and stores are sequentially consistent: of
        two workers taking the last place at once, the later one to count sees the other's
        count, so the sum of clients admitted never passes the limit (both may refuse then: a
        rare refusal one client short of the limit, never one too many)."""
        self.handshaking.pop(conn, None)
        self.counts_changed()
        if self.clients() <= self.options.max_connections:
            return True
        self.handshaking[conn] = None
        self.counts_changed()
        return False

    def counts_changed(self) -> None:
        """A connection came, went or changed its state, or a call began or ended: publish this
        worker's gauges (what the other workers' limits count)."""
        if self.shared is not None:
            self.shared.gauges(len(self.connections) - len(self.handshaking), len(self.handshaking),
                               self.admission.inflight)
            if self._server is not None and not self.admission.closing:
                self.shared.listening(True)

    # -- calls -----------------------------------------------------------------------------
    def submit(self, conn: ServerConnection, frame: fr.Frame) -> None:
        if self.local is not None and self._usual(conn, frame.flags, frame.arg):
            answer = self.local.run(frame.name, frame.arg, frame.payload)
            if answer is not None:
                self.counters["calls"] += 1
                self.counters["answered_inline"] += 1
                conn.reply(frame.call_id, *answer)
                return
        if self.admission.closing:
            # (calls the gateway itself refuses; those the service refuses its segment counts)
            self.counters["unavailable"] += 1
            conn.reply_not_run(frame.call_id, ServiceUnavailable(f"service {self.service!r} is stopping"))
            return
        if not self.admission.has_room(conn):
            self.admission.wait(conn, frame)
            self._room_elsewhere()
            return
        self._run(conn, frame)

    def _drain(self) -> None:
        """Run waiting calls while there is room, one connection after another."""
        while (waiting := self.admission.next()) is not None:
            conn, frame = waiting
            if not conn.closed and not self._run(conn, frame):
                break   # no channel free after all: wait for a call to finish
            if conn.eof:
                conn.close_when_answered()
        self._room_elsewhere()

    def _room_elsewhere(self) -> None:
        """(In a worker) calls wait for room the other workers' leases hold (see
        ``SharedAdmission``): no call of ours ending may tell us when it comes, so look again
        shortly."""
        if self.shared is None or self._look_again is not None or not self.admission.waiting \
                or not self.admission.short or self.admission.closing:
            return

        def again():
            self._look_again = None
            self._drain()

        self._look_again = asyncio.get_running_loop().call_later(LOOK_AGAIN, again)

    def _run(self, conn: ServerConnection, frame: fr.Frame) -> bool:
        """Start one call (answer it if it is quick); False if it went back to wait for room."""
        if conn.backlogged:   # the client leaves its replies unread: start nothing more of it
            conn.hold(frame)
            return True
        if not conn.may_decode(frame.arg):
            codec = codecs.codec_of(frame.arg)
            what = codec.name if codec is not None else \
                f"codec {frame.arg >> codecs.CODEC_SHIFT & 0xFF}, which this gateway does not know,"
            conn.reply_error(frame.call_id, NotAllowed(
                f"{frame.name.decode(errors='replace')}() uses {what} which this service does not accept over "
                f"TCP" + ("" if self.secret else " (it would need a secret and tcp_allow_pickle)")))
            return True
        payload = frame.payload
        if frame.flags & fr.F_COMPRESSED:
            if conn.compression is None:
                conn.reply_error(frame.call_id, DecodeError("a compressed payload, but the handshake chose "
                                                            "no compression"))
                return True
            try:
                size = compression.stated_size(payload, self.options.max_payload)
                if self.inflate.needs_thread(size, len(payload)):
                    return self._inflate(conn, frame, size)
                payload = compression.decompress(conn.compression, payload, self.options.max_payload)
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

    def _no_channel(self, conn: ServerConnection, frame: fr.Frame, exc: NoFreeChannel) -> bool:
        """No channel is free for a call: it waits for one of ours, if we hold any, else fails."""
        if self.inflight:
            self.admission.wait(conn, frame, first=True)
            return False
        conn.reply_not_run(frame.call_id, exc)
        return True

    def _inflate(self, conn: ServerConnection, frame: fr.Frame, size: int) -> bool:
        """A large compressed call: inflated and posted in a thread (see ``inflate``), so that
        the loop (every other client) does not wait for it, within the inflate budget."""
        if not self.inflate.fits(size):
            self.counters["inflate_waits"] += 1
            self.admission.wait(conn, frame, first=True)
            return False
        try:
            channel = self.shm.reserve()   # (so that nothing is inflated for a call that cannot be posted)
        except NoFreeChannel as e:
            return self._no_channel(conn, frame, e)
        except Exception as e:
            conn.reply_error(frame.call_id, e)
            return True
        self.inflate.take(size)
        self.counters["inflated_in_threads"] += 1
        self._began(conn)
        loop = asyncio.get_running_loop()

        def budget_freed() -> None:   # the inflated call is in shared memory (or gone)
            self.inflate.free(size)
            self._drain()

        def in_shared_memory() -> None:   # (in the thread)
            try:
                loop.call_soon_threadsafe(budget_freed)
            except RuntimeError:   # (the loop is closed: the server is gone)
                pass

        def posted(fut: asyncio.Future) -> None:
            if fut.cancelled():   # never ran (the server is closing)
                self.inflate.free(size)
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

        loop.run_in_executor(self.executor, inflate_post_and_wait, self.shm, channel, frame, conn.compression,
                             self.options.max_payload, _seconds(frame.timeout_ms), in_shared_memory,
                             PASSTHROUGH).add_done_callback(posted)
        return True

    def submit_all(self, conn: ServerConnection, frames: list) -> None:
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
            self.admission.trim()

    def _collect(self, conn: ServerConnection, posted: list) -> None:
        """Answer (or wait in a thread for) the calls ``submit_all`` posted; empties ``posted``."""
        while posted:
            call_id, p = posted.pop(0)
            try:
                done, result = self.shm.collect(p, PASSTHROUGH)
            except Exception as e:
                conn.reply_error(call_id, e)
                continue
            self._started(conn, call_id, done, result)

    def _usual(self, conn: ServerConnection, flags: int, arg: int, posted: int = 0) -> bool:
        """Whether a call of several read together can be posted at once (``submit_all``): not
        compressed, a codec the client may use, room for it beside ``posted`` others, and its
        connection reads its replies.  ``submit`` takes every other."""
        return (not flags and not self.admission.closing and self.admission.has_room(conn, posted)
                and not conn.backlogged and conn.may_decode(arg))

    def go_on(self, conn: ServerConnection, nbytes: int, posted: tuple) -> None:
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

    # -- a call in flight ------------------------------------------------------------------
    def _started(self, conn: ServerConnection, call_id: int, done: bool, result) -> None:
        """A call was posted: answer it now, or wait for its answer in a thread."""
        self.counters["calls"] += 1
        if done:
            self.counters["answered_inline"] += 1
            conn.reply(call_id, *result)
            if self.shared is not None:
                self.admission.trim()
            return
        self._began(conn)
        waiting = self.executor.submit(result.wait)
        conn.waits[waiting] = result   # (withdrawn if the connection goes first: see ``release``)
        asyncio.wrap_future(waiting).add_done_callback(functools.partial(self._finished, conn, call_id, result,
                                                                         waiting))

    def _began(self, conn: ServerConnection) -> None:
        self.admission.began(conn)
        self._idle.clear()
        if self.shared is not None:
            self.counts_changed()

    def _ended(self, conn: ServerConnection) -> None:
        self.admission.ended(conn)
        if self.shared is not None:
            self.counts_changed()
        if conn.eof:
            conn.close_when_answered()
        self.settled()

    def settled(self) -> None:
        """A call in flight ended (or a reply was compressed): room for a waiting one."""
        self._drain()
        # (``close`` does not wait for clients to read their parked answers)
        if self.inflight == self.parking.count and not self.compressing:
            self._idle.set()

    def _finished(self, conn: ServerConnection, call_id: int, pending, waiting, fut: asyncio.Future) -> None:
        """The answer to a call waited for in a thread is in its channel (or the call failed)."""
        conn.waits.pop(waiting, None)
        if fut.cancelled():
            pending.abandon()   # never ran (the server is closing): the channel is not lost
        if not self._call_failed(conn, call_id, fut):
            self._answered(conn, call_id, pending)

    def _call_failed(self, conn: ServerConnection, call_id: int, fut: asyncio.Future) -> bool:
        """Whether the thread that ran for a call in flight failed (or never ran): if so the
        call ends with an error reply."""
        if fut.cancelled():
            self.counters["unavailable"] += 1
            error = ServiceUnavailable(f"service {self.service!r} is stopping")
        elif fut.exception() is not None:
            error = fut.exception()
        else:
            return False
        conn.reply_error(call_id, error)
        self._ended(conn)
        return True

    def _answered(self, conn: ServerConnection, call_id: int, pending) -> None:
        """A call in flight was answered (``pending`` waited for): send the answer, or park it."""
        if conn.closed:
            pending.abandon()   # (nobody to send it to: not even copied out)
            self._ended(conn)
        elif pending.size and conn.backlogged:
            self.parking.park(conn, call_id, pending)
            self.settled()
        else:
            self._deliver(conn, call_id, pending)

    def _deliver(self, conn: ServerConnection, call_id: int, pending) -> None:
        """Copy a waited-for answer out of shared memory and send it."""
        try:
            result = pending.take()
        except Exception as e:
            conn.reply_error(call_id, e)
        else:
            conn.reply(call_id, *result)
        self._ended(conn)

    # -- a connection's backlog ------------------------------------------------------------
    def unblock(self, conn: ServerConnection) -> None:
        """The client reads its replies again: send the parked ones and start the calls held
        back, as long as it keeps up; then read it again."""
        while (parked := self.parking.next(conn)) is not None:
            self._deliver(conn, *parked)
        while conn.held and not conn.backlogged and not conn.closed:
            self.submit(conn, conn.held.popleft())
        if conn.eof:
            conn.close_when_answered()
        conn.resume()

    def release(self, conn: ServerConnection) -> None:
        """A connection ended: its parked answers will never be sent, its held and waiting calls
        never run, and its calls in flight that no worker has claimed yet are withdrawn (nobody
        will read their answers: they would only hold the workers up)."""
        conn.held.clear()
        if self.admission.waiting.pop(conn, None) is not None:
            conn.paused_by_server = False
        for waiting, pending in list(conn.waits.items()):
            if not waiting.cancel():   # a thread waits for it already: it gives the call up at once
                pending.cancel()
            # (else ``_finished`` abandons it, which takes it back unless a worker claimed it)
        for pending in self.parking.drop(conn):
            self.admission.ended(conn)
            pending.abandon()
        self.settled()

    def compressing_began(self) -> None:
        self.compressing += 1
        self._idle.clear()

    def compressing_ended(self) -> None:
        self.compressing -= 1

    # -- housekeeping ----------------------------------------------------------------------
    def _sweep(self) -> None:
        try:
            if self.shared is not None:
                self.shared.publish(self.counters)
            sweep.sweep(self, time.monotonic())
        except Exception:   # (the next sweep must come all the same: every deadline depends on it)
            log.exception("%s: the TCP gateway's sweep failed", self.service)
        finally:
            self._sweeper = asyncio.get_running_loop().call_later(sweep.INTERVAL, self._sweep)
