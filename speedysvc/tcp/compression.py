"""Payload compression for the TCP transport: zlib from the standard library,
lz4, snappy and zstd from cramjam (one maintained binding for all three).

A compressed payload travels as its original length (8 bytes, little-endian)
followed by the compressed bytes, so the receiver allocates exactly that much
and a payload that would inflate beyond it (or beyond the payload limit) is
refused instead of exhausting memory.
"""
from __future__ import annotations

import struct
import zlib

from ..errors import DecodeError, PayloadTooLarge
from .framing import lazy_buffer

try:
    import cramjam
except ImportError:  # pragma: no cover - cramjam is a dependency; zlib still works without it
    cramjam = None

_LENGTH = struct.Struct("<Q")
DEFAULT_MIN_SIZE = 4096     # payloads below this are sent as they are
LARGE_PAYLOAD = 1 << 20     # the gateway (de)compresses this much or more in a thread, not on its loop
LAZY_SIZE = 1 << 20
ZLIB_SLICE = 16 << 10       # compressed bytes inflated at a time: at most ~16 MiB out


def _zlib_decompress_into(data, out: bytearray) -> int:
    # fed a slice at a time: zlib inflates without the GIL, but gathers and copies its output
    # with it, and one large output would keep every other thread (an event loop) waiting
    d = zlib.decompressobj()
    data, filled = memoryview(data), 0
    for start in range(0, len(data), ZLIB_SLICE):
        chunk = d.decompress(data[start:start + ZLIB_SLICE], len(out) - filled + 1)
        if filled + len(chunk) > len(out) or d.unconsumed_tail:
            raise ValueError("inflates beyond its stated length")
        out[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
        if d.eof:
            break
    return filled


def _algorithms() -> dict:
    algos = {"zlib": (lambda b: zlib.compress(b, 1), _zlib_decompress_into)}
    if cramjam is not None:
        algos["lz4"] = (lambda b: cramjam.lz4.compress_block(b, store_size=False), cramjam.lz4.decompress_block_into)
        algos["snappy"] = (cramjam.snappy.compress_raw, cramjam.snappy.decompress_raw_into)
        algos["zstd"] = (lambda b: cramjam.zstd.compress(b, 1), cramjam.zstd.decompress_into)
    return algos


ALGORITHMS = _algorithms()


def available() -> list[str]:
    return sorted(ALGORITHMS)


def check(name: str | None) -> str | None:
    """Validate a compression name given by a user (None or '' means none)."""
    if not name:
        return None
    if name not in ALGORITHMS:
        raise ValueError(f"unknown compression {name!r}; available here: {', '.join(available())}")
    return name


def compress(name: str, payload) -> bytes | None:
    """The framed compressed payload, or None when compressing does not make it smaller."""
    size = len(payload) if isinstance(payload, (bytes, bytearray)) else memoryview(payload).nbytes
    packed = bytes(ALGORITHMS[name][0](payload))
    if len(packed) + _LENGTH.size >= size:
        return None
    return _LENGTH.pack(size) + packed


def stated_size(data, limit: int) -> int:
    """The original length a compressed payload states (checked against ``limit``)."""
    view = memoryview(data)
    if view.nbytes < _LENGTH.size:
        raise DecodeError("compressed payload is shorter than its length prefix")
    (size,) = _LENGTH.unpack_from(view)
    if size > limit:
        raise PayloadTooLarge(f"compressed payload states {size} bytes, above the limit of {limit} bytes")
    return size


def decompress(name: str, data, limit: int, lazy: bool = False):
    """Undo ``compress``; the stated length must be at most ``limit`` and must be exact.
    With ``lazy``, a large result goes to an anonymous mapping, whose pages cost memory
    only once written: a payload that states a large size and inflates to little costs little."""
    view = memoryview(data)
    size = stated_size(view, limit)
    out = lazy_buffer(size) if lazy and size >= LAZY_SIZE else bytearray(size)
    try:
        n = ALGORITHMS[name][1](view[_LENGTH.size:], out)
    except Exception as e:
        raise DecodeError(f"cannot decompress a {name} payload: {e}") from None
    if n != size:
        raise DecodeError(f"{name} payload inflated to {n} bytes, not the {size} it stated")
    return out
