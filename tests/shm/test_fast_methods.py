"""The methods of a shared-memory client run their common case in C (ShmMethod);
every other case falls back to Python.  These tests drive each way out of the C path."""
import gc
import os
import signal
import sys
import threading

import pytest

from speedysvc import LocalService, connect
from speedysvc import _shmcore as core
from speedysvc.errors import EncodeError, RemoteError
from conftest import channel_states, wait_until
from services import Kitchen, Signaller


def test_shared_memory_clients_get_methods_in_c(client):
    assert "echo_msgpack" not in client.__dict__   # made on first use: connecting stays cheap
    assert type(client.echo_msgpack) is core.ShmMethod
    assert client.echo_msgpack is client.echo_msgpack
    assert client.echo_msgpack.__name__ == "echo_msgpack"
    assert client.add.__doc__ == "Add two numbers."


def test_keywords_and_defaults_go_through_the_fallback(client):
    assert client.add(1, 2, scale=3) == 9
    assert client.add(a=1) == 11
    assert client.add(1) == 11


def test_arguments_the_codec_cannot_encode_raise_a_clear_error(client):
    with pytest.raises(EncodeError, match="echo_msgpack"):
        client.echo_msgpack(object())
    assert client.echo_msgpack("after") == "after"


def test_raw_methods_take_any_buffer_and_refuse_the_rest(client):
    assert client.echo_raw(b"bytes") == b"bytes"
    assert client.echo_raw(bytearray(b"array")) == b"array"
    assert client.echo_raw(memoryview(b"view")) == b"view"
    with pytest.raises(EncodeError):
        client.echo_raw("text")
    with pytest.raises(EncodeError):
        client.echo_raw(b"a", b"b")


def test_responses_the_fast_decoder_refuses_are_decoded_in_python(client):
    # msgpack's fast decoder refuses integer map keys; the fallback accepts them
    assert client.echo_msgpack({1: "one", 2: [3]}) == {1: "one", 2: [3]}


def test_errors_and_large_responses_leave_the_c_path(client):
    with pytest.raises(ValueError, match="boom"):
        client.fail_value("boom")
    with pytest.raises(RemoteError):
        client.fail_local()
    assert len(client.big(1 << 20)) == 1 << 20   # above the size the C path copies out
    assert client.echo_msgpack("and back") == "and back"


def test_one_client_shared_by_threads(client):
    errors = []

    def run(tag):
        try:
            for i in range(2000):
                assert client.echo_msgpack([tag, i]) == [tag, i]
        except BaseException as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_a_signal_during_the_first_wait_gives_the_channel_back(kitchen):
    with connect(Kitchen) as c:
        assert c.echo_msgpack(1) == 1
        def interrupt(signum, frame):
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGALRM, interrupt)
        try:
            for _ in range(3):   # inside the first wait slice, which runs in C
                signal.setitimer(signal.ITIMER_REAL, 0.02)
                with pytest.raises(KeyboardInterrupt):
                    c.sleep(0.5)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert c.echo_msgpack("next") == "next"
        mine = [s for s, (owner, _) in channel_states(kitchen).items() if owner == os.getpid()]
        # the interrupted calls' channels are either back in use or left to the worker
        # still running them, which frees them when it ends
        assert wait_until(lambda: len([s for s, (o, _) in channel_states(kitchen).items()
                                       if o == os.getpid()]) <= 1, timeout=5), mine


def test_a_signal_while_spinning_neither_loses_the_channel_nor_the_exception():
    # the signal lands while the caller spins (no system call to interrupt): the C path
    # must run its handler before it lets go of the channel
    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    with LocalService(Signaller, workers=1, max_channels=4) as svc, connect(Signaller) as c:
        old = signal.signal(signal.SIGUSR1, interrupt)
        try:
            for i in range(20):   # five times the channels there are
                assert c.echo(i) == i
                with pytest.raises(Interrupted):
                    c.signal_then_fail(os.getpid(), int(signal.SIGUSR1))
                with pytest.raises(Interrupted):   # json: its decoder is Python code
                    c.signal_then_echo(os.getpid(), int(signal.SIGUSR1), "x")
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert c.echo("still") == "still"
        assert len(channel_states(svc)) == 1


def test_a_method_kept_after_close_refuses_to_call(kitchen):
    from speedysvc.errors import SpeedysvcError
    c = connect(Kitchen)
    echo = c.echo_msgpack
    assert echo("open") == "open"
    c.close()
    with pytest.raises(SpeedysvcError, match="closed"):
        echo("closed")
    assert not any(owner == os.getpid() for owner, _ in channel_states(kitchen).values())


def test_with_timeout_applies_to_the_clone_only(client):
    quick = client.with_timeout(0.2)
    assert type(quick.sleep) is core.ShmMethod and quick.sleep is not client.sleep
    with pytest.raises(TimeoutError):
        quick.sleep(1.0)
    assert client.sleep(0.3, "t") == "t"


def test_a_dropped_client_frees_its_channel_without_the_garbage_collector(kitchen):
    gc.disable()
    try:
        c = connect(Kitchen)
        assert c.echo_msgpack(1) == 1
        assert any(owner == os.getpid() for owner, _ in channel_states(kitchen).values())
        del c
        assert not any(owner == os.getpid() for owner, _ in channel_states(kitchen).values())
    finally:
        gc.enable()


def test_a_forked_child_calls_through_its_own_channel(client):
    assert client.echo_msgpack("parent") == "parent"
    pid = os.fork()
    if pid == 0:   # the child: must not touch the parent's channel
        code = 1
        try:
            code = 0 if client.echo_msgpack("child") == "child" else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.echo_msgpack("parent again") == "parent again"


def test_methods_look_like_bound_methods(client):
    import inspect
    import weakref
    m = client.add
    assert list(inspect.signature(m).parameters) == ["a", "b", "scale"]
    assert m.__qualname__ == "add" and "add" in m.__dict__["__name__"]
    assert weakref.ref(m)() is m
    assert inspect.signature(type(client).add).parameters["self"]   # on the class: the function


@pytest.mark.parametrize("args, error", [
    ((), TypeError),
    ((None, "not bytes", None, None, bytes, 0, None, 0.1, print), TypeError),
    ((None, b"m", None, None, bytes, -1, None, 0.1, print), OverflowError),
    ((None, b"m", None, None, bytes, 1 << 40, None, 0.1, print), ValueError),
    ((None, b"m", None, "no", bytes, 0, None, 0.1, print), TypeError),
    ((None, b"m", None, None, bytes, 0, None, -1.0, print), ValueError),
])
def test_shm_method_checks_its_arguments(args, error):
    with pytest.raises(error):
        core.ShmMethod(*args)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
