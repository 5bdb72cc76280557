"""The last exceptions per method the manager keeps for the service page: read from the records
a worker's ErrorLog writes (speedysvc.shm.dispatch), as they arrive through the log pipe's JSON
lines into a ServiceLog."""
import io
import json
import logging

from speedysvc.manager.logs import ServiceLog
from speedysvc.manager.method_errors import MethodErrors
from speedysvc.shm import dispatch
from speedysvc.shm.logpipe import _JSONLineHandler


class Pipe:
    """A worker's log pipe whose lines go straight into a ServiceLog, as the manager reads them."""

    def __init__(self, log, pid=4321):
        self.log, self.pid = log, pid
        self.handler = _JSONLineHandler.__new__(_JSONLineHandler)
        logging.Handler.__init__(self.handler)
        self.handler.stream = io.StringIO()
        self.logger = logging.getLogger("speedysvc.calls")

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        for line in self.handler.stream.getvalue().splitlines():
            self.log.write_json_line(self.pid, line)


def raise_in(method, errors, exc, now):
    try:
        raise exc
    except Exception as e:
        errors.record(method, e, now=now)


def test_the_last_errors_of_each_method_with_their_tracebacks(tmp_path):
    log = ServiceLog(str(tmp_path / "S.log"), 1 << 20, 1)
    kept = MethodErrors(per_method=3)
    log.subscribers.add(kept.notify)
    errors = dispatch.ErrorLog()
    with Pipe(log):
        for i in range(5):
            raise_in("parse", errors, ValueError(f"bad input {i}\nsecond line"), now=100.0)
        raise_in("load", errors, KeyError("missing"), now=100.0)
        errors.record("parse", TypeError("takes 2 arguments"), bad_arguments=True, now=100.0)  # a WARNING: not kept
    report = kept.report()
    assert [m["method"] for m in report] == ["load", "parse"]   # the one that raised last first
    load, parse = report
    assert parse["logged"] == 5 and len(parse["errors"]) == 3
    newest = parse["errors"][0]
    assert newest["type"] == "ValueError" and newest["message"] == "bad input 4\nsecond line"
    assert newest["pid"] == 4321
    assert newest["traceback"].startswith("Traceback (most recent call last):")
    assert "raise exc" in newest["traceback"] and newest["traceback"].rstrip().endswith("second line")
    assert [e["message"].split("\n")[0] for e in parse["errors"]] == ["bad input 4", "bad input 3", "bad input 2"]
    assert load["errors"][0]["type"] == "KeyError" and load["errors"][0]["message"] == "'missing'"
    log.close()


def test_records_left_out_by_the_rate_limit_are_counted(tmp_path):
    log = ServiceLog(str(tmp_path / "S.log"), 1 << 20, 1)
    kept = MethodErrors()
    log.subscribers.add(kept.notify)
    errors = dispatch.ErrorLog()
    with Pipe(log):
        for _ in range(errors.LIMIT + 7):
            raise_in("hot", errors, RuntimeError("again"), now=10.0)
        errors.flush(now=10.0 + errors.WINDOW)
    (hot,) = kept.report()
    assert hot["logged"] == errors.LIMIT and hot["left_out"] == 7


def test_memory_is_bounded_and_other_loggers_are_ignored(tmp_path):
    kept = MethodErrors(per_method=2, methods=3)
    for i in range(10):
        kept.notify({"logger": "speedysvc.calls", "level": "ERROR", "t": float(i), "pid": 1,
                     "message": f"m{i}() raised ValueError: x\nTraceback (most recent call last):\n  ..."})
    kept.notify({"logger": "app", "level": "ERROR", "t": 1.0, "pid": 1, "message": "m0() raised ValueError: x"})
    assert [m["method"] for m in kept.report()] == ["m9", "m8", "m7"]
    assert json.dumps(kept.report())   # (what the API answers)
