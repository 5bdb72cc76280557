"""How arguments and return values are turned into bytes, one codec per method.

Each codec encodes a call's arguments on the caller's side and decodes them on
the server's side, then the reverse for the return value.  Positional
arguments travel as an array; keyword arguments, when given, as
``[args, kwargs]`` with the ``FLAG_KWARGS`` bit set.  The codec's id travels in
the request flags so a caller and a server that disagree get a clear error
instead of garbage.

``raw`` carries exactly one bytes-like value each way, with no encoding at
all.  On the server the argument is a read-only ``memoryview`` straight into
shared memory, valid until the method returns (copy it with ``bytes()`` to
keep it).
"""
from __future__ import annotations

import functools
import json
import pickle

import msgpack

from . import _shmcore
from .errors import DecodeError, EncodeError, decode_exception

FLAG_KWARGS = 0x1
CODEC_SHIFT = 8


class Codec:
    """Base class.  Subclasses set ``name``, ``id`` and two plain callables,
    ``dumps(obj) -> bytes`` and ``loads(bytes-like) -> obj``, which the hot
    path calls directly."""

    name = ""
    id = 0
    dumps = staticmethod(lambda obj: b"")
    loads = staticmethod(lambda data: None)
    # tried first on the hot path; may refuse some valid input, which ``loads`` then decodes
    loads_fast = loads

    @property
    def flags(self) -> int:
        return self.id << CODEC_SHIFT

    def encode_args(self, method: str, args: tuple, kwargs: dict | None):
        try:
            if kwargs:
                return self.dumps([args, kwargs]), self.flags | FLAG_KWARGS
            return self.dumps(args), self.flags
        except Exception as e:
            raise EncodeError(f"cannot encode the arguments of {method}() with {self.name}: {e}") from e

    def decode_args(self, method: str, data, flags: int):
        try:
            value = self.loads(data)
        except Exception as e:
            raise DecodeError(f"cannot decode the arguments of {method}() with {self.name}: {e}") from None
        if flags & FLAG_KWARGS:
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or not isinstance(value[0], (list, tuple)) or not isinstance(value[1], dict)):
                raise DecodeError(f"malformed keyword arguments for {method}()")
            return value[0], value[1]
        if not isinstance(value, (list, tuple)):
            raise DecodeError(f"the arguments of {method}() must be an array, got {type(value).__name__}")
        return value, None

    def encode_result(self, method: str, value):
        try:
            return self.dumps(value)
        except Exception as e:
            raise EncodeError(f"cannot encode the return value of {method}() with {self.name}: {e}") from e

    @staticmethod
    def remote_error(data):
        """The service answered with an error: raise it here."""
        raise decode_exception(data)

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


def _make_json_dumps():
    # JSONEncoder.encode builds a C encoder on every call, most of a small call's cost; build
    # it once.  Without its `markers` dict (a shared one would keep stale entries after an
    # error) a cycle ends in RecursionError instead of ValueError: an EncodeError either way.
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:   # no C accelerator
        return lambda obj: encoder.encode(obj).encode()
    chunks = make(None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)
    join = "".join

    def dumps(obj) -> bytes:
        return join(chunks(obj, 0)).encode()
    return dumps


_json_dumps = _make_json_dumps()
_json_decoder = json.JSONDecoder()
_json_scan = _json_decoder.scan_once


def _json_loads(data):
    # Always UTF-8 on the wire, and what our side encodes has no whitespace around it: the
    # scanner alone reads it.  Anything else goes through decode(), which also words the errors.
    text = str(data, "utf-8")
    try:
        value, end = _json_scan(text, 0)
        if end == len(text):
            return value
    except StopIteration:
        pass
    return _json_decoder.decode(text)


class JSONCodec(Codec):
    name, id = "json", 1
    dumps = staticmethod(_json_dumps)
    loads = loads_fast = staticmethod(_json_loads)


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
    dumps = staticmethod(_shmcore.msgpack_dumps)
    loads = staticmethod(_msgpack_loads)
    loads_fast = staticmethod(_shmcore.msgpack_loads)  # refuses non-string map keys: rare, and retried


class PickleCodec(Codec):
    """Any picklable value.  Unpickling runs code chosen by the sender: use it only
    between processes that trust each other (shared memory is same-user only)."""

    name, id = "pickle", 3
    dumps = staticmethod(functools.partial(pickle.dumps, protocol=pickle.HIGHEST_PROTOCOL))
    loads = loads_fast = staticmethod(pickle.loads)


def _as_bytes_view(value, what, method: str):
    if value.__class__ is bytes or value.__class__ is bytearray:
        return value
    try:
        view = memoryview(value)
    except TypeError:
        raise EncodeError(f"{what} of raw method {method}() must be bytes-like, "
                          f"not {type(value).__name__}") from None
    if not view.c_contiguous:
        raise EncodeError(f"{what} of raw method {method}() must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class RawCodec(Codec):
    name, id = "raw", 4

    def encode_args(self, method, args, kwargs):
        if kwargs or len(args) != 1:
            raise EncodeError(f"raw method {method}() takes exactly one positional bytes-like argument")
        return _as_bytes_view(args[0], "the argument", method), self.flags

    def decode_args(self, method, data, flags):
        if flags & FLAG_KWARGS:
            raise DecodeError(f"raw method {method}() takes no keyword arguments")
        return (data,), None

    def encode_result(self, method, value):
        return _as_bytes_view(value, "the return value", method)

    dumps = staticmethod(bytes)
    loads = loads_fast = staticmethod(bytes)


JSON = JSONCodec()
MSGPACK = MsgpackCodec()
PICKLE = PickleCodec()
RAW = RawCodec()

BY_ID = {c.id: c for c in (JSON, MSGPACK, PICKLE, RAW)}
