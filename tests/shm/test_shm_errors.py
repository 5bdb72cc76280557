"""Errors over shared memory travel back to the caller with a clear type; the worker keeps serving."""
import pytest

from speedysvc import BadArguments, CallTimeout, MethodNotFound, RemoteError, ServiceUnavailable, connect
from services import Custom, Kitchen, KitchenNewer, NeedsTwoArgs


def test_builtin_exception_keeps_its_type_and_traceback(client):
    with pytest.raises(ValueError, match="bad input") as info:
        client.fail_value("bad input")
    tb = info.value.remote_traceback
    assert "fail_value" in tb and "raise ValueError(message)" in tb
    assert "bad input" in str(info.value.__cause__)
    assert client.echo_msgpack(1) == 1  # the worker carries on


def test_importable_custom_exception_is_rebuilt(client):
    with pytest.raises(Custom) as info:
        client.fail_custom(42)
    assert info.value.code == 42 and info.value.detail == "custom detail"


def test_exception_whose_constructor_differs_is_still_rebuilt(client):
    with pytest.raises(NeedsTwoArgs):
        client.fail_two_args()


def test_exception_the_caller_cannot_name_becomes_remote_error(client):
    with pytest.raises(RemoteError) as info:
        client.fail_local()
    assert "LocalOnly" in info.value.type_name
    assert "defined inside the method" in str(info.value)
    assert "fail_local" in info.value.remote_traceback


def test_typeerror_inside_the_method_is_not_bad_arguments(client):
    with pytest.raises(TypeError) as info:
        client.fail_typeerror_inside()
    assert not isinstance(info.value, BadArguments)


def test_wrong_arguments(client):
    with pytest.raises(BadArguments, match="add"):
        client.add()
    with pytest.raises(BadArguments):
        client.add(1, 2, 3)
    with pytest.raises(BadArguments):
        client.add(1, nope=2)
    with pytest.raises(TypeError):  # BadArguments is a TypeError
        client.whoami(1)
    assert client.add(1, 1) == 2


def test_wrong_argument_types_raise_the_methods_own_error(client):
    with pytest.raises(TypeError, match="unsupported operand"):
        client.add(1, "a")


def test_unknown_method_on_the_server(kitchen):
    with connect(KitchenNewer) as newer:
        with pytest.raises(MethodNotFound, match="added_later") as info:
            newer.added_later()
        assert "echo_msgpack" in str(info.value)  # lists what the service has


def test_unknown_method_name_on_the_client(client):
    with pytest.raises(MethodNotFound):
        client.send("no_such_method", [])
    with pytest.raises(TypeError, match="not a service method"):
        client.send(len, [])


def test_system_exit_in_a_method_is_answered_and_both_workers_keep_serving(kitchen):
    """(tests/shm/test_method_exits.py has every kind of method and KeyboardInterrupt.)"""
    with connect(Kitchen) as c:
        before = set(kitchen.pids)
        for _ in range(2):  # the first call maps the channel in Python, later ones run in C
            with pytest.raises(RemoteError, match="SystemExit") as info:
                c.exit()
            assert info.value.type_name == "builtins.SystemExit"
        assert c.echo_msgpack(1) == 1
        assert set(kitchen.pids) == before


def test_service_not_running():
    from services import Other
    c = connect(Other, wait=0)  # connecting is lazy: no error yet (and wait=0: the call does not wait)
    with pytest.raises(ServiceUnavailable, match="not running"):
        c.whoami()
    c.close()


def test_closed_client_refuses_calls(kitchen):
    c = connect(Kitchen)
    assert c.echo_msgpack(1) == 1
    c.close()
    with pytest.raises(Exception, match="closed"):
        c.echo_msgpack(1)


def test_bad_connect_arguments():
    with pytest.raises(TypeError):
        connect(object)
    with pytest.raises(ValueError, match="unsupported address"):
        connect(Kitchen, "http://x")
    with pytest.raises(ValueError, match="needs a host"):
        connect(Kitchen, "tcp://:5000")
    with pytest.raises(ValueError, match="bad port"):
        connect(Kitchen, "tcp://localhost:99999")
    with pytest.raises(ValueError, match="do not apply to shm"):
        connect(Kitchen, "shm://", secret="x")
    with pytest.raises(ValueError, match="unknown compression"):
        connect(Kitchen, "tcp://localhost", compression="bogus")
    with pytest.raises(ValueError, match="timeout"):
        connect(Kitchen, timeout=-1)


def test_timeout_is_a_timeout_error():
    assert issubclass(CallTimeout, TimeoutError)
