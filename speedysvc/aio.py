"""Calling services from asyncio code: ``connect_async()`` and ``AsyncClient``.

    client = speedysvc.connect_async(EchoServer)                  # or 'tcp://host:port'
    print(await client.echo_json("hi"))
    await client.aclose()

Over TCP, calls from many tasks share one connection and are in flight
together.  Over shared memory, a call that is answered within the short spin
never leaves the loop's thread; a slower one is waited for in a thread, so the
loop is never blocked for longer than the spin.  The transports are in
``speedysvc.shm.aio`` and ``speedysvc.tcp.aio`` (see ``speedysvc.transport``).
"""
from __future__ import annotations

from .client import CLIENT_TIMEOUT, check_server_class, check_timeout, dress, proxy_class, resolve_method
from .methods import MethodSpec
from .transport import open_transport
from .waiting import check_wait


class AsyncClient:
    """A connection to one service for asyncio code; its methods are coroutines."""

    def __init__(self, server_cls, transport, timeout: float | None = None):
        self._server_cls = server_cls
        self._transport = transport
        self._timeout = check_timeout(timeout)

    def __repr__(self) -> str:
        return f"<speedysvc async client of {self._server_cls.__qualname__} via {self._transport!r}>"

    async def send(self, method, args=(), kwargs=None, *, timeout=CLIENT_TIMEOUT):
        """Call ``method`` (a server method, e.g. ``EchoServer.echo_json``, or its name)."""
        spec = resolve_method(self._server_cls, method)
        timeout = self._timeout if timeout is CLIENT_TIMEOUT else check_timeout(timeout)
        payload, flags = spec.codec.encode_args(spec.name, tuple(args), kwargs)
        return await self._transport.call(spec.name_bytes, payload, flags, spec.codec, timeout)

    def endpoints(self) -> list[dict] | None:
        """As ``Client.endpoints``: each endpoint's state for a client over several, else None."""
        state = getattr(self._transport, "endpoints", None)
        return state() if state is not None else None

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


_async_classes: dict[type, type] = {}


def _async_method(spec: MethodSpec):
    codec, name, name_bytes = spec.codec, spec.name, spec.name_bytes

    async def method(self, *args, **kwargs):
        payload, flags = codec.encode_args(name, args, kwargs)
        return await self._transport.call(name_bytes, payload, flags, codec, self._timeout)

    return dress(method, spec)


def async_client_class(server_cls) -> type:
    return proxy_class(server_cls, AsyncClient, _async_method, _async_classes, "Async Client")


def connect_async(server_cls, address: str = "shm://", *, timeout: float | None = None, secret=None, tls=None,
                  compression: str | None = None, compress_min: int | None = None,
                  connect_timeout: float | None = None, wait: float | None = None, resolver=None,
                  resolve_every: float | None = None) -> AsyncClient:
    """Like ``connect()``, for asyncio code: the client's methods are coroutines.
    Nothing is contacted until the first call; a call waits for a service that is not
    up yet as ``connect()``'s do (``wait``), without blocking the loop.  Several addresses
    balance as for ``connect()``; ``resolver`` may be a coroutine function here."""
    check_server_class(server_cls, "connect_async")
    transport = open_transport(server_cls, address, dict(
        secret=secret, tls=tls, compression=compression, compress_min=compress_min, connect_timeout=connect_timeout,
        wait=check_wait(wait), resolver=resolver, resolve_every=resolve_every), asyncio=True)
    return async_client_class(server_cls)(server_cls, transport, timeout)


__all__ = ["AsyncClient", "connect_async"]
