"""The service manager: every service of an ini file as a supervised pool of workers,
in one process (``python -m speedysvc.service service.ini``).

``config`` reads service.ini, ``pool`` runs one service's workers, ``main`` is the
manager's loop, ``logs`` keeps the services' logs, ``cli`` is the ``speedysvc``
command, and ``web`` the HTTP API, the pages and /metrics.  A client process never
imports this package.
"""
