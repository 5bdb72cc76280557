"""What a codec cannot encode or decode: the caller gets an EncodeError or a DecodeError that
says which method and why, before sending when it can, and the worker carries on."""
import pytest

from speedysvc import DecodeError, EncodeError, LocalService, connect
from speedysvc import codecs
from services import KitchenNewer


def test_codec_mismatch_is_reported(kitchen):
    with connect(KitchenNewer) as newer:
        with pytest.raises(DecodeError, match="expects msgpack"):
            newer.echo_msgpack("x")


def test_undecodable_payload(client):
    flags = codecs.MSGPACK.flags
    with pytest.raises(DecodeError, match="cannot decode the arguments"):
        client._transport.call(b"echo_msgpack", b"\xc1garbage", flags, codecs.MSGPACK, 5)
    with pytest.raises(DecodeError, match="must be an array"):
        client._transport.call(b"echo_msgpack", codecs.MSGPACK.dumps(5), flags, codecs.MSGPACK, 5)
    with pytest.raises(DecodeError, match="keyword"):
        client._transport.call(b"echo_msgpack", codecs.MSGPACK.dumps([1]), flags | codecs.FLAG_KWARGS,
                               codecs.MSGPACK, 5)
    with pytest.raises(DecodeError):
        client._transport.call(b"echo_json", b"{not json", codecs.JSON.flags, codecs.JSON, 5)
    # nested deeper than msgpack decodes: its error says nothing of itself, ours says what it is
    with pytest.raises(DecodeError, match=r"with msgpack: StackError: Too nested$"):
        client._transport.call(b"echo_msgpack", b"\x91" * 3000 + b"\xc0", flags, codecs.MSGPACK, 5)
    assert client.echo_msgpack("still fine") == "still fine"


def test_undecodable_response(client):
    with pytest.raises(DecodeError, match="cannot decode the response"):
        client._transport.call(b"echo_raw", b"\xc1", codecs.RAW.flags, codecs.MSGPACK, 5)


def test_unencodable_argument_fails_before_sending(client):
    with pytest.raises(EncodeError, match="echo_msgpack"):
        client.echo_msgpack({1, 2})
    with pytest.raises(EncodeError):
        client.echo_json(object())
    with pytest.raises(EncodeError, match="exactly one"):
        client.echo_raw(b"a", b"b")
    with pytest.raises(EncodeError, match="bytes-like"):
        client.echo_raw("text")
    assert client.echo_msgpack(1) == 1


def test_unencodable_return_value(client):
    with pytest.raises(EncodeError, match="return value of unencodable"):
        client.unencodable()
    with pytest.raises(EncodeError, match="json"):
        client.json_unencodable()


def test_json_codec_edges():
    from speedysvc import codecs
    from speedysvc.errors import EncodeError
    J = codecs.JSON
    assert J.loads(b' [1, 2] ') == [1, 2]            # what another sender might add around it
    assert J.loads(memoryview(b'{"a":1}')) == {"a": 1}
    assert J.dumps(["é", 1.5, None]) == '["é",1.5,null]'.encode()
    for bad in (b"", b"[1,", b"[1] x", b"\xff"):
        with pytest.raises(ValueError):
            J.loads(bad)
    cyclic = []
    cyclic.append(cyclic)
    with pytest.raises(EncodeError):
        J.encode_result("m", cyclic)
    with pytest.raises(EncodeError, match="not JSON serializable"):
        J.encode_result("m", {1, 2})


def test_raw_method_returning_something_else():
    from services import RawOdd
    from speedysvc import EncodeError
    with LocalService(RawOdd, workers=1) as svc, connect(RawOdd, timeout=10) as c:
        pid = svc.pids[0]
        for _ in range(2):   # first through the Python path, then through the C loop
            assert c.to_bytearray(b"abc") == b"abc"
            with pytest.raises(EncodeError, match="bytes-like"):
                c.to_str(b"x")
            with pytest.raises(EncodeError):
                c.to_none(b"x")
        assert c.ok(b"fine") == b"fine" and svc.pids == [pid]
