"""The asyncio transport over TCP: ``AsyncTcpTransport``.  Calls from many tasks share
one connection and are in flight together; the protocol is ``protocol.ClientOptions``'s,
as for the blocking client."""
from __future__ import annotations

import asyncio
import time

from ..errors import CallTimeout, ConnectionLost, ProtocolError, ServiceNotUp, ServiceUnavailable, SpeedysvcError
from ..waiting import Waiting
from . import framing as fr
from .protocol import (Resending, answer, cannot_connect, connect_budget, next_call_id, not_run, options_of,
                       resendable)


class AsyncConnection(asyncio.BufferedProtocol):
    """One TCP connection: the handshake, then replies matched to calls by id."""

    def __init__(self, opts):
        self.opts = opts
        self.loop = loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self.hello = fr.HelloReader()
        self.hello_buf = bytearray(fr.HELLO.size + fr.MAX_HELLO_BODY)
        self.nonce: bytes | None = None
        self.parser: fr.FrameParser | None = None
        self.transport = None
        self.pending: dict[int, asyncio.Future] = {}
        self.broken: BaseException | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.outgoing: list[bytes] = []
        self.retired = False   # takes no new call; closes once its calls are answered
        self.later: list | None = None   # frames delivered on the loop's next turn (see buffer_updated)

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int):
        return self.parser.get_buffer() if self.parser is not None else memoryview(self.hello_buf)

    def buffer_updated(self, nbytes: int) -> None:
        if self.parser is None:
            try:
                self._handshake(nbytes)
            except BaseException as e:
                if not self.ready.done():
                    self.ready.set_exception(e)
                self.transport.close()
            return
        try:
            frames = self.parser.buffer_updated(nbytes)
        except ProtocolError as e:
            self._break(ConnectionLost(f"{self.opts.address} sent a bad frame ({e})"))
            self.transport.close()
            return
        if self.later is not None or len(frames) == 1 and frames[0].payload.__class__ is not bytes:
            # A large reply, received into its bytes: taken on the loop's next turn, once the
            # loop has dropped its view of them (asyncio's selector loop holds it during this
            # call; taken now, they would be copied).  What comes meanwhile waits behind it.
            if self.later is None:
                self.later = []
                self.loop.call_soon(self._deliver_later)
            self.later.extend(frames)
            return
        self._deliver(frames)

    def _deliver_later(self) -> None:
        frames, self.later = self.later, None
        if frames:
            self._deliver(frames)

    def _handshake(self, nbytes: int) -> None:
        msg = self.hello.feed(self.hello_buf[:nbytes])
        if msg is None:
            return
        if self.nonce is None:
            message, self.nonce = self.opts.client_hello(msg)
            self.transport.write(message)
            self.hello = fr.HelloReader()
            return
        leftover = self.opts.check_welcome(msg, self.nonce)
        self.parser = fr.FrameParser(self.opts.max_payload or fr.DEFAULT_MAX_PAYLOAD,
                                     frozenset((fr.REPLY, fr.GOAWAY)), fill_bytes=True)
        self.hello = self.hello_buf = None
        self.ready.set_result(True)
        if leftover:
            self._deliver(self.parser.feed(leftover))

    def _deliver(self, frames) -> None:
        for frame in frames:
            if frame.kind == fr.GOAWAY:
                self._break(self.opts.goaway_error(frame))
                continue
            fut = self.pending.pop(frame.call_id, None)
            if fut is None or fut.done():
                continue
            try:
                fut.set_result(self.opts.decode_reply(frame))
            except Exception as e:
                fut.set_exception(e)
        self._close_if_retired()

    def retire(self) -> None:
        """Its server is stopping: no new call goes on it, and it closes once the calls in
        flight on it are over (the server answers them, then closes it too)."""
        self.retired = True
        self._close_if_retired()

    def _close_if_retired(self) -> None:
        if self.retired and not self.pending:
            self.transport.close()

    def _break(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def _flush(self) -> None:
        out, self.outgoing = self.outgoing, []
        if out and not self.transport.is_closing():
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def connection_lost(self, exc) -> None:
        self._deliver_later()   # (replies that came before the end are answers, not losses)
        lost = ConnectionLost(f"connection to {self.opts.address} was lost"
                              + (f" ({exc})" if exc else "") + "; a call in flight may or may not have run")
        if not self.ready.done():
            self.ready.set_exception(ConnectionLost(f"{self.opts.address} closed the connection "
                                                    f"during the handshake"))
        self._break(lost)
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    async def call(self, name: bytes, payload, flags: int, timeout, stated=None):
        """The reply ``(status, data)`` within ``timeout`` (the error names ``stated``: the
        call's whole timeout, of which connecting took the rest)."""
        if self.broken is not None or self.retired:
            raise self._unsent()
        call_id = next_call_id()
        buffers = self.opts.encode_call(call_id, name, payload, flags, timeout)
        if not self.writable.is_set():
            await self.writable.wait()
            if self.broken is not None or self.retired:
                raise self._unsent()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending[call_id] = fut
        if len(buffers) == 1:
            # calls made in the same turn of the loop go out in one write
            if not self.outgoing:
                loop.call_soon(self._flush)
            self.outgoing.append(buffers[0])
        else:
            self._flush()
            for buf in buffers:
                self.transport.write(buf)
        try:
            if timeout is None:
                return await fut
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(f"call to {self.opts.address} timed out after "
                              f"{timeout if stated is None else stated} s") from None
        finally:
            self.pending.pop(call_id, None)
            self._close_if_retired()

    def _unsent(self) -> BaseException:
        """The error of a call that found this connection broken or retired before any of it
        was written: it never ran, and is marked so (a client sends it again)."""
        why = "its server is stopping" if self.retired else "it was lost"
        return not_run(ConnectionLost(f"connection to {self.opts.address} could not take the call ({why}); "
                                      f"the call was not sent"))


class AsyncTcpTransport:
    scheme = "tcp"

    def __init__(self, opts):
        self.opts = opts
        self._conn: AsyncConnection | None = None
        self._lock: asyncio.Lock | None = None
        self._loop = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<AsyncTcpTransport {self.opts.address} {self.opts.service!r}>"

    async def _connection(self, deadline: float | None = None, timeout: float | None = None) -> AsyncConnection:
        """The connection, opened (or opened again) if need be, by ``deadline`` (the call's,
        ``timeout`` from when it began) as well as within the connect timeout."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        if conn is not None and conn.broken is None and not conn.retired and conn.loop is loop:
            return conn
        if self._lock is None or self._loop is not loop:   # a client may outlive its event loop
            self._lock, self._loop = asyncio.Lock(), loop
            if conn is not None and conn.loop is not loop:
                conn.broken = ConnectionLost("the connection belonged to another event loop")
                if not conn.loop.is_closed():
                    conn.loop.call_soon_threadsafe(conn.transport.close)
        lock = self._lock
        try:   # (another task may be connecting)
            await asyncio.wait_for(lock.acquire(), None if deadline is None else max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise CallTimeout(f"call to {self.opts.address} timed out after {timeout} s while connecting") from None
        try:
            if self._closed:
                raise SpeedysvcError("this connection is closed")
            conn = self._conn
            if conn is None or conn.broken is not None or conn.retired:
                if conn is not None and conn.loop is loop and not conn.retired:
                    conn.transport.close()
                conn = self._conn = await self._open(deadline, timeout)
            return conn
        finally:
            lock.release()

    async def _open(self, deadline: float | None = None, timeout: float | None = None) -> AsyncConnection:
        opts = self.opts
        loop = asyncio.get_running_loop()
        budget, too_late = connect_budget(opts, deadline, timeout)
        end = time.monotonic() + budget
        if budget <= 0:
            raise too_late()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: AsyncConnection(opts), opts.host, opts.port, ssl=opts.ssl_context,
                server_hostname=opts.tls_name if opts.ssl_context else None), budget)
        except asyncio.TimeoutError:
            if deadline is not None and budget < opts.connect_timeout:
                raise too_late() from None
            raise ServiceUnavailable(f"cannot connect to {opts.address} within {opts.connect_timeout} s") from None
        except SpeedysvcError:
            raise
        except OSError as e:
            raise cannot_connect(opts, e) from None
        try:
            await asyncio.wait_for(asyncio.shield(conn.ready), max(0.0, end - time.monotonic()))
        except asyncio.TimeoutError:
            # closing fails ``ready`` too: that outcome is ours to drop, not asyncio's to report
            conn.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
            conn.transport.close()
            raise too_late() from None
        except BaseException:
            conn.transport.close()
            raise
        return conn

    async def call(self, name: bytes, payload, flags: int, codec, timeout, _waiting: bool = False):
        # (when the call began: a call the server never started is sent again within its timeout)
        began = time.monotonic()
        try:
            return await self._call(name, payload, flags, codec, timeout, _waiting)
        except Exception as e:
            if not resendable(e):
                raise
            return await self._again(e, began, name, payload, flags, codec, timeout)

    async def _again(self, error: BaseException, began: float, name: bytes, payload, flags: int, codec, timeout):
        """A call the server answered as never started because it is stopping: sent again on a
        new connection, as the blocking client does (``TcpTransport._again``: a rolling restart
        loses no call; a service stopped on purpose is not waited for)."""
        resending = Resending(self.opts, began, timeout, error)
        while True:
            attempt = resending.timeout()
            try:
                return await self._call(name, payload, flags, codec, attempt, True)
            except Exception as e:
                await asyncio.sleep(resending.failed(e))

    async def _call(self, name: bytes, payload, flags: int, codec, timeout, _waiting: bool = False):
        conn, deadline = self._conn, None
        if conn is None or conn.broken is not None or conn.retired or conn.loop is not asyncio.get_running_loop():
            # the call's timeout bounds connecting (and the handshake) too
            deadline = None if timeout is None else time.monotonic() + timeout
            try:
                conn = await self._connection(deadline, timeout)
            except ServiceNotUp as e:   # refused: nothing listens (yet); the call was not sent
                if _waiting:
                    raise
                return await self._when_up(e, name, payload, flags, codec, timeout)
        try:
            if deadline is not None:
                return answer(await conn.call(name, payload, flags, max(0.0, deadline - time.monotonic()), timeout),
                              codec, name)
            return answer(await conn.call(name, payload, flags, timeout), codec, name)
        except Exception as e:
            if resendable(e):   # its server is stopping: the connection that said so takes no new call
                conn.retire()
            raise

    async def _when_up(self, error: ServiceNotUp, name: bytes, payload, flags: int, codec, timeout):
        """Wait for the service to accept connections (see ``speedysvc.waiting``), then call."""
        wait = Waiting(self.opts.service, self.opts.wait, timeout)
        if wait.bound <= 0:
            raise error
        reason = f"nothing accepts connections at {self.opts.address}"
        while True:
            await asyncio.sleep(wait.pause(reason))
            left = wait.remaining(reason)
            try:
                return await self._call(name, payload, flags, codec, left, True)
            except ServiceNotUp:
                pass

    async def aclose(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.transport.close()


def open_tcp(address, options: dict) -> AsyncTcpTransport:
    """The ``tcp://`` scheme's asyncio factory (see ``speedysvc.transport``)."""
    return AsyncTcpTransport(options_of(address, options))
