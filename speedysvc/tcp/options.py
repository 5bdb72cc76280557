"""How a service is served to TCP clients: one options object, ``ServeOptions``.

The manager builds it from a service's ini keys, ``LocalService`` from its
arguments; ``TcpServer`` takes it, and ``python -m speedysvc.tcp.serve`` reads it
from its command line (``to_argv``/``from_argv``, one flag per field).  The
secret never travels on a command line: it is read from ``SECRET_ENV``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import ssl
from dataclasses import dataclass, field, fields

from ..shm import DEFAULT_MAX_PAYLOAD
from ..transport import is_loopback
from .framing import as_secret

SECRET_ENV = "SPEEDYSVC_TCP_SECRET"
# a worker that serves TCP itself finds its options here (``to_env``), the secret in SECRET_ENV
SERVE_ENV = "SPEEDYSVC_TCP_SERVE"
NOT_ON_THE_COMMAND_LINE = ("secret", "tls_context")   # the secret comes in the environment


def inflight_for(max_channels: int) -> int:
    """Calls the TCP side may have in flight at once: half the service's channels, so that
    shared-memory callers always find some."""
    return max(1, max_channels // 2)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 0                       # 0: any free port (see TcpServer.port once started)
    secret: str | bytes | None = None   # clients must prove it; required unless host is loopback ("": none)
    tls_cert: str | None = None         # PEM certificate (chain): serve over TLS
    tls_key: str | None = None          # its private key, if not in the same file
    # ...or an SSLContext made by the caller (client certificates, ciphers); in this process only
    tls_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    allow_pickle: bool = False          # codecs that are not network-safe, for authenticated clients
    max_payload: int = DEFAULT_MAX_PAYLOAD
    max_connections: int = 10000        # clients past the handshake (authenticated, with a secret)
    max_handshakes: int = 256           # connections in the handshake; a new one beyond closes the oldest
    max_inflight: int = 256             # calls in flight to the workers at once (see inflight_for)
    max_inflight_per_connection: int = 0   # one connection's share (0: a quarter of max_inflight)
    handshake_timeout: float = 3.0
    stall_timeout: float = 30.0         # a frame that makes no progress, or replies left unread
    min_rate: int = 16384               # bytes/s a frame in progress must arrive at, over each stall_timeout
    stop_timeout: float = 10.0          # calls in flight get this long to finish on stop
    max_waiting_threads: int = 64       # threads that wait for calls not answered at once
    inflate_budget: int = 256 << 20     # bytes of large compressed calls inflated at once

    def __post_init__(self):
        object.__setattr__(self, "secret", as_secret(self.secret))   # (frozen) "" and b"" are no secret
        if self.secret is None and not is_loopback(self.host):
            raise ValueError(f"a TCP service bound to {self.host} (not loopback) needs a shared secret "
                             f"(tcp_secret in service.ini, or the {SECRET_ENV} environment variable)")
        if self.allow_pickle and self.secret is None:
            raise ValueError("pickle over TCP is only allowed to authenticated clients: set a secret too")
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key needs tls_cert")
        if self.tls_context is not None and self.tls_cert:
            raise ValueError("give tls_cert (and tls_key) or tls_context, not both")
        if self.max_connections < 1 or self.max_handshakes < 1:
            raise ValueError("max_connections and max_handshakes must be at least 1")
        if self.min_rate < 0:
            raise ValueError("min_rate must be a number of bytes per second >= 0")

    @property
    def per_connection(self) -> int:
        """One connection's share of the calls in flight: answers its client leaves unread keep
        their channels, and one client that sends slow calls or reads nothing must leave room
        for the others."""
        return self.max_inflight_per_connection or max(1, self.max_inflight // 4)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_context is not None:
            return self.tls_context
        if not self.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls_cert, self.tls_key or None)
        return ctx

    def replace(self, **changes) -> "ServeOptions":
        return dataclasses.replace(self, **changes)

    # -- a command line for ``python -m speedysvc.tcp.serve`` ----------------------------------
    def to_argv(self) -> list[str]:
        """These options as ``speedysvc.tcp.serve`` flags (every one but the secret)."""
        if self.tls_context is not None:
            raise ValueError("an SSLContext cannot be passed to another process: give tls_cert and tls_key")
        argv = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in NOT_ON_THE_COMMAND_LINE or value is None or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type == "bool":
                argv.append(flag if value else "--no-" + flag[2:])
            else:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in fields(cls):
            if f.name in NOT_ON_THE_COMMAND_LINE:
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type == "bool":
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            else:
                kind = {"int": int, "float": float}.get(f.type, str)
                parser.add_argument(flag, type=kind, default=f.default)

    def to_env(self) -> dict:
        """These options for a worker's environment: the flags in ``SERVE_ENV`` (JSON), the
        secret, if any, in ``SECRET_ENV`` (never on a command line)."""
        import json
        # (the worker runs what its supervisor names there: shm.worker.ADDONS_ENV)
        env = {SERVE_ENV: json.dumps(self.to_argv()), "SPEEDYSVC_WORKER_ADDONS": "speedysvc.tcp.inworker:attach"}
        if self.secret is not None:
            env[SECRET_ENV] = self.secret.decode("utf-8", "surrogateescape")   # (as os.environ reads it back)
        return env

    @classmethod
    def from_env(cls, environ=os.environ) -> "ServeOptions | None":
        """The options ``to_env`` put in ``environ``, or None when it holds none."""
        import json
        flags = environ.get(SERVE_ENV)
        if not flags:
            return None
        parser = argparse.ArgumentParser(add_help=False)
        cls.add_arguments(parser)
        return cls.from_arguments(parser.parse_args(json.loads(flags)), environ)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, environ=os.environ) -> "ServeOptions":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in NOT_ON_THE_COMMAND_LINE}
        return cls(secret=environ.get(SECRET_ENV), **values)
