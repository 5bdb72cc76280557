"""One service's pool of worker processes: its lifecycle (start, stop, restart, scale), the
restart of workers that die, and the periodic work (watchdog, autoscaling, history).

Runs inside the manager's asyncio loop, with no thread of its own.  The parts it
is made of each have a module: the processes and their output (``processes``),
the autoscaling policy and its load signals (``autoscale``), the call watchdog
(``watchdog``), the charts' history (``history``) and what it reports
(``status``).  Load signals come from the service segment (calls waiting for a
worker, time the workers spent in calls), CPU and memory from psutil.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from .. import _shmcore as core
from .. import shm
from ..tcp.server import TcpServer
from . import watchdog
from .autoscale import LoadMeter, Signals, make_policy
from .config import ServiceConfig
from .history import History
from .method_errors import MethodErrors
from .logs import ServiceLog
from .processes import WorkerProcess, WorkerSet, describe_exit
from .status import service_status

log = logging.getLogger("speedysvc.manager")

STARTING, RUNNING, STOPPING, STOPPED, FAILED = "starting", "running", "stopping", "stopped", "failed"
# entries of a service segment's worker table: old and new workers of a rolling restart share it
WORKER_TABLE_SIZE = core.MAX_WORKERS


class RestartFailed(RuntimeError):
    """A rolling restart that did not replace the workers (its new ones crashed, did not serve
    within start_timeout, found no room in the worker table, or the service was stopped
    meanwhile).  The workers that served before it still do."""


class ServicePool:
    def __init__(self, cfg: ServiceConfig, folder: str, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.folder = folder
        self.loop = loop
        self.log = ServiceLog(os.path.join(cfg.log_dir, f"{cfg.section}.log"), cfg.log_max_bytes, cfg.log_backups)
        # the last exceptions of each method, read from the records the workers log about them
        # (a subscriber: it follows the log into a new file on a reload of the settings)
        self.method_errors = MethodErrors()
        self.log.subscribers.add(self.method_errors.notify)
        self.state = STOPPED
        self.failure: str | None = None
        self.segment: shm.ServiceSegment | None = None
        # the segment of the service once stopped or failed, kept so that its callers learn so
        # at once (and why) rather than wait for it; the next start replaces it, close() removes it
        self.kept_segment: shm.ServiceSegment | None = None
        self.workers = WorkerSet(loop, self.log, self._exited, self._last_look)
        self.target = cfg.min_proc_num
        self.quick_deaths = 0         # workers in a row that died within crash_window: the backoff
        self.start_crashes = 0        # workers in a row that died before serving: crash_limit
        self.serving_deaths = 0       # workers in a row that died soon after they began serving
        self.restarts = 0
        self.started_at: float | None = None
        self._restart_handle: asyncio.TimerHandle | None = None
        self.policy = make_policy(cfg, folder)
        self.load = LoadMeter()
        self._last_decision = 0.0
        self.signals = {"pending": 0.0, "busy": 0.0, "cpu": 0.0}
        self.history = History()
        # the per-method counters last read from a segment: a stopped service keeps reporting
        # them (its /metrics series stay at their last values rather than vanish)
        self.method_memory: dict[str, dict] = {}
        # calls refused or lost (refused_calls) counted by segments and TCP gateways now gone
        self._refused_before = [0, 0]
        self.segment_since: float | None = None   # time.monotonic() when the segment was made
        # changes of the target: {(direction "up"/"down", by "autoscaler"/"request"): count}
        self.scale_events: dict[tuple[str, str], int] = {}
        self.tcp: TcpServer | None = None
        # TCP served by the workers (tcp_in_workers): the socket that holds the port for the
        # service's life (tcp.inworker.reserve_port), what it holds, and the workers' options
        self.tcp_reservation = None
        self.tcp_reserved: tuple | None = None
        self.tcp_env: dict = {}
        self.restarting = False               # a rolling restart runs: autoscaling waits
        self._restart_lock = asyncio.Lock()
        self._restart_asked = 0               # restarts requested, and the last one done:
        self._restart_done = 0                # requests that queue meanwhile share one restart
        self._restart_error: BaseException | None = None
        self._candidate_deaths: dict[int, str] = {}
        self.waiting_for: list[str] = []   # the sections it depends on that are not running yet (manager)
        self.store = None   # the manager's Store: events are recorded there (manager.py)

    # -- lifetime --------------------------------------------------------------------------
    async def start(self) -> None:
        if self.state in (STARTING, RUNNING):
            return
        if self.state == STOPPING:
            raise RuntimeError(f"service {self.cfg.section} is stopping")
        cfg = self.cfg
        self.state, self.failure = STARTING, None
        self.quick_deaths = self.start_crashes = self.serving_deaths = 0
        self._event("INFO", f"starting {cfg.min_proc_num} worker(s) of {cfg.target}")
        try:
            self._retire_counts(self.kept_segment)
            self.kept_segment = None   # (create() replaces it)
            self.segment_since = time.monotonic()
            self.segment = shm.ServiceSegment.create(cfg.name, max_channels=cfg.max_channels,
                                                     max_payload=cfg.max_payload, supervised=True)
        except BaseException as e:
            # (a name squatted in /dev/shm, say: SegmentNotOurs says which and what to do)
            self.state, self.failure = (FAILED, str(e)) if isinstance(e, Exception) else (STOPPED, None)
            self._event("ERROR", f"cannot start: {e}")
            if self.state == FAILED:
                self._record("failed", f"cannot start: {e}")
            raise
        self.segment.set_state(core.SVC_SERVING)  # calls queue while the workers start
        self.started_at = time.time()
        self.target = cfg.min_proc_num
        self.policy.started(time.monotonic())
        if cfg.bind_tcp and cfg.tcp_in_workers:
            try:
                self._reserve_tcp()
            except OSError as e:
                await self._fail(f"cannot accept TCP clients on {cfg.bind_tcp}:{cfg.port}: {e}")
                return
        for _ in range(self.target):
            self._spawn()
        deadline = time.monotonic() + cfg.start_timeout
        while self.state == STARTING and len(self._note_serving(self.registered())) < self.target:
            if time.monotonic() > deadline:
                await self._fail(f"workers did not start within start_timeout ({cfg.start_timeout} s)")
                break
            await asyncio.sleep(0.02)
        if self.state == STARTING and cfg.bind_tcp and not cfg.tcp_in_workers:
            await self._start_tcp()
        elif self.state == STARTING and cfg.bind_tcp:
            self._event("INFO", f"the workers accept TCP clients on {cfg.bind_tcp}:{self.tcp_port}"
                                + (" over TLS" if cfg.tcp_tls_cert else "")
                                + (" (secret required)" if cfg.tcp_secret else ""))
        if self.state == STARTING:
            self.state = RUNNING
            self._event("INFO", f"running with {len(self.workers)} worker(s)")
            self._record("start", f"running with {len(self.workers)} worker(s)")

    @property
    def tcp_port(self) -> int | None:
        """The port TCP clients connect to (workers' TCP: the one reserved), or None."""
        if self.tcp is not None:
            return self.tcp.port
        return self.tcp_reservation.getsockname()[1] if self.tcp_reservation is not None else None

    def _reserve_tcp(self) -> bool:
        """Workers that serve TCP: hold the port (kept across restarts, so that port 0 resolves
        once and nobody takes it meanwhile) and make the options the workers get in their
        environment (the secret there too, never on a command line).  OSError if the port
        cannot be bound."""
        from ..tcp.inworker import reserve_port
        cfg = self.cfg
        options = cfg.tcp_options()
        if self.tcp_reservation is None or self.tcp_reserved != (options.host, options.port):
            self._release_tcp()
            self.tcp_reservation = reserve_port(options.host, options.port)
            self.tcp_reserved = (options.host, options.port)
        self.tcp_env = options.replace(port=self.tcp_port).to_env()

    def _release_tcp(self) -> None:
        if self.tcp_reservation is not None:
            self.tcp_reservation.close()
        self.tcp_reservation, self.tcp_reserved, self.tcp_env = None, None, {}

    async def _start_tcp(self) -> None:
        cfg = self.cfg
        try:
            self.tcp = await TcpServer(cfg.name, cfg.tcp_options()).start()
        except (OSError, ValueError) as e:
            self.tcp = None
            await self._fail(f"cannot accept TCP clients on {cfg.bind_tcp}:{cfg.port}: {e}")
            return
        self._event("INFO", f"accepting TCP clients on {cfg.bind_tcp}:{self.tcp.port}"
                            + (" over TLS" if cfg.tcp_tls_cert else "")
                            + (" (secret required)" if cfg.tcp_secret else ""))

    async def stop(self, timeout: float | None = None, *, restarting: bool = False,
                   failure: str | None = None) -> None:
        """Refuse new calls, let running and queued ones finish (up to ``stop_timeout``),
        then stop the workers.  The service segment stays (``kept_segment``), STOPPED, or
        FAILED with ``failure``, and the reason, so that a caller fails at once saying so; with
        ``restarting`` (a hard restart: a start follows), callers wait for the new segment
        instead.  The channels' shared memory goes; ``close()`` removes the rest."""
        if self.state == STOPPED:
            return
        timeout = self.cfg.stop_timeout if timeout is None else timeout
        was_failed = self.state == FAILED
        if not was_failed:
            self.state = STOPPING
        reason = (failure if failure is not None
                  else "it is restarting" if restarting else "stopped on request (speedysvc start starts it)")
        if self.segment is not None:   # (what a caller sees is said before it is so)
            self.segment.set_reason(reason)
            if restarting:
                self.segment.set_owner_flag(core.OWNER_RESTARTING)
        if self.tcp is not None:
            # TCP calls in flight finish first (new ones are refused), then the clients are told
            tcp, self.tcp = self.tcp, None
            self._closing_tcp = tcp
            try:
                await tcp.close(timeout, "the service is restarting" if restarting else "the service is stopping")
            finally:
                self._closing_tcp = None
                self._retire_counts(tcp=tcp)
        if self._restart_handle:
            self._restart_handle.cancel()
            self._restart_handle = None
        if self.segment is not None:
            self.segment.set_state(core.SVC_STOPPING)
            self.segment.kick_workers()
        for w in self.workers:
            w.leaving = True
        try:
            await asyncio.wait_for(self.workers.all_exited.wait(), timeout)
        except asyncio.TimeoutError:
            for w in list(self.workers):
                self._event("WARNING", f"worker {w.pid} did not stop within {timeout} s: killing it")
                w.signal(signal.SIGKILL)
            try:
                await asyncio.wait_for(self.workers.all_exited.wait(), 5)
            except asyncio.TimeoutError:
                log.error("workers of %s survived SIGKILL: %s", self.cfg.section, [w.pid for w in self.workers])
        if self.segment is not None:
            self.method_memory = self.segment.method_stats()
            self.segment.keep_stopped(core.SVC_STOPPED if failure is None else core.SVC_FAILED, reason, restarting)
            self.kept_segment, self.segment = self.segment, None
        if not was_failed:
            self.state = STOPPED
            self._event("INFO", "stopped")
            if failure is None:
                self._record("stop", reason)

    # -- restart -----------------------------------------------------------------------------
    async def restart(self, hard: bool = False) -> None:
        """Replace the workers with fresh processes (which import the service's code anew).

        Rolling (the default): new workers start beside the old ones and, once they serve, the
        old ones finish their calls and leave; calls go on meanwhile.  ``hard``: stop, then
        start.  A stopped or failed service is simply started.  A restart asked for while
        another runs waits for it, then runs once for every request that waited (so its workers
        import the code as it is when it begins).

        The restart runs to its end even if the caller is cancelled (a restart cut in the middle
        would leave new workers half adopted)."""
        task = self.loop.create_task(self._restart(hard))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())   # (retrieved: no warning)
        await asyncio.shield(task)

    async def _restart(self, hard: bool) -> None:
        self._restart_asked += 1
        mine = self._restart_asked
        async with self._restart_lock:
            if self._restart_done >= mine:   # a restart that began after our request covered it
                if self._restart_error is not None:
                    raise self._restart_error
                return
            self._restart_done = self._restart_asked
            self._restart_error = None
            try:
                if hard:   # (callers wait for the start: the segment says "restarting")
                    await self.stop(restarting=True)
                    await self.start()
                    if self.state == RUNNING:
                        self._record("restart", f"hard restart: {len(self.workers)} worker(s)")
                else:
                    await self._rolling_restart()
            except BaseException as e:
                self._restart_error = e
                raise

    async def _rolling_restart(self) -> None:
        while self.state == STARTING:   # a start under way: restart what it started
            await asyncio.sleep(0.02)
        if self.state in (STOPPED, FAILED):
            await self.start()
            return
        if self.state != RUNNING:
            raise RuntimeError(f"service {self.cfg.section} is {self.state}")
        cfg = self.cfg
        old = self.workers.live()
        # the pool's size, within the configuration's bounds (they may have changed since it started)
        want = self.target = max(cfg.min_proc_num, min(cfg.max_proc_num, self.target))
        self.restarting = True
        self._event("INFO", f"rolling restart: starting {want} new worker(s) beside {len(old)}")
        started = 0
        try:
            while started < want:
                # the worker table holds old and new workers together: with too little room
                # for all the new ones at once, replace them a batch at a time
                room = self._table_room()
                if room <= 0:
                    raise RestartFailed(f"no room in the worker table ({WORKER_TABLE_SIZE} entries) "
                                        f"for a new worker; restart with --hard")
                n = min(want - started, room)
                batch = [self._spawn_candidate() for _ in range(n)]
                await self._until_serving(batch)
                started += n
                old = [w for w in old if self.workers.get(w.pid) is w and not w.leaving]
                leaving = old if started >= want else self._pick_leavers(old, n)
                await self._retire(leaving)
                old = [w for w in old if w not in leaving]
        except RestartFailed as e:
            if started:
                raise RestartFailed(f"{e} ({started} of {want} workers were replaced before)") from None
            raise
        finally:
            self.restarting = False
            # an old worker that died meanwhile was not replaced (the new ones counted): now it is
            if self.state == RUNNING and self._restart_handle is None and len(self.workers.live()) < self.target:
                self._replenish()
        self._event("INFO", f"rolling restart done: {len(self.workers.live())} new worker(s) serving")
        self._record("restart", f"rolling restart: {len(self.workers.live())} new worker(s) serving")

    def _table_room(self) -> int:
        """Entries of the worker table free for another worker: none taken by a process of ours
        (it may not have registered yet) or by another (a dead one not reaped yet)."""
        used = {r["pid"] for r in (self.segment.workers() if self.segment is not None else [])}
        return WORKER_TABLE_SIZE - len(used | {w.pid for w in self.workers})

    def _spawn_candidate(self) -> WorkerProcess:
        w = self._spawn()
        w.candidate = True
        return w

    def _pick_leavers(self, old: list[WorkerProcess], n: int) -> list[WorkerProcess]:
        """The ``n`` old workers to retire first: idle ones, the oldest first."""
        busy = {r["pid"] for r in self.registered() if r["busy"]}
        return sorted(old, key=lambda w: (w.pid in busy, w.started))[:n]

    async def _until_serving(self, batch: list[WorkerProcess]) -> None:
        """Wait until every worker of ``batch`` is in the worker table (serving), then adopt them.
        If one dies first, or they take longer than start_timeout, or the service stops, take the
        batch back (its workers that serve finish their calls; the others are killed) and raise
        RestartFailed: the old workers serve on."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.start_timeout
        pids = {w.pid for w in batch}
        reason = None
        while reason is None:
            if self.state != RUNNING:
                reason = f"the service was {self.state} meanwhile"
                break
            dead = [pid for pid in pids if pid in self._candidate_deaths]
            if dead:
                reason = self._candidate_deaths[dead[0]]
                break
            serving = {r["pid"] for r in self._note_serving(self.registered())}
            if pids <= serving:
                for w in batch:
                    w.candidate = False
                return
            if time.monotonic() > deadline:
                reason = f"the new workers did not serve within start_timeout ({cfg.start_timeout} s)"
                break
            await asyncio.sleep(0.02)
        for pid in pids:
            self._candidate_deaths.pop(pid, None)
        serving = {r["pid"] for r in self.registered()}
        alive = [w for w in batch if self.workers.get(w.pid) is w]
        for w in alive:
            w.candidate = False
        # one that serves may have claimed a call: it leaves as a retired worker does
        await self._retire([w for w in alive if w.pid in serving],
                           kill=[w for w in alive if w.pid not in serving])
        self._event("ERROR", f"rolling restart failed: {reason}; the old workers serve on")
        raise RestartFailed(reason)

    async def _retire(self, workers: list[WorkerProcess], kill: list[WorkerProcess] = ()) -> None:
        """Let ``workers`` finish the call in hand and leave (SIGTERM: a worker then claims no
        other call), killing those still there after stop_timeout; ``kill`` are killed at once.
        Returns once all have exited."""
        timeout = self.cfg.stop_timeout
        for w in workers:
            w.leaving = True
            w.signal(signal.SIGTERM)
        for w in kill:
            w.leaving = True
            w.signal(signal.SIGKILL)
        everyone = list(workers) + list(kill)
        deadline = time.monotonic() + timeout
        while any(self.workers.get(w.pid) is w for w in everyone):
            if time.monotonic() > deadline:
                for w in everyone:
                    if self.workers.get(w.pid) is w:
                        self._event("WARNING", f"worker {w.pid} did not stop within stop_timeout ({timeout} s): "
                                               f"killing it")
                        w.signal(signal.SIGKILL)
                deadline = float("inf")
            await asyncio.sleep(0.02)

    def _last_words(self, w: WorkerProcess) -> str | None:
        """Why a worker that died said it did: the last line of its last ERROR record (a worker
        that could not start logs its traceback as one), else the last line it wrote to stderr."""
        for r in reversed(self.log.recent):
            if r["pid"] == w.pid and (r["logger"] == "stderr" or r["level"] in ("ERROR", "CRITICAL")):
                lines = [line for line in r["message"].splitlines() if line.strip()]
                if lines:
                    return lines[-1].strip()
        return None

    def _candidate_died(self, w: WorkerProcess, how: str) -> None:
        """A new worker of a rolling restart died before it served: the restart fails (and says
        why, with the last line the worker wrote to stderr: its traceback's), not the service."""
        said = f"new worker {w.pid} died ({how}) before it served"
        last = self._last_words(w)
        if last:
            said += f": {last}"
        self._candidate_deaths[w.pid] = said
        self._event("ERROR", said)
        self._record("crash", said)

    def scale(self, n: int) -> None:
        """Run ``n`` workers (within min_proc_num..max_proc_num); autoscaling goes on from there."""
        cfg = self.cfg
        if not cfg.min_proc_num <= n <= cfg.max_proc_num:
            raise ValueError(f"{cfg.section} runs {cfg.min_proc_num} to {cfg.max_proc_num} workers "
                             f"(min_proc_num, max_proc_num); {n} is outside")
        if self.state != RUNNING:
            raise RuntimeError(f"service {cfg.section} is {self.state}")
        if self.restarting:
            raise RuntimeError(f"service {cfg.section} is restarting; scale it once the restart is done")
        old = self.target
        self._set_target(n, "scaled by request")
        self.policy.scaled(time.monotonic())
        if n != old:
            self._record("scale", f"{old} -> {n} worker(s)")

    def close(self) -> None:
        """After ``stop``, when the manager exits (or the service is no longer configured):
        remove the segment a stopped service kept; its callers then wait for a manager."""
        self.drop_kept_segment()
        self._release_tcp()
        self.log.close()

    def drop_kept_segment(self) -> None:
        """Remove the segment a stopped service kept (its name is going out of use)."""
        kept, self.kept_segment = self.kept_segment, None
        self._retire_counts(kept)
        if kept is not None:
            kept.destroy()   # (only if the name is still ours: another owner may have taken it)

    def _record(self, kind: str, detail: str, by: str | None = None) -> None:
        """An event of the service's life (start, stop, crash...) for the charts' markers."""
        if self.store is not None:
            self.store.record_event(self.cfg.section, kind, detail, by)

    def _event(self, level: str, message: str) -> None:
        """A lifecycle event: in the service's log, and in the manager's."""
        self.log.write(os.getpid(), level, "manager", message)
        log.log(getattr(logging, level), "%s: %s", self.cfg.section, message)

    async def _fail(self, reason: str) -> None:
        if self.state in (FAILED, STOPPED):
            return
        self.failure = reason
        self._event("ERROR", f"service marked failed: {reason}")
        self._record("failed", reason)
        self.state = STOPPING
        await self.stop(timeout=2.0, failure=reason)
        self.state = FAILED

    # -- workers ---------------------------------------------------------------------------
    def registered(self) -> list[dict]:
        """The workers serving, as the service segment's worker table has them."""
        return [r for r in self.segment.workers() if r["alive"]] if self.segment is not None else []

    def _note_serving(self, registered: list[dict]) -> list[dict]:
        """Mark the workers seen serving (should one die without its entry, it had served)."""
        for r in registered:
            w = self.workers.get(r["pid"])
            if w is not None:
                w.serving = True
        return registered

    def _spawn(self) -> WorkerProcess:
        cfg = self.cfg
        w = self.workers.spawn(cfg.target, cfg.name, self.folder, cfg.log_level,
                               self.tcp_env if cfg.bind_tcp and cfg.tcp_in_workers else None)
        self._event("INFO", f"started worker {w.pid}")
        return w

    def _last_look(self, w: WorkerProcess) -> None:
        """A worker died: read its worker-table entry (did it serve, was it in a call, which)
        before ``reap()`` frees it.  Other processes leave a zombie's entry alone."""
        if self.segment is not None:
            w.last_entry = self.segment.worker_entry(w.pid)
            if w.last_entry is not None:
                w.serving = True

    def _exited(self, w: WorkerProcess, code: int) -> None:
        if self.segment is not None:
            self.segment.reap()  # frees its worker-table entry and any channel it held
        how = describe_exit(code)
        if w.candidate and not w.leaving:
            self._candidate_died(w, how)
        elif w.leaving or self.state in (STOPPING, STOPPED, FAILED):
            self._event("INFO", f"worker {w.pid} exited ({how})")
        else:
            self._crashed(w, how)

    def _death_circumstances(self, w: WorkerProcess) -> tuple[bool, str]:
        """(in a call, where it was) for a worker that died: in a call to which method, between
        calls, before its first call, or while starting (it never served)."""
        entry = w.last_entry
        if entry is None:
            return False, "outside a call" if w.serving else "while starting"
        name = self.segment.method_name if self.segment is not None else (lambda i: None)
        if entry["busy"]:
            method = name(entry["method"])
            return True, f"in a call to {method}()" if method else "in a call"
        last = name(entry["last_method"])
        if last:
            return False, f"between calls (its last call: {last}())"
        return False, "between calls" if entry["calls"] else "before its first call"

    def _crashed(self, w: WorkerProcess, how: str) -> None:
        """A worker died while it was meant to run.  One that died before it served (while
        starting, or idle before its first call within crash_window) is a start crash:
        ``crash_limit`` of them in a row mark the service failed.  One that died while serving
        (a call that kills its worker, the call watchdog, the OOM killer) never does: the
        caller got WorkerDied, and the worker is restarted like any other."""
        cfg = self.cfg
        uptime = time.monotonic() - w.started
        quick = uptime < cfg.crash_window
        self.quick_deaths = self.quick_deaths + 1 if quick else 1
        in_call, where = self._death_circumstances(w)
        why = f", killed by the call watchdog: over call_timeout ({cfg.call_timeout} s)" if w.watchdog_killed else ""
        said = f"worker {w.pid} died ({how}{why}) {where}, {uptime:.1f} s after it was started"
        if not w.serving or (where == "before its first call" and quick):
            self.start_crashes += 1
            last = self._last_words(w) if not w.serving else None
            self._event("ERROR", f"{said}: start crash {self.start_crashes} in a row (crash_limit {cfg.crash_limit})"
                                 + (f": {last}" if last else ""))
            self._record("crash", said + (f": {last}" if last else ""))
            if self.start_crashes >= cfg.crash_limit:
                self.loop.create_task(self._fail(f"{self.start_crashes} workers in a row died while starting, "
                                                 f"before they served (crash_limit {cfg.crash_limit})"))
                return
        else:
            self.start_crashes = 0
            self.serving_deaths = self.serving_deaths + 1 if quick else 1
            self._event("ERROR", said + ("; its caller got WorkerDied" if in_call else ""))
            self._record("crash", said)
            if quick and self.serving_deaths % cfg.crash_limit == 0:
                self._event("ERROR", f"{self.serving_deaths} workers in a row died while serving, within "
                                     f"crash_window ({cfg.crash_window} s) of starting; the last one {where}: "
                                     f"calls may be killing them. The service stays up; restarts wait up to "
                                     f"restart_backoff_max ({cfg.restart_backoff_max} s)")
        delay = min(cfg.restart_backoff * 2 ** (self.quick_deaths - 1), cfg.restart_backoff_max)
        self._event("INFO", f"restarting a worker in {delay:.2f} s")
        if self._restart_handle is None:
            self._restart_handle = self.loop.call_later(delay, self._replenish)

    def _replenish(self) -> None:
        self._restart_handle = None
        if self.state not in (STARTING, RUNNING):
            return
        while len(self.workers.live()) < self.target:
            self.restarts += 1
            self._spawn()

    def _set_target(self, n: int, why: str, by: str = "request") -> None:
        old, self.target = self.target, n
        if n == old:
            return
        key = ("up" if n > old else "down", by)
        self.scale_events[key] = self.scale_events.get(key, 0) + 1
        self._event("INFO", f"{why}: {old} -> {n} worker(s)")
        live = self.workers.live()
        if n > len(live):
            for _ in range(n - len(live)):
                self._spawn()
        else:
            # idle workers leave first, the youngest first
            busy = {r["pid"] for r in self.registered() if r["busy"]}
            for w in sorted(live, key=lambda w: (w.pid in busy, -w.started))[:len(live) - n]:
                w.leaving = True
                w.signal(signal.SIGTERM)

    # -- calls refused or lost ---------------------------------------------------------------
    _closing_tcp: TcpServer | None = None

    def _retire_counts(self, seg: shm.ServiceSegment | None = None, tcp: TcpServer | None = None) -> None:
        """A segment (or TCP gateway) goes: keep what its callers counted (``refused_calls``)."""
        if seg is not None:
            refused, lost = seg.refused_calls()
            self._refused_before[0] += refused
            self._refused_before[1] += lost
        if tcp is not None:
            self._refused_before[0] += tcp.counters["unavailable"]

    def refused_calls(self) -> tuple[int, int]:
        """(refused, lost) since the manager started: calls its callers were refused (the service
        stopping, stopped, failed, or not up within their wait; and TCP calls the gateway turned
        away as it closed) and calls lost with WorkerDied.  Counted by the callers themselves in
        the service segment (``ServiceSegment.count_refused``), summed over the segments."""
        refused, lost = self._refused_before
        for seg in (self.segment, self.kept_segment):
            if seg is not None:
                r, lo = seg.refused_calls()
                refused, lost = refused + r, lost + lo
        for tcp in (self.tcp, self._closing_tcp):
            if tcp is not None:
                refused += tcp.counters["unavailable"]
        return refused, lost

    # -- periodic work ---------------------------------------------------------------------
    def sample(self) -> None:
        """Called often (every 100 ms): the calls waiting for a worker."""
        if self.segment is not None and self.state == RUNNING:
            self.load.sample_pending(self.segment.pending_calls())

    def tick(self, now: float) -> None:
        """Called every 100 ms: watchdog, autoscaling and history when they are due."""
        if self.segment is None or self.state != RUNNING:
            if self.state in (STOPPED, FAILED) and self.history.due(now):
                # points go on while nothing serves: 0 calls/s, no latency, and the calls refused
                self.history.record(None, now, refused=self.refused_calls(), state=self.state, workers=0,
                                    pending=0, busy=0.0, cpu=0.0, rss=0)
            return
        # (no decisions while a rolling restart runs: its extra workers are not load)
        decide = now - self._last_decision >= self.cfg.scale_interval and not self.restarting
        # The worker table is read (and each entry's process looked up in /proc) only when
        # something needs it: the watchdog (call_timeout), a decision of the autoscaler, or a
        # worker not yet seen serving.  Otherwise a tick of a quiet, steady service reads no
        # more than its waiting calls: the manager's own cost at 10 ticks/s.
        if self.cfg.call_timeout or decide or not all(w.serving for w in self.workers):
            registered = self._note_serving(self.registered())
            self._watchdog(registered)
            if decide:
                self._last_decision = now
                self._autoscale(registered, now)
        if self.history.due(now):
            stats = self.segment.method_stats()
            self.method_memory = stats
            self.history.record(stats, now, origin=(self.segment.ino, self.segment_since), origin_since=self.segment_since,
                                refused=self.refused_calls(), state=self.state, workers=len(self.workers),
                                pending=self.signals["pending"], busy=self.signals["busy"],
                                cpu=self.workers.cpu(), rss=self.workers.rss())

    def _watchdog(self, registered: list[dict]) -> None:
        limit = self.cfg.call_timeout
        for pid in watchdog.overdue(registered, limit, time.monotonic_ns()):
            w = self.workers.get(pid)
            if w is not None and not w.leaving and not w.watchdog_killed:
                r = next(r for r in registered if r["pid"] == pid)
                method = self.segment.method_name(r["method"])
                self._event("ERROR", f"worker {w.pid} spent more than call_timeout ({limit} s) on one call"
                                     + (f" to {method}()" if method else "") + ": killing it")
                w.watchdog_killed = True
                w.signal(signal.SIGKILL)

    def _autoscale(self, registered: list[dict], now: float) -> None:
        pending, busy = self.load.measure(registered, now, time.monotonic_ns())
        self.workers.sample()
        live = self.workers.live()
        serving = {r["pid"] for r in registered}
        if self._restart_handle is not None or len(live) < self.target or any(w.pid not in serving for w in live):
            return   # workers are being replaced or still starting (importing costs CPU): not load
        cpu = sum(w.cpu for w in live) / len(live) if live else 0.0
        self.signals = {"pending": pending, "busy": busy, "cpu": cpu}
        try:
            change = self.policy.decide(Signals(len(live), pending, busy, cpu, now))
        except Exception:
            log.exception("%s: the autoscaling policy failed; the workers stay as they are", self.cfg.section)
            return
        n = max(self.cfg.min_proc_num, min(self.cfg.max_proc_num, len(live) + change))
        if n > len(live):
            why = f"autoscale up (waiting {pending:.1f}, busy {busy:.0%}, cpu {cpu:.0%})"
        elif n < len(live):
            why = f"autoscale down (busy {busy:.0%}, cpu {cpu:.0%})"
        else:
            return
        self._set_target(n, why, "autoscaler")
        self._record("autoscale", f"{len(live)} -> {n} worker(s): {why.removeprefix('autoscale ')}", by="autoscaler")

    # -- reconfiguration (a reload of service.ini) ------------------------------------------
    def reconfigure(self, cfg: ServiceConfig) -> None:
        """Take new settings of this service's section.  Workers started from now on use them;
        running ones are left alone (the manager restarts them as the change needs)."""
        old, self.cfg = self.cfg, cfg
        if (old.log_dir, old.section, old.log_max_bytes, old.log_backups) != \
                (cfg.log_dir, cfg.section, cfg.log_max_bytes, cfg.log_backups):
            # the same records in memory and the same live followers, in the new file
            new_log = ServiceLog(os.path.join(cfg.log_dir, f"{cfg.section}.log"), cfg.log_max_bytes, cfg.log_backups)
            new_log.recent, new_log.subscribers, new_log.seq = self.log.recent, self.log.subscribers, self.log.seq
            new_log.index = self.log.index
            self.log.close()
            self.log = self.workers.log = new_log
        self.policy = make_policy(cfg, self.folder)   # (a policy reads its limits from the settings)
        self.policy.started(time.monotonic())
        self.target = max(cfg.min_proc_num, min(cfg.max_proc_num, self.target)) \
            if self.state in (STARTING, RUNNING) else cfg.min_proc_num
        self._event("INFO", f"settings of [{cfg.section}] reloaded")

    async def restart_tcp(self) -> bool:
        """Serve TCP clients as the settings now say (``bind_tcp``, ``tcp_*``, the port): a new
        gateway replaces the old one, whose calls in flight finish first (up to stop_timeout);
        the workers run on.  False if the gateway already serves as configured."""
        cfg = self.cfg
        if self.state != RUNNING:
            return False
        if cfg.tcp_in_workers or self.tcp_reservation is not None:
            return await self._restart_workers_tcp()
        wanted = cfg.tcp_options() if cfg.bind_tcp else None
        if self.tcp is None and wanted is None:
            return False
        if self.tcp is not None and wanted is not None and self.tcp.options == wanted:
            return False
        if self.tcp is not None:
            tcp, self.tcp = self.tcp, None
            self._event("INFO", "closing the TCP gateway for new settings")
            self._closing_tcp = tcp
            try:
                await tcp.close(cfg.stop_timeout, reason="the service's TCP settings changed")
            finally:
                self._closing_tcp = None
                self._retire_counts(tcp=tcp)
        if wanted is not None:
            await self._start_tcp()
        return True

    async def _restart_workers_tcp(self) -> bool:
        """The TCP settings of a service whose workers serve TCP changed: a gateway that served
        before closes, the port is held anew if it moved, and a rolling restart gives the
        workers their new options (the old ones stop listening first, finish their calls and
        leave)."""
        cfg = self.cfg
        wanted = cfg.tcp_options() if cfg.bind_tcp and cfg.tcp_in_workers else None
        had = self.tcp_env.copy()
        if self.tcp is not None:
            tcp, self.tcp = self.tcp, None
            self._event("INFO", "closing the TCP gateway: the workers serve TCP now")
            await tcp.close(cfg.stop_timeout, reason="the service's TCP settings changed")
        if wanted is None:
            self._release_tcp()
        else:
            try:
                self._reserve_tcp()
            except OSError as e:
                await self._fail(f"cannot accept TCP clients on {cfg.bind_tcp}:{cfg.port}: {e}")
                return True
        if self.tcp_env == had:
            return False
        await self._rolling_restart()
        return True

    # -- reporting -------------------------------------------------------------------------
    def status(self) -> dict:
        return service_status(self)
