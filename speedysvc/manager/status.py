"""What a pool reports: the dict behind ``/api/services/<name>``, ``speedysvc status``, the web
interface and ``/metrics`` (docs/http-api.md lists its fields)."""
from __future__ import annotations

import time

from .history import percentile


def method_rows(stats: dict[str, dict]) -> list[dict]:
    """One row per method from ``ServiceSegment.method_stats()``, with its share of the time."""
    total_ns = sum(m["total_ns"] for m in stats.values()) or 1
    return [{"name": name, "calls": m["calls"], "errors": m["errors"],
             "mean_ms": m["total_ns"] / m["calls"] / 1e6 if m["calls"] else None,
             "p99_ms": percentile(m["buckets"], 0.99), "max_ms": m["max_ns"] / 1e6,
             "share": m["total_ns"] / total_ns, "buckets": m["buckets"]}
            for name, m in sorted(stats.items())]


def worker_rows(workers, registered: dict[int, dict]) -> list[dict]:
    """One row per worker process (``WorkerSet``), oldest first, with what it counted."""
    rows = []
    for w in sorted(workers, key=lambda w: w.started):
        r = registered.get(w.pid, {})
        rows.append({"pid": w.pid, "serving": w.pid in registered, "busy": bool(r.get("busy")),
                     "leaving": w.leaving, "calls": r.get("calls", 0), "errors": r.get("errors", 0),
                     "cpu": w.cpu, "rss": w.rss, "uptime": time.monotonic() - w.started,
                     "started": w.started_wall})
    return rows


def tcp_status(pool) -> dict:
    """``tcp`` (address and clients) and ``tcp_server`` (its counts): of the gateway in the
    manager, or summed over the workers' TCP records (tcp_in_workers; docs/shm-protocol.md),
    whose counters are never cleared, so the totals do not drop when workers go."""
    tcp, cfg = pool.tcp, pool.cfg
    if tcp is not None:
        return {"tcp": f"{tcp.host}:{tcp.port} ({len(tcp.connections)} clients)", "tcp_server": tcp.status()}
    seg = pool.segment
    if pool.tcp_reservation is None or seg is None:
        return {"tcp": None, "tcp_server": None}
    t = seg.tcp_totals()
    host, port = cfg.bind_tcp, pool.tcp_port
    return {"tcp": f"{host}:{port} ({t['clients']} clients)",
            "tcp_server": {"host": host, "port": port, "tls": bool(cfg.tcp_tls_cert), "secret": bool(cfg.tcp_secret),
                           "in_workers": True, "listening_workers": t.pop("listening"),
                           "connections": t["clients"], **t}}


def service_status(pool) -> dict:
    cfg, seg = pool.cfg, pool.segment
    registered = {r["pid"]: r for r in pool.registered()}
    stats = seg.method_stats() if seg is not None else {}
    last = pool.history.latest()
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
        "calls_per_s": last.get("calls_per_s", 0.0), "p50_ms": last.get("p50_ms"),
        "p99_ms": last.get("p99_ms"), "cpu": pool.workers.cpu(), "rss": pool.workers.rss(),
        "uptime": time.time() - pool.started_at if pool.started_at and pool.state == "running" else 0.0,
        "restarts": pool.restarts,
        **tcp_status(pool), "signals": pool.signals, "port": cfg.port,
        "log_file": pool.log.path, "methods": method_rows(stats),
        "worker_list": worker_rows(pool.workers, registered),
    }
