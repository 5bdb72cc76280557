"""The ``pickle`` codec: any picklable value, between processes that trust each other.

Protocol 5, with out-of-band buffers: a contiguous buffer of at least ``OUT_OF_BAND_MIN``
bytes that an object hands to pickle as a ``PickleBuffer`` (numpy arrays, ``bytearray``,
``pickle.PickleBuffer`` itself) is not copied into the stream but travels beside it
(``outofband``).  What the worker gets for such a buffer is a read-only view of the call's
shared memory, valid until the method returns; what a client gets is its own copy.
"""
from __future__ import annotations

import pickle

from ..errors import DecodeError
from . import outofband
from .base import Codec, reason

OUT_OF_BAND_MIN = 65536


def _dumps(obj, _dumps=pickle.dumps, _min=OUT_OF_BAND_MIN):
    buffers = []
    stream = _dumps(obj, protocol=5, buffer_callback=buffers.append)   # (None: out of band)
    if not buffers:
        return stream
    if all(_small(b, _min) for b in buffers):   # rare: small arrays only; they go in the stream
        return _dumps(obj, protocol=5)
    if not all(_contiguous(b) for b in buffers):
        # a buffer pickle cannot send out of band as it is: in the stream, the large ones too
        return _dumps(obj, protocol=5)
    if any(_small(b, _min) for b in buffers):
        # small ones beside large ones (rare): pickled again, the small ones in the stream; beside
        # it each would take a page at least, and a decoder takes at most MAX_BUFFERS of them
        buffers = []

        def beside(buf):   # a true value keeps the buffer in the stream
            if _small(buf, _min):
                return True
            buffers.append(buf)
            return False

        stream = _dumps(obj, protocol=5, buffer_callback=beside)
    return outofband.OutOfBand(stream, buffers)


def _small(buf, limit) -> bool:
    try:
        return buf.raw().nbytes < limit
    except BufferError:
        return False


def _contiguous(buf) -> bool:
    try:
        buf.raw()
    except BufferError:
        return False
    return True


def _loads(data, _loads=pickle.loads):
    """A value of its own: out-of-band buffers are copied out of ``data``."""
    if not (len(data) and data[0] == 0):
        return _loads(data)
    stream, views = outofband.split(data)
    try:
        return _loads(stream, buffers=[bytearray(v) for v in views])
    finally:
        _release(views + [stream])


def _release(views) -> bool:
    kept = False
    for v in views:
        try:
            v.release()
        except BufferError:   # something made from it is alive
            kept = True
    return not kept


class PickleCodec(Codec):
    """Any picklable value.  Unpickling runs code chosen by the sender: use it only
    between processes that trust each other (shared memory is same-user only; over
    TCP only from authenticated clients of a service that allows it)."""

    name, id = "pickle", 3
    network_safe = False
    out_of_band = True
    dumps = staticmethod(_dumps)
    loads = staticmethod(_loads)
    loads_fast = staticmethod(pickle.loads)   # refuses an out-of-band payload (no pickle starts with 0): loads then

    def decode_args_in_place(self, method: str, data, flags: int):
        if not (len(data) and data[0] == 0):
            args, kwargs = self.decode_args(method, data, flags)
            return args, kwargs, None
        try:
            stream, views = outofband.split(data)
        except ValueError as e:
            raise DecodeError(f"cannot decode the arguments of {method}() with pickle: {e}") from None
        # The method gets each buffer as a view of its own, made through a PickleBuffer: what
        # it makes of one (an array, a slice, a cast) then holds an export of the view
        # beneath, even a slice, which shares its view's memory without being exported by it;
        # releasing the given views first, then those beneath, tells whether anything was kept.
        given = [memoryview(pickle.PickleBuffer(v)) for v in views]
        held = given + views + [stream]
        try:
            # the method reads the buffers where they are: read-only views of the request
            args, kwargs = self.decode_args(method, _Prepared(stream, given), flags)
        except BaseException:
            _release(held)
            raise
        return args, kwargs, held

    @staticmethod
    def release(held) -> bool:
        return True if held is None else _release(held)

    def decode_args(self, method: str, data, flags: int):
        if data.__class__ is _Prepared:
            try:
                value = pickle.loads(data.stream, buffers=data.views)
            except Exception as e:
                raise DecodeError(f"cannot decode the arguments of {method}() with pickle: {reason(e)}") from None
            return self._shape(method, value, flags)
        return super().decode_args(method, data, flags)


class _Prepared:
    """A request split into its stream and its buffers' views, for ``decode_args``."""
    __slots__ = ("stream", "views")

    def __init__(self, stream, views):
        self.stream, self.views = stream, views
