"""The loop the manager and the TCP gateway run on (speedysvc.tcp.eventloop)."""
import asyncio

import pytest

from speedysvc import LocalService, connect
from speedysvc.tcp import eventloop
from tcp_services import TcpKitchen


async def loop_module():
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default(monkeypatch):
    pytest.importorskip("uvloop")
    monkeypatch.delenv(eventloop.LOOP_ENV, raising=False)
    assert eventloop.run(loop_module()).startswith("uvloop")


def test_asyncio_loop_on_request(monkeypatch):
    monkeypatch.setenv(eventloop.LOOP_ENV, "asyncio")
    assert eventloop.run(loop_module()).startswith("asyncio")


def test_an_unknown_loop_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(eventloop.LOOP_ENV, "tornado")
    coro = loop_module()
    with pytest.raises(ValueError, match="SPEEDYSVC_EVENT_LOOP.*tornado"):
        eventloop.run(coro)
    coro.close()


def loaded_libraries(pid):
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


@pytest.mark.parametrize("in_workers", [True, False], ids=["workers", "gateway"])
@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_the_tcp_server_runs_the_chosen_loop(monkeypatch, choice, in_workers):
    """The gateway process, or each worker's TCP thread, runs the loop SPEEDYSVC_EVENT_LOOP names."""
    pytest.importorskip("uvloop")
    monkeypatch.setenv(eventloop.LOOP_ENV, choice)
    with LocalService(TcpKitchen, workers=1, tcp="127.0.0.1:0", tcp_in_workers=in_workers) as svc:
        with connect(TcpKitchen, svc.tcp_address, timeout=10) as c:
            assert c.echo_msgpack([1, "x"]) == [1, "x"]
        pid = svc.pids[0] if in_workers else svc.tcp_process.pid
        uses_uvloop = "uvloop/loop." in loaded_libraries(pid)
        assert uses_uvloop == (choice == "uvloop")
