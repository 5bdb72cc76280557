"""The TCP wire format: a versioned handshake, then frames.  docs/tcp-protocol.md
describes it with offsets; this module is the only code that knows it.

Both ends read with ``FrameParser``, an incremental parser that also tells the
socket where to put the next bytes, so a large payload is received straight
into its own buffer (asyncio's ``BufferedProtocol`` and ``socket.recv_into``)
and small frames are cut out of one scratch buffer many at a time.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct

import msgpack

from .. import _shmcore as core
from .. import allocation
from ..errors import ProtocolError

MAGIC = b"SSVC"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

# handshake messages: magic, protocol version, message type, body length; body is a msgpack map
HELLO = struct.Struct("<4sBBH")
SERVER_HELLO, CLIENT_HELLO, WELCOME, REFUSED = 1, 2, 3, 4
MAX_HELLO_BODY = 4096
NONCE_SIZE = 32

# frames: kind, frame flags, method-name length, call id, codec flags or status,
# timeout in ms (0: none), payload length.  The C side (_shmcore.Gateway and
# call_alone) reads and writes them too: the constants are defined once, in the
# C extension's layout.h, and this format must put each field where it says.
FRAME = struct.Struct("<BBHIIIQ")
HEADER_SIZE = FRAME.size
if FRAME.size != core.FRAME_HEADER or [
        core.FRAME_KIND, core.FRAME_FLAGS, core.FRAME_NAME_LEN, core.FRAME_CALL_ID, core.FRAME_ARG, core.FRAME_TIMEOUT,
        core.FRAME_LENGTH] != [struct.calcsize(FRAME.format[:i]) for i in range(1, 8)]:
    raise ImportError("framing.FRAME and the C extension's layout.h disagree on the frame header: rebuild it")
CALL, REPLY, GOAWAY = core.FRAME_CALL, core.FRAME_REPLY, core.FRAME_GOAWAY
F_COMPRESSED = core.FRAME_F_COMPRESSED
KNOWN_FRAME_FLAGS = core.FRAME_KNOWN_FLAGS
F_NOT_RUN = core.FRAME_F_NOT_RUN   # replies and go-aways only, to clients that asked (docs/tcp-protocol.md)
MAX_NAME = core.FRAME_MAX_NAME
SMALL_FRAME = 64 << 10   # a frame below this goes out in one piece (header and payload joined), either way
SCRATCH_SIZE = 256 << 10      # the most a parser's scratch buffer grows to (larger frames: lazy_buffer)
SERVER_SCRATCH = 4 << 10      # what the gateway's parsers start with, and shrink back to when idle
DEFAULT_MAX_PAYLOAD = 1 << 30
COMPRESSION_OVERHEAD = 8        # the original length in front of a compressed payload


# ---- handshake -------------------------------------------------------------------------------

def pack_hello(msg_type: int, body: dict) -> bytes:
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_HELLO_BODY:
        raise ValueError("handshake message too large")
    return HELLO.pack(MAGIC, VERSION, msg_type, len(data)) + data


class HelloReader:
    """Collects one handshake message: ``feed(data)`` returns ``None`` until it is
    complete, then ``(msg_type, version, body, leftover bytes)``."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        if len(self.buf) < HELLO.size:
            if not MAGIC.startswith(bytes(self.buf[:4])):
                raise ProtocolError("the peer does not speak the speedysvc protocol")
            return None
        magic, version, msg_type, length = HELLO.unpack_from(self.buf)
        if magic != MAGIC:
            raise ProtocolError("the peer does not speak the speedysvc protocol")
        if length > MAX_HELLO_BODY:
            raise ProtocolError(f"handshake message of {length} bytes is too large")
        end = HELLO.size + length
        if len(self.buf) < end:
            return None
        try:
            body = msgpack.unpackb(bytes(self.buf[HELLO.size:end]), raw=False)
        except Exception as e:
            raise ProtocolError(f"undecodable handshake message: {e}") from None
        if not isinstance(body, dict):
            raise ProtocolError("handshake message is not a map")
        return msg_type, version, body, bytes(self.buf[end:])


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def proof(secret: bytes, role: bytes, first: bytes, second: bytes, service: str) -> bytes:
    """HMAC-SHA256 over both nonces, so neither side can replay an old answer."""
    return hmac.new(secret, role + b"\0" + first + second + service.encode(), hashlib.sha256).digest()


def client_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, service: str) -> bytes:
    return proof(secret, b"speedysvc client", server_nonce, client_nonce, service)


def server_proof(secret: bytes, server_nonce: bytes, client_nonce: bytes, service: str) -> bytes:
    return proof(secret, b"speedysvc server", client_nonce, server_nonce, service)


def same_proof(sent, expected: bytes) -> bool:
    """Whether a proof a peer sent is the expected one (in constant time)."""
    return isinstance(sent, bytes) and hmac.compare_digest(sent, expected)


def as_secret(secret) -> bytes | None:
    if secret is None or secret == "" or secret == b"":
        return None
    if isinstance(secret, str):
        return secret.encode()
    if isinstance(secret, (bytes, bytearray)):
        return bytes(secret)
    raise TypeError(f"secret must be str or bytes, not {type(secret).__name__}")


# ---- frames ----------------------------------------------------------------------------------

class Frame:
    __slots__ = ("kind", "flags", "call_id", "arg", "timeout_ms", "name", "payload")

    def __init__(self, kind, flags, call_id, arg, timeout_ms, name, payload):
        self.kind, self.flags, self.call_id, self.arg = kind, flags, call_id, arg
        self.timeout_ms, self.name, self.payload = timeout_ms, name, payload

    def __repr__(self) -> str:
        return (f"<Frame kind={self.kind} flags={self.flags} id={self.call_id} arg={self.arg} "
                f"name={self.name!r} {len(self.payload)} bytes>")


def call_header(call_id: int, name: bytes, codec_flags: int, timeout_ms: int, length: int, flags: int = 0) -> bytes:
    return FRAME.pack(CALL, flags, len(name), call_id, codec_flags, timeout_ms, length) + name


def reply_header(call_id: int, status: int, length: int, flags: int = 0) -> bytes:
    return FRAME.pack(REPLY, flags, 0, call_id, status, 0, length)


def goaway(payload: bytes, flags: int = 0) -> bytes:
    return FRAME.pack(GOAWAY, flags, 0, 0, 0, 0, len(payload)) + payload


def lazy_buffer(length: int, lead: int = 0):
    """A buffer for a large payload: an anonymous private mapping, whose memory is committed
    as bytes arrive (a header claiming a gigabyte costs nothing until the gigabyte comes, and
    there is no zero-fill up front), in huge pages where the kernel allows them.  Private, not
    the shared mapping ``mmap(-1, n)`` makes: that one is shmem, and faulting its pages in
    costs several times more (16 MiB: ~28 ms against ~4 ms in huge pages on a small VM).  The
    process keeps one such mapping and hands it out again once no view of it is alive
    (``allocation.large_buffer``): its pages are committed already, and the buffer is a view of
    exactly ``length`` bytes of it, which the frame's bytes fill before anyone reads it.

    ``lead``: the buffer starts that many bytes after a page boundary (a memoryview of the
    mapping; ``free_buffer`` closes it), as a call's payload does in a channel's data segment,
    after the method's name: the out-of-band buffers of a pickled call, placed on page
    boundaries for that layout (codecs/outofband.py), are then page-aligned here too, for a
    worker that runs the call from this buffer (TCP served by the workers)."""
    return allocation.large_buffer(length, lead)


def payload_bytes(frame: Frame):
    """A frame's payload, taken as bytes if it was received into them (``fill_bytes``): to be
    called once the reader's view of its read buffer is gone, or the bytes are copied."""
    payload = frame.payload
    if payload.__class__ is core.BytesToFill:
        payload = frame.payload = payload.take()
    return payload


def free_buffer(buf) -> None:
    """Unmap a ``lazy_buffer`` now, unless a view of it is still alive somewhere (then it goes
    with that), or the process keeps it (free again once no view of it is alive)."""
    if buf.__class__ is core.BytesToFill:
        return   # (memory of the heap: freed with its last reference)
    try:
        if isinstance(buf, memoryview):
            mapping = buf.obj
            buf.release()
            buf = mapping
        if not allocation.is_kept(buf):
            buf.close()
    except BufferError:
        pass


def payload_size(payload) -> int:
    return len(payload) if isinstance(payload, (bytes, bytearray)) else memoryview(payload).nbytes


class FrameParser:
    """Incremental frame parser.  ``get_buffer()`` gives the memory the next bytes
    go to; ``buffer_updated(n)`` says how many arrived and returns the frames now
    complete.  ``accept`` is the set of frame kinds this end may receive;
    ``max_payload`` bounds a frame's payload (the service's payload limit).

    Frames up to ``SCRATCH_SIZE`` are cut out of a scratch buffer of ``scratch`` bytes
    to start with, which doubles (up to ``SCRATCH_SIZE``) each time a read fills it:
    it grows only as bytes arrive, never for what a header announces.  ``shrink()``
    gives it back when the parser is between frames.

    A frame larger than the scratch buffer is received into a buffer of its own: a
    ``lazy_buffer`` (a server: page-aligned after the name, for a worker that reads the call
    in place), or, with ``fill_bytes`` (a client), a ``core.BytesToFill``: the ``bytes`` a
    reply is returned as, with no buffer to fault in and copy out of.  The frame comes with
    this parser's view of it released; ``payload_bytes`` takes the bytes once the reader has
    dropped its own view too (else they would be copied)."""

    def __init__(self, max_payload: int, accept: frozenset, scratch: int = SCRATCH_SIZE, fill_bytes: bool = False):
        self.max_payload = max_payload
        self.fill_bytes = fill_bytes
        self.max_length = max_payload + COMPRESSION_OVERHEAD
        self.accept = accept
        self.scratch = min(max(scratch, HEADER_SIZE + MAX_NAME), SCRATCH_SIZE)
        self._buf = bytearray(self.scratch)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._big: Frame | None = None     # a frame whose payload arrives into its own buffer
        self._big_view: memoryview | None = None
        self._big_filled = 0
        self._big_length = 0      # (a large payload is an mmap, a bytes-like object; see fill_bytes)
        self._big_head = 0        # its header and name
        self.done = 0             # frames complete so far (see ``progress``)

    @property
    def mid_frame(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return self._big is not None or self._end > self._start

    @property
    def progress(self) -> tuple[int, int]:
        """``(frames complete so far, bytes of the frame in progress that arrived)``."""
        if self._big is not None:
            return self.done, self._big_head + self._big_filled
        return self.done, self._end - self._start

    @property
    def buffered(self) -> int:
        """Bytes of memory the parser holds: its scratch buffer, and a large frame's as it arrives."""
        return len(self._buf) + (self._big_head + self._big_filled if self._big is not None else 0)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._big is not None:
            return self._big_view[self._big_filled:]
        if self._end == len(self._buf):   # the last read filled it
            if len(self._buf) < SCRATCH_SIZE:
                self._resize(min(2 * len(self._buf), SCRATCH_SIZE))
            else:
                self._compact()
        return self._view[self._end:] if self._end else self._view   # (between frames: the whole buffer, no new view)

    def shrink(self) -> None:
        """Between frames, give back a scratch buffer that grew (an idle connection then holds
        ``scratch`` bytes, whatever it received before)."""
        if len(self._buf) > self.scratch and self._end == self._start and self._big is None:
            self._start = self._end = 0
            self._resize(self.scratch)

    def discard(self) -> None:
        """The connection is over: free a large frame's buffer now (not when the garbage
        collector finds the connection)."""
        big, view, self._big, self._big_view = self._big, self._big_view, None, None
        if view is not None:
            view.release()
        if big is not None:
            free_buffer(big.payload)
        self._start = self._end = 0
        if len(self._buf) > self.scratch:
            self._resize(self.scratch)

    def _resize(self, size: int) -> None:
        rest = self._end - self._start
        buf = bytearray(size)
        buf[:rest] = self._view[self._start:self._end]
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, rest

    def feed(self, data) -> list[Frame]:
        """Parse bytes received some other way (copies them in)."""
        data = memoryview(data).cast("B")
        frames, pos = [], 0
        while pos < len(data):
            buf = self.get_buffer()
            n = min(len(buf), len(data) - pos)
            buf[:n] = data[pos:pos + n]
            del buf   # (a view of a large frame's bytes still alive would make take() copy them)
            pos += n
            frames.extend(self.buffer_updated(n))
        return frames

    def whole_frame(self, n: int):
        """``buffer_updated(n)`` for the usual case, where the parser held nothing and the
        ``n`` bytes that came are one whole, valid frame: ``(kind, flags, call_id, arg,
        timeout_ms, name, payload)``, and the parser stays empty.  None, with nothing
        consumed, in every other case (then call ``buffer_updated(n)``)."""
        if self._end or self._big is not None or n < HEADER_SIZE:
            return None
        buf = self._buf
        kind, flags, name_len, call_id, arg, timeout_ms, length = FRAME.unpack_from(buf, 0)
        body = HEADER_SIZE + name_len
        if body + length != n:
            return None
        try:
            self._check(kind, flags, name_len, length)
        except ProtocolError:
            return None   # buffer_updated raises it
        return kind, flags, call_id, arg, timeout_ms, bytes(buf[HEADER_SIZE:body]), bytes(buf[body:n])

    def _compact(self) -> None:
        rest = self._end - self._start
        if self._start:
            self._buf[:rest] = self._buf[self._start:self._end]
        self._start, self._end = 0, rest

    def _check(self, kind, flags, name_len, length) -> None:
        if kind not in self.accept:
            raise ProtocolError(f"unexpected frame kind {kind}")
        if flags & ~(KNOWN_FRAME_FLAGS if kind == CALL else KNOWN_FRAME_FLAGS | F_NOT_RUN):
            raise ProtocolError(f"unknown frame flags {flags:#x}")
        if kind == CALL:
            if not 1 <= name_len <= MAX_NAME:
                raise ProtocolError(f"method name of {name_len} bytes (1 to {MAX_NAME} allowed)")
        elif name_len:
            raise ProtocolError("only a call frame carries a method name")
        if length > (self.max_length if flags & F_COMPRESSED else self.max_payload):
            raise FrameTooLarge(length, self.max_payload)

    def buffer_updated(self, n: int) -> list[Frame]:
        if self._big is not None:
            self._big_filled += n
            if self._big_filled < self._big_length:
                return []
            frame, view, self._big, self._big_view = self._big, self._big_view, None, None
            if self.fill_bytes:
                view.release()   # (its bytes are taken by payload_bytes, when the reader's view is gone too)
            self.done += 1
            return [frame]
        self._end += n
        frames = []
        buf, start, end = self._buf, self._start, self._end
        while end - start >= HEADER_SIZE:
            kind, flags, name_len, call_id, arg, timeout_ms, length = FRAME.unpack_from(buf, start)
            self._check(kind, flags, name_len, length)
            body = start + HEADER_SIZE
            total = HEADER_SIZE + name_len + length
            if end - start >= total:
                name = bytes(buf[body:body + name_len]) if name_len else b""
                frames.append(Frame(kind, flags, call_id, arg, timeout_ms, name,
                                    bytes(buf[body + name_len:start + total])))
                start += total
                continue
            if total > SCRATCH_SIZE and end - start >= HEADER_SIZE + name_len:
                # too large for the scratch buffer: the rest goes straight into its own buffer
                name = bytes(buf[body:body + name_len])
                have = end - body - name_len
                payload = core.BytesToFill(length) if self.fill_bytes else lazy_buffer(length, name_len)
                view = memoryview(payload)
                view[:have] = buf[body + name_len:end]
                self._big = Frame(kind, flags, call_id, arg, timeout_ms, name, payload)
                self._big_view = view
                self._big_filled, self._big_length, self._big_head = have, length, HEADER_SIZE + name_len
                start = end = 0
            break
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        if frames:
            self.done += len(frames)
        if start and len(buf) - end < HEADER_SIZE + MAX_NAME:
            self._compact()
        return frames


class FrameTooLarge(ProtocolError):
    def __init__(self, length: int, limit: int):
        super().__init__(f"frame payload of {length} bytes exceeds the limit of {limit} bytes")
        self.length, self.limit = length, limit
