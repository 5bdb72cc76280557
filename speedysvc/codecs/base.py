"""What a codec is: how a method's arguments and return value become bytes, and back.

Each codec encodes a call's arguments on the caller's side and decodes them on
the server's side, then the reverse for the return value.  Positional
arguments travel as an array; keyword arguments, when given, as
``[args, kwargs]`` with the ``FLAG_KWARGS`` bit set.  The codec's id travels in
the request flags (bits 8-15) so a caller and a server that disagree get a clear
error instead of garbage.

A codec also says what it is, and the rest of the package asks it rather than
comparing it with a known codec (see ``Codec``'s capability attributes).  A new
codec is a subclass plus ``register()``; ``speedysvc.methods.codec_method``
makes its decorator.
"""
from __future__ import annotations

from ..errors import DecodeError, EncodeError, decode_exception

FLAG_KWARGS = 0x1
CODEC_SHIFT = 8
MAX_CODEC_ID = 63   # the TCP gateway's mask of refused codecs is one 64-bit word


def reason(e: BaseException) -> str:
    """What went wrong, in words: the exception's message, or when it has none (msgpack's
    StackError, for one) its type and what that type's docstring says."""
    if str(e):
        return str(e)
    doc = (type(e).__doc__ or "").strip().splitlines() if type(e).__module__ != "builtins" else []
    return f"{type(e).__name__}: {doc[0]}" if doc else type(e).__name__


class Codec:
    """Base class.  Subclasses set ``name``, ``id`` and two plain callables,
    ``dumps(obj) -> bytes`` and ``loads(bytes-like) -> obj``, which the hot
    path calls directly, and say what they are:

    ``network_safe``
        decoding what a peer sent runs no code the peer chose, so the TCP side may
        accept it from any client (pickle: False, refused unless the client
        authenticated and the service allows it);
    ``positional``
        ``loads_fast`` turns a call's encoded arguments into a plain ``list`` of
        positional arguments, so the worker's C loop can call the method without a
        Python frame of ours (json, msgpack);
    ``raw``
        no encoding at all: exactly one bytes-like value each way; a client sends a
        ``bytes`` argument as it is, and the method gets a read-only view into shared
        memory, valid until it returns;
    ``out_of_band``
        may carry buffers beside the encoded bytes: ``dumps`` may return an
        ``outofband.OutOfBand`` rather than bytes (pickle), which transports write where it
        goes; the worker decodes a request with ``decode_args_in_place`` and, after the call,
        ``release``s what it held.
    """

    name = ""
    id = 0
    network_safe = True
    positional = False
    raw = False
    out_of_band = False
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
            raise EncodeError(f"cannot encode the arguments of {method}() with {self.name}: {reason(e)}") from e

    def decode_args(self, method: str, data, flags: int):
        try:
            value = self.loads(data)
        except Exception as e:
            raise DecodeError(f"cannot decode the arguments of {method}() with {self.name}: {reason(e)}") from None
        return self._shape(method, value, flags)

    @staticmethod
    def _shape(method: str, value, flags: int):
        """(args, kwargs) of a decoded request."""
        if flags & FLAG_KWARGS:
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or not isinstance(value[0], (list, tuple)) or not isinstance(value[1], dict)):
                raise DecodeError(f"malformed keyword arguments for {method}()")
            return value[0], value[1]
        if not isinstance(value, (list, tuple)):
            raise DecodeError(f"the arguments of {method}() must be an array, got {type(value).__name__}")
        return value, None

    def decode_args_in_place(self, method: str, data, flags: int):
        """``decode_args`` for a worker that lends the request's memory to the call: ``(args,
        kwargs, held)``, where ``held`` is what of ``data`` the arguments may still refer to
        (None: nothing).  Only out-of-band codecs hold anything."""
        args, kwargs = self.decode_args(method, data, flags)
        return args, kwargs, None

    @staticmethod
    def release(held) -> bool:
        """After the call: let go of ``held``; False when the method kept a reference to it
        (the request's memory must then not be reused)."""
        return True

    def encode_result(self, method: str, value):
        try:
            return self.dumps(value)
        except Exception as e:
            raise EncodeError(f"cannot encode the return value of {method}() with {self.name}: {reason(e)}") from e

    def decode_result(self, method: bytes, data):
        """A successful response's value: ``loads_fast``, else ``loads_checked``
        (``method``: the method's name as it travels)."""
        try:
            return self.loads_fast(data)
        except Exception:
            return self.loads_checked(method, data)

    def loads_checked(self, method: bytes, data):
        """A response that ``loads_fast`` refused: ``loads``, or a DecodeError that says why."""
        try:
            return self.loads(data)
        except Exception as e:
            raise DecodeError(f"cannot decode the response of {method.decode(errors='replace')}() "
                              f"with {self.name}: {reason(e)}") from None

    @staticmethod
    def remote_error(data):
        """The service answered with an error: raise it here."""
        raise decode_exception(data)

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


# ---- the registry: codec ids as they travel, and names ------------------------------------------

BY_ID: dict[int, Codec] = {}
BY_NAME: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Make ``codec`` known by its id and name (both sides of a call must register it)."""
    if not isinstance(codec, Codec):
        raise TypeError(f"register() takes a Codec instance, not {codec!r}")
    if not isinstance(codec.id, int) or not 1 <= codec.id <= MAX_CODEC_ID:
        raise ValueError(f"a codec's id is a number from 1 to {MAX_CODEC_ID}, got {codec.id!r}")
    if not codec.name or not isinstance(codec.name, str):
        raise ValueError("a codec needs a name")
    for table, key in ((BY_ID, codec.id), (BY_NAME, codec.name)):
        other = table.get(key)
        if other is not None and other is not codec:
            raise ValueError(f"codec {key!r} is registered already ({other!r})")
    BY_ID[codec.id] = BY_NAME[codec.name] = codec
    return codec


def by_id(codec_id: int) -> Codec | None:
    return BY_ID.get(codec_id)


def codec_of(flags: int) -> Codec | None:
    """The registered codec a request's flags name (None: unknown here)."""
    return BY_ID.get(flags >> CODEC_SHIFT & 0xFF)


def mask(predicate) -> int:
    """A 64-bit mask with bit ``id`` set for each registered codec that ``predicate`` accepts."""
    return sum(1 << c.id for c in BY_ID.values() if predicate(c))
