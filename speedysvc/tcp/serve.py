"""``python -m speedysvc.tcp.serve SERVICE --host H --port P``: serve a running service's
workers to TCP clients from a process of its own (LocalService starts one this way;
the manager runs its ``TcpServer`` in its own loop instead)."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from ..shm import DEFAULT_MAX_PAYLOAD
from . import eventloop
from .server import SECRET_ENV, TcpServer, make_ssl_context


async def serve(args, ready=None) -> None:
    server = TcpServer(args.service, args.host, args.port, secret=os.environ.get(SECRET_ENV),
                       ssl_context=make_ssl_context(args.tls_cert, args.tls_key), allow_pickle=args.allow_pickle,
                       max_payload=args.max_payload, max_inflight=args.max_inflight, handshake_timeout=args.handshake_timeout,
                       stall_timeout=args.stall_timeout)
    await server.start()
    print(f"listening on {server.host}:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_with_parent is not None:
        # the owner's pid, passed in: reading getppid() here would miss an owner that died
        # while we started (we would already be someone else's child)
        parent = args.exit_with_parent or os.getppid()

        def watch():   # the owner was killed (its workers go too): free its port and channels now
            if os.getppid() != parent:
                _exit_now(0)
            else:
                loop.call_later(0.5, watch)
        watch()
    await stop.wait()
    await server.close(timeout=args.stop_timeout)


def _exit_now(code: int) -> None:
    # threads still waiting on calls the workers have not answered would delay the exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    """``python -m speedysvc.tcp.serve SERVICE --host H --port P``: serve a running
    service (started by LocalService or the manager) to TCP clients until SIGTERM.
    The secret, if any, comes from the SPEEDYSVC_TCP_SECRET environment variable."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m speedysvc.tcp.serve", description=main.__doc__)
    p.add_argument("service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD)
    p.add_argument("--max-inflight", type=int, default=256, help="calls in flight to the workers at once "
                                                                  "(at most half the service's channels)")
    p.add_argument("--handshake-timeout", type=float, default=10.0)
    p.add_argument("--stall-timeout", type=float, default=30.0)
    p.add_argument("--stop-timeout", type=float, default=10.0)
    p.add_argument("--exit-with-parent", nargs="?", type=int, const=0, default=None, metavar="PID",
                   help="stop when the process that started it (PID; default: the parent at start) dies")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        eventloop.run(serve(args))
    except (ValueError, OSError) as e:
        print(f"speedysvc.tcp.serve: {e}", file=sys.stderr)
        _exit_now(2)
    _exit_now(0)


if __name__ == "__main__":
    sys.exit(main())
