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
    except ValueError:
        return _unpackb(data, raw=False, strict_map_key=False)


# The usual values (None, bool, int, float, str, bytes, exact lists, tuples and dicts) are
# encoded and decoded in C, byte for byte as msgpack does (its pack() and unpackb() cost a
# tenth of a small shared-memory call each); msgpack takes every other value, and words
# every error.  A Packer per value there: those are the values whose packing can run Python
# code (a dict subclass's items()), and with it another thread, so one shared Packer could
# interleave two threads' bytes.
_shmcore.set_msgpack(functools.partial(msgpack.packb, use_bin_type=True), msgpack.unpackb)


class MsgpackCodec(Codec):
    name, id = "msgpack", 2
    positional = True
    dumps = staticmethod(_shmcore.msgpack_dumps)
    loads = staticmethod(_msgpack_loads)
    loads_fast = staticmethod(_shmcore.msgpack_loads)  # refuses non-string map keys: rare, and retried
