"""An encoded value with buffers beside it (pickle protocol 5's out-of-band buffers).

A large numpy array, ``bytearray`` or ``pickle.PickleBuffer`` in a ``@pickle_method``'s
arguments or result is not copied into the pickle stream: the stream refers to it, and the
buffer travels beside it, written once into the call's shared memory (or sent as it is over
TCP, as one more piece of the frame).  The layout of such a payload (docs/shm-protocol.md,
"Out-of-band buffers"), all integers little-endian::

    magic b"\\x00OB5" | u32 count | u64 stream length | count x (u64 offset, u64 length)
    | the pickle stream | each buffer at its offset

Offsets count from the payload's first byte.  Each buffer starts on a page boundary of the
memory the payload is written to (``start``: where the payload starts, counted from a page
boundary: after the method's name in a request), so that a numpy array read in place is as
aligned as one the receiver made itself.  A pickle stream of protocol 2 or later starts with
0x80, so the magic tells the two kinds of payload apart.
"""
from __future__ import annotations

import struct

MAGIC = b"\x00OB5"
HEAD = struct.Struct("<4sIQ")       # magic, count, stream length
ENTRY = struct.Struct("<QQ")        # offset, length
ALIGN = 4096
MAX_BUFFERS = 1 << 16               # a decoder refuses more (each costs a view and a table entry)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class OutOfBand:
    """A pickle stream and the buffers it refers to (``pickle.PickleBuffer`` objects, whose
    ``raw()`` views are contiguous), not yet joined.  A transport that can write them where
    they go (shared memory) or send them as they are (TCP) asks for ``parts``; any other gets
    ``bytes(payload)``, one joined copy."""

    __slots__ = ("stream", "buffers")

    def __init__(self, stream: bytes, buffers: list):
        self.stream = stream
        self.buffers = buffers

    def _layout(self, start: int) -> tuple[bytes, list, int]:
        """(head: magic, count, stream length and table; [(offset, raw view)], total)."""
        raws = [b.raw() for b in self.buffers]
        pos = HEAD.size + len(raws) * ENTRY.size + len(self.stream)
        placed, entries = [], []
        for raw in raws:
            off = _aligned(start + pos) - start
            placed.append((off, raw))
            entries.append(ENTRY.pack(off, raw.nbytes))
            pos = off + raw.nbytes
        return HEAD.pack(MAGIC, len(raws), len(self.stream)) + b"".join(entries), placed, pos

    def parts(self, start: int = 0) -> tuple[list, int]:
        """``(pieces, total)``: the payload as buffers to send one after the other (padding
        included), for a payload that starts ``start`` bytes after a page boundary."""
        head, placed, total = self._layout(start)
        pieces, pos = [head, self.stream], len(head) + len(self.stream)
        for off, raw in placed:
            if off > pos:
                pieces.append(bytes(off - pos))
            pieces.append(raw)
            pos = off + raw.nbytes
        return pieces, total

    def size(self, start: int = 0) -> int:
        return self._layout(start)[2]

    def write(self, dest: memoryview, start: int) -> int:
        """Write the payload into ``dest`` (a writable byte view of the memory it goes to) at
        ``start``, leaving the padding as it is; returns its length.  ``dest`` must be large
        enough (``size(start)`` from ``start``)."""
        head, placed, total = self._layout(start)
        end = start + len(head)
        dest[start:end] = head
        dest[end:end + len(self.stream)] = self.stream
        for off, raw in placed:
            dest[start + off:start + off + raw.nbytes] = raw
        return total

    def __bytes__(self) -> bytes:
        pieces, _ = self.parts(0)
        return b"".join(bytes(p) if p.__class__ is not bytes else p for p in pieces)

    def __len__(self) -> int:
        return self.size(0)


def is_out_of_band(data) -> bool:
    """Whether an encoded payload (bytes or a byte view) has the out-of-band layout."""
    return len(data) >= HEAD.size and data[0] == 0 and bytes(data[:4]) == MAGIC


def split(data) -> tuple[memoryview, list[memoryview]]:
    """``(stream, buffers)``: read-only views into ``data`` (which must stay valid while they
    are used).  Raises ValueError for a payload whose table does not fit it."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    view = view.toreadonly()
    size = view.nbytes
    magic, n, stream_len = HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError("not an out-of-band payload")
    if n > MAX_BUFFERS:
        raise ValueError(f"{n} out-of-band buffers (at most {MAX_BUFFERS})")
    table_end = HEAD.size + n * ENTRY.size
    if table_end + stream_len > size:
        raise ValueError("the out-of-band table or the stream runs past the payload")
    buffers = []
    low = table_end + stream_len
    for i in range(n):
        off, length = ENTRY.unpack_from(view, HEAD.size + i * ENTRY.size)
        if off < low or off + length > size:
            raise ValueError(f"out-of-band buffer {i} ({length} bytes at {off}) lies outside the payload")
        buffers.append(view[off:off + length])
        low = off + length
    return view[table_end:table_end + stream_len], buffers
