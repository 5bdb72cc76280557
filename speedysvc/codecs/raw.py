"""The ``raw`` codec: exactly one bytes-like value each way, with no encoding at all.

On the server the argument is a read-only ``memoryview`` straight into shared
memory, valid until the method returns (copy it with ``bytes()`` to keep it).
"""
from __future__ import annotations

from ..errors import DecodeError, EncodeError
from .base import FLAG_KWARGS, Codec


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
    raw = True

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
