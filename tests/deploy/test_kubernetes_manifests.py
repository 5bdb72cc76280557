"""deploy/kubernetes: the manifests are valid Kubernetes objects (kubernetes-validate, against the
schemas it ships: no network), they say what docs/deploy.md says they do and agree with the
example's service.ini and Dockerfile, and the example's folder runs under the real manager as the
manifests configure it: probes, /metrics with the token, a TCP call with the secret, and the
same-pod application calling over shared memory."""
import base64
import copy
import fnmatch
import glob
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
import yaml

import kubernetes_validate
from kubernetes_validate.utils import all_versions

from conftest import free_port
from manager_fixture import RunningManager, manager_env

from speedysvc import _shmcore as core
from speedysvc import connect
from speedysvc.errors import AuthenticationFailed
from speedysvc.manager import config as configmod
from speedysvc.transport import is_loopback

# The Kubernetes version the manifests are checked against (docs/deploy.md says it): its schemas
# ship with kubernetes-validate, so the check needs no network.
K8S_VERSION = "1.31.0"

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
SERVICE_DIR = os.path.join(DEPLOY, "service")
INI = os.path.join(SERVICE_DIR, "service.ini")
MANIFESTS = sorted(glob.glob(os.path.join(DEPLOY, "*.yaml")))

SECRET_ENV_TCP = "SPEEDYSVC_TCP_SECRET"    # what the manager reads (config.py)
SECRET_ENV_WEB = "SPEEDYSVC_WEB_TOKEN"


def documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def objects():
    return [(os.path.basename(p), d) for p in MANIFESTS for d in documents(p)]


def one(kind, name=None):
    found = [d for _, d in objects() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def deployments():
    return [d for _, d in objects() if d["kind"] == "Deployment"]


def all_containers(pod_spec):
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def manager_container(pod_spec):
    found = [c for c in all_containers(pod_spec) if c["name"] == "manager"]
    assert len(found) == 1, "each Deployment has one container named manager"
    return found[0]


def container_port(container, port):
    """A probe's or Service's port (a name or a number) as the container's port number."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container.get("ports", [])], f"no containerPort {port}"
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"container {container['name']} has no port named {port!r}"
    return named[0]


def secret_values():
    secret = one("Secret")
    values = dict(secret.get("stringData", {}))
    values.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    return secret["metadata"]["name"], values


def env_of(container):
    """The container's environment as the Secret example fills it in."""
    name, values = secret_values()
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == name, f"{e['name']} refers to Secret {ref['name']}, not {name}"
            assert ref["key"] in values, f"{e['name']} refers to key {ref['key']}, which Secret {name} has not"
            env[e["name"]] = values[ref["key"]]
    return env


def load_ini(env):
    """The example's service.ini as the manager reads it, in ``env``."""
    saved = {k: os.environ.pop(k) for k in (SECRET_ENV_TCP, SECRET_ENV_WEB) if k in os.environ}
    try:
        os.environ.update({k: v for k, v in env.items() if k in (SECRET_ENV_TCP, SECRET_ENV_WEB)})
        return configmod.load(INI)
    finally:
        for k in (SECRET_ENV_TCP, SECRET_ENV_WEB):
            os.environ.pop(k, None)
        os.environ.update(saved)


def import_greeter(folder=SERVICE_DIR):
    spec = importlib.util.spec_from_file_location(f"deploy_greeter_{abs(hash(folder))}",
                                                  os.path.join(folder, "greeter.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Greeter


def seconds(duration):
    m = re.fullmatch(r"(\d+)", str(duration))
    assert m, duration
    return int(m.group(1))


def quantity(text):
    """A Kubernetes memory quantity in bytes (Ki, Mi, Gi and plain numbers are enough here)."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(text))
    assert m, f"quantity {text!r}"
    return int(m.group(1)) << {None: 0, "Ki": 10, "Mi": 20, "Gi": 30}[m.group(2)]


# ---- the manifests are valid ------------------------------------------------------------------

def test_the_pinned_kubernetes_version_ships_with_kubernetes_validate():
    assert K8S_VERSION in all_versions(), (
        f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for {K8S_VERSION} "
        f"(it has {', '.join(all_versions())})")


def test_every_manifest_is_valid():
    assert len(MANIFESTS) >= 5, MANIFESTS
    kinds = set()
    for name, doc in objects():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
        kinds.add(doc["kind"])
    assert kinds == {"Deployment", "Service", "Secret", "HorizontalPodAutoscaler"}, kinds


def test_the_validation_refuses_a_broken_manifest():
    """(The check above can fail: a misspelt key and a wrong type are caught.)"""
    doc = copy.deepcopy(one("Deployment", "greeter"))
    doc["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["sizelimit"] = "1Mi"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    doc = copy.deepcopy(one("Deployment", "greeter"))
    manager_container(doc["spec"]["template"]["spec"])["livenessProbe"]["httpGet"]["port"] = ["web"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ---- what they say agrees with service.ini ----------------------------------------------------

def test_the_secrets_come_from_the_secret_and_the_manager_needs_them():
    for dep in deployments():
        manager = manager_container(dep["spec"]["template"]["spec"])
        env = env_of(manager)   # every secretKeyRef names the Secret, and a key it has
        assert {SECRET_ENV_TCP, SECRET_ENV_WEB} <= set(env), dep["metadata"]["name"]
        cfg = load_ini(env)
        assert cfg.service("Greeter").tcp_secret == env[SECRET_ENV_TCP]
        assert cfg.web.token == env[SECRET_ENV_WEB]
    # without them the manager refuses the file (bind_tcp and the web interface are not loopback)
    with pytest.raises(configmod.ConfigError, match="not a loopback address"):
        load_ini({SECRET_ENV_WEB: "t"})
    with pytest.raises(configmod.ConfigError, match="not a loopback address"):
        load_ini({SECRET_ENV_TCP: "s"})
    with open(INI) as f:
        text = f.read()
    assert not re.search(r"^\s*(tcp_secret|token)\s*=", text, re.M), "secrets belong in the Secret"


def test_probes_reach_healthz_and_readyz_on_the_web_port():
    for dep in deployments():
        spec = dep["spec"]["template"]["spec"]
        manager = manager_container(spec)
        cfg = load_ini(env_of(manager))
        # the kubelet probes from the node, not from loopback: the web server must listen beyond
        # it, which the manager allows only with a token (checked above)
        assert not is_loopback(cfg.web.host), cfg.web.host
        assert cfg.web.token
        live, ready = manager["livenessProbe"]["httpGet"], manager["readinessProbe"]["httpGet"]
        assert live["path"] == "/healthz" and ready["path"] == "/readyz"
        for probe in (live, ready, manager["startupProbe"]["httpGet"]):
            assert container_port(manager, probe["port"]) == cfg.web.port
            assert probe.get("scheme", "HTTP") == "HTTP"
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == cfg.web.port


def test_the_headless_service_publishes_the_tcp_port_of_the_pods():
    svc = one("Service", "greeter")
    dep = one("Deployment", "greeter")
    assert svc["spec"]["clusterIP"] == "None", "headless: clients reach every pod, not one virtual IP"
    assert not svc["spec"].get("publishNotReadyAddresses"), "only ready pods (/readyz) are in its answer"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    manager = manager_container(dep["spec"]["template"]["spec"])
    cfg = load_ini(env_of(manager))
    greeter = cfg.service("Greeter")
    assert greeter.bind_tcp and not is_loopback(greeter.bind_tcp)
    port = import_greeter().port
    (svc_port,) = svc["spec"]["ports"]
    # clients of a headless Service connect to the pod's address at the Service's port: the
    # three must be the class's port
    assert svc_port["port"] == port
    assert container_port(manager, svc_port["targetPort"]) == port


def service_segment_bytes(max_channels):
    """The service segment's size (docs/shm-protocol.md, "Segments"; ServiceSegment.create)."""
    page = lambda n: (n + 4095) // 4096 * 4096   # noqa: E731
    return page(core.H_CHANNELS + max_channels * core.C_SIZE) + page(core.MAX_METHODS * core.NAME_SIZE) \
        + core.MAX_WORKERS * core.MAX_METHODS * core.M_SIZE


def shm_worst_case(cfg):
    """docs/deploy.md, "Sizing /dev/shm": per service its segment, and per channel a call of
    max_payload (plus its method name and page alignment, at most 1/16 more for pickled
    arrays, and a page)."""
    return sum(service_segment_bytes(s.max_channels) + s.max_channels * (s.max_payload * 17 // 16 + 8192)
               for s in cfg.services)


def test_dev_shm_is_a_memory_emptydir_shared_by_every_container_and_large_enough():
    for dep in deployments():
        spec = dep["spec"]["template"]["spec"]
        cfg = load_ini(env_of(manager_container(spec)))
        shm = [v for v in spec["volumes"] if v["name"] in
               {m["name"] for c in all_containers(spec) for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}]
        assert len(shm) == 1, f"{dep['metadata']['name']}: one volume at /dev/shm"
        assert shm[0]["emptyDir"]["medium"] == "Memory"
        for c in all_containers(spec):
            mounts = [m for m in c.get("volumeMounts", []) if m["name"] == shm[0]["name"]]
            assert [m["mountPath"] for m in mounts] == ["/dev/shm"], f"{c['name']} mounts /dev/shm"
            assert not mounts[0].get("readOnly")
        size = quantity(shm[0]["emptyDir"]["sizeLimit"])
        assert size >= shm_worst_case(cfg), (size, shm_worst_case(cfg))
        # the pages of /dev/shm count against the memory limit of the container that writes them
        for c in all_containers(spec):
            assert quantity(c["resources"]["limits"]["memory"]) > size, c["name"]


def test_the_same_pod_pattern_shares_the_pid_namespace_the_user_and_the_image():
    dep = one("Deployment", "greeter-app")
    spec = dep["spec"]["template"]["spec"]
    assert spec["shareProcessNamespace"] is True
    containers = all_containers(spec)
    assert len(containers) == 2
    manager = manager_container(spec)
    (app,) = [c for c in containers if c is not manager]
    # the manager is a sidecar (an init container that runs on) that must serve before the
    # application starts
    assert manager in spec["initContainers"] and manager["restartPolicy"] == "Always"
    assert manager["startupProbe"]["httpGet"]["path"] == "/readyz"
    # segments are named after the user's name and readable by the user alone: one user, and one
    # image (one /etc/passwd), for both
    assert spec["securityContext"]["runAsUser"] == runtime_user()
    for c in containers:
        assert "runAsUser" not in c.get("securityContext", {}), c["name"]
    assert app["image"] == manager["image"]
    assert app["command"][-1] == os.path.join(image_service_dir(), "app.py")
    assert "SPEEDYSVC_NAMESPACE" not in env_of(app) and "SPEEDYSVC_NAMESPACE" not in env_of(manager)


def test_termination_grace_covers_the_managers_stop():
    for dep in deployments():
        spec = dep["spec"]["template"]["spec"]
        cfg = load_ini(env_of(manager_container(spec)))
        pre_stop = 0
        for c in all_containers(spec):
            command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
            if command:
                assert command[0] == "sleep"
                pre_stop = max(pre_stop, seconds(command[1]))
        # TCP calls in flight get stop_timeout, the workers stop_timeout more, a killed worker 5 s
        needed = pre_stop + sum(2 * s.stop_timeout + 5 for s in cfg.services)
        assert spec["terminationGracePeriodSeconds"] > needed, (dep["metadata"]["name"], needed)
        strategy = dep["spec"]["strategy"]
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_the_autoscaler_scales_the_manager_deployment_by_cpu():
    hpa = one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    dep = one("Deployment", target["name"])
    assert (target["kind"], target["apiVersion"]) == ("Deployment", dep["apiVersion"])
    # the pods it adds are in the headless Service's answer, where TCP clients find them
    svc = one("Service")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    # a utilization is a share of the request: every container needs one
    for c in all_containers(dep["spec"]["template"]["spec"]):
        assert c["resources"]["requests"]["cpu"], c["name"]


# ---- the Dockerfile ---------------------------------------------------------------------------

def dockerfile():
    """[(instruction, arguments)] of deploy/kubernetes/Dockerfile, continuation lines joined."""
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages():
    found = []
    for word, rest in dockerfile():
        if word == "FROM":
            found.append([])
        found[-1].append((word, rest))
    return found


def image_service_dir():
    (copy_line,) = [rest for word, rest in stages()[-1] if word == "COPY" and rest.split()[0] == "deploy/kubernetes/service"]
    return copy_line.split()[-1]


def runtime_user():
    (user,) = [rest for word, rest in stages()[-1] if word == "USER"]
    return int(user.split(":")[0])


def image_cmd():
    (cmd,) = [rest for word, rest in stages()[-1] if word == "CMD"]
    return json.loads(cmd)   # the exec form: the manager gets SIGTERM itself, not a shell


def test_the_dockerfile_installs_speedysvc_from_the_repository():
    build = stages()[0]
    workdir = [rest for word, rest in build if word == "WORKDIR"][-1]
    assert ("COPY", f". {workdir}") in build or ("COPY", ". .") in build, "the whole checkout is copied"
    runs = " && ".join(rest for word, rest in build if word == "RUN")
    assert re.search(r"pip install (--no-cache-dir )?\.(\s|$)", runs), runs
    final = stages()[-1]
    assert any(word == "COPY" and "--from=" in rest for word, rest in final), "the runtime stage takes the build's venv"
    # it must not copy the checkout's own build of the extension (another Python, another libc)
    with open(os.path.join(DEPLOY, "Dockerfile.dockerignore")) as f:
        ignored = f.read().split()
    assert "speedysvc/*.so" in ignored and "build" in ignored


def ignored_by_docker(relative, patterns):
    """Whether the build context leaves ``relative`` out (.dockerignore: patterns rooted at the
    context, ``*`` within one path component, ``**`` any number of them; a folder left out takes
    its contents with it)."""
    def match(parts, pats):
        if not pats:
            return True   # the pattern matched a folder above: everything under it goes
        if pats[0] == "**":
            return any(match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and match(parts[1:], pats[1:])
    parts = relative.split("/")
    return any(match(parts, p.strip("/").split("/")) for p in patterns)


def test_the_build_context_builds_the_extension_and_the_package_data(tmp_path):
    """What the build stage does, without Docker: the repository as the build context has it
    (Dockerfile.dockerignore applied), built by setuptools as ``pip install .`` builds it."""
    with open(os.path.join(DEPLOY, "Dockerfile.dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ignored_by_docker("speedysvc/_shmcore.cpython-311-x86_64-linux-gnu.so", patterns)
    assert ignored_by_docker("tests/__pycache__/x.pyc", patterns) and ignored_by_docker(".git/HEAD", patterns)
    assert not ignored_by_docker("speedysvc/_c/layout.h", patterns)
    context = tmp_path / "context"
    shutil.copytree(ROOT, context, ignore=lambda folder, names: [
        n for n in names if ignored_by_docker(os.path.relpath(os.path.join(folder, n), ROOT).replace(os.sep, "/"), patterns)])
    assert not list(context.glob("speedysvc/*.so")) and (context / "deploy/kubernetes/service/service.ini").is_file()
    built = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "build")],
                           cwd=context, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    (lib,) = (tmp_path / "build").glob("lib*")
    assert list(lib.glob("speedysvc/_shmcore*.so"))
    assert list(lib.glob("speedysvc/manager/web/templates/*.html"))


def test_the_image_runs_the_manager_on_the_bundled_service_ini_as_the_pods_user():
    cmd = image_cmd()
    assert cmd[:2] == ["speedysvc", "run"] and len(cmd) == 3
    assert cmd[2] == os.path.join(image_service_dir(), "service.ini")
    assert [rest for word, rest in stages()[-1] if word == "WORKDIR"][-1] == image_service_dir()
    assert os.path.isfile(INI)
    for dep in deployments():
        spec = dep["spec"]["template"]["spec"]
        manager = manager_container(spec)
        assert "command" not in manager and "args" not in manager, "the manager runs the image's CMD"
        assert spec["securityContext"]["runAsUser"] == runtime_user()
        # log_dir=logs is under the service's folder: a volume there, the root filesystem being read-only
        logs = os.path.join(image_service_dir(), load_ini(env_of(manager)).services[0].log_dir
                            .removeprefix(os.path.dirname(INI) + os.sep))
        assert logs in [m["mountPath"] for m in manager["volumeMounts"]], logs


# ---- the example's folder under the real manager, as the manifests configure it ---------------

def non_loopback_address():
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not is_loopback(a.address):
                return a.address
    return None


def http(url, token=None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def example(tmp_path):
    """The example's folder in tmp_path, on free ports (Greeter's and the web interface's)."""
    folder = tmp_path / "service"
    shutil.copytree(SERVICE_DIR, folder, ignore=shutil.ignore_patterns("__pycache__", "logs"))
    tcp_port, web_port = free_port(), free_port()
    source = (folder / "greeter.py").read_text()
    patched, n = re.subn(r"^(\s+port = )5555\b", rf"\g<1>{tcp_port}", source, flags=re.M)
    assert n == 1
    (folder / "greeter.py").write_text(patched)
    ini, n = re.subn(r"^port=5155$", f"port={web_port}", (folder / "service.ini").read_text(), flags=re.M)
    assert n == 1
    (folder / "service.ini").write_text(ini)
    managers = []

    def start(pod_spec):
        """The manager in the folder, run as the image's CMD with the environment the manager
        container of ``pod_spec`` gets; returns it once /readyz answers 200 on loopback."""
        cmd = image_cmd()
        args = ["-m", "speedysvc.cli", *cmd[1:-1], str(folder / os.path.basename(cmd[-1]))]
        env = env_of(manager_container(pod_spec))
        managers.append(RunningManager(folder, ini, port=web_port, env=env, args=args))
        return managers[-1], env

    yield folder, start, tcp_port, web_port
    for m in managers:
        try:
            m.stop(timeout=30)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait()
            raise


def test_the_example_serves_probes_metrics_and_tcp_as_configured(example):
    folder, start, tcp_port, web_port = example
    m, env = start(one("Deployment", "greeter")["spec"]["template"]["spec"])
    Greeter = import_greeter(str(folder))
    host = non_loopback_address() or "127.0.0.1"   # as the kubelet and other pods reach the pod
    web = f"http://{host}:{web_port}"
    assert http(f"{web}/healthz") == (200, '{"ok": true}')
    # `kubectl exec ... speedysvc status`: the CLI in the container, over loopback
    status = m.cli("status")
    assert status.returncode == 0 and "Greeter" in status.stdout, status.stdout + status.stderr
    assert http(f"{web}/readyz") == (200, '{"ready": true}')
    status, body = http(f"{web}/metrics", env[SECRET_ENV_WEB])
    assert status == 200 and 'speedysvc_workers{service="Greeter"}' in body
    if host != "127.0.0.1":   # another host without the token is refused (the scrape job sends it)
        assert http(f"{web}/metrics")[0] == 401
    with connect(Greeter, f"tcp://{host}:{tcp_port}", secret=env[SECRET_ENV_TCP], timeout=10) as client:
        assert client.greet("Kubernetes") == "Hello, Kubernetes!"
    with connect(Greeter, f"tcp://{host}:{tcp_port}", secret="not-the-secret", timeout=10) as client:
        with pytest.raises(AuthenticationFailed):
            client.greet("x")
    assert m.stop() == 0


def test_the_same_pod_application_calls_over_shared_memory(example):
    folder, start, _, _ = example
    spec = one("Deployment", "greeter-app")["spec"]["template"]["spec"]
    (app,) = spec["containers"]
    start(spec)
    app_port = free_port()
    # the port app.py listens on unless told (the manifest does not tell it) is the probes'
    default = re.search(r'"APP_PORT", "(\d+)"', (folder / "app.py").read_text())
    for probe in (app["readinessProbe"], app["livenessProbe"]):
        assert container_port(app, probe["httpGet"]["port"]) == int(default.group(1))
    assert "APP_PORT" not in env_of(app)
    command = [sys.executable if w == "python" else w for w in app["command"]]
    command[-1] = str(folder / os.path.basename(command[-1]))
    proc = subprocess.Popen(command, cwd=str(folder), env={**manager_env(), **env_of(app), "APP_PORT": str(app_port)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{app_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                status = http(url + app["readinessProbe"]["httpGet"]["path"])
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    pytest.fail(f"app.py exited with {proc.returncode}: {proc.communicate()[0]}")
                assert time.monotonic() < deadline, "app.py did not listen within 30 s"
                time.sleep(0.1)
        assert status == (200, "ready")
        assert http(url + app["livenessProbe"]["httpGet"]["path"]) == (200, "ok")
        assert http(url + "/greet?name=Ada") == (200, "Hello, Ada!")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def in_user_namespace(uid):
    """A command prefix that runs a program as ``uid`` in a user namespace of its own (this
    user mapped to it), where the system has no name for that uid; None if it cannot be made."""
    prefix = ["unshare", "--user", f"--map-user={uid}", f"--map-group={uid}"]
    if not shutil.which("unshare"):
        return None
    try:
        probe = subprocess.run(prefix + ["id", "-u"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if probe.returncode == 0 and probe.stdout.strip() == str(uid) else None


def test_the_manager_runs_under_a_uid_without_a_name(example):
    """Kubernetes runs a container under any runAsUser, listed in the image's /etc/passwd or not
    (an arbitrary uid, as some clusters assign): the manager serves all the same."""
    folder, _, tcp_port, web_port = example
    uid = 54321
    try:
        pwd.getpwuid(uid)
        pytest.skip(f"uid {uid} has a name here")
    except KeyError:
        pass
    prefix = in_user_namespace(uid)
    if prefix is None:
        pytest.skip("cannot make a user namespace (unshare --user --map-user)")
    env = env_of(manager_container(one("Deployment", "greeter")["spec"]["template"]["spec"]))
    # no variable names the user, as in a container: the name would come from the passwd database
    clean = {k: v for k, v in manager_env().items() if k not in ("USER", "LOGNAME", "LNAME", "USERNAME")}
    cmd = image_cmd()
    log = folder / "manager.out"
    out = open(log, "w")   # (read through another file: the manager shares this one's offset)
    proc = subprocess.Popen(prefix + [sys.executable, "-m", "speedysvc.cli", *cmd[1:-1], str(folder / "service.ini")],
                            cwd=str(folder), env={**clean, **env}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http(f"http://127.0.0.1:{web_port}/readyz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None, f"the manager exited with {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the manager was not ready within 60 s: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        with connect(import_greeter(str(folder)), f"tcp://127.0.0.1:{tcp_port}", secret=env[SECRET_ENV_TCP],
                     timeout=10) as client:
            assert client.greet("uid") == "Hello, uid!"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert f"for user uid {uid}" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    # its segments (named after the uid) went with it
    assert not [n for n in os.listdir("/dev/shm") if f".{uid}." in n]
