"""A worker process: instantiate the service class once, then serve calls from shared memory.

Run as ``python -m speedysvc.shm.worker TARGET SERVICE`` (or ``python -m
speedysvc.worker``) where TARGET is ``module:Class`` or ``/path/to/file.py:Class``.
Supervisors (LocalService, the service manager) start workers this way, with
``worker_argv`` and ``worker_env``.  A worker exits when the service stops, on
SIGTERM (after finishing the call in hand), or when the service's owner or its
own parent dies: at once if it is idle, else after ``OWNER_DEATH_GRACE`` for the
call in hand to finish, killed if it does not (``watch_owner``).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import mmap
import importlib.util
import os
import signal
import sys
import time
import traceback

from .. import _shmcore as core
from ..allocation import keep_large_allocations
from ..errors import EncodeError, PayloadTooLarge, encode_exception
from ..codecs.outofband import OutOfBand
from . import segment
from .dispatch import STATUS_ERROR, Dispatcher, Held
from .dispatch import errors as dispatch_errors
from .logpipe import setup_worker_logging

HOUSEKEEPING_INTERVAL = 1.0
# a worker whose owner died while it runs a call gives the call this long to end, then is killed
OWNER_DEATH_GRACE = 0.5
FILE_MODULE = "__speedysvc_main__"   # the name a class's module loaded from a file path gets
PARENT_DEATH_ENV = "SPEEDYSVC_PARENT_DEATH_SIGNAL"
# "module:callable,...": each is called with the Worker before it registers and returns an
# object with registered(index) and stop() (the supervisor names them; the worker knows none)
ADDONS_ENV = "SPEEDYSVC_WORKER_ADDONS"

log = logging.getLogger("speedysvc.worker")


def worker_argv(target: str, service: str | None = None, *extra: str) -> list[str]:
    """The command line that starts a worker of ``target`` (``module:Class`` or ``file.py:Class``)."""
    return [sys.executable, "-m", "speedysvc.shm.worker", target] + ([service] if service else []) + list(extra)


def worker_env(paths: list[str], base: dict | None = None) -> dict:
    """The environment for a worker (or a process that imports service classes): ``base``
    (default: ours) with ``paths`` in front of its PYTHONPATH, each once."""
    env = dict(os.environ if base is None else base)
    if env.get("PYTHONPATH"):
        paths = list(paths) + [env["PYTHONPATH"]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


def load_target(target: str):
    """Import ``module:Class`` or ``path/file.py:Class`` and return the class."""
    module_name, sep, qualname = target.rpartition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"target must be 'module:Class' or 'file.py:Class', got {target!r}")
    if module_name.endswith(".py"):
        path = os.path.abspath(module_name)
        spec = importlib.util.spec_from_file_location(FILE_MODULE, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def watch_owner(seg: segment.ServiceSegment, parent: int) -> None:
    """Make this process end when the service's owner (the manager, LocalService's process) or
    ``parent`` dies, even inside a call that never returns: a thread of the C extension waits
    on their pidfds, then sends SIGTERM (an idle worker stops at once) and, ``OWNER_DEATH_GRACE``
    later, SIGKILL.  (A parent-death signal would not do: it comes when the *thread* that
    started the worker ends, which under LocalService may be long before its process, and a
    signal handler cannot end a call.)  Without pidfds (Linux < 5.3) the worker falls back on
    checking its parent once a second, between calls."""
    owner, owner_start = seg.owner
    watched = [(owner, owner_start)] + ([(parent, 0)] if parent > 1 and parent != owner else [])
    fds = []
    try:
        for pid, start in watched:
            fds.append(os.pidfd_open(pid))
            # opened after the process was checked alive: a reused pid is not taken for it
            if not segment.process_alive(pid, start):
                raise ProcessLookupError
    except ProcessLookupError:
        raise SystemExit(f"speedysvc worker: the owner of service {seg.service!r} (pid {owner}) "
                         f"or this worker's parent (pid {parent}) is gone") from None
    except (OSError, AttributeError) as e:   # no pidfd_open (old kernel, or Python without it)
        log.warning("cannot watch the service's owner (%s); checking the parent once a second instead", e)
        for fd in fds:
            os.close(fd)
        return
    core.watch_processes(fds, OWNER_DEATH_GRACE)


class Worker:
    def __init__(self, server_cls, service: str | None = None, watch: bool = False):
        """``watch``: end with the service's owner (``watch_owner``); for worker processes."""
        parent = os.getppid()
        self.service = service or server_cls.service_name()
        self.segment = segment.ServiceSegment.attach(self.service)
        if watch:   # before the service class is made, which may take a long time
            watch_owner(self.segment, parent)
        self.dispatcher = Dispatcher(server_cls())
        self.pid = os.getpid()
        self.segment.write_method_names(self.dispatcher.method_names)
        # what the supervisor adds to this worker (ADDONS_ENV): started before the worker
        # registers, so a supervisor that sees it serve can count on them (a worker that serves
        # TCP itself, speedysvc.tcp.inworker, listens by then)
        self.addons = [load_target(spec)(self) for spec in os.environ.get(ADDONS_ENV, "").split(",") if spec]
        self.index = self.segment.register_worker(self.pid)
        for addon in self.addons:
            addon.registered(self.index)
        # slot -> (owner pid, generation, data region, read-only view) of mapped channels
        self.channels: list = [None] * self.segment.max_channels
        self.stop = [False]
        self.warned_kept: set[int] = set()

    def serve_forever(self) -> None:
        seg, region, dispatcher = self.segment, self.segment.region, self.dispatcher
        parent = os.getppid()
        orderly = False
        # Housekeeping is due once a second whatever the traffic: the C loop is given the time
        # left until then, not a fresh interval on each call (it hands many calls back to
        # Python, and steady traffic of those would put housekeeping off for ever).
        due = time.monotonic() + HOUSEKEEPING_INTERVAL
        try:
            while not self.stop[0]:
                # the common case runs in C until housekeeping is due; it hands back what it
                # cannot do itself
                left = due - time.monotonic()
                got = (region.serve(self.index, self.channels, dispatcher.handlers, self.stop, left)
                       if left > 0 else None)
                if got is None:
                    if seg.state != core.SVC_SERVING and not seg.pending_calls():
                        break
                    now = time.monotonic()
                    if now >= due:
                        due = now + HOUSEKEEPING_INTERVAL
                        if os.getppid() != parent:
                            break  # orphaned: the supervisor is gone
                        try:
                            self.housekeeping()
                        except Exception:
                            log.exception("housekeeping failed")
                else:
                    try:
                        if got[0] == "call":
                            self.serve_one(*got[1:])
                        elif got[0] == "reply":
                            self.reply_large(got[1], self.channels[got[1]], got[2], got[3], got[4])
                        else:
                            self.abandoned(got[1])
                    except Exception as e:  # a fault of ours: fail that call, keep serving
                        log.exception("internal error while serving a call")
                        self.fail_call(got[1], e)
                    finally:   # (answered, given back or abandoned: the TCP thread may run one now)
                        region.end_phase(self.index)
            orderly = True
        finally:
            for addon in self.addons:
                # (a TCP server stops listening, finishes the calls in hand, tells its clients)
                addon.stop()
            # a worker that fails (an exception out of the loop, a signal's) leaves its entry
            # (and the method of its last call) for its supervisor to read; reaping frees it
            if orderly:
                seg.unregister_worker(self.index, self.pid)

    def serve_one(self, slot, owner, gen, name_len, req_len, flags) -> None:
        """A call the C loop handed back: a channel not mapped yet, or an unknown method."""
        seg = self.segment
        entry = self.channels[slot]
        if entry is None or entry[0] != owner or entry[1] != gen:
            try:
                data = segment.DataSegment.open(seg.service, owner, slot, gen)
            except OSError as e:
                off = seg.channel_offset(slot)
                if segment.process_alive(owner, seg.region.load64(off + core.C_OWNER_START)):
                    # a live caller's channel we cannot map (out of descriptors or memory): give the
                    # call back undone, and the caller reports it
                    log.error("cannot map the channel of caller %d: %s", owner, e)
                    self.give_back(slot)
                else:   # the caller vanished, and its segment with it
                    self.abandoned(slot)
                return
            entry = self.channels[slot] = (owner, gen, data.region, data.view.toreadonly())
        view = entry[3]
        name = bytes(view[:name_len])
        method = self.dispatcher.method_index(name)
        seg.set_worker_method(self.index, method)
        status, out = self.dispatcher.handle(name, flags, view[name_len:req_len])
        self.reply_large(slot, entry, status, out, method)

    def reply_large(self, slot, entry, status, out, method: int = -1) -> None:
        """Reply with a response larger than the channel, or one the C loop could not send."""
        seg = self.segment
        if out.__class__ is Held or out.__class__ is OutOfBand:
            self.reply_placed(slot, entry, status, out, method)
            return
        try:
            size = len(out) if isinstance(out, bytes) else memoryview(out).nbytes
            if not isinstance(out, bytes) and not memoryview(out).c_contiguous:
                raise TypeError("not contiguous")
            if not isinstance(status, int) or status < 0:
                raise TypeError(f"bad status {status!r}")
        except TypeError as e:
            status, out = STATUS_ERROR, encode_exception(EncodeError(f"bad response from the handler: {e}"), False)
            size = len(out)
        if size > seg.max_payload:   # (even one the channel could hold: it may be larger than the limit)
            status, out = STATUS_ERROR, encode_exception(PayloadTooLarge(
                f"the response of {size} bytes exceeds the service's limit of {seg.max_payload} bytes"), False)
        elif size > entry[2].size:
            owner = entry[0]
            data = segment.replace_data_segment(seg, slot, owner, size, entry[2].size)
            entry = self.channels[slot] = (owner, data.gen, data.region, data.view.toreadonly())
        self.finish(slot, entry, status, out, method)

    def reply_placed(self, slot, entry, status, out, method: int) -> None:
        """A response written into the channel's data segment here: an ``OutOfBand`` (its
        buffers written where they go, page-aligned), and/or a ``Held`` (the arguments were
        read in place from the request: the response goes after the request, which its
        buffers may come from, and when the method kept a reference to the request's memory,
        the channel moves to a new segment so that the next call does not write over it)."""
        seg = self.segment
        held = out if out.__class__ is Held else None
        payload = held.payload if held is not None else out
        owner = entry[0]
        if held is not None:
            req_len = seg.region.load64(seg.channel_offset(slot) + core.C_REQ_LEN)
            start = (req_len + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        else:
            start = 0
        size = payload.size(0) if payload.__class__ is OutOfBand else len(payload)
        if size > seg.max_payload:
            payload = encode_exception(PayloadTooLarge(
                f"the response of {size} bytes exceeds the service's limit of {seg.max_payload} bytes"), False)
            status, size = STATUS_ERROR, len(payload)
        if start + size > entry[2].size:   # (a request the arguments still read stays mapped: see below)
            data = segment.replace_data_segment(seg, slot, owner, size, entry[2].size)
            entry = self.channels[slot] = (owner, data.gen, data.region, data.view.toreadonly())
            start = 0
        dest = memoryview(entry[2])
        try:
            if payload.__class__ is OutOfBand:
                payload.write(dest, start)
            else:
                dest[start:start + size] = payload
            payload = None   # (its buffers may be views of the request)
            if held is not None:
                held.payload = None
            # The method may have kept something made from its arguments' memory (a numpy
            # array, say): that segment then stays as it is, mapped for as long as it lives,
            # and the channel moves on to a new one (unless it just did).
            kept = held is not None and not held.release()
            if kept:
                self.warn_kept(method)
            if kept and start:
                # as large as the one left behind: the caller's next request, likely of the same
                # size, then fits without the caller growing the channel again
                data = segment.replace_data_segment(seg, slot, owner, max(size, entry[2].size), 0)
                data.view[:size] = dest[start:start + size]
                entry = self.channels[slot] = (owner, data.gen, data.region, data.view.toreadonly())
                start = 0
                dest.release()
                dest = memoryview(entry[2])
            reply = dest[start:start + size]
            try:
                self.finish(slot, entry, status, reply, method)
            finally:
                reply.release()
        finally:
            dest.release()

    def warn_kept(self, method: int) -> None:
        if method not in self.warned_kept:
            self.warned_kept.add(method)
            name = self.dispatcher.method_names[method] if 0 <= method < len(self.dispatcher.method_names) else "?"
            log.warning("%s() kept a reference to its arguments' shared memory past the call (a numpy array "
                        "read in place, say): that memory stays mapped for as long as it lives and the call's "
                        "channel moved to a new segment; copy what a method keeps (array.copy()) to avoid "
                        "this (said once per method)", name)

    def finish(self, slot, entry, status, out, method: int = -1) -> None:
        if not self.segment.region.reply(self.index, slot, entry[2], status, out, method):
            self.abandoned(slot)

    def give_back(self, slot) -> None:
        """Hand a claimed call back undone (state IDLE), waking its caller if it sleeps."""
        r, off = self.segment.region, self.segment.channel_offset(slot) + core.C_STATE
        mine = core.ST_CLAIMED | (self.pid << core.ST_PID_SHIFT)
        while True:
            st = r.load32(off)
            if st & ~core.ST_WAITING != mine:
                return
            if r.cas32(off, st, core.ST_IDLE):
                if st & core.ST_WAITING:
                    r.wake32(off)
                return

    def fail_call(self, slot, exc) -> None:
        entry = self.channels[slot]
        try:
            if entry is None:
                raise LookupError("channel not mapped")
            self.finish(slot, entry, STATUS_ERROR, encode_exception(exc))
        except Exception:
            self.abandoned(slot)

    def abandoned(self, slot) -> None:
        """The caller gave up on the call (timeout, interrupt) or is gone: free its channel."""
        seg = self.segment
        off = seg.channel_offset(slot)
        st = seg.region.load32(off + core.C_STATE)
        owner = seg.region.load32(off + core.C_OWNER_PID)
        if (st & core.ST_CODE) in (core.ST_ABANDONED, core.ST_CLAIMED) and st >> core.ST_PID_SHIFT == self.pid:
            if owner in (0, core.CHANNEL_RECLAIMING):
                seg.region.cas32(off + core.C_STATE, st, core.ST_IDLE)  # already freed: do not leave it claimed
            elif seg.region.cas32(off + core.C_OWNER_PID, owner, core.CHANNEL_RECLAIMING):
                seg.free_channel(slot, owner)
        self.channels[slot] = None

    def housekeeping(self) -> None:
        seg = self.segment
        seg.reap()
        dispatch_errors.flush()   # counts of the methods' exceptions left out of the log
        # drop mappings of channels that were freed or moved, so their memory can go
        for slot, entry in enumerate(self.channels):
            if entry is not None:
                off = seg.channel_offset(slot)
                if (seg.region.load32(off + core.C_OWNER_PID) != entry[0]
                        or seg.region.load32(off + core.C_DATA_GEN) != entry[1]):
                    self.channels[slot] = None


def run(server_cls, service: str | None = None) -> None:
    """Serve until stopped; SIGTERM finishes the call in hand first."""
    setup_worker_logging()
    worker = None

    def on_term(_signum, _frame):
        if worker is not None:
            worker.stop[0] = True
        else:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    if os.environ.get(PARENT_DEATH_ENV):
        # only for a single-threaded supervisor (the manager): the signal comes when the *thread*
        # that started us ends; the watchdog of the owner (watch_owner) covers every supervisor
        core.set_parent_death_signal(signal.SIGTERM)
    # payloads of up to 32 MiB are decoded without page faults on every call
    keep_large_allocations()
    try:
        worker = Worker(server_cls, service, watch=True)
    except Exception as e:   # the class's __init__ raised, or the service is not there
        sys.exit(could_not_start(e))
    worker.serve_forever()


def could_not_start(e: BaseException) -> int:
    """A worker that cannot start says why in one record (the traceback in it; a supervisor
    names the reason by its last line), and exits with 1."""
    last = traceback.format_exception_only(type(e), e)[-1].strip()
    log.error("worker could not start: %s", last, exc_info=(type(e), e, e.__traceback__))
    return 1


def describe(target: str) -> dict:
    """What a supervisor needs to know of a service class, without starting it.
    Raises ValueError with a message that says what is wrong."""
    from ..methods import ServerMethodsBase

    module_name, _, qualname = target.rpartition(":")
    try:
        cls = load_target(target)
    except ModuleNotFoundError as e:
        raise ValueError(f"cannot import module {module_name!r}: {e}") from None
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no class {qualname!r}") from None
    except Exception as e:
        raise ValueError(f"importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, ServerMethodsBase)):
        raise ValueError(f"{qualname} in {module_name!r} is not a ServerMethodsBase subclass")
    name = cls.service_name()
    port = cls.port
    if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
        raise ValueError(f"{qualname}.port must be a TCP port number, got {port!r}")
    return {"name": name, "port": port, "methods": sorted(cls._speedysvc_methods)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speedysvc.shm.worker", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="module:Class or path/file.py:Class")
    parser.add_argument("service", nargs="?", help="service name (default: the class's name attribute)")
    parser.add_argument("--describe", action="store_true",
                        help="print the class's service name, port and methods as JSON, then exit")
    args = parser.parse_args(argv)
    if args.describe:
        import json
        sys.path.insert(0, os.getcwd())
        try:
            print(json.dumps(describe(args.target)))
        except ValueError as e:
            print(str(e), file=sys.stderr)
            return 2
        return 0
    setup_worker_logging()
    try:
        server_cls = load_target(args.target)
    except Exception as e:   # the module does not import, or has no such class
        return could_not_start(e)
    run(server_cls, args.service)
    return 0


if __name__ == "__main__":
    sys.exit(main())
