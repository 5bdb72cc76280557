"""Calling one service on several hosts: ``BalancedTransport`` (blocking) and
``AsyncBalancedTransport`` (asyncio), used by ``connect(Server, 'tcp://h1,h2:5555,h3')``
or ``connect(Server, ['tcp://h1', 'tcp://h2'])`` (README, "Running on several hosts").

Each configured host is resolved to its addresses (all of them: a Kubernetes headless
Service answers with one per pod), again every ``resolve_every`` seconds, and each
address is an *endpoint* with one TCP transport of its own (``TcpTransport``), which
connects on the endpoint's first call.

Balancing: a call goes to the healthy endpoint with the fewest calls in flight (of those
tied, the one picked longest ago: in turn when all are idle); with more than ``CHOICES_ABOVE`` endpoints, to the better of two picked
at random (the power of two choices: no scan of every endpoint per call).

Failover: an endpoint whose connection cannot be made or broke, or whose server is
stopping, is *ejected*: no call goes to it until a probe (a fresh connection and its
handshake, in the background) succeeds, tried after a pause that doubles from
``EJECT_FIRST`` to ``EJECT_MAX`` seconds while probes fail.  An endpoint with calls in
flight that answers nothing for its connect timeout is ejected too (a host cut off
sends nothing, not even a reset), and probed at once: a slow method passes the probe and
stays.  A call that provably never ran (the connection was refused or could not be made,
the server had no free channel or was stopping: the ``not_run`` reply flag of
docs/tcp-protocol.md) goes to another endpoint, within its timeout.  A call lost in flight
(its connection broke before the answer came, or the worker running it died) may have run:
it raises ``ConnectionLost`` (or ``WorkerDied``) unless its method is idempotent
(``@json_method(idempotent=True)``), which is sent once more, elsewhere.  (A worker that
dies does not eject its host, which replaces it.)  When every endpoint failed a call, it is tried on each again after a
pause, as a single-address client waits for its service (``wait=``), and then fails with
``ServiceUnavailable`` naming each endpoint's last error.
"""
from __future__ import annotations

import asyncio
import inspect
import ipaddress
import random
import socket
import threading
import time

from ..errors import (AuthenticationFailed, ConnectionLost, NoFreeChannel, ProtocolError, ServiceUnavailable,
                      SpeedysvcError, WorkerDied)
from ..waiting import FIRST_POLL, LAST_POLL, MIN_ATTEMPT, check_wait, wait_bound
from .aio import AsyncTcpTransport
from .client import TcpTransport, open_connection
from .protocol import ClientOptions, options_of, python_method

DEFAULT_RESOLVE_EVERY = 10.0   # seconds between two resolutions of the configured host names
EJECT_FIRST = 0.2              # seconds an endpoint that failed stays out before its first probe...
EJECT_MAX = 5.0                # ...doubled while probes fail, up to this
CHOICES_ABOVE = 3              # more endpoints than this: the power of two choices


def default_resolver(host: str, port: int) -> list[str]:
    """The addresses of ``host``: itself if it is one, else what the system's resolver answers
    (its IPv4 addresses when it has any, else its IPv6 ones: a host with both is one host)."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return _addresses(infos)


def _addresses(infos) -> list[str]:
    v4 = list(dict.fromkeys(info[4][0] for info in infos if info[0] == socket.AF_INET))
    return v4 or list(dict.fromkeys(info[4][0] for info in infos if info[0] == socket.AF_INET6))


class _NeverSent(Exception):
    """An endpoint's connection could not be made: nothing of the call was sent."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class _EndpointTcp(TcpTransport):
    """An endpoint's transport: a connection that cannot be made raises ``_NeverSent`` (the
    balancer sends the call elsewhere; the plain transport would wait for this address)."""

    def _reconnect(self, stale, deadline, timeout):
        try:
            return super()._reconnect(stale, deadline, timeout)
        except SpeedysvcError as e:
            raise _NeverSent(e) from None

    def call(self, name: bytes, payload, flags: int, codec, timeout: float | None, _waiting: bool = False):
        # (a call never started goes to another endpoint: the balancer decides, not this transport)
        return self._call(name, payload, flags, codec, timeout, _waiting)

    def drop(self) -> None:
        """Close the connection (calls in flight on it fail); the next call connects anew."""
        conn = self._conn
        if conn is not None:
            conn.close()


class _AsyncEndpointTcp(AsyncTcpTransport):
    async def _connection(self, deadline=None, timeout=None):
        try:
            return await super()._connection(deadline, timeout)
        except SpeedysvcError as e:
            raise _NeverSent(e) from None

    def drop(self) -> None:
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.close()


class Endpoint:
    """One address of the service, and what the client knows of it."""

    __slots__ = ("host", "port", "origin", "opts", "transport", "healthy", "inflight", "calls", "errors",
                 "last_error", "retry_at", "backoff", "probing", "busy_since", "retired", "suspect", "suspect_after", "picked")

    def __init__(self, host: str, port: int, origin: str, opts: ClientOptions, transport):
        self.host, self.port, self.origin, self.opts, self.transport = host, port, origin, opts, transport
        self.healthy = True
        self.inflight = self.calls = self.errors = 0
        self.last_error: str | None = None
        self.retry_at = 0.0        # when an ejected endpoint is probed next
        self.backoff = 0.0         # the pause before its next probe (0: not ejected lately)
        self.probing = False
        self.busy_since = 0.0      # when it last answered a call, or got one with none in flight
        self.retired = False       # no longer in the resolver's answer: closed once idle
        self.suspect = False       # ejected for answering nothing: its connection is dropped if the probe fails
        self.suspect_after = opts.connect_timeout   # calls in flight and nothing back for this long: suspect
        self.picked = 0            # when it was last picked (the balancer's count of picks)

    @property
    def address(self) -> str:
        return self.opts.address

    def state(self) -> dict:
        return {"address": self.address, "host": self.origin, "healthy": self.healthy, "inflight": self.inflight,
                "calls": self.calls, "errors": self.errors, "last_error": self.last_error}

    def __repr__(self) -> str:
        return f"<Endpoint {self.address} {'healthy' if self.healthy else 'ejected'} inflight={self.inflight}>"


# what a failed attempt says about the call: it never ran (send it elsewhere), it was lost in
# flight (it may have run), or it is the call's outcome (raise it)
NEVER_RAN, LOST, OUTCOME = 0, 1, 2


def _kind(e: BaseException) -> int:
    if getattr(e, "not_run", False):
        return NEVER_RAN
    if isinstance(e, WorkerDied):   # the worker died in the call, which may have run: lost too
        return LOST
    if hasattr(e, "remote_traceback"):   # an answer: the method's error, or the gateway's
        return OUTCOME
    if isinstance(e, (ConnectionLost, ProtocolError)):
        return LOST
    return OUTCOME


def _waitable(e: BaseException) -> bool:
    """Whether an endpoint's failure may end by waiting (nothing listens yet, it is stopping,
    busy, unreachable for now), unlike a wrong secret or protocol."""
    return isinstance(e, ServiceUnavailable) and not isinstance(e, (AuthenticationFailed, ProtocolError))


def split_addresses(address) -> list[str]:
    """``'tcp://h1:5555,h2,h3'`` or a list of addresses as a list of addresses, each with the
    scheme (a piece without one takes the one before it)."""
    pieces = address.split(",") if isinstance(address, str) else list(address)
    out, scheme = [], None
    for piece in pieces:
        if not isinstance(piece, str):
            raise TypeError(f"an address is a string such as 'tcp://host:port', not {piece!r}")
        piece = piece.strip()
        if not piece:
            raise ValueError(f"empty address in {address!r}")
        if "://" in piece:
            scheme = piece.split("://", 1)[0]
        elif scheme is None:
            raise ValueError(f"{piece!r} in {address!r} has no scheme: write 'tcp://{piece}'")
        else:
            piece = f"{scheme}://{piece}"
        out.append(piece)
    if not out:
        raise ValueError("no address given")
    return out


class _Balancer:
    """What both transports share: the endpoints, picking one, ejecting and taking back."""

    scheme = "tcp"

    def __init__(self, addresses: list, options: dict, idempotent: frozenset, *, resolver=None,
                 resolve_every: float | None = None, asyncio_: bool = False):
        options = dict(options)
        self.wait = check_wait(options.pop("wait", None))
        if resolve_every is None:
            resolve_every = DEFAULT_RESOLVE_EVERY
        if not isinstance(resolve_every, (int, float)) or isinstance(resolve_every, bool) or not resolve_every > 0:
            raise ValueError(f"resolve_every must be a number of seconds > 0, got {resolve_every!r}")
        if resolver is not None and not callable(resolver):
            raise TypeError(f"resolver must be a callable (host, port) -> addresses, not {resolver!r}")
        self.resolve_every = float(resolve_every)
        self.resolver = resolver
        self.configured = [(a.host, a.port) for a in addresses]
        self.service = addresses[0].service
        self.options = options
        self.base = options_of(addresses[0], dict(options, wait=0))   # checks the options once, here
        self.idempotent = idempotent
        self.eps: list[Endpoint] = []
        self.by_key: dict[tuple, Endpoint] = {}
        self.resolve_errors: dict[str, str] = {}
        self.resolve_at = 0.0      # when the names are resolved again (0: before the first call)
        self.lock = threading.Lock()
        self.turn = 0
        self.closed = False
        self._async = asyncio_

    def __repr__(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.configured)
        return f"<{type(self).__name__} tcp://{hosts} {self.service!r}>"

    # -- endpoints -------------------------------------------------------------------------
    def _endpoint(self, ip: str, port: int, origin: str) -> Endpoint:
        opts = options_of(_Where(self.service, ip, port), dict(self.options, wait=0))
        opts.tls_name = origin   # (TLS checks the certificate against the name, not the address)
        return Endpoint(ip, port, origin, opts, (_AsyncEndpointTcp if self._async else _EndpointTcp)(opts))

    def _update(self, answers: dict) -> None:
        """The resolver's answers, ``{(host, port): [addresses] or an exception}``: endpoints
        come and go (a host whose resolution failed keeps the ones it had)."""
        with self.lock:
            keep: dict[tuple, Endpoint] = {}
            for (host, port), got in answers.items():
                origin = f"{host}:{port}"
                if isinstance(got, BaseException):
                    self.resolve_errors[origin] = f"cannot resolve {host}: {got}"
                    for key, ep in self.by_key.items():
                        if ep.origin == host:
                            keep[key] = ep
                    continue
                self.resolve_errors.pop(origin, None)
                for ip in got:
                    key = (ip, port)
                    if key not in keep:
                        keep[key] = self.by_key.get(key) or self._endpoint(ip, port, host)
            for key, ep in self.by_key.items():
                if key not in keep:
                    ep.retired = True
                    if not ep.inflight:
                        self._close_endpoint(ep)
            self.by_key = keep
            self.eps = list(keep.values())   # (replaced, not changed: a pick in progress keeps its list)

    def _answers_from(self, results) -> dict:
        answers = {}
        for key, got in zip(self.configured, results):
            if not isinstance(got, BaseException):
                try:
                    if isinstance(got, (str, bytes)) or not all(isinstance(a, str) for a in got):
                        raise TypeError
                    got = list(dict.fromkeys(got))
                except TypeError:
                    got = TypeError(f"the resolver answered {got!r}, not a list of addresses")
            answers[key] = got
        return answers

    def endpoints_state(self) -> list[dict]:
        with self.lock:
            return [ep.state() for ep in self.eps]

    # -- picking ---------------------------------------------------------------------------
    def _take(self, tried, now: float):
        """The endpoint for the next attempt of a call (its in-flight count taken), and the
        endpoints to probe now (or None); (None, probes) when every endpoint was tried by this
        call.  ``tried``: the endpoints that failed this call (None: none did)."""
        probes = None
        with self.lock:
            eps = self.eps
            best = None
            candidates = 0
            self.turn = turn = self.turn + 1
            for ep in eps:
                if ep.healthy:
                    if ep.inflight and now - ep.busy_since > ep.suspect_after and not ep.probing:
                        # calls in flight and nothing back for a connect timeout: cut off?
                        self._eject(ep, f"no answer for {ep.suspect_after:g} s with "
                                        f"{ep.inflight} call(s) in flight", now, suspect=True)
                    else:
                        if tried is None or ep not in tried:
                            candidates += 1
                            # ties: the one picked longest ago (in turn, when all are idle)
                            if best is None or ep.inflight < best.inflight or (
                                    ep.inflight == best.inflight and ep.picked < best.picked):
                                best = ep
                        continue
                if not ep.probing and now >= ep.retry_at:
                    ep.probing = True
                    probes = probes or []
                    probes.append(ep)
            if candidates > CHOICES_ABOVE:
                a, b = random.sample([ep for ep in eps if ep.healthy and (tried is None or ep not in tried)], 2)
                best = a if a.inflight <= b.inflight else b
            elif best is None:
                # every healthy endpoint failed this call (or none is): it tries the ejected ones
                # itself, those to be probed soonest first
                rest = [ep for ep in eps if tried is None or ep not in tried]
                best = min(rest, key=lambda ep: ep.retry_at) if rest else None
            if best is not None:
                if not best.inflight:
                    best.busy_since = now
                best.inflight += 1
                best.picked = turn
        return best, probes

    def _eject(self, ep: Endpoint, why: str, now: float, suspect: bool = False, probe_failed: bool = False) -> None:
        """Under ``lock``: no call goes to ``ep`` until a probe succeeds."""
        ep.last_error = why
        if not ep.healthy and not probe_failed:
            return   # out already (another call's failure): its probes set the pace
        ep.healthy = False
        if suspect:
            ep.suspect = True
            ep.retry_at = now   # probed at once: a host merely busy with a slow call passes
            return
        ep.backoff = EJECT_FIRST if not ep.backoff else min(ep.backoff * 2, EJECT_MAX)
        ep.retry_at = now + ep.backoff

    def _ended(self, ep: Endpoint, error: BaseException | None = None, eject: bool = False) -> None:
        """An attempt on ``ep`` ended: answered (``error`` None, or an error the server sent),
        failed at the connection (``eject``), or otherwise (``error``: a timeout, ...)."""
        now = time.monotonic()
        with self.lock:
            ep.inflight -= 1
            if error is None and ep.healthy and not ep.retired:   # (the usual case)
                ep.calls += 1
                ep.busy_since = now
                return
            if eject:
                ep.errors += 1
                self._eject(ep, f"{type(error).__name__}: {error}", now)
            elif error is None or (hasattr(error, "remote_traceback") and not getattr(error, "not_run", False)):
                ep.calls += 1   # answered: the endpoint works
                ep.busy_since = now
                if not ep.healthy and not ep.probing:
                    self._taken_back(ep, now)
            else:
                ep.errors += 1
                ep.last_error = f"{type(error).__name__}: {error}"
            if ep.retired and not ep.inflight:
                self._close_endpoint(ep)

    def _release(self, ep: Endpoint) -> None:
        """An attempt taken on ``ep`` was not made after all (or was cancelled)."""
        with self.lock:
            ep.inflight -= 1
            if ep.retired and not ep.inflight:
                self._close_endpoint(ep)

    def _taken_back(self, ep: Endpoint, now: float) -> None:
        ep.healthy, ep.backoff, ep.suspect, ep.busy_since = True, 0.0, False, now

    def _probed(self, ep: Endpoint, error: BaseException | None) -> None:
        now = time.monotonic()
        with self.lock:
            ep.probing = False
            if error is None:
                self._taken_back(ep, now)
                return
            ep.errors += 1
            drop = ep.suspect
            ep.suspect = False
            self._eject(ep, f"probe failed: {type(error).__name__}: {error}", now, probe_failed=True)
        if drop:   # cut off indeed: the calls waiting on its connection fail now, not at their timeouts
            ep.transport.drop()

    def _close_endpoint(self, ep: Endpoint) -> None:
        raise NotImplementedError

    # -- the outcome of a call that found no endpoint --------------------------------------
    def _none_left(self, timeout: float | None, waited: float) -> ServiceUnavailable:
        with self.lock:
            lines = [f"{ep.address}: {ep.last_error or 'not tried'}" for ep in self.eps]
            lines += list(self.resolve_errors.values())
        error = ServiceUnavailable(
            f"service {self.service!r}: no endpoint could take the call"
            + (f" within {waited:.3g} s" if waited else "") + ": " + ("; ".join(lines) or "no address"))
        error.endpoints = lines
        return error

    def _elsewhere(self, ep: Endpoint, e: BaseException, errors: list, tried, lost, name: bytes):
        """Called while handling ``e``, a failed attempt on ``ep``: ``(tried, lost)`` for the next
        attempt elsewhere when the call never ran, or was lost in flight once and is idempotent;
        else ``e`` goes on up."""
        kind = self._attempt_failed(ep, e, errors)
        if kind == LOST and lost is None and name in self.idempotent:
            lost = e
        elif kind != NEVER_RAN:
            raise
        return (tried or set()) | {ep}, lost

    def _attempt_failed(self, ep: Endpoint, e: BaseException, errors: list) -> int:
        """Book a failed attempt; what it says about the call (``NEVER_RAN``, ``LOST``, ``OUTCOME``)."""
        if isinstance(e, _NeverSent):
            errors.append(e.error)
            self._ended(ep, e.error, eject=True)
            return NEVER_RAN
        kind = _kind(e)
        if kind == NEVER_RAN:
            errors.append(e)
            # a server that is stopping is left; one that is only busy is not
            self._ended(ep, e, eject=not isinstance(e, NoFreeChannel))
        elif kind == LOST:
            # (a worker that died is replaced by its host, which stays: a host that goes loses
            # its connections too)
            self._ended(ep, e, eject=not isinstance(e, WorkerDied))
        else:
            self._ended(ep, e)
        return kind


class _Where:
    """An ``Address``'s fields as ``options_of`` reads them, for one endpoint."""

    def __init__(self, service: str, host: str, port: int):
        self.service, self.host, self.port = service, host, port


class BalancedTransport(_Balancer):
    """Calls a service over several endpoints (see the module's docstring).  Thread-safe."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.resolving = threading.Lock()

    def _resolve(self, now: float) -> None:
        """Resolve the configured names again (one thread does it; the others go on with the
        endpoints as they are, unless there are none yet)."""
        if not self.resolving.acquire(blocking=not self.eps):
            return
        try:
            if now < self.resolve_at and self.eps:
                return   # (another thread just did it)
            resolver = self.resolver or default_resolver
            results = []
            for host, port in self.configured:
                try:
                    results.append(resolver(host, port))
                except Exception as e:
                    results.append(e)
            self._update(self._answers_from(results))
            self.resolve_at = time.monotonic() + self.resolve_every
        finally:
            self.resolving.release()

    def _probe(self, ep: Endpoint) -> None:
        """A fresh connection and its handshake, within the connect timeout (in a thread)."""
        try:
            open_connection(ep.opts).close()
        except Exception as e:
            self._probed(ep, e)
        else:
            self._probed(ep, None)

    def _start_probes(self, probes) -> None:
        for ep in probes:
            threading.Thread(target=self._probe, args=(ep,), name="speedysvc-probe", daemon=True).start()

    def _close_endpoint(self, ep: Endpoint) -> None:
        ep.transport.close()

    def endpoints(self) -> list[dict]:
        return self.endpoints_state()

    def bind_method(self, name: bytes, codec, dumps, timeout: float | None, fallback):
        """A client's method that goes straight to ``call`` (see ``client._ClientMethod``)."""
        return python_method(self.call, name, codec, dumps, timeout, fallback)

    def call(self, name: bytes, payload, flags: int, codec, timeout: float | None):
        if self.closed:
            raise SpeedysvcError("this connection is closed")
        now = start = time.monotonic()
        if now >= self.resolve_at:
            self._resolve(now)
        deadline = None if timeout is None else start + timeout
        tried = None     # the endpoints that failed this call
        errors: list = []
        lost = None              # an idempotent call lost in flight is sent again once: why
        pause, bound = FIRST_POLL, None
        attempts = 0
        while True:
            ep, probes = self._take(tried, now)
            if probes:
                self._start_probes(probes)
            if ep is None:
                # every endpoint failed this call: all again after a pause, within the wait bound
                if lost is not None and not errors:
                    raise lost   # (lost in flight, and no other endpoint left to send it to)
                if bound is None:
                    bound = wait_bound(self.wait, timeout)
                left = start + bound - time.monotonic()
                if left <= 0 or not all(map(_waitable, errors)):
                    raise self._none_left(timeout, time.monotonic() - start)
                time.sleep(min(pause, left))
                pause = min(pause * 2, LAST_POLL)
                tried = None
                errors.clear()
                now = time.monotonic()
                if now >= self.resolve_at or not self.eps:
                    self.resolve_at = 0.0
                    self._resolve(now)
                continue
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining < MIN_ATTEMPT and attempts:   # (a first attempt gets what it has)
                    self._release(ep)
                    raise self._none_left(timeout, time.monotonic() - start)
            attempts += 1
            try:
                result = ep.transport.call(name, payload, flags, codec, remaining)
            except BaseException as e:
                tried, lost = self._elsewhere(ep, e, errors, tried, lost, name)
                now = time.monotonic()
                continue
            self._ended(ep)
            return result

    def close(self) -> None:
        self.closed = True
        with self.lock:
            eps, self.eps, self.by_key = self.eps, [], {}
        for ep in eps:
            ep.transport.close()


class AsyncBalancedTransport(_Balancer):
    """The asyncio transport over several endpoints (see the module's docstring)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, asyncio_=True, **kw)
        self.resolving: asyncio.Task | None = None
        self.probes: set = set()

    async def _resolve_now(self) -> None:
        loop = asyncio.get_running_loop()
        results = []
        for host, port in self.configured:
            try:
                if self.resolver is None:
                    try:
                        ipaddress.ip_address(host)
                        got = [host]
                    except ValueError:
                        got = _addresses(await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
                else:
                    got = self.resolver(host, port)
                    if inspect.isawaitable(got):
                        got = await got
                results.append(got)
            except Exception as e:
                results.append(e)
        self._update(self._answers_from(results))
        self.resolve_at = time.monotonic() + self.resolve_every

    async def _resolve(self) -> None:
        """Resolve again: in the background, unless there are no endpoints yet."""
        task = self.resolving
        if task is None or task.done():
            task = self.resolving = asyncio.ensure_future(self._resolve_now())
            self.resolve_at = time.monotonic() + self.resolve_every   # (one resolution at a time)
        if not self.eps:
            await asyncio.shield(task)

    async def _probe(self, ep: Endpoint) -> None:
        try:
            conn = await AsyncTcpTransport(ep.opts)._open()
        except Exception as e:
            self._probed(ep, e)
        else:
            conn.transport.close()
            self._probed(ep, None)

    def _start_probes(self, probes) -> None:
        for ep in probes:
            task = asyncio.ensure_future(self._probe(ep))
            self.probes.add(task)
            task.add_done_callback(self.probes.discard)

    def _close_endpoint(self, ep: Endpoint) -> None:
        ep.transport.drop()
        ep.transport._closed = True

    def endpoints(self) -> list[dict]:
        return self.endpoints_state()

    async def call(self, name: bytes, payload, flags: int, codec, timeout: float | None):
        if self.closed:
            raise SpeedysvcError("this connection is closed")
        now = start = time.monotonic()
        if now >= self.resolve_at or not self.eps:
            await self._resolve()
        deadline = None if timeout is None else start + timeout
        tried = None     # the endpoints that failed this call
        errors: list = []
        lost = None
        pause, bound = FIRST_POLL, None
        attempts = 0
        while True:
            ep, probes = self._take(tried, now)
            if probes:
                self._start_probes(probes)
            if ep is None:
                if lost is not None and not errors:
                    raise lost
                if bound is None:
                    bound = wait_bound(self.wait, timeout)
                left = start + bound - time.monotonic()
                if left <= 0 or not all(map(_waitable, errors)):
                    raise self._none_left(timeout, time.monotonic() - start)
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, LAST_POLL)
                tried = None
                errors.clear()
                now = time.monotonic()
                if now >= self.resolve_at or not self.eps:
                    await self._resolve()
                continue
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining < MIN_ATTEMPT and attempts:
                    self._release(ep)
                    raise self._none_left(timeout, time.monotonic() - start)
            attempts += 1
            try:
                result = await ep.transport.call(name, payload, flags, codec, remaining)
            except BaseException as e:
                if isinstance(e, asyncio.CancelledError):
                    self._release(ep)
                    raise
                tried, lost = self._elsewhere(ep, e, errors, tried, lost, name)
                now = time.monotonic()
                continue
            self._ended(ep)
            return result

    async def aclose(self) -> None:
        self.closed = True
        with self.lock:
            eps, self.eps, self.by_key = self.eps, [], {}
        for task in list(self.probes):
            task.cancel()
        if self.resolving is not None:
            self.resolving.cancel()
        for ep in eps:
            await ep.transport.aclose()


def open_balanced(addresses: list, options: dict, idempotent: frozenset, *, asyncio: bool = False):
    """The transport of a client over several endpoints (``speedysvc.transport.open_transport``):
    ``addresses`` parsed (tcp:// each), ``options`` connect()'s transport arguments given,
    with ``resolver`` and ``resolve_every``; ``idempotent``: the names of the idempotent methods."""
    options = dict(options)
    kw = {"resolver": options.pop("resolver", None), "resolve_every": options.pop("resolve_every", None)}
    cls = AsyncBalancedTransport if asyncio else BalancedTransport
    return cls(addresses, options, idempotent, **kw)


__all__ = ["BalancedTransport", "AsyncBalancedTransport", "Endpoint", "default_resolver", "open_balanced",
           "DEFAULT_RESOLVE_EVERY", "EJECT_FIRST", "EJECT_MAX", "CHOICES_ABOVE"]
