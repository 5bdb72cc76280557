"""The service manager: every service of an ini file as a supervised pool of workers,
in one process (``python -m speedysvc.service service.ini``, or ``speedysvc run``).

``config`` reads service.ini, ``manager`` is the manager's loop (``Manager``, ``main``),
``pool`` runs one service's workers, ``logs`` keeps the services' logs, ``cli`` is the
``speedysvc`` command, and ``web`` the HTTP API, the pages and /metrics.  A client
process never imports this package.
"""


def __getattr__(name):
    # Manager and main load the whole manager (the TCP gateway, psutil, aiohttp): only when asked
    if name in ("Manager", "main", "describe_services"):
        from . import manager
        return getattr(manager, name)
    raise AttributeError(f"module 'speedysvc.manager' has no attribute {name!r}")


__all__ = ["Manager", "main", "describe_services"]
