"""Turning one request (method name, flags, encoded arguments) into one response.

Transport-neutral: the shared-memory worker uses it, and so can any other
server loop.  Every failure becomes an error response; nothing a caller sends
can stop the worker, nor can a method: what it raises, ``SystemExit`` and
``KeyboardInterrupt`` included, is answered as an error (the caller gets a
``RemoteError`` naming it, since it only re-raises ``Exception`` subclasses by
type) and the worker goes on serving.  Each method gets a handler of its own,
built once, so a call costs one dictionary lookup and one Python frame above
the codec and the method itself.
"""
from __future__ import annotations

import functools
import logging
import time

from .. import codecs
from .._shmcore import MAX_METHODS, STATUS_ERROR, STATUS_OK
from ..errors import BadArguments, DecodeError, EncodeError, MethodNotFound, encode_exception

_log = logging.getLogger("speedysvc.calls")


def _error(exc: BaseException, with_traceback: bool):
    return STATUS_ERROR, encode_exception(exc, with_traceback)


class ErrorLog:
    """What methods raise, logged: one record per exception (method, type, message, traceback),
    at most ``LIMIT`` per method in ``WINDOW`` seconds, so that a hot failing method cannot
    flood the log; the records left out are counted, and the count is logged when the window
    ends (``flush``, from the worker's housekeeping, or the method's next exception)."""

    LIMIT = 10
    WINDOW = 60.0

    def __init__(self):
        self.windows: dict[str, list] = {}   # method -> [window start, logged, left out]

    def record(self, method: str, exc: BaseException, bad_arguments: bool = False,
               now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        w = self.windows.get(method)
        if w is None or now - w[0] >= self.WINDOW:
            if w is not None:
                self._said_left_out(method, w)
            w = self.windows[method] = [now, 0, 0]
        if w[1] >= self.LIMIT:
            w[2] += 1
            return
        w[1] += 1
        if bad_arguments:
            _log.warning("%s() called with arguments that do not fit: %s", method, exc)
        else:
            _log.error("%s() raised %s: %s", method, type(exc).__qualname__, exc,
                       exc_info=(type(exc), exc, exc.__traceback__))

    def flush(self, now: float | None = None) -> None:
        """Log the counts of windows that have ended with records left out."""
        now = time.monotonic() if now is None else now
        for method, w in list(self.windows.items()):
            if now - w[0] >= self.WINDOW:
                self._said_left_out(method, w)
                del self.windows[method]

    def _said_left_out(self, method: str, w: list) -> None:
        if w[2]:
            _log.warning("%s(): %d more exception(s) in %.0f s were not logged (at most %d a method)",
                         method, w[2], self.WINDOW, self.LIMIT)


errors = ErrorLog()   # this process's (a worker serves one service)


def _call_error(method: str, e: BaseException, from_c: bool = False):
    # A TypeError raised by the call itself, not inside the method, means the arguments
    # do not fit: from the handler's frame its traceback has that frame alone; called
    # from C (the worker's fast path) it has none.
    tb = e.__traceback__
    if isinstance(e, TypeError) and (tb is None if from_c else tb is not None and tb.tb_next is None):
        errors.record(method, e, bad_arguments=True)
        return _error(BadArguments(f"{method}(): {e}"), False)
    errors.record(method, e)
    return _error(e, True)


class Held:
    """A response to a request whose memory the call's arguments were read from in place
    (pickle's out-of-band buffers): ``payload`` (bytes or an ``OutOfBand``) and what of the
    request the arguments held, to ``release`` once the response is written.  A server loop
    that cannot do better takes ``bytes(held)``."""

    __slots__ = ("payload", "held", "_release")

    def __init__(self, payload, held, release):
        self.payload, self.held, self._release = payload, held, release

    def release(self) -> bool:
        """False when the method kept a reference to the request's memory."""
        held, self.held = self.held, None
        return self._release(held) if held is not None else True

    def __bytes__(self) -> bytes:
        out = bytes(self.payload)
        self.payload = None
        self.release()
        return out


def _encoded(encode_result, method: str, result):
    try:
        return STATUS_OK, encode_result(method, result)
    except EncodeError as e:
        return _error(e, False)


def make_handler(fn, codec: codecs.Codec, method: str):
    """``handler(flags, data) -> (status, payload)`` for one method.  What the method
    raises is answered, an exception that is not an ``Exception`` (SystemExit,
    KeyboardInterrupt) like any other."""
    fast_flags = codec.flags
    decode_args, encode_result = codec.decode_args, codec.encode_result
    # msgpack and json decode to a list of positional arguments; raw hands over the view
    plain_loads = codec.loads_fast if codec.positional else None

    def slow(flags, data):
        sent_codec = flags >> codecs.CODEC_SHIFT & 0xFF
        if sent_codec != codec.id:
            sent = codecs.by_id(sent_codec)
            return _error(DecodeError(
                f"{method}() expects {codec.name} but the caller sent {sent.name if sent else sent_codec}; "
                f"are both sides using the same version of the service class?"), False)
        try:
            args, kwargs = decode_args(method, data, flags)
        except DecodeError as e:
            return _error(e, False)
        try:
            result = fn(*args, **kwargs) if kwargs else fn(*args)
        except BaseException as e:
            return _call_error(method, e)
        return slow_encode(result)

    slow_encode = functools.partial(_encoded, encode_result, method)

    if codec.out_of_band:
        decode_in_place, release = codec.decode_args_in_place, codec.release

        def in_place_handler(flags, data):
            # a small request (bytes: see SMALL_REQUEST) has no buffers beside it; nor does a
            # call from another codec, which ``slow`` reports
            if data.__class__ is bytes or flags >> codecs.CODEC_SHIFT & 0xFF != codec.id:
                return slow(flags, data)
            try:
                args, kwargs, held = decode_in_place(method, data, flags)
            except DecodeError as e:
                return _error(e, False)
            try:
                result = fn(*args, **kwargs) if kwargs else fn(*args)
            except BaseException as e:
                reply = _call_error(method, e)
            else:
                reply = slow_encode(result)
                del result
            del args, kwargs
            return reply if held is None else (reply[0], Held(reply[1], held, release))
        return in_place_handler

    if codec.raw:
        def raw_handler(flags, data):
            if flags != fast_flags:
                return slow(flags, data)
            try:
                result = fn(data)
            except BaseException as e:
                return _call_error(method, e)
            if result.__class__ is bytes or result.__class__ is memoryview:
                return STATUS_OK, result
            return slow_encode(result)
        return raw_handler
    if plain_loads is None:
        return slow
    dumps = codec.dumps

    def handler(flags, data):
        if flags != fast_flags:
            return slow(flags, data)
        try:
            args = plain_loads(data)
        except Exception:
            return slow(flags, data)  # reports the decoding error
        if args.__class__ is not list:
            return slow(flags, data)
        try:
            result = fn(*args)
        except BaseException as e:
            return _call_error(method, e)
        try:
            return STATUS_OK, dumps(result)
        except Exception:
            return slow_encode(result)

    return handler


def fast_path(fn, codec: codecs.Codec, method: str):
    """What the worker's C loop needs to run ``handler`` (above) itself for a codec
    whose arguments decode to a plain list, or None:
    ``(fn, loads, dumps, flags, call_failed(exc), encode_failed(result))``, the last two
    giving ``(status, payload)`` for what the method raised and for a result the codec
    cannot encode.  Anything else the C loop leaves to the handler."""
    if not codec.positional:
        return None
    return (fn, codec.loads_fast, codec.dumps, codec.flags, functools.partial(_call_error, method, from_c=True),
            functools.partial(_encoded, codec.encode_result, method))


class Dispatcher:
    def __init__(self, server):
        self.server = server
        self.service = type(server).service_name()
        methods = type(server)._speedysvc_methods
        # the index of a method's statistics; methods past MAX_METHODS get none (-1)
        self.method_names = sorted(methods)
        # name -> (handler, wants a view even for a small request, statistics index, fast path)
        self.handlers = {
            spec.name_bytes: (make_handler(getattr(server, attr), spec.codec, spec.name),
                              spec.codec.raw,
                              i if i < MAX_METHODS else -1,
                              fast_path(getattr(server, attr), spec.codec, spec.name))
            for i, (attr, spec) in enumerate(sorted(methods.items()))}

    def handle(self, name: bytes, flags: int, data):
        """Return ``(status, payload)``.  ``data`` may be a view into shared memory
        that becomes invalid once the response is sent.  ``payload`` is bytes, or what
        ``bytes()`` turns into them: an ``OutOfBand`` or a ``Held`` (a worker writes those
        into shared memory itself; see ``Worker.reply_placed``)."""
        entry = self.handlers.get(name)
        if entry is None:
            return self.unknown(name)
        return entry[0](flags, data)

    def method_index(self, name: bytes) -> int:
        entry = self.handlers.get(name)
        return -1 if entry is None else entry[2]

    def unknown(self, name: bytes):
        return _error(MethodNotFound(
            f"service {self.service!r} has no method {name.decode(errors='replace')!r}; "
            f"it has: {', '.join(sorted(m.decode() for m in self.handlers)) or 'none'}"), False)
