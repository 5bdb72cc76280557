"""The manager's HTTP API (JSON), used by the ``speedysvc`` command and the web interface.

Reads the manager's state only (never the transports).  Documented in
docs/http-api.md.  Who may use it is ``access``'s business: the manager's own
user over loopback, anyone with the access token (``Authorization: Bearer
<token>``, or a browser that opened ``/?token=...`` once); /healthz and /readyz
are open.  State-changing requests are POSTs that must carry the header
``X-Speedysvc-Request: 1`` (a browser cannot add it to a cross-site request
without a CORS preflight, which is never granted) and, when an Origin header
is present, come from this server's own origin.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import secrets
import time

from aiohttp import web

from ...transport import is_loopback
from ..config import ConfigError
from ..logs import LogRecord, matches
from ..manager import ReloadRefused
from ..store import ACTOR
from . import access

CSRF_HEADER = "X-Speedysvc-Request"
CLIENT_HEADER = "X-Speedysvc-Client"   # "cli" (the speedysvc command) or "web" (the web interface)
HISTORY_RANGE = 3600.0                 # seconds of history a request without ?since= or ?range= gets
OPEN_PATHS = {"/healthz", "/readyz"}
TOKEN_COOKIE = "speedysvc_token"


GREP_LINES = 10_000   # most records a log search answers with (the download has them all)

def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _compressed(data) -> web.Response:
    """JSON, gzip- or deflate-compressed when the client accepts it."""
    response = _json(data)
    response.enable_compression()
    return response


def _actor(request: web.Request) -> str:
    """Who a state-changing request comes from, for the events (docs/http-api.md)."""
    client = request.headers.get(CLIENT_HEADER, "").strip().lower()
    return client if client in ("cli", "web") else "api"


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[1:host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _supplied_token(request: web.Request) -> tuple[str, bool]:
    """(the token a request carries, whether it came in the query string)."""
    supplied = request.headers.get("Authorization", "").removeprefix("Bearer ").strip() \
        or request.cookies.get(TOKEN_COOKIE, "")
    if not supplied and request.query.get("token"):
        return request.query["token"], True
    return supplied, False


@web.middleware
async def _guard(request: web.Request, handler):
    token = request.app["token"]
    from_query = False
    if request.path not in OPEN_PATHS and not request.path.startswith("/static/"):
        supplied, from_query = _supplied_token(request)
        if not (token and secrets.compare_digest(supplied.encode(), token.encode())):
            from_query = False
            transport = request.transport
            uid = access.peer_uid(transport.get_extra_info("peername"), transport.get_extra_info("sockname")) \
                if transport is not None else None
            if not access.trusted_uid(uid):
                who = "another host" if uid is None else f"uid {uid}"
                return _error(401 if uid is None else 403,
                              f"this manager serves its own user (uid {os.getuid()}); a request from {who} needs "
                              f"the access token (Authorization: Bearer <token>, or open the page once as "
                              f"/?token=<token>; `speedysvc web` prints that URL for the manager's user)")
            # Trusted for its uid, without a token: only names of this host are served, so that a
            # page elsewhere whose domain re-resolves to 127.0.0.1 (DNS rebinding) and that sends
            # its own name as Host is refused.
            if _host_name(request.host or "").lower() not in request.app["hosts"]:
                return _error(421, f"this server answers to {', '.join(sorted(request.app['hosts']))}, "
                                   f"not {request.host!r}")
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        if request.headers.get(CSRF_HEADER) != "1":
            return _error(403, f"state-changing requests need the header {CSRF_HEADER}: 1")
        origin = request.headers.get("Origin")
        if origin and origin != f"{request.scheme}://{request.host}":
            return _error(403, f"cross-origin request from {origin} refused")
    actor = ACTOR.set(_actor(request))
    try:
        response = await handler(request)
    finally:
        ACTOR.reset(actor)
    if from_query and not response.prepared:
        # a browser opened /?token=...: remember it for this site only
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/")
    return response


@web.middleware
async def _count(request: web.Request, handler):
    """Counts the requests answered, by route (its pattern, not the path: bounded) and status,
    for /metrics."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        info = request.match_info
        route = info.route.resource.canonical if info.route.resource is not None else "unmatched"
        counts = request.app["manager"].http_requests
        counts[(route, status)] = counts.get((route, status), 0) + 1


def make_app(manager, token: str | None = None, host: str = "127.0.0.1") -> web.Application:
    app = web.Application(middlewares=[_count, _guard])
    app["manager"] = manager
    app["token"] = token
    app["hosts"] = {"127.0.0.1", "localhost", "::1", host.lower()}
    routes = web.RouteTableDef()

    @routes.get("/healthz")
    async def healthz(request):
        return _json({"ok": True})

    @routes.get("/readyz")
    async def readyz(request):
        ready = manager.ready()
        return _json({"ready": ready}, 200 if ready else 503)

    @routes.get("/api/status")
    async def status(request):
        return _json(manager.status())

    def pool_or_404(name):
        try:
            return manager.pool(name)
        except KeyError as e:
            raise web.HTTPNotFound(text=json.dumps({"error": str(e.args[0])}), content_type="application/json")

    @routes.get("/api/services/{name}")
    async def service(request):
        return _json(pool_or_404(request.match_info["name"]).status())

    def number(request, key, default=None, minimum=-math.inf):
        text = request.query.get(key)
        if text is None or text == "":
            return default
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not value >= minimum or math.isinf(value):
            raise web.HTTPBadRequest(text=json.dumps({"error": f"{key} must be a number >= {minimum}"}),
                                     content_type="application/json")
        return value

    async def in_thread(fn, *args, **kw):
        """A read of the store, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kw))

    @routes.get("/api/services/{name}/history")
    async def history(request):
        """The points after ``since`` (default: the last hour, or ``range`` seconds), every 2 s, or
        ``resolution=60``: a point per minute (from the store)."""
        pool = pool_or_404(request.match_info["name"])
        since = number(request, "since")
        span = number(request, "range", minimum=0)
        resolution = number(request, "resolution", 2)
        if resolution not in (2, 60):
            return _error(400, "resolution must be 2 (a point every 2 s) or 60 (a point per minute)")
        now = time.time()
        if since is None:
            since = now - (span if span is not None else HISTORY_RANGE)
        elif span is not None:
            since = max(since, now - span)
        interval = pool.history.interval if resolution == 2 else 60.0
        kept = pool.history.points
        if resolution == 2 and (not manager.store.ok or kept and kept[0]["t"] <= since):
            points = [p for p in kept if p["t"] > since]   # (the last hour is in memory)
        else:
            try:
                points = await in_thread(manager.store.points, pool.cfg.section, since=since,
                                         resolution=int(resolution))
            except Exception as e:   # (StoreUnavailable, or a file that cannot be read)
                return _error(503, f"history beyond the last hour needs the store: {e}")
            if resolution == 2:   # (points not written yet are in memory)
                last = points[-1]["t"] if points else since
                points += [p for p in kept if p["t"] > last]
        return _compressed({"interval": interval, "points": points, "now": now})

    @routes.get("/api/events")
    async def events(request):
        """Events (start, stop, restart, scale, crash, failed, autoscale, reload) after ``since``,
        of one ``service`` (or all), oldest first."""
        since = number(request, "since")
        name = request.query.get("service") or None
        if name is not None and name != "manager":
            name = pool_or_404(name).cfg.section
        limit = int(number(request, "limit", 10000, minimum=1))
        store = manager.store
        ring_size = store.recent_events.maxlen
        ring = list(store.recent_events)   # the latest events, those a previous manager kept included

        def wanted(events):
            return [e for e in events if (since is None or e["t"] > since) and (name is None or e["service"] == name)]
        found = None
        if store.ok and len(ring) == ring_size and (since is None or since < ring[0]["t"]):
            try:   # (older than the ring: from the store, then the ring's events not written yet)
                found = await in_thread(store.events, since, name, limit)
                last = found[-1]["t"] if found else -math.inf
                found += [e for e in wanted(ring) if e["t"] > last]
            except Exception:
                found = None
        if found is None:
            found = wanted(ring)
        found = found[-limit:]
        return _compressed({"events": found, "now": time.time()})

    @routes.get("/api/services/{name}/errors")
    async def method_errors(request):
        # the last exceptions per method, with their tracebacks (speedysvc/manager/method_errors.py)
        return _json({"methods": pool_or_404(request.match_info["name"]).method_errors.report()})

    @routes.post("/api/services/{name}/{action:start|stop|restart}")
    async def action(request):
        pool = pool_or_404(request.match_info["name"])
        act = request.match_info["action"]
        if act == "stop":
            manager.cancel_waiting(pool)   # (one waiting for its dependencies does not start later)
        options = {}
        if act == "restart":
            # {"hard": true}: stop, then start; else a rolling restart (the body may be empty)
            try:
                text = await request.text()
                body = json.loads(text) if text.strip() else {}
            except ValueError:
                body = None
            if not isinstance(body, dict) or body.get("hard", False).__class__ is not bool:
                return _error(400, 'the body of a restart is {} or {"hard": true|false}')
            options["hard"] = body.get("hard", False)
        try:
            await getattr(pool, act)(**options)
        except Exception as e:
            return _error(409, f"{act} failed: {e}")
        if act != "stop" and pool.state != "running" and pool.failure:
            return _error(409, f"{act} failed: {pool.failure}")
        return _json(pool.status())

    @routes.post("/api/reload")
    async def reload(request):
        # shielded: a client that goes away does not cut a reload short
        try:
            result = await asyncio.shield(asyncio.ensure_future(manager.reload()))
        except ConfigError as e:
            return _json({"error": f"configuration error, nothing changed: {e}", "file": e.path,
                          "section": e.section, "key": e.key}, 400)
        except ReloadRefused as e:
            return _error(409, f"reload refused: {e}")
        return _json(result)

    @routes.post("/api/services/{name}/scale")
    async def scale(request):
        pool = pool_or_404(request.match_info["name"])
        try:
            workers = (await request.json())["workers"]
        except (ValueError, KeyError, TypeError):
            workers = None
        if workers.__class__ is not int:   # (not 2.9, not true, not "2")
            return _error(400, 'the number of workers must be a whole number: {"workers": N}')
        try:
            pool.scale(workers)
        except (ValueError, RuntimeError) as e:
            return _error(409, str(e))
        return _json(pool.status())

    def log_of(name):
        return manager.log if name == "manager" else pool_or_404(name).log

    @routes.get("/api/services/{name}/logs")
    async def logs(request):
        q = request.query
        try:
            lines = int(q.get("lines", "200"))
        except ValueError:
            lines = -1
        if lines < 0:
            return _error(400, "lines must be a whole number >= 0 (0: all that are kept)")
        name = request.match_info["name"]
        target = log_of(name)
        grep = q.get("grep")
        if grep is not None:   # the whole retained log, from the store's index
            # (at most GREP_LINES records an answer: the whole log is the download's, streamed)
            lines = min(lines or GREP_LINES, GREP_LINES)
            section = name if name == "manager" else pool_or_404(name).cfg.section
            try:
                records = await in_thread(manager.store.search_logs, section, grep, q.get("level"), lines)
                return _compressed({"records": records, "source": "store"})
            except Exception as e:   # (no store: the records in memory)
                records = target.tail(lines, q.get("level"), grep)
                return _compressed({"records": records, "source": "memory", "store_error": str(e)})
        records = target.tail(lines, q.get("level"), q.get("q"))
        return _compressed({"records": records})

    @routes.get("/api/services/{name}/logs/download")
    async def log_download(request):
        """Every record the store keeps of a service (else those in memory), as the log file has them."""
        name = request.match_info["name"]
        target = log_of(name)
        section = name if name == "manager" else pool_or_404(name).cfg.section
        resp = web.StreamResponse(headers={
            "Content-Type": "text/plain; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{section}-{time.strftime("%Y%m%d-%H%M%S")}.log"'})
        resp.enable_compression()
        await resp.prepare(request)
        records = iter(list(target.recent))   # (no store: the records in memory)
        if manager.store.ok:
            stored = manager.store.log_records(section)
            try:
                first = await in_thread(next, stored, None)
                records = itertools.chain([first] if first is not None else [], stored)
            except Exception:
                pass

        def more():
            return [r for _, r in zip(range(2000), records)]
        while True:
            try:
                chunk = await in_thread(more)
            except Exception as e:
                await resp.write(f"(the rest could not be read from the store: {e})\n".encode())
                break
            if not chunk:
                break
            await resp.write("".join(LogRecord(r).format() + "\n" for r in chunk).encode())
        await resp.write_eof()
        return resp

    @routes.get("/api/services/{name}/logs/stream")
    async def log_stream(request):
        """Server-sent events: one ``data: {record}`` per new log record."""
        target = log_of(request.match_info["name"])
        level, text = request.query.get("level"), request.query.get("q")
        queue: asyncio.Queue = asyncio.Queue(maxsize=10000)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def notify(rec):
            if matches(rec, level, text):
                if queue.full():
                    queue.get_nowait()
                queue.put_nowait(rec)

        target.subscribers.add(notify)
        try:
            await resp.write(b": connected\n\n")
            while True:
                try:
                    rec = await asyncio.wait_for(queue.get(), 15)
                    await resp.write(f"data: {json.dumps(rec)}\n\n".encode())
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            target.subscribers.discard(notify)
        return resp

    app.add_routes(routes)
    from .pages import add_web_routes
    add_web_routes(app, manager)
    return app


class WebServer:
    """The manager's HTTP side, running: its ``url``, and the token that lets others in, kept in
    a file only the manager's user can read (``access.token_path``) while it runs."""

    def __init__(self, runner: web.AppRunner, url: str, token: str, token_file: str):
        self.runner, self.url, self.token, self.token_file = runner, url, token, token_file

    @property
    def login_url(self) -> str:
        return f"{self.url}/?token={self.token}"

    async def close(self) -> None:
        access.remove_token(self.token_file, self.token)
        await self.runner.cleanup()


async def start_web(manager, web_cfg) -> WebServer:
    """Start the API (and web interface) on the configured address, with the configured token or
    one made now."""
    if not is_loopback(web_cfg.host) and not web_cfg.token:   # (config.load says so first)
        raise OSError(f"the web interface would listen on {web_cfg.host}, beyond this host, without an access "
                      f"token: set token in [web monitor] or SPEEDYSVC_WEB_TOKEN")
    token, token_file = access.write_token(web_cfg.port, web_cfg.token)
    app = make_app(manager, token, web_cfg.host)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    try:
        await runner.setup()
        site = web.TCPSite(runner, web_cfg.host, web_cfg.port, shutdown_timeout=1.0)
        await site.start()
    except BaseException:
        access.remove_token(token_file, token)
        await runner.cleanup()
        raise
    host = f"[{web_cfg.host}]" if ":" in web_cfg.host else web_cfg.host
    return WebServer(runner, f"http://{host}:{web_cfg.port}", token, token_file)
