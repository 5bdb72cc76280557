"""The layering rules of docs/architecture.md, as import contracts over the package's source.

Every import of every module counts, those inside functions too (a lazy import is still a
dependency), read from the source with ``ast`` so that no module has to be run.  A second set
of checks runs a client process and looks at what it really loaded.
"""
import ast
import os
import subprocess
import sys
import textwrap

import pytest

import speedysvc

PACKAGE = os.path.dirname(os.path.abspath(speedysvc.__file__))

# what a client process is made of: the public API, the codecs, the transport interface and the
# transports' client halves
CLIENT = ["speedysvc", "speedysvc.errors", "speedysvc.methods", "speedysvc.transport", "speedysvc.waiting", "speedysvc.client",
          "speedysvc.allocation",
          "speedysvc.aio", "speedysvc.codecs.*", "speedysvc.shm", "speedysvc.shm.segment", "speedysvc.shm.channels",
          "speedysvc.shm.transport", "speedysvc.shm.aio", "speedysvc.tcp", "speedysvc.tcp.framing",
          "speedysvc.tcp.compression", "speedysvc.tcp.protocol", "speedysvc.tcp.client", "speedysvc.tcp.aio",
          "speedysvc.tcp.balanced"]
SERVING = ["speedysvc.manager", "speedysvc.local", "speedysvc.service", "speedysvc.cli", "speedysvc.worker",
           "speedysvc.shm.worker", "speedysvc.shm.dispatch", "speedysvc.shm.logpipe", "speedysvc.tcp.server",
           "speedysvc.tcp.connection", "speedysvc.tcp.admission", "speedysvc.tcp.parking", "speedysvc.tcp.inflate",
           "speedysvc.tcp.sweep", "speedysvc.tcp.serve", "speedysvc.tcp.options", "speedysvc.tcp.eventloop"]
SERVER_STACK = ["aiohttp", "jinja2", "prometheus_client", "psutil", "uvloop", "subprocess"]

# (who, must never import, why)
CONTRACTS = [
    (CLIENT, SERVING + SERVER_STACK,
     "a client process imports the public API, the codecs and the transports only"),
    (["speedysvc.shm.*", "speedysvc.tcp.*"], ["speedysvc.manager", "speedysvc.local"],
     "the transports and the servers know nothing of who supervises them"),
    (["speedysvc.shm.*"], ["speedysvc.tcp"], "the shared-memory side knows nothing of TCP"),
    (["speedysvc.manager.web.*"], ["speedysvc.shm", "speedysvc.tcp", "speedysvc._shmcore"],
     "the web part reads the manager's state, not the transports' internals"),
    (["speedysvc.codecs.*"], ["speedysvc.shm", "speedysvc.tcp", "speedysvc.manager", "speedysvc.client",
                              "speedysvc.aio", "speedysvc.transport"],
     "a codec is bytes in, bytes out: it knows no transport"),
    (["speedysvc.transport"], ["speedysvc.shm", "speedysvc.tcp"],
     "the transport interface names its implementations only as strings, loaded on first use"),
]


def module_name(path: str, root: str, top: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    rel = rel[:-len(".__init__")] if rel.endswith(".__init__") else ("" if rel == "__init__" else rel)
    return f"{top}.{rel}" if rel else top


def modules(root: str, top: str) -> dict[str, str]:
    """Every module of the package at ``root`` (named ``top``): its name -> its file."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                found[module_name(path, root, top)] = path
    return found


def imports_of(name: str, path: str) -> list[list[str]]:
    """What ``name`` imports anywhere in its source: per import, the modules it may load
    (``from pkg import x`` may load ``pkg`` and ``pkg.x``)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [[a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out += [[base, f"{base}.{a.name}"] for a in node.names]
    return out


def is_one_of(name: str, modules_) -> bool:
    """Whether module ``name`` is one of ``modules_``: names, or ``pkg.*`` for a package and
    everything in it."""
    return any(name == m or (m.endswith(".*") and (name == m[:-2] or name.startswith(m[:-1])))
               for m in modules_)


def matches(name: str, patterns) -> bool:
    """Whether importing ``name`` loads one of ``patterns`` (a module, or something inside it)."""
    return any(name == p or name.startswith(p + ".") for p in patterns)


# (importer, imported, why it is allowed): exceptions, each with its reason
ALLOWED = [
    ("speedysvc", "speedysvc.local", "the package's face loads LocalService when a process asks for it, "
                                     "never on import (module __getattr__)"),
]


def broken_contracts(root: str, top: str, contracts=CONTRACTS, allowed=ALLOWED) -> list[str]:
    found = modules(root, top)
    broken = set()
    for who, never, why in contracts:
        for name, path in sorted(found.items()):
            if not is_one_of(name, who):
                continue
            for candidates in imports_of(name, path):
                hit = next((m for m in candidates if matches(m, never)), None)
                if hit is not None and not matches(name, never) \
                        and not any(name == a and matches(hit, [b]) for a, b, _ in allowed):
                    broken.add(f"{name} imports {hit}: {why}")
    return sorted(broken)


def test_the_package_keeps_its_import_contracts():
    assert broken_contracts(PACKAGE, "speedysvc") == []


def test_every_module_is_covered_by_the_contracts():
    """A new module is placed on purpose: on the client side or on the serving side."""
    names = set(modules(PACKAGE, "speedysvc"))
    unplaced = sorted(n for n in names if not is_one_of(n, CLIENT) and not matches(n, SERVING))
    assert unplaced == []


def test_the_check_catches_a_client_module_that_imports_the_manager(tmp_path):
    pkg = tmp_path / "speedysvc"
    (pkg / "shm").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "shm" / "__init__.py").write_text("")
    (pkg / "shm" / "transport.py").write_text(textwrap.dedent("""\
        def attach():
            from ..manager.pool import ServicePool   # a lazy import is a dependency too
            return ServicePool
    """))
    (pkg / "client.py").write_text("import psutil\n")
    broken = broken_contracts(str(pkg), "speedysvc")
    assert any(b.startswith("speedysvc.shm.transport imports speedysvc.manager.pool") for b in broken), broken
    assert any(b.startswith("speedysvc.client imports psutil") for b in broken), broken


def test_the_check_catches_the_web_part_reaching_into_a_transport(tmp_path):
    web = tmp_path / "speedysvc" / "manager" / "web"
    web.mkdir(parents=True)
    for init in (tmp_path / "speedysvc", web.parent, web):
        (init / "__init__.py").write_text("")
    (web / "pages.py").write_text("from ...shm.segment import ServiceSegment\n")
    broken = broken_contracts(str(tmp_path / "speedysvc"), "speedysvc")
    assert broken == ["speedysvc.manager.web.pages imports speedysvc.shm.segment: "
                      "the web part reads the manager's state, not the transports' internals"]


def loaded_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("address, side, other", [("shm://", "speedysvc.shm", "speedysvc.tcp"),
                                                   ("tcp://127.0.0.1:1", "speedysvc.tcp", "speedysvc.shm.")])
def test_a_client_process_loads_one_transport_and_nothing_of_the_serving_side(address, side, other):
    loaded = loaded_by(textwrap.dedent(f"""\
        from speedysvc import ServerMethodsBase, connect, msgpack_method
        class Svc(ServerMethodsBase):
            name, port = "svc", 1
            @msgpack_method
            def f(self): pass
        connect(Svc, {address!r})
    """))
    ours = {m for m in loaded if m.startswith("speedysvc")}
    assert any(m.startswith(side) for m in ours)
    assert not any(m.startswith(other) for m in ours), sorted(ours)
    assert not any(matches(m, SERVING) for m in ours), sorted(ours)
    assert all(is_one_of(m, CLIENT) or m == "speedysvc._shmcore" for m in ours), sorted(ours)
    assert not any(matches(m, SERVER_STACK) for m in loaded), sorted(m for m in loaded if matches(m, SERVER_STACK))


def test_importing_the_package_loads_the_public_api_and_the_codecs_only():
    loaded = loaded_by("from speedysvc import connect, ClientMethodsBase, msgpack_method")
    ours = {m for m in loaded if m.startswith("speedysvc")}
    assert ours == {"speedysvc", "speedysvc._shmcore", "speedysvc.allocation", "speedysvc.client", "speedysvc.codecs",
                    "speedysvc.codecs.base", "speedysvc.codecs.json", "speedysvc.codecs.msgpack", "speedysvc.codecs.outofband",
                    "speedysvc.codecs.pickle", "speedysvc.codecs.raw", "speedysvc.errors", "speedysvc.methods",
                    "speedysvc.transport", "speedysvc.waiting"}
    assert not any(matches(m, SERVER_STACK) for m in loaded)


def test_local_service_is_still_importable_from_the_package():
    from speedysvc import LocalService
    from speedysvc.local import LocalService as direct
    assert LocalService is direct
