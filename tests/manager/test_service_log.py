"""A service's log in the manager: lines from the workers' pipes (``LineSplitter``) and records
written and kept (``ServiceLog``)."""
import os

import pytest

from speedysvc.manager.logs import LineSplitter


def feed_all(splitter, chunks):
    """The lines each chunk completes, in order, then what ``rest()`` gives at the end."""
    return [splitter.feed(chunk) for chunk in chunks], splitter.rest()


@pytest.mark.parametrize("chunks, lines, rest", [
    # nothing, or nothing complete
    ([], [], []),
    ([b""], [[]], []),
    ([b"no end"], [[]], ["no end"]),
    # whole lines, several at once, empty ones
    ([b"one\n"], [["one"]], []),
    ([b"one\ntwo\nthr"], [["one", "two"]], ["thr"]),
    ([b"\n\n"], [["", ""]], []),
    # a line across reads
    ([b"ab", b"cd", b"ef\ngh"], [[], [], ["abcdef"]], ["gh"]),
    ([b"ab", b"\n"], [[], ["ab"]], []),
    # \r\n: the \r goes with the \n (and any other \r before it); one inside a line stays
    ([b"a\r\nb\r\n"], [["a", "b"]], []),
    ([b"a\r", b"\nb\n"], [[], ["a", "b"]], []),
    ([b"x\r\r\n"], [["x"]], []),
    ([b"a\rb\n"], [["a\rb"]], []),
    ([b"last\r"], [[]], ["last"]),                     # ...and at the end of what a process wrote
    # invalid UTF-8 is replaced, never raised; a character split across reads is whole
    ([b"\xff\xfeok\n"], [["\ufffd\ufffdok"]], []),
    ([b"caf\xc3", b"\xa9\n"], [[], ["caf\u00e9"]], []),
    ([b"\xc3"], [[]], ["\ufffd"]),
    ([b"\xe2\x82\xac \xe2\x82\n"], [["\u20ac \ufffd"]], []),
])
def test_lines_come_out_whole(chunks, lines, rest):
    assert feed_all(LineSplitter(), chunks) == (lines, rest)


@pytest.mark.parametrize("chunks, lines, rest", [
    # at the limit a line waits for its end; beyond it, what came is cut off as a line
    ([b"x" * 10], [[]], ["x" * 10]),
    ([b"x" * 11], [["x" * 11]], []),
    ([b"x" * 10, b"y"], [[], ["x" * 10 + "y"]], []),
    ([b"x" * 11, b"tail\n"], [["x" * 11], ["tail"]], []),          # the rest of a cut line is a line of its own
    ([b"ok\n" + b"z" * 11], [["ok", "z" * 11]], []),
    ([b"x" * 30 + b"\n"], [["x" * 30]], []),                        # a long line that ends in the same read is whole
    ([b"abcdefghij\xc3", b"\xa9\n"], [["abcdefghij\ufffd"], ["\ufffd"]], []),   # a character cut by the limit
])
def test_a_line_without_an_end_is_cut_at_the_limit(chunks, lines, rest):
    assert feed_all(LineSplitter(limit=10), chunks) == (lines, rest)


def test_the_default_limit_is_a_mebibyte():
    splitter = LineSplitter()
    assert splitter.feed(b"x" * (1 << 20)) == [] and splitter.feed(b"x") == ["x" * ((1 << 20) + 1)]
    assert splitter.rest() == []


def test_rest_empties_the_splitter():
    splitter = LineSplitter()
    assert splitter.feed(b"a\nb") == ["a"]
    assert splitter.rest() == ["b"]
    assert splitter.rest() == []
    assert splitter.feed(b"c\n") == ["c"]


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


def test_long_records_are_whole_in_the_file_and_cut_in_the_managers_memory(running, tmp_path):
    """A service that logs lines of most of a mebibyte: the log file has each whole; the
    manager keeps their first RECORD_MAX characters (its ring of 2,000 records, the store, the
    live views), so its memory does not grow by what it was sent (here ~150 MiB)."""
    import glob
    import psutil
    from speedysvc import connect
    from speedysvc.manager.logs import RECORD_MAX
    from manager_fixture import chatty_ini
    from services import Chatty
    m = running(chatty_ini())
    manager = psutil.Process(m.proc.pid)
    with connect(Chatty, timeout=60) as c:
        c.log("WARNING", "warm")
        before = manager.memory_info().rss
        for i in range(180):
            c.log("WARNING", f"long {i:03d} " + "x" * (800 << 10))
        m.wait(lambda: any(r["message"].startswith("long 179 ") for r in
                           m.get("/api/services/Chatty/logs?lines=3")["records"]), 60, "the last long record")
    grown = manager.memory_info().rss - before
    assert grown < 64 << 20, f"the manager grew by {grown >> 20} MiB for 180 records of 800 KiB"
    rec = [r for r in m.get("/api/services/Chatty/logs?lines=3")["records"] if r["message"].startswith("long 179 ")][0]
    assert rec["message"].startswith("long 179 xxx") and len(rec["message"]) < RECORD_MAX + 100
    cut = len("long 179 ") + (800 << 10) - RECORD_MAX
    assert rec["message"].endswith(f"x … [{cut} more characters in {os.path.basename(m.service('Chatty')['log_file'])}]")
    whole = [line for path in glob.glob(str(tmp_path / "logs" / "*")) if os.path.isfile(path)
             for line in open(path, encoding="utf-8", errors="replace") if " long 179 " in line]
    assert len(whole) == 1 and whole[0].rstrip("\n").endswith("x" * (800 << 10)), [len(w) for w in whole]


def test_the_log_file_rotates_at_its_size_keeping_its_backups(tmp_path):
    from speedysvc.manager.logs import ServiceLog
    path = tmp_path / "s.log"
    path.write_bytes(b"x" * 980 + b"\n")   # (what a previous manager wrote counts)
    log = ServiceLog(str(path), 1000, 2)
    log.write(1, "INFO", "svc", "first")   # 981 bytes and this line reach 1000: rotated before it
    assert (tmp_path / "s.log.1").read_bytes() == b"x" * 980 + b"\n"
    for i in range(40):
        log.write(1, "INFO", "svc", f"line {i:02d} " + "y" * 40)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["s.log", "s.log.1", "s.log.2"]   # log_backups = 2: the oldest went
    for name in files:
        assert 0 < (tmp_path / name).stat().st_size < 1000
    text = "".join((tmp_path / name).read_text() for name in ("s.log.2", "s.log.1", "s.log"))
    numbers = [int(line.split("line ")[1][:2]) for line in text.splitlines() if "line " in line]
    assert numbers == list(range(numbers[0], 40))   # the newest lines, in order, none lost in between
    assert " [pid 1] INFO svc: line 39 " in (tmp_path / "s.log").read_text()


def test_without_backups_the_log_file_is_not_rotated(tmp_path):
    # (as logging's RotatingFileHandler: rotation needs both a size and backups)
    from speedysvc.manager.logs import ServiceLog
    log = ServiceLog(str(tmp_path / "s.log"), 200, 0)
    for i in range(20):
        log.write(1, "INFO", "svc", f"line {i}")
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["s.log"]
    assert len((tmp_path / "s.log").read_text().splitlines()) == 20


def test_a_line_that_is_not_utf8_is_written_escaped(tmp_path):
    from speedysvc.manager.logs import ServiceLog
    log = ServiceLog(str(tmp_path / "s.log"), 1 << 20, 1)
    log.write(1, "WARNING", "stderr", "caf\udce9")   # (a lone surrogate: bytes that were not UTF-8)
    log.write(1, "INFO", "svc", "after")
    log.close()
    text = (tmp_path / "s.log").read_text()
    assert "stderr: caf\\udce9" in text and "svc: after" in text
