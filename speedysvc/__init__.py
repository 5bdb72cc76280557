"""speedysvc: split a Python application into services called over shared memory.

Linux only.  A client process imports this package, which loads the public API,
the codecs and, when it first calls, the transport its address names (never the
service manager or the web interface).  The layout is in docs/architecture.md:
``shm`` is the shared-memory side, ``tcp`` the TCP side, ``manager`` the service
manager.
"""
from .client import Client, connect
from .codecs import Codec
from .errors import (AuthenticationFailed, BadArguments, CallTimeout, ConnectionLost, DecodeError, EncodeError,
                     MethodNotFound, NotAllowed, PayloadTooLarge, ProtocolError, RemoteError, SegmentNotOurs,
                     ServiceAlreadyRunning, ServiceNotUp, ServiceUnavailable, SpeedysvcError, WorkerDied)
from .methods import (ClientMethodsBase, ServerMethodsBase, json_method, msgpack_method, pickle_method,
                      raw_method)

__version__ = "0.1.0"


def __getattr__(name):
    # LocalService starts processes; a client that never runs a service does not load it.
    if name == "LocalService":
        from .local import LocalService
        return LocalService
    # the asyncio client is loaded by the processes that use it
    if name in ("connect_async", "AsyncClient"):
        from . import aio
        return getattr(aio, name)
    raise AttributeError(f"module 'speedysvc' has no attribute {name!r}")

__all__ = [
    "ServerMethodsBase", "ClientMethodsBase", "json_method", "msgpack_method", "pickle_method", "raw_method",
    "connect", "Client", "connect_async", "AsyncClient", "LocalService", "Codec",
    "SpeedysvcError", "RemoteError", "MethodNotFound", "BadArguments", "EncodeError", "DecodeError",
    "PayloadTooLarge", "ServiceUnavailable", "ServiceNotUp", "WorkerDied", "CallTimeout", "ServiceAlreadyRunning",
    "ConnectionLost", "ProtocolError", "AuthenticationFailed", "NotAllowed", "SegmentNotOurs",
]
