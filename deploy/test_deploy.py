"""deploy/: the container image built and run under podman, and the Azure ML and Kubernetes files
checked offline with the platforms' own schemas.

`.ci/run` installs what these tests need (podman, runc, debootstrap; azure-ai-ml in a venv and the npm
packages kubernetes-models and yaml under deploy/.tools/). Each test skips, saying why, only when its
tool is missing. No container registry is needed: the base image is built here with debootstrap from
the Debian mirror apt uses, and passed to deploy/Dockerfile as BASE_IMAGE.

Environment overrides: AZMLINFSRV_BASE_IMAGE (a base image to use instead of building one),
AZMLINFSRV_PODMAN_RUNTIME (default runc when installed), AZMLINFSRV_DEPLOY_TOOLS (default deploy/.tools),
AZMLINFSRV_DEPLOY_REQUIRED=1 (fail instead of skip; .ci/run sets it).
"""
import http.client
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
TOOLS = Path(os.environ.get("AZMLINFSRV_DEPLOY_TOOLS") or DEPLOY / ".tools")
IMAGE = "localhost/azmlinfsrv:test"
DERIVED_IMAGE = "localhost/azmlinfsrv-derived-example:test"
DRAIN_LINE = "Shut down on SIGTERM: %d request(s) in flight finished, telemetry flushed."
UID = 10001  # deploy/Dockerfile's USER, deploy/k8s/deployment.yaml's runAsUser

#: Filled in as the tests run; deploy/conftest.py prints it at the end of the session.
MEASUREMENTS = {}


def _skip(reason):
    """Skip, saying why; .ci/run sets AZMLINFSRV_DEPLOY_REQUIRED=1 so that CI fails instead of skipping."""
    if os.environ.get("AZMLINFSRV_DEPLOY_REQUIRED") == "1":
        pytest.fail("AZMLINFSRV_DEPLOY_REQUIRED=1 but: " + reason, pytrace=False)
    pytest.skip(reason)


# ==== podman: the command, the base image, the image =============================================

def _podman_cmd():
    runtime = os.environ.get("AZMLINFSRV_PODMAN_RUNTIME")
    if runtime is None:
        runtime = "runc" if shutil.which("runc") else ""
    return ["podman"] + (["--runtime", runtime] if runtime else [])


def podman(*args, check=True, timeout=300, **kwargs):
    proc = subprocess.run(_podman_cmd() + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError("podman %s failed (%d):\n%s%s" % (" ".join(args), proc.returncode,
                                                               proc.stdout, proc.stderr))
    return proc


def _ulimits():
    # Explicit limits no higher than this process's own: runc cannot raise them and fails otherwise.
    flags = []
    for name, limit, cap in (("nofile", resource.RLIMIT_NOFILE, 8192), ("nproc", resource.RLIMIT_NPROC, 4096)):
        soft, hard = resource.getrlimit(limit)
        value = min(v for v in (soft, hard, cap) if v != resource.RLIM_INFINITY)
        flags += ["--ulimit", "%s=%d:%d" % (name, value, value)]
    return flags


_PODMAN_PROBLEM = []


def _podman_problem():
    """Why podman cannot run here, or None."""
    if not _PODMAN_PROBLEM:
        if not shutil.which("podman"):
            _PODMAN_PROBLEM.append("podman is not installed (.ci/run installs it with apt-get)")
        else:
            try:
                proc = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
                _PODMAN_PROBLEM.append(None if proc.returncode == 0 else
                                       "podman cannot run here: " + proc.stderr.strip()[-300:])
            except (OSError, subprocess.TimeoutExpired) as exc:
                _PODMAN_PROBLEM.append("podman cannot run here: %s" % exc)
    return _PODMAN_PROBLEM[0]


def _apt_source():
    """(suite, mirror) of the Debian archive apt is configured with, for debootstrap."""
    release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    match = re.search(r"^VERSION_CODENAME=\"?(\w+)", release, re.M)
    suite = match.group(1) if match else None
    entries = []  # (uris, suites) from one-line and deb822 sources
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append(([words[1]], [words[2]]))
    folder = Path("/etc/apt/sources.list.d")
    for path in sorted(folder.glob("*.sources")) if folder.is_dir() else ():
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                entries.append((fields.get("URIs", "").split(), fields.get("Suites", "").split()))
    for uris, suites in entries:
        if uris and (suite in suites if suite else suites):
            return suite or suites[0], uris[0]
    return None, None


@pytest.fixture(scope="session")
def base_image():
    """A local stand-in for python:3.12-slim: Debian minbase with python3 and pip (no registry here)."""
    problem = _podman_problem()
    if problem:
        _skip(problem)
    if os.environ.get("AZMLINFSRV_BASE_IMAGE"):
        return os.environ["AZMLINFSRV_BASE_IMAGE"]
    suite, mirror = _apt_source()
    if not suite:
        _skip("no Debian suite and mirror found in /etc/apt to build a base image from; "
                    "set AZMLINFSRV_BASE_IMAGE")
    tag = "localhost/azmlinfsrv-base:%s" % suite
    if podman("image", "exists", tag, check=False).returncode == 0:
        MEASUREMENTS["base image"] = "%s (cached)" % tag
        return tag
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        _skip("no base image: building one needs debootstrap and root (.ci/run installs it); "
                    "or set AZMLINFSRV_BASE_IMAGE")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="azmlinfsrv-rootfs-") as rootfs:
        proc = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-pip",
                               suite, rootfs, mirror], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=1200)
        assert proc.returncode == 0, "debootstrap failed:\n" + proc.stdout[-3000:]
        # Drop what a slim image drops; PIP_BREAK_SYSTEM_PACKAGES makes Debian's pip install into the
        # image's Python as the official python images' pip does.
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "--exclude=./var/cache/apt/archives/*.deb",
                                "--exclude=./var/lib/apt/lists/*", "--exclude=./usr/share/doc",
                                "--exclude=./usr/share/man", "--exclude=./usr/share/locale", "."],
                               stdout=subprocess.PIPE)
        try:
            podman("import", "--change", "ENV=PIP_BREAK_SYSTEM_PACKAGES=1", "-", tag, stdin=tar.stdout)
        finally:
            tar.stdout.close()
            assert tar.wait() == 0
    MEASUREMENTS["base image"] = "%s (debootstrap %s from %s: %.0f s)" % (tag, suite, mirror,
                                                                        time.monotonic() - started)
    return tag


def _size(tag):
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def _build(tag, context, *args):
    started = time.monotonic()
    # --format docker keeps HEALTHCHECK (the OCI format has no such field).
    podman("build", "--format", "docker", "--network", "host", *_ulimits(), "-t", tag, *args, str(context),
           timeout=900)
    return time.monotonic() - started, _size(tag)


@pytest.fixture(scope="session")
def image(base_image):
    seconds, size = _build(IMAGE, ROOT, "-f", str(DEPLOY / "Dockerfile"), "--build-arg",
                           "BASE_IMAGE=" + base_image)
    MEASUREMENTS["image"] = "%s: %.1f MB (%.0f kB on the base), built in %.1f s" % (
        IMAGE, size / 1e6, (size - _size(base_image)) / 1e3, seconds)
    return IMAGE


# ==== running a container ========================================================================

def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(port, path="/", body=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST" if body is not None else "GET", path, body=body,
                     headers={"Content-Type": "application/json"} if body is not None else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


class Container:
    """One detached container on the host network, answering on a free loopback port."""

    count = 0

    def __init__(self, image, env=None, run_args=()):
        Container.count += 1
        self.name = "azmlinfsrv-test-%d-%d" % (os.getpid(), Container.count)
        self.port = _free_port()
        self.env = dict(env or {}, AZMLINFSRV_PORT=str(self.port), AZMLINFSRV_HOST="127.0.0.1")
        self.image = image
        self.run_args = list(run_args)

    def __enter__(self):
        env_flags = []
        for key, value in self.env.items():
            env_flags += ["-e", "%s=%s" % (key, value)]
        # No health-check timer (it needs systemd); `podman healthcheck run` still runs the check.
        podman("run", "-d", "--name", self.name, "--network", "host", "--health-interval", "disable",
               *_ulimits(), *env_flags, *self.run_args, self.image)
        return self

    def __exit__(self, *exc):
        podman("rm", "-f", "-t", "0", self.name, check=False)

    def logs(self):
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def state(self):
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def wait_until(self, predicate, what, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if not self.state()["Running"]:
                raise AssertionError("container stopped while waiting for %s:\n%s" % (what, self.logs()))
            time.sleep(0.1)
        raise AssertionError("no %s within %d s:\n%s" % (what, timeout, self.logs()))

    def wait_healthy(self):
        def healthy():
            try:
                return _get(self.port, timeout=2) == (200, "Healthy")
            except OSError:
                return False
        self.wait_until(healthy, "GET / Healthy")

    def stop(self, timeout):
        """`podman stop`: SIGTERM, then SIGKILL after ``timeout`` s. Returns (seconds, exit code)."""
        started = time.monotonic()
        podman("stop", "-t", str(timeout), self.name, timeout=timeout + 60)
        elapsed = time.monotonic() - started
        return elapsed, int(podman("wait", self.name).stdout.strip())


# ==== the image, run with mounted folders ========================================================

SCORE = '''
import json, os, time

def init():
    global model
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.json")) as handle:
        model = json.load(handle)

def run(data):
    payload = json.loads(data)
    if payload.get("sleep"):
        print("slow request started", flush=True)
        time.sleep(payload["sleep"])
    return {"prediction": model["weight"] * payload["x"], "uid": os.getuid(), "pid": os.getpid()}
'''


@pytest.fixture
def mounted_app(tmp_path):
    code, model = tmp_path / "code", tmp_path / "model"
    code.mkdir()
    model.mkdir()
    (code / "score.py").write_text(SCORE)
    (model / "model.json").write_text('{"weight": 3.0}')
    for path in (tmp_path, code, model):  # readable by the image's non-root user
        path.chmod(0o755)
    return ["-v", "%s:/code:ro" % code, "-v", "%s:/model:ro" % model]


def test_image_serves_mounted_script_and_drains_on_sigterm(image, mounted_app):
    grace = 10
    env = {"AZUREML_ENTRY_SCRIPT": "/code/score.py", "AZUREML_MODEL_DIR": "/model",
           "AZMLINFSRV_GRACE_PERIOD": str(grace), "WORKER_COUNT": "2"}
    with Container(image, env, mounted_app) as box:
        box.wait_healthy()
        status, body = _get(box.port, "/score", '{"x": 2}')
        assert status == 200, body
        answer = json.loads(body)
        # Non-root, and the server itself is PID 1 (exec-form ENTRYPOINT: it gets SIGTERM directly).
        assert answer == {"prediction": 6.0, "uid": UID, "pid": 1}
        assert podman("healthcheck", "run", box.name, check=False).returncode == 0, box.logs()

        slow = {}

        def slow_request():
            try:
                slow["answer"] = _get(box.port, "/score", '{"x": 1, "sleep": 3}')
            except OSError as exc:
                slow["answer"] = exc
            slow["done"] = time.monotonic()

        client = threading.Thread(target=slow_request)
        client.start()
        box.wait_until(lambda: "slow request started" in box.logs(), "slow request in run()")

        stopped = {}
        stopper = threading.Thread(target=lambda: stopped.update(result=box.stop(timeout=grace + 20)))
        sigterm_at = time.monotonic()
        stopper.start()
        # While the request finishes, the server is draining: GET / answers 503 (probes fail, the
        # platform routes elsewhere).
        seen = set()
        while client.is_alive() and 503 not in seen:
            try:
                seen.add(_get(box.port, timeout=2)[0])
            except OSError:
                pass
            time.sleep(0.05)
        client.join(30)
        stopper.join(grace + 60)
        assert slow["answer"][0] == 200, slow["answer"]
        assert json.loads(slow["answer"][1])["prediction"] == 3.0
        assert 503 in seen, "GET / never answered 503 while draining (saw %s)" % seen
        elapsed, code = stopped["result"]
        assert code == 0, box.logs()  # not 137: the drain finished before podman's SIGKILL
        assert elapsed < grace, "exit %.1f s after SIGTERM, grace period %d s" % (elapsed, grace)
        logs = box.logs()
        assert DRAIN_LINE % 1 in logs, logs
        MEASUREMENTS["SIGTERM to exit"] = ("%.2f s with a 3 s request in flight (%.2f s after that request's "
                                           "answer)" % (elapsed, sigterm_at + elapsed - slow["done"]))


def test_sigterm_during_init_stops_pid_1_at_once(image, tmp_path):
    # The kernel drops SIGTERM for a PID 1 without a handler: without one installed before init(),
    # a container stopped while its model loads would wait for SIGKILL (exit 137).
    (tmp_path / "score.py").write_text("import time\n\ndef init():\n    print('init started', flush=True)\n"
                                       "    time.sleep(60)\n\ndef run(data):\n    return data\n")
    tmp_path.chmod(0o755)
    with Container(image, {"AZUREML_ENTRY_SCRIPT": "/code/score.py"},
                   ["-v", "%s:/code:ro" % tmp_path]) as box:
        box.wait_until(lambda: "init started" in box.logs(), "init() to start")
        elapsed, code = box.stop(timeout=20)
        assert code == 143, box.logs()
        assert elapsed < 10, elapsed
        assert "SIGTERM before start-up finished" in box.logs()


# ==== the derived image (deploy/examples/derived) ================================================

def _deployment():
    return next(doc for doc in _k8s_documents() if doc["kind"] == "Deployment")


def test_derived_image_with_requirements_layer(image):
    seconds, size = _build(DERIVED_IMAGE, DEPLOY / "examples" / "derived", "--build-arg",
                           "AZMLINFSRV_IMAGE=" + image)
    MEASUREMENTS["derived image"] = "%s: %.1f MB, built in %.1f s" % (DERIVED_IMAGE, size / 1e6, seconds)
    # Run it as deploy/k8s/deployment.yaml's securityContext does (read-only root, no capabilities),
    # with a health port, and pre-forked: PID 1 is then the parent that stops its workers.
    health_port = _free_port()
    with Container(DERIVED_IMAGE, {"AZMLINFSRV_HEALTH_PORT": str(health_port), "AZMLINFSRV_PROCESSES": "2"},
                   ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]) as box:
        box.wait_healthy()
        assert _get(box.port, "/score", '{"x": 3}') == (200, '{"prediction": 7.0}')
        assert _get(health_port) == (200, "Healthy")
        assert _get(health_port, "/score", '{"x": 3}')[0] == 404  # the health port answers only GET /
        assert podman("healthcheck", "run", box.name, check=False).returncode == 0, box.logs()
        elapsed, code = box.stop(timeout=30)
        logs = box.logs()
        assert code == 0, logs
        assert logs.count(DRAIN_LINE % 0) == 2 and "All 2 worker processes stopped." in logs, logs
        assert elapsed < 5, elapsed


def test_k8s_prestop_command_runs_in_the_image(image):
    """The preStop hook of deployment.yaml needs only what the image has (Python, no sleep binary)."""
    command = _deployment()["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    started = time.monotonic()
    proc = podman("run", "--rm", "--network", "host", *_ulimits(), "--entrypoint", command[0], image,
                  *command[1:], check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    MEASUREMENTS["preStop"] = "%.1f s" % (time.monotonic() - started)


# ==== Azure ML: the SDK's own loader, offline ====================================================

AML_LOAD = r'''
import json, sys
from azure.ai.ml import load_environment, load_online_deployment, load_online_endpoint
folder = sys.argv[1]
env = load_environment(folder + "/environment.yml")
dep = load_online_deployment(folder + "/deployment.yml")
end = load_online_endpoint(folder + "/endpoint.yml")
probe = lambda p: {k: getattr(p, k) for k in ("initial_delay", "period", "timeout", "success_threshold",
                                              "failure_threshold")}
print(json.dumps({
    "endpoint": end.name,
    "environment": {"name": env.name, "version": env.version, "image": env.image,
                    "inference_config": env.inference_config.as_dict()},
    "deployment": {"endpoint_name": dep.endpoint_name, "environment": str(dep.environment),
                   "environment_variables": dep.environment_variables,
                   "request_timeout_ms": dep.request_settings.request_timeout_ms,
                   "max_concurrent": dep.request_settings.max_concurrent_requests_per_instance,
                   "liveness": probe(dep.liveness_probe), "readiness": probe(dep.readiness_probe),
                   "code": str(dep.code_configuration.code), "model_path": str(dep.model.path)},
}))
'''


def _aml_python():
    python = os.environ.get("AZMLINFSRV_AML_PYTHON") or str(TOOLS / "aml-venv" / "bin" / "python")
    if not os.path.exists(python):
        _skip("azure-ai-ml is not installed (.ci/run installs it in %s)" % (TOOLS / "aml-venv"))
    return python


def _aml_load(folder):
    return subprocess.run([_aml_python(), "-c", AML_LOAD, str(folder)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


def test_azureml_yaml_loads_with_the_sdk_and_fits_our_server():
    proc = _aml_load(DEPLOY / "azureml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    aml = json.loads(proc.stdout)
    env, dep = aml["environment"], aml["deployment"]
    routes = env["inference_config"]
    assert routes["livenessRoute"] == routes["readinessRoute"] == {"port": 5001, "path": "/"}
    assert routes["scoringRoute"] == {"port": 5001, "path": "/score"}
    assert dep["endpoint_name"] == aml["endpoint"]
    assert dep["environment"] == "%s:%s" % (env["name"], env["version"])  # the loader drops "azureml:"
    variables = dep["environment_variables"]
    # Our timeout answer comes before the platform's; the drain waits as long as a request may take.
    assert int(variables["SCORING_TIMEOUT_MS"]) < dep["request_timeout_ms"]
    assert float(variables["AZMLINFSRV_GRACE_PERIOD"]) * 1000 >= dep["request_timeout_ms"]
    assert dep["max_concurrent"] >= int(variables["WORKER_COUNT"])
    live, ready = dep["liveness"], dep["readiness"]
    assert live["initial_delay"] + live["period"] * live["failure_threshold"] >= 300  # time for init()
    assert ready["period"] * ready["failure_threshold"] <= 10  # a draining instance leaves soon
    assert (DEPLOY / "azureml" / dep["code"] / "score.py").is_file()  # paths relative to the YAML
    assert (DEPLOY / "azureml" / dep["model_path"]).is_dir()


def test_azureml_loader_rejects_a_misspelt_field(tmp_path):
    for name in ("endpoint.yml", "environment.yml", "deployment.yml"):
        text = (DEPLOY / "azureml" / name).read_text()
        if name == "deployment.yml":
            text = text.replace("failure_threshold: 30", "failur_threshold: 30")
            text = text.replace("../examples", str(DEPLOY / "examples"))
        (tmp_path / name).write_text(text)
    proc = _aml_load(tmp_path)
    assert proc.returncode != 0
    assert "failur_threshold" in proc.stderr and "Unknown field" in proc.stderr


# ==== Kubernetes: the API schema, offline ========================================================

def _node_path():
    node = shutil.which("node")
    modules = TOOLS / "node_modules"
    if not node or not (modules / "kubernetes-models").is_dir() or not (modules / "yaml").is_dir():
        _skip("node or the npm packages kubernetes-models and yaml are not installed "
                    "(.ci/run installs them in %s)" % modules)
    return node, modules


def _validate(*files):
    node, modules = _node_path()
    return subprocess.run([node, str(DEPLOY / "k8s" / "validate.js")] + [str(f) for f in files],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          env=dict(os.environ, NODE_PATH=str(modules)), timeout=120)


def _k8s_documents():
    proc = _validate(*sorted((DEPLOY / "k8s").glob("*.yaml")))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_k8s_manifests_match_the_api_schema_and_our_server():
    docs = {doc["kind"]: doc for doc in _k8s_documents()}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    pod = docs["Deployment"]["spec"]["template"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": int(env["AZMLINFSRV_PORT"]), "health": int(env["AZMLINFSRV_HEALTH_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/"
        assert container[probe]["httpGet"]["port"] in ports
    assert container["readinessProbe"]["httpGet"]["port"] == "http"  # the serving port's own state
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # time for init()
    # SIGKILL only after preStop, the whole drain and a margin.
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "python3"
    pre_stop = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", command[-1]).group(1))
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + float(env["AZMLINFSRV_GRACE_PERIOD"]) + 5
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == UID
    assert "cpu" in container["resources"]["requests"]
    labels = pod["metadata"]["labels"]
    service = docs["Service"]["spec"]
    assert service["selector"] == labels
    assert all(port["targetPort"] in ports for port in service["ports"])
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": docs["Deployment"]["metadata"]["name"]}
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == labels


def test_k8s_validator_rejects_unknown_fields_and_wrong_types(tmp_path):
    text = (DEPLOY / "k8s" / "deployment.yaml").read_text()
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(text.replace("livenessProbe:", "livenesProbe:"))
    proc = _validate(misspelt)
    assert proc.returncode == 1
    assert "unknown field .spec.template.spec.containers[0].livenesProbe" in proc.stderr
    wrong_type = tmp_path / "wrong_type.yaml"
    wrong_type.write_text(text.replace("terminationGracePeriodSeconds: 45", 'terminationGracePeriodSeconds: "45"'))
    proc = _validate(wrong_type)
    assert proc.returncode == 1 and "terminationGracePeriodSeconds must be integer" in proc.stderr


def test_dockerfile_agrees_with_the_manifests():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER %d:%d$" % (UID, UID), dockerfile, re.M)
    assert re.search(r"^EXPOSE 5001$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["python3", "-m", "azmlinfsrv"\]$', dockerfile, re.M)  # exec form
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", dockerfile, re.M)
