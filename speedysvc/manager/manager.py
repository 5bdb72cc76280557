"""The service manager: every service of an ini file as a supervised pool, one process.

    python3 -m speedysvc.service service.ini      (or: speedysvc run service.ini)
    ... --reload     (for development: rolling-restart a service when its code changes)

One asyncio loop and no other thread: the pools (``manager.pool``), a
100 ms tick for sampling and autoscaling, the HTTP API and web interface, and
SIGTERM/SIGINT, which stop every service gracefully.  If the manager itself is
killed, its workers notice their parent is gone and exit, and the next start
removes what it left in /dev/shm.
"""
from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import signal
import subprocess
import sys
import time

from ..errors import ServiceAlreadyRunning
from ..shm.worker import worker_argv, worker_env
from ..tcp import eventloop
from . import config as configmod
from .config import ConfigError, ManagerConfig
from .logs import ServiceLog
from .pool import FAILED, RUNNING, ServicePool

log = logging.getLogger("speedysvc.manager")
TICK = 0.1


class _ToServiceLog(logging.Handler):
    def __init__(self, target: ServiceLog):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        self.target.write(record.process or os.getpid(), record.levelname, record.name, message, record.created)


def describe_services(cfg: ManagerConfig) -> None:
    """Import each service class in a throwaway process (so the manager stays light and a
    broken module cannot hurt it) to learn its name, port and methods."""
    env = worker_env([cfg.folder])
    procs = [(s, subprocess.Popen(worker_argv(s.target, None, "--describe"),
                                  cwd=cfg.folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
             for s in cfg.services]
    error = None
    for s, p in procs:
        out, err = p.communicate(timeout=120)
        if error is not None:
            continue
        if p.returncode != 0:
            error = ConfigError(cfg.path, s.section, "import_from", (err.strip().splitlines() or ["failed"])[-1])
            continue
        info = json.loads(out)
        s.name, s.port, s.methods = info["name"], info["port"], info["methods"]
    if error is not None:
        raise error
    configmod.check_unique(cfg)
    configmod.check_policies(cfg)


class Manager:
    def __init__(self, cfg: ManagerConfig, reload_code: bool = False):
        self.config = cfg
        self.reload_code = reload_code   # --reload: restart services as their .py files change
        self.pools: dict[str, ServicePool] = {}
        self.started = time.time()
        self.log = ServiceLog(os.path.join(cfg.log_dir, "manager.log"), cfg.log_max_bytes, cfg.log_backups)
        self._stop = asyncio.Event()
        self._handler = _ToServiceLog(self.log)
        self.web_url: str | None = None

    # -- the main loop ---------------------------------------------------------------------
    async def run(self, ready=None) -> None:
        """Start everything, serve until SIGTERM/SIGINT (or ``request_stop``), stop everything."""
        loop = asyncio.get_running_loop()
        root = logging.getLogger("speedysvc")
        root.addHandler(self._handler)
        root.setLevel(logging.INFO)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        web = watcher = None
        try:
            cfg = self.config
            log.info("manager %d starting %d service(s) from %s", os.getpid(), len(cfg.services), cfg.path)
            for s in cfg.services:
                self.pools[s.section] = ServicePool(s, cfg.folder, loop)
            if cfg.web.port:
                from .web.api import start_web
                web = await start_web(self, cfg.web)
                self.web_url = web.url
                log.info("web interface on %s (for user %s; others need the token: speedysvc web)",
                         web.url, getpass.getuser())
            results = await asyncio.gather(*(p.start() for p in self.pools.values()), return_exceptions=True)
            for pool, result in zip(self.pools.values(), results):
                if isinstance(result, ServiceAlreadyRunning):
                    raise result
                if isinstance(result, BaseException):
                    log.error("service %s did not start: %s", pool.cfg.section, result)
                    pool.state, pool.failure = FAILED, str(result)
            ticker = loop.create_task(self._ticker())
            if self.reload_code:
                from .codewatch import CodeWatcher
                watcher = CodeWatcher(self, cfg.folder).start()
            if ready is not None:
                ready()
            await self._stop.wait()
            ticker.cancel()
            log.info("stopping")
        finally:
            if watcher is not None:
                await watcher.close()
            await asyncio.gather(*(p.stop() for p in self.pools.values()), return_exceptions=True)
            if web is not None:
                await web.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            log.info("manager stopped")
            root.removeHandler(self._handler)
            for p in self.pools.values():
                p.close()
            self.log.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for p in self.pools.values():
                try:
                    p.sample()
                    p.tick(now)
                except Exception:
                    log.exception("periodic work of %s failed", p.cfg.section)

    # -- the pools, by section or service name (the API starts, stops and scales them) ----
    def pool(self, name: str) -> ServicePool:
        for p in self.pools.values():
            if name in (p.cfg.section, p.cfg.name):
                return p
        raise KeyError(f"no service named {name!r}; there are: {', '.join(self.pools)}")

    # -- state (read by the API and the web interface) -------------------------------------
    def status(self) -> dict:
        return {
            "manager": {"pid": os.getpid(), "started": self.started, "uptime": time.time() - self.started,
                        "config": self.config.path, "web": self.web_url},
            "services": [p.status() for p in self.pools.values()],
        }

    def ready(self) -> bool:
        return all(p.state == RUNNING and any(w["serving"] for w in p.status()["worker_list"])
                   for p in self.pools.values())


def main(argv=None) -> int:
    """``python -m speedysvc.service service.ini``"""
    import argparse

    parser = argparse.ArgumentParser(prog="python3 -m speedysvc.service",
                                     description="Run the services of an ini file under one manager.")
    parser.add_argument("config", help="the ini file, e.g. service.ini")
    parser.add_argument("--reload", action="store_true",
                        help="for development: restart a service (rolling) when its .py files change")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        eventloop.choice()
    except ValueError as e:
        print(f"speedysvc: {e}", file=sys.stderr)
        return 2
    try:
        if args.reload:
            from .codewatch import check_available
            check_available()
        cfg = configmod.load(args.config)
        describe_services(cfg)
        eventloop.run(Manager(cfg, reload_code=args.reload).run())
    except ConfigError as e:
        print(f"speedysvc: configuration error: {e}", file=sys.stderr)
        return 2
    except ServiceAlreadyRunning as e:
        print(f"speedysvc: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"speedysvc: {e}", file=sys.stderr)
        return 1
    return 0
