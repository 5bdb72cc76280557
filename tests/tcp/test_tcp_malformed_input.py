"""Peers that send what is not the protocol, over real sockets to a real gateway: garbage instead
of a handshake, malformed hellos, garbage and truncated frames after it, unknown methods, codec
mismatches and bad arguments.  Only that peer's connection suffers: every other client (connected
before or after) keeps getting correct answers, and the gateway logs no error."""
import os

import pytest

from speedysvc import (BadArguments, DecodeError, MethodNotFound, NotAllowed, ProtocolError, ServiceUnavailable,
                       codecs)
from speedysvc.errors import decode_exception
from speedysvc.tcp import framing as fr
from conftest import wait_until
import tcp_helpers
from tcp_helpers import (JSON, MSGPACK, RAW, RawClient, check, connect_to, guarded, handshake_messages, logs_clean,
                         msgpack_args, open_sockets, server_alive, server_pids)
from tcp_services import TcpOther

tcp_mode = tcp_helpers.tcp_mode

# every test here runs with TCP served by the workers and by a gateway process
pytestmark = pytest.mark.usefixtures("tcp_mode")

server_logs_clean = tcp_helpers.server_logs_clean
pytestmark = logs_clean


def test_garbage_instead_of_a_handshake_closes_only_that_connection():
    with guarded() as svc, connect_to(svc) as before:
        check(before)
        pid = server_pids(svc)
        base = open_sockets(pid)
        tls_client_hello = bytes.fromhex("16030100a5010000a10303") + os.urandom(32) + b"\x00" * 40
        garbage = {
            "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "tls": tls_client_hello,
            "random": b"\x00" + os.urandom(500),
            "magic then a huge length": fr.HELLO.pack(fr.MAGIC, 1, fr.CLIENT_HELLO, 0xFFFF) + b"x" * 100,
            "magic then a body that is not msgpack": fr.HELLO.pack(fr.MAGIC, 1, fr.CLIENT_HELLO, 4) + b"\xc1\xc1\xc1\xc1",
            "magic then a body that is not a map": fr.pack_hello(fr.CLIENT_HELLO, {}).replace(b"\x80", b"\x90"),
            "a call frame instead of a hello": fr.call_header(1, b"echo", MSGPACK.flags, 0, 2) + b"\x91\x01",
        }
        for what, data in garbage.items():
            with RawClient(svc) as raw:
                raw.read_server_hello()
                raw.send(data)
                exc = raw.expect_refused(timeout=3)
                assert isinstance(exc, ProtocolError), (what, exc)
            check(before, what)
        # garbage sent before even reading the server's hello
        with RawClient(svc) as raw:
            raw.send(b"\xff" * 64)
            assert isinstance(raw.expect_refused(timeout=3), ProtocolError)
        assert server_alive(svc)
        assert wait_until(lambda: open_sockets(pid) == base, timeout=5)
        with connect_to(svc) as after:
            check(after)
        check(before)


def test_malformed_client_hellos_are_refused():
    nonce = fr.new_nonce()
    cases = [
        ("wrong service", dict(service=TcpOther.name), ServiceUnavailable),
        ("no service", dict(service=None), ServiceUnavailable),
        ("short nonce", dict(nonce=b"123"), ProtocolError),
        ("nonce not bytes", dict(nonce="x" * 32), ProtocolError),
        ("negative compress_min", dict(compress_min=-1), ProtocolError),
        ("compress_min not a number", dict(compress_min="4096"), ProtocolError),
        ("unknown compression", dict(compression="brotli"), ValueError),
        ("compression not a string", dict(compression=7), ValueError),
    ]
    with guarded() as svc, connect_to(svc) as before:
        check(before)
        for what, fields, expected in cases:
            with RawClient(svc) as raw:
                msg_type, body = raw.handshake(**fields)
                assert msg_type == fr.REFUSED, what
                exc = decode_exception(body["error"])
                assert isinstance(exc, expected), (what, exc)
        for what, message in [("version 2", fr.HELLO.pack(fr.MAGIC, 2, fr.CLIENT_HELLO, 1) + b"\x80"),
                              ("a welcome from the client", fr.pack_hello(fr.WELCOME, {"proof": None})),
                              ("a server hello from the client", fr.pack_hello(fr.SERVER_HELLO, {"nonce": nonce}))]:
            with RawClient(svc) as raw:
                raw.read_server_hello()
                raw.send(message)
                assert isinstance(raw.expect_refused(), ProtocolError), what
        check(before)
        assert server_alive(svc)


def test_hello_with_an_unhashable_compression_is_refused_cleanly(capfd):
    """A msgpack list where the compression name goes must be refused like any bad
    hello, not crash the connection's callback (``algo not in ALGORITHMS`` raises TypeError)."""
    with guarded() as svc, connect_to(svc) as before:
        check(before)
        with RawClient(svc) as raw:
            raw.read_server_hello()
            raw.send(raw.client_hello(compression=["zlib"]))
            data = raw.read_to_eof(timeout=3)
        check(before)
        assert server_alive(svc)
    _, err = capfd.readouterr()
    msgs = handshake_messages(data)
    assert "Fatal error" not in err, f"a callback of the gateway crashed:\n{err[-2000:]}"
    assert msgs and msgs[-1][0] == fr.REFUSED, "the connection was dropped without a refusal"


def test_garbage_frames_after_the_handshake_get_a_goaway():
    bad = {
        "random bytes": b"\x00" + os.urandom(200),
        "unknown frame kind": fr.FRAME.pack(9, 0, 4, 1, MSGPACK.flags, 0, 0) + b"echo",
        "a reply frame from the client": fr.reply_header(1, 0, 3) + b"abc",
        "a go-away frame from the client": fr.goaway(b"bye"),
        "unknown frame flag": fr.call_header(1, b"echo", MSGPACK.flags, 0, 2, flags=0x4) + b"\x91\x01",
        "empty method name": fr.FRAME.pack(fr.CALL, 0, 0, 1, MSGPACK.flags, 0, 2) + b"\x91\x01",
        "method name too long": fr.call_header(1, b"e" * (fr.MAX_NAME + 1), MSGPACK.flags, 0, 2) + b"\x91\x01",
        "method name of 65535 bytes": fr.FRAME.pack(fr.CALL, 0, 0xFFFF, 1, MSGPACK.flags, 0, 2) + b"e" * 100,
        "a good call then garbage": fr.call_header(1, b"echo", MSGPACK.flags, 0, 2) + b"\x91\x01" + b"\xee" * 40,
    }
    with guarded() as svc, connect_to(svc) as before:
        check(before)
        pid = server_pids(svc)
        base = open_sockets(pid)
        for what, data in bad.items():
            with RawClient(svc) as raw:
                raw.welcome()
                raw.call(100, "echo", msgpack_args("first"))
                assert raw.reply()[:2] == (0, MSGPACK.dumps("first")), what
                raw.send(data)
                exc = raw.expect_goaway(timeout=3)
                assert isinstance(exc, ProtocolError), (what, exc)
            check(before, what)
        assert wait_until(lambda: open_sockets(pid) == base, timeout=5)
        with connect_to(svc) as after:
            check(after)


def test_truncated_frames_then_close():
    with guarded() as svc, connect_to(svc) as before:
        check(before)
        pid = server_pids(svc)
        base = open_sockets(pid)
        payload = b"p" * 2000
        full = fr.call_header(1, b"echo_raw", RAW.flags, 0, len(payload)) + payload
        big = fr.call_header(2, b"echo_raw", RAW.flags, 0, 700_000) + b"q" * 300_000   # big-frame path
        for cut in (1, fr.HEADER_SIZE - 1, fr.HEADER_SIZE + 3, len(full) - 1):
            for reset in (False, True):
                raw = RawClient(svc).welcome()
                raw.send(full[:cut])
                raw.close(reset=reset)
        for reset in (False, True):
            raw = RawClient(svc).welcome()
            raw.send(big)
            raw.close(reset=reset)
        check(before)
        assert wait_until(lambda: open_sockets(pid) == base, timeout=5), "a truncated connection was kept open"
        with connect_to(svc) as after:
            check(after)
        assert server_alive(svc)


def test_unknown_methods_get_an_error_reply_and_the_connection_goes_on():
    with guarded() as svc, connect_to(svc) as before, RawClient(svc) as raw:
        raw.welcome()
        for i, name in enumerate([b"nope", b"\xff\xfe\x00bad utf-8", b"m" * fr.MAX_NAME, b"__init__", b"echo "]):
            raw.call(i + 1, name, msgpack_args(1))
            exc = raw.error_reply()
            assert isinstance(exc, MethodNotFound), (name, exc)
            raw.call(1000 + i, "echo", msgpack_args(i))
            assert raw.reply()[:2] == (0, MSGPACK.dumps(i))
        check(before)


def test_codec_mismatches_and_bad_arguments_get_error_replies():
    cases = [
        ("json flags to a msgpack method", "echo", JSON.flags, b"[1]", DecodeError),
        # a codec the gateway does not know may be one that is not network-safe: refused as pickle is
        ("unknown codec id", "echo", 99 << codecs.CODEC_SHIFT, msgpack_args(1), NotAllowed),
        ("codec id 0", "echo", 0, msgpack_args(1), NotAllowed),
        ("all flag bits set", "echo", 0xFFFFFFFF, msgpack_args(1), Exception),
        ("undecodable msgpack", "echo", MSGPACK.flags, b"\xc1\xc1", DecodeError),
        ("truncated msgpack", "echo", MSGPACK.flags, b"\x92\x01", DecodeError),
        ("arguments not an array", "echo", MSGPACK.flags, MSGPACK.dumps(5), DecodeError),
        ("malformed keyword arguments", "echo", MSGPACK.flags | codecs.FLAG_KWARGS, msgpack_args(1), DecodeError),
        ("keyword arguments to a raw method", "echo_raw", RAW.flags | codecs.FLAG_KWARGS, b"x", DecodeError),
        ("msgpack flags to a json method", "echo_json", MSGPACK.flags, msgpack_args(1), DecodeError),
        ("bad json", "echo_json", JSON.flags, b"[1,", DecodeError),
        ("wrong number of arguments", "size_of", MSGPACK.flags, msgpack_args(1, 2, 3), BadArguments),
        ("pickle over TCP", "echo", codecs.PICKLE.flags, b"\x80\x05N.", NotAllowed),
    ]
    with guarded() as svc, connect_to(svc) as before, RawClient(svc) as raw:
        raw.welcome()
        for i, (what, name, codec_flags, payload, expected) in enumerate(cases):
            raw.call(i + 1, name, payload, codec_flags)
            status, data, frame = raw.reply()
            assert frame.call_id == i + 1
            assert status == 1, (what, data)
            exc = decode_exception(data)
            assert isinstance(exc, expected), (what, exc)
            raw.call(500 + i, "echo", msgpack_args(what))
            assert raw.reply()[:2] == (0, MSGPACK.dumps(what)), what
        check(before)
        assert server_alive(svc)
