"""The web management interface: pages, their script and style, and /metrics.

The pages are rendered with Jinja2 and then kept live by a small script
(static/app.js) that polls the JSON API (speedysvc/api.py) and follows logs by
server-sent events; charts are drawn by uPlot (static/vendor/uplot, its version in
VERSION).  Everything ships in the package: the interface works offline.
"""
from __future__ import annotations

import os

import jinja2
from aiohttp import web

from .metrics import metrics_text

HERE = os.path.dirname(os.path.abspath(__file__))
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(HERE, "templates")),
                          autoescape=jinja2.select_autoescape(["html"]))


def _static(name: str) -> str:
    """A static file's URL, with its modification time so browsers never keep a stale copy."""
    return f"/static/{name}?v={int(os.stat(os.path.join(HERE, 'static', name)).st_mtime)}"


def _page(template: str, **context) -> web.Response:
    html = _env.get_template(template).render(static=_static, **context)
    return web.Response(text=html, content_type="text/html",
                        headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
                                 "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin"})


def add_web_routes(app: web.Application, manager) -> None:
    routes = web.RouteTableDef()

    @routes.get("/")
    async def index(request):
        return _page("index.html", status=manager.status())

    @routes.get("/services/{name}")
    async def service(request):
        try:
            pool = manager.pool(request.match_info["name"])
        except KeyError:
            raise web.HTTPNotFound(text="no such service")
        return _page("service.html", s=pool.status(), status=manager.status())

    @routes.get("/metrics")
    async def metrics(request):
        body, content_type = metrics_text(manager)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app.add_routes(routes)
    app.router.add_static("/static/", os.path.join(HERE, "static"))
