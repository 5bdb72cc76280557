"""Exceptions raised by speedysvc, and how a server-side exception travels to the caller.

An exception raised in a server method is sent back as a small msgpack map
(type, args, message, traceback text).  The caller re-raises it as the same
type when that type's module is already imported in the calling process (the
client usually imports the server module to name its methods), and as a
:class:`RemoteError` otherwise.  No module is imported on behalf of the peer,
so a response can never make the caller run code it did not already load.
"""
from __future__ import annotations

import builtins
import os
import pwd
import sys
import traceback

import msgpack


class SpeedysvcError(Exception):
    """Base class of the errors speedysvc itself raises."""


class RemoteError(SpeedysvcError):
    """A server method raised an exception whose type the caller cannot name."""

    def __init__(self, message: str, type_name: str = "", remote_traceback: str = ""):
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.type_name}: {self.args[0]}" if self.type_name else str(self.args[0])


class MethodNotFound(SpeedysvcError, AttributeError):
    """The service has no method of that name."""


class BadArguments(SpeedysvcError, TypeError):
    """The arguments do not match the server method's signature."""


class EncodeError(SpeedysvcError, TypeError):
    """A value could not be encoded with the method's codec."""


class DecodeError(SpeedysvcError, ValueError):
    """A payload could not be decoded (corrupt, or encoded with another codec)."""


class PayloadTooLarge(SpeedysvcError, ValueError):
    """A request or response is larger than the service's payload limit."""


class ServiceUnavailable(SpeedysvcError, ConnectionError):
    """The service is not running, is stopping, or has no free channel."""


class ServiceNotUp(ServiceUnavailable):
    """The service is not serving yet, and may come: nothing serves it (its manager is not
    running, or still starting), it is starting or restarting, or its manager is gone.  The
    call was not sent.  A client waits for the service (``connect(..., wait=)``) and raises
    this when it did not come up in time."""


class WorkerDied(SpeedysvcError, ConnectionError):
    """The worker process handling the call died before answering."""


class CallTimeout(SpeedysvcError, TimeoutError):
    """The call did not complete within its timeout."""


class ServiceAlreadyRunning(SpeedysvcError, RuntimeError):
    """Another live process already serves a service of that name."""


class SegmentNotOurs(SpeedysvcError, PermissionError):
    """A name speedysvc needs in /dev/shm is taken by a file of another user, or by a symbolic
    link: speedysvc neither follows the link nor touches the file.  ``path`` is the name,
    ``uid`` its owner."""

    def __init__(self, path: str, uid: int, symlink: bool = False):
        self.path, self.uid, self.symlink = path, uid, symlink
        if symlink:
            what = f"is a symbolic link (owned by {_user_name(uid)}), which speedysvc does not follow"
        else:
            what = f"belongs to {_user_name(uid)}, not to this user ({_user_name(os.getuid())})"
        remedy = "Remove it" if uid == os.getuid() else "Remove it as root"
        super().__init__(f"{path} {what}: it is not a shared-memory segment of this service, and speedysvc "
                         f"needs the name. {remedy} (rm {path}), or run the service and its clients with "
                         f"another SPEEDYSVC_NAMESPACE")


def _user_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class NoFreeChannel(ServiceUnavailable):
    """Every shared-memory channel of the service is in use."""


class ConnectionLost(ServiceUnavailable):
    """The TCP connection broke while the call was in flight (the service may have
    restarted); the call may or may not have run.  The next call reconnects."""


class ProtocolError(SpeedysvcError, ConnectionError):
    """The peer sent something that is not the speedysvc protocol (or not this version of it)."""


class AuthenticationFailed(SpeedysvcError, PermissionError):
    """The TCP service and its client do not share the same secret."""


class NotAllowed(SpeedysvcError, PermissionError):
    """The service refuses this call over this transport (pickle over TCP, for instance)."""


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` so the server's traceback prints under the caller's."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb


def _plain(value):
    """The exception's args if msgpack can carry them, else None."""
    try:
        msgpack.packb(value, use_bin_type=True)
        return value
    except Exception:
        return None


def encode_exception(exc: BaseException, with_traceback: bool = True) -> bytes:
    cls = type(exc)
    tb = "".join(traceback.format_exception(cls, exc, exc.__traceback__)) if with_traceback else ""
    try:
        message = str(exc)
    except Exception:
        message = repr(exc)
    args = _plain(list(exc.args))
    return msgpack.packb(
        {
            "type": f"{cls.__module__}.{cls.__qualname__}",
            "module": cls.__module__,
            "qualname": cls.__qualname__,
            "args": args if args is not None else [message],
            "message": message,
            "traceback": tb,
        },
        use_bin_type=True,
    )


def _lookup_type(module: str, qualname: str):
    mod = builtins if module == "builtins" else sys.modules.get(module)
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


def decode_exception(data) -> BaseException:
    """Rebuild the exception a server sent; never raises itself."""
    try:
        info = msgpack.unpackb(data, raw=False)
        module, qualname = str(info["module"]), str(info["qualname"])
        message, tb = str(info.get("message", "")), str(info.get("traceback", ""))
        args = info.get("args") or []
        if not isinstance(args, list):
            args = [message]
    except Exception as e:  # a corrupt error payload is itself reported clearly
        return DecodeError(f"undecodable error response from the service: {e}")
    cls = _lookup_type(module, qualname)
    exc: BaseException
    if cls is None:
        exc = RemoteError(message, f"{module}.{qualname}", tb)
    else:
        try:
            exc = cls(*args)
        except Exception:
            exc = cls.__new__(cls)
            exc.args = tuple(args)
    try:
        exc.remote_traceback = tb  # type: ignore[attr-defined]
    except Exception:
        pass
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc
