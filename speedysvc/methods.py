"""Declaring a service: ``ServerMethodsBase``, the codec decorators and ``ClientMethodsBase``."""
from __future__ import annotations

import inspect
import re
from types import MappingProxyType

from . import codecs

_NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")


class MethodSpec:
    """What both sides know about one service method: its name, its codec, and whether it is
    idempotent (a call may run twice with the effect of once: a client over several endpoints
    sends one lost in flight again, elsewhere)."""

    __slots__ = ("name", "name_bytes", "codec", "func", "signature", "idempotent")

    def __init__(self, func, codec: codecs.Codec, idempotent: bool = False):
        self.name = func.__name__
        self.name_bytes = self.name.encode()
        self.codec = codec
        self.func = func
        self.idempotent = idempotent
        try:
            self.signature = inspect.signature(func)
        except (TypeError, ValueError):
            self.signature = None

    def __repr__(self) -> str:
        return f"<method {self.name} ({self.codec.name})>"


def codec_method(codec: codecs.Codec):
    """The decorator that exposes a server method using ``codec`` (``json_method`` is
    ``codec_method(codecs.JSON)``); for a codec of your own, after ``codecs.register``.

    ``@json_method`` as it is, or ``@json_method(idempotent=True)`` for a method that may run
    twice for one call with the effect of once (a read, a put of a whole value): a client
    over several endpoints sends such a call again, once, elsewhere when its connection was
    lost while it was in flight (README, "Running on several hosts")."""
    if not isinstance(codec, codecs.Codec) or codecs.by_id(codec.id) is not codec:
        raise ValueError(f"{codec!r} is not a registered codec: codecs.register() it first")

    def decorate(func=None, *, idempotent: bool = False):
        if not isinstance(idempotent, bool):
            raise TypeError(f"idempotent= is True or False, not {idempotent!r}")
        if func is None:   # @json_method(idempotent=True)
            return lambda f: decorate(f, idempotent=idempotent)
        if not callable(func):
            raise TypeError(f"@{codec.name}_method decorates a function, not {func!r}")
        func.__speedysvc__ = MethodSpec(func, codec, idempotent)
        return func

    decorate.__name__ = f"{codec.name}_method"
    decorate.__doc__ = f"Expose a server method whose arguments and return value use {codec.name}."
    return decorate


json_method = codec_method(codecs.JSON)
msgpack_method = codec_method(codecs.MSGPACK)
pickle_method = codec_method(codecs.PICKLE)
raw_method = codec_method(codecs.RAW)


def method_spec(method) -> MethodSpec:
    spec = getattr(method, "__speedysvc__", None)
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"{method!r} is not a service method (decorate it with @json_method, @msgpack_method, ...)")
    return spec


class ServerMethodsBase:
    """Base class of a service.  Subclasses set ``port`` and ``name`` and decorate
    the methods they expose; the constructor takes no arguments and is the place to
    load heavy state (it runs once in each worker process)."""

    port: int | None = None
    name: str | None = None
    _speedysvc_methods: dict[str, MethodSpec] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        methods: dict[str, MethodSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                spec = getattr(value, "__speedysvc__", None)
                if isinstance(spec, MethodSpec):
                    methods[attr] = spec
                elif attr in methods:  # overridden without a decorator
                    del methods[attr]
        cls._speedysvc_methods = methods

    @classmethod
    def service_name(cls) -> str:
        name = cls.name
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"{cls.__qualname__}.name must be 1-64 characters of letters, digits, '_' or '-', got {name!r}")
        return name


class ClientMethodsBase:
    """Base class for hand-written clients, as in the seed README::

        class EchoClient(ClientMethodsBase):
            def echo_json(self, data):
                return self.send(EchoServer.echo_json, [data])

    ``send`` with positional arguments and the client's own timeout goes through the
    client's generated method for ``method`` (its transport's fast path), learned on the
    first call and kept per method, so a hand-written client costs about what ``connect()``'s
    generated methods cost.  Keywords or a ``timeout`` take the general path.
    """

    _fast = MappingProxyType({})    # server method -> the client's generated method (per instance)

    def __init__(self, client):
        self.client = client

    @property
    def client(self):
        return self._client

    @client.setter
    def client(self, client) -> None:
        self._client = client
        self._fast = {}   # learned from the client they belong to

    def send(self, method, args=(), kwargs=None, *, timeout=...):
        if kwargs is None and timeout is ...:
            fast = self._fast.get(method)
            if fast is None:
                fast = self._learn(method)
            if fast is not None:
                return fast(*args)
        return self._client.send(method, args, kwargs, timeout=timeout)

    def _learn(self, method):
        find = getattr(self._client, "generated_method", None)
        fast = find(method) if find is not None else None
        if fast is not None:
            if self._fast is ClientMethodsBase._fast:   # a subclass that did not call __init__
                self._fast = {}
            self._fast[method] = fast
        return fast

    def close(self) -> None:
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
