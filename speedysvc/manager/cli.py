"""The ``speedysvc`` command.

    speedysvc run service.ini [--reload]  run the manager (same as python3 -m speedysvc.service)
    speedysvc status                      services of a running manager
    speedysvc start|stop SERVICE
    speedysvc restart SERVICE [--hard]    rolling: new workers replace the old while calls go on
    speedysvc scale SERVICE N
    speedysvc reload                      re-read the manager's service.ini and apply what changed
    speedysvc logs SERVICE [-f] [-n 50] [--level WARNING] [--grep TEXT]   (SERVICE may be "manager")
    speedysvc web                         the web interface's address, with the token that logs a browser in

The commands that talk to a running manager use its HTTP API at --url
(default: the [web monitor] of -c/--config, else http://127.0.0.1:5155).
The manager's own user needs no token on this host; the token comes from
--token, SPEEDYSVC_WEB_TOKEN, or the file where a manager of this user keeps it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from ..transport import is_loopback
from .web import access

DEFAULT_URL = "http://127.0.0.1:5155"


class CommandError(Exception):
    pass


def _url_of(args) -> str:
    if args.url:
        return args.url.rstrip("/")
    if args.config:
        from . import config
        web = config.load(args.config).web
        host = "127.0.0.1" if web.host in ("0.0.0.0", "") else ("::1" if web.host == "::" else web.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{web.port}"
    return DEFAULT_URL


def _token(args) -> str | None:
    """--token, SPEEDYSVC_WEB_TOKEN, or the token file of this user's manager at that address."""
    token = args.token or os.environ.get("SPEEDYSVC_WEB_TOKEN")
    if token:
        return token
    parts = urllib.parse.urlsplit(_url_of(args))
    if parts.hostname and is_loopback(parts.hostname) and parts.port:
        return access.read_token(parts.port)
    return None


def _request(args, method: str, path: str, body=None, stream: bool = False):
    headers = {"Accept": "application/json", "X-Speedysvc-Client": "cli"}   # (events say who asked)
    token = _token(args)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if method == "POST":
        headers["X-Speedysvc-Request"] = "1"
        headers["Content-Type"] = "application/json"
        data = json.dumps(body or {}).encode()
    req = urllib.request.Request(_url_of(args) + path, data=data, headers=headers, method=method)
    try:
        resp = urllib.request.urlopen(req, timeout=None if stream else args.timeout)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        raise CommandError(f"{message} (HTTP {e.code})") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise CommandError(f"no manager answers at {_url_of(args)} ({getattr(e, 'reason', e)}); "
                           f"is it running? (speedysvc run service.ini)") from None
    return resp if stream else json.loads(resp.read())


def _fmt_ms(v, bound: bool = False):
    """A latency in ms; "-" for none, "<=" in front of one that is an upper bound (the slowest
    call of the interval, the interpolated quantile being above it)."""
    if v is None:
        return "-"
    return ("<=" if bound else "") + (f"{v:.2f}" if v < 10 else f"{v:.0f}")


def print_status(status: dict, out=sys.stdout) -> None:
    m = status["manager"]
    print(f"manager pid {m['pid']}, up {m['uptime']:.0f} s, {m['config']}", file=out)
    rows = [("SERVICE", "STATE", "WORKERS", "CALLS/S", "P50 MS", "P99 MS", "WAIT P99 MS", "ERRORS", "REFUSED",
             "CPU", "RSS MB")]
    for s in status["services"]:
        state = s["state"] + (f" (for {', '.join(s['waiting_for'])})" if s.get("waiting_for") else "")
        rows.append((s["name"], state + (f" ({s['failure']})" if s["failure"] else ""),
                     f"{s['workers']}/{s['min_workers']}-{s['max_workers']}", f"{s['calls_per_s']:.1f}",
                     _fmt_ms(s["p50_ms"], s.get("p50_bound")), _fmt_ms(s["p99_ms"], s.get("p99_bound")),
                     _fmt_ms(s.get("wait_p99_ms"), s.get("wait_p99_bound")), str(s["errors"]),
                     str(s.get("refused", 0) + s.get("lost", 0)), f"{s['cpu'] * 100:.0f}%",
                     f"{s['rss'] / 2**20:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def print_reload(result: dict, out=sys.stdout) -> None:
    """What a reload changed, one line per kind (docs/service-manager.md)."""
    def line(label, names):
        print(f"{label}: {', '.join(names) if names else 'none'}", file=out)
    line("added", result["added"])
    line("removed", result["removed"])
    line("restarted", [f"{s} ({result['changes'][s]['how']}: {', '.join(result['changes'][s]['keys'])})"
                       if s in result["changes"] else s for s in result["restarted"]])
    line("unchanged", result["unchanged"])
    if result.get("waiting"):
        line("waiting for their dependencies", result["waiting"])
    for section, why in result.get("failed", {}).items():
        print(f"failed: {section} ({why})", file=out)
    if result.get("needs_manager_restart"):
        line("not applied until the manager restarts", result["needs_manager_restart"])


def _print_record(rec: dict) -> None:
    from .logs import LogRecord
    print(LogRecord(rec).format(), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="speedysvc", description="Run and control speedysvc services.")
    parser.add_argument("--url", help=f"address of a running manager (default {DEFAULT_URL})")
    parser.add_argument("-c", "--config", help="read the manager's address from this ini file")
    parser.add_argument("--token", help="access token (default: SPEEDYSVC_WEB_TOKEN)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the manager")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the manager on an ini file")
    p.add_argument("ini")
    p.add_argument("--reload", action="store_true",
                   help="for development: restart a service (rolling) when its .py files change")
    sub.add_parser("status", help="show the services of a running manager")
    for name in ("start", "stop"):
        sub.add_parser(name, help=f"{name} one service").add_argument("service")
    p = sub.add_parser("restart", help="restart one service: new workers replace the old ones while it serves")
    p.add_argument("service")
    p.add_argument("--hard", action="store_true", help="stop the service, then start it (calls wait meanwhile)")
    sub.add_parser("reload", help="re-read the manager's service.ini: start added services, stop removed ones, "
                                  "restart changed ones")
    p = sub.add_parser("scale", help="set the number of workers of a service")
    p.add_argument("service")
    p.add_argument("workers", type=int)
    p = sub.add_parser("logs", help="show a service's log (or the manager's: SERVICE = manager)")
    p.add_argument("service")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    p.add_argument("-n", "--lines", type=int, default=50)
    p.add_argument("--level", help="only records at least this severe")
    p.add_argument("--grep", help="only records containing this text (any case), searched in the whole log the "
                                  "manager keeps")
    sub.add_parser("web", help="print the web interface's address, with the token that logs a browser in")
    args = parser.parse_args(argv)

    if args.command == "run":
        from .manager import main as run_manager
        return run_manager([args.ini] + (["--reload"] if args.reload else []))
    try:
        if args.command == "web":
            token = _token(args)
            if token is None:
                raise CommandError(f"no access token for {_url_of(args)}: is a manager of this user running there? "
                                   f"(or pass --token)")
            print(f"{_url_of(args)}/?token={token}")
        elif args.command == "status":
            print_status(_request(args, "GET", "/api/status"))
        elif args.command in ("start", "stop", "restart"):
            body = {"hard": True} if getattr(args, "hard", False) else None
            s = _request(args, "POST", f"/api/services/{args.service}/{args.command}", body)
            print(f"{s['name']}: {s['state']}, {s['workers']} worker(s)")
        elif args.command == "reload":
            print_reload(_request(args, "POST", "/api/reload"))
        elif args.command == "scale":
            s = _request(args, "POST", f"/api/services/{args.service}/scale", {"workers": args.workers})
            print(f"{s['name']}: scaling to {s['target_workers']} worker(s)")
        elif args.command == "logs":
            from urllib.parse import urlencode
            # --grep searches the whole log the manager's store keeps (not only the records in memory)
            query = urlencode({k: v for k, v in (("lines", args.lines), ("level", args.level),
                                                 ("grep", args.grep)) if v or v == 0})   # -n 0: all kept
            for rec in _request(args, "GET", f"/api/services/{args.service}/logs?{query}")["records"]:
                _print_record(rec)
            if args.follow:
                query = urlencode({k: v for k, v in (("level", args.level), ("q", args.grep)) if v})
                resp = _request(args, "GET", f"/api/services/{args.service}/logs/stream?{query}", stream=True)
                for raw in resp:
                    line = raw.decode("utf-8", errors="replace").rstrip("\n")
                    if line.startswith("data: "):
                        _print_record(json.loads(line[6:]))
    except CommandError as e:
        print(f"speedysvc: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # the reader went away (speedysvc logs X | head -1): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
