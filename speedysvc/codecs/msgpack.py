"""The ``msgpack`` codec: the fast default for structured data."""
from __future__ import annotations

import functools

import msgpack

from .. import _shmcore
from .base import Codec


def _msgpack_loads(data, _unpackb=msgpack.unpackb, _loads=_shmcore.msgpack_loads):
    # Keyword arguments make unpackb twice as slow on small payloads, so maps with
    # non-string keys (rare) pay for a second attempt instead of every call paying.
    try:
        return _loads(data)
    except msgpack.ExtraData:
        raise   # (a whole value and bytes after it: the second attempt would say the same)
    except ValueError:
        if len(memoryview(data).cast("B")) >= LARGE:
            return _unpack_in_slices(data)
        return _unpackb(data, raw=False, strict_map_key=False)


LARGE = _shmcore.MSGPACK_LARGE_FALLBACK   # an encoded value this large that C does not take: read in slices
SLICE = 1 << 20


class _Slices:
    """``data`` read a slice at a time (a file for ``msgpack.Unpacker``)."""

    def __init__(self, data):
        self.view, self.pos = memoryview(data).cast("B"), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n < 0 else min(self.pos + n, len(self.view))
        chunk = bytes(self.view[self.pos:end])
        self.pos = end
        return chunk


def _unpack_in_slices(data):
    """``unpackb(data)`` for a large value C does not take: ``unpackb`` holds the interpreter
    lock for the whole of it, and when bytes follow the value it copies them all into its
    ``ExtraData`` (a peer's 256 MiB of junk after an extension type: 0.15 s each time,
    during which a worker that serves TCP answers nobody).  Read in 1 MiB slices, the lock is
    taken again between them, and what follows a whole value is not copied."""
    size = len(memoryview(data).cast("B"))
    unpacker = msgpack.Unpacker(_Slices(data), read_size=SLICE, max_buffer_size=max(size, SLICE), raw=False,
                                strict_map_key=False)
    try:
        value = unpacker.unpack()
    except msgpack.OutOfData:
        raise ValueError("Unpack failed: incomplete input") from None
    if unpacker.tell() != size:
        raise msgpack.ExtraData(value, b"")
    return value


# The usual values (None, bool, int, float, str, bytes, exact lists, tuples and dicts) are
# encoded and decoded in C, byte for byte as msgpack does (its pack() and unpackb() cost a
# tenth of a small shared-memory call each); msgpack takes every other value, and words
# every error.  A Packer per value there: those are the values whose packing can run Python
# code (a dict subclass's items()), and with it another thread, so one shared Packer could
# interleave two threads' bytes.
_shmcore.set_msgpack(functools.partial(msgpack.packb, use_bin_type=True), msgpack.unpackb, msgpack.ExtraData)


class MsgpackCodec(Codec):
    name, id = "msgpack", 2
    positional = True
    dumps = staticmethod(_shmcore.msgpack_dumps)
    loads = staticmethod(_msgpack_loads)
    loads_fast = staticmethod(_shmcore.msgpack_loads)  # refuses non-string map keys: rare, and retried
