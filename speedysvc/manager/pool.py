"""One service's pool of worker processes: start, stop, scale, restart, watch, log.

Runs inside the manager's asyncio loop, with no thread of its own: each worker's
death is noticed at once through a pidfd (Linux 5.3+), its stdout, stderr and
logging pipe are read as they come.  Load signals come from the service
segment (calls waiting for a worker, time the workers spent in calls), CPU and
memory from psutil.  The autoscaling policy is ``decide_scale`` below; it is
described in docs/service-manager.md.
"""
from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import signal
import subprocess
import time

import psutil

from .. import _shmcore as core
from .. import shm
from ..shm.logpipe import LOG_FD_ENV, LOG_LEVEL_ENV
from ..shm.worker import PARENT_DEATH_ENV, worker_argv, worker_env
from ..tcp.server import TcpServer, make_ssl_context
from .config import ServiceConfig
from .logs import LineSplitter, ServiceLog

log = logging.getLogger("speedysvc.manager")

HISTORY_INTERVAL = 2.0          # seconds between two points of the charts' history
HISTORY_POINTS = 1800           # one hour of it
STARTING, RUNNING, STOPPING, STOPPED, FAILED = "starting", "running", "stopping", "stopped", "failed"


def decide_scale(cfg: ServiceConfig, workers: int, pending: float, busy: float, cpu: float,
                 low_since: float | None, last_up: float, now: float) -> tuple[int, float | None]:
    """The autoscaling policy: (workers to add (+) or remove (-), new low_since).

    * Up, quickly: when calls wait for a worker (``pending`` on average at least
      ``scale_up_queue``) or the workers are busy (the larger of their busy fraction
      and CPU fraction at least ``scale_up_busy``), add as many workers as calls wait
      (at least one), never above ``max_proc_num``, at most once per ``scale_up_cooldown``.
    * Down, slowly: after ``scale_down_after`` seconds in which no call waited and the
      workers were busy less than ``scale_down_busy`` of the time, remove one worker,
      never below ``min_proc_num``; the timer then starts again.
    """
    load = max(busy, cpu)
    if (pending >= cfg.scale_up_queue and pending > 0) or load >= cfg.scale_up_busy:
        if workers < cfg.max_proc_num and now - last_up >= cfg.scale_up_cooldown:
            return min(cfg.max_proc_num - workers, max(1, int(pending + 0.999))), None
        return 0, None
    if pending == 0 and load < cfg.scale_down_busy and workers > cfg.min_proc_num:
        if low_since is None:
            return 0, now
        if now - low_since >= cfg.scale_down_after:
            return -1, now
        return 0, low_since
    return 0, None


class WorkerProcess:
    """A worker process as its pool sees it."""

    def __init__(self, proc: subprocess.Popen, log_fd: int):
        self.proc = proc
        self.pid = proc.pid
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.log_fd = log_fd
        self.leaving = False          # asked to stop: its exit is not a crash
        self.fds: dict[int, tuple[str, LineSplitter]] = {}   # pipes watched by the loop
        self.ps = psutil.Process(proc.pid)
        self.cpu = 0.0                # fraction of a core, last sample
        self.rss = 0
        try:
            self.ps.cpu_percent(None)
        except psutil.Error:
            pass


class ServicePool:
    def __init__(self, cfg: ServiceConfig, folder: str, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.folder = folder
        self.loop = loop
        self.log = ServiceLog(os.path.join(cfg.log_dir, f"{cfg.section}.log"), cfg.log_max_bytes, cfg.log_backups)
        self.state = STOPPED
        self.failure: str | None = None
        self.segment: shm.ServiceSegment | None = None
        self.workers: dict[int, WorkerProcess] = {}
        self.target = cfg.min_proc_num
        self.quick_crashes = 0
        self.restarts = 0
        self.started_at: float | None = None
        self._restart_handle: asyncio.TimerHandle | None = None
        self._all_exited = asyncio.Event()
        self._all_exited.set()
        # autoscaling and history
        self._pending_samples: list[int] = []
        self._last_busy: tuple[float, int] | None = None
        self._last_up = 0.0
        self._low_since: float | None = None
        self._last_decision = 0.0
        self.signals = {"pending": 0.0, "busy": 0.0, "cpu": 0.0}
        self.history: collections.deque = collections.deque(maxlen=HISTORY_POINTS)
        self._last_history: tuple[float, dict] | None = None
        self.tcp: TcpServer | None = None

    # -- lifetime --------------------------------------------------------------------------
    async def start(self) -> None:
        if self.state in (STARTING, RUNNING):
            return
        if self.state == STOPPING:
            raise RuntimeError(f"service {self.cfg.section} is stopping")
        cfg = self.cfg
        self.state, self.failure, self.quick_crashes = STARTING, None, 0
        self._event("INFO", f"starting {cfg.min_proc_num} worker(s) of {cfg.target}")
        try:
            self.segment = shm.ServiceSegment.create(cfg.name, max_channels=cfg.max_channels,
                                                     max_payload=cfg.max_payload, supervised=True)
        except BaseException as e:
            self.state = STOPPED
            self._event("ERROR", f"cannot start: {e}")
            raise
        self.segment.set_state(core.SVC_SERVING)  # calls queue while the workers start
        self.started_at = time.time()
        self.target = cfg.min_proc_num
        self._low_since, self._last_up = None, time.monotonic()
        for _ in range(self.target):
            self._spawn()
        deadline = time.monotonic() + cfg.start_timeout
        while self.state == STARTING and len(self._registered()) < self.target:
            if time.monotonic() > deadline:
                await self._fail(f"workers did not start within start_timeout ({cfg.start_timeout} s)")
                break
            await asyncio.sleep(0.02)
        if self.state == STARTING and cfg.bind_tcp:
            await self._start_tcp()
        if self.state == STARTING:
            self.state = RUNNING
            self._event("INFO", f"running with {len(self.workers)} worker(s)")

    async def _start_tcp(self) -> None:
        cfg = self.cfg
        try:
            self.tcp = await TcpServer(
                cfg.name, cfg.bind_tcp, cfg.port, secret=cfg.tcp_secret,
                ssl_context=make_ssl_context(cfg.tcp_tls_cert, cfg.tcp_tls_key),
                allow_pickle=cfg.tcp_allow_pickle, max_payload=cfg.max_payload,
                max_connections=cfg.tcp_max_connections, max_inflight=max(1, cfg.max_channels // 2),
                handshake_timeout=cfg.tcp_handshake_timeout, stall_timeout=cfg.tcp_stall_timeout).start()
        except (OSError, ValueError) as e:
            self.tcp = None
            await self._fail(f"cannot accept TCP clients on {cfg.bind_tcp}:{cfg.port}: {e}")
            return
        self._event("INFO", f"accepting TCP clients on {cfg.bind_tcp}:{self.tcp.port}"
                            + (" over TLS" if cfg.tcp_tls_cert else "")
                            + (" (secret required)" if cfg.tcp_secret else ""))

    async def stop(self, timeout: float | None = None) -> None:
        """Refuse new calls, let running and queued ones finish (up to ``stop_timeout``),
        then stop the workers and remove the shared memory."""
        if self.state == STOPPED:
            return
        timeout = self.cfg.stop_timeout if timeout is None else timeout
        was_failed = self.state == FAILED
        if not was_failed:
            self.state = STOPPING
        if self.tcp is not None:
            # TCP calls in flight finish first (new ones are refused), then the clients are told
            tcp, self.tcp = self.tcp, None
            await tcp.close(timeout)
        if self._restart_handle:
            self._restart_handle.cancel()
            self._restart_handle = None
        if self.segment is not None:
            self.segment.set_state(core.SVC_STOPPING)
            self.segment.kick_workers()
        for w in self.workers.values():
            w.leaving = True
        try:
            await asyncio.wait_for(self._all_exited.wait(), timeout)
        except asyncio.TimeoutError:
            for w in list(self.workers.values()):
                self._event("WARNING", f"worker {w.pid} did not stop within {timeout} s: killing it")
                self._signal(w, signal.SIGKILL)
            try:
                await asyncio.wait_for(self._all_exited.wait(), 5)
            except asyncio.TimeoutError:
                log.error("workers of %s survived SIGKILL: %s", self.cfg.section, list(self.workers))
        if self.segment is not None:
            self.segment.destroy()
            self.segment = None
        if not was_failed:
            self.state = STOPPED
            self._event("INFO", "stopped")

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def scale(self, n: int) -> None:
        """Run ``n`` workers (within min_proc_num..max_proc_num); autoscaling goes on from there."""
        cfg = self.cfg
        if not cfg.min_proc_num <= n <= cfg.max_proc_num:
            raise ValueError(f"{cfg.section} runs {cfg.min_proc_num} to {cfg.max_proc_num} workers "
                             f"(min_proc_num, max_proc_num); {n} is outside")
        if self.state != RUNNING:
            raise RuntimeError(f"service {cfg.section} is {self.state}")
        self._set_target(n, "scaled by request")
        self._low_since = None

    def close(self) -> None:
        self.log.close()

    def _event(self, level: str, message: str) -> None:
        """A lifecycle event: in the service's log, and in the manager's."""
        self.log.write(os.getpid(), level, "manager", message)
        log.log(getattr(logging, level), "%s: %s", self.cfg.section, message)

    # -- workers ---------------------------------------------------------------------------
    def _live(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if not w.leaving]

    def _registered(self) -> list[dict]:
        return self.segment.workers() if self.segment is not None else []

    def _spawn(self) -> WorkerProcess:
        cfg = self.cfg
        read_log, write_log = os.pipe()
        env = worker_env([self.folder])
        env[LOG_FD_ENV] = str(write_log)
        env[LOG_LEVEL_ENV] = cfg.log_level
        env[PARENT_DEATH_ENV] = "1"   # the manager spawns from its only thread
        try:
            proc = subprocess.Popen(worker_argv(cfg.target, cfg.name),
                                    cwd=self.folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=(write_log,), start_new_session=True)
        except BaseException:
            os.close(read_log)
            raise
        finally:
            os.close(write_log)
        w = WorkerProcess(proc, read_log)
        self.workers[w.pid] = w
        self._all_exited.clear()
        pidfd = os.pidfd_open(w.pid)
        self.loop.add_reader(pidfd, self._on_exit, w, pidfd)
        for fd, kind in ((proc.stdout.fileno(), "stdout"), (proc.stderr.fileno(), "stderr"), (read_log, "log")):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            w.fds[fd] = (kind, LineSplitter())
            self.loop.add_reader(fd, self._on_output, w, fd)
        self._event("INFO", f"started worker {w.pid}")
        return w

    def _on_output(self, w: WorkerProcess, fd: int) -> None:
        kind, lines = w.fds[fd]
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        for line in (lines.feed(data) if data else lines.rest()):
            self._write_line(w, kind, line)
        if not data:
            self.loop.remove_reader(fd)
            del w.fds[fd]
            if fd == w.log_fd:
                os.close(fd)

    def _on_exit(self, w: WorkerProcess, pidfd: int) -> None:
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        code = w.proc.wait()
        try:
            self._drain(w)
        except Exception:
            log.exception("reading the last output of worker %d failed", w.pid)
        self._forget(w, code)

    def _drain(self, w: WorkerProcess) -> None:
        for fd in list(w.fds):   # what it wrote last, up to what the pipe holds
            for _ in range(64):
                if fd not in w.fds:
                    break
                self._on_output(w, fd)
        for fd, (kind, lines) in list(w.fds.items()):
            self.loop.remove_reader(fd)
            for line in lines.rest():
                self._write_line(w, kind, line)

    def _write_line(self, w: WorkerProcess, kind: str, line: str) -> None:
        """A line a worker wrote: a logging record, or stdout (INFO) / stderr (WARNING) text."""
        if kind == "log":
            self.log.write_json_line(w.pid, line)
        elif line.strip():
            self.log.write(w.pid, "INFO" if kind == "stdout" else "WARNING", kind, line)

    def _forget(self, w: WorkerProcess, code: int) -> None:
        for fd in list(w.fds):
            self.loop.remove_reader(fd)
        for f in (w.proc.stdout, w.proc.stderr):
            f.close()
        if w.log_fd in w.fds:
            os.close(w.log_fd)
        del self.workers[w.pid]
        if self.segment is not None:
            self.segment.reap()  # frees its worker-table entry and any channel it held
        how = f"code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if w.leaving or self.state in (STOPPING, STOPPED, FAILED):
            self._event("INFO", f"worker {w.pid} exited ({how})")
        else:
            self._crashed(w, how)
        if not self.workers:
            self._all_exited.set()

    def _crashed(self, w: WorkerProcess, how: str) -> None:
        cfg = self.cfg
        uptime = time.monotonic() - w.started
        self.quick_crashes = self.quick_crashes + 1 if uptime < cfg.crash_window else 1
        self._event("ERROR", f"worker {w.pid} died ({how}) after {uptime:.1f} s")
        if self.quick_crashes >= cfg.crash_limit:
            self.loop.create_task(self._fail(f"{self.quick_crashes} workers in a row died within "
                                             f"crash_window ({cfg.crash_window} s) of starting"))
            return
        delay = min(cfg.restart_backoff * 2 ** (self.quick_crashes - 1), cfg.restart_backoff_max)
        self._event("INFO", f"restarting a worker in {delay:.2f} s")
        if self._restart_handle is None:
            self._restart_handle = self.loop.call_later(delay, self._replenish)

    def _replenish(self) -> None:
        self._restart_handle = None
        if self.state not in (STARTING, RUNNING):
            return
        while len(self._live()) < self.target:
            self.restarts += 1
            self._spawn()

    async def _fail(self, reason: str) -> None:
        if self.state in (FAILED, STOPPED):
            return
        self.failure = reason
        self._event("ERROR", f"service marked failed: {reason}")
        self.state = STOPPING
        await self.stop(timeout=2.0)
        self.state = FAILED

    def _signal(self, w: WorkerProcess, sig: int) -> None:
        try:
            os.kill(w.pid, sig)
        except ProcessLookupError:
            pass

    def _set_target(self, n: int, why: str) -> None:
        old, self.target = self.target, n
        if n == old:
            return
        self._event("INFO", f"{why}: {old} -> {n} worker(s)")
        live = self._live()
        if n > len(live):
            for _ in range(n - len(live)):
                self._spawn()
        else:
            # idle workers leave first, the youngest first
            busy = {r["pid"] for r in self._registered() if r["busy"]}
            for w in sorted(live, key=lambda w: (w.pid in busy, -w.started))[:len(live) - n]:
                w.leaving = True
                self._signal(w, signal.SIGTERM)

    # -- periodic work ---------------------------------------------------------------------
    def sample(self) -> None:
        """Called often (every 100 ms): the calls waiting for a worker."""
        if self.segment is not None and self.state == RUNNING:
            self._pending_samples.append(self.segment.pending_calls())

    def tick(self, now: float) -> None:
        """Called every 100 ms: watchdog, autoscaling and history when they are due."""
        if self.segment is None or self.state != RUNNING:
            return
        registered = self._registered()
        self._watchdog(registered)
        if now - self._last_decision >= self.cfg.scale_interval:
            self._last_decision = now
            self._autoscale(registered, now)
        if self._last_history is None or now - self._last_history[0] >= HISTORY_INTERVAL:
            self._record_history(registered, now)

    def _watchdog(self, registered: list[dict]) -> None:
        limit = self.cfg.call_timeout
        if not limit:
            return
        now_ns = time.monotonic_ns()
        for r in registered:
            if r["busy"] and r["claim_ns"] and (now_ns - r["claim_ns"]) / 1e9 > limit:
                w = self.workers.get(r["pid"])
                if w is not None and not w.leaving:
                    self._event("ERROR", f"worker {w.pid} spent more than call_timeout ({limit} s) on one call: killing it")
                    self._signal(w, signal.SIGKILL)

    def _busy_ns(self, registered: list[dict]) -> int:
        now_ns = time.monotonic_ns()
        return sum(r["busy_ns"] + (max(0, now_ns - r["claim_ns"]) if r["busy"] and r["claim_ns"] else 0)
                   for r in registered)

    def _autoscale(self, registered: list[dict], now: float) -> None:
        samples, self._pending_samples = self._pending_samples, []
        pending = sum(samples) / len(samples) if samples else 0.0
        busy_ns = self._busy_ns(registered)
        busy = 0.0
        if self._last_busy is not None and registered:
            t0, b0 = self._last_busy
            if now > t0 and busy_ns >= b0:
                busy = min(1.0, (busy_ns - b0) / 1e9 / (now - t0) / len(registered))
        self._last_busy = (now, busy_ns)
        self._sample_processes()
        live = self._live()
        if self._restart_handle is not None or len(live) < self.target or any(
                w.pid not in {r["pid"] for r in registered} for w in live):
            return   # workers are being replaced or still starting (importing costs CPU): not load
        cpu = sum(w.cpu for w in live) / len(live) if live else 0.0
        self.signals = {"pending": pending, "busy": busy, "cpu": cpu}
        change, self._low_since = decide_scale(self.cfg, len(live), pending, busy, cpu, self._low_since,
                                               self._last_up, now)
        if change > 0:
            self._last_up = now
            self._set_target(len(live) + change, f"autoscale up (waiting {pending:.1f}, busy {busy:.0%}, "
                                                  f"cpu {cpu:.0%})")
        elif change < 0:
            self._set_target(len(live) + change, f"autoscale down (busy {busy:.0%}, cpu {cpu:.0%})")

    def _sample_processes(self) -> None:
        for w in self.workers.values():
            try:
                with w.ps.oneshot():
                    w.cpu = w.ps.cpu_percent(None) / 100
                    w.rss = w.ps.memory_info().rss
            except psutil.Error:
                pass

    def _record_history(self, registered: list[dict], now: float) -> None:
        stats = self.segment.method_stats()
        calls = sum(m["calls"] for m in stats.values())
        errors = sum(m["errors"] for m in stats.values())
        buckets = [sum(m["buckets"][b] for m in stats.values()) for b in range(core.M_NBUCKETS)]
        point = {"t": time.time(), "workers": len(self.workers), "pending": self.signals["pending"],
                 "busy": self.signals["busy"], "cpu": sum(w.cpu for w in self.workers.values()),
                 "rss": sum(w.rss for w in self.workers.values())}
        if self._last_history is not None:
            t0, last = self._last_history
            dt = max(now - t0, 1e-6)
            point["calls_per_s"] = max(0, calls - last["calls"]) / dt
            point["errors_per_s"] = max(0, errors - last["errors"]) / dt
            delta = [max(0, a - b) for a, b in zip(buckets, last["buckets"])]
            point["p50_ms"], point["p99_ms"] = percentile(delta, 0.5), percentile(delta, 0.99)
            self.history.append(point)
        self._last_history = (now, {"calls": calls, "errors": errors, "buckets": buckets})

    # -- reporting -------------------------------------------------------------------------
    def status(self) -> dict:
        cfg = self.cfg
        registered = {r["pid"]: r for r in self._registered()}
        stats = self.segment.method_stats() if self.segment is not None else {}
        total_ns = sum(m["total_ns"] for m in stats.values()) or 1
        methods = []
        for name, m in sorted(stats.items()):
            methods.append({"name": name, "calls": m["calls"], "errors": m["errors"],
                            "mean_ms": m["total_ns"] / m["calls"] / 1e6 if m["calls"] else None,
                            "p99_ms": percentile(m["buckets"], 0.99), "max_ms": m["max_ns"] / 1e6,
                            "share": m["total_ns"] / total_ns, "buckets": m["buckets"]})
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: w.started):
            r = registered.get(w.pid, {})
            workers.append({"pid": w.pid, "serving": w.pid in registered, "busy": bool(r.get("busy")),
                            "leaving": w.leaving, "calls": r.get("calls", 0), "errors": r.get("errors", 0),
                            "cpu": w.cpu, "rss": w.rss, "uptime": time.monotonic() - w.started,
                            "started": w.started_wall})
        last = self.history[-1] if self.history else {}
        return {
            "name": cfg.section, "service": cfg.name, "target": cfg.target, "state": self.state,
            "failure": self.failure, "workers": len(self.workers), "target_workers": self.target,
            "min_workers": cfg.min_proc_num, "max_workers": cfg.max_proc_num,
            "calls": sum(m["calls"] for m in stats.values()), "errors": sum(m["errors"] for m in stats.values()),
            "in_flight": sum(1 for r in registered.values() if r["busy"]),
            "waiting": self.segment.pending_calls() if self.segment is not None else 0,
            "calls_per_s": last.get("calls_per_s", 0.0), "p50_ms": last.get("p50_ms"),
            "p99_ms": last.get("p99_ms"), "cpu": sum(w.cpu for w in self.workers.values()),
            "rss": sum(w.rss for w in self.workers.values()),
            "uptime": time.time() - self.started_at if self.started_at and self.state == RUNNING else 0.0,
            "restarts": self.restarts,
            "tcp": f"{self.tcp.host}:{self.tcp.port} ({len(self.tcp.connections)} clients)" if self.tcp else None,
            "tcp_server": self.tcp.status() if self.tcp else None, "signals": self.signals, "port": cfg.port,
            "log_file": self.log.path, "methods": methods, "worker_list": workers,
        }


def percentile(buckets: list[int], q: float) -> float | None:
    """The upper bound, in ms, of the histogram bucket holding quantile ``q`` (None: no calls)."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for b, n in enumerate(buckets):
        seen += n
        if seen >= rank:
            return (2 ** b) / 1000.0
    return (2 ** (len(buckets) - 1)) / 1000.0
