"""What a method raises is logged, once per exception, with its traceback, in the service's
log (speedysvc.shm.dispatch.ErrorLog); a method that keeps failing is rate-limited and the
records left out are counted."""
import logging

from conftest import wait_until
from speedysvc import connect
from speedysvc.shm.dispatch import ErrorLog
from services import Faulty

INI = """
    [defaults]
    log_dir=logs

    [Faulty]
    import_from=services

    [web monitor]
    port={port}
"""


def records(m):
    return [r for r in m.get("/api/services/Faulty/logs?lines=0")["records"] if r["logger"] == "speedysvc.calls"]


def test_each_exception_a_method_raises_is_one_record_with_its_traceback(running):
    m = running(INI)
    with connect(Faulty, timeout=30) as c:
        for exc, call in ((ValueError, lambda: c.fail("bad input 1")), (KeyError, lambda: c.fail_slowly("k"))):
            try:
                call()
            except exc:
                pass
            else:
                raise AssertionError("the call did not raise")
        assert c.ok()
    assert wait_until(lambda: len(records(m)) == 2, 20), records(m)
    first, second = records(m)
    assert first["level"] == "ERROR" and first["message"].startswith("fail() raised ValueError: bad input 1")
    assert "Traceback (most recent call last)" in first["message"] and "raise ValueError(message)" in first["message"]
    assert second["message"].startswith("fail_slowly() raised KeyError: 'k'") and "raise KeyError" in second["message"]


def test_a_method_that_keeps_failing_is_logged_at_most_limit_times_a_window(running):
    m = running(INI)
    with connect(Faulty, timeout=30) as c:
        for i in range(ErrorLog.LIMIT + 15):
            try:
                c.fail(f"again {i}")
            except ValueError:
                pass
        assert c.ok()
    assert wait_until(lambda: len(records(m)) >= ErrorLog.LIMIT, 20)
    assert len(records(m)) == ErrorLog.LIMIT                         # the others are counted, not logged


def test_the_records_left_out_are_counted_when_the_window_ends(caplog):
    log = ErrorLog()
    caplog.set_level(logging.INFO, "speedysvc.calls")
    exc = ValueError("x")
    for i in range(ErrorLog.LIMIT + 7):
        log.record("m", exc, now=100.0 + i * 0.01)
    log.record("other", exc, now=100.0)
    assert [r.levelname for r in caplog.records].count("ERROR") == ErrorLog.LIMIT + 1
    log.flush(now=100.0 + ErrorLog.WINDOW - 1)                       # not over yet: nothing said
    assert not any("not logged" in r.getMessage() for r in caplog.records)
    log.flush(now=100.0 + ErrorLog.WINDOW + 1)
    said = [r.getMessage() for r in caplog.records if "not logged" in r.getMessage()]
    assert said == [f"m(): 7 more exception(s) in {ErrorLog.WINDOW:.0f} s were not logged (at most {ErrorLog.LIMIT} a method)"]
    log.record("m", exc, now=100.0 + ErrorLog.WINDOW + 2)            # a new window logs again
    assert [r.levelname for r in caplog.records].count("ERROR") == ErrorLog.LIMIT + 2


def test_arguments_that_do_not_fit_are_a_warning_not_a_traceback(caplog):
    log = ErrorLog()
    caplog.set_level(logging.INFO, "speedysvc.calls")
    log.record("m", TypeError("m() takes 1 positional argument but 2 were given"), bad_arguments=True)
    (r,) = caplog.records
    assert r.levelname == "WARNING" and r.exc_info is None and "do not fit" in r.getMessage()


CRASH = """
    [defaults]
    log_dir=logs

    [CrashOnStart]
    import_from=services
    crash_limit=2

    [web monitor]
    port={port}
"""


def test_a_worker_that_cannot_start_logs_its_traceback_as_one_record_and_the_manager_names_why(running):
    m = running(CRASH, wait_ready=False)
    m.wait(lambda: m.get("/api/services/CrashOnStart")["state"] == "failed", 60, "the service to fail")
    recs = m.get("/api/services/CrashOnStart/logs?lines=0")["records"]
    starts = [r for r in recs if r["logger"] == "speedysvc.worker" and "could not start" in r["message"]]
    assert len(starts) == 2                                          # one record per worker
    assert starts[0]["level"] == "ERROR"
    assert starts[0]["message"].startswith("worker could not start: RuntimeError: cannot load the model")
    assert "Traceback (most recent call last)" in starts[0]["message"]
    assert not any("Traceback" in r["message"] for r in recs if r["logger"] == "stderr")
    # the manager's own line names the reason: the traceback's last line
    assert wait_until(lambda: "start crash 1 in a row (crash_limit 2): RuntimeError: cannot load the model"
                      in m.output(), 20), m.output()[-2000:]
