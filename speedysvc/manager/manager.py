"""The service manager: every service of an ini file as a supervised pool, one process.

    python3 -m speedysvc.service service.ini      (or: speedysvc run service.ini)
    ... --reload     (for development: rolling-restart a service when its code changes)

One asyncio loop: the pools (``manager.pool``), a 100 ms tick for sampling and
autoscaling, the HTTP API and web interface, and SIGTERM/SIGINT, which stop every
service gracefully.  Beside it one thread writes the store (``store``: history,
events and the log index, kept across restarts), so that the loop never waits
for the disk; the API reads the store in the loop's executor.  If the manager itself is
killed, its workers notice their parent is gone and exit, and the next start
removes what it left in /dev/shm.
"""
from __future__ import annotations

import asyncio
import dataclasses
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
from . import method_errors
from .config import ConfigError, ManagerConfig, ServiceConfig
from .logs import LogRecord, ServiceLog
from .pool import FAILED, RUNNING, STOPPED, ServicePool
from .processes import next_slot
from .store import Store

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


def user_name() -> str:
    """This process's user, for the log: its name, or its uid when the system has no name for it
    (a container run under a uid its image does not list, as Kubernetes' runAsUser allows)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):   # (KeyError from pwd up to Python 3.12, OSError from 3.13)
        return f"uid {os.getuid()}"


def describe_services(cfg: ManagerConfig, only: set[str] | None = None) -> None:
    """Import each service class in a throwaway process (so the manager stays light and a
    broken module cannot hurt it) to learn its name, port and methods (of the sections in
    ``only``, when given: the others are known already)."""
    env = worker_env([cfg.folder])
    procs = [(s, subprocess.Popen(worker_argv(s.target, None, "--describe"),
                                  cwd=cfg.folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
             for s in cfg.services if only is None or s.section in only]
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


def read_for_reload(path: str, running: dict[str, ServiceConfig]) -> ManagerConfig:
    """Read and check the ini file again as a start would (in a thread: it waits for processes).
    The classes of new sections and of sections whose settings changed are imported again; the
    others keep what the running service learnt (an edit of a module's code is not a change of
    the configuration: ``speedysvc restart`` is for that)."""
    cfg = configmod.load(path)
    describe = set()
    for s in cfg.services:
        old = running.get(s.section)
        if old is not None and configmod.setting_keys(old) == configmod.setting_keys(s):
            s.name, s.port, s.methods = old.name, old.port, old.methods
        else:
            describe.add(s.section)
    describe_services(cfg, describe)
    return cfg


def reload_action(old: ServiceConfig, new: ServiceConfig) -> str:
    """How a running service takes its new settings (see config.SEGMENT_KEYS and the others)."""
    keys = set(configmod.changed_keys(old, new))
    if keys & set(configmod.SEGMENT_KEYS):
        return STOP_START
    if keys <= set(configmod.ORDER_KEYS):
        return SETTINGS_ONLY
    if keys <= set(configmod.TCP_KEYS):
        return TCP_RESTART
    return ROLLING


class ReloadRefused(Exception):
    """A reload that cannot happen now (the manager is stopping)."""


ROLLING, STOP_START, TCP_RESTART, SETTINGS_ONLY = \
    "rolling restart", "stop and start", "TCP gateway restarted", "settings only"
DEPENDENCY_POLL = 0.05   # seconds between two looks at the state of the services one waits for


class Manager:
    def __init__(self, cfg: ManagerConfig, reload_code: bool = False):
        self.config = cfg
        self.reload_code = reload_code   # --reload: restart services as their .py files change
        self.pools: dict[str, ServicePool] = {}
        self.started = time.time()
        self.loop_lag = 0.0   # how late the last 100 ms tick ran: the event loop's lag, in s
        # HTTP requests answered: {(route, status): count} (the web app counts them)
        self.http_requests: dict[tuple[str, int], int] = {}
        self.log = ServiceLog(os.path.join(cfg.log_dir, "manager.log"), cfg.log_max_bytes, cfg.log_backups)
        self._stop = asyncio.Event()
        self._handler = _ToServiceLog(self.log)
        self.web_url: str | None = None
        self._waiters: dict[str, asyncio.Task] = {}    # services waiting for their dependencies
        self._reload_lock = asyncio.Lock()             # one reload at a time (and none during start)
        self._signal_reloads: set[asyncio.Task] = set()
        self._starting_up = False   # the manager's own start: a service held by another process ends it
        self.store = Store(cfg.store, report=self._store_report)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._persisted: dict[str, dict] = {}   # the last history point of each pool given to the store

    # -- the store (history, events and log index kept across restarts) --------------------
    def _store_report(self, level: int, message: str) -> None:
        """The store says it cannot work, or works again (from its writer thread, or at open): the
        record is written by the event loop, the only writer of the logs."""
        loop = self._loop
        try:
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(log.log, level, "%s", message)
                return
        except RuntimeError:   # (the loop closed meanwhile)
            pass
        log.log(level, "%s", message)

    def _open_store(self) -> None:
        """Open the store, and take back what the last manager kept: the events, and the manager's
        own log ring."""
        store = self.store
        if store.open():
            try:
                store.recent_events.extend(store.events(limit=store.recent_events.maxlen))
                self._load_log(self.log, "manager")
            except Exception as e:   # (a file damaged past its header: reported, the manager runs on)
                store._failed(f"cannot read {store.path}: {e}")
        self.log.index = lambda rec: store.record_log("manager", rec)

    def _load_log(self, target: ServiceLog, name: str) -> None:
        records = self.store.search_logs(name, limit=target.recent.maxlen)
        target.recent.extend(LogRecord(r) for r in records)
        target.seq = max([target.seq] + [r["seq"] or 0 for r in records])

    def _adopt(self, pool: ServicePool) -> ServicePool:
        """Give a new pool the store: its events and log records go there, and its chart history
        and log ring start from what a previous manager kept (the last hour, the last records)."""
        store, section = self.store, pool.cfg.section
        pool.store = store
        if store.ok:
            try:
                since = time.time() - pool.history.interval * pool.history.points.maxlen
                pool.history.points.extend(store.points(section, since=since))
                self._load_log(pool.log, section)
                # the last exceptions of each method (the service page's "Last errors")
                pool.method_errors.load(store.search_logs(section, method_errors.LOGGER, limit=method_errors.LOAD))
            except Exception as e:
                store._failed(f"cannot read {store.path}: {e}")
        if pool.history.points:
            self._persisted[section] = pool.history.points[-1]
        pool.log.index = lambda rec: store.record_log(section, rec)
        return pool

    # -- the main loop ---------------------------------------------------------------------
    async def run(self, ready=None) -> None:
        """Start everything, serve until SIGTERM/SIGINT (or ``request_stop``), stop everything."""
        loop = self._loop = asyncio.get_running_loop()
        root = logging.getLogger("speedysvc")
        root.addHandler(self._handler)
        root.setLevel(logging.INFO)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        web = watcher = None
        try:
            async with self._reload_lock:   # (a SIGHUP or /api/reload now waits for the start)
                cfg = self.config
                self._open_store()
                log.info("manager %d starting %d service(s) from %s", os.getpid(), len(cfg.services), cfg.path)
                if self.store.ok:
                    log.info("store: %s", self.store.path)
                for s in cfg.services:
                    self.pools[s.section] = self._adopt(ServicePool(s, cfg.folder, loop))
                if cfg.web.port:
                    from .web.api import start_web
                    web = await start_web(self, cfg.web)
                    self.web_url = web.url
                    log.info("web interface on %s (for user %s; others need the token: speedysvc web)",
                             web.url, user_name())
                self._starting_up = True
                try:
                    await self._start_services(list(self.pools.values()))
                finally:
                    self._starting_up = False
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
            # a reload under way ends first (it may be starting services the stop must see)
            async with self._reload_lock:
                for pool in self.pools.values():
                    self.cancel_waiting(pool)
                await self._stop_services(list(self.pools.values()))
            if web is not None:
                await web.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("manager stopped")
            root.removeHandler(self._handler)
            for p in self.pools.values():
                p.close()
            self.log.index = None
            for p in self.pools.values():
                p.log.index = None
            self.store.close()
            self.log.close()

    def request_stop(self) -> None:
        self._stop.set()

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # ticks on the slots of the loop's clock where the paused pipes of the workers are
            # watched again (processes.next_slot): both in one wake-up of the loop
            before = time.monotonic()
            delay = next_slot(loop.time(), TICK) - loop.time()
            await asyncio.sleep(delay)
            now = time.monotonic()
            self.loop_lag = max(0.0, now - before - delay)
            for p in self.pools.values():
                try:
                    p.sample()
                    p.tick(now)
                    self._persist_points(p)
                except Exception:
                    log.exception("periodic work of %s failed", p.cfg.section)

    def _persist_points(self, pool: ServicePool) -> None:
        """The history points ``pool`` made since the last tick, to the store."""
        points, last = pool.history.points, self._persisted.get(pool.cfg.section)
        if not points or points[-1] is last:
            return
        new = []
        for point in reversed(points):
            if point is last:
                break
            new.append(point)
        for point in reversed(new):
            self.store.record_point(pool.cfg.section, point)
        self._persisted[pool.cfg.section] = points[-1]

    # -- start order (depends_on) ----------------------------------------------------------
    async def _start_services(self, pools: list[ServicePool]) -> None:
        """Start each of ``pools`` once the services it depends on are serving, those that do not
        depend on each other at once.  Returns when each has started (or failed to), or waits for
        a dependency that failed or is stopped: it stays waiting, and starts when that one runs.
        At the manager's start, a service's name held by another process ends the manager
        (ServiceAlreadyRunning); later (a reload) that service alone is failed."""
        for pool in pools:
            self.cancel_waiting(pool)
            self._waiters[pool.cfg.section] = asyncio.get_running_loop().create_task(self._start_when_ready(pool))
        tasks = [self._waiters[p.cfg.section] for p in pools]
        while not all(t.done() or self._blocked(p) for p, t in zip(pools, tasks)):
            await asyncio.wait(tasks, timeout=DEPENDENCY_POLL)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()

    async def _start_when_ready(self, pool: ServicePool) -> None:
        """Wait until every service ``pool`` depends on runs (``pool.waiting_for`` says which do
        not), then start it.  While it waits it is in ``_waiters`` (and can be called off); once
        it starts, no longer: a start is never cut short."""
        section = pool.cfg.section
        me = asyncio.current_task()
        try:
            said = None
            while True:
                pool.waiting_for = [d for d in pool.cfg.depends_on
                                    if d not in self.pools or self.pools[d].state != RUNNING]
                if not pool.waiting_for or pool.state not in (STOPPED, FAILED):
                    break   # (or it was started by request meanwhile)
                why = ", ".join(d + (" (failed)" if d in self.pools and self.pools[d].state == FAILED else "")
                                for d in pool.waiting_for)
                if why != said:
                    log.info("%s: waiting for %s", section, why)
                    said = why
                await asyncio.sleep(DEPENDENCY_POLL)
        finally:
            pool.waiting_for = []
            if self._waiters.get(section) is me:
                del self._waiters[section]
        if pool.state not in (STOPPED, FAILED):
            return
        try:
            await pool.start()
        except ServiceAlreadyRunning as e:
            if self._starting_up:
                raise   # (the manager's start ends: another manager runs these services)
            log.error("service %s did not start: %s", section, e)
        except Exception as e:
            log.error("service %s did not start: %s", section, e)
            pool.state, pool.failure = FAILED, str(e)

    def _blocked(self, pool: ServicePool) -> bool:
        """Waits for a service that will not run by itself: failed, stopped, or waiting for such."""
        for d in pool.waiting_for:
            dep = self.pools.get(d)
            if dep is None or dep.state == FAILED and d not in self._waiters:
                return True
            if dep.state == STOPPED and (d not in self._waiters or self._blocked(dep)):
                return True
        return False

    def cancel_waiting(self, pool: ServicePool) -> None:
        """A service waiting for its dependencies no longer starts when they run (it was stopped)."""
        task = self._waiters.pop(pool.cfg.section, None)
        if task is not None:
            task.cancel()
        pool.waiting_for = []

    async def _in_order(self, pools: list[ServicePool], first, action) -> None:
        """``action(pool)`` for each of ``pools``, after it was done for the pools among them that
        ``first(pool, other)`` says go first; the others at once.  Errors are logged."""
        done = {id(p): asyncio.Event() for p in pools}

        async def one(pool):
            try:
                for other in pools:
                    if other is not pool and first(pool, other):
                        await done[id(other)].wait()
                await action(pool)
            except Exception:
                log.exception("%s: %s failed", pool.cfg.section, getattr(action, "__name__", "action"))
            finally:
                done[id(pool)].set()
        await asyncio.gather(*(one(p) for p in pools))

    async def _stop_services(self, pools: list[ServicePool]) -> None:
        """Stop ``pools``, each after the services among them that depend on it."""
        async def stop(pool):
            await pool.stop()
        await self._in_order(pools, lambda pool, other: pool.cfg.section in other.cfg.depends_on, stop)

    # -- reloading service.ini ---------------------------------------------------------------
    def _reload_on_signal(self) -> None:
        if self._stop.is_set():
            log.info("SIGHUP ignored: the manager is stopping")
            return

        async def reload():
            try:
                await self.reload()
            except ConfigError as e:
                log.error("reload of %s refused, nothing changed: configuration error: %s", self.config.path, e)
            except Exception:
                log.exception("reload of %s failed", self.config.path)
        log.info("SIGHUP: reloading %s", self.config.path)
        task = asyncio.get_running_loop().create_task(reload())
        self._signal_reloads.add(task)   # (the loop keeps weak references to tasks)
        task.add_done_callback(self._signal_reloads.discard)

    async def reload(self) -> dict:
        """Read service.ini again and apply it: start the services added, stop those removed
        (dependents first), restart those whose settings changed (see ``reload_action``), leave
        the others alone.  An invalid file raises ConfigError and changes nothing.  Returns what
        changed (docs/http-api.md, POST /api/reload)."""
        if self._stop.is_set():
            raise ReloadRefused("the manager is stopping")
        async with self._reload_lock:
            if self._stop.is_set():
                raise ReloadRefused("the manager is stopping")
            loop = asyncio.get_running_loop()
            old = self.config
            running = {section: pool.cfg for section, pool in self.pools.items()}
            new = await loop.run_in_executor(None, read_for_reload, old.path, running)
            return await self._apply(old, new)

    async def _apply(self, old: ManagerConfig, new: ManagerConfig) -> dict:
        new_by_section = {s.section: s for s in new.services}
        removed = [p for section, p in self.pools.items() if section not in new_by_section]
        added = [s for s in new.services if s.section not in self.pools]
        changed = {s.section: (self.pools[s.section], s) for s in new.services
                   if s.section in self.pools and configmod.setting_keys(self.pools[s.section].cfg)
                   != configmod.setting_keys(s)}
        unchanged = [s.section for s in new.services if s.section in self.pools and s.section not in changed]
        result = {"config": new.path, "added": [s.section for s in added],
                  "removed": [p.cfg.section for p in removed], "restarted": list(changed), "unchanged": unchanged,
                  "changes": {}, "waiting": [], "failed": {}, "needs_manager_restart": []}
        log.info("reloading %s: %d added, %d removed, %d changed, %d unchanged", new.path, len(added),
                 len(removed), len(changed), len(unchanged))

        # 1. removed: stopped gracefully, dependents first (as the old file ordered them), then dropped
        for pool in removed:
            self.cancel_waiting(pool)
        await self._stop_services(removed)
        for pool in removed:
            del self.pools[pool.cfg.section]
            pool.close()
            log.info("%s: removed", pool.cfg.section)

        # 2. changed: each after the changed services it depends on

        async def change(pool):
            try:
                await apply_change(pool)
            except Exception as e:
                result["failed"][pool.cfg.section] = str(e)
                raise

        async def apply_change(pool):
            cfg = changed[pool.cfg.section][1]
            how = reload_action(pool.cfg, cfg)
            keys = configmod.changed_keys(pool.cfg, cfg)
            waiting = pool.cfg.section in self._waiters
            self.cancel_waiting(pool)
            if waiting or pool.state == FAILED or (how == STOP_START and pool.state != STOPPED):
                if waiting or pool.state == FAILED:
                    how = "started" if waiting else "stop and start (it had failed)"
                # callers wait through a stop and start of a running service under the same name
                same_name = cfg.name == pool.cfg.name
                await pool.stop(restarting=same_name and not waiting and pool.state != FAILED)
                if not same_name:
                    pool.drop_kept_segment()
                pool.reconfigure(cfg)
                await self._start_services([pool])
            elif pool.state == STOPPED:
                how = "settings only (it is stopped)"
                pool.reconfigure(cfg)
            elif how == ROLLING:
                pool.reconfigure(cfg)
                await pool.restart()
                await pool.restart_tcp()
            elif how == TCP_RESTART:
                # (workers that serve TCP take new TCP settings by a rolling restart: say so)
                workers_serve = any(c.bind_tcp and c.tcp_in_workers for c in (pool.cfg, cfg))
                pool.reconfigure(cfg)
                await pool.restart_tcp()
                if workers_serve:
                    how = ROLLING
            else:
                pool.reconfigure(cfg)
            result["changes"][pool.cfg.section] = {"keys": keys, "how": how}
        await self._in_order([p for p, _ in changed.values()],
                             lambda pool, other: other.cfg.section in changed[pool.cfg.section][1].depends_on, change)

        # 3. added: once their dependencies serve
        to_start = []
        for s in added:
            self.pools[s.section] = self._adopt(ServicePool(s, new.folder, asyncio.get_running_loop()))
            to_start.append(self.pools[s.section])
        self.pools = {s.section: self.pools[s.section] for s in new.services}   # in the file's order
        self.config = dataclasses.replace(new, services=[p.cfg for p in self.pools.values()], web=old.web,
                                          log_dir=old.log_dir, log_max_bytes=old.log_max_bytes,
                                          log_backups=old.log_backups, store=old.store)
        await self._start_services(to_start)

        for section in result["added"] + result["restarted"]:
            pool = self.pools[section]
            if section in self._waiters:
                result["waiting"].append(section)
            elif pool.state == FAILED:
                result["failed"].setdefault(section, pool.failure)
        if new.web != old.web:
            result["needs_manager_restart"].append(f"[{configmod.WEB_SECTION}]")
        if new.store != old.store:
            result["needs_manager_restart"].append(f"[{configmod.STORE_SECTION}]")
        if (new.log_dir, new.log_max_bytes, new.log_backups) != (old.log_dir, old.log_max_bytes, old.log_backups):
            result["needs_manager_restart"].append(f"[{configmod.DEFAULTS_SECTION}] log_* of the manager's own log")
        log.info("reloaded %s: %s", new.path, summary(result))
        for section in result["added"]:
            self.store.record_event(section, "reload", "added")
        for section in result["removed"]:
            self.store.record_event(section, "reload", "removed")
        for section in result["restarted"]:
            change = result["changes"].get(section)
            self.store.record_event(section, "reload", f"{change['how']}: {', '.join(change['keys'])}"
                                    if change else "restarted")
        self.store.record_event("manager", "reload", summary(result))
        return result

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
                        "config": self.config.path, "web": self.web_url, "loop_lag_s": self.loop_lag,
                        "store": self.store.status()},
            "services": [p.status() for p in self.pools.values()],
        }

    def ready(self) -> bool:
        return all(p.state == RUNNING and any(w["serving"] for w in p.status()["worker_list"])
                   for p in self.pools.values())


def summary(result: dict) -> str:
    """A reload's result in one line (the log's, and the CLI's first)."""
    def names(key):
        return ", ".join(result[key]) or "none"
    restarted = ", ".join(f"{s} ({result['changes'][s]['how']})" if s in result["changes"] else s
                          for s in result["restarted"]) or "none"
    text = (f"added: {names('added')}; removed: {names('removed')}; restarted: {restarted}; "
            f"unchanged: {names('unchanged')}")
    if result["waiting"]:
        text += f"; waiting for their dependencies: {names('waiting')}"
    if result["failed"]:
        text += "; failed: " + ", ".join(f"{s} ({why})" for s, why in result["failed"].items())
    if result["needs_manager_restart"]:
        text += f"; not applied until the manager restarts: {names('needs_manager_restart')}"
    return text


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
