"""The seed README's Quick Example files, verbatim, against workers started with LocalService."""
import os
import subprocess
import sys
import textwrap

ECHOSERVER = textwrap.dedent('''\
    from speedysvc import ServerMethodsBase, json_method

    class EchoServer(ServerMethodsBase):
        port = 5555
        name = 'echo_serv'

        @json_method
        def echo_json(self, data):
            return data
''')

ECHOCLIENT = textwrap.dedent('''\
    from speedysvc import ClientMethodsBase, connect
    from echoserver import EchoServer

    class EchoClient(ClientMethodsBase):
        def echo_json(self, data):
            return self.send(EchoServer.echo_json, [data])

    if __name__ == '__main__':
        # Note: Replace 'shm://' with 'tcp://(host)' for remote services
        methods = EchoClient(connect(EchoServer, 'shm://'))
        print(methods.echo_json("Hello World!"))
''')

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


def test_quick_example_client_prints_hello_world(tmp_path):
    (tmp_path / "echoserver.py").write_text(ECHOSERVER)
    (tmp_path / "echoclient.py").write_text(ECHOCLIENT)
    (tmp_path / "run.py").write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Hello World!\n"
