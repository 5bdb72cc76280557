"""Autoscaling: the load signals a pool measures, and the policy that turns them into workers.

Every ``scale_interval`` the pool hands its policy the ``Signals`` of the
interval that ended, and the policy answers how many workers to add (> 0) or
remove (< 0).  The policy is chosen per service in service.ini
(``autoscale = default``); the built-in ones are in ``POLICIES``, and
``autoscale = module:Class`` names one of your own (imported from the ini
file's folder), a class built as ``Class(cfg)`` with a ``decide(signals)``
method.  docs/service-manager.md describes the default policy's rules.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Signals:
    """A pool's load over the last interval."""

    workers: int          # live workers (not leaving)
    pending: float        # calls waiting for a worker, on average
    busy: float           # fraction of the time the workers spent in calls, 0 to 1
    cpu: float            # the workers' CPU, as a fraction of a core each, on average
    now: float            # time.monotonic() of the decision


class Policy(Protocol):
    """What a pool asks of its autoscaling policy."""

    def decide(self, signals: Signals) -> int:
        """Workers to add (> 0) or remove (< 0); 0 to leave the pool as it is.  The pool keeps the
        result within min_proc_num..max_proc_num."""

    def started(self, now: float) -> None:
        """The pool (re)started with min_proc_num workers."""

    def scaled(self, now: float) -> None:
        """The pool was scaled by hand (``speedysvc scale``): the load so far says nothing more."""


class DefaultPolicy:
    """Up quickly, down slowly.

    * Up: when calls wait for a worker (``pending`` on average at least ``scale_up_queue``)
      or the workers are busy (the larger of their busy fraction and CPU fraction at least
      ``scale_up_busy``), add as many workers as calls wait (at least one), never above
      ``max_proc_num``, at most once per ``scale_up_cooldown``.
    * Down: after ``scale_down_after`` seconds in which no call waited and the workers were
      busy less than ``scale_down_busy`` of the time, remove one worker, never below
      ``min_proc_num``; the timer then starts again.
    """

    name = "default"

    def __init__(self, cfg):
        self.cfg = cfg
        self.low_since: float | None = None   # since when the load has been low
        self.last_up = 0.0                    # when workers were last added

    def started(self, now: float) -> None:
        self.low_since, self.last_up = None, now

    def scaled(self, now: float) -> None:
        self.low_since = None

    def decide(self, s: Signals) -> int:
        cfg = self.cfg
        load = max(s.busy, s.cpu)
        if (s.pending >= cfg.scale_up_queue and s.pending > 0) or load >= cfg.scale_up_busy:
            self.low_since = None
            if s.workers < cfg.max_proc_num and s.now - self.last_up >= cfg.scale_up_cooldown:
                self.last_up = s.now
                return min(cfg.max_proc_num - s.workers, max(1, int(s.pending + 0.999)))
            return 0
        if s.pending == 0 and load < cfg.scale_down_busy and s.workers > cfg.min_proc_num:
            if self.low_since is None:
                self.low_since = s.now
            elif s.now - self.low_since >= cfg.scale_down_after:
                self.low_since = s.now
                return -1
            return 0
        self.low_since = None
        return 0


class FixedPolicy:
    """No autoscaling: the pool keeps min_proc_num workers, or what ``scale`` asked for."""

    name = "fixed"

    def __init__(self, cfg):
        self.cfg = cfg

    def started(self, now: float) -> None:
        pass

    scaled = started

    def decide(self, s: Signals) -> int:
        return 0


POLICIES: dict[str, type] = {"default": DefaultPolicy, "fixed": FixedPolicy}


def check_policy_name(name: str) -> None:
    """ValueError unless ``name`` can name a policy (without importing anything)."""
    module, sep, attr = name.partition(":")
    if name not in POLICIES and not (sep and module and attr):
        raise ValueError(f"must be one of {', '.join(POLICIES)}, or module:Class for a policy of your own")


def policy_class(name: str, folder: str | None = None) -> type:
    """The policy ``autoscale = name`` selects: a name of ``POLICIES``, or ``module:Class``
    (imported with ``folder``, the ini file's, on the path while it is imported).  ValueError
    says what is wrong."""
    check_policy_name(name)
    if name in POLICIES:
        return POLICIES[name]
    module, _, attr = name.partition(":")
    added = bool(folder) and folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        cls = getattr(importlib.import_module(module), attr)
    except Exception as e:
        raise ValueError(f"cannot import {name}: {type(e).__name__}: {e}") from None
    finally:
        if added:
            sys.path.remove(folder)
    missing = [m for m in ("decide", "started", "scaled") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"{name} has no {', '.join(missing)} method: a policy has decide(signals), "
                         f"started(now) and scaled(now)")
    return cls


def make_policy(cfg, folder: str | None = None) -> Policy:
    """The policy of a service's configuration (its ``autoscale`` key)."""
    return policy_class(cfg.autoscale, folder)(cfg)


def busy_ns(registered: list[dict], now_ns: int) -> int:
    """The time the workers of ``registered`` (``ServiceSegment.workers()``) have spent in calls,
    counting the calls they are in now up to ``now_ns`` (time.monotonic_ns())."""
    return sum(r["busy_ns"] + (max(0, now_ns - r["claim_ns"]) if r["busy"] and r["claim_ns"] else 0)
               for r in registered)


class LoadMeter:
    """What a pool measures between two decisions: the calls waiting for a worker (sampled
    often) and the workers' busy time (a difference of their counters)."""

    def __init__(self):
        self.pending_samples: list[int] = []
        self.last_busy: tuple[float, int] | None = None   # (when, busy_ns then)

    def sample_pending(self, n: int) -> None:
        self.pending_samples.append(n)

    def measure(self, registered: list[dict], now: float, now_ns: int) -> tuple[float, float]:
        """(calls waiting on average, busy fraction) since the last measure."""
        samples, self.pending_samples = self.pending_samples, []
        pending = sum(samples) / len(samples) if samples else 0.0
        total = busy_ns(registered, now_ns)
        busy = 0.0
        if self.last_busy is not None and registered:
            t0, b0 = self.last_busy
            if now > t0 and total >= b0:
                busy = min(1.0, (total - b0) / 1e9 / (now - t0) / len(registered))
        self.last_busy = (now, total)
        return pending, busy
