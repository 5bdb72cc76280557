"""The caller's side of a call over shared memory: ``ShmTransport``.

Thread-safe: each call in flight uses a channel of its own (``shm.channels``).
The common case of a call (post, a short spin, a small answer) runs in C
(``_shmcore.Region.call``, and ``_shmcore.ShmMethod`` for a generated client
method, which hands every other case back to ``ShmTransport._resume``); this
module does the rest: attaching and re-attaching, requests and responses larger
than a channel, a worker that died, a stopped service, timeouts.  The state
machine is in docs/shm-protocol.md.
"""
from __future__ import annotations

import os
import threading
import time
import weakref

from .. import _shmcore as core
from ..codecs.outofband import OutOfBand
# what post() and call() return when they have no response in hand, and a response's status
from .._shmcore import CALL_NOT_SERVING, CALL_PENDING, CALL_TOO_BIG, POSTED, POSTED_WOKE, STATUS_OK
from ..errors import CallTimeout, PayloadTooLarge, ServiceNotUp, ServiceUnavailable, SpeedysvcError, WorkerDied
from ..transport import no_options
from ..waiting import UP_TOO_LATE, Waiting, check_wait
from .channels import Channel, Channels
from .segment import (SHM_DIR, STATE_NAMES, DataSegment, ServiceSegment, process_alive, replace_data_segment,
                      service_segment_name)

# How often a waiting caller checks that its worker is alive (and the service, and its deadline):
# a worker's death is reported within this long and what the check takes, well within the 0.1 s
# the README promises.  It costs a wake-up per slice only while a call runs longer than a slice.
LIVENESS_SLICE = 0.02


def _first_slice(timeout: float | None) -> float:
    """How long a call's first wait lasts before the caller checks its worker is alive."""
    return LIVENESS_SLICE if timeout is None or timeout > LIVENESS_SLICE else float(timeout)


class _Retry(Exception):
    """The service was restarted under us: the call goes again on the new segment."""


class CallCancelled(SpeedysvcError):
    """``PendingCall.cancel()`` was called: raised in the thread that waits for the call
    (``PendingCall.wait``), once the call is settled as a timed-out call is (withdrawn, or
    left to the worker holding it)."""


_transports: "weakref.WeakSet[ShmTransport]" = weakref.WeakSet()


def _after_fork_in_child():
    # The channels belong to the parent; the child attaches afresh when it calls.
    for t in list(_transports):
        t._lock = threading.Lock()
        t._drop(release=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


class PendingCall:
    """A call ``ShmTransport.begin`` left in flight.  Either call it (in a thread) for the
    result, or ``wait()`` for the answer in a thread and ``take()`` it out later on any
    thread (an event loop can then leave a large answer in shared memory until it has
    room for it); ``abandon()`` it if nobody ever will, so its channel is not lost, or
    ``cancel()`` it from another thread while one waits for it."""

    __slots__ = ("transport", "chans", "ch", "args", "name", "codec", "reply", "result", "settled", "cancelled")

    def __init__(self, transport, chans, ch, args):
        self.transport, self.chans, self.ch, self.args = transport, chans, ch, args
        self.name, self.codec = args[1], args[4]
        self.reply = self.result = None
        self.settled = False
        self.cancelled = False

    def __call__(self):
        """In a thread: the call's result (or its error raised)."""
        self.wait()
        return self.take()

    def wait(self) -> None:
        """Block until the answer is in the channel, without taking it out (or raise like a call)."""
        # the request goes in a list that ``_until_answered`` empties once it is in shared memory for
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

    def cancel(self) -> None:
        """From another thread, while one is in ``wait()`` (or about to be): give the call up.
        The waiting thread returns at once, raising ``CallCancelled``, after settling the call
        as a timed-out call is: withdrawn if no worker claimed it (it never runs), else left
        to the worker (ABANDONED: it frees the channel when done).  An answer already in is
        taken and dropped.  Only the waiting thread touches the call's state; this only sets
        a flag and wakes it (``ShmTransport._wake``), which is harmless whatever became of
        the channel meanwhile."""
        self.cancelled = True
        if not self.settled:
            self.transport._wake(self.chans, self.ch)


class PostedCall:
    """A call ``ShmTransport.post`` posted, for ``ShmTransport.collect``."""

    __slots__ = ("chans", "ch", "got", "name", "payload", "flags", "timeout", "deadline")

    def __init__(self, chans, ch, got, name, payload, flags, timeout, deadline):
        self.chans, self.ch, self.got, self.name, self.payload = chans, ch, got, name, payload
        self.flags, self.timeout, self.deadline = flags, timeout, deadline


class ShmTransport:
    """Calls a service on this host through shared memory.

    Thread-safe: each call in flight uses a channel of its own, taken from a small
    pool.  Attaching is lazy, so creating a transport never fails because the
    service is not up yet; a call then waits for it (``_when_up``), up to its
    timeout or ``wait`` (see ``speedysvc.waiting``), and raises ServiceNotUp.
    """

    scheme = "shm"

    def __init__(self, service: str, wait: float | None = None):
        self.service = service
        self.wait = check_wait(wait)
        self._channels: Channels | None = None
        self._finalizer = None
        self._lock = threading.Lock()
        self._closed = False
        self._grown_idle: dict[int, tuple[Channel, float]] = {}   # see trim
        _transports.add(self)

    def __repr__(self) -> str:
        return f"<ShmTransport {self.service!r}>"

    # -- attaching --
    def _attach(self) -> Channels:
        with self._lock:
            if self._closed:
                raise SpeedysvcError("this connection is closed")
            if self._channels is None:
                try:
                    seg = ServiceSegment.attach(self.service)
                except ServiceUnavailable as e:   # none there (yet), or one still being made
                    raise ServiceNotUp(str(e)) from None
                chans = Channels(seg)
                self._finalizer = weakref.finalize(self, chans.release_all)
                self._channels = chans
            return self._channels

    def _drop(self, release: bool = True) -> None:
        """Forget the current attachment, freeing its channels unless it is not ours (after fork)."""
        self._channels = None
        fin, self._finalizer = self._finalizer, None
        if fin is not None:
            fin() if release else fin.detach()

    def _reattach(self, chans: Channels) -> Channels:
        """The service was not serving: attach again if it was restarted, else raise
        (ServiceNotUp if it may still come, see ``_look``)."""
        if chans.seg.is_current():
            reason = self._look()
            if reason is not None:
                raise ServiceNotUp(f"service {self.service!r} is not serving: {reason}")
        self._drop_if(chans)
        return self._attach()

    def _drop_if(self, chans: Channels) -> None:
        with self._lock:
            if self._channels is chans:
                self._drop()

    def _look(self) -> str | None:
        """Whether the service serves now (None, attached), or why not while it may still come;
        raises ServiceUnavailable (with the owner's reason) when it will not: stopping, stopped
        on purpose, failed.  For the waiting path only: it reads /dev/shm and /proc."""
        chans = self._channels
        if chans is not None and not chans.seg.is_current():   # restarted: the name is another's
            self._drop_if(chans)
            chans = None
        if chans is None:
            try:
                chans = self._attach()
            except ServiceNotUp as e:
                path = os.path.join(SHM_DIR, service_segment_name(self.service))
                return str(e) if os.path.lexists(path) else f"no manager or process serves it (no {path})"
        seg = chans.seg
        state = seg.state
        owner, start = seg.owner
        if not process_alive(owner, start):   # killed: its next start replaces the segment
            return f"its owner (pid {owner}) is gone"
        if state == core.SVC_SERVING:
            return None
        if state == core.SVC_STARTING:
            return "it is starting"
        if seg.restarting and state in (core.SVC_STOPPING, core.SVC_STOPPED):
            return "it is restarting"
        if not seg.is_current():   # removed just now (destroyed): look again
            return "it is being replaced"
        reason = seg.reason
        seg.count_refused()   # (the call is refused now: its supervisor counts such calls)
        self._drop_if(chans)
        if state == core.SVC_FAILED:
            raise ServiceUnavailable(f"service {self.service!r} failed: {reason or 'no reason given'}")
        raise ServiceUnavailable(f"service {self.service!r} is {STATE_NAMES.get(state, state)}"
                                 + (f": {reason}" if reason else ""))

    def count_refused(self) -> None:
        """A call gave up waiting for its service (ServiceNotUp): count it in the segment it is
        attached to, if any (with none, no supervisor is there to report it)."""
        chans = self._channels
        if chans is not None:
            chans.seg.count_refused()

    def _when_up(self, error: ServiceNotUp, name: bytes, payload, flags: int, codec, timeout: float | None):
        try:
            return self._when_up_counted(error, name, payload, flags, codec, timeout)
        except ServiceNotUp:
            self.count_refused()
            raise

    def _when_up_counted(self, error: ServiceNotUp, name: bytes, payload, flags: int, codec,
                         timeout: float | None):
        """A call that found its service not serving (and was not sent): wait for it to come,
        looking with a growing pause, then make the call with what is left of its timeout."""
        if payload.__class__ is tuple:
            # ShmMethod's arguments, whose encoding it wrote straight into the channel: a call
            # withdrawn before any worker took it goes again, encoded anew (the same bytes)
            payload = core.msgpack_dumps(payload)
        wait = Waiting(self.service, self.wait, timeout)
        if wait.bound <= 0:   # no waiting; but a service restarted and up again is not "not up"
            if self._look() is not None:
                raise error
            return self._resume(*self._take(), None, name, payload, flags, codec, timeout, True)
        reason = str(error)
        while True:
            time.sleep(wait.pause(reason))
            now = self._look()
            if now is not None:
                reason = now
            else:
                left = wait.remaining(UP_TOO_LATE)
                try:
                    return self._resume(*self._take(), None, name, payload, flags, codec, left, True)
                except ServiceNotUp as e:   # went away again before the call was sent
                    if getattr(e, "waited", False):
                        raise
                    reason = str(e)

    # -- calling --
    def call(self, name: bytes, payload, flags: int, codec, timeout: float | None):
        """Send one request; return the response decoded with ``codec`` or raise the server's error."""
        try:
            chans, ch = self._take()
        except ServiceNotUp as e:
            return self._when_up(e, name, payload, flags, codec, timeout)
        return self._resume(chans, ch, None, name, payload, flags, codec, timeout)

    def _place(self, chans: Channels, ch: Channel, name: bytes, payload: OutOfBand):
        """Write a request with out-of-band buffers into channel ``ch``'s data segment after
        the name (each buffer page-aligned there; the channel grows first if it must), and
        return the view of it there, which posting does not copy again."""
        start = len(name)
        size = payload.size(start)
        seg = chans.seg
        if size > seg.max_payload:
            raise PayloadTooLarge(f"request of {size} bytes exceeds the service's "
                                  f"limit of {seg.max_payload} bytes")
        if start + size > ch.data.size:
            ch.set_data(replace_data_segment(seg, ch.slot, chans.pid, start + size, ch.data.size))
        payload.write(ch.data.view, start)
        return ch.data.view[start:start + size]

    def _placed(self, chans: Channels, ch: Channel, name: bytes, payload):
        """``payload`` as posting takes it: an ``OutOfBand`` placed in ``ch`` (given back if that
        fails), anything else as it is."""
        if payload.__class__ is not OutOfBand:
            return payload
        try:
            return self._place(chans, ch, name, payload)
        except BaseException:
            self._give_back(chans, ch)
            raise

    def _take(self) -> tuple[Channels, Channel]:
        """The attachment and a free channel of it for one call (the caller gives it back)."""
        chans = self._channels or self._attach()
        try:
            return chans, chans.free.pop()
        except IndexError:
            return chans, chans.acquire(self.service)

    def _resume(self, chans: Channels, ch: Channel, got, name: bytes, payload, flags: int, codec, timeout,
                waiting: bool = False):
        """The rest of a call on channel ``ch``, which this gives back: post it and wait when
        ``got`` is None (``call``), else go on from what ``ShmMethod``'s first wait returned in C
        (every outcome but a small success that decodes: bytes are a response its fast decoder
        refused).  A call that found the service not serving, and was not sent, waits for it
        (``_when_up``), unless it already does (``waiting``)."""
        try:
            try:   # one try from the wait to the give-back: a signal handler may raise anywhere in it
                request = payload
                if got is None:
                    if payload.__class__ is OutOfBand:
                        request = self._place(chans, ch, name, payload)
                    got = chans.call(ch.slot, ch.region, name, request, flags, _first_slice(timeout))
                    if got.__class__ is bytes:
                        try:
                            return codec.loads_fast(got)
                        except Exception:
                            pass
                if got.__class__ is bytes:
                    return codec.loads_checked(name, got)
                if got.__class__ is tuple:
                    return codec.remote_error(got[1])
                return self._call_slow(chans, ch, got, name, request, flags, codec, timeout)
            except _Retry:
                chans.retire(ch)
                if payload.__class__ is tuple:   # (see _when_up)
                    payload = core.msgpack_dumps(payload)
                if waiting:   # (``*self._take()``: ``chans`` and ``ch`` stay this call's, for the finally)
                    return self._resume(*self._take(), None, name, payload, flags, codec, timeout, True)
                return self.call(name, payload, flags, codec, timeout)
            except BaseException:
                self._failed(chans, ch)
                raise
            finally:
                self._give_back(chans, ch)
        except ServiceNotUp as e:
            if waiting or getattr(e, "waited", False):   # (waited already: ``self.call`` above)
                raise
            return self._when_up(e, name, payload, flags, codec, timeout)

    def _abort(self, chans: Channels, ch: Channel) -> None:
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
        ``(False, pending)``, a ``PendingCall`` to finish in a thread.  Raises like ``call``
        for what fails at once.  ``channel``: one ``reserve()`` returned, to use."""
        chans, ch = channel or self._take()
        payload = self._placed(chans, ch, name, payload)
        return self._outcome(chans, ch, None, name, payload, flags, codec, timeout, None)

    def reserve(self):
        """A channel for one later ``begin`` (which gives it back), taken now so that the
        caller knows there is one before it prepares the call; ``unreserve`` it if the
        call is not made.  Raises ``NoFreeChannel`` (or ``ServiceUnavailable``) as a call would."""
        return self._take()

    def unreserve(self, channel) -> None:
        self._give_back(*channel)

    def post(self, name: bytes, payload, flags: int, timeout: float | None) -> "PostedCall":
        """The first half of ``begin``: post a call and return at once, so that several
        are in flight before the first is collected.  Every posted call must be given to
        ``collect``.  Raises like ``call`` for what fails at once."""
        chans, ch = self._take()
        payload = self._placed(chans, ch, name, payload)
        try:
            got = chans.post(ch.slot, ch.region, name, payload, flags)
        except BaseException:
            self._failed(chans, ch)
            self._give_back(chans, ch)
            raise
        return PostedCall(chans, ch, got, name, payload, flags, timeout,
                       None if timeout is None else time.monotonic() + timeout)

    def resume_begin(self, chans: Channels, ch: Channel, got, name: bytes, payload, flags: int, codec,
                     timeout: float | None):
        """``begin``'s result for a call that C posted on channel ``ch`` of ``chans`` and did not
        see answered at once (``_shmcore.Gateway`` hands back ``(chans, ch, got)``)."""
        return self._outcome(chans, ch, got, name, payload, flags, codec, timeout, None)

    def collect(self, posted: "PostedCall", codec):
        """The second half of ``begin``, with the same result, for a call ``post`` posted."""
        return self._outcome(posted.chans, posted.ch, posted.got, posted.name, posted.payload, posted.flags, codec,
                           posted.timeout, posted.deadline)

    def _outcome(self, chans: Channels, ch: Channel, got, name: bytes, payload, flags: int, codec, timeout,
               deadline):
        """``begin``'s outcome on channel ``ch``: post the call and spin briefly for its
        answer when ``got`` is None, else (``collect``) go on from what ``Region.post``
        returned.  Gives the channel back unless the call is left in flight."""
        later = False
        try:
            if got is None:
                got = chans.call(ch.slot, ch.region, name, payload, flags, 0.0)
            elif got == POSTED or got == POSTED_WOKE:
                got = chans.collect(ch.slot, ch.region, 0.0, got == POSTED_WOKE)
            if got.__class__ is bytes:
                try:
                    return True, codec.loads_fast(got)
                except Exception:
                    return True, codec.loads_checked(name, got)
            if got.__class__ is tuple:
                return True, codec.remote_error(got[1])
            later = True
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout
            return False, PendingCall(self, chans, ch, (got, name, payload, flags, codec, timeout, deadline))
        except BaseException:
            self._failed(chans, ch)
            raise
        finally:
            if not later:
                self._give_back(chans, ch)

    def _finish_wait(self, pending: PendingCall, got: int, name, request: list, flags, codec, timeout, deadline):
        """``PendingCall.wait``: (reply, None) when the answer waits in the channel, which stays
        the call's, else (None, result) with the channel given back."""
        chans, ch = pending.chans, pending.ch
        keep = False
        try:
            ready, value = self._until_answered(chans, ch, got, name, request, flags, codec, timeout, deadline,
                                                pending)
            keep = ready
            return (value, None) if ready else (None, value)
        except _Retry:   # (raised before the request was posted for good: ``request`` still holds it)
            chans.retire(ch)
            self._check_cancelled(pending)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            return None, self.call(name, request[0], flags, codec, remaining)
        except BaseException:
            self._failed(chans, ch)
            raise
        finally:
            if not keep:
                pending.settled = True
                self._give_back(chans, ch)

    def _failed(self, chans: Channels, ch: Channel) -> None:
        if not ch.lost and not self._settle(chans, ch):
            ch.lost = True

    @staticmethod
    def _give_back(chans: Channels, ch: Channel) -> None:
        if not ch.lost:
            if chans.closed:   # closed (or the service went away) while this call ran
                chans.retire(ch)
            else:
                chans.free.append(ch)
                if chans.closed:   # ...or just now, between the check and the append
                    chans.release_all()

    def _call_slow(self, chans: Channels, ch: Channel, got: int, name, payload, flags, codec, timeout,
                   deadline: float | None = None):
        ready, value = self._until_answered(chans, ch, got, name, [payload], flags, codec, timeout, deadline)
        return self._take_reply(chans, ch, value, name, codec) if ready else value

    def _until_answered(self, chans: Channels, ch: Channel, got: int, name, request: list, flags, codec, timeout,
                   deadline: float | None = None, pending: "PendingCall | None" = None):
        """Go on with a call that was not answered at once until its answer is in the channel:
        (True, reply) for ``_take_reply``, or (False, result) when it is already decoded.
        ``request`` is [the request], emptied once it is posted for good.  ``pending``: the
        ``PendingCall`` this waits for, which another thread may cancel."""
        seg = chans.seg
        if got == CALL_TOO_BIG:
            self._check_cancelled(pending)
            payload = request[0]
            size = len(payload) if isinstance(payload, bytes) else memoryview(payload).nbytes
            if size > seg.max_payload:
                raise PayloadTooLarge(f"request of {size} bytes exceeds the service's "
                                      f"limit of {seg.max_payload} bytes")
            ch.set_data(replace_data_segment(seg, ch.slot, chans.pid, len(name) + size, ch.data.size))
            got = seg.region.post(ch.slot, ch.region, name, payload, flags)
            del payload
            if got == POSTED or got == POSTED_WOKE:
                request[0] = None
                got = seg.region.collect(ch.slot, ch.region, _first_slice(timeout), got == POSTED_WOKE)
            if got.__class__ is bytes:
                return False, codec.loads_checked(name, got)
            if got.__class__ is tuple:
                return False, codec.remote_error(got[1])
        if got == CALL_NOT_SERVING:
            self._reattach(chans)
            raise _Retry
        request[0] = None
        if got == CALL_PENDING:
            return True, self._wait_in_flight(chans, ch, timeout, deadline, pending)
        return True, seg.region.wait_reply(ch.slot, 0.0)   # CALL_READY: a large response, or one in a segment the worker grew

    def _take_reply(self, chans: Channels, ch: Channel, reply, name, codec):
        """Decode (copy out) the answer ``_until_answered`` found in the channel."""
        status, off, length, gen = reply
        self._follow(chans, ch, gen)
        view = ch.data.view[off:off + length]
        try:
            if status == STATUS_OK:
                return codec.loads_checked(name, view)
            return codec.remote_error(view)
        finally:
            view.release()

    def _follow(self, chans: Channels, ch: Channel, gen: int) -> None:
        if gen != ch.data.gen:  # the worker moved the channel to a larger segment
            ch.set_data(DataSegment.open(self.service, chans.pid, ch.slot, gen))

    def _settle(self, chans: Channels, ch: Channel) -> bool:
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
            elif code == core.ST_ABANDONED:   # (given up before: the worker frees it)
                chans.owned.pop(ch.slot, None)
                return False
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

    @staticmethod
    def _check_cancelled(pending: "PendingCall | None") -> None:
        if pending is not None and pending.cancelled:
            raise CallCancelled(f"call to {pending.name.decode(errors='replace')}() cancelled")

    def _wake(self, chans: Channels, ch: Channel) -> None:
        """Make a thread waiting on channel ``ch`` (``wait_reply``) return and look (at its
        cancel flag): clear WAITING while the call is in flight, then wake the state word.
        Changes nothing else, so it is harmless even on a channel that was given back
        meanwhile (a waiter there sets WAITING again and goes on waiting)."""
        r, off = chans.seg.region, chans.seg.channel_offset(ch.slot) + core.C_STATE
        while True:
            st = r.load32(off)
            if not st & core.ST_WAITING or st & core.ST_CODE not in (core.ST_REQUEST, core.ST_CLAIMED):
                break
            if r.cas32(off, st, st & ~core.ST_WAITING):
                break
        r.wake32(off)

    def _wait_in_flight(self, chans: Channels, ch: Channel, timeout: float | None, deadline: float | None = None,
                        pending: "PendingCall | None" = None):
        """The call is taking a while: keep waiting, but notice a dead worker, a
        stopped service, the deadline (by default: the first wait took one slice) and,
        for a ``pending`` call, its cancellation."""
        seg = chans.seg
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + max(0.0, timeout - LIVENESS_SLICE)
        r, off = seg.region, seg.channel_offset(ch.slot) + core.C_STATE
        while True:
            self._check_cancelled(pending)   # (then the caller settles the call: withdrawn, or left to the worker)
            st = r.load32(off)
            code = st & core.ST_CODE
            if code == core.ST_CLAIMED and not seg.worker_alive(st >> core.ST_PID_SHIFT):
                if r.cas32(off, st, core.ST_IDLE):
                    # it may have died halfway through growing the channel: start afresh
                    chans.retire(ch)
                    seg.count_lost()
                    raise WorkerDied(f"the worker (pid {st >> core.ST_PID_SHIFT}) of service "
                                     f"{self.service!r} died during the call")
                continue
            if code == core.ST_REQUEST and (seg.state in (core.SVC_STOPPED, core.SVC_FAILED)
                                            or not seg.owner_alive()):
                if r.cas32(off, st, core.ST_IDLE):
                    # withdrawn: no worker ever saw it, so it may go again once the service is back
                    self._drop_if(chans)
                    raise ServiceNotUp(f"service {self.service!r} stopped before the call was served")
                continue
            if code == core.ST_REQUEST and seg.abandoned_by_workers():
                # nobody will start a worker for this call (a supervised service's owner would)
                if r.cas32(off, st, core.ST_IDLE):
                    seg.count_refused()
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

    def trim(self, above: int, idle: float, now: float | None = None) -> int:
        """For a long-lived caller (the TCP gateway): retire the free channels whose data segment
        grew above ``above`` bytes (for a large call) and that were found free each time this
        was called over ``idle`` seconds; the next call takes a fresh channel, of the first
        size.  Channels only ever grow, so without this one large call would keep its memory
        (in /dev/shm) for as long as the caller lives.  Call it now and then (once a second);
        returns how many were retired.  Calls themselves are untouched: a channel in use is
        never retired, and one taken between two looks costs a channel made anew at most."""
        chans = self._channels
        seen = self._grown_idle
        if chans is None:
            seen.clear()
            return 0
        now = time.monotonic() if now is None else now
        grown = {id(ch): ch for ch in list(chans.free) if ch.data.size > above}
        for key in [key for key, (ch, _) in seen.items() if grown.get(key) is not ch]:
            del seen[key]
        retired = 0
        for key, ch in grown.items():
            since = seen.setdefault(key, (ch, now))[1]
            if now - since < idle:
                continue
            del seen[key]
            try:
                chans.free.remove(ch)
            except ValueError:   # taken meanwhile (by another thread)
                continue
            chans.retire(ch)
            retired += 1
        return retired

    def close(self) -> None:
        """Give the channels back and remove their segments; further calls raise."""
        with self._lock:
            self._closed = True
            self._drop()


def open_shm(address, options: dict) -> ShmTransport:
    """The ``shm://`` scheme's factory (see ``speedysvc.transport``)."""
    wait = options.pop("wait", None)
    no_options(address, options)
    return ShmTransport(address.service, wait)
