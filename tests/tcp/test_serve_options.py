"""How a service is served over TCP (ServeOptions): what it refuses, how it travels to a gateway
process of its own, and LocalService and TcpServer taking it."""
import argparse
import ssl

import pytest

from speedysvc import LocalService, connect
from speedysvc.tcp.options import SECRET_ENV, ServeOptions, inflight_for
from tcp_helpers import InProcessGateway, make_self_signed_cert, tcp_service
from tcp_services import TcpEcho, TcpOther, TcpSecretEcho


def test_a_non_loopback_address_needs_a_secret_and_an_empty_one_is_none():
    for secret in (None, "", b""):
        with pytest.raises(ValueError, match="needs a shared secret"):
            ServeOptions(host="0.0.0.0", secret=secret)
    assert ServeOptions(host="0.0.0.0", secret="s").secret == b"s"
    with pytest.raises(ValueError, match="only allowed to authenticated clients"):
        ServeOptions(allow_pickle=True, secret="")
    with pytest.raises(ValueError, match="tls_key needs tls_cert"):
        ServeOptions(tls_key="key.pem")


def test_the_options_travel_on_a_command_line_but_the_secret_and_a_context_do_not():
    parser = argparse.ArgumentParser()
    ServeOptions.add_arguments(parser)
    for options in (ServeOptions(), ServeOptions(host="::1", port=5, allow_pickle=True, secret="s", max_inflight=7,
                                                 stall_timeout=2.5, tls_cert="c.pem", tls_key="k.pem")):
        argv = options.to_argv()
        assert "s" not in argv and "--secret" not in argv
        back = ServeOptions.from_arguments(parser.parse_args(argv), {SECRET_ENV: "s"} if options.secret else {})
        assert back == options
    with pytest.raises(ValueError, match="cannot be passed to another process"):
        ServeOptions(tls_context=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)).to_argv()
    assert inflight_for(1024) == 512 and inflight_for(1) == 1


def test_a_tcp_server_takes_an_ssl_context_of_the_callers(tmp_path):
    certfile, keyfile = make_self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    with pytest.raises(ValueError, match="not both"):
        ServeOptions(tls_context=context, tls_cert=certfile)
    with LocalService(TcpEcho, workers=1), InProcessGateway(TcpEcho.name, tls_context=context) as gw:
        assert gw.server.ssl_context is context
        with connect(TcpEcho, gw.tcp_address, tls=certfile) as c:
            assert c.echo("over TLS") == "over TLS"


def test_local_service_takes_its_secret_from_the_environment_as_its_gateway_would(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, "from-env")
    with tcp_service(TcpSecretEcho, tcp="0.0.0.0:0") as svc:
        address = svc.tcp_address.replace("0.0.0.0", "127.0.0.1")
        with connect(TcpSecretEcho, address, secret="from-env") as c:
            assert c.echo(1) == 1


def test_local_service_says_what_is_wrong_with_its_tcp_address():
    with pytest.raises(ValueError, match="the port must be a number"):
        LocalService(TcpEcho, tcp="127.0.0.1:abc").start()
    no_port = type("NoPort", (TcpOther,), {"port": None, "__module__": TcpOther.__module__})
    with pytest.raises(ValueError, match="names no port and NoPort.port is None"):
        LocalService(no_port, tcp="127.0.0.1")._start_tcp()
