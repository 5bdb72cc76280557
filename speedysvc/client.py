"""Calling a service: ``connect()`` and the ``Client`` it returns.

``connect(EchoServer)`` gives a client whose methods have the server methods'
names and signatures; ``client.send(EchoServer.echo_json, [data])`` is the
lower-level form that ``ClientMethodsBase`` subclasses use.  The transport
behind a client is chosen by the address's scheme (``speedysvc.transport``).
"""
from __future__ import annotations

import math

from .methods import MethodSpec, ServerMethodsBase, method_spec
from .transport import open_transport
from .waiting import check_wait

CLIENT_TIMEOUT = ...   # send()'s default: the client's own timeout


def check_timeout(timeout):
    """A call's timeout as the transports take it: None (no limit) or seconds, 0 to a day."""
    if timeout is None or timeout == math.inf:
        return None
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or not 0 <= timeout <= 86400:
        raise ValueError(f"timeout must be None or a number of seconds from 0 to 86400, got {timeout!r}")
    return float(timeout)


def resolve_method(server_cls, method) -> MethodSpec:
    """The spec of a server method given as the method itself or its name."""
    if isinstance(method, str):
        spec = server_cls._speedysvc_methods.get(method)
        if spec is None:
            from .errors import MethodNotFound
            raise MethodNotFound(f"{server_cls.__qualname__} has no service method {method!r}")
        return spec
    return method_spec(method)


class Client:
    """A connection to one service.  Thread-safe; close it (or use ``with``) to
    free its shared-memory channels at once rather than at garbage collection."""

    def __init__(self, server_cls, transport, timeout: float | None = None):
        self._server_cls = server_cls
        self._transport = transport
        self._timeout = check_timeout(timeout)

    def __repr__(self) -> str:
        return f"<speedysvc client of {self._server_cls.__qualname__} via {self._transport!r}>"

    def send(self, method, args=(), kwargs=None, *, timeout=CLIENT_TIMEOUT):
        """Call ``method`` (a server method, e.g. ``EchoServer.echo_json``, or its name)."""
        spec = resolve_method(self._server_cls, method)
        return self._call(spec, tuple(args), kwargs, self._timeout if timeout is CLIENT_TIMEOUT else check_timeout(timeout))

    def generated_method(self, method):
        """This client's generated method for ``method`` (a server method or its name), as
        ``client.<name>`` gives it: what ``ClientMethodsBase.send`` calls on its fast path."""
        spec = resolve_method(self._server_cls, method)
        for attr, known in self._server_cls._speedysvc_methods.items():
            if known is spec:
                return getattr(self, attr)
        return None

    def _call(self, spec: MethodSpec, args, kwargs, timeout):
        payload, flags = spec.codec.encode_args(spec.name, args, kwargs)
        return self._transport.call(spec.name_bytes, payload, flags, spec.codec, timeout)

    def with_timeout(self, timeout: float | None) -> "Client":
        """The same connection with another timeout for each call, in seconds (None: no limit)."""
        cls = type(self)
        clone = object.__new__(cls)
        # not the methods made for this client (by _ClientMethod.__get__): they carry its timeout
        made = {k for c in cls.__mro__ for k, v in vars(c).items() if isinstance(v, _ClientMethod)}
        clone.__dict__.update({k: v for k, v in self.__dict__.items() if k not in made})
        clone._timeout = check_timeout(timeout)
        return clone

    @property
    def timeout(self) -> float | None:
        return self._timeout

    def endpoints(self) -> list[dict] | None:
        """A client over several endpoints: each one's state, for debugging (``address``,
        ``host`` as configured, ``healthy``, ``inflight``, ``calls``, ``errors``, ``last_error``);
        None for a client of one address."""
        state = getattr(self._transport, "endpoints", None)
        return state() if state is not None else None

    def close(self) -> None:
        self._transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_proxy_classes: dict[type, type] = {}


def _plain_dumps(codec):
    """How a call's positional arguments are encoded without keywords (None: raw, checked by encode_args)."""
    return None if codec.raw else codec.dumps


def _proxy_method(spec: MethodSpec):
    codec, name, name_bytes = spec.codec, spec.name, spec.name_bytes
    encode, dumps, plain_flags = codec.encode_args, _plain_dumps(codec), codec.flags

    def method(self, *args, **kwargs):
        if kwargs or dumps is None:
            payload, flags = encode(name, args, kwargs)
        else:
            try:
                payload, flags = dumps(args), plain_flags
            except Exception:
                payload, flags = encode(name, args, kwargs)  # raises a clear EncodeError
        return self._transport.call(name_bytes, payload, flags, codec, self._timeout)

    return _ClientMethod(dress(method, spec), spec)


class _Detached:
    """What a generated method reads from its client, without the client: a method the
    client holds must not hold the client (the cycle would keep it from being freed)."""
    __slots__ = ("_transport", "_timeout")

    def __init__(self, transport, timeout):
        self._transport, self._timeout = transport, timeout


class _ClientMethod:
    """A generated method as a client class holds it.  On the class, and on a client
    whose transport cannot do better, it is the plain function above.  A client gets, on
    first use, its transport's own method (the optional fast path, ``bind_method``: see
    ``speedysvc.transport``), kept in its ``__dict__``, where later lookups find it first;
    it falls back to the function."""
    __slots__ = ("func", "spec", "attr", "_looks")

    def __init__(self, func, spec: MethodSpec):
        self.func, self.spec, self.attr, self._looks = func, spec, spec.name, None

    def __set_name__(self, owner, attr):
        self.attr = attr

    def __get__(self, client, owner=None):
        if client is None:
            return self.func
        bind = getattr(client._transport, "bind_method", None)
        if bind is None:
            return self.func.__get__(client, owner)
        spec, timeout = self.spec, client._timeout
        method = bind(spec.name_bytes, spec.codec, _plain_dumps(spec.codec), timeout,
                      self.func.__get__(_Detached(client._transport, timeout)))
        if self._looks is None:   # name, docstring and signature, as a bound method shows them
            looks = {"__name__": spec.name, "__qualname__": spec.name, "__doc__": spec.func.__doc__}
            if spec.signature is not None:
                looks["__signature__"] = spec.signature.replace(
                    parameters=list(spec.signature.parameters.values())[1:])
            self._looks = looks
        for key, value in self._looks.items():   # (a plain function's name and doc are not in its __dict__)
            setattr(method, key, value)
        client.__dict__[self.attr] = method
        return method


def dress(method, spec: MethodSpec):
    """Give a generated client method the server method's name, docstring and signature."""
    method.__name__ = method.__qualname__ = spec.name
    method.__doc__ = spec.func.__doc__
    if spec.signature is not None:
        method.__signature__ = spec.signature
    return method


def proxy_class(server_cls, base: type, make_method, cache: dict, kind: str = "Client") -> type:
    """The ``base`` subclass with one method per service method (cached per server class)."""
    cls = cache.get(server_cls)
    if cls is None:
        attrs = {attr: make_method(spec) for attr, spec in server_cls._speedysvc_methods.items()}
        attrs["__doc__"] = f"{kind} of {server_cls.__qualname__}."
        cls = cache[server_cls] = type(f"{server_cls.__name__}{kind.replace(' ', '')}", (base,), attrs)
    return cls


def client_class(server_cls) -> type:
    """The Client subclass with one method per service method (cached per server class)."""
    return proxy_class(server_cls, Client, _proxy_method, _proxy_classes)


def connect(server_cls, address: str = "shm://", *, timeout: float | None = None, secret=None, tls=None,
            compression: str | None = None, compress_min: int | None = None,
            connect_timeout: float | None = None, wait: float | None = None, resolver=None,
            resolve_every: float | None = None) -> Client:
    """Connect to a service: ``connect(EchoServer)`` or ``connect(EchoServer, 'tcp://host:port')``.

    ``timeout`` bounds each call in seconds (None: no limit; a call still fails at
    once if the worker serving it dies).  Nothing is contacted until the first call.

    A call to a service that is not up yet (nothing serves it, its manager is still
    starting, it is starting or restarting, its manager is gone; over TCP: nobody accepts
    connections) waits for it: up to the call's timeout, or ``speedysvc.waiting.DEFAULT_WAIT``
    (10 s) for a call without one, and at most ``wait`` seconds when ``wait`` is given
    (0: fail at once).  Then it raises ``ServiceNotUp`` (a ``ServiceUnavailable``) saying
    why.  A service stopped on purpose or failed is not waited for: ``ServiceUnavailable``
    at once, with the reason.

    Over TCP only: ``secret`` (str or bytes; default: the SPEEDYSVC_SECRET
    environment variable) proves the client to a service that requires one;
    ``tls`` is True, a CA file to trust, or an ``ssl.SSLContext``;
    ``compression`` is one of ``speedysvc.tcp.compression.available()`` and applies
    to payloads of at least ``compress_min`` bytes (default 4096) both ways;
    ``connect_timeout`` (default 10 s) bounds connecting and the handshake, as does a
    call's ``timeout`` when it is shorter (a call that connects raises ``CallTimeout`` then).

    Several TCP addresses, ``'tcp://h1:5555,h2:5555,h3'`` or ``['tcp://h1', 'tcp://h2']``,
    make a client that balances its calls over every address of those hosts and fails over
    between them (``speedysvc.tcp.balanced``; README, "Running on several hosts"):
    ``resolve_every`` (default 10 s) is how often the host names are resolved again, and
    ``resolver`` a callable ``(host, port) -> [addresses]`` in place of the system's; either
    one makes a client of one address balance over that name's addresses too.
    """
    check_server_class(server_cls, "connect")
    transport = open_transport(server_cls, address, dict(
        secret=secret, tls=tls, compression=compression, compress_min=compress_min, connect_timeout=connect_timeout,
        wait=check_wait(wait), resolver=resolver, resolve_every=resolve_every))
    return client_class(server_cls)(server_cls, transport, timeout)


def check_server_class(server_cls, caller: str) -> None:
    if not (isinstance(server_cls, type) and issubclass(server_cls, ServerMethodsBase)):
        raise TypeError(f"{caller}() takes a ServerMethodsBase subclass, not {server_cls!r}")


__all__ = ["Client", "connect", "client_class"]
