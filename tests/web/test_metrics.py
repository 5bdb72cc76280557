"""/metrics in Prometheus' text format: calls, errors, latency histograms and workers per service."""
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
