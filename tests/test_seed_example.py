"""The seed README's Quick Example client, verbatim (examples/echo holds the seed's files), against
workers started with LocalService rather than the manager (manager/test_manager_serving.py runs it with
the manager)."""
import os
import shutil
import subprocess
import sys
import textwrap

from manager_fixture import manager_env

RUNNER = textwrap.dedent('''\
    import subprocess, sys
    from speedysvc import LocalService
    from echoserver import EchoServer
    with LocalService(EchoServer, workers=3):
        out = subprocess.run([sys.executable, "echoclient.py"], capture_output=True, text=True, timeout=60)
        sys.stdout.write(out.stdout)
        sys.stderr.write(out.stderr)
        sys.exit(out.returncode)
''')


EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "echo")


def test_quick_example_client_prints_hello_world(tmp_path):
    for name in ("echoserver.py", "echoclient.py"):
        shutil.copy(os.path.join(EXAMPLE, name), tmp_path)
    (tmp_path / "run.py").write_text(RUNNER)
    env = manager_env()
    out = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Hello World!\n"
