"""service.ini: defaults, inheritance, and every class of bad configuration fails at start, clearly."""
import textwrap

import pytest

from speedysvc.manager import config
from speedysvc.manager.config import ConfigError
from manager_fixture import run_manager
from services import Kitchen


def write(tmp_path, text):
    p = tmp_path / "service.ini"
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_seed_ini_and_inheritance(tmp_path):
    cfg = config.load(write(tmp_path, """
        [defaults]
        # Uncomment this line to listen on the network
        #bind_tcp=(host adaptor)
        log_dir=/tmp/test_server_logs/
        max_proc_num=4

        [EchoServer]
        import_from=echoserver
        max_proc_num=3
        min_proc_num=3

        [Other]
        import_from=other
    """))
    echo, other = cfg.services
    assert (echo.section, echo.import_from, echo.min_proc_num, echo.max_proc_num) == ("EchoServer", "echoserver", 3, 3)
    assert echo.log_dir == "/tmp/test_server_logs/" and other.log_dir == "/tmp/test_server_logs/"
    assert (other.min_proc_num, other.max_proc_num) == (1, 4)     # inherited from [defaults]
    assert cfg.web.host == "127.0.0.1" and cfg.web.port == 5155
    assert echo.stop_timeout == 10.0 and echo.max_payload == 1 << 30 and echo.call_timeout == 0


def test_comments_at_the_end_of_lines_as_the_docs_write_them(tmp_path):
    """docs/service-manager.md's and the README's examples end lines with comments."""
    cfg = config.load(write(tmp_path, """
        [defaults]                 ; keys every service section inherits
        log_dir=/tmp/test_server_logs/

        [EchoServer]               ; one section per service, named after its class
        import_from=echoserver     ; the module, imported from the ini file's folder
        max_proc_num=3             # the other kind of comment
        min_proc_num=3
        bind_tcp=0.0.0.0           ; anything but loopback needs a secret
        tcp_secret=a;b#c           ; no whitespace before them: part of the value
    """))
    (svc,) = cfg.services
    assert (svc.import_from, svc.max_proc_num, svc.min_proc_num) == ("echoserver", 3, 3)
    assert svc.bind_tcp == "0.0.0.0" and svc.tcp_secret == "a;b#c"


def test_sizes_aliases_and_relative_log_dir(tmp_path):
    cfg = config.load(write(tmp_path, """
        [S]
        import_from=s
        max_payload=64M
        log_max_bytes=512K
    """))
    s = cfg.services[0]
    assert s.max_payload == 64 << 20 and s.log_max_bytes == 512 << 10
    assert s.log_dir == str(tmp_path / "logs")


@pytest.mark.parametrize("text, section, key, words", [
    ("[S]\nimport_from=s\nmin_proc_nums=2\n", "S", "min_proc_nums", "unknown key"),
    ("[S]\nimport_from=s\nmin_proc_num=two\n", "S", "min_proc_num", "whole number"),
    ("[S]\nimport_from=s\nmin_proc_num=0\n", "S", "min_proc_num", ">= 1"),
    ("[S]\nimport_from=s\nmin_proc_num=3\nmax_proc_num=2\n", "S", "min_proc_num", "more than max_proc_num"),
    ("[S]\nimport_from=s\nmax_proc_num=100\n", "S", "max_proc_num", "at most 64"),
    ("[S]\nimport_from=s\nmax_payload=lots\n", "S", "max_payload", "size"),
    ("[S]\nimport_from=s\nmax_payload=0\n", "S", "max_payload", "above 0"),
    ("[S]\nimport_from=s\nscale_up_busy=1.5\n", "S", "scale_up_busy", "from 0 to 1"),
    ("[S]\nimport_from=s\nlog_level=LOUD\n", "S", "log_level", "DEBUG"),
    ("[S]\nmin_proc_num=1\n", "S", "import_from", "missing"),
    ("[defaults]\nimport_from=x\n[S]\nimport_from=s\n", "defaults", "import_from", "own section"),
    ("[S]\nimport_from=s\nbind_tcp=a\ntcp_bind=b\n", "S", "bind_tcp", "twice"),
    ("[S]\nimport_from=s\ntcp_bind=0.0.0.0\n", "S", "bind_tcp", "not a loopback address: set tcp_secret"),
    ("[S]\nimport_from=s\nbind_tcp=127.0.0.1\ntcp_allow_pickle=yes\n", "S", "tcp_allow_pickle", "set tcp_secret"),
    ("[S]\nimport_from=s\ntcp_allow_pickle=maybe\n", "S", "tcp_allow_pickle", "true or false"),
    ("[S]\nimport_from=s\ntcp_tls_cert=nope.pem\n", "S", "tcp_tls_cert", "no such file"),
    ("[S]\nimport_from=s\ntcp_stall_timeout=0\n", "S", "tcp_stall_timeout", "number from 0.1"),
    ("[S]\nimport_from=s\nscale_down_busy=0.9\n", "S", "scale_down_busy", "not below scale_up_busy"),
    ("[manager]\nimport_from=s\n", "manager", None, "manager's own log"),
    ("[web monitor]\nport=99999\n[S]\nimport_from=s\n", "web monitor", "port", "65535"),
    ("[web monitor]\nhots=1\n[S]\nimport_from=s\n", "web monitor", "hots", "unknown key"),
    ("[not a class]\nimport_from=s\n", "not a class", None, "identifier"),
    ("[defaults]\nlog_dir=x\n", None, None, "no service section"),
    ("[S]\nimport_from=s\n[S]\nimport_from=t\n", None, None, "already exists"),
])
def test_bad_configuration_names_file_section_and_key(tmp_path, text, section, key, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith("service.ini")
    if section:
        assert f"[{section}]" in message
    if key:
        assert f"key {key}" in message
    assert words in message


def test_tcp_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDYSVC_TCP_SECRET", "from-env")
    path = write(tmp_path, "[S]\nimport_from=s\nbind_tcp=[::]\ntcp_allow_pickle=on\n"
                           "[T]\nimport_from=t\nbind_tcp=127.0.0.1\ntcp_secret=own\n")
    s, t = config.load(path).services
    assert (s.bind_tcp, s.tcp_secret, s.tcp_allow_pickle) == ("::", "from-env", True)
    assert (t.tcp_secret, t.tcp_allow_pickle, t.tcp_max_connections) == ("own", False, 10000)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(tmp_path / "nope.ini"))


@pytest.mark.parametrize("ini, words", [
    ("[Kitchen]\nimport_from=no_such_module\n", ["[Kitchen]", "key import_from", "cannot import module 'no_such_module'"]),
    ("[NoSuchClass]\nimport_from=services\n", ["[NoSuchClass]", "key import_from", "has no class 'NoSuchClass'"]),
    ("[Custom]\nimport_from=services\n", ["[Custom]", "not a ServerMethodsBase subclass"]),
    ("[Kitchen]\nimport_from=services\n[KitchenNewer]\nimport_from=services\n",
     ["[KitchenNewer]", "name is 'kitchen', as for [Kitchen]"]),
    ("[Kitchen]\nimport_from=services\n[Limited]\nimport_from=services\n", ["[Limited]", f"port is {Kitchen.port}"]),
    ("[NoPort]\nimport_from=services\nbind_tcp=127.0.0.1\n", ["[NoPort]", "key bind_tcp", "NoPort.port is None"]),
    ("[web monitor]\nhost=0.0.0.0\nport=0\n[EchoServer]\nimport_from=services\nmin_proc_num=5\nmax_proc_num=4\n",
     ["min_proc_num"]),
])
def test_manager_refuses_to_start_on_bad_configuration(tmp_path, ini, words):
    out = run_manager(tmp_path, ini)
    assert out.returncode == 2, out.stderr
    assert "configuration error: service.ini" in out.stderr
    for w in words:
        assert w in out.stderr


def test_manager_refuses_a_web_interface_beyond_loopback_without_token(tmp_path):
    out = run_manager(tmp_path, "[web monitor]\nhost=0.0.0.0\nport=5191\n[EchoServer]\nimport_from=services\n")
    assert out.returncode == 2, out.stderr
    assert "service.ini, section [web monitor], key host: 0.0.0.0 is not a loopback address: set token" in out.stderr
