"""A client process loads the public API, the codecs and the transports, nothing more."""
import subprocess
import sys


def test_client_imports_stay_light():
    code = ("import sys\nfrom speedysvc import connect, ClientMethodsBase, msgpack_method\n"
            "print(' '.join(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    ours = {m for m in loaded if m.startswith("speedysvc")}
    assert ours == {"speedysvc", "speedysvc._shmcore", "speedysvc.client", "speedysvc.codecs",
                    "speedysvc.codecs.base", "speedysvc.codecs.json", "speedysvc.codecs.msgpack",
                    "speedysvc.codecs.pickle", "speedysvc.codecs.raw", "speedysvc.errors", "speedysvc.methods",
                    "speedysvc.transport"}
    assert "subprocess" not in loaded


def test_local_service_is_still_importable_from_the_package():
    from speedysvc import LocalService
    from speedysvc.local import LocalService as direct
    assert LocalService is direct
