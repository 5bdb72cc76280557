"""A service's log in the manager: lines from the workers' pipes (``LineSplitter``) and records
written and kept (``ServiceLog``)."""


def test_log_pipe_lines_that_are_not_records_are_kept_as_text(tmp_path):
    from speedysvc.manager.logs import ServiceLog
    log = ServiceLog(str(tmp_path / "s.log"), 1 << 20, 1)
    for line in ("null", "[1, 2]", '{"t": 1e300, "l": "INFO", "m": "x"}', '{"no": "t"}', "not json"):
        log.write_json_line(123, line)
    log.write_json_line(123, '{"t": 1700000000.5, "l": "ERROR", "n": "svc", "m": "real"}')
    recs = log.tail(0)
    assert [r["message"] for r in recs[:5]] == ["null", "[1, 2]", '{"t": 1e300, "l": "INFO", "m": "x"}',
                                                '{"no": "t"}', "not json"]
    assert (recs[-1]["level"], recs[-1]["logger"], recs[-1]["message"]) == ("ERROR", "svc", "real")
    log.close()
    assert "ERROR svc: real" in (tmp_path / "s.log").read_text()
