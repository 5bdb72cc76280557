"""``/metrics`` in the Prometheus text format, from the manager's state (prometheus-client).

Series are stable: a service's state is an enum-style gauge with every state present (no label
on ``speedysvc_service_up`` that changes), per-worker series are keyed by the worker's slot in the
worker table (a replacement takes its predecessor's slot, so a restart adds no series), and a
stopped service's per-method series stay at their last values (the pool remembers them)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# every state a service can report (status.py: "waiting" is a stopped service waiting for
# the services it depends on)
STATES = ("starting", "running", "stopping", "stopped", "failed", "waiting")


def _histogram(family: HistogramMetricFamily, labels: list[str], buckets: list[int], total_ns: int) -> None:
    """A power-of-two µs histogram of the segment (bucket b: under 2**b µs) as Prometheus's
    cumulative buckets, in seconds."""
    cumulative, out = 0, []
    for b, n in enumerate(buckets[:-1]):
        cumulative += n
        out.append((repr((2 ** b) / 1e6), cumulative))
    out.append(("+Inf", sum(buckets)))
    family.add_metric(labels, out, sum_value=total_ns / 1e9)


class _ManagerCollector:
    def __init__(self, manager):
        self.manager = manager

    def collect(self):
        status = self.manager.status()
        services = status["services"]
        info = status["manager"]
        calls = CounterMetricFamily("speedysvc_calls", "Calls served", labels=["service", "method"])
        errors = CounterMetricFamily("speedysvc_errors", "Calls answered with an error", labels=["service", "method"])
        latency = HistogramMetricFamily("speedysvc_call_duration_seconds", "Time in the method, from claim to reply",
                                        labels=["service", "method"])
        wait = HistogramMetricFamily("speedysvc_call_wait_seconds", "Wait for a worker, from post to claim",
                                     labels=["service", "method"])
        refused = CounterMetricFamily("speedysvc_calls_refused", "Calls refused to their callers: the service "
                                      "stopping, stopped, failed or not up within their wait",
                                      labels=["service"])
        lost = CounterMetricFamily("speedysvc_calls_lost", "Calls lost: their worker died in them (WorkerDied)",
                                   labels=["service"])
        in_flight = GaugeMetricFamily("speedysvc_calls_in_flight", "Calls being served", labels=["service"])
        waiting = GaugeMetricFamily("speedysvc_calls_waiting", "Calls waiting for a worker", labels=["service"])
        workers = GaugeMetricFamily("speedysvc_workers", "Worker processes", labels=["service"])
        target = GaugeMetricFamily("speedysvc_workers_target", "Worker processes the pool aims at",
                                   labels=["service"])
        up = GaugeMetricFamily("speedysvc_service_up", "1 if the service is running", labels=["service"])
        state = GaugeMetricFamily("speedysvc_service_state", "1 for the service's current state, 0 for the others",
                                  labels=["service", "state"])
        restarts = CounterMetricFamily("speedysvc_worker_restarts", "Workers restarted after a crash",
                                       labels=["service"])
        scale_events = CounterMetricFamily("speedysvc_scale_events", "Changes of the pool's target size",
                                           labels=["service", "direction", "by"])
        signal_pending = GaugeMetricFamily("speedysvc_autoscale_pending", "Autoscaler signal: calls waiting for a "
                                           "worker, averaged over the last scale interval", labels=["service"])
        signal_busy = GaugeMetricFamily("speedysvc_autoscale_busy_ratio", "Autoscaler signal: share of the "
                                        "workers' time spent in calls", labels=["service"])
        signal_cpu = GaugeMetricFamily("speedysvc_autoscale_cpu_ratio", "Autoscaler signal: CPU use per worker, "
                                       "in cores", labels=["service"])
        cpu = GaugeMetricFamily("speedysvc_worker_cpu_ratio", "CPU use of a worker, in cores",
                                labels=["service", "slot"])
        rss = GaugeMetricFamily("speedysvc_worker_rss_bytes", "Resident memory of a worker",
                                labels=["service", "slot"])
        tcp_clients = GaugeMetricFamily("speedysvc_tcp_connections", "TCP clients connected", labels=["service"])
        tcp_events = CounterMetricFamily("speedysvc_tcp_events", "TCP gateway events (calls, refused handshakes, "
                                         "failed logins, bad frames)", labels=["service", "event"])
        for s in services:
            name = s["name"]
            t = s.get("tcp_server")
            if t:
                tcp_clients.add_metric([name], t["connections"])
                for event in ("calls", "refused", "auth_failures", "protocol_errors"):
                    tcp_events.add_metric([name, event], t[event])
            for m in s["methods"]:
                labels = [name, m["name"]]
                calls.add_metric(labels, m["calls"])
                errors.add_metric(labels, m["errors"])
                _histogram(latency, labels, m["buckets"], round((m["mean_ms"] or 0) * m["calls"] * 1e6))
                _histogram(wait, labels, m["wait_buckets"], round((m["wait_mean_ms"] or 0) * m["calls"] * 1e6))
            refused.add_metric([name], s["refused"])
            lost.add_metric([name], s["lost"])
            in_flight.add_metric([name], s["in_flight"])
            waiting.add_metric([name], s["waiting"])
            workers.add_metric([name], s["workers"])
            target.add_metric([name], s["target_workers"])
            up.add_metric([name], 1 if s["state"] == "running" else 0)
            for st in STATES:
                state.add_metric([name, st], 1 if s["state"] == st else 0)
            restarts.add_metric([name], s["restarts"])
            for direction in ("up", "down"):
                for by in ("autoscaler", "request"):
                    scale_events.add_metric([name, direction, by], s["scale_events"].get(f"{direction}/{by}", 0))
            signals = s["signals"]
            signal_pending.add_metric([name], signals.get("pending", 0.0))
            signal_busy.add_metric([name], signals.get("busy", 0.0))
            signal_cpu.add_metric([name], signals.get("cpu", 0.0))
            for w in s["worker_list"]:
                if w["slot"] is None:   # not serving yet: it has no slot
                    continue
                cpu.add_metric([name, str(w["slot"])], w["cpu"])
                rss.add_metric([name, str(w["slot"])], w["rss"])
        yield from (calls, errors, latency, wait, refused, lost, in_flight, waiting, workers, target, up, state,
                    restarts, scale_events, signal_pending, signal_busy, signal_cpu, cpu, rss, tcp_clients, tcp_events)
        yield from self._manager_metrics(info, status)

    def _manager_metrics(self, info: dict, status: dict):
        uptime = GaugeMetricFamily("speedysvc_manager_uptime_seconds", "Time since the manager started")
        uptime.add_metric([], info["uptime"])
        lag = GaugeMetricFamily("speedysvc_manager_event_loop_lag_seconds",
                                "How late the manager's last 100 ms tick ran")
        lag.add_metric([], info.get("loop_lag_s", 0.0))
        requests = CounterMetricFamily("speedysvc_manager_http_requests", "HTTP requests answered, by route "
                                       "pattern and status", labels=["route", "status"])
        for (route, code), n in sorted(getattr(self.manager, "http_requests", {}).items()):
            requests.add_metric([route, str(code)], n)
        yield from (uptime, lag, requests)
        store = info.get("store") or status.get("store")
        if isinstance(store, dict) and store.get("write_lag_s") is not None:
            write_lag = GaugeMetricFamily("speedysvc_manager_store_write_lag_seconds",
                                          "How far the history store's writes are behind")
            write_lag.add_metric([], store["write_lag_s"])
            yield write_lag


def metrics_text(manager) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ManagerCollector(manager))
    return generate_latest(registry), CONTENT_TYPE_LATEST
