"""The last exceptions each method of a service raised, for the web interface's service page.

A worker logs what a method raises as one record of the logger ``speedysvc.calls``
(``speedysvc.shm.dispatch.ErrorLog``): ``method() raised Type: message`` followed by the
traceback, at most a few per method a minute, and a warning that counts the ones left out.
This keeps, from those records as they reach the manager (a ``ServiceLog`` subscriber), and
from the latest of them a previous manager's store kept (``load``), the last ``PER_METHOD`` of
each method, for at most ``METHODS`` methods: a bounded amount of memory
whatever the service raises.
"""
from __future__ import annotations

import collections
import re

LOGGER = "speedysvc.calls"
PER_METHOD = 5
METHODS = 200
LOAD = 1000               # records of the logger read back from the store at a manager's start
MAX_TEXT = 20000          # characters kept of one message or traceback

_RAISED = re.compile(r"(?P<method>[^\s()]+)\(\) raised (?P<type>[^\s:]+): ?(?P<rest>.*)", re.S)
_LEFT_OUT = re.compile(r"(?P<method>[^\s()]+)\(\): (?P<n>\d+) more exception")
_TRACEBACK = "\nTraceback (most recent call last):"


class MethodErrors:
    def __init__(self, per_method: int = PER_METHOD, methods: int = METHODS):
        self.per_method, self.methods = per_method, methods
        self.by_method: collections.OrderedDict[str, dict] = collections.OrderedDict()

    def _entry(self, method: str) -> dict:
        e = self.by_method.get(method)
        if e is None:
            if len(self.by_method) >= self.methods:   # the method that raised least recently goes
                self.by_method.popitem(last=False)
            e = self.by_method[method] = {"method": method, "count": 0, "left_out": 0,
                                          "last": collections.deque(maxlen=self.per_method)}
        self.by_method.move_to_end(method)
        return e

    def notify(self, rec) -> None:
        """A ``ServiceLog`` record: kept if it is one of ``speedysvc.calls``'."""
        if rec["logger"] != LOGGER:
            return
        text = rec["message"]
        m = _RAISED.match(text)
        if m and rec["level"] in ("ERROR", "CRITICAL"):
            rest = m["rest"]
            cut = rest.find(_TRACEBACK)
            message, traceback = (rest, "") if cut < 0 else (rest[:cut], rest[cut + 1:])
            e = self._entry(m["method"])
            e["count"] += 1
            e["last"].append({"t": rec["t"], "pid": rec["pid"], "type": m["type"],
                              "message": message[:MAX_TEXT], "traceback": traceback[:MAX_TEXT]})
            return
        m = _LEFT_OUT.match(text)
        if m:
            self._entry(m["method"])["left_out"] += int(m["n"])

    def load(self, records) -> None:
        """Records a previous manager's store kept, oldest first: what its methods raised goes on
        being shown after a restart of the manager."""
        for rec in records:
            self.notify(rec)

    def report(self) -> list[dict]:
        """The methods, the one that raised last first; each with its errors, newest first."""
        return [{"method": e["method"], "logged": e["count"], "left_out": e["left_out"],
                 "errors": list(reversed(e["last"]))}
                for e in reversed(self.by_method.values())]
