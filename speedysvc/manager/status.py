"""What a pool reports: the dict behind ``/api/services/<name>``, ``speedysvc status``, the web
interface and ``/metrics`` (docs/http-api.md lists its fields)."""
from __future__ import annotations

import time

from .history import quantile, stopped_figures

RUNNING = "running"


def method_rows(stats: dict[str, dict], recent: dict[str, dict] | None = None) -> list[dict]:
    """One row per method from ``ServiceSegment.method_stats()`` (since the service started),
    with its share of the time, and its figures over the last history interval (``recent``:
    the latest point's ``methods``; zeros and nulls when there are none)."""
    total_ns = sum(m["total_ns"] for m in stats.values()) or 1
    rows = []
    for name, m in sorted(stats.items()):
        p99, p99_bound = quantile(m["buckets"], 0.99, m["max_ns"] / 1e6)
        wait_max = m.get("wait_max_ns", 0) / 1e6
        wait_p99, wait_p99_bound = quantile(m.get("wait_buckets") or [], 0.99, wait_max)
        now = (recent or {}).get(name) or stopped_figures()
        rows.append({
            "name": name, "calls": m["calls"], "errors": m["errors"],
            "mean_ms": m["total_ns"] / m["calls"] / 1e6 if m["calls"] else None,
            "p99_ms": p99, "p99_bound": p99_bound, "max_ms": m["max_ns"] / 1e6,
            "share": m["total_ns"] / total_ns, "buckets": m["buckets"],
            "wait_mean_ms": m.get("wait_ns", 0) / m["calls"] / 1e6 if m["calls"] else None,
            "wait_p99_ms": wait_p99, "wait_p99_bound": wait_p99_bound, "wait_max_ms": wait_max,
            "wait_buckets": m.get("wait_buckets") or [0] * len(m["buckets"]),
            "recent": {k: now[k] for k in ("calls_per_s", "errors_per_s", "p50_ms", "p50_bound", "p99_ms",
                                           "p99_bound", "wait_p50_ms", "wait_p99_ms", "wait_p99_bound")},
        })
    return rows


def worker_rows(workers, registered: dict[int, dict]) -> list[dict]:
    """One row per worker process (``WorkerSet``), oldest first, with what it counted and its
    ``slot``: its entry in the worker table (null until it serves), which a replacement takes
    over, so that a series keyed by it does not grow with every new pid."""
    rows = []
    for w in sorted(workers, key=lambda w: w.started):
        r = registered.get(w.pid, {})
        rows.append({"pid": w.pid, "slot": r.get("index"), "serving": w.pid in registered, "busy": bool(r.get("busy")),
                     "leaving": w.leaving, "calls": r.get("calls", 0), "errors": r.get("errors", 0),
                     "cpu": w.cpu, "rss": w.rss, "uptime": time.monotonic() - w.started,
                     "started": w.started_wall})
    return rows


def service_status(pool) -> dict:
    cfg, seg, tcp = pool.cfg, pool.segment, pool.tcp
    registered = {r["pid"]: r for r in pool.registered()}
    # a stopped service's methods keep their last counters (the pool remembers them)
    stats = seg.method_stats() if seg is not None else pool.method_memory
    running = pool.state == RUNNING and seg is not None
    # the latest point's call figures, or, for a service not running, none: a stopped service
    # never shows the calls/s and latencies it had when it ran
    last = pool.history.latest() if running else {}
    recent = {**stopped_figures(), **{k: v for k, v in last.items() if k in stopped_figures()}}
    refused, lost = pool.refused_calls()
    waiting_for = list(pool.waiting_for)
    return {
        "name": cfg.section, "service": cfg.name, "target": cfg.target,
        # "waiting": not started yet, for the services in waiting_for (depends_on) to run
        "state": "waiting" if waiting_for and pool.state in ("stopped", "failed") else pool.state,
        "failure": pool.failure, "restarting": pool.restarting, "depends_on": list(cfg.depends_on), "waiting_for": waiting_for,
        "started": pool.started_at, "workers": len(pool.workers), "target_workers": pool.target,
        "min_workers": cfg.min_proc_num, "max_workers": cfg.max_proc_num, "autoscale": cfg.autoscale,
        "calls": sum(m["calls"] for m in stats.values()), "errors": sum(m["errors"] for m in stats.values()),
        "in_flight": sum(1 for r in registered.values() if r["busy"]),
        "waiting": seg.pending_calls() if seg is not None else 0,
        "calls_per_s": recent["calls_per_s"], "errors_per_s": recent["errors_per_s"],
        "p50_ms": recent["p50_ms"], "p50_bound": recent["p50_bound"],
        "p99_ms": recent["p99_ms"], "p99_bound": recent["p99_bound"], "max_ms": recent["max_ms"],
        "wait_p50_ms": recent["wait_p50_ms"], "wait_p50_bound": recent["wait_p50_bound"],
        "wait_p99_ms": recent["wait_p99_ms"], "wait_p99_bound": recent["wait_p99_bound"],
        "refused": refused, "lost": lost,
        "cpu": pool.workers.cpu(), "rss": pool.workers.rss(),
        "uptime": time.time() - pool.started_at if pool.started_at and pool.state == "running" else 0.0,
        "restarts": pool.restarts,
        "scale_events": {f"{d}/{by}": n for (d, by), n in sorted(pool.scale_events.items())},
        "tcp": f"{tcp.host}:{tcp.port} ({len(tcp.connections)} clients)" if tcp else None,
        "tcp_server": tcp.status() if tcp else None, "signals": pool.signals, "port": cfg.port,
        "log_file": pool.log.path, "methods": method_rows(stats, last.get("methods")),
        "worker_list": worker_rows(pool.workers, registered),
    }
