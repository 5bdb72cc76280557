"""What the shared-memory tests share: Python processes of their own that import the tests'
service classes (as clients, or as the owner of a service)."""
import os
import subprocess
import sys
import textwrap


def child_env(**extra) -> dict:
    """The environment of a child Python process that imports what the tests import."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **extra)


def python_child(code: str, **popen_kw) -> subprocess.Popen:
    """``python -c code`` (dedented) in a process of its own, with the tests' import path."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=child_env(), **popen_kw)
