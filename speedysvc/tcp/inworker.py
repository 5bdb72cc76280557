"""TCP served by the workers themselves: a call crosses two processes (client, worker),
not three (client, gateway, worker).

Each worker of a service that binds TCP runs one more thread with an event loop of its
own and a ``TcpServer`` bound with SO_REUSEPORT on the service's address (the
supervisor holds the port: see ``reserve_port``), so the kernel spreads connections
over the workers.  A call runs in the worker's own process when the worker is idle
(``InProcess``); when it is busy the call is posted over shared memory to the pool, as
the gateway does, so that one connection's pipelined calls still spread over every
worker.  One call at a time per process holds through the worker entry's phase word
(W_PHASE, docs/shm-protocol.md): the TCP thread takes it with a CAS or posts
elsewhere, and the shared-memory loop neither claims a call while a TCP call runs here
nor keeps a wake-up meant for a worker that could run it.
"""
from __future__ import annotations

import asyncio
import logging
import mmap
import socket
import threading

from ..errors import EncodeError, PayloadTooLarge, encode_exception
from .. import _shmcore as core
from .._shmcore import STATUS_ERROR

log = logging.getLogger("speedysvc.tcp")


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT that never listens: it holds the port
    for the service's life (port 0 resolves once; nobody else takes it while workers come and
    go) and receives no connection (the kernel gives those to listening sockets only)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class SharedCounts:
    """This worker's TCP record in the service segment (layout.h, T_*): its gauges kept
    current, its counters added once a second (and as it stops); and the totals over every
    worker, which the limits (max_connections, max_handshakes) are held to."""

    def __init__(self, segment):
        self.segment, self.region = segment, segment.region
        self.off: int | None = None   # this worker's record, once it has an entry
        self.published = {}

    def registered(self, index: int) -> None:
        self.off = self.segment.tcp_offset(index)

    def gauges(self, clients: int, handshaking: int, inflight: int) -> None:
        if self.off is not None:
            r, off = self.region, self.off
            r.store64(off + core.T_CLIENTS, clients)
            r.store64(off + core.T_HANDSHAKING, handshaking)
            r.store64(off + core.T_INFLIGHT, inflight)

    def listening(self, on: bool) -> None:
        if self.off is not None:
            self.region.store32(self.off + core.T_LISTENING, int(on))

    def publish(self, counters: dict) -> None:
        """Add what ``counters`` (the server's) counted since the last time."""
        if self.off is None:
            return
        for name in self.segment.TCP_COUNTERS:
            value = counters.get(name, 0)
            delta = value - self.published.get(name, 0)
            if delta:
                self.region.add64(self.off + getattr(core, "T_" + name.upper()), delta)
                self.published[name] = value

    def lease(self, value: int) -> None:
        """This worker's share of max_inflight (``admission.SharedAdmission``)."""
        if self.off is not None:
            self.region.store64(self.off + core.T_LEASE, value)

    def leased(self) -> int:
        return self.total(core.T_LEASE)

    def short(self, on: bool) -> None:
        """Whether calls of this worker wait for room the other workers' leases hold."""
        if self.off is not None:
            self.region.store32(self.off + core.T_SHORT, int(on))

    def others_short(self) -> bool:
        """Whether calls of another worker wait for room (this worker's leases may hold it)."""
        r, base = self.region, self.region.load32(core.H_TCP_OFF) + core.T_SHORT
        return any(r.load32(base + i * core.T_SIZE) for i in range(core.MAX_WORKERS)
                   if base + i * core.T_SIZE != self.off + core.T_SHORT)

    def total(self, field: int) -> int:
        """A gauge summed over the worker entries (this worker's share included)."""
        r, base = self.region, self.region.load32(core.H_TCP_OFF) + field
        return sum(r.load64(base + i * core.T_SIZE) for i in range(core.MAX_WORKERS))


class InProcess:
    """Runs a TCP call in this worker's process, if the worker is idle (else ``run`` says no)."""

    def __init__(self, segment, dispatcher, max_payload: int):
        self.region, self.dispatcher, self.max_payload = segment.region, dispatcher, max_payload
        self.shared = SharedCounts(segment)
        self.index: int | None = None   # the worker's entry, once registered (until then: post)
        self.phase_offset = 0

    def registered(self, index: int) -> None:
        self.phase_offset = core.H_WORKERS + index * core.W_SIZE + core.W_PHASE
        self.shared.registered(index)
        self.index = index

    def idle(self) -> bool:
        """Whether a call would likely run here now (a peek: ``run`` decides)."""
        return self.index is not None and self.region.load32(self.phase_offset) == core.PHASE_IDLE

    def run(self, name: bytes, flags: int, payload):
        """``(status, bytes)``, or None when the worker runs a call already (post it instead)."""
        index = self.index
        if index is None:
            return None
        method = self.dispatcher.method_index(name)
        if not self.region.tcp_begin(index, method):
            return None
        status = STATUS_ERROR
        try:
            status, out = self.finish(*self.dispatcher.handle(name, flags, payload), own=payload)
            return status, out
        finally:
            self.region.tcp_end(index, method, status)

    def finish(self, status, out, own=None):
        """A handler's answer as ``(status, bytes)`` to send, or the error that says what is wrong
        with it (as the worker's loop answers a shared-memory call; ``LocalWay`` calls it too).
        ``own``: the call's argument, when it is a buffer of the call's own that nothing else
        writes to (a large frame's ``framing.lazy_buffer``): an answer that is a view of it is
        sent as it is, the view keeping the buffer alive until it is written.  Any other view
        is copied: the handler may change what it looks at once it returns."""
        try:
            # (a raw method may answer with a view of its argument: 16 MiB echoed without the
            # copy costs about a sixth less time here)
            if out.__class__ is not bytes and not (
                    out.__class__ is memoryview and (mapping := _exporter(own)) is not None
                    and out.obj is mapping and out.ndim == 1 and out.format == "B" and out.c_contiguous):
                out = bytes(out)
            if not isinstance(status, int) or status < 0:
                raise TypeError(f"bad status {status!r}")
        except TypeError as e:
            return STATUS_ERROR, encode_exception(EncodeError(f"bad response from the handler: {e}"), False)
        if len(out) > self.max_payload:
            return STATUS_ERROR, encode_exception(PayloadTooLarge(
                f"the response of {len(out)} bytes exceeds the service's limit of {self.max_payload} bytes"), False)
        return status, out


def _exporter(buf):
    """The private mapping under a large frame's payload (``framing.lazy_buffer``), else None."""
    if buf.__class__ is memoryview:
        buf = buf.obj
    return buf if buf.__class__ is mmap.mmap else None


def attach(worker) -> "WorkerTcp":
    """The worker add-on (shm.worker.ADDONS_ENV) of a service whose workers serve TCP: its TCP
    thread, listening on return, with the options the supervisor put in the environment."""
    from .options import ServeOptions
    options = ServeOptions.from_env()
    inproc = InProcess(worker.segment, worker.dispatcher, worker.segment.max_payload)
    return WorkerTcp(worker.service, options, inproc).start()


class WorkerTcp:
    """A worker's TCP thread: its loop and its ``TcpServer``."""

    def __init__(self, service: str, options, inproc: InProcess):
        self.service, self.options, self.inproc = service, options, inproc
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="speedysvc-tcp", daemon=True)

    def start(self, timeout: float = 30.0) -> "WorkerTcp":
        """Start the thread and wait until it listens; raises what kept it from listening."""
        self.thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the TCP thread of {self.service!r} did not listen within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        from . import eventloop
        try:
            eventloop.run(self._serve())
        except BaseException as e:   # (reported by start, if it came before listening)
            if not self._ready.is_set():
                self._error = e
                self._ready.set()
            else:
                log.exception("%s: the worker's TCP thread failed", self.service)

    async def _serve(self) -> None:
        from .server import TcpServer
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = TcpServer(self.service, self.options, local=self.inproc, reuse_port=True)
        await self.server.start()
        self._ready.set()
        await self._stop.wait()
        await self.server.close(self.options.stop_timeout, "the worker is stopping")

    def registered(self, index: int) -> None:
        """The worker has its entry: its calls may run in its process, and its TCP record is
        published, from now on."""
        self.inproc.registered(index)
        self.server.local_way.registered(index)
        try:
            self.loop.call_soon_threadsafe(self.server.counts_changed)
        except RuntimeError:
            pass

    def stop(self) -> None:
        """Stop listening, let calls in flight finish (up to stop_timeout), answer the ones not
        started with ServiceUnavailable, close every connection; returns when done."""
        if self.loop is None or not self.thread.is_alive():
            return
        try:
            self.loop.call_soon_threadsafe(self._stop.set)
        except RuntimeError:   # (the loop is closed already)
            return
        self.thread.join(self.options.stop_timeout + 5)
