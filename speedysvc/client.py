"""Calling a service: ``connect()`` and the ``Client`` it returns.

``connect(EchoServer)`` gives a client whose methods have the server methods'
names and signatures; ``client.send(EchoServer.echo_json, [data])`` is the
lower-level form that ``ClientMethodsBase`` subclasses use.
"""
from __future__ import annotations

import math

from . import codecs
from urllib.parse import urlsplit

from .methods import MethodSpec, ServerMethodsBase, method_spec
from .shm import ShmTransport

_DEFAULT = ...


def _check_timeout(timeout):
    if timeout is None or timeout == math.inf:
        return None
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or not 0 <= timeout <= 86400:
        raise ValueError(f"timeout must be None or a number of seconds from 0 to 86400, got {timeout!r}")
    return float(timeout)


def make_transport(server_cls, address: str):
    """A transport for ``shm://`` (this host) or ``tcp://host[:port]``."""
    parts = urlsplit(address)
    scheme = parts.scheme.lower()
    if scheme == "shm":
        service = parts.netloc or server_cls.service_name()
        return ShmTransport(service)
    if scheme == "tcp":
        if not parts.hostname:
            raise ValueError(f"tcp address needs a host: {address!r}")
        port = parts.port or server_cls.port
        raise NotImplementedError(f"the TCP transport (tcp://{parts.hostname}:{port}) is not available "
                                  f"in this version of speedysvc; use shm:// on the same host")
    raise ValueError(f"unsupported address {address!r}: use 'shm://' or 'tcp://host[:port]'")


class Client:
    """A connection to one service.  Thread-safe; close it (or use ``with``) to
    free its shared-memory channels at once rather than at garbage collection."""

    def __init__(self, server_cls, transport, timeout: float | None = None):
        self._server_cls = server_cls
        self._transport = transport
        self._timeout = _check_timeout(timeout)

    def __repr__(self) -> str:
        return f"<speedysvc client of {self._server_cls.__qualname__} via {self._transport!r}>"

    def send(self, method, args=(), kwargs=None, *, timeout=_DEFAULT):
        """Call ``method`` (a server method, e.g. ``EchoServer.echo_json``, or its name)."""
        if isinstance(method, str):
            spec = self._server_cls._speedysvc_methods.get(method)
            if spec is None:
                from .errors import MethodNotFound
                raise MethodNotFound(f"{self._server_cls.__qualname__} has no service method {method!r}")
        else:
            spec = method_spec(method)
        return self._call(spec, tuple(args), kwargs, self._timeout if timeout is _DEFAULT else _check_timeout(timeout))

    def _call(self, spec: MethodSpec, args, kwargs, timeout):
        payload, flags = spec.codec.encode_args(spec.name, args, kwargs)
        return self._transport.call(spec.name_bytes, payload, flags, spec.codec, timeout)

    def with_timeout(self, timeout: float | None) -> "Client":
        """The same connection with another timeout for each call, in seconds (None: no limit)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._timeout = _check_timeout(timeout)
        return clone

    @property
    def timeout(self) -> float | None:
        return self._timeout

    def close(self) -> None:
        self._transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_proxy_classes: dict[type, type] = {}


def _proxy_method(spec: MethodSpec):
    codec, name, name_bytes = spec.codec, spec.name, spec.name_bytes
    encode, dumps, plain_flags = codec.encode_args, codec.dumps, codec.flags
    if codec.id == codecs.RAW.id:
        dumps = None

    def method(self, *args, **kwargs):
        if kwargs or dumps is None:
            payload, flags = encode(name, args, kwargs)
        else:
            try:
                payload, flags = dumps(args), plain_flags
            except Exception:
                payload, flags = encode(name, args, kwargs)  # raises a clear EncodeError
        return self._transport.call(name_bytes, payload, flags, codec, self._timeout)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = spec.func.__doc__
    if spec.signature is not None:
        method.__signature__ = spec.signature
    return method


def client_class(server_cls) -> type:
    """The Client subclass with one method per service method (cached per server class)."""
    cls = _proxy_classes.get(server_cls)
    if cls is None:
        attrs = {attr: _proxy_method(spec) for attr, spec in server_cls._speedysvc_methods.items()}
        attrs["__doc__"] = f"Client of {server_cls.__qualname__}."
        cls = _proxy_classes[server_cls] = type(f"{server_cls.__name__}Client", (Client,), attrs)
    return cls


def connect(server_cls, address: str = "shm://", *, timeout: float | None = None) -> Client:
    """Connect to a service: ``connect(EchoServer)`` or ``connect(EchoServer, 'tcp://host:port')``.

    ``timeout`` bounds each call in seconds (None: no limit; a call still fails at
    once if the worker serving it dies).  Nothing is contacted until the first call.
    """
    if not (isinstance(server_cls, type) and issubclass(server_cls, ServerMethodsBase)):
        raise TypeError(f"connect() takes a ServerMethodsBase subclass, not {server_cls!r}")
    if not isinstance(address, str):
        raise TypeError(f"address must be a string such as 'shm://', not {address!r}")
    return client_class(server_cls)(server_cls, make_transport(server_cls, address), timeout)


__all__ = ["Client", "connect", "client_class"]
