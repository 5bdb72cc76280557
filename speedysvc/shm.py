"""The shared-memory protocol: segments, channels, and both sides of a call.

One *service segment* per service (``/dev/shm/speedysvc.<user>.<service>``)
holds a header, a bitmap of channels with a posted call, a table of workers
and a table of channels.  Each client connection owns one or more *channels*;
a channel's request and response bytes live in its own *data segment*
(``speedysvc.<user>.<service>.<owner pid>-<channel>-<generation>``), which is
replaced by a larger one when a payload does not fit.  Any idle worker claims
any posted call.  The byte layout and the state machine are in
``docs/shm-protocol.md``; the hot path (post, wait, claim, reply) is in the C
extension ``_shmcore``.

Linux only: it relies on /dev/shm, futex(2) and /proc.
"""
from __future__ import annotations

import glob
import mmap
import os
import pwd
import re
import threading
import time
import weakref

from . import _shmcore as core
from .errors import (CallTimeout, DecodeError, NoFreeChannel, PayloadTooLarge, ServiceAlreadyRunning, ServiceUnavailable,
                     SpeedysvcError, WorkerDied)

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
LIVENESS_SLICE = 0.1                   # how often a waiting caller checks its worker is alive

STATUS_OK = 0
STATUS_ERROR = 1

# what _shmcore's call() returns when it has no response in hand
CALL_TOO_BIG, CALL_NOT_SERVING, CALL_PENDING, CALL_READY = 1, 2, 3, 4

STATE_NAMES = {core.SVC_STARTING: "starting", core.SVC_SERVING: "serving",
               core.SVC_STOPPING: "stopping", core.SVC_STOPPED: "stopped"}
_RECLAIMING = 0xFFFFFFFF


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


def create_segment(name: str, size: int) -> tuple[core.Region, int]:
    """A new segment readable and writable by this user only: (mapping, inode).
    The mapping keeps no file descriptor open, so a worker can map many channels."""
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise PermissionError(f"/dev/shm/{name} belongs to uid {st.st_uid}, not to this user")
        return core.map_fd(fd, st.st_size), st.st_ino
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


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


def _refresh_identity():
    global MY_START_TIME
    MY_START_TIME = process_start_time(os.getpid()) or 0


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
        except ServiceUnavailable:
            stale = None
        except SpeedysvcError:
            stale = None  # unreadable leftovers: remove them below
        if stale is not None:
            owner, start = stale.owner
            if stale.state != core.SVC_STOPPED and process_alive(owner, start):
                raise ServiceAlreadyRunning(f"service {service!r} is already served by pid {owner}")
        remove_service_segments(service, keep_starting=True)
        names_off = _page_align(core.H_CHANNELS + max_channels * core.C_SIZE)
        stats_off = names_off + _page_align(core.MAX_METHODS * core.NAME_SIZE)
        size = stats_off + core.MAX_WORKERS * core.MAX_METHODS * core.M_SIZE
        # filled in under a temporary name, then linked to the real one: the name only
        # ever points to a complete segment, and of two owners starting at once one wins
        temp = f"{name}.starting-{os.getpid()}"
        mapped = create_segment(temp, size)
        r = mapped[0]
        r.store32(core.H_NAMES_OFF, names_off)
        r.store32(core.H_STATS_OFF, stats_off)
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
        self.set_state(core.SVC_STOPPED)
        self.kick_workers()
        remove_service_segments(self.service)

    def is_current(self) -> bool:
        """False once the name points to another segment (service restarted) or to none."""
        try:
            return os.stat(os.path.join(SHM_DIR, self.name)).st_ino == self.ino
        except FileNotFoundError:
            return False

    # -- header --
    @property
    def state(self) -> int:
        return self.region.load32(core.H_STATE)

    def set_state(self, state: int) -> None:
        self.region.store32(core.H_STATE, state)

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
        while True:
            flags = self.region.load32(core.H_OWNER_FLAGS)
            if self.region.cas32(core.H_OWNER_FLAGS, flags, flags | core.OWNER_WORKERS_STARTED):
                return

    def abandoned_by_workers(self) -> bool:
        """No worker will ever come: unsupervised, its workers started once and all are dead."""
        flags = self.region.load32(core.H_OWNER_FLAGS)
        return (not flags & core.OWNER_RESTARTS_WORKERS and bool(flags & core.OWNER_WORKERS_STARTED)
                and not any(w["alive"] for w in self.workers()))

    def worker_alive(self, pid: int) -> bool:
        """Is the worker with this pid alive?  Its start time in the worker table guards
        against a reused pid."""
        for w in self.workers():
            if w["pid"] == pid:
                return w["alive"]
        return process_alive(pid)

    def kick_workers(self) -> None:
        """Wake every sleeping worker, e.g. so they notice a state change."""
        self.region.add32(core.H_SEQ, 1)
        self.region.wake32(core.H_SEQ)

    def pending_calls(self) -> int:
        """Calls posted and not yet claimed by a worker."""
        words = (self.max_channels + 63) // 64
        return sum(bin(self.region.load64(core.H_BITMAP + 8 * w)).count("1") for w in range(words))

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
                r.store32(off + core.W_STATE, 1)
                return i
        raise SpeedysvcError(f"service {self.service!r} already has {core.MAX_WORKERS} workers")

    def unregister_worker(self, index: int, pid: int) -> None:
        off = self.worker_offset(index)
        self.region.store32(off + core.W_STATE, 0)
        self.region.cas32(off + core.W_PID, pid, 0)

    def workers(self) -> list[dict]:
        """The registered workers and their counters (for supervisors and tests)."""
        r, out = self.region, []
        for i in range(core.MAX_WORKERS):
            off = self.worker_offset(i)
            pid = r.load32(off + core.W_PID)
            if pid:
                out.append({"index": i, "pid": pid, "busy": r.load32(off + core.W_STATE) == 2,
                            "calls": r.load64(off + core.W_CALLS), "errors": r.load64(off + core.W_ERRORS),
                            "busy_ns": r.load64(off + core.W_BUSY_NS),
                            "claim_ns": r.load64(off + core.W_CLAIM_NS),
                            "alive": process_alive(pid, r.load64(off + core.W_START_TICKS)),
                            "started_ns": r.load64(off + core.W_STARTED_NS)})
        return out

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
        (``buckets[b]`` counts calls under 2**b µs), summed over worker-table entries unless
        one is named.  Records are never cleared, so the sums only grow (a worker reusing an
        entry adds to what its predecessor counted)."""
        r = self.region
        stats_off, nmethods = r.load32(core.H_STATS_OFF), r.load32(core.H_MAX_METHODS)
        workers = range(core.MAX_WORKERS) if worker_index is None else [worker_index]
        out = {}
        for m, name in enumerate(self.method_names()):
            rec = {"calls": 0, "errors": 0, "total_ns": 0, "max_ns": 0, "buckets": [0] * core.M_NBUCKETS}
            for w in workers:
                base = stats_off + (w * nmethods + m) * core.M_SIZE
                calls = r.load64(base + core.M_CALLS)
                if not calls:
                    continue
                rec["calls"] += calls
                rec["errors"] += r.load64(base + core.M_ERRORS)
                rec["total_ns"] += r.load64(base + core.M_TOTAL_NS)
                rec["max_ns"] = max(rec["max_ns"], r.load64(base + core.M_MAX_NS))
                for b in range(core.M_NBUCKETS):
                    rec["buckets"][b] += r.load64(base + core.M_BUCKETS + 8 * b)
            out[name] = rec
        return out

    # -- channels --
    def channel_offset(self, slot: int) -> int:
        return core.H_CHANNELS + slot * core.C_SIZE

    def free_channel(self, slot: int, owner_pid: int) -> None:
        """Remove a channel's data segments and give the slot back.  The owner field is
        released last, so nobody can acquire the slot while it is being cleaned."""
        off = self.channel_offset(slot)
        r = self.region
        for path in glob.glob(os.path.join(SHM_DIR, glob.escape(data_segment_name(self.service, owner_pid, slot, 0))[:-1] + "*")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
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
            if owner == 0 or owner == _RECLAIMING:
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
            if reclaimable and r.cas32(off + core.C_OWNER_PID, owner, _RECLAIMING):
                self.free_channel(slot, owner)
                reclaimed += 1
        for i in range(core.MAX_WORKERS):
            off = self.worker_offset(i)
            pid = r.load32(off + core.W_PID)
            if pid and not is_alive(pid):
                r.store32(off + core.W_STATE, 0)
                r.cas32(off + core.W_PID, pid, 0)
        return reclaimed


def remove_service_segments(service: str, keep_starting: bool = False) -> None:
    """Unlink a service's segment and every data segment of its channels (but, with
    ``keep_starting``, not a segment another live owner is still filling in)."""
    base = os.path.join(SHM_DIR, glob.escape(service_segment_name(service)))
    for path in [base] + glob.glob(base + ".*"):
        if keep_starting and ".starting-" in path:
            pid = path.rsplit("-", 1)[-1]
            if pid.isdigit() and process_alive(int(pid)):
                continue
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# ---- a channel's data segment ---------------------------------------------------------------

class DataSegment:
    """One mapping of a channel's data segment, on either side."""

    __slots__ = ("gen", "size", "region", "view")

    def __init__(self, gen: int, mapped: tuple[core.Region, int]):
        self.gen = gen
        self.region = mapped[0]
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
    except FileExistsError:   # left by a growth that was interrupted before it was published
        unlink_segment(data_segment_name(seg.service, owner_pid, slot, old_gen + 1))
        new = DataSegment.create(seg.service, owner_pid, slot, old_gen + 1, size)
    seg.region.store64(off + core.C_DATA_CAP, new.size)
    seg.region.store32(off + core.C_DATA_GEN, old_gen + 1)
    unlink_segment(data_segment_name(seg.service, owner_pid, slot, old_gen))
    return new


# ---- the caller's side ----------------------------------------------------------------------

def _decode_slow(codec, name: bytes, data):
    """The response ``codec.loads_fast`` refused: decode it fully, or say why not."""
    try:
        return codec.loads(data)
    except Exception as e:
        raise DecodeError(f"cannot decode the response of {name.decode(errors='replace')}() "
                          f"with {codec.name}: {e}") from None


def _first_slice(timeout: float | None) -> float:
    """How long a call's first wait lasts before the caller checks its worker is alive."""
    return LIVENESS_SLICE if timeout is None or timeout > LIVENESS_SLICE else float(timeout)


class _Retry(Exception):
    """The service was restarted under us: the call goes again on the new segment."""


class _Channel:
    """One channel this process owns.  ``lost`` once it was given up (to a worker
    still holding an abandoned call, or with a stopped service)."""

    __slots__ = ("slot", "data", "region", "lost")

    def __init__(self, slot: int, data: DataSegment):
        self.slot = slot
        self.lost = False
        self.set_data(data)

    def set_data(self, data: DataSegment) -> None:
        self.data = data
        self.region = data.region


class _Channels:
    """A transport's attachment to the service segment and the channels it owns.
    Kept apart from the transport so a finalizer can free them without it."""

    def __init__(self, seg: ServiceSegment):
        self.seg = seg
        self.pid = os.getpid()
        self.owned: dict[int, _Channel] = {}
        self.free: list[_Channel] = []
        self.region = seg.region
        self.call = seg.region.call
        self.post, self.collect = seg.region.post, seg.region.collect
        self.closed = False

    def acquire(self, service: str) -> _Channel:
        seg, pid = self.seg, self.pid
        r, n = seg.region, seg.max_channels
        start = (pid * 7919 + threading.get_ident()) % n
        for attempt in range(2):
            for i in range(n):
                slot = (start + i) % n
                off = seg.channel_offset(slot)
                if r.load32(off + core.C_OWNER_PID) == 0 and r.cas32(off + core.C_OWNER_PID, 0, pid):
                    r.store64(off + core.C_OWNER_START, MY_START_TIME)
                    r.store32(off + core.C_STATE, core.ST_IDLE)
                    try:
                        data = replace_data_segment(seg, slot, pid, INITIAL_CHANNEL_SIZE)
                    except BaseException:
                        seg.free_channel(slot, pid)
                        raise
                    ch = self.owned[slot] = _Channel(slot, data)
                    return ch
            if attempt == 0 and not seg.reap():
                break
        raise NoFreeChannel(f"service {service!r} has no free channel "
                                 f"(all {n} are in use; raise max_channels)")

    def retire(self, ch: _Channel) -> None:
        """Free a channel of ours that no call holds, with every data segment it ever had."""
        ch.lost = True
        if self.owned.get(ch.slot) is ch:
            del self.owned[ch.slot]
            self.seg.free_channel(ch.slot, self.pid)

    def release_all(self) -> None:
        """On close: free the channels no call is using now; a call in progress in another
        thread frees its own when it ends (see ``ShmTransport.call``)."""
        self.closed = True
        if os.getpid() != self.pid:
            return
        free, self.free = self.free, []
        for ch in free:
            self.retire(ch)


_transports: "weakref.WeakSet[ShmTransport]" = weakref.WeakSet()


def _after_fork_in_child():
    # The channels belong to the parent; the child attaches afresh when it calls.
    _refresh_identity()
    for t in list(_transports):
        t._lock = threading.Lock()
        t._drop(release=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Pending:
    """A call ``ShmTransport.begin`` left in flight.  Either call it (in a thread) for the
    result, or ``wait()`` for the answer in a thread and ``take()`` it out later on any
    thread (an event loop can then leave a large answer in shared memory until it has
    room for it); ``abandon()`` it if nobody ever will, so its channel is not lost."""

    __slots__ = ("transport", "chans", "ch", "args", "name", "codec", "reply", "result", "settled")

    def __init__(self, transport, chans, ch, args):
        self.transport, self.chans, self.ch, self.args = transport, chans, ch, args
        self.name, self.codec = args[1], args[4]
        self.reply = self.result = None
        self.settled = False

    def __call__(self):
        """In a thread: the call's result (or its error raised)."""
        self.wait()
        return self.take()

    def wait(self) -> None:
        """Block until the answer is in the channel, without taking it out (or raise like a call)."""
        # the request goes in a list that ``_slow_wait`` empties once it is in shared memory for
        # good: the caller's copy (perhaps inflated from a few bytes) is not kept while the call runs
        got, name, payload, flags, codec, timeout, deadline = self.args
        self.args = None
        request = [payload]
        del payload
        self.reply, self.result = self.transport._finish_wait(self, got, name, request, flags, codec, timeout,
                                                              deadline)

    @property
    def size(self) -> int:
        """After ``wait()``: the bytes ``take()`` will copy out of shared memory (0: none)."""
        return 0 if self.reply is None else self.reply[2]

    def take(self):
        """After ``wait()``: the call's result (or its error raised); frees the channel."""
        reply, self.reply = self.reply, None
        if reply is None:
            return self.result
        self.settled = True
        try:
            return self.transport._take_reply(self.chans, self.ch, reply, self.name, self.codec)
        except BaseException:
            self.transport._failed(self.chans, self.ch)
            raise
        finally:
            self.transport._give_back(self.chans, self.ch)

    def abandon(self) -> None:
        if not self.settled:
            self.settled = True
            self.transport._abort(self.chans, self.ch)


class _Posted:
    """A call ``ShmTransport.post`` posted, for ``ShmTransport.collect``."""

    __slots__ = ("chans", "ch", "got", "name", "payload", "flags", "timeout", "deadline")

    def __init__(self, chans, ch, got, name, payload, flags, timeout, deadline):
        self.chans, self.ch, self.got, self.name, self.payload = chans, ch, got, name, payload
        self.flags, self.timeout, self.deadline = flags, timeout, deadline


class ShmTransport:
    """Calls a service on this host through shared memory.

    Thread-safe: each call in flight uses a channel of its own, taken from a small
    pool.  Attaching is lazy, so creating a transport never fails because the
    service is not up yet; a call then raises ServiceUnavailable.
    """

    scheme = "shm"

    def __init__(self, service: str):
        self.service = service
        self._channels: _Channels | None = None
        self._finalizer = None
        self._lock = threading.Lock()
        self._closed = False
        _transports.add(self)

    def __repr__(self) -> str:
        return f"<ShmTransport {self.service!r}>"

    # -- attaching --
    def _attach(self) -> _Channels:
        with self._lock:
            if self._closed:
                raise SpeedysvcError("this connection is closed")
            if self._channels is None:
                chans = _Channels(ServiceSegment.attach(self.service))
                self._finalizer = weakref.finalize(self, chans.release_all)
                self._channels = chans
            return self._channels

    def _drop(self, release: bool = True) -> None:
        """Forget the current attachment, freeing its channels unless it is not ours (after fork)."""
        self._channels = None
        fin, self._finalizer = self._finalizer, None
        if fin is not None:
            fin() if release else fin.detach()

    def _reattach(self, chans: _Channels) -> _Channels:
        """The service was not serving: attach again if it was restarted, else raise."""
        state = chans.seg.state
        self._drop()
        if chans.seg.is_current():
            raise ServiceUnavailable(f"service {self.service!r} is {STATE_NAMES.get(state, state)}")
        return self._attach()

    # -- calling --
    def call(self, name: bytes, payload, flags: int, codec, timeout: float | None):
        """Send one request; return the response decoded with ``codec`` or raise the server's error."""
        chans, ch = self._take()
        return self._resume(chans, ch, None, name, payload, flags, codec, timeout)

    def _take(self) -> tuple[_Channels, _Channel]:
        """The attachment and a free channel of it for one call (the caller gives it back)."""
        chans = self._channels or self._attach()
        try:
            return chans, chans.free.pop()
        except IndexError:
            return chans, chans.acquire(self.service)

    def _resume(self, chans: _Channels, ch: _Channel, got, name: bytes, payload, flags: int, codec, timeout):
        """The rest of a call on channel ``ch``, which this gives back: post it and wait when
        ``got`` is None (``call``), else go on from what ``ShmMethod``'s first wait returned in C
        (every outcome but a small success that decodes: bytes are a response its fast decoder
        refused)."""
        try:   # one try from the wait to the give-back: a signal handler may raise anywhere in it
            if got is None:
                got = chans.call(ch.slot, ch.region, name, payload, flags, _first_slice(timeout))
                if got.__class__ is bytes:
                    try:
                        return codec.loads_fast(got)
                    except Exception:
                        pass
            if got.__class__ is bytes:
                return _decode_slow(codec, name, got)
            if got.__class__ is tuple:
                return codec.remote_error(got[1])
            return self._call_slow(chans, ch, got, name, payload, flags, codec, timeout)
        except _Retry:
            chans.retire(ch)
            return self.call(name, payload, flags, codec, timeout)
        except BaseException:
            self._failed(chans, ch)
            raise
        finally:
            self._give_back(chans, ch)

    def _abort(self, chans: _Channels, ch: _Channel) -> None:
        """``ShmMethod``'s wait raised (a signal handler's exception): settle the channel."""
        try:
            self._failed(chans, ch)
        finally:
            self._give_back(chans, ch)

    def bind_method(self, name: bytes, codec, dumps, timeout: float | None, fallback):
        """A client's method whose common case runs in C (see ``ShmMethod``): arguments
        encoded with ``dumps(args)`` (None: the one bytes argument is the request), the
        response decoded with ``codec.loads_fast``; ``fallback(*args, **kwargs)`` does the
        same in Python and takes every other case."""
        return core.ShmMethod(self, name, codec, dumps, codec.loads_fast, codec.flags, timeout,
                              _first_slice(timeout), fallback)

    def begin(self, name: bytes, payload, flags: int, codec, timeout: float | None, channel=None):
        """Post a call and spin briefly for its answer, for callers that must not block
        (an event loop).  Returns ``(True, result)`` when it was answered at once, else
        ``(False, pending)``, a ``_Pending`` to finish in a thread.  Raises like ``call``
        for what fails at once.  ``channel``: one ``reserve()`` returned, to use."""
        chans, ch = channel or self._take()
        return self._early(chans, ch, None, name, payload, flags, codec, timeout, None)

    def reserve(self):
        """A channel for one later ``begin`` (which gives it back), taken now so that the
        caller knows there is one before it prepares the call; ``unreserve`` it if the
        call is not made.  Raises ``NoFreeChannel`` (or ``ServiceUnavailable``) as a call would."""
        return self._take()

    def unreserve(self, channel) -> None:
        self._give_back(*channel)

    def post(self, name: bytes, payload, flags: int, timeout: float | None) -> "_Posted":
        """The first half of ``begin``: post a call and return at once, so that several
        are in flight before the first is collected.  Every posted call must be given to
        ``collect``.  Raises like ``call`` for what fails at once."""
        chans, ch = self._take()
        try:
            got = chans.post(ch.slot, ch.region, name, payload, flags)
        except BaseException:
            self._failed(chans, ch)
            self._give_back(chans, ch)
            raise
        return _Posted(chans, ch, got, name, payload, flags, timeout,
                       None if timeout is None else time.monotonic() + timeout)

    def collect(self, posted: "_Posted", codec):
        """The second half of ``begin``, with the same result, for a call ``post`` posted."""
        return self._early(posted.chans, posted.ch, posted.got, posted.name, posted.payload, posted.flags, codec,
                           posted.timeout, posted.deadline)

    def _early(self, chans: _Channels, ch: _Channel, got, name: bytes, payload, flags: int, codec, timeout,
               deadline):
        """``begin``'s outcome on channel ``ch``: post the call and spin briefly for its
        answer when ``got`` is None, else (``collect``) go on from what ``Region.post``
        returned.  Gives the channel back unless the call is left in flight."""
        later = False
        try:
            if got is None:
                got = chans.call(ch.slot, ch.region, name, payload, flags, 0.0)
            elif got <= 0:   # posted (-1: a sleeping worker was woken for it)
                got = chans.collect(ch.slot, ch.region, 0.0, got < 0)
            if got.__class__ is bytes:
                try:
                    return True, codec.loads_fast(got)
                except Exception:
                    return True, _decode_slow(codec, name, got)
            if got.__class__ is tuple:
                return True, codec.remote_error(got[1])
            later = True
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout
            return False, _Pending(self, chans, ch, (got, name, payload, flags, codec, timeout, deadline))
        except BaseException:
            self._failed(chans, ch)
            raise
        finally:
            if not later:
                self._give_back(chans, ch)

    def _finish_wait(self, pending: _Pending, got: int, name, request: list, flags, codec, timeout, deadline):
        """``_Pending.wait``: (reply, None) when the answer waits in the channel, which stays
        the call's, else (None, result) with the channel given back."""
        chans, ch = pending.chans, pending.ch
        keep = False
        try:
            ready, value = self._slow_wait(chans, ch, got, name, request, flags, codec, timeout, deadline)
            keep = ready
            return (value, None) if ready else (None, value)
        except _Retry:   # (raised before the request was posted for good: ``request`` still holds it)
            chans.retire(ch)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            return None, self.call(name, request[0], flags, codec, remaining)
        except BaseException:
            self._failed(chans, ch)
            raise
        finally:
            if not keep:
                pending.settled = True
                self._give_back(chans, ch)

    def _failed(self, chans: _Channels, ch: _Channel) -> None:
        if not ch.lost and not self._settle(chans, ch):
            ch.lost = True

    @staticmethod
    def _give_back(chans: _Channels, ch: _Channel) -> None:
        if not ch.lost:
            if chans.closed:   # closed (or the service went away) while this call ran
                chans.retire(ch)
            else:
                chans.free.append(ch)
                if chans.closed:   # ...or just now, between the check and the append
                    chans.release_all()

    def _call_slow(self, chans: _Channels, ch: _Channel, got: int, name, payload, flags, codec, timeout,
                   deadline: float | None = None):
        ready, value = self._slow_wait(chans, ch, got, name, [payload], flags, codec, timeout, deadline)
        return self._take_reply(chans, ch, value, name, codec) if ready else value

    def _slow_wait(self, chans: _Channels, ch: _Channel, got: int, name, request: list, flags, codec, timeout,
                   deadline: float | None = None):
        """Go on with a call that was not answered at once until its answer is in the channel:
        (True, reply) for ``_take_reply``, or (False, result) when it is already decoded.
        ``request`` is [the request], emptied once it is posted for good."""
        seg = chans.seg
        if got == CALL_TOO_BIG:
            payload = request[0]
            size = len(payload) if isinstance(payload, bytes) else memoryview(payload).nbytes
            if size > seg.max_payload:
                raise PayloadTooLarge(f"request of {size} bytes exceeds the service's "
                                      f"limit of {seg.max_payload} bytes")
            ch.set_data(replace_data_segment(seg, ch.slot, chans.pid, len(name) + size, ch.data.size))
            got = seg.region.post(ch.slot, ch.region, name, payload, flags)
            del payload
            if got <= 0:   # posted (-1: a sleeping worker was woken for it)
                request[0] = None
                got = seg.region.collect(ch.slot, ch.region, _first_slice(timeout), got < 0)
            if got.__class__ is bytes:
                return False, _decode_slow(codec, name, got)
            if got.__class__ is tuple:
                return False, codec.remote_error(got[1])
        if got == CALL_NOT_SERVING:
            self._reattach(chans)
            raise _Retry
        request[0] = None
        if got == CALL_PENDING:
            return True, self._wait_slow(chans, ch, timeout, deadline)
        return True, seg.region.wait_reply(ch.slot, 0.0)   # CALL_READY: a large response, or one in a segment the worker grew

    def _take_reply(self, chans: _Channels, ch: _Channel, reply, name, codec):
        """Decode (copy out) the answer ``_slow_wait`` found in the channel."""
        status, off, length, gen = reply
        self._follow(chans, ch, gen)
        view = ch.data.view[off:off + length]
        try:
            if status == STATUS_OK:
                return _decode_slow(codec, name, view)
            return codec.remote_error(view)
        finally:
            view.release()

    def _follow(self, chans: _Channels, ch: _Channel, gen: int) -> None:
        if gen != ch.data.gen:  # the worker moved the channel to a larger segment
            ch.set_data(DataSegment.open(self.service, chans.pid, ch.slot, gen))

    def _settle(self, chans: _Channels, ch: _Channel) -> bool:
        """After a failed or interrupted call: take back a call no worker claimed, or
        leave the channel to the worker that holds it.  True if the channel is reusable."""
        r, off = chans.seg.region, chans.seg.channel_offset(ch.slot) + core.C_STATE
        while True:
            st = r.load32(off)
            code = st & core.ST_CODE
            if code == core.ST_IDLE:
                return True
            if code == core.ST_RESPONSE:   # answered, perhaps in a segment the worker grew for it
                try:
                    self._follow(chans, ch, r.load32(off - core.C_STATE + core.C_DATA_GEN))
                except Exception:   # (cannot map it: out of descriptors or memory) not reusable
                    chans.retire(ch)
                    return False
                return True
            if code == core.ST_REQUEST:
                if r.cas32(off, st, core.ST_IDLE):
                    return True
            elif code == core.ST_CLAIMED:
                worker = st >> core.ST_PID_SHIFT
                if not chans.seg.worker_alive(worker):
                    if r.cas32(off, st, core.ST_IDLE):
                        # it may have died halfway through growing the channel: start afresh
                        chans.retire(ch)
                        return False
                elif r.cas32(off, st, core.ST_ABANDONED | (worker << core.ST_PID_SHIFT)):
                    chans.owned.pop(ch.slot, None)  # the worker frees it when it finishes
                    ch.lost = True
                    return False
            else:
                return False

    def _wait_slow(self, chans: _Channels, ch: _Channel, timeout: float | None, deadline: float | None = None):
        """The call is taking a while: keep waiting, but notice a dead worker, a
        stopped service and the deadline (by default: the first wait took one slice)."""
        seg = chans.seg
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + max(0.0, timeout - LIVENESS_SLICE)
        r, off = seg.region, seg.channel_offset(ch.slot) + core.C_STATE
        while True:
            st = r.load32(off)
            code = st & core.ST_CODE
            if code == core.ST_CLAIMED and not seg.worker_alive(st >> core.ST_PID_SHIFT):
                if r.cas32(off, st, core.ST_IDLE):
                    # it may have died halfway through growing the channel: start afresh
                    chans.retire(ch)
                    raise WorkerDied(f"the worker (pid {st >> core.ST_PID_SHIFT}) of service "
                                     f"{self.service!r} died during the call")
                continue
            if code == core.ST_REQUEST and (seg.state == core.SVC_STOPPED or not seg.owner_alive()):
                if r.cas32(off, st, core.ST_IDLE):
                    self._drop()
                    raise ServiceUnavailable(f"service {self.service!r} stopped before the call was served")
                continue
            if code == core.ST_REQUEST and seg.abandoned_by_workers():
                # nobody will start a worker for this call (a supervised service's owner would)
                if r.cas32(off, st, core.ST_IDLE):
                    raise ServiceUnavailable(f"service {self.service!r} has no worker running")
                continue
            if code == core.ST_IDLE or r.load32(seg.channel_offset(ch.slot) + core.C_OWNER_PID) != chans.pid:
                # a worker dropped the call and gave the channel up (it could not map it)
                chans.retire(ch)
                raise ServiceUnavailable(f"service {self.service!r} dropped the call: a worker could not "
                                         f"map its channel (out of file descriptors or memory?)")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise CallTimeout(f"call to service {self.service!r} timed out after {timeout} s")
            reply = r.wait_reply(ch.slot, LIVENESS_SLICE if remaining is None else min(LIVENESS_SLICE, remaining))
            if reply is not None:
                return reply

    def close(self) -> None:
        """Give the channels back and remove their segments; further calls raise."""
        with self._lock:
            self._closed = True
            self._drop()
