"""Reading and checking ``service.ini``.

    [defaults]              ; every service section inherits these keys
    log_dir=/tmp/test_server_logs/

    [EchoServer]            ; one section per service, named after its class
    import_from=echoserver  ; module imported from the ini file's folder
    max_proc_num=3
    min_proc_num=3

    [web monitor]
    host=127.0.0.1
    port=5155

Every key, its default and its meaning are in ``SERVICE_KEYS`` and ``WEB_KEYS``
below (and in docs/service-manager.md).  Anything wrong fails at start with a
message naming the file, the section and the key.
"""
from __future__ import annotations

import configparser
import os
import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import StoreConfig


from ..transport import is_loopback
from .autoscale import check_policy_name, policy_class


class ConfigError(Exception):
    def __init__(self, path: str, section: str | None, key: str | None, message: str):
        where = os.path.basename(path)
        if section is not None:
            where += f", section [{section}]"
        if key is not None:
            where += f", key {key}"
        super().__init__(f"{where}: {message}")
        self.path, self.section, self.key = path, section, key


_SIZE_RE = re.compile(r"(\d+)\s*([kmg]i?b?|b)?", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _size(text: str) -> int:
    m = _SIZE_RE.fullmatch(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError("must be a size above 0 such as 1048576, 512K, 64M or 1G")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "")[:1].lower()]


def _int(minimum: int = 0):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be a whole number >= {minimum}") from None
        if value < minimum:
            raise ValueError(f"must be a whole number >= {minimum}")
        return value
    return parse


def _float(minimum: float = 0.0, maximum: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number") from None
        if value < minimum or (maximum is not None and value > maximum) or value != value:
            raise ValueError(f"must be a number from {minimum}" + (f" to {maximum}" if maximum is not None else " up"))
        return value
    return parse


def _text(text: str) -> str:
    return text.strip()


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _names(text: str) -> tuple:
    names = tuple(n for n in re.split(r"[,\s]+", text.strip()) if n)
    for n in names:
        if not n.isidentifier():
            raise ValueError(f"must be service section names separated by commas, and {n!r} is not one")
    if len(set(names)) != len(names):
        raise ValueError("names a section twice")
    return names


def _level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


# key: (parser, default, meaning).  A default of None means "not set".
SERVICE_KEYS = {
    "import_from": (_text, None, "module that defines the class, imported from the ini file's folder (required)"),
    "min_proc_num": (_int(1), 1, "fewest worker processes"),
    "max_proc_num": (_int(1), None, "most worker processes (default: min_proc_num)"),
    "log_dir": (_text, "logs", "folder of the log files, relative to the ini file's folder"),
    "log_level": (_level, "INFO", "least severe logging level a worker records"),
    "log_max_bytes": (_size, 10 << 20, "size at which a log file is rotated"),
    "log_backups": (_int(0), 5, "rotated log files kept"),
    "bind_tcp": (_text, None, "address to accept TCP clients on, at the class's port (also spelled tcp_bind)"),
    "tcp_secret": (_text, None, "shared secret TCP clients must prove (required unless bind_tcp is loopback; "
                                "default: the SPEEDYSVC_TCP_SECRET environment variable)"),
    "tcp_tls_cert": (_text, None, "PEM certificate (chain) file: serve TCP clients over TLS"),
    "tcp_tls_key": (_text, None, "PEM private key of tcp_tls_cert (if not in the same file)"),
    "tcp_in_workers": (_bool, True, "the workers accept TCP clients themselves (each listens on the port with "
                                    "SO_REUSEPORT; a call crosses two processes); no: a gateway in the manager"),
    "tcp_allow_pickle": (_bool, False, "accept calls to pickle methods from authenticated TCP clients"),
    "tcp_max_connections": (_int(1), 10000, "most TCP clients at once past the handshake (authenticated, when "
                                            "a secret is required)"),
    "tcp_max_handshakes": (_int(1), 256, "most TCP connections in the handshake at once (not counted in "
                                         "tcp_max_connections); a new one beyond closes the oldest"),
    "tcp_handshake_timeout": (_float(0.1), 3.0, "seconds a TCP client has to complete the handshake"),
    "tcp_stall_timeout": (_float(0.1), 30.0, "seconds a TCP client may stall in the middle of a frame, "
                                             "or leave its replies unread"),
    "tcp_min_rate": (_int(0), 16384, "bytes per second a TCP frame in progress must keep arriving at, over "
                                     "each tcp_stall_timeout (0: no minimum)"),
    "max_channels": (_int(1), 1024, "most shared-memory channels (connections and concurrent calls) at once"),
    "max_payload": (_size, 1 << 30, "largest request or response"),
    "call_timeout": (_float(0), 0.0, "seconds a call may run before its worker is killed and restarted (0: no limit)"),
    "stop_timeout": (_float(0), 10.0, "seconds running calls get to finish on stop before workers are killed"),
    "start_timeout": (_float(0.1), 60.0, "seconds a worker may take to start serving"),
    "restart_backoff": (_float(0), 0.5, "first delay before restarting a worker that died; doubles per quick death"),
    "restart_backoff_max": (_float(0), 30.0, "longest delay before restarting a worker that died"),
    "crash_window": (_float(0), 10.0, "a worker that dies sooner than this after starting died quickly"),
    "crash_limit": (_int(1), 5, "workers in a row that die while starting (before they serve) after which the "
                                "service is marked failed"),
    "scale_interval": (_float(0.05), 1.0, "seconds between autoscaling decisions"),
    "scale_up_queue": (_float(0), 0.5, "calls waiting for a worker, on average, that add workers"),
    "scale_up_busy": (_float(0, 1), 0.85, "fraction of time the workers are busy that adds a worker"),
    "scale_up_cooldown": (_float(0), 1.0, "seconds between two additions"),
    "scale_down_busy": (_float(0, 1), 0.25, "busy fraction under which a worker may be removed"),
    "scale_down_after": (_float(0), 30.0, "seconds of low load before one worker is removed"),
    "autoscale": (_text, "default", "autoscaling policy: default, fixed (no autoscaling), or module:Class "
                                    "of your own (see speedysvc.manager.autoscale)"),
    "depends_on": (_names, None, "service sections (comma-separated) that must be serving before this one "
                                 "starts; it stops before them"),
}
SERVICE_ALIASES = {"tcp_bind": "bind_tcp"}

WEB_KEYS = {
    "host": (_text, "127.0.0.1", "address of the web management interface"),
    "port": (_int(0), 5155, "port of the web management interface (0: do not start it)"),
    "token": (_text, None, "access token for users other than the manager's, and other hosts (default: one "
                           "made at start; see speedysvc web); required when host is not a loopback address "
                           "(or set SPEEDYSVC_WEB_TOKEN)"),
}

def _duration(text: str) -> float:
    from .store import parse_duration
    return parse_duration(text)


STORE_KEYS = {
    "enabled": (_bool, True, "keep history, events and an index of the logs in an SQLite file across restarts"),
    "state_dir": (_text, None, "folder of the store's file (store.sqlite3), relative to the ini file's folder "
                               "(default: beside log_dir, named after it: <log_dir>.state)"),
    "points_keep": (_duration, 86400.0, "seconds (or 90s, 15m, 12h, 30d) the 2 s history points are kept"),
    "minutes_keep": (_duration, 2592000.0, "seconds the 1-minute history points and the events are kept"),
    "logs_keep": (_duration, 2592000.0, "seconds the log records are kept in the store (the files rotate "
                                        "on their own)"),
    "logs_max_records": (_int(1), 2000000, "most log records kept in the store (the oldest go first)"),
}

DEFAULTS_SECTION = "defaults"
WEB_SECTION = "web monitor"
STORE_SECTION = "store"


def _field_type(parser, default) -> str:
    kind = getattr(parser, "__annotations__", {}).get("return", "str")
    return kind if default is not None else f"{kind} | None"


def _target(self) -> str:
    return f"{self.import_from}:{self.section}"


def _tcp_options(self):
    """How to serve this service over TCP (``bind_tcp`` set): the ``tcp_*`` keys, and the
    service-wide ones that the TCP side shares (``max_payload``, ``stop_timeout``)."""
    from ..tcp.options import ServeOptions, inflight_for
    keys = {f.name: f"tcp_{f.name}" if f"tcp_{f.name}" in SERVICE_KEYS else f.name
            for f in dataclasses.fields(ServeOptions)}
    values = {field: getattr(self, key) for field, key in keys.items() if key in SERVICE_KEYS}
    return ServeOptions(**values, host=self.bind_tcp, port=self.port, max_inflight=inflight_for(self.max_channels))


# One field per key of SERVICE_KEYS (the table is the one place a key is declared), then what
# is learnt by importing the class (in a separate process): its ``name`` (the shared-memory
# service name), ``port`` and methods.
ServiceConfig = dataclasses.make_dataclass(
    "ServiceConfig",
    [("section", "str")] + [(key, _field_type(parser, default)) for key, (parser, default, _) in SERVICE_KEYS.items()]
    + [("name", "str", field(default="")), ("port", "int | None", field(default=None)),
       ("methods", "list[str]", field(default_factory=list))],
    namespace={"__doc__": "One service's section of service.ini, checked (see SERVICE_KEYS).",
               "target": property(_target, doc="``module:Class``, as a worker imports it"),
               "tcp_options": _tcp_options})
ServiceConfig.__module__ = __name__


@dataclass
class WebConfig:
    host: str
    port: int
    token: str | None


@dataclass
class ManagerConfig:
    path: str                 # absolute path of the ini file
    folder: str               # its folder: where modules are imported from
    services: list[ServiceConfig]
    web: WebConfig
    log_dir: str              # the manager's own log goes here ([defaults] log_dir)
    log_max_bytes: int
    log_backups: int
    store: "StoreConfig" = None   # [store] (speedysvc.manager.store)

    def service(self, name: str) -> ServiceConfig:
        for s in self.services:
            if s.section == name or s.name == name:
                return s
        raise KeyError(name)


def _parse(path, section, key, parser, text):
    try:
        return parser(text)
    except ValueError as e:
        raise ConfigError(path, section, key, f"{e}, got {text!r}") from None


def load(path: str) -> ManagerConfig:
    """Read and check an ini file (everything but importing the classes: see ``describe``)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(path, None, None, "no such file")
    folder = os.path.dirname(path)
    # a comment may also end a line (``key=value   ; why``), as the docs' examples write them;
    # it needs whitespace before its ``;`` or ``#``, so ``tcp://h#x`` or ``a;b`` stay values
    ini = configparser.ConfigParser(interpolation=None, default_section="\0none",
                                    inline_comment_prefixes=(";", "#"))
    try:
        with open(path, encoding="utf-8") as f:
            ini.read_file(f)
    except configparser.Error as e:
        raise ConfigError(path, None, None, str(e).replace("\n", " ")) from None

    def items(section, known, aliases=None):
        out = {}
        for key, text in ini.items(section):
            key = (aliases or {}).get(key, key)
            if key not in known:
                raise ConfigError(path, section, key, f"unknown key; known keys: {', '.join(sorted(known))}")
            if key in out:
                raise ConfigError(path, section, key, "given twice (under two spellings)")
            out[key] = text
        return out

    defaults = items(DEFAULTS_SECTION, SERVICE_KEYS, SERVICE_ALIASES) if ini.has_section(DEFAULTS_SECTION) else {}
    for own in ("import_from", "depends_on"):
        if own in defaults:
            raise ConfigError(path, DEFAULTS_SECTION, own, "belongs in a service's own section")

    web_raw = items(WEB_SECTION, WEB_KEYS) if ini.has_section(WEB_SECTION) else {}
    web_values = {k: (_parse(path, WEB_SECTION, k, p, web_raw[k]) if k in web_raw else d)
                  for k, (p, d, _) in WEB_KEYS.items()}
    if web_values["port"] > 65535:
        raise ConfigError(path, WEB_SECTION, "port", f"must be at most 65535, got {web_values['port']}")
    web_values["token"] = web_values["token"] or os.environ.get("SPEEDYSVC_WEB_TOKEN") or None
    if web_values["port"] and not web_values["token"] and not is_loopback(web_values["host"]):
        raise ConfigError(path, WEB_SECTION, "host", f"{web_values['host']} is not a loopback address: set token "
                                                     f"(or the SPEEDYSVC_WEB_TOKEN environment variable)")
    web = WebConfig(**web_values)

    services = []
    for section in ini.sections():
        if section in (DEFAULTS_SECTION, WEB_SECTION, STORE_SECTION):
            continue
        if section == "manager":
            raise ConfigError(path, section, None, "'manager' names the manager's own log: rename the section "
                                                   "(it is named after the class)")
        if not section.isidentifier():
            raise ConfigError(path, section, None, "a service section is named after its class: "
                                                   "a Python identifier (or [defaults], [web monitor])")
        raw = dict(defaults)
        raw.update(items(section, SERVICE_KEYS, SERVICE_ALIASES))
        values = {}
        for key, (parser, default, _) in SERVICE_KEYS.items():
            values[key] = _parse(path, section, key, parser, raw[key]) if key in raw else default
        if not values["import_from"]:
            raise ConfigError(path, section, "import_from", "missing: name the module that defines the class")
        if values["max_proc_num"] is None:
            values["max_proc_num"] = values["min_proc_num"]
        if values["min_proc_num"] > values["max_proc_num"]:
            raise ConfigError(path, section, "min_proc_num",
                              f"{values['min_proc_num']} is more than max_proc_num {values['max_proc_num']}")
        if values["max_proc_num"] > 64:
            raise ConfigError(path, section, "max_proc_num", "at most 64 workers per service")
        if values["scale_down_busy"] >= values["scale_up_busy"]:
            raise ConfigError(path, section, "scale_down_busy",
                              f"{values['scale_down_busy']} is not below scale_up_busy {values['scale_up_busy']}: "
                              f"the service would scale up and down in turn")
        if values["max_channels"] > 4096:
            raise ConfigError(path, section, "max_channels", "at most 4096")
        _check_tcp(path, section, folder, values)
        try:
            check_policy_name(values["autoscale"])   # (a policy of the user's is imported by the manager alone)
        except ValueError as e:
            raise ConfigError(path, section, "autoscale", f"{e}, got {values['autoscale']!r}") from None
        values["log_dir"] = os.path.join(folder, os.path.expanduser(values["log_dir"]))
        values["depends_on"] = values["depends_on"] or ()
        services.append(ServiceConfig(section=section, **values))
    if not services:
        raise ConfigError(path, None, None, "no service section: add one named after a service class")
    _check_dependencies(path, services)

    manager_log = dict(defaults)
    log_dir = os.path.join(folder, os.path.expanduser(manager_log.get("log_dir", "logs")))
    return ManagerConfig(
        path=path, folder=folder, services=services, web=web,
        store=_store_config(path, folder, log_dir,
                            items(STORE_SECTION, STORE_KEYS) if ini.has_section(STORE_SECTION) else {}),
        log_dir=log_dir,
        log_max_bytes=_parse(path, DEFAULTS_SECTION, "log_max_bytes", _size, manager_log.get("log_max_bytes", "10M")),
        log_backups=_parse(path, DEFAULTS_SECTION, "log_backups", _int(0), manager_log.get("log_backups", "5")),
    )


def _store_config(path: str, folder: str, log_dir: str, raw: dict):
    """[store], checked (speedysvc.manager.store)."""
    from .store import StoreConfig
    values = {k: (_parse(path, STORE_SECTION, k, p, raw[k]) if k in raw else d) for k, (p, d, _) in STORE_KEYS.items()}
    if values["state_dir"]:
        values["state_dir"] = os.path.join(folder, os.path.expanduser(values["state_dir"]))
    else:   # beside the log folder, named after it (two managers with one log_dir would share it anyway)
        values["state_dir"] = os.path.normpath(log_dir) + ".state"
    if values["points_keep"] > values["minutes_keep"]:
        raise ConfigError(path, STORE_SECTION, "points_keep", "is longer than minutes_keep")
    return StoreConfig(**values)


def _check_tcp(path: str, section: str, folder: str, values: dict) -> None:
    from ..tcp.options import SECRET_ENV
    host = values["bind_tcp"]
    values["tcp_secret"] = values["tcp_secret"] or os.environ.get(SECRET_ENV) or None
    for key in ("tcp_tls_cert", "tcp_tls_key"):
        if values[key]:
            values[key] = os.path.join(folder, os.path.expanduser(values[key]))
            if not os.path.isfile(values[key]):
                raise ConfigError(path, section, key, f"no such file: {values[key]}")
    if not host:
        return
    if host.startswith("[") and host.endswith("]"):
        host = values["bind_tcp"] = host[1:-1]
    if not values["tcp_secret"] and not is_loopback(host):
        raise ConfigError(path, section, "bind_tcp", f"{host} is not a loopback address: set tcp_secret (or the "
                                                     f"{SECRET_ENV} environment variable) so clients must prove it")
    if values["tcp_allow_pickle"] and not values["tcp_secret"]:
        raise ConfigError(path, section, "tcp_allow_pickle", "pickle is only allowed to authenticated clients: "
                                                             "set tcp_secret too")
    if values["tcp_tls_key"] and not values["tcp_tls_cert"]:
        raise ConfigError(path, section, "tcp_tls_key", "needs tcp_tls_cert")


def _check_dependencies(path: str, services: list) -> None:
    """``depends_on`` names service sections of this file, and no service depends on itself,
    directly or through others."""
    by_section = {s.section: s for s in services}
    for s in services:
        for dep in s.depends_on:
            if dep == s.section:
                raise ConfigError(path, s.section, "depends_on", f"{dep} depends on itself")
            if dep not in by_section:
                raise ConfigError(path, s.section, "depends_on",
                                  f"no service section [{dep}] (depends_on names sections: "
                                  f"{', '.join(sorted(by_section))})")
    done: set[str] = set()

    def visit(section: str, trail: list[str]) -> None:
        if section in trail:
            cycle = trail[trail.index(section):] + [section]
            raise ConfigError(path, cycle[0], "depends_on", f"dependency cycle: {' -> '.join(cycle)}")
        if section in done:
            return
        for dep in by_section[section].depends_on:
            visit(dep, trail + [section])
        done.add(section)

    for s in services:
        visit(s.section, [])


# How a running service takes a change of its settings on reload (docs/service-manager.md,
# "Reloading the configuration").  What shapes the shared-memory segment, or names it, cannot
# change under running workers: the service is stopped and started again.  The TCP side is a
# gateway in the manager: a new one replaces the old, the workers keep running.  depends_on is
# the order of starts and stops only.  Every other key: a rolling restart of the workers.
SEGMENT_KEYS = ("name", "max_channels", "max_payload")
TCP_KEYS = ("port", "bind_tcp") + tuple(k for k in SERVICE_KEYS if k.startswith("tcp_"))
ORDER_KEYS = ("depends_on",)


def setting_keys(s) -> dict:
    """A service's settings as its section gives them (after [defaults]): what a reload compares."""
    return {key: getattr(s, key) for key in SERVICE_KEYS}


def changed_keys(old, new) -> list[str]:
    """The settings, and what describing the class learnt (``name``, ``port``), that differ."""
    return [key for key in list(SERVICE_KEYS) + ["name", "port"] if getattr(old, key) != getattr(new, key)]


def check_policies(config: ManagerConfig) -> None:
    """Import the autoscaling policies of the user's own that the services name (the manager does
    this at start; a command that only reads the file does not)."""
    for s in config.services:
        try:
            policy_class(s.autoscale, config.folder)
        except ValueError as e:
            raise ConfigError(config.path, s.section, "autoscale", f"{e}, got {s.autoscale!r}") from None


def check_unique(config: ManagerConfig) -> None:
    """After ``describe``: two services may not share a name or a port."""
    seen_names, seen_ports = {}, {}
    for s in config.services:
        if s.name in seen_names:
            raise ConfigError(config.path, s.section, None,
                              f"{s.section}.name is {s.name!r}, as for [{seen_names[s.name]}]")
        seen_names[s.name] = s.section
        if s.bind_tcp and not (isinstance(s.port, int) and 0 < s.port < 65536):
            raise ConfigError(config.path, s.section, "bind_tcp",
                              f"{s.section}.port is {s.port!r}: TCP clients need a port from 1 to 65535")
        if s.port is not None:
            if s.port in seen_ports:
                raise ConfigError(config.path, s.section, None,
                                  f"{s.section}.port is {s.port}, as for [{seen_ports[s.port]}]")
            seen_ports[s.port] = s.section


def describe_keys() -> str:
    """The keys as a Markdown table (kept in docs/service-manager.md)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, (_, default, meaning) in SERVICE_KEYS.items():
        rows.append(f"| `{key}` | {'' if default is None else default} | {meaning} |")
    return "\n".join(rows)
