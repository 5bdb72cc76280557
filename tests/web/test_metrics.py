"""/metrics in Prometheus' text format: calls, errors, latency histograms and workers per service."""
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from speedysvc import connect
import web_helpers
from services import Chatty
from web_helpers import fetch

manager = web_helpers.manager


def test_metrics_in_prometheus_format(manager):
    with connect(Chatty) as c:
        for _ in range(5):
            c.whoami()
        with pytest.raises(AttributeError):
            c.log("NOT_A_LEVEL", "x")
    _, headers, text = fetch(manager.url + "/metrics")
    assert headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    calls = {(s.labels["service"], s.labels["method"]): s.value for s in families["speedysvc_calls"].samples
             if s.name == "speedysvc_calls_total"}
    assert calls[("Chatty", "whoami")] == 5 and calls[("Chatty", "log")] == 1
    errors = {s.labels["method"]: s.value for s in families["speedysvc_errors"].samples
              if s.name == "speedysvc_errors_total" and s.labels["service"] == "Chatty"}
    assert errors["log"] == 1 and errors["whoami"] == 0
    buckets = [s for s in families["speedysvc_call_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["method"] == "whoami"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 5
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)   # cumulative
    workers = {s.labels["service"]: s.value for s in families["speedysvc_workers"].samples}
    assert workers == {"Chatty": 1, "EchoServer": 1}
    assert any(s.labels["service"] == "Chatty" for s in families["speedysvc_worker_rss_bytes"].samples)
    assert "speedysvc_calls_in_flight" in families and "speedysvc_calls_waiting" in families


def samples(text, family):
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return families[family].samples if family in families else []


STATES = {"starting", "running", "stopping", "stopped", "failed", "waiting"}


def test_stable_series_states_slots_and_a_stopped_services_methods(manager):
    """speedysvc_service_up has no label that changes; the state is an enum-style gauge with
    every state; per-worker series are keyed by slot, not pid (a replaced worker adds none);
    a stopped service's per-method series stay at their last values."""
    with connect(Chatty) as c:
        for _ in range(3):
            c.whoami()
    _, _, text = fetch(manager.url + "/metrics")
    up = [s for s in samples(text, "speedysvc_service_up") if s.labels["service"] == "Chatty"]
    assert [(s.labels, s.value) for s in up] == [({"service": "Chatty"}, 1)]
    state = {s.labels["state"]: s.value for s in samples(text, "speedysvc_service_state")
             if s.labels["service"] == "Chatty"}
    assert set(state) == STATES and state["running"] == 1 and sum(state.values()) == 1
    rss = [s for s in samples(text, "speedysvc_worker_rss_bytes") if s.labels["service"] == "Chatty"]
    assert [set(s.labels) for s in rss] == [{"service", "slot"}]
    slot = rss[0].labels["slot"]
    # a rolling restart replaces the worker: its series keeps its key (the slot is reused), or
    # at most the new worker's slot replaces the old one's; series never pile up by pid
    manager.post("/api/services/Chatty/restart")
    _, _, text = fetch(manager.url + "/metrics")
    rss = [s for s in samples(text, "speedysvc_worker_rss_bytes") if s.labels["service"] == "Chatty"]
    assert len(rss) == 1 and rss[0].labels["slot"].isdigit() and int(rss[0].labels["slot"]) < 64
    assert "pid" not in rss[0].labels and slot.isdigit()
    assert manager.post("/api/services/Chatty/stop")[0] == 200
    _, _, text = fetch(manager.url + "/metrics")
    calls = {s.labels["method"]: s.value for s in samples(text, "speedysvc_calls")
             if s.name == "speedysvc_calls_total" and s.labels["service"] == "Chatty"}
    assert calls["whoami"] == 3
    assert any(s.labels["service"] == "Chatty" for s in samples(text, "speedysvc_call_duration_seconds"))
    state = {s.labels["state"]: s.value for s in samples(text, "speedysvc_service_state")
             if s.labels["service"] == "Chatty"}
    assert state["stopped"] == 1 and sum(state.values()) == 1
    assert [s.value for s in samples(text, "speedysvc_service_up") if s.labels["service"] == "Chatty"] == [0]


def test_manager_autoscaler_refused_and_wait_series(manager):
    with connect(Chatty) as c:
        c.whoami()
    fetch(manager.url + "/api/status")
    _, _, text = fetch(manager.url + "/metrics")
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"speedysvc_manager_uptime_seconds", "speedysvc_manager_event_loop_lag_seconds",
            "speedysvc_manager_http_requests", "speedysvc_autoscale_pending", "speedysvc_autoscale_busy_ratio",
            "speedysvc_autoscale_cpu_ratio", "speedysvc_scale_events", "speedysvc_calls_refused",
            "speedysvc_calls_lost", "speedysvc_call_wait_seconds", "speedysvc_workers_target"} <= names
    # the store is on by default: its write lag is a series
    assert "speedysvc_manager_store_write_lag_seconds" in names
    requests = {(s.labels["route"], s.labels["status"]): s.value
                for s in samples(text, "speedysvc_manager_http_requests") if s.name.endswith("_total")}
    assert requests[("/api/status", "200")] >= 1
    wait = [s for s in samples(text, "speedysvc_call_wait_seconds")
            if s.name.endswith("_count") and s.labels == {"service": "Chatty", "method": "whoami"}]
    assert wait[0].value == 1
    # a scale by request is a scale event
    assert manager.post("/api/services/Chatty/scale", {"workers": 2})[0] == 200
    _, _, text = fetch(manager.url + "/metrics")
    events = {(s.labels["direction"], s.labels["by"]): s.value for s in samples(text, "speedysvc_scale_events")
              if s.labels["service"] == "Chatty" and s.name.endswith("_total")}
    assert events[("up", "request")] == 1 and events[("down", "autoscaler")] == 0


def test_promtool_accepts_the_metrics(manager):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package: apt-get install prometheus)")
    with connect(Chatty) as c:
        c.whoami()
    manager.post("/api/services/EchoServer/stop")
    _, _, text = fetch(manager.url + "/metrics")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
