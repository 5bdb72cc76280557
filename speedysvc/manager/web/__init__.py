"""The manager's HTTP side: the JSON API (``api``), the web interface (``pages``, with
its templates and static files) and ``/metrics`` (``metrics``).  It reads the
manager's state (``Manager.status()``, the pools' logs and history) and never the
transports' internals."""
