"""Code reload for development: ``speedysvc run service.ini --reload``.

Watches the ``.py`` files under the ini file's folder (recursively; ``__pycache__``,
``.git``, virtualenvs and the like are left out, as ``watchfiles.PythonFilter`` does)
and rolling-restarts the services a change concerns:

* a change to a service's own module (``import_from``: ``pkg.mod`` is ``pkg/mod.py`` or
  ``pkg/mod/__init__.py`` under the folder, a ``file.py`` path is that file) restarts
  the services imported from it;
* a change to any other ``.py`` file under the folder (a helper module, a new or deleted
  file) restarts every service: which service imports what is not known to the manager.

Only services that run (or failed) are restarted; a stopped one stays stopped.  A burst
of changes (an editor's save, a ``git checkout``) is one change: the restart comes once
no file has changed for ``QUIET_MS``.  A restart that fails (a syntax error, say) is
logged and the old workers serve on; the next change tries again.

The watching itself is ``watchfiles.awatch`` in the manager's asyncio loop (its
waiting for the kernel's notifications runs in a thread of its own).
"""
from __future__ import annotations

import asyncio
import logging
import os

from .pool import FAILED, RUNNING, STARTING, RestartFailed

log = logging.getLogger("speedysvc.manager")

QUIET_MS = 300       # a burst of changes ends when none came for this long...
BURST_MAX_MS = 3000  # ...or after this long at most


def check_available() -> None:
    """Raise OSError, saying what to do, when watchfiles cannot be imported."""
    import importlib
    try:
        importlib.import_module("watchfiles")
    except ImportError as e:
        raise OSError(f"--reload needs the watchfiles package (pip install watchfiles): {e}") from None


def module_files(target: str, folder: str) -> set[str]:
    """The files a service's module (``module:Class`` or ``file.py:Class``) may be, under ``folder``."""
    module = target.rpartition(":")[0]
    if module.endswith(".py"):
        return {os.path.abspath(os.path.join(folder, module))}
    base = os.path.join(folder, *module.split("."))
    return {os.path.abspath(base + ".py"), os.path.abspath(os.path.join(base, "__init__.py"))}


def affected(pools, changed: set[str], folder: str) -> list:
    """The pools that ``changed`` (absolute paths of .py files) concerns, in the ini file's order."""
    own = {id(p): module_files(p.cfg.target, folder) for p in pools}
    hit = set()
    for path in changed:
        owners = [p for p in pools if path in own[id(p)]]
        if not owners:
            return list(pools)
        hit.update(id(p) for p in owners)
    return [p for p in pools if id(p) in hit]


class CodeWatcher:
    """Restarts the manager's services as their code changes; ``start()``, then ``close()``."""

    def __init__(self, manager, folder: str):
        self.manager = manager
        self.folder = os.path.abspath(folder)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._restarts: set[asyncio.Task] = set()

    def start(self) -> "CodeWatcher":
        self._task = asyncio.get_running_loop().create_task(self._watch())
        self._task.add_done_callback(self._ended)
        log.info("reloading services when a .py file under %s changes", self.folder)
        return self

    def _ended(self, task: asyncio.Task) -> None:
        # (watching can fail: the system's limit of inotify watches, say): the services run on
        if not task.cancelled() and task.exception() is not None:
            log.error("watching %s for changes failed, --reload is off: %s", self.folder, task.exception())

    async def close(self) -> None:
        self._stop.set()    # the watching thread sees it within a step and ends
        for t in list(self._restarts):
            t.cancel()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
            except Exception:
                pass   # (said by _ended)

    async def _watch(self) -> None:
        from watchfiles import PythonFilter, awatch

        async for changes in awatch(self.folder, watch_filter=PythonFilter(), step=QUIET_MS,
                                    debounce=BURST_MAX_MS, stop_event=self._stop):
            changed = {os.path.abspath(path) for _, path in changes}
            pools = [p for p in affected(list(self.manager.pools.values()), changed, self.folder)
                     if p.state in (RUNNING, STARTING, FAILED)]
            names = ", ".join(sorted(os.path.relpath(p, self.folder) for p in changed))
            for p in pools:
                log.info("%s changed: restarting %s", names, p.cfg.section)
                task = asyncio.get_running_loop().create_task(self._restart(p))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)

    async def _restart(self, pool) -> None:
        # restarts asked for while one runs queue behind it (ServicePool.restart): a change made
        # during a restart gets a restart of its own after it
        try:
            await pool.restart()
        except RestartFailed as e:
            log.error("%s: reload failed, the old workers serve on: %s", pool.cfg.section, e)
        except Exception as e:
            log.error("%s: reload failed: %s", pool.cfg.section, e)
