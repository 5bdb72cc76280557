"""``/metrics`` in the Prometheus text format, from the manager's state (prometheus-client)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class _ManagerCollector:
    def __init__(self, manager):
        self.manager = manager

    def collect(self):
        services = self.manager.status()["services"]
        calls = CounterMetricFamily("speedysvc_calls", "Calls served", labels=["service", "method"])
        errors = CounterMetricFamily("speedysvc_errors", "Calls answered with an error", labels=["service", "method"])
        latency = HistogramMetricFamily("speedysvc_call_duration_seconds", "Time in the method, from claim to reply",
                                        labels=["service", "method"])
        in_flight = GaugeMetricFamily("speedysvc_calls_in_flight", "Calls being served", labels=["service"])
        waiting = GaugeMetricFamily("speedysvc_calls_waiting", "Calls waiting for a worker", labels=["service"])
        workers = GaugeMetricFamily("speedysvc_workers", "Worker processes", labels=["service"])
        up = GaugeMetricFamily("speedysvc_service_up", "1 if the service is running", labels=["service", "state"])
        restarts = CounterMetricFamily("speedysvc_worker_restarts", "Workers restarted after a crash",
                                       labels=["service"])
        cpu = GaugeMetricFamily("speedysvc_worker_cpu_ratio", "CPU use of a worker, in cores",
                                labels=["service", "pid"])
        rss = GaugeMetricFamily("speedysvc_worker_rss_bytes", "Resident memory of a worker",
                                labels=["service", "pid"])
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
                cumulative, buckets = 0, []
                for b, n in enumerate(m["buckets"][:-1]):
                    cumulative += n
                    buckets.append((repr((2 ** b) / 1e6), cumulative))
                buckets.append(("+Inf", m["calls"]))
                latency.add_metric(labels, buckets, sum_value=(m["mean_ms"] or 0) * m["calls"] / 1000)
            in_flight.add_metric([name], s["in_flight"])
            waiting.add_metric([name], s["waiting"])
            workers.add_metric([name], s["workers"])
            up.add_metric([name, s["state"]], 1 if s["state"] == "running" else 0)
            restarts.add_metric([name], s["restarts"])
            for w in s["worker_list"]:
                cpu.add_metric([name, str(w["pid"])], w["cpu"])
                rss.add_metric([name, str(w["pid"])], w["rss"])
        yield from (calls, errors, latency, in_flight, waiting, workers, up, restarts, cpu, rss, tcp_clients, tcp_events)


def metrics_text(manager) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ManagerCollector(manager))
    return generate_latest(registry), CONTENT_TYPE_LATEST
