"""The shared-memory protocol's segments: names, the service segment, channels' data segments.

One *service segment* per service (``/dev/shm/speedysvc.<user>.<service>``)
holds a header, a bitmap of channels with a posted call, a table of workers
and a table of channels.  Each client connection owns one or more *channels*;
a channel's request and response bytes live in its own *data segment*
(``speedysvc.<user>.<service>.<owner pid>-<channel>-<generation>``), which is
replaced by a larger one when a payload does not fit.  Any idle worker claims
any posted call.  The byte layout and the state machine are in
``docs/shm-protocol.md``; its offsets and codes are defined once, in the C
extension's ``layout.h``, and read from ``_shmcore`` here.  The caller's side of
a call is in ``shm.transport``, the worker's in ``shm.worker``.

Linux only: it relies on /dev/shm, futex(2) and /proc.
"""
from __future__ import annotations

import glob
import mmap
import os
import pwd
import re
import stat
import time

from .. import _shmcore as core
from ..errors import SegmentNotOurs, ServiceAlreadyRunning, ServiceUnavailable, SpeedysvcError

SHM_DIR = "/dev/shm"
NAMESPACE_ENV = "SPEEDYSVC_NAMESPACE"


def _prefix() -> str:
    """Service names are per user; SPEEDYSVC_NAMESPACE keeps sets of services apart
    (two test runs at once, say).  Processes must share it to see each other."""
    ns = os.environ.get(NAMESPACE_ENV, "")
    if ns and not re.fullmatch(r"[A-Za-z0-9_\-]{1,32}", ns):
        raise ValueError(f"{NAMESPACE_ENV} must be 1 to 32 letters, digits, '_' or '-', got {ns!r}")
    return f"speedysvc-{ns}" if ns else "speedysvc"


PREFIX = _prefix()
DEFAULT_MAX_CHANNELS = 1024
DEFAULT_MAX_PAYLOAD = 1 << 30          # 1 GiB
INITIAL_CHANNEL_SIZE = 1 << 20         # pages are only allocated when touched

STATE_NAMES = {core.SVC_STARTING: "starting", core.SVC_SERVING: "serving",
               core.SVC_STOPPING: "stopping", core.SVC_STOPPED: "stopped", core.SVC_FAILED: "failed"}


# ---- names, segments, processes -----------------------------------------------------------

def _user() -> str:
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = str(os.getuid())
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


USER = _user()


def _page_align(n: int) -> int:
    return (n + 4095) // 4096 * 4096


def service_segment_name(service: str) -> str:
    return f"{PREFIX}.{USER}.{service}"


def data_segment_name(service: str, owner_pid: int, slot: int, gen: int) -> str:
    return f"{PREFIX}.{USER}.{service}.{owner_pid}-{slot}-{gen}"


# Every name of ours in /dev/shm is opened without following a symbolic link, and a file there
# that another uid owns (a user whose name sanitises to ours, or one squatting the name) is
# refused with SegmentNotOurs and never removed: /dev/shm is sticky, so nobody else can replace
# a file of ours, and unlinking is the only thing root could otherwise do to a file not its own.

def not_ours(path: str) -> SegmentNotOurs | None:
    """Why ``path`` is not a segment of ours (a symbolic link, or another uid's file), or None
    (it is ours, or there is nothing there)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid():
        return SegmentNotOurs(path, st.st_uid, symlink=stat.S_ISLNK(st.st_mode))
    return None


def unlink_path(path: str) -> bool:
    """Remove a segment of ours by path; a symbolic link or another uid's file is left alone.
    True if it was removed."""
    if not_ours(path) is not None:
        return False
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def create_segment(name: str, size: int) -> tuple[core.Region, int]:
    """A new segment readable and writable by this user only: (mapping, inode).
    The mapping keeps no file descriptor open, so a worker can map many channels.
    Raises FileExistsError if the name is taken by a segment of ours, SegmentNotOurs if
    by anything else."""
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        squatter = not_ours(path)
        if squatter is not None:
            raise squatter from None
        raise
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        return core.map_fd(fd, size), os.fstat(fd).st_ino
    except BaseException:
        unlink_segment(name)
        raise
    finally:
        os.close(fd)


def open_segment(name: str) -> tuple[core.Region, int]:
    """Map an existing segment of ours: (mapping, inode).  Raises FileNotFoundError if there is
    none, SegmentNotOurs if the name is a symbolic link or another uid's file."""
    path = os.path.join(SHM_DIR, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:   # ELOOP: a symbolic link; EACCES: another user's file
        squatter = None if isinstance(e, FileNotFoundError) else not_ours(path)
        if squatter is not None:
            raise squatter from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise SegmentNotOurs(path, st.st_uid)
        return core.map_fd(fd, st.st_size), st.st_ino
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    """Remove a segment of ours (never a symbolic link, nor another uid's file)."""
    unlink_path(os.path.join(SHM_DIR, name))


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks, or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_is_zombie(pid: int) -> bool:
    """True if ``pid`` has exited and its parent has not waited for it yet."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] == b"Z"


def process_alive(pid: int, start_time: int = 0) -> bool:
    """True if ``pid`` runs and (when given) started at ``start_time``, so a reused pid is not mistaken."""
    if pid <= 0:
        return False
    try:
        started = process_start_time(pid)
    except OSError:
        return True   # cannot tell (out of file descriptors, say): never take a live process for dead
    return started is not None and (not start_time or started == start_time)


MY_START_TIME = process_start_time(os.getpid()) or 0


def my_start_time() -> int:
    """This process's start time (clock ticks), which the segments record beside its pid."""
    return MY_START_TIME


def _refresh_identity():
    global MY_START_TIME
    MY_START_TIME = process_start_time(os.getpid()) or 0


os.register_at_fork(after_in_child=_refresh_identity)


# ---- the service segment --------------------------------------------------------------------

class ServiceSegment:
    """The mapped service segment; shared by the caller's and the worker's side."""

    def __init__(self, service: str, mapped: tuple[core.Region, int]):
        self.service = service
        self.name = service_segment_name(service)
        self.region, self.ino = mapped
        r = self.region
        if r.size < core.H_CHANNELS or r.load32(core.H_MAGIC) != core.MAGIC:
            raise ServiceUnavailable(f"/dev/shm/{self.name} is not a speedysvc segment (or not a complete one)")
        if r.load32(core.H_VERSION) != core.LAYOUT_VERSION:
            raise SpeedysvcError(f"/dev/shm/{self.name} uses layout version {r.load32(core.H_VERSION)}, "
                                 f"this speedysvc speaks {core.LAYOUT_VERSION}: restart the service")
        self.max_channels = r.load32(core.H_MAX_CHANNELS)
        self.max_payload = r.load64(core.H_MAX_PAYLOAD)

    # -- lifetime --
    @classmethod
    def create(cls, service: str, *, max_channels: int = DEFAULT_MAX_CHANNELS,
               max_payload: int = DEFAULT_MAX_PAYLOAD, supervised: bool = False) -> "ServiceSegment":
        """Create the segment for a service this process will own, after removing what a dead owner left.
        ``supervised``: the owner restarts workers that die, so a call waits for one rather than
        failing when none is alive."""
        if not 1 <= max_channels <= core.MAX_CHANNELS_LIMIT:
            raise ValueError(f"max_channels must be 1..{core.MAX_CHANNELS_LIMIT}, got {max_channels}")
        if max_payload < 1:
            raise ValueError("max_payload must be positive")
        name = service_segment_name(service)
        try:
            stale = cls.attach(service)
        except SegmentNotOurs:
            raise
        except ServiceUnavailable:
            stale = None
        except SpeedysvcError:
            stale = None  # unreadable leftovers: remove them below
        if stale is not None:
            owner, start = stale.owner
            if stale.state not in (core.SVC_STOPPED, core.SVC_FAILED) and process_alive(owner, start):
                raise ServiceAlreadyRunning(f"service {service!r} is already served by pid {owner}")
        remove_service_segments(service, keep_starting=True)
        names_off = _page_align(core.H_CHANNELS + max_channels * core.C_SIZE)
        stats_off = names_off + _page_align(core.MAX_METHODS * core.NAME_SIZE)
        tcp_off = stats_off + _page_align(core.MAX_WORKERS * core.MAX_METHODS * core.M_SIZE)
        size = tcp_off + core.MAX_WORKERS * core.T_SIZE
        # filled in under a temporary name, then linked to the real one: the name only
        # ever points to a complete segment, and of two owners starting at once one wins
        temp = f"{name}.starting-{os.getpid()}"
        mapped = create_segment(temp, size)
        r = mapped[0]
        r.store32(core.H_NAMES_OFF, names_off)
        r.store32(core.H_STATS_OFF, stats_off)
        r.store32(core.H_TCP_OFF, tcp_off)
        r.store32(core.H_MAX_METHODS, core.MAX_METHODS)
        r.store32(core.H_VERSION, core.LAYOUT_VERSION)
        r.store32(core.H_MAX_CHANNELS, max_channels)
        r.store32(core.H_MAX_WORKERS, core.MAX_WORKERS)
        r.store64(core.H_MAX_PAYLOAD, max_payload)
        r.store32(core.H_OWNER_PID, os.getpid())
        r.store64(core.H_OWNER_START, MY_START_TIME)
        r.store64(core.H_CREATED_NS, time.time_ns())
        r.store32(core.H_STATE, core.SVC_STARTING)
        r.store32(core.H_OWNER_FLAGS, core.OWNER_RESTARTS_WORKERS if supervised else 0)
        r.store32(core.H_MAGIC, core.MAGIC)
        try:
            os.link(os.path.join(SHM_DIR, temp), os.path.join(SHM_DIR, name))
        except FileExistsError:
            squatter = not_ours(os.path.join(SHM_DIR, name))
            if squatter is not None:
                raise squatter from None
            raise ServiceAlreadyRunning(f"service {service!r} was started by another process meanwhile") from None
        finally:
            unlink_segment(temp)
        return cls(service, mapped)

    @classmethod
    def attach(cls, service: str) -> "ServiceSegment":
        try:
            mapped = open_segment(service_segment_name(service))
        except ValueError:   # an empty file: not ours, or not complete
            raise ServiceUnavailable(f"/dev/shm/{service_segment_name(service)} is not a speedysvc segment") from None
        except FileNotFoundError:
            raise ServiceUnavailable(f"service {service!r} is not running "
                                     f"(no /dev/shm/{service_segment_name(service)})") from None
        return cls(service, mapped)

    def destroy(self) -> None:
        """Remove this service's segments from /dev/shm (mappings stay valid until dropped)."""
        # the name goes first: a caller that sees STOPPED then finds the segment is not current
        # any more, so it takes the service for gone (and waits for a new one), not for stopped
        # on purpose (see ``keep_stopped``)
        if self.is_current():
            remove_service_segments(self.service)
        self.set_state(core.SVC_STOPPED)
        self.kick_workers()

    def keep_stopped(self, state: int, reason: str, restarting: bool = False) -> None:
        """Stop the service but leave its segment in place, in ``state`` (SVC_STOPPED or
        SVC_FAILED) with ``reason``, so that callers learn at once that it was stopped on
        purpose or failed, and why; ``restarting``: a new segment comes in its place (callers
        wait for it).  The channels' data segments are removed (callers' mappings stay
        valid); ``destroy`` removes the rest."""
        self.set_reason(reason)
        if restarting:
            self.set_owner_flag(core.OWNER_RESTARTING)
        self.set_state(state)
        self.kick_workers()
        if self.is_current():
            base = os.path.join(SHM_DIR, self.name)
            for path in glob.glob(glob.escape(base) + ".*"):
                if ".starting-" not in path:
                    unlink_path(path)

    def is_current(self) -> bool:
        """False once the name points to another segment (service restarted) or to none."""
        try:
            return os.lstat(os.path.join(SHM_DIR, self.name)).st_ino == self.ino
        except FileNotFoundError:
            return False

    # -- header --
    @property
    def state(self) -> int:
        return self.region.load32(core.H_STATE)

    def set_state(self, state: int) -> None:
        self.region.store32(core.H_STATE, state)

    @property
    def reason(self) -> str:
        """Why the service is stopping, stopped or failed, as its owner put it ("": not said)."""
        with memoryview(self.region) as view:
            raw = bytes(view[core.H_REASON:core.H_REASON + core.REASON_SIZE])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def set_reason(self, reason: str) -> None:
        """Write the reason before the state it explains (cut to REASON_SIZE - 1 bytes)."""
        raw = reason.encode("utf-8")[:core.REASON_SIZE - 1].decode("utf-8", "ignore").encode("utf-8")
        with memoryview(self.region) as view:
            view[core.H_REASON:core.H_REASON + core.REASON_SIZE] = raw.ljust(core.REASON_SIZE, b"\0")

    def set_owner_flag(self, flag: int, on: bool = True) -> None:
        while True:
            flags = self.region.load32(core.H_OWNER_FLAGS)
            if self.region.cas32(core.H_OWNER_FLAGS, flags, flags | flag if on else flags & ~flag):
                return

    @property
    def restarting(self) -> bool:
        """The owner is restarting the service: a new segment comes in this one's place."""
        return bool(self.region.load32(core.H_OWNER_FLAGS) & core.OWNER_RESTARTING)

    @property
    def owner(self) -> tuple[int, int]:
        return self.region.load32(core.H_OWNER_PID), self.region.load64(core.H_OWNER_START)

    def owner_alive(self) -> bool:
        return process_alive(*self.owner)

    @property
    def supervised(self) -> bool:
        return bool(self.region.load32(core.H_OWNER_FLAGS) & core.OWNER_RESTARTS_WORKERS)

    def mark_workers_started(self) -> None:
        """The owner's first workers serve: from now on an unsupervised service without a
        live worker fails calls instead of queueing them."""
        self.set_owner_flag(core.OWNER_WORKERS_STARTED)

    def abandoned_by_workers(self) -> bool:
        """No worker will ever come: unsupervised, its workers started once and all are dead."""
        flags = self.region.load32(core.H_OWNER_FLAGS)
        if flags & core.OWNER_RESTARTS_WORKERS or not flags & core.OWNER_WORKERS_STARTED:
            return False
        r = self.region
        for i in range(core.MAX_WORKERS):   # (a waiting caller asks often: no more than it needs)
            off = self.worker_offset(i)
            pid = r.load32(off + core.W_PID)
            if pid and process_alive(pid, r.load64(off + core.W_START_TICKS)):
                return False
        return True

    def worker_alive(self, pid: int) -> bool:
        """Is the worker with this pid alive?  Its start time in the worker table guards
        against a reused pid.  (A waiting caller asks every LIVENESS_SLICE: one /proc read.)"""
        r = self.region
        for i in range(core.MAX_WORKERS):
            off = self.worker_offset(i)
            if r.load32(off + core.W_PID) == pid:
                return process_alive(pid, r.load64(off + core.W_START_TICKS))
        return process_alive(pid)

    def kick_workers(self) -> None:
        """Wake every sleeping worker, e.g. so they notice a state change."""
        self.region.add32(core.H_SEQ, 1)
        self.region.wake32(core.H_SEQ)

    def pending_calls(self) -> int:
        """Calls posted and not yet claimed by a worker."""
        words = (self.max_channels + 63) // 64
        return sum(bin(self.region.load64(core.H_BITMAP + 8 * w)).count("1") for w in range(words))

    # -- calls its callers did not get served (the supervisor reports them) --
    def count_refused(self) -> None:
        """A caller of this segment was refused: the service stopping, stopped, failed, or not up
        within the caller's wait."""
        self.region.add64(core.H_REFUSED, 1)

    def count_lost(self) -> None:
        """A caller of this segment lost its call: its worker died in it (WorkerDied)."""
        self.region.add64(core.H_LOST, 1)

    def refused_calls(self) -> tuple[int, int]:
        """(refused, lost): the calls its callers counted as refused and as lost."""
        return self.region.load64(core.H_REFUSED), self.region.load64(core.H_LOST)

    # -- workers --
    def worker_offset(self, index: int) -> int:
        return core.H_WORKERS + index * core.W_SIZE

    def register_worker(self, pid: int) -> int:
        r = self.region
        for i in range(core.MAX_WORKERS):
            off = self.worker_offset(i)
            if r.cas32(off + core.W_PID, 0, pid):
                for field in (core.W_CALLS, core.W_BUSY_NS, core.W_ERRORS, core.W_CLAIM_NS):
                    r.store64(off + field, 0)
                r.store64(off + core.W_STARTED_NS, time.time_ns())
                r.store64(off + core.W_START_TICKS, process_start_time(pid) or 0)
                r.store32(off + core.W_METHOD, 0)
                r.store32(off + core.W_PHASE, core.PHASE_IDLE)   # (a worker killed in a TCP call left it)
                self.clear_tcp_gauges(i)
                r.store32(off + core.W_STATE, core.WORKER_IDLE)
                return i
        raise SpeedysvcError(f"service {self.service!r} already has {core.MAX_WORKERS} workers")

    def unregister_worker(self, index: int, pid: int) -> None:
        off = self.worker_offset(index)
        self.region.store32(off + core.W_STATE, core.WORKER_FREE)
        self.region.cas32(off + core.W_PID, pid, 0)

    def set_worker_method(self, index: int, method: int) -> None:
        """The worker of entry ``index`` starts a call to method ``method`` (-1: unknown)."""
        self.region.store32(self.worker_offset(index) + core.W_METHOD, method + 1 if method >= 0 else 0)

    def _worker_row(self, i: int, pid: int) -> dict:
        r, off = self.region, self.worker_offset(i)
        busy = r.load32(off + core.W_STATE) == core.WORKER_BUSY
        method = r.load32(off + core.W_METHOD)
        return {"index": i, "pid": pid, "busy": busy,
                "calls": r.load64(off + core.W_CALLS), "errors": r.load64(off + core.W_ERRORS),
                "busy_ns": r.load64(off + core.W_BUSY_NS),
                "claim_ns": r.load64(off + core.W_CLAIM_NS),
                # the method (its index) of the call in hand, and of the last call begun
                "method": method - 1 if method and busy else None,
                "last_method": method - 1 if method else None,
                "alive": process_alive(pid, r.load64(off + core.W_START_TICKS)),
                "started_ns": r.load64(off + core.W_STARTED_NS)}

    def workers(self) -> list[dict]:
        """The registered workers and their counters (for supervisors and tests)."""
        r, out = self.region, []
        for i in range(core.MAX_WORKERS):
            pid = r.load32(self.worker_offset(i) + core.W_PID)
            if pid:
                out.append(self._worker_row(i, pid))
        return out

    def worker_entry(self, pid: int) -> dict | None:
        """The worker-table entry of ``pid`` as ``workers()`` has it, or None if it has none
        (it never registered, or left).  A supervisor reads a dead worker's entry with this
        before ``reap()`` frees it: ``busy`` says it died in a call, ``method`` in which."""
        for i in range(core.MAX_WORKERS):
            if self.region.load32(self.worker_offset(i) + core.W_PID) == pid:
                return self._worker_row(i, pid)
        return None

    def method_name(self, index: int | None) -> str | None:
        """The name of the method with statistics index ``index``, if the workers published it."""
        names = self.method_names()
        return names[index] if index is not None and 0 <= index < len(names) else None

    # -- methods and their statistics --
    def write_method_names(self, names: list[str]) -> None:
        """Workers publish the service's method names (in method-index order) so a
        supervisor can label the statistics without importing the service.  Every
        worker writes the same bytes, so concurrent writers do not matter."""
        off = self.region.load32(core.H_NAMES_OFF)
        with memoryview(self.region) as view:
            for i, name in enumerate(names[:core.MAX_METHODS]):
                start = off + i * core.NAME_SIZE
                view[start:start + core.NAME_SIZE] = name.encode()[:core.NAME_SIZE - 1].ljust(core.NAME_SIZE, b"\0")

    def method_names(self) -> list[str]:
        off, out = self.region.load32(core.H_NAMES_OFF), []
        with memoryview(self.region) as view:
            for i in range(core.MAX_METHODS):
                start = off + i * core.NAME_SIZE
                name = bytes(view[start:start + core.NAME_SIZE]).split(b"\0", 1)[0]
                if not name:
                    break
                out.append(name.decode(errors="replace"))
        return out

    def method_stats(self, worker_index: int | None = None) -> dict[str, dict]:
        """Per method: calls, errors, total_ns, max_ns and the latency histogram
        (``buckets[b]`` counts calls under 2**b µs), and the same of the calls' wait for a worker
        (posted -> claimed: wait_ns, wait_max_ns, wait_buckets), summed over worker-table entries unless
        one is named.  Records are never cleared, so the sums only grow (a worker reusing an
        entry adds to what its predecessor counted)."""
        r = self.region
        stats_off, nmethods = r.load32(core.H_STATS_OFF), r.load32(core.H_MAX_METHODS)
        workers = range(core.MAX_WORKERS) if worker_index is None else [worker_index]
        out = {}
        for m, name in enumerate(self.method_names()):
            rec = {"calls": 0, "errors": 0, "total_ns": 0, "max_ns": 0, "buckets": [0] * core.M_NBUCKETS,
                   "wait_ns": 0, "wait_max_ns": 0, "wait_buckets": [0] * core.M_NBUCKETS}
            buckets, wait_buckets = rec["buckets"], rec["wait_buckets"]
            for w in workers:
                base = stats_off + (w * nmethods + m) * core.M_SIZE
                calls = r.load64(base + core.M_CALLS)
                if not calls:
                    continue
                rec["calls"] += calls
                rec["errors"] += r.load64(base + core.M_ERRORS)
                rec["total_ns"] += r.load64(base + core.M_TOTAL_NS)
                rec["max_ns"] = max(rec["max_ns"], r.load64(base + core.M_MAX_NS))
                rec["wait_ns"] += r.load64(base + core.M_WAIT_NS)
                rec["wait_max_ns"] = max(rec["wait_max_ns"], r.load64(base + core.M_WAIT_MAX_NS))
                for b in range(core.M_NBUCKETS):
                    buckets[b] += r.load64(base + core.M_BUCKETS + 8 * b)
                    wait_buckets[b] += r.load64(base + core.M_WAIT_BUCKETS + 8 * b)
            out[name] = rec
        return out

    # -- TCP served by the workers (layout 5: the T_* records at H_TCP_OFF) --
    TCP_GAUGES = ("clients", "handshaking", "inflight")
    TCP_COUNTERS = ("connections_total", "calls", "errors", "refused", "auth_failures", "protocol_errors",
                    "bytes_in", "bytes_out", "answered_inline", "handshakes_evicted")

    def tcp_offset(self, index: int) -> int:
        return self.region.load32(core.H_TCP_OFF) + index * core.T_SIZE

    def clear_tcp_gauges(self, index: int) -> None:
        off = self.tcp_offset(index)
        for field in (core.T_CLIENTS, core.T_HANDSHAKING, core.T_INFLIGHT, core.T_LEASE):
            self.region.store64(off + field, 0)
        self.region.store32(off + core.T_LISTENING, 0)
        self.region.store32(off + core.T_SHORT, 0)

    def tcp_totals(self) -> dict:
        """The TCP records of every worker entry summed: gauges (clients, handshaking, inflight,
        listening workers) and counters (see layout.h)."""
        r, out = self.region, {}
        fields = [(name, getattr(core, "T_" + name.upper())) for name in self.TCP_GAUGES + self.TCP_COUNTERS]
        for name, _ in fields:
            out[name] = 0
        out["listening"] = 0
        for i in range(core.MAX_WORKERS):
            off = self.tcp_offset(i)
            for name, field in fields:
                out[name] += r.load64(off + field)
            out["listening"] += r.load32(off + core.T_LISTENING)
        return out

    # -- channels --
    def channel_offset(self, slot: int) -> int:
        return core.H_CHANNELS + slot * core.C_SIZE

    def free_channel(self, slot: int, owner_pid: int) -> None:
        """Remove a channel's data segments and give the slot back.  The owner field is
        released last, so nobody can acquire the slot while it is being cleaned."""
        off = self.channel_offset(slot)
        r = self.region
        # A segment that was replaced (its service restarted) names its channels' data segments
        # as its successor does: the names are the successor's now (its owner removed ours when
        # it began), so they are left alone.  Without this, a process with two clients of the
        # service, one still on the old segment, would remove the other's new channel.
        current = self.is_current()
        for path in [] if not current else glob.glob(os.path.join(SHM_DIR, glob.escape(data_segment_name(self.service, owner_pid, slot, 0))[:-1] + "*")):
            unlink_path(path)
        r.store64(off + core.C_DATA_CAP, 0)
        r.store32(off + core.C_STATE, core.ST_IDLE)
        r.store32(off + core.C_OWNER_PID, 0)

    def reap(self) -> int:
        """Reclaim channels whose owner died, or whose caller gave up on a worker that
        then died too, and the table entries of dead workers.  Safe to run from any
        number of processes at once.  Returns how many channels were reclaimed."""
        r, reclaimed, alive = self.region, 0, {}

        def is_alive(pid, start=0):
            key = (pid, start)
            if key not in alive:
                alive[key] = process_alive(pid, start)
            return alive[key]

        for slot in range(self.max_channels):
            off = self.channel_offset(slot)
            owner = r.load32(off + core.C_OWNER_PID)
            if owner == 0 or owner == core.CHANNEL_RECLAIMING:
                continue
            dead_owner = not is_alive(owner, r.load64(off + core.C_OWNER_START))
            while True:
                st = r.load32(off + core.C_STATE)
                code, worker = st & core.ST_CODE, st >> core.ST_PID_SHIFT
                if code == core.ST_REQUEST and dead_owner:
                    if not r.cas32(off + core.C_STATE, st, core.ST_IDLE):   # withdraw it before a worker claims it
                        continue
                    reclaimable = True
                elif code in (core.ST_CLAIMED, core.ST_ABANDONED) and is_alive(worker):
                    # a live worker still holds the call: it frees the channel when it finishes
                    if (code == core.ST_CLAIMED and dead_owner
                            and not r.cas32(off + core.C_STATE, st, core.ST_ABANDONED | (worker << core.ST_PID_SHIFT))):
                        continue
                    reclaimable = False
                else:
                    # a dead worker's call: the owner, if alive, takes the channel back itself
                    reclaimable = dead_owner or code == core.ST_ABANDONED
                break
            if reclaimable and r.cas32(off + core.C_OWNER_PID, owner, core.CHANNEL_RECLAIMING):
                self.free_channel(slot, owner)
                reclaimed += 1
        # a supervised worker's entry outlives it until its supervisor has read it (the
        # supervisor waits for the process, so until then it is a zombie)
        supervised = self.supervised
        for i in range(core.MAX_WORKERS):
            off = self.worker_offset(i)
            pid = r.load32(off + core.W_PID)
            if pid and not is_alive(pid) and not (supervised and process_is_zombie(pid)):
                self.clear_tcp_gauges(i)   # (its connections died with it)
                r.store32(off + core.W_STATE, core.WORKER_FREE)
                r.cas32(off + core.W_PID, pid, 0)
        return reclaimed


def remove_service_segments(service: str, keep_starting: bool = False) -> None:
    """Unlink a service's segment and every data segment of its channels (but, with
    ``keep_starting``, not a segment another live owner is still filling in; and never a
    symbolic link or another uid's file)."""
    base = os.path.join(SHM_DIR, service_segment_name(service))
    for path in [base] + glob.glob(glob.escape(base) + ".*"):
        if keep_starting and ".starting-" in path:
            pid = path.rsplit("-", 1)[-1]
            if pid.isdigit() and process_alive(int(pid)):
                continue
        unlink_path(path)


# ---- a channel's data segment ---------------------------------------------------------------

class DataSegment:
    """One mapping of a channel's data segment, on either side."""

    __slots__ = ("gen", "size", "region", "view")

    def __init__(self, gen: int, mapped: tuple[core.Region, int]):
        self.gen = gen
        self.region = mapped[0]
        self.region.gen = gen   # (a caller reads an answer in place only from the generation it is in)
        self.size = self.region.size
        self.view = memoryview(self.region)

    @classmethod
    def create(cls, service, owner_pid, slot, gen, size):
        return cls(gen, create_segment(data_segment_name(service, owner_pid, slot, gen), size))

    @classmethod
    def open(cls, service, owner_pid, slot, gen):
        return cls(gen, open_segment(data_segment_name(service, owner_pid, slot, gen)))


def grown_size(needed: int, current: int) -> int:
    size = max(needed, 2 * current, INITIAL_CHANNEL_SIZE)
    return (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


def replace_data_segment(seg: ServiceSegment, slot: int, owner_pid: int, needed: int,
                         current_size: int = 0) -> DataSegment:
    """Move a channel to a larger data segment (the next generation) and drop the old name.
    Called by whichever side holds the channel at the time.  Generations only grow, so
    a name is never reused within the life of the service segment."""
    off = seg.channel_offset(slot)
    old_gen = seg.region.load32(off + core.C_DATA_GEN)
    size = grown_size(needed, current_size)
    try:
        new = DataSegment.create(seg.service, owner_pid, slot, old_gen + 1, size)
    except FileExistsError:   # ours, left by a growth that was interrupted before it was published
        unlink_segment(data_segment_name(seg.service, owner_pid, slot, old_gen + 1))
        new = DataSegment.create(seg.service, owner_pid, slot, old_gen + 1, size)
    seg.region.store64(off + core.C_DATA_CAP, new.size)
    seg.region.store32(off + core.C_DATA_GEN, old_gen + 1)
    unlink_segment(data_segment_name(seg.service, owner_pid, slot, old_gen))
    return new
