"""``python -m speedysvc.tcp.serve SERVICE --host H --port P``: serve a running service's
workers to TCP clients from a process of its own (LocalService starts one this way;
the manager runs its ``TcpServer`` in its own loop instead)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from . import eventloop
from .options import ServeOptions
from .server import TcpServer


async def serve(service: str, options: ServeOptions, exit_with_parent: int | None) -> None:
    server = TcpServer(service, options)
    await server.start()
    print(f"listening on {server.host}:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if exit_with_parent is not None:
        # the owner's pid, passed in: reading getppid() here would miss an owner that died
        # while we started (we would already be someone else's child)
        parent = exit_with_parent or os.getppid()

        def watch():   # the owner was killed (its workers go too): free its port and channels now
            if os.getppid() != parent:
                _exit_now(0)
            else:
                loop.call_later(0.5, watch)
        watch()
    await stop.wait()
    await server.close(timeout=options.stop_timeout)


def _exit_now(code: int) -> None:
    # threads still waiting on calls the workers have not answered would delay the exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    """``python -m speedysvc.tcp.serve SERVICE --host H --port P``: serve a running
    service (started by LocalService or the manager) to TCP clients until SIGTERM.
    The secret, if any, comes from the SPEEDYSVC_TCP_SECRET environment variable; every other
    option is a flag named after its ``ServeOptions`` field."""
    p = argparse.ArgumentParser(prog="python -m speedysvc.tcp.serve", description=main.__doc__)
    p.add_argument("service")
    ServeOptions.add_arguments(p)
    p.add_argument("--exit-with-parent", nargs="?", type=int, const=0, default=None, metavar="PID",
                   help="stop when the process that started it (PID; default: the parent at start) dies")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        eventloop.run(serve(args.service, ServeOptions.from_arguments(args), args.exit_with_parent))
    except (ValueError, OSError) as e:
        print(f"speedysvc.tcp.serve: {e}", file=sys.stderr)
        _exit_now(2)
    _exit_now(0)


if __name__ == "__main__":
    sys.exit(main())
