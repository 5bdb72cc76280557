"""Who may use the manager's HTTP API and web interface.

On this host, the manager's own user (and root) may, with nothing to type: the
kernel says which uid owns the other end of a loopback connection (its socket's
line in /proc/net/tcp).  Anyone else needs the access token: the one set in
``[web monitor] token`` (or ``SPEEDYSVC_WEB_TOKEN``), else one the manager makes
at start and keeps in a file only its user can read (``token_path``), where the
``speedysvc`` command finds it and ``speedysvc web`` prints a URL that logs a
browser in.  ``/healthz`` and ``/readyz`` are open to all.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import socket

TCP_TABLES = {socket.AF_INET: "/proc/net/tcp", socket.AF_INET6: "/proc/net/tcp6"}
TIME_WAIT = "06"   # (a socket in TIME_WAIT has no owner any more: its uid column is 0)


def _hex_address(family: int, host: str, port: int) -> str:
    """An address as /proc/net/tcp{,6} writes it: the address in the kernel's byte order (each
    32-bit word little-endian on the hosts speedysvc runs on), then the port, in hex."""
    packed = ipaddress.ip_address(host).packed
    words = [packed[i:i + 4][::-1].hex().upper() for i in range(0, len(packed), 4)]
    return f"{''.join(words)}:{port:04X}"


def _candidates(peer: tuple, local: tuple) -> list[tuple[int, str, str]]:
    """(table, the peer's address, ours) to look for: an IPv4 peer seen through an IPv6 socket
    (``::ffff:127.0.0.1``) has its socket in the IPv4 table."""
    host, port = peer[0], peer[1]
    out = []
    if ":" in host:
        out.append((socket.AF_INET6, _hex_address(socket.AF_INET6, host, port),
                    _hex_address(socket.AF_INET6, local[0], local[1])))
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
        local_mapped = ipaddress.IPv6Address(local[0]).ipv4_mapped
        if mapped is not None and local_mapped is not None:
            out.append((socket.AF_INET, _hex_address(socket.AF_INET, str(mapped), port),
                        _hex_address(socket.AF_INET, str(local_mapped), local[1])))
    else:
        out.append((socket.AF_INET, _hex_address(socket.AF_INET, host, port),
                    _hex_address(socket.AF_INET, local[0], local[1])))
    return out


def peer_uid(peer: tuple | None, local: tuple | None) -> int | None:
    """The uid owning the other end of a TCP connection from ``peer`` to ``local`` (as
    getpeername() and getsockname() give them), when that end is a socket of this host
    (a loopback connection); None when it is not, or cannot be told."""
    if not peer or not local:
        return None
    try:
        if not ipaddress.ip_address(peer[0]).is_loopback and not _mapped_loopback(peer[0]):
            return None
    except ValueError:
        return None
    for family, theirs, ours in _candidates(peer, local):
        try:
            with open(TCP_TABLES[family]) as table:
                next(table)
                for line in table:
                    fields = line.split()
                    if fields[1] == theirs and fields[2] == ours and fields[3] != TIME_WAIT:
                        return int(fields[7])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return None


def _mapped_loopback(host: str) -> bool:
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return False
    return mapped is not None and mapped.is_loopback


def trusted_uid(uid: int | None) -> bool:
    """Whether a peer of this uid may use the manager without a token: its own user, or root."""
    return uid is not None and (uid == os.getuid() or uid == 0)


# ---- the token a manager makes for itself ------------------------------------------------------

def runtime_dir() -> str:
    """Where a user's manager keeps its token: ``$XDG_RUNTIME_DIR/speedysvc`` (a tmpfs of the
    user's own), else ``~/.local/state/speedysvc``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "speedysvc")
    return os.path.join(os.path.expanduser("~"), ".local", "state", "speedysvc")


def token_path(port: int) -> str:
    return os.path.join(runtime_dir(), f"manager-{port}.token")


def write_token(port: int, token: str | None = None) -> tuple[str, str]:
    """The token of the manager on ``port`` (a new one unless given), in a file only this user
    can read: (token, path)."""
    token = token or secrets.token_urlsafe(32)
    path = token_path(port)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    temp = f"{path}.{os.getpid()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(temp, path)
    return token, path


def read_token(port: int) -> str | None:
    """The token a manager of this user on ``port`` wrote, if there is one."""
    try:
        with open(token_path(port)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def remove_token(path: str, token: str) -> None:
    """Remove the token file at exit, if it is still ours (a newer manager may have replaced it)."""
    try:
        with open(path) as f:
            if f.read().strip() != token:
                return
        os.unlink(path)
    except OSError:
        pass
