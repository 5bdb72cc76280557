"""The worker processes of one service, as its pool sees them: started, watched, heard.

Everything runs on the manager's asyncio loop, with no thread of its own: each
worker's death is noticed at once through a pidfd (Linux 5.3+), and its stdout,
stderr and logging pipe (``speedysvc.shm.logpipe``) are read as they come, line
by line, into the service's log.  CPU and memory come from psutil.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import os
import signal
import subprocess
import time
from typing import Callable

import psutil

from ..shm.logpipe import LOG_FD_ENV, LOG_LEVEL_ENV
from ..shm.worker import PARENT_DEATH_ENV, worker_argv, worker_env
from .logs import LineSplitter, ServiceLog

log = logging.getLogger("speedysvc.manager")

# A worker's pipe is read at most once per READ_PAUSE while what comes is small: a service that
# logs a record per call would otherwise wake the manager for each one (100 records/s, 100
# wake-ups), where one read every READ_PAUSE takes the same lines in a few wake-ups.  A read of
# READ_BURST bytes or more is not paused (a chatty worker must not wait on a full pipe), nor is
# the last output of a worker that died (read whole before its exit is handled).  Pauses end on
# the slots of ``next_slot``, as the manager's ticks do (manager.TICK): the pipes of every
# service are read again in the wake-up of a tick, not in wake-ups of their own.
READ_PAUSE = 0.1
READ_BURST = 16 << 10


def next_slot(now: float, period: float) -> float:
    """The first multiple of ``period`` after ``now`` (the loop's time): timers that end on these
    slots fire together, in one wake-up of the loop.  A ``now`` within 1 % of a period before a
    slot counts as on it (a timer may fire a little early, or its time be rounded down to the
    millisecond as uvloop's is): the next slot is then the one after, not that one again."""
    return (math.floor(now / period + 0.01) + 1) * period


class WorkerProcess:
    """One worker process."""

    def __init__(self, proc: subprocess.Popen, log_fd: int):
        self.proc = proc
        self.pid = proc.pid
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.log_fd = log_fd
        self.leaving = False          # asked to stop: its exit is not a crash
        self.candidate = False        # started by a rolling restart, not serving yet: its death fails
                                      # the restart, never counts as a crash of the service
        self.serving = False          # seen in the service segment's worker table
        self.watchdog_killed = False  # killed by the call watchdog (call_timeout)
        self.last_entry: dict | None = None   # its worker-table entry, read as it died
        self.fds: dict[int, tuple[str, LineSplitter]] = {}   # pipes watched by the loop
        self.ps = psutil.Process(proc.pid)
        self.cpu = 0.0                # fraction of a core, last sample
        self.rss = 0
        try:
            self.ps.cpu_percent(None)
        except psutil.Error:
            pass

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def sample(self) -> None:
        """Read its CPU (since the last sample) and resident memory."""
        try:
            with self.ps.oneshot():
                self.cpu = self.ps.cpu_percent(None) / 100
                self.rss = self.ps.memory_info().rss
        except psutil.Error:
            pass


def describe_exit(code: int) -> str:
    """A process's exit status as Popen gives it, in words ("code 1", "signal SIGKILL")."""
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:   # a real-time signal has no name
        return f"signal {-code}"


class WorkerSet:
    """The worker processes of one service, on the manager's loop.  ``on_exit(worker, code)``
    is called once each has exited and its last output is in the log; ``last_look(worker)``,
    if given, just before the manager waits for the dead process (while it is a zombie, so
    its pid and what it left in shared memory are still its own)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log_: ServiceLog, on_exit: Callable[[WorkerProcess, int], None],
                 last_look: Callable[[WorkerProcess], None] | None = None):
        self.loop = loop
        self.log = log_
        self.on_exit = on_exit
        self.last_look = last_look
        self.workers: dict[int, WorkerProcess] = {}
        self.all_exited = asyncio.Event()
        self.all_exited.set()
        self._paused: list[tuple[WorkerProcess, int]] = []   # pipes not watched until _resume (READ_PAUSE)
        self._resume_handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.workers)

    def __iter__(self):
        return iter(self.workers.values())

    def get(self, pid: int) -> WorkerProcess | None:
        return self.workers.get(pid)

    def live(self) -> list[WorkerProcess]:
        """The workers not asked to leave."""
        return [w for w in self.workers.values() if not w.leaving]

    def spawn(self, target: str, service: str, folder: str, log_level: str, extra_env: dict | None = None) \
            -> WorkerProcess:
        """Start a worker of ``target`` for ``service``, importing from ``folder``, with ``extra_env``
        (a worker that serves TCP finds its options there)."""
        read_log, write_log = os.pipe()
        env = worker_env([folder])
        env.update(extra_env or {})
        env[LOG_FD_ENV] = str(write_log)
        env[LOG_LEVEL_ENV] = log_level
        env[PARENT_DEATH_ENV] = "1"   # the manager spawns from its only thread
        try:
            proc = subprocess.Popen(worker_argv(target, service),
                                    cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=(write_log,), start_new_session=True)
        except BaseException:
            os.close(read_log)
            raise
        finally:
            os.close(write_log)
        w = WorkerProcess(proc, read_log)
        self.workers[w.pid] = w
        self.all_exited.clear()
        pidfd = os.pidfd_open(w.pid)
        self.loop.add_reader(pidfd, self._exited, w, pidfd)
        for fd, kind in ((proc.stdout.fileno(), "stdout"), (proc.stderr.fileno(), "stderr"), (read_log, "log")):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            w.fds[fd] = (kind, LineSplitter())
            self.loop.add_reader(fd, self._readable, w, fd)
        return w

    def sample(self) -> None:
        for w in self.workers.values():
            w.sample()

    def cpu(self) -> float:
        return sum(w.cpu for w in self.workers.values())

    def rss(self) -> int:
        return sum(w.rss for w in self.workers.values())

    # -- the loop's callbacks ------------------------------------------------------------------
    def _readable(self, w: WorkerProcess, fd: int) -> None:
        """A pipe has output: read it, then (if it was little) leave the pipe alone for READ_PAUSE.
        What the paused pipes hold is read first: it was written before, and the log keeps the
        order in which a service's workers wrote (a line a worker prints after logging a record
        comes after that record, as it did when every pipe was read at once)."""
        if self._paused:
            self._read_paused()
        n = self._output(w, fd)
        if 0 < n < READ_BURST and fd in w.fds:
            self.loop.remove_reader(fd)
            self._paused.append((w, fd))
            if self._resume_handle is None:
                self._resume_handle = self.loop.call_at(next_slot(self.loop.time(), READ_PAUSE), self._resume)

    def _read_paused(self) -> None:
        for pw, pfd in list(self._paused):
            if self.workers.get(pw.pid) is pw and pfd in pw.fds:
                self._output(pw, pfd)   # (it stays paused until _resume: a burst waits at most that)

    def _resume(self) -> None:
        """Watch the paused pipes again (of the workers not gone meanwhile)."""
        self._resume_handle = None
        paused, self._paused = self._paused, []
        for w, fd in paused:
            if self.workers.get(w.pid) is w and fd in w.fds:
                self.loop.add_reader(fd, self._readable, w, fd)

    def _output(self, w: WorkerProcess, fd: int) -> int:
        """Read what the pipe holds (up to 64 KiB) into the log; the bytes read (0 at its end)."""
        kind, lines = w.fds[fd]
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return -1
        except OSError:
            data = b""
        for line in (lines.feed(data) if data else lines.rest()):
            self._write_line(w, kind, line)
        if not data:
            self.loop.remove_reader(fd)
            del w.fds[fd]
            if fd == w.log_fd:
                os.close(fd)
        return len(data)

    def _exited(self, w: WorkerProcess, pidfd: int) -> None:
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        if self.last_look is not None:
            try:
                self.last_look(w)
            except Exception:
                log.exception("reading what worker %d left failed", w.pid)
        code = w.proc.wait()
        try:
            self._drain(w)
        except Exception:
            log.exception("reading the last output of worker %d failed", w.pid)
        self._forget(w)
        try:
            self.on_exit(w, code)
        finally:
            if not self.workers:
                self.all_exited.set()

    def _drain(self, w: WorkerProcess) -> None:
        for fd in list(w.fds):   # what it wrote last, up to what the pipe holds
            for _ in range(64):
                if fd not in w.fds:
                    break
                self._output(w, fd)
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

    def _forget(self, w: WorkerProcess) -> None:
        self._paused = [(pw, fd) for pw, fd in self._paused if pw is not w]
        for fd in list(w.fds):
            self.loop.remove_reader(fd)
        for f in (w.proc.stdout, w.proc.stderr):
            f.close()
        if w.log_fd in w.fds:
            os.close(w.log_fd)
        del self.workers[w.pid]
