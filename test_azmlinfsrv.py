"""Tests for azmlinfsrv: the real server on free loopback ports, real HTTP.

Every test starts a server and speaks HTTP to it; no mocks stand in for the server. There is one launcher,
``ServerProcess`` (the CLI in a subprocess; ``run_cli`` runs it to completion), and one environment for
every server a test starts, ``server_env()``; in-process tests use ``azmlinfsrv.serve`` through the
``served`` fixture, with os.environ cleared the same way. A server's output is read once the line looked
for has been waited for (``wait_output``), or once the server has exited.

Sections, in file order (grouped by behaviour, in the order a request meets it):
  - Helpers: write scripts, start servers, speak HTTP; then the shared scripts and fixtures
  - Routes and routing: the route table, Allow, OPTIONS, paths as the reference matches them
  - Calling run(): its arguments for each kind of run()
  - Responses: return values, AMLResponse and the werkzeug Response/Request API, error locations
  - Framing no script can break: bodyless statuses, connection headers
  - Headers: request ids, TraceId, server version, CORS
  - Start-up: configuration, the reference's environment, banner and messages, exit codes, logs
  - inference-schema and swagger.json
  - Hostile and slow clients, overload, timeouts, shutdown
  - Bounded resources: idle connections without threads, arrival order, the body budget, stuck run()
  - Pre-fork processes
  - App Insights telemetry
  - The developer loop: reload, --check, serve(), /metrics, helps, debugging
  - Deployment files and endpoint emulation: --deployment, --emulate_endpoint, drift
  - Drop-in checks against real scripts: what the reference's black-box tests and azureml-examples rely on
  - The docs: README.md is the short path, docs/ the manual; every setting documented, every link resolves
  - Tracing: W3C trace context, OTLP/HTTP trace export, JSON logs
  - The try page: GET /try in headless Chromium
  - MLflow no-code models: Azure's generated scoring script built in, real models built by the tests
  - Production traffic: no run() and no answer for clients that left; a listening socket per process
"""

import contextlib
import http.client
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import azmlinfsrv

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "azmlinfsrv.py")


# ---------------------------------------------------------------------------
# Helpers: write scripts, start servers, speak HTTP
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write(folder, name, text):
    path = os.path.join(str(folder), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(textwrap.dedent(text))
    return path


class Http:
    """A tiny client: one request per call, new connection each time unless given one."""

    def __init__(self, port, host="127.0.0.1"):
        self.host, self.port = host, port

    def request(self, method, path, body=None, headers=None, timeout=30):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Answer(resp.status, resp.getheaders(), data)
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=b"", **kw):
        return self.request("POST", path, body=body, **kw)


class Answer:
    def __init__(self, status, headers, body):
        self.status = status
        self.header_list = headers
        self.headers = {}
        for name, value in headers:
            self.headers.setdefault(name.lower(), value)
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def text(self):
        return self.body.decode("utf-8")

    def all(self, name):
        return [v for n, v in self.header_list if n.lower() == name.lower()]

    def __repr__(self):
        return "<Answer %s %r>" % (self.status, self.body[:200])


# Variables a developer's shell (or an Azure ML compute) may hold that would point a test's server at
# another script, model or debugger.
_SCRUBBED = ("AZUREML_ENTRY_SCRIPT", "AZUREML_MODEL_DIR", "AZUREML_DEBUG_PORT", "MLFLOW_MODEL_FOLDER")


def server_env(env=None):
    """The one environment every server a test starts gets, whatever starts it (``ServerProcess``,
    ``run_cli``, a bare ``subprocess`` call): this process's, without ``_SCRUBBED``, unbuffered, on
    loopback, on a free port (never the default 5001: a user's server may hold it); the test's ``env`` on top."""
    full_env = dict(os.environ)
    for name in _SCRUBBED:
        full_env.pop(name, None)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["AZMLINFSRV_HOST"] = "127.0.0.1"
    full_env["AZMLINFSRV_PORT"] = str(free_port())
    full_env.update(env or {})
    return full_env


class ServerProcess:
    """The CLI in a subprocess: ``python azmlinfsrv.py --entry_script ... --port ...``, the one launcher.

    Its output is read by a thread (``output``; ``wait_output`` waits for a line). With ``log_file`` the
    output goes to that file instead, as the reference's black-box tests start it, and ``output`` is the
    file as it is at that moment (no reader thread in between). ``python_args`` come before the module
    (``-S``; ``-m debugpy ...``); ``python`` is another interpreter (a venv with a heavier stack).
    Leaving a ``with`` block stops the server (SIGTERM) and reads its output to the end.
    """

    def __init__(self, args, env=None, cwd=None, port=None, wait=True, ready_path="/", python_args=(),
                 log_file=None, python=None, ready_timeout=20):
        self.port = port or free_port()
        cmd = [python or sys.executable] + list(python_args) + [MODULE] + list(args)
        if "--port" not in args:
            cmd += ["--port", str(self.port)]
        full_env = server_env(dict({"AZMLINFSRV_PORT": str(self.port)}, **(env or {})))
        self.log_file = log_file
        sink = open(log_file, "wb") if log_file else subprocess.PIPE
        try:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=sink, stderr=subprocess.STDOUT)
        finally:
            if log_file:
                sink.close()  # the server holds its own copy
        self._output = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.http = Http(self.port)
        if wait:
            self.wait_ready(ready_path, timeout=ready_timeout)

    def _read(self):
        if self.proc.stdout is None:
            return
        for line in iter(self.proc.stdout.readline, b""):
            self._output.append(line.decode("utf-8", "replace"))

    @property
    def output(self):
        if self.log_file:
            with open(self.log_file, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        return "".join(self._output)

    def wait_ready(self, path="/", timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(10)
                raise AssertionError("server exited %s:\n%s" % (self.proc.returncode, self.output))
            try:
                if self.http.get(path, timeout=2).status in (200, 503):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("server not ready:\n" + self.output)

    def wait_exit(self, timeout=20):
        """The exit code, once the process has exited and its output has been read to the end."""
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(10)

    def kill(self):
        """SIGKILL, as the reference's black-box tests end a server."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait_exit(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _LaunchedByDebugpy(ServerProcess):
    """What the README's launch configuration runs: debugpy's launcher around azmlinfsrv.py."""

    def __init__(self, args, cwd, debug_port):
        super().__init__(args, cwd=cwd, wait=False, env={"PYDEVD_DISABLE_FILE_VALIDATION": "1"},
                         python_args=["-m", "debugpy", "--listen", "127.0.0.1:%d" % debug_port,
                                      "--wait-for-client"])


def script_server(folder, text, args=(), **kw):
    """The common case: ``text`` written as folder/score.py, served by ``ServerProcess`` from folder."""
    write(folder, "score.py", text)
    return ServerProcess(["--entry_script", "score.py"] + list(args), cwd=str(folder), **kw)


def wait_output(server, text, timeout=15):
    """Wait until the server's output (read by a thread) contains text, or matches it when it is a regex."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = text.search(server.output) if hasattr(text, "search") else text in server.output
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError("the server never logged %r:\n%s" % (text, server.output))


def wait_until(check, timeout=15.0, interval=0.1):
    """Poll ``check()`` until it returns a true value (returned) or the deadline passes (None)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    return None


def run_cli(args, env=None, cwd=None, timeout=30, python_args=(), python=None):
    """Run the CLI to completion (start-up failures, --check): (exit code, combined output)."""
    proc = subprocess.run([python or sys.executable] + list(python_args) + [MODULE] + list(args), cwd=cwd,
                          env=server_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def raw_exchange(port, data, timeout=5, read_all=True):
    """Send raw bytes, return everything the server sends back until it closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if data:
            sock.sendall(data)
        chunks = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_all:
                break
        return b"".join(chunks)


def exchange(port, data, half_close=False, timeout=5.0):
    """Send raw bytes, read until the server closes: (bytes, seconds to the close or None if it did not)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    start = time.monotonic()
    try:
        if data:
            sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        deadline = start + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return b"".join(chunks), None
            if not chunk:
                return b"".join(chunks), time.monotonic() - start
            chunks.append(chunk)
        return b"".join(chunks), None
    finally:
        sock.close()


def parse_responses(data, head_only=False):
    """Split raw bytes from the server into [(status, headers, body)]; fail if they are not valid HTTP/1.1.

    ``head_only=None``: some answers may be to HEAD requests (no body); told apart by what follows the head.
    """
    answers = []
    rest = data
    while rest:
        end = rest.find(b"\r\n\r\n")
        assert end >= 0, "incomplete response head: %r" % rest[:300]
        lines = rest[:end].decode("latin-1").split("\r\n")
        match = re.match(r"^HTTP/1\.1 ([1-5]\d\d) [\x20-\x7e]+$", lines[0])
        assert match, "bad status line %r" % lines[0]
        status = int(match.group(1))
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep and re.match(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$", name), "bad header line %r" % line
            assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value), "control character in %r" % line
            headers.setdefault(name.lower(), value.strip())
        rest = rest[end + 4:]
        if status < 200:
            answers.append((status, headers, b""))
            continue
        maybe_head = head_only is None and (not rest or rest.startswith(b"HTTP/1.1 "))
        if head_only or maybe_head or status in (204, 304):
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                line_end = rest.find(b"\r\n")
                assert line_end >= 0, "incomplete chunked body"
                size = int(rest[:line_end], 16)
                chunk = rest[line_end + 2:line_end + 2 + size]
                assert len(chunk) == size and rest[line_end + 2 + size:line_end + 4 + size] == b"\r\n"
                rest = rest[line_end + 4 + size:]
                if size == 0:
                    break
                parts.append(chunk)
            body = b"".join(parts)
        else:
            length = int(headers["content-length"])
            assert len(rest) >= length, "body shorter than Content-Length"
            body, rest = rest[:length], rest[length:]
        if status >= 400 and body:
            assert headers.get("content-type") == "application/json", headers
            assert isinstance(json.loads(body.decode("utf-8"))["message"], str)
        answers.append((status, headers, body))
    return answers


def h11_exchange(port, requests):
    """Send requests on one kept-alive connection and parse each answer with h11, a strict client-side
    parser: [(status, [(name, value)], body)]. A framing error anywhere raises h11's ProtocolError."""
    h11 = pytest.importorskip("h11")
    conn = h11.Connection(h11.CLIENT)
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for method, target, body in requests:
            headers = [("Host", "x")] + ([("Content-Length", str(len(body)))] if body else [])
            sock.sendall(conn.send(h11.Request(method=method, target=target, headers=headers)))
            if body:
                sock.sendall(conn.send(h11.Data(data=body)))
            sock.sendall(conn.send(h11.EndOfMessage()))
            status, head, data = None, [], b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    head = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            answers.append((status, head, data))
            if conn.our_state is h11.MUST_CLOSE or conn.their_state in (h11.MUST_CLOSE, h11.CLOSED):
                break
            conn.start_next_cycle()
        # After the last answer the connection must still parse: nothing stray may follow it.
        sock.settimeout(0.3)
        try:
            stray = sock.recv(65536)
        except socket.timeout:
            stray = b""
        if stray:
            conn.receive_data(stray)
            assert conn.next_event() in (h11.NEED_DATA, h11.PAUSED) or False, stray
    return answers


def values(head, name):
    return [v for n, v in head if n.lower() == name]


def post_json(server, value, **kw):
    return server.http.post("/score", json.dumps(value), headers={"Content-Type": "application/json"}, **kw)


def scrape_metric(server, name):
    for line in server.http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def sample(text, name):
    """One unlabelled sample from a /metrics page."""
    match = re.search(r"^%s ([0-9.e+]+)$" % re.escape(name), text, re.M)
    assert match, "%s not in /metrics" % name
    return float(match.group(1))


# Figures the suite measures (printed; also written to $AZMLINFSRV_FIGURES when set).
FIGURES = {}


def record_figure(name, value):
    FIGURES[name] = value
    print("\n[resilience] %s: %s" % (name, value))
    path = os.environ.get("AZMLINFSRV_FIGURES")
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            for key in sorted(FIGURES):
                handle.write("%s: %s\n" % (key, FIGURES[key]))


IKEY = "1b0e8f6c-2d4a-4b7e-9c3f-0a1b2c3d4e5f"


class Collector:
    """A loopback Application Insights ingestion endpoint that decodes and records every upload.

    ``plan`` holds what to answer next, one entry per upload (then 200): a status
    code, ``(status, headers, json_body)``, a callable ``(items) -> that``, or
    ``"hang"`` (hold the upload until ``release`` is set, then drop it).
    """

    def __init__(self, port=0):
        import gzip
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        collector = self
        self.uploads = []  # (path, headers, items, status answered), every attempt
        self.accepted = []  # items answered 200 (or not marked in a 206)
        self.plan = []
        self.release = threading.Event()
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                items = json.loads(body.decode("utf-8"))
                with collector.lock:
                    action = collector.plan.pop(0) if collector.plan else 200
                if callable(action):
                    action = action(items)
                if action == "hang":
                    collector.uploads.append((self.path, dict(self.headers), items, None))
                    collector.release.wait(30)
                    self.close_connection = True
                    return
                status, headers, answer = (action, {}, None) if isinstance(action, int) else action
                errors = (answer or {}).get("errors", []) if status == 206 else []
                with collector.lock:
                    collector.uploads.append((self.path, dict(self.headers), items, status))
                    if status in (200, 206):
                        marked = {e["index"] for e in errors}
                        collector.accepted.extend(i for n, i in enumerate(items) if n not in marked)
                if answer is None:
                    answer = {"itemsReceived": len(items), "itemsAccepted": len(items) if status == 200 else 0,
                              "errors": []}
                data = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://127.0.0.1:%d/v2/track" % self.port

    def items(self, kind=None):
        with self.lock:
            items = list(self.accepted)
        return [i for i in items if kind is None or i["data"]["baseType"] == kind]

    def wait_for(self, predicate, timeout=15):
        """Poll until predicate(accepted items) is truthy; returns its value."""
        value = wait_until(lambda: predicate(self.items()), timeout=timeout, interval=0.05)
        if value:
            return value
        raise AssertionError("collector never saw it; uploads: %r" % [(u[0], u[3], len(u[2])) for u in self.uploads])

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def telemetry_env(collector_or_url, **extra):
    url = collector_or_url if isinstance(collector_or_url, str) else collector_or_url.url
    env = {"AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_INSIGHTS_KEY": IKEY, "AML_APP_INSIGHTS_ENDPOINT": url,
           "AZMLINFSRV_TELEMETRY_FLUSH_SECONDS": "0.2", "HOSTNAME": "container-7", "WORKSPACE_NAME": "ws-1",
           "SERVICE_NAME": "svc-1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class DapClient:
    """The client side of the Debug Adapter Protocol, as VS Code's attach in listen mode speaks it.

    debugpy.connect() in the server connects to the socket this test listens on; messages are
    ``Content-Length: N`` headers and a JSON body, in both directions.
    """

    def __init__(self, sock, timeout=30):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.seq = 0
        self.seen = []

    def _read_message(self):
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        length = None
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        assert length is not None, head
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        message = json.loads(body.decode("utf-8"))
        self.seen.append(message)
        return message

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the debuggee closed the DAP connection; seen: %r" % self.seen[-5:])
        self.buffer += chunk

    def wait_for(self, predicate):
        while True:
            message = self._read_message()
            if predicate(message):
                return message

    def send(self, command, **arguments):
        self.seq += 1
        body = json.dumps({"seq": self.seq, "type": "request", "command": command,
                           "arguments": arguments}).encode("utf-8")
        self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return self.seq

    def request(self, command, **arguments):
        seq = self.send(command, **arguments)
        answer = self.wait_for(lambda m: m.get("type") == "response" and m.get("request_seq") == seq)
        assert answer["success"], answer
        return answer.get("body", {})

    def event(self, name):
        return self.wait_for(lambda m: m.get("type") == "event" and m.get("event") == name)


# ---------------------------------------------------------------------------
# Shared scripts and fixtures
# ---------------------------------------------------------------------------

HELLO = """
def init():
    pass

def run(data):
    return {"message": "Hello, World!", "data": data}
"""

GATED = """
import os, time
calls = []

def init():
    pass

def run(data):
    # 'wait:NAME' blocks until the test creates the file NAME (the test's gate), then answers.
    calls.append(data)
    if data.startswith("wait:"):
        while not os.path.exists(data[5:]):
            time.sleep(0.005)
    if data == "calls":
        return calls
    return {"data": data[:20], "size": len(data)}
"""


@pytest.fixture
def hello_server(tmp_path):
    with script_server(tmp_path, HELLO) as server:
        yield server


@pytest.fixture
def scrubbed_environ(monkeypatch):
    """For azmlinfsrv.serve in this process: os.environ as ``server_env`` gives it to a subprocess."""
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def served(tmp_path, scrubbed_environ):
    """In-process server factory: served(script_text, **settings) -> azmlinfsrv.serve handle."""
    handles = []

    def start(text, name="score.py", **settings):
        path = write(tmp_path, name, text)
        handle = azmlinfsrv.serve(path, **settings)
        handle.__enter__()
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.__exit__(None, None, None)


def port_of(handle):
    """The port an azmlinfsrv.serve handle listens on."""
    return int(handle.url.rsplit(":", 1)[1])


def http_for(handle):
    return Http(port_of(handle))


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


# ===========================================================================
# Routes and routing: the route table, Allow, OPTIONS, paths as the reference matches them
# ===========================================================================

def test_liveness_probe_answers_healthy(hello_server):
    answer = hello_server.http.get("/")
    assert answer.status == 200
    assert answer.body == b"Healthy"
    assert answer.headers["content-type"].startswith("text/html")


def test_post_on_liveness_probe_is_405_json(hello_server):
    answer = hello_server.http.post("/", b"x")
    assert answer.status == 405
    assert answer.json == {"message": "The method is not allowed for the requested URL."}


def test_score_post_calls_run_with_body_text(hello_server):
    answer = hello_server.http.post("/score", b'{"x": 1}', headers={"Content-Type": "application/json"})
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.json == {"message": "Hello, World!", "data": '{"x": 1}'}


def test_score_options_is_200_empty(hello_server):
    answer = hello_server.http.request("OPTIONS", "/score")
    assert answer.status == 200
    assert answer.body == b""


def test_unknown_path_is_404_json(hello_server):
    answer = hello_server.http.get("/nope")
    assert answer.status == 404
    assert answer.json["message"].startswith("The requested URL was not found on the server.")


def test_swagger_default_version_is_2(hello_server):
    answer = hello_server.http.get("/swagger.json")
    assert answer.status == 200
    assert answer.json["swagger"] == "2.0"


def test_rawhttp_run_gets_head_and_options_but_other_methods_are_405_as_in_the_reference(served):
    server = served("from azureml_inference_server_http.api.aml_request import rawhttp\n"
                    "from azureml_inference_server_http.api.aml_response import AMLResponse\n"
                    "seen = []\ndef init():\n    pass\n@rawhttp\ndef run(request):\n"
                    "    seen.append(request.method)\n    return AMLResponse(','.join(seen), 200)\n")
    http = http_for(server)
    assert http.request("OPTIONS", "/score").body == b"OPTIONS"
    assert http.request("HEAD", "/score").status == 200
    put = http.request("PUT", "/score", body=b"x")
    assert put.status == 405 and put.headers["allow"] == "GET, HEAD, OPTIONS, POST"
    assert http.post("/score", b"x").body == b"OPTIONS,HEAD,POST"  # run() never saw the PUT


@pytest.mark.parametrize("method,path,allow", [
    ("PUT", "/", "GET, HEAD, OPTIONS"),
    ("DELETE", "/swagger.json", "GET, HEAD, OPTIONS"),
    ("POST", "/metrics", "GET, HEAD, OPTIONS"),
    ("PUT", "/score", "GET, OPTIONS, POST"),
])
def test_every_405_has_allow_from_the_route_table_and_no_cors(framing_server, method, path, allow):
    answer = framing_server.http.request(method, path, headers={"Origin": "http://a.example"})
    assert answer.status == 405 and answer.json == {"message": "The method is not allowed for the requested URL."}
    assert answer.all("Allow") == [allow]
    assert "access-control-allow-origin" not in answer.headers  # as the reference: routing errors carry no CORS


def test_head_on_an_undecorated_score_is_the_scripts_405_with_cors(framing_server):
    answer = framing_server.http.request("HEAD", "/score", headers={"Origin": "http://a.example"})
    assert answer.status == 405 and answer.headers["allow"] == "GET, OPTIONS, POST"
    assert answer.headers["access-control-allow-origin"] == "http://a.example"


def test_options_and_head_on_score_are_answered_without_waiting_for_a_worker(served, tmp_path):
    # They never call run() (an undecorated run() takes GET and POST): a CORS preflight must not get
    # the 503 of a full queue, nor wait in the admission line behind requests with bodies.
    gate = str(tmp_path / "gate")
    server = served(GATED, worker_count=1, max_queue=0)
    port = port_of(server)
    http = http_for(server)
    busy = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        body = ("wait:" + gate).encode()
        busy.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: server.app.pool.busy == 1, timeout=5)
        assert http.post("/score", b"queued").status == 503  # the queue is full indeed
        preflight = http.request("OPTIONS", "/score", headers={"Origin": "http://a",
                                                              "Access-Control-Request-Method": "POST"})
        assert preflight.status == 200
        assert http.request("HEAD", "/score").status == 405
        open(gate, "w").close()
        assert busy.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        open(gate, "w").close()
        busy.close()


@pytest.mark.parametrize("path", ["/", "/swagger.json"])
def test_options_is_200_with_allow_and_cors_as_the_reference(framing_server, path):
    answer = framing_server.http.request("OPTIONS", path, headers={"Origin": "http://a.example"})
    assert answer.status == 200 and answer.body == b""
    assert answer.headers["allow"] == "GET, HEAD, OPTIONS"
    assert answer.headers["access-control-allow-origin"] == "http://a.example"
    assert answer.headers["content-type"] == "text/html; charset=utf-8"


def test_a_scripts_own_404_carries_cors_headers(framing_server):
    answer = framing_server.http.post("/score", b"404", headers={"Origin": "http://a.example"})
    assert answer.status == 404 and answer.body == b"no such item"
    assert answer.headers["access-control-allow-origin"] == "http://a.example"
    unknown = framing_server.http.get("/nothing-here", headers={"Origin": "http://a.example"})
    assert unknown.status == 404 and "access-control-allow-origin" not in unknown.headers


@pytest.mark.parametrize("target", ["//score", "///score", "/%73core", "/%2Fscore", "/score?x=1#fragment"])
def test_paths_reach_the_route_the_reference_matches(framing_server, target):
    answers = h11_exchange(framing_server.port, [("POST", target, b"hi")])
    assert answers[0][0] == 200 and json.loads(answers[0][2]) == {"data": "hi"}


@pytest.mark.parametrize("target", ["/score/", "/%2e/score", "/Score"])
def test_other_paths_are_404_as_in_the_reference(framing_server, target):
    assert framing_server.http.post(target, b"hi").status == 404


# ===========================================================================
# Calling run(): its arguments for each kind of run()
# ===========================================================================

def test_rawhttp_request_stream_is_one_stream_read_in_chunks(served):
    # werkzeug's request.stream is one object: reading it in a loop reaches the end (a fresh stream per
    # access looped forever), and environ["wsgi.input"] is that same stream.
    server = served("from azureml_inference_server_http.api.aml_request import rawhttp\n"
                    "def init(): pass\n@rawhttp\ndef run(request):\n    parts = []\n"
                    "    for _ in range(100):\n        chunk = request.stream.read(3)\n"
                    "        if not chunk:\n            break\n        parts.append(chunk.decode())\n"
                    "    return {'parts': parts, 'same': request.environ['wsgi.input'] is request.stream}\n")
    answer = http_for(server).post("/score", b"abcdefgh")
    assert answer.status == 200 and answer.json == {"parts": ["abc", "def", "gh"], "same": True}


def test_empty_post_body_is_empty_string(hello_server):
    assert hello_server.http.post("/score", b"").json["data"] == ""


def test_non_utf8_body_gets_400(hello_server):
    answer = hello_server.http.post("/score", b"\xff\xfe\xfa")
    assert answer.status == 400
    assert answer.json["message"].startswith("Input cannot be decoded as UTF-8")
    assert hello_server.http.post("/score", b"ok").status == 200


def test_form_urlencoded_body_is_passed_verbatim(hello_server):
    answer = hello_server.http.post("/score", b"a=1&b=2",
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.json["data"] == "a=1&b=2"


def test_get_query_becomes_json_text(hello_server):
    answer = hello_server.http.get("/score?a=1&b=x&a=2&c=[1,2]")
    assert json.loads(answer.json["data"]) == {"a": [1, 2], "b": "x", "c": [1, 2]}


def test_get_without_query_is_empty_object_text(hello_server):
    assert hello_server.http.get("/score").json["data"] == "{}"


def test_run_with_request_headers_gets_title_case_dict(served):
    handle = served("""
        def init(): pass
        def run(data, request_headers):
            return {"h": request_headers.get("X-Custom-Thing"), "ct": request_headers.get("Content-Type")}
    """)
    status, _, body = handle.request("POST", "/score", "{}", {"x-custom-thing": "v1",
                                                               "content-type": "application/json"})
    assert status == 200
    assert body == {"h": "v1", "ct": "application/json"}


RAW = """
from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

def init(): pass

@rawhttp
def run(request):
    if request.method == "OPTIONS":
        return AMLResponse("opts", 200)
    return {
        "method": request.method, "path": request.path, "full_path": request.full_path,
        "args": request.args.to_dict(flat=False), "data": request.get_data(as_text=True),
        "json": request.get_json(silent=True), "is_json": request.is_json,
        "content_type": request.content_type, "mimetype": request.mimetype,
        "header": request.headers.get("x-thing"), "url": request.url,
        "env_id": request.environ.get("HTTP_X_MS_REQUEST_ID"),
        "form": request.form.to_dict(),
        "files": {k: [f.filename, f.content_type, f.read().decode()] for k, f in request.files.items()},
        "stream": request.stream.read().decode("utf-8", "replace")[:20],
    }
"""


def test_rawhttp_run_gets_request_object(served):
    handle = served(RAW)
    status, headers, body = handle.request("POST", "/score?a=1&a=2&b=3", '{"k": [1]}',
                                           {"Content-Type": "application/json", "X-Thing": "yes",
                                            "x-ms-request-id": "rid-1"})
    assert status == 200
    assert body["method"] == "POST"
    assert body["path"] == "/score"
    assert body["full_path"] == "/score?a=1&a=2&b=3"
    assert body["args"] == {"a": ["1", "2"], "b": ["3"]}
    assert body["json"] == {"k": [1]} and body["is_json"] is True
    assert body["header"] == "yes"
    assert body["env_id"] == "rid-1"
    assert body["url"].endswith("/score?a=1&a=2&b=3")


def test_rawhttp_full_path_has_question_mark_without_query(served):
    handle = served(RAW)
    assert handle.request("GET", "/score")[2]["full_path"] == "/score?"


def test_rawhttp_options_reaches_run(served):
    handle = served(RAW)
    status, _, body = handle.request("OPTIONS", "/score")
    assert status == 200 and body == b"opts"


def test_rawhttp_multipart_files_and_form(served):
    handle = served(RAW)
    boundary = "XyZ123"
    body = ("--%s\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\nvalue1\r\n"
            "--%s\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"a.txt\"\r\n"
            "Content-Type: text/plain\r\n\r\nfile contents\r\n--%s--\r\n" % (boundary, boundary, boundary))
    status, _, data = handle.request("POST", "/score", body.encode(),
                                     {"Content-Type": "multipart/form-data; boundary=" + boundary})
    assert status == 200
    assert data["form"] == {"field": "value1"}
    assert data["files"] == {"upload": ["a.txt", "text/plain", "file contents"]}


def test_legacy_contrib_services_imports_work(served):
    handle = served("""
        from azureml.contrib.services.aml_request import AMLRequest, rawhttp
        from azureml.contrib.services.aml_response import AMLResponse
        def init(): pass
        @rawhttp
        def run(request):
            return AMLResponse(request.get_data()[::-1], 201, {"Content-Type": "text/plain"})
    """)
    status, headers, body = handle.request("POST", "/score", b"abc")
    assert (status, body, headers["content-type"]) == (201, b"cba", "text/plain")


def test_driver_module_run_is_called_with_scripts_init(served, tmp_path):
    write(tmp_path, "real_score.py", """
        STATE = {}
        def init(): STATE["real_init"] = True
        def run(data): return {"from": "driver target", "real_init": STATE.get("real_init", False)}
    """)
    handle = served("""
        import real_score as driver_module
        def init(): driver_module.STATE["driver_init"] = True
        def run(data): return "wrapper run must not be called"
    """, name="driver.py")
    status, _, body = handle.score("x")
    assert status == 200
    assert body == {"from": "driver target", "real_init": False}


def test_large_json_body_round_trips_exactly(served):
    handle = served("""
        import json
        def init(): pass
        def run(data): return json.loads(data)
    """)
    payload = {"rows": [["value-%d" % i] * 10 for i in range(20000)]}  # about 2.5 MB each way
    body = json.dumps(payload)
    answer = http_for(handle).post("/score", body.encode(), headers={"Content-Type": "application/json"})
    assert answer.status == 200
    assert int(answer.headers["content-length"]) == len(answer.body) > 2000000
    assert answer.json == payload


# ===========================================================================
# Responses: return values, AMLResponse and the werkzeug Response/Request API, error locations
# ===========================================================================

def test_amlresponse_headers_take_werkzeug_item_assignment_and_string_status(served):
    # Scripts set headers after building the response (resp.headers["X"] = v, as on a flask Response)
    # and give statuses as "201 CREATED"; both are werkzeug behaviour the reference accepts.
    server = served("from azureml_inference_server_http.api.aml_response import AMLResponse\n"
                    "def init(): pass\ndef run(data):\n"
                    "    resp = AMLResponse('made', '201 CREATED', {'X-Old': '1', 'X-Drop': 'a,b'})\n"
                    "    resp.headers['Access-Control-Allow-Origin'] = '*'\n"
                    "    resp.headers['content-type'] = 'text/plain'\n"
                    "    resp.headers['X-Old'] = '2'\n"
                    "    del resp.headers['x-drop']\n"
                    "    resp.headers.add('X-Added', 3)\n"
                    "    assert 'x-old' in resp.headers and resp.headers.get('X-Missing') is None\n"
                    "    assert resp.headers['X-OLD'] == '2' and resp.headers.getlist('X-Added') == ['3']\n"
                    "    return resp\n")
    answer = http_for(server).post("/score", b"x")
    assert answer.status == 201 and answer.body == b"made"
    assert answer.all("content-type") == ["text/plain"]
    assert answer.headers["access-control-allow-origin"] == "*"
    assert answer.all("x-old") == ["2"] and answer.all("x-drop") == [] and answer.all("x-added") == ["3"]
    assert answer.headers["x-ms-run-function-failed"] == "False"

RESPONSES = """
from azureml_inference_server_http.api.aml_response import AMLResponse
def init(): pass
def run(data):
    kind = data
    if kind == "none": return None
    if kind == "set": return {1, 2}
    if kind == "json_str": return AMLResponse({"a": 1}, 200, json_str=True)
    if kind == "bytes": return AMLResponse(b"\\x00\\x01", 200, {"Content-Type": "application/octet-stream"})
    if kind == "lower": return AMLResponse("x", 200, {"content-type": "text/plain"})
    if kind == "multi": return AMLResponse("x", 200, {"X-Many": "a, b,c"})
    if kind == "fail": return AMLResponse("bad", 503)
    if kind == "none_msg": return AMLResponse(None, 202)
    if kind == "gen":
        def chunks():
            for i in range(3):
                yield "part%d;" % i
        return AMLResponse(chunks(), 200)
    if kind == "str": return "plain"
    return kind
"""


@pytest.fixture
def responses_server(served):
    return served(RESPONSES)


def test_none_return_is_empty_object(responses_server):
    status, headers, body = responses_server.score("none")
    assert (status, body) == (200, {})
    assert headers["x-ms-run-function-failed"] == "False"
    assert float(headers["x-ms-run-fn-exec-ms"]) >= 0


def test_unencodable_return_is_500(responses_server):
    status, headers, body = responses_server.score("set")
    assert status == 500
    assert "message" in body


def test_amlresponse_json_str(responses_server):
    status, headers, body = responses_server.score("json_str")
    assert (status, body, headers["content-type"]) == (200, {"a": 1}, "application/json")


def test_amlresponse_bytes_with_content_type(responses_server):
    status, headers, body = responses_server.score("bytes")
    assert body == b"\x00\x01" and headers["content-type"] == "application/octet-stream"


def test_amlresponse_lower_case_content_type_is_the_only_one(responses_server):
    answer = http_for(responses_server).post("/score", b"lower")
    assert answer.all("Content-Type") == ["text/plain"]  # matched case-insensitively, not duplicated


def test_amlresponse_header_values_split_on_commas(responses_server):
    answer = http_for(responses_server).post("/score", b"multi")
    assert answer.all("X-Many") == ["a", "b", "c"]
    assert answer.headers["content-type"] == "text/html; charset=utf-8"


def test_amlresponse_5xx_sets_run_function_failed(responses_server):
    status, headers, body = responses_server.score("fail")
    assert status == 503 and headers["x-ms-run-function-failed"] == "True"


def test_amlresponse_none_message_is_empty_json(responses_server):
    status, headers, body = responses_server.score("none_msg")
    assert (status, body) == (202, {})


def test_generator_body_is_streamed_chunked(responses_server):
    answer = http_for(responses_server).post("/score", b"gen")
    assert answer.status == 200
    assert answer.headers.get("transfer-encoding") == "chunked"
    assert answer.body == b"part0;part1;part2;"


def test_run_raising_gives_reference_message_and_location(served):
    handle = served("""
        def init(): pass
        def helper(x):
            return 1 / x
        def run(data):
            return helper(0)
    """)
    status, headers, body = handle.score("x")
    assert status == 500
    assert headers["x-ms-run-function-failed"] == "True"
    assert body["message"] == "An unexpected error occurred in scoring script. Check the logs for more info."
    error = body["error"]
    assert error["type"] == "ZeroDivisionError"
    assert error["text"] == "division by zero"
    assert error["location"] == {"file": "score.py", "line": 4, "function": "helper", "source": "return 1 / x"}
    assert [f["function"] for f in error["frames"]] == ["run", "helper"]


def test_run_failure_log_names_the_line_and_shows_only_user_frames(tmp_path):
    write(tmp_path, "score.py", """
        def init(): pass
        def run(data):
            return {"y": {"a": 1}[data]}
    """)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        assert server.http.post("/score", b"b").status == 500
        out = wait_output(server, "POST /score 500") and server.output  # the access line follows the error
    assert "run() failed for request" in out and "KeyError: 'b'" in out
    assert "at score.py, line 4, in run" in out
    traceback_text = out[out.index("Traceback (most recent call last):"):]
    assert 'score.py", line 4, in run' in traceback_text
    assert "azmlinfsrv.py" not in traceback_text.split("KeyError")[0]


def test_hide_error_details_keeps_only_message(served):
    handle = served("""
        def init(): pass
        def run(data): raise ValueError("secret")
    """, hide_error_details=True)
    status, _, body = handle.score("x")
    assert status == 500
    assert body == {"message": "An unexpected error occurred in scoring script. Check the logs for more info."}


# The expected values below were read from werkzeug itself (the reference's AMLResponse is a flask
# Response): bench/compare_werkzeug.py, run with the reference's Python, checks the same cases
# attribute by attribute.  Here every one goes through the real server and is asserted on the wire.

WERKZEUG_RESPONSES = r'''
import json
from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

def init(): pass

@rawhttp
def run(request):
    case = request.args["case"]
    resp = AMLResponse(b"\xff\xd8\xff", 200)
    if case == "jpg":               # the Azure sample: the JPEG must not go out as text/html
        resp.mimetype = "image/jpg"
    elif case == "text":
        resp.mimetype = "text/plain"
    elif case == "xml":
        resp.mimetype = "application/xml"
    elif case == "png":
        resp.content_type = "image/png"
    elif case == "params":
        resp.mimetype_params["charset"] = "latin-1"
    elif case == "set_data":
        resp.set_data("h\u00e9llo")
    elif case == "data":
        resp.data = b"12345678"
    elif case == "status_text":
        resp = AMLResponse("made", "201 CREATED")
    elif case == "status_code":
        resp.status_code = 299
    elif case == "status_int":
        resp.status = 418
    elif case == "headers":
        resp.headers.add("Content-Disposition", "attachment", filename="a b.png")
        resp.headers.add("X-Multi", "1")
        resp.headers.add("x-multi", "2")
        resp.headers.setdefault("X-Default", 5)
        resp.headers.setdefault("x-default", 6)
        resp.headers.extend({"X-Ext": ["a", "b"]})
        resp.headers.set("X-Set", "old")
        resp.headers["x-set"] = "new"
        resp.headers.add("X-Gone", "1")
        resp.headers.remove("x-gone")
        resp.headers.add("X-Del", "1")
        del resp.headers["X-DEL"]
    elif case == "cookies":
        resp.set_cookie("sid", "abc", max_age=60, httponly=True, samesite="lax")
        resp.set_cookie("odd", "a b;c", path="/x y", secure=True)
        resp.delete_cookie("old")
    elif case == "stream":
        resp = AMLResponse((c for c in ["a", "b", "c"]), 200)
    elif case == "stream_consumed":
        resp = AMLResponse((c for c in ["a", "b", "c"]), 200)
        resp.data  # werkzeug buffers a generator once its data is read
    elif case == "list":
        resp = AMLResponse(["a", b"b"], 200)
    elif case == "report":
        # what a script reads back, as JSON (headers are reported in order as pairs)
        other = AMLResponse(b"\xff\xd8\xff", 200)
        other.mimetype = "image/jpg"
        gen = AMLResponse((c for c in ["a"]), 200)
        report = {
            "status": resp.status, "status_code": resp.status_code, "mimetype": resp.mimetype,
            "content_type": resp.content_type, "mimetype_params": resp.mimetype_params,
            "content_length": resp.content_length, "charset": resp.charset, "is_json": resp.is_json,
            "headers": resp.headers.to_wsgi_list(), "get": resp.headers.get("CONTENT-TYPE"),
            "in": "content-length" in resp.headers, "keys": list(resp.headers.keys()),
            "jpg": [other.mimetype, other.content_type, other.mimetype_params],
            "gen": [gen.is_streamed, gen.content_length],
            "json": AMLResponse({"a": 1}, 200, json_str=True).json,
            "none": [AMLResponse(None, 202).data.decode(), AMLResponse(None, 202).status],
            "teapot": AMLResponse("", 418).status, "unknown": AMLResponse("", 299).status,
        }
        resp = AMLResponse(report, 200, json_str=True)
    return resp
'''


@pytest.fixture
def werkzeug_responses(served):
    return http_for(served(WERKZEUG_RESPONSES))


@pytest.mark.parametrize("case, content_type", [
    ("jpg", "image/jpg"),
    ("text", "text/plain; charset=utf-8"),
    ("xml", "application/xml; charset=utf-8"),
    ("png", "image/png"),
    ("params", "text/html; charset=latin-1"),
])
def test_amlresponse_mimetype_and_content_type_setters_set_the_wire_content_type(werkzeug_responses, case,
                                                                                 content_type):
    answer = werkzeug_responses.get("/score?case=" + case)
    assert answer.status == 200 and answer.body == b"\xff\xd8\xff"
    assert answer.all("Content-Type") == [content_type]


def test_amlresponse_getters_read_as_werkzeug_gives_them(werkzeug_responses):
    report = werkzeug_responses.get("/score?case=report").json
    assert report["status"] == "200 OK" and report["status_code"] == 200
    assert report["mimetype"] == "text/html" and report["content_type"] == "text/html; charset=utf-8"
    assert report["mimetype_params"] == {"charset": "utf-8"} and report["charset"] == "utf-8"
    assert report["content_length"] == 3 and report["is_json"] is False
    assert report["headers"] == [["Content-Type", "text/html; charset=utf-8"], ["Content-Length", "3"],
                                 ["x-ms-run-function-failed", "False"]]
    assert report["get"] == "text/html; charset=utf-8" and report["in"] is True
    assert report["keys"] == ["Content-Type", "Content-Length", "x-ms-run-function-failed"]
    assert report["jpg"] == ["image/jpg", "image/jpg", {}]
    assert report["gen"] == [True, None]
    assert report["json"] == {"a": 1}
    assert report["none"] == ["{}", "202 ACCEPTED"]
    assert report["teapot"] == "418 I'M A TEAPOT" and report["unknown"] == "299 UNKNOWN"


def test_amlresponse_set_data_and_data_replace_the_body_and_its_length(werkzeug_responses):
    answer = werkzeug_responses.get("/score?case=set_data")
    assert answer.body == "h\u00e9llo".encode("utf-8")
    assert answer.all("Content-Length") == ["6"]
    answer = werkzeug_responses.get("/score?case=data")
    assert answer.body == b"12345678" and answer.all("Content-Length") == ["8"]


@pytest.mark.parametrize("case, status", [("status_text", 201), ("status_code", 299), ("status_int", 418)])
def test_amlresponse_status_and_status_code_set_the_wire_status(werkzeug_responses, case, status):
    answer = werkzeug_responses.get("/score?case=" + case)
    assert answer.status == status


def test_amlresponse_headers_are_werkzeug_headers(werkzeug_responses):
    answer = werkzeug_responses.get("/score?case=headers")
    assert answer.status == 200
    assert answer.all("Content-Disposition") == ['attachment; filename="a b.png"']
    assert answer.all("X-Multi") == ["1", "2"]
    assert answer.all("X-Default") == ["5"]
    assert answer.all("X-Ext") == ["a", "b"]
    assert answer.all("X-Set") == ["new"]
    assert answer.all("X-Gone") == [] and answer.all("X-Del") == []
    assert answer.all("Content-Length") == ["3"]  # the script's copy and ours are one header


def test_amlresponse_cookies_are_written_as_werkzeug_writes_them(werkzeug_responses):
    answer = werkzeug_responses.get("/score?case=cookies")
    cookies = answer.all("Set-Cookie")
    assert len(cookies) == 3
    assert re.fullmatch(r"sid=abc; Expires=\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT; Max-Age=60; HttpOnly; "
                        r"Path=/; SameSite=Lax", cookies[0]), cookies[0]
    assert cookies[1] == 'odd="a b\\073c"; Secure; Path=/x%20y'
    assert cookies[2] == "old=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/"


def test_amlresponse_generator_streams_but_a_list_or_a_read_generator_is_one_body(werkzeug_responses):
    streamed = werkzeug_responses.get("/score?case=stream")
    assert streamed.body == b"abc" and streamed.headers.get("transfer-encoding") == "chunked"
    for case in ("stream_consumed", "list"):
        answer = werkzeug_responses.get("/score?case=" + case)
        assert answer.body == (b"abc" if case == "stream_consumed" else b"ab")
        assert "transfer-encoding" not in answer.headers
        assert answer.all("Content-Length") == [str(len(answer.body))]


def test_werkzeug_attributes_we_lack_fail_naming_the_attribute(served):
    server = served("from azureml_inference_server_http.api.aml_response import AMLResponse\n"
                    "def init(): pass\n"
                    "def run(data):\n"
                    "    resp = AMLResponse('x', 200)\n"
                    "    resp.stashed = 1  # not a werkzeug name: kept, as werkzeug keeps it\n"
                    "    if data == 'get': resp.cache_control.max_age = 5\n"
                    "    if data == 'set': resp.vary = 'Accept'\n"
                    "    if data == 'header': resp.headers['X-A'] = 'a\\r\\nInjected: 1'\n"
                    "    return resp\n")
    http = http_for(server)
    assert http.post("/score", b"fine").status == 200
    for data, name in (("get", "cache_control"), ("set", "vary")):
        answer = http.post("/score", data.encode())
        assert answer.status == 500
        error = answer.json["error"]
        assert error["type"] == "AttributeError"
        assert error["text"].startswith("AMLResponse.%s is not supported by azmlinfsrv" % name)
        assert "supported: " in error["text"] and "mimetype" in error["text"]
        assert error["location"]["file"] == "score.py"
    answer = http.post("/score", b"header")  # werkzeug refuses line breaks in values: run() fails
    assert answer.status == 500 and answer.json["error"]["type"] == "ValueError"
    assert answer.all("Injected") == []


WERKZEUG_REQUEST = r'''
import json
from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

def init(): pass

@rawhttp
def run(request):
    report = {}
    for name in ("method", "path", "full_path", "url", "base_url", "url_root", "host_url", "host",
                 "scheme", "is_secure", "content_type", "mimetype", "mimetype_params", "content_length",
                 "is_json", "remote_addr", "access_route", "root_path", "script_root", "origin", "referrer"):
        report[name] = getattr(request, name)
    report["query_string"] = request.query_string.decode()
    report["args"] = request.args.to_dict(flat=False)
    report["arg_int"] = request.args.get("n", type=int)
    report["cookies"] = dict(request.cookies)
    report["user_agent"] = request.user_agent.string
    auth = request.authorization
    report["auth"] = [auth.type, auth.username, auth.password] if auth else None
    report["header"] = [request.headers.get("x-custom"), "X-CUSTOM" in request.headers]
    report["environ"] = [request.environ["PATH_INFO"], request.environ["QUERY_STRING"]]
    report["stream_first"] = request.stream.read(2).decode()
    report["data_after"] = request.get_data(as_text=True)
    report["stream_after"] = request.stream.read().decode()
    try:
        report["json"] = request.json
    except Exception as exc:
        report["json"] = [type(exc).__name__, getattr(exc, "code", None), str(exc)]
    try:
        request.accept_mimetypes
    except AttributeError as exc:
        report["declined"] = str(exc)
    return AMLResponse(report, 200, json_str=True)
'''


def test_amlrequest_attributes_read_as_werkzeug_gives_them(served):
    http = http_for(served(WERKZEUG_REQUEST))
    answer = http.post("/score?a=1&a=2&n=7&e=%C3%A9", b"hello", headers={
        "Host": "example.com:80", "Content-Type": "Text/Plain; Charset=UTF-8", "User-Agent": "curl/8.0",
        "Cookie": 'a=%41; b="x\\073y"', "Authorization": "Basic dXNlcjpwYXNz", "X-Custom": "v",
        "X-Forwarded-For": "1.2.3.4, 5.6.7.8", "Origin": "http://o.example"})
    assert answer.status == 200, answer
    report = answer.json
    assert report["method"] == "POST"
    assert report["path"] == "/score"
    assert report["full_path"] == "/score?a=1&a=2&n=7&e=%C3%A9"
    assert report["url"] == "http://example.com/score?a=1&a=2&n=7&e=\u00e9"  # an IRI, as werkzeug's
    assert report["base_url"] == "http://example.com/score"
    assert report["url_root"] == report["host_url"] == "http://example.com/"
    assert report["host"] == "example.com"  # werkzeug drops the default port
    assert (report["scheme"], report["is_secure"]) == ("http", False)
    assert report["content_type"] == "Text/Plain; Charset=UTF-8"
    assert (report["mimetype"], report["mimetype_params"]) == ("text/plain", {"charset": "UTF-8"})
    assert (report["content_length"], report["is_json"]) == (5, False)
    assert report["remote_addr"] == "127.0.0.1" and report["access_route"] == ["1.2.3.4", "5.6.7.8"]
    assert (report["root_path"], report["script_root"]) == ("", "")
    assert (report["origin"], report["referrer"]) == ("http://o.example", None)
    assert report["query_string"] == "a=1&a=2&n=7&e=%C3%A9"
    assert report["args"] == {"a": ["1", "2"], "n": ["7"], "e": ["\u00e9"]} and report["arg_int"] == 7
    assert report["cookies"] == {"a": "%41", "b": "x;y"}  # no %-decoding; quoted octal escapes are
    assert report["user_agent"] == "curl/8.0"
    assert report["auth"] == ["basic", "user", "pass"]
    assert report["header"] == ["v", True]
    assert report["environ"] == ["/score", "a=1&a=2&n=7&e=%C3%A9"]
    # one body, read once: what the stream gave is gone from get_data(), and the stream is then at its end
    assert (report["stream_first"], report["data_after"], report["stream_after"]) == ("he", "llo", "")
    # werkzeug's request.json raises 415 on a body that is not JSON (a failure of run() on the reference)
    assert report["json"][:2] == ["BadRequestError", 415] and "application/json" in report["json"][2]
    assert report["declined"].startswith("AMLRequest.accept_mimetypes is not supported by azmlinfsrv")


def test_error_location_in_a_library_is_named_from_its_sys_path_entry(tmp_path):
    # As inference-schema's decorator failing before run() is reached: no frame of the app, so the
    # location is the library's -- named relative to its sys.path entry, not /.../site-packages/...
    lib, app = tmp_path / "lib", tmp_path / "app"
    write(lib, "fakeschema/__init__.py", "")
    write(lib, "fakeschema/decorators.py", """
        import functools, json

        def input_schema(func):
            @functools.wraps(func)
            def wrapper(data):
                return func(json.loads(data))
            return wrapper
    """)
    write(app, "score.py", """
        from fakeschema.decorators import input_schema

        def init(): pass

        @input_schema
        def run(data):
            return {"got": data}
    """)
    env = {"PYTHONPATH": str(lib)}
    with ServerProcess(["--entry_script", "score.py"], cwd=str(app), env=env) as server:
        assert server.http.post("/score", b'{"a": 1}').json == {"got": {"a": 1}}
        answer = server.http.post("/score", b"{bad")
        assert wait_until(lambda: "run() failed for request" in server.output and "JSONDecodeError" in
                          server.output.split("run() failed for request", 1)[1])
        out = server.output
    assert answer.status == 500
    error = answer.json["error"]
    assert error["type"] == "JSONDecodeError"
    assert error["location"]["file"] == "json/decoder.py"  # the stdlib's own sys.path entry
    assert error["frames"] == []  # no frame in the app: run() was never reached
    text = json.dumps(answer.json)
    assert str(tmp_path) not in text and os.path.dirname(json.__file__) not in text
    # the log is for the operator: the summary line names the same relative location, the Python
    # traceback below it keeps the absolute paths an editor can open
    log = out.split("run() failed for request", 1)[1]
    assert "json/decoder.py" in log.splitlines()[0] or "json/decoder.py" in log.splitlines()[1]
    assert os.path.join(str(lib), "fakeschema", "decorators.py") in log


def test_error_frames_of_an_app_library_stay_relative_to_the_app_root(served, tmp_path):
    write(tmp_path, "helpers/parse.py", """
        import json

        def parse(text):
            return json.loads(text)
    """)
    handle = served("""
        import sys, os
        sys.path.insert(0, os.path.dirname(__file__))
        from helpers.parse import parse

        def init(): pass

        def run(data):
            return parse(data)
    """)
    status, _, body = handle.score("{bad")
    assert status == 500
    files = [f["file"] for f in body["error"]["frames"]]
    assert files == ["score.py", "helpers/parse.py"]  # in the app root: relative to it, as before
    assert body["error"]["location"]["file"] == "helpers/parse.py"


def test_amlresponse_body_that_cannot_be_sent_is_a_500_that_says_why(served):
    server = served("from azureml_inference_server_http.api.aml_response import AMLResponse\n"
                    "def init(): pass\n"
                    "def run(data):\n"
                    "    if data == 'int': return AMLResponse(5, 200)\n"
                    "    return AMLResponse(['ok', 7], 200)\n")
    http = http_for(server)
    answer = http.post("/score", b"int")  # caught where the script builds it: its line is the location
    assert answer.status == 500 and answer.json["error"]["type"] == "TypeError"
    assert "not int" in answer.json["error"]["text"] and answer.json["error"]["location"]["line"] == 4
    answer = http.post("/score", b"list")
    assert answer.status == 500 and answer.json["error"]["type"] == "TypeError"
    assert "body chunk of type int" in answer.json["error"]["hint"]
    assert http.post("/score", b"int").status == 500  # the server carries on


def test_inference_schema_rejecting_input_names_its_file_from_site_packages(served):
    pytest.importorskip("inference_schema")
    handle = served("""
        from inference_schema.schema_decorators import input_schema
        from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType

        def init(): pass

        @input_schema("data", StandardPythonParameterType({"a": 1}))
        def run(data):
            return data
    """)
    status, _, body = handle.score({"data": [1, 2]})
    assert status == 500
    assert body["error"]["location"]["file"] == "inference_schema/schema_decorators.py"
    assert body["error"]["frames"] == [] and "site-packages" not in json.dumps(body)


# ===========================================================================
# Framing no script can break: bodyless statuses, connection headers (h11 as a strict client)
# ===========================================================================

FRAMING = """
from azureml_inference_server_http.api.aml_response import AMLResponse

def init():
    pass

def run(data):
    if data == "204-body":
        return AMLResponse("a body a 204 cannot have", 204)
    if data == "304-body":
        return AMLResponse("a body a 304 cannot have", 304)
    if data == "204-stream":
        return AMLResponse(iter([b"chunk one", b"chunk two"]), 204)
    if data == "own-transfer-encoding":
        return AMLResponse("hello", 200, {"Transfer-Encoding": "chunked"})
    if data == "own-content-length":
        return AMLResponse("hello", 200, {"Content-Length": "999"})
    if data == "own-connection-close":
        return AMLResponse("bye", 200, {"Connection": "close"})
    if data == "own-keep-alive-upgrade":
        return AMLResponse("hello", 200, {"Keep-Alive": "timeout=5", "Upgrade": "h2c", "Connection": "Upgrade"})
    if data == "own-date-server":
        resp = AMLResponse("hello", 200)
        resp.headers["Date"] = "Mon, 01 Jan 2024 00:00:00 GMT"
        resp.headers["Server"] = "my-model"
        return resp
    if data == "status-100":
        return AMLResponse("continue?", 100)
    if data == "404":
        return AMLResponse("no such item", 404)
    return {"data": data}
"""


@pytest.fixture(scope="module")
def framing_server(tmp_path_factory):
    with script_server(tmp_path_factory.mktemp("framing"), FRAMING,
                       ["--access_control_allow_origins", "http://a.example"]) as server:
        yield server


@pytest.mark.parametrize("case,status", [("204-body", 204), ("304-body", 304), ("204-stream", 204)])
def test_bodyless_statuses_never_carry_a_body_or_framing(framing_server, case, status):
    answers = h11_exchange(framing_server.port, [("POST", "/score", case.encode()), ("GET", "/", b"")])
    (got, head, body), (next_status, _, next_body) = answers
    assert got == status and body == b""
    assert values(head, "content-length") == [] and values(head, "transfer-encoding") == []
    assert (next_status, next_body) == (200, b"Healthy")
    wait_output(framing_server, "cannot carry a body")


@pytest.mark.parametrize("case", ["own-transfer-encoding", "own-content-length", "own-keep-alive-upgrade"])
def test_a_scripts_framing_and_connection_headers_are_the_servers(framing_server, case):
    answers = h11_exchange(framing_server.port, [("POST", "/score", case.encode()), ("GET", "/", b"")])
    (status, head, body), (next_status, _, next_body) = answers
    assert (status, body) == (200, b"hello")
    assert values(head, "content-length") == ["5"] and values(head, "transfer-encoding") == []
    assert values(head, "keep-alive") == [] and values(head, "upgrade") == []
    assert values(head, "connection") == ["keep-alive"]
    assert (next_status, next_body) == (200, b"Healthy")


def test_a_scripts_connection_close_closes(framing_server):
    answers = h11_exchange(framing_server.port, [("POST", "/score", b"own-connection-close"), ("GET", "/", b"")])
    assert len(answers) == 1
    status, head, body = answers[0]
    assert (status, body) == (200, b"bye") and values(head, "connection") == ["close"]


def test_a_scripts_date_and_server_replace_ours(framing_server):
    (status, head, body), _ = h11_exchange(framing_server.port, [("POST", "/score", b"own-date-server"),
                                                                 ("GET", "/", b"")])
    assert status == 200
    assert values(head, "date") == ["Mon, 01 Jan 2024 00:00:00 GMT"] and values(head, "server") == ["my-model"]


def test_a_1xx_status_as_the_final_answer_is_a_500(framing_server):
    (status, head, body), (next_status, _, _) = h11_exchange(
        framing_server.port, [("POST", "/score", b"status-100"), ("GET", "/", b"")])
    assert status == 500 and json.loads(body)["message"] == "An unexpected internal error occurred. Check the logs for more info."
    assert next_status == 200
    wait_output(framing_server, "a 1xx status is not a final answer")


# ===========================================================================
# Headers: request ids, TraceId, server version, CORS
# ===========================================================================

def test_unknown_path_with_long_request_id_is_404_not_431(hello_server):
    # The reference routes before it checks the ids: an unknown path is a 404 whatever its headers.
    for name in ("x-request-id", "x-ms-client-request-id"):
        answer = hello_server.http.get("/nope", headers={name: "r" * 101})
        assert answer.status == 404 and answer.json["message"].startswith("The requested URL was not found")
    assert hello_server.http.get("/", headers={"x-request-id": "r" * 101}).status == 431


def test_script_header_names_cannot_split_the_header_block(served):
    server = served("from azureml_inference_server_http.api.aml_response import AMLResponse\n"
                    "def init(): pass\ndef run(data):\n"
                    "    return AMLResponse('ok', 200, {'X-A\\r\\nX-Injected': 'v'})\n")
    answer = http_for(server).post("/score", b"x")
    assert answer.status == 200 and answer.body == b"ok"
    assert answer.all("x-injected") == [] and answer.all("x-a--x-injected") == ["v"]


def test_request_id_is_generated_uuid(hello_server):
    answer = hello_server.http.post("/score", b"x")
    rid = answer.headers["x-request-id"]
    assert len(rid) == 36 and rid.count("-") == 4
    assert answer.headers["x-ms-request-id"] == rid
    assert "x-ms-client-request-id" not in answer.headers


def test_request_id_is_echoed(hello_server):
    answer = hello_server.http.post("/score", b"x", headers={"x-request-id": "abc"})
    assert answer.headers["x-request-id"] == "abc"


def test_a_script_cannot_add_its_own_request_ids_however_few_headers_it_sends(served):
    server = served("""
        from azureml_inference_server_http.api.aml_response import AMLResponse
        from azureml_inference_server_http.api.aml_request import rawhttp

        def init():
            pass

        @rawhttp
        def run(request):
            answer = AMLResponse(b"x", 200)
            del answer.headers["Content-Type"]
            del answer.headers["x-ms-run-function-failed"]
            answer.headers["x-request-id"] = "forged"
            return answer
    """)
    reply = server.score(b"x", headers={"x-request-id": "mine"})
    assert reply.status == 200 and reply.body == b"x"
    ids = [(name.lower(), value) for name, value in reply.header_list if name.lower() in
           ("x-request-id", "x-ms-request-id", "x-ms-client-request-id")]
    assert ids == [("x-request-id", "mine"), ("x-ms-request-id", "mine")]


def test_client_request_id_rules(hello_server):
    answer = hello_server.http.post("/score", b"x", headers={"x-ms-client-request-id": "cid"})
    assert answer.headers["x-ms-client-request-id"] == "cid"
    assert answer.headers["x-ms-request-id"] == "cid"
    answer = hello_server.http.post("/score", b"x", headers={"x-ms-request-id": "legacy"})
    assert answer.headers["x-ms-request-id"] == "legacy"
    assert answer.headers["x-ms-client-request-id"] == "legacy"


def test_long_request_id_is_431(hello_server):
    answer = hello_server.http.post("/score", b"x", headers={"x-request-id": "a" * 101})
    assert answer.status == 431
    assert answer.json == {"message": "x-request-id must not exceed 100 characters"}
    answer = hello_server.http.post("/score", b"x", headers={"x-ms-client-request-id": "a" * 101})
    assert answer.status == 431
    assert answer.json == {"message": "x-ms-request-id and x-ms-client-request-id must not exceed 100 characters"}
    assert hello_server.http.post("/score", b"x").status == 200


def test_trace_id_is_echoed_and_the_server_version_header_is_sent_unless_disabled(hello_server, tmp_path):
    answer = hello_server.http.post("/score", b"x", headers={"TraceId": "t-1"})
    assert answer.status == 200 and answer.json == {"message": "Hello, World!", "data": "x"}
    assert answer.headers["traceid"] == "t-1"
    assert answer.headers["x-ms-server-version"] == "azmlinfsrv/" + azmlinfsrv.__version__
    with script_server(tmp_path / "off", HELLO, env={"SERVER_VERSION_LOG_RESPONSE_ENABLED": "false"}) as server:
        answer = server.http.post("/score", b"x", headers={"TraceId": "t-2"})
        assert answer.status == 200 and answer.json == {"message": "Hello, World!", "data": "x"}
        assert answer.headers["traceid"] == "t-2"
        assert "x-ms-server-version" not in answer.headers


def test_cors_allowed_origin_only(tmp_path):
    with script_server(tmp_path, HELLO,
                       ["--access_control_allow_origins", "http://a.example, http://b.example"]) as server:
        ok = server.http.post("/score", b"x", headers={"Origin": "http://b.example"})
        assert ok.headers["access-control-allow-origin"] == "http://b.example"
        other = server.http.post("/score", b"x", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_from_config_file(tmp_path):
    write(tmp_path, "score.py", HELLO)
    write(tmp_path, "config.json", json.dumps({"AML_CORS_ORIGINS": "*"}))
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        answer = server.http.post("/score", b"x", headers={"Origin": "http://any.example"})
        assert answer.headers["access-control-allow-origin"] == "http://any.example"  # flask-cors echoes it
        assert answer.headers["vary"] == "Origin"
        assert server.http.post("/score", b"x").headers["access-control-allow-origin"] == "*"


def test_cors_preflight_lists_methods_and_echoes_headers(tmp_path):
    with script_server(tmp_path, HELLO, ["--access_control_allow_origins", "http://a.example"]) as server:
        answer = server.http.request("OPTIONS", "/score", headers={
            "Origin": "http://a.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-foo"})
        assert answer.status == 200
        assert answer.headers["access-control-allow-origin"] == "http://a.example"
        assert answer.headers["access-control-allow-methods"] == "GET, POST"
        assert answer.headers["access-control-allow-headers"] == "content-type, x-foo"


# ===========================================================================
# Start-up: configuration, the reference's environment, banner and messages, exit codes, logs
# ===========================================================================

def test_no_entry_script_exits_1(tmp_path):
    code, out = run_cli([], cwd=str(tmp_path))
    assert code == 1
    assert "entry script" in out.lower()


@pytest.mark.parametrize("args", [["--port", "0"], ["--port", "70000"], ["--port", "x"],
                                  ["--worker_count", "0"], ["--worker_count", "-2"], ["--bogus"]])
def test_bad_command_line_exits_1(tmp_path, args):
    write(tmp_path, "score.py", HELLO)
    code, out = run_cli(["--entry_script", "score.py"] + args, cwd=str(tmp_path))
    assert code == 1, out
    assert "error" in out.lower()


def test_missing_script_file_exits_3(tmp_path):
    code, out = run_cli(["--entry_script", "nope.py"], cwd=str(tmp_path))
    assert code == 3
    assert "nope.py" in out


@pytest.mark.parametrize("text, expected", [
    pytest.param("def init():\n    pass\n\ndef run(data)\n    return data\n",
                 ["score.py has a syntax error", "at score.py, line 4", "def run(data)"], id="syntax-error"),
    pytest.param("def init():\npass\ndef run(d): return d\n",
                 ["IndentationError", "at score.py, line 2"], id="indentation-error"),
    pytest.param('import json\nCONFIG = json.loads("{broken")\ndef init(): pass\ndef run(data): return data\n',
                 ["JSONDecodeError", "at score.py, line 2", 'CONFIG = json.loads("{broken")'], id="import-raises"),
    pytest.param("import not_a_module_xyz\ndef init(): pass\ndef run(d): return d\n",
                 ["ModuleNotFoundError", "not_a_module_xyz", "at score.py, line 1"], id="missing-module"),
])
def test_script_that_cannot_load_names_file_line_and_cause(tmp_path, text, expected):
    write(tmp_path, "score.py", text)
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(tmp_path))
    assert code == 3, out
    for fragment in expected:
        assert fragment in out, (fragment, out)


@pytest.mark.parametrize("text, message", [
    ("def run(data): return data\n", "does not have a init() function"),
    ("def init(): pass\n", "does not have a run() function"),
    ("def init(): pass\ndef run(*args): return 1\n", "run() cannot accept positional-only arguments, *args, or **kwargs."),
    ("def init(): pass\ndef run(data, **kw): return 1\n", "run() cannot accept positional-only arguments"),
    ("def init(): pass\ndef run(): return 1\n", "run() needs to accept an argument for input data."),
    ("def init(): pass\ndef run(request_headers): return 1\n", 'run() needs to accept an argument other than "request_headers".'),
])
def test_bad_script_shapes_exit_3(tmp_path, text, message):
    write(tmp_path, "score.py", text)
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(tmp_path))
    assert code == 3, out
    assert message in out


def test_bad_run_signature_names_the_file_and_line(tmp_path):
    write(tmp_path, "score.py", "def init(): pass\n\n\ndef run(*args):\n    return 1\n")
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(tmp_path))
    assert code == 3
    assert "run() cannot accept positional-only arguments, *args, or **kwargs." in out
    assert "at score.py, line 4, in run" in out
    assert "def run(*args):" in out
    write(tmp_path, "score.py", "def init(): pass\n")
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(tmp_path))
    assert code == 3 and "in score.py" in out


def test_init_raising_names_the_line(tmp_path):
    write(tmp_path, "score.py", """
        def load():
            raise FileNotFoundError("model.pkl is missing")

        def init():
            load()

        def run(data): return data
    """)
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(tmp_path))
    assert code == 3
    assert "init() in score.py failed" in out
    assert "FileNotFoundError: model.pkl is missing" in out
    assert "at score.py, line 3, in load" in out


def test_broken_config_json_exits_3(tmp_path):
    write(tmp_path, "score.py", HELLO)
    write(tmp_path, "config.json", "{not json")
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(tmp_path))
    assert code == 3
    assert "config.json is not valid JSON" in out


def test_non_integer_scoring_timeout_exits_3(tmp_path):
    write(tmp_path, "score.py", HELLO)
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(tmp_path), env={"SCORING_TIMEOUT_MS": "soon"})
    assert code == 3
    assert "SCORING_TIMEOUT_MS" in out


def test_port_in_use_exits_1(tmp_path):
    write(tmp_path, "score.py", HELLO)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, out = run_cli(["--entry_script", "score.py", "--port", str(port)], cwd=str(tmp_path))
    assert code == 1
    assert "already in use" in out


def test_config_file_sets_entry_script_relative_to_app_root(tmp_path):
    write(tmp_path, "sub/score.py", HELLO)
    cfg = write(tmp_path, "conf/cfg.json", json.dumps({"AZUREML_ENTRY_SCRIPT": "sub/score.py", "UNKNOWN_KEY": 1}))
    with ServerProcess(["--config_file", cfg], cwd=str(tmp_path)) as server:
        assert server.http.post("/score", b"x").status == 200
        wait_output(server, "UNKNOWN_KEY")


def test_config_precedence_cli_over_env_over_file(tmp_path):
    write(tmp_path, "score.py", """
        import os
        def init(): pass
        def run(data): return {"wc": os.environ.get("WORKER_COUNT_SEEN")}
    """)
    write(tmp_path, "config.json", json.dumps({"SCORING_TIMEOUT_MS": 1111, "WORKER_COUNT": 3,
                                               "SERVICE_NAME": "from-file"}))
    handle = azmlinfsrv.Config.resolve({"worker_count": "2"}, environ={"AML_APP_ROOT": str(tmp_path),
                                                                       "SCORING_TIMEOUT_MS": "2222"})
    assert handle.worker_count == 2
    assert handle.scoring_timeout_ms == 2222
    assert handle.service_name == "from-file"
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path),
                       env={"SCORING_TIMEOUT_MS": "2222"}) as server:
        wait_output(server, "2222 ms")
        wait_output(server, "queue")


def test_model_dir_is_exported_before_import(tmp_path):
    write(tmp_path, "model/weights.txt", "w")
    write(tmp_path, "score.py", """
        import os
        SEEN_AT_IMPORT = os.environ.get("AZUREML_MODEL_DIR")
        def init(): pass
        def run(data):
            return {"import": SEEN_AT_IMPORT, "entry": os.environ.get("AZUREML_ENTRY_SCRIPT")}
    """)
    with ServerProcess(["--entry_script", "score.py", "--model_dir", "model"], cwd=str(tmp_path)) as server:
        body = server.http.post("/score", b"x").json
        assert body["import"] == "model"
        assert body["entry"] == os.path.realpath(str(tmp_path / "score.py"))
        wait_output(server, "weights.txt")  # the banner lists the model directory


def test_source_directory_is_on_sys_path(tmp_path):
    write(tmp_path, "src/helpers.py", "def double(x): return 2 * x\n")
    write(tmp_path, "src/score.py", """
        import helpers
        def init(): pass
        def run(data): return helpers.double(int(data))
    """)
    with ServerProcess(["--entry_script", "src/score.py"], cwd=str(tmp_path),
                       env={"AZUREML_SOURCE_DIRECTORY": "src"}) as server:
        assert server.http.post("/score", b"21").json == 42


def test_print_goes_to_print_logger_and_access_line(tmp_path):
    write(tmp_path, "score.py", """
        def init(): print("hello from init")
        def run(data):
            print("scoring", data)
            return 1
    """)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        server.http.post("/score?q=1", b"abc")
        out = wait_output(server, "POST /score?q=1 200") and server.output
    assert " I [" in out and "azmlinfsrv.print - hello from init" in out
    assert "azmlinfsrv.print - scoring abc" in out
    assert re.search(r"azmlinfsrv - POST /score\?q=1 200 \d+\.\d{3}ms 1", out)


def test_logging_json_replaces_log_config(tmp_path):
    write(tmp_path, "score.py", HELLO)
    write(tmp_path, "logging.json", json.dumps({
        "version": 1, "formatters": {"f": {"format": "CUSTOM %(name)s %(message)s"}},
        "handlers": {"h": {"class": "logging.StreamHandler", "formatter": "f", "stream": "ext://sys.stdout"}},
        "loggers": {"azmlinfsrv": {"handlers": ["h"], "level": "INFO", "propagate": False}}}))
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path),
                       env={"AML_APP_ROOT": str(tmp_path)}) as server:
        server.http.post("/score", b"x")
        wait_output(server, "CUSTOM azmlinfsrv POST /score 200")


def test_python_dash_m_and_version_flag(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "azmlinfsrv", "--version"], cwd=HERE, env=server_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert proc.returncode == 0
    assert azmlinfsrv.__version__ in proc.stdout.decode()


def test_the_settings_page_documents_every_setting():
    with open(os.path.join(HERE, "docs", "settings.md"), encoding="utf-8") as handle:
        readme = handle.read()
    for setting in azmlinfsrv._SETTINGS:
        assert "`%s`" % setting.env in readme, setting.env
        if setting.flag:
            assert "`%s`" % setting.flag in readme, setting.flag


ENV_DUMP = """
import json, os
NAMES = ("AML_APP_ROOT", "AZUREML_ENTRY_SCRIPT", "AZUREML_MODEL_DIR", "WORKER_COUNT", "SERVER_PORT", "HEALTH_PORT",
         "AML_APP_INSIGHTS_ENABLED", "AML_APP_INSIGHTS_KEY", "HTTP_X_MS_SERVER_VERSION", "TRANSPORT_PROTOCOL",
         "AML_CORS_ORIGINS", "AZUREML_CONFIG_FILE")
AT_IMPORT = {name: os.environ.get(name) for name in NAMES}
AT_INIT = {}
def init():
    AT_INIT.update({name: os.environ.get(name) for name in NAMES})
def run(data):
    return {"import": AT_IMPORT, "init": AT_INIT}
"""


def test_script_sees_the_references_environment_at_import_and_in_init(tmp_path):
    write(tmp_path, "score.py", ENV_DUMP)
    write(tmp_path, "model/w.txt", "w")
    cfg = write(tmp_path, "conf/settings.json", json.dumps({"SERVICE_NAME": "svc"}))
    # SERVER_PORT and HEALTH_PORT from outside are overwritten with the ports really served, as the reference does
    env = {"SERVER_PORT": "1", "HEALTH_PORT": "2", "AML_APP_ROOT": ""}
    with ServerProcess(["--entry_script", "score.py", "--model_dir", "model", "--worker_count", "2",
                        "--access_control_allow_origins", "*", "--config_file", "conf/settings.json"],
                       cwd=str(tmp_path), env=env) as server:
        body = server.http.post("/score", b"x").json
    expected = {
        "AML_APP_ROOT": str(tmp_path), "AZUREML_ENTRY_SCRIPT": os.path.realpath(str(tmp_path / "score.py")),
        "AZUREML_MODEL_DIR": "model", "WORKER_COUNT": "2", "SERVER_PORT": str(server.port),
        "HEALTH_PORT": str(server.port), "AML_APP_INSIGHTS_ENABLED": "false", "AML_APP_INSIGHTS_KEY": None,
        "HTTP_X_MS_SERVER_VERSION": "azmlinfsrv/" + azmlinfsrv.__version__, "TRANSPORT_PROTOCOL": "grpc",
        "AML_CORS_ORIGINS": "*", "AZUREML_CONFIG_FILE": os.path.realpath(cfg)}
    assert body["import"] == expected
    assert body["init"] == expected


def test_defaults_are_exported_and_a_disabled_server_version_is_not(tmp_path):
    with script_server(tmp_path, ENV_DUMP, env={"SERVER_VERSION_LOG_RESPONSE_ENABLED": "false"}) as server:
        seen = server.http.post("/score", b"x").json["import"]
    assert seen["AML_APP_ROOT"] == str(tmp_path) and seen["WORKER_COUNT"] == "1"
    assert seen["SERVER_PORT"] == seen["HEALTH_PORT"] == str(server.port)
    assert seen["AML_APP_INSIGHTS_ENABLED"] == "false"
    assert seen["HTTP_X_MS_SERVER_VERSION"] is None and seen["AZUREML_CONFIG_FILE"] is None
    assert seen["AML_CORS_ORIGINS"] is None and seen["AZUREML_MODEL_DIR"] is None


def test_cli_entry_script_is_relative_to_the_working_directory_as_in_the_reference(tmp_path):
    write(tmp_path, "score.py", ENV_DUMP)
    elsewhere = tmp_path / "approot"
    elsewhere.mkdir()
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path),
                       env={"AML_APP_ROOT": str(elsewhere)}) as server:
        seen = server.http.post("/score", b"x").json["import"]
    assert seen["AML_APP_ROOT"] == str(elsewhere)  # a set AML_APP_ROOT is left as it is
    assert seen["AZUREML_ENTRY_SCRIPT"] == os.path.realpath(str(tmp_path / "score.py"))


@pytest.mark.parametrize("how, exported, lines", [
    pytest.param("env-valid", "true", ["Valid Application Insights instrumentation key provided."], id="valid-key"),
    pytest.param("env-invalid", "false", ["Invalid Application Insights instrumentation key provided.",
                                          "Application Insights has been disabled."], id="invalid-key"),
    pytest.param("cli-invalid", "false", ["Invalid Application Insights instrumentation key provided."],
                 id="invalid-key-on-command-line"),
    pytest.param("no-key", "false", [], id="enabled-without-key"),
])
def test_app_insights_enabled_is_exported_true_only_when_telemetry_is_on(tmp_path, collector, how, exported, lines):
    write(tmp_path, "score.py", ENV_DUMP)
    env, args = telemetry_env(collector), ["--entry_script", "score.py"]
    if how == "env-invalid":
        env["AML_APP_INSIGHTS_KEY"] = "not-a-uuid"
    elif how == "cli-invalid":
        env.pop("AML_APP_INSIGHTS_ENABLED")
        env.pop("AML_APP_INSIGHTS_KEY")
        args += ["--appinsights_instrumentation_key", "not-a-uuid"]
    elif how == "no-key":
        env.pop("AML_APP_INSIGHTS_KEY")
    with ServerProcess(args, cwd=str(tmp_path), env=env) as server:
        seen = server.http.post("/score", b"x").json
        wait_output(server, "Application Insights Enabled: %s" % exported)
        for line in lines:
            wait_output(server, line + "\n")
        wait_output(server, "Telemetry:    on" if exported == "true" else "Telemetry:    off")
    assert seen["import"]["AML_APP_INSIGHTS_ENABLED"] == exported == seen["init"]["AML_APP_INSIGHTS_ENABLED"]
    assert ("Telemetry:    on" in server.output) == (exported == "true")


@pytest.mark.parametrize("name, value, default", [
    ("AML_APP_INSIGHTS_ENABLED", "asdf", "false"),
    ("AML_MODEL_DC_STORAGE_ENABLED", "asdf", "false"),
    ("SEPERATE_HEALTH_ENDPOINT", "asdf", "false"),
    ("AZUREML_LOG_LEVEL", "loud", "INFO"),
    ("SCORING_TIMEOUT_MS", "-5", "3600000"),
])
def test_values_the_reference_tolerates_warn_and_use_the_default(tmp_path, name, value, default):
    write(tmp_path, "score.py", ENV_DUMP)
    env = {name: value, "AML_APP_INSIGHTS_KEY": IKEY}
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        seen = server.http.post("/score", b"x").json["import"]
        wait_output(server, "Invalid value %r for %s" % (value, name))
        wait_output(server, "using the default, %s." % default)
        if name == "SCORING_TIMEOUT_MS":
            wait_output(server, "timeout 3600000 ms")
    assert seen["AML_APP_INSIGHTS_ENABLED"] == "false"


@pytest.mark.parametrize("name, value", [("APP_INSIGHTS_LOG_RESPONSE_ENABLED", "asdf"), ("WORKER_COUNT", "abc"),
                                         ("SCORING_TIMEOUT_MS", "soon")])
def test_values_the_reference_refuses_still_stop_start_up(tmp_path, name, value):
    write(tmp_path, "score.py", HELLO)
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(tmp_path), env={name: value})
    assert code == 3, out
    assert "Invalid value %r for %s" % (value, name) in out


def test_separate_health_endpoint_serves_the_probe_on_the_health_port(tmp_path):
    write(tmp_path, "score.py", ENV_DUMP)
    health = free_port()
    with ServerProcess(["--entry_script", "score.py", "--health_port", str(health)], cwd=str(tmp_path),
                       env={"SEPERATE_HEALTH_ENDPOINT": "true"}) as server:
        probe = Http(health).get("/")
        assert probe.status == 200 and probe.body == b"Healthy"
        assert Http(health).post("/score", b"x").status == 404  # the health port is for the probe only
        assert server.http.get("/").status == 200  # the serving port still answers it, as the reference's
        seen = server.http.post("/score", b"x").json["import"]
        wait_output(server, "Create dedicated endpoint for health: true")
        wait_output(server, "Liveness Probe: GET   127.0.0.1:%d/\n" % health)
    assert seen["HEALTH_PORT"] == str(health) and seen["SERVER_PORT"] == str(server.port)
    # without --health_port the reference's default health port
    config = azmlinfsrv.Config.resolve({"entry_script": "score.py"},
                                       environ={"SEPERATE_HEALTH_ENDPOINT": "true"}, cwd=str(tmp_path))
    assert config.health_port == 5000
    assert azmlinfsrv.Config.resolve({}, environ={"HEALTH_PORT": "6000"}, cwd=str(tmp_path)).health_port is None


def test_separate_health_endpoint_in_prefork_mode(tmp_path):
    if not hasattr(os, "fork"):
        pytest.skip("pre-fork needs os.fork")
    write(tmp_path, "score.py", HELLO)
    health = free_port()
    with ServerProcess(["--entry_script", "score.py", "--processes", "2"], cwd=str(tmp_path),
                       env={"SEPERATE_HEALTH_ENDPOINT": "true", "AZMLINFSRV_HEALTH_PORT": str(health)}) as server:
        for _ in range(4):
            assert Http(health).get("/").status == 200
        assert server.http.post("/score", b"x").status == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0


REFERENCE_LOGGING_JSON = {
    "version": 1,
    "handlers": {"azmlinfsrv": {"class": "logging.StreamHandler", "level": "INFO", "stream": "ext://sys.stdout",
                                "formatter": "azmlinfsrv"}},
    "formatters": {"azmlinfsrv": {"class": "azureml_inference_server_http.log_config.AMLLogFormatter",
                                  "format": "MYAPP %(asctime)s %(levelname)s %(name)s - %(message)s", "style": "%"}},
    "loggers": {"azmlinfsrv": {"level": "INFO", "handlers": ["azmlinfsrv"], "propagate": False},
                "gunicorn.access": {"level": "INFO", "handlers": ["azmlinfsrv"], "filters": ["RootAccessFilter"]}},
    "filters": {"RootAccessFilter": {"()": "azureml_inference_server_http.log_config.RootAccessFilter"}},
}


def test_logging_json_written_for_the_reference_works_unchanged(tmp_path):
    write(tmp_path, "score.py", """
        def init(): print("init says hi")
        def run(data): return 1
    """)
    write(tmp_path, "logging.json", json.dumps(REFERENCE_LOGGING_JSON))
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        assert server.http.post("/score", b"x").status == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    out = server.output
    assert "MYAPP " in out and "INFO azmlinfsrv - Loaded logging config from" in out
    assert "INFO azmlinfsrv.print - init says hi" in out
    assert re.search(r"MYAPP \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO azmlinfsrv - POST /score 200", out)
    # the classes are ours, under the reference's names
    azmlinfsrv._install_compat_modules()
    module = sys.modules["azureml_inference_server_http.log_config"]
    assert module.RootAccessFilter().filter(logging_record('"GET / HTTP/1.1" 200')) is False
    assert module.RootAccessFilter().filter(logging_record("POST /score 200")) is True
    assert module.AMLLogFormatter().format(logging_record("m")).endswith(" I [%d] t - m" % os.getpid())


def logging_record(message):
    import logging
    return logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)


def test_main_py_is_served_with_a_config_file_and_no_entry_script(tmp_path):
    write(tmp_path, "main.py", ENV_DUMP)
    write(tmp_path, "cfg.json", json.dumps({"SERVICE_NAME": "svc"}))
    with ServerProcess(["--config_file", "cfg.json"], cwd=str(tmp_path)) as server:
        seen = server.http.post("/score", b"x").json["import"]
        wait_output(server, "Found user script at %s" % os.path.realpath(str(tmp_path / "main.py")))
    assert seen["AZUREML_ENTRY_SCRIPT"] is None  # as the reference: the fallback is not exported
    os.remove(str(tmp_path / "main.py"))
    code, out = run_cli(["--config_file", "cfg.json"], cwd=str(tmp_path))
    assert code == 3, out
    assert "No score script found. Expected score script main.py." in out
    assert "Expected script to be found in PYTHONPATH: [" in out
    assert "Current contents of AML_APP_ROOT: ['cfg.json']" in out
    code, out = run_cli([], cwd=str(tmp_path))  # no config file in use (cfg.json is not config.json)
    assert code == 1 and "Either provide an entry_script using --entry_script or provide a path to the " \
                          "configuration file using --config_file" in out


def test_startup_prints_the_references_banner_lines_then_ours(tmp_path):
    with script_server(tmp_path, HELLO, ["--worker_count", "3"], env={"AML_APP_INSIGHTS_KEY": IKEY}) as server:
        pass
    port, script = server.port, os.path.realpath(str(tmp_path / "score.py"))
    reference = "\n".join([
        "The environment variable 'AZUREML_MODEL_DIR' has not been set.",
        "Use the --model_dir command line argument to set it.",
        "",
        "Azure ML Inferencing HTTP server v%s" % azmlinfsrv.__version__,
        "", "",
        "Server Settings",
        "---------------",
        "Entry Script Name: %s" % script,
        "Model Directory: None",
        "Config File: None",
        "Worker Count: 3",
        "Worker Timeout (seconds): None",
        "Server Port: %d" % port,
        "Health Port: %d" % port,
        "Application Insights Enabled: false",
        "Application Insights Key: AppInsights key provided",
        "Inferencing HTTP server version: azmlinfsrv/%s" % azmlinfsrv.__version__,
        "CORS for the specified origins: None",
        "Create dedicated endpoint for health: None",
        "", "",
        "Server Routes",
        "---------------",
        "Liveness Probe: GET   127.0.0.1:%d/" % port,
        "Score:          POST  127.0.0.1:%d/score" % port,
        "", ""])
    out = server.output
    assert out.startswith(reference), out
    # ours after them, once the script has loaded
    assert out.index("Invoking user's init") < out.index("Users's init has completed successfully") \
        < out.index("Routes:\n")
    assert out.index(reference) < out.index("standard-library edition")


@pytest.mark.parametrize("text, reference, summary, last", [
    pytest.param("import helper\ndef init():\n    helper.load()\ndef run(d): return d\n",
                 "User's init function failed", "at score.py, line 3, in init",
                 "ValueError: model.pkl is corrupt", id="init-raises-in-a-helper"),
    pytest.param("import helper\nhelper.load()\ndef init(): pass\ndef run(d): return d\n",
                 "Failed to import user script because it raised an unhandled exception",
                 "at score.py, line 2, in <module>", "ValueError: model.pkl is corrupt", id="import-raises"),
    pytest.param("def init():\n    pass\ndef run(d)\n    return d\n",
                 "Failed to import user script because it raised an unhandled exception", "at score.py, line 3",
                 "SyntaxError: ", id="syntax-error"),
])
def test_import_and_init_failures_print_the_full_traceback_after_the_summary(tmp_path, text, reference, summary,
                                                                               last):
    # helper.py stands for a library: outside the app root, so the summary names the script's line
    write(tmp_path, "lib/helper.py", "def load():\n    raise ValueError('model.pkl is corrupt')\n")
    app = tmp_path / "app"
    write(app, "score.py", text)
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(app), env={"PYTHONPATH": str(tmp_path / "lib")})
    assert code == 3, out
    assert "azmlinfsrv: error: %s" % reference in out
    assert out.index(reference) < out.index(summary)
    tail = out[out.index(summary):]
    if last.startswith("SyntaxError"):
        assert 'File "%s", line 3' % os.path.realpath(str(app / "score.py")) in tail
    else:
        assert "Traceback (most recent call last):" in tail
        assert 'helper.py", line 2, in load' in tail  # the library frame too: the full traceback
        assert "azmlinfsrv.py" not in tail  # it starts at the user's code, not at our loader
    assert tail.rstrip().splitlines()[-1].startswith(last)


def test_missing_script_keeps_the_references_words(tmp_path):
    code, out = run_cli(["--entry_script", "nope.py"], cwd=str(tmp_path))
    assert code == 3
    assert "No such file or directory." in out and "nope.py" in out


def test_import_time_and_init_output_reaches_app_insights(tmp_path, collector):
    write(tmp_path, "score.py", """
        import logging
        print("printed at import")
        logging.getLogger("my.model").warning("logged at import")
        def init():
            print("printed in init")
            logging.getLogger("my.model").warning("logged in init")
        def run(data): return 1
    """)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=telemetry_env(collector)) as server:
        wanted = {"printed at import", "logged at import", "printed in init", "logged in init"}
        messages = collector.wait_for(lambda items: wanted <= {i["data"]["baseData"].get("message")
                                                               for i in items if i["data"]["baseType"] == "MessageData"}
                                      and items)
        wait_output(server, "Telemetry:    on")
    found = {i["data"]["baseData"]["message"]: i for i in messages if i["data"]["baseType"] == "MessageData"}
    assert found["printed in init"]["data"]["baseData"]["properties"]["Logger"] == "azmlinfsrv.print"
    assert found["logged in init"]["data"]["baseData"]["severityLevel"] == 2


def test_import_time_output_reaches_app_insights_when_init_fails(tmp_path, collector):
    write(tmp_path, "score.py", """
        print("loading the model")
        def init():
            print("about to fail")
            raise RuntimeError("no GPU")
        def run(data): return 1
    """)
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(tmp_path), env=telemetry_env(collector))
    assert code == 3, out
    messages = {i["data"]["baseData"]["message"] for i in collector.items("MessageData")}
    assert {"loading the model", "about to fail"} <= messages, out
    [failure] = collector.items("ExceptionData")  # as the reference, init()'s exception is reported too
    detail = failure["data"]["baseData"]["exceptions"][0]
    assert detail["typeName"] == "RuntimeError" and detail["message"] == "no GPU"
    assert detail["parsedStack"][0]["fileName"] == "score.py" and detail["parsedStack"][0]["line"] == 5


def test_serve_exports_the_environment_and_restores_it(tmp_path, scrubbed_environ):
    path = write(tmp_path, "score.py", ENV_DUMP)
    before = dict(os.environ)
    with azmlinfsrv.serve(path, worker_count=2) as server:
        seen = server.score("x").body["import"]
        port = port_of(server)
    assert seen["SERVER_PORT"] == str(port) and seen["WORKER_COUNT"] == "2"
    assert seen["AML_APP_INSIGHTS_ENABLED"] == "false" and seen["AML_APP_ROOT"] == (before.get("AML_APP_ROOT")
                                                                                   or str(tmp_path))
    assert dict(os.environ) == before


def test_script_failures_go_to_stdout_as_the_references_log_and_usage_errors_to_stderr(tmp_path):
    write(tmp_path, "score.py", "def init():\n    raise RuntimeError('no GPU')\ndef run(d): return d\n")
    failed = subprocess.run([sys.executable, MODULE, "--entry_script", "score.py"], cwd=str(tmp_path),
                            env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert failed.returncode == 3
    assert b"User's init function failed" in failed.stdout and b"RuntimeError: no GPU" in failed.stdout
    assert b"init function failed" not in failed.stderr
    usage = subprocess.run([sys.executable, MODULE, "--entry_script", "score.py", "--port", "0"],
                           cwd=str(tmp_path), env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=30)
    assert usage.returncode == 1 and b"--port" in usage.stderr and b"error" not in usage.stdout
    assert b"error" in usage.stderr


# ===========================================================================
# inference-schema and swagger.json
# ===========================================================================

REFERENCE_DATA = os.path.join(HERE, "testdata", "reference")

SCHEMA_SCRIPT = """
from inference_schema.schema_decorators import input_schema, output_schema
from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
def init(): pass
@input_schema("data", StandardPythonParameterType({"a": 1, "b": "x"}))
@input_schema("factor", StandardPythonParameterType(2.0))
@output_schema(StandardPythonParameterType({"result": [1.0]}))
def run(data, factor, extra="dflt"):
    return {"data": data, "factor": factor, "extra": extra, "types": [type(data).__name__, type(factor).__name__]}
"""

PLAIN_SCRIPT = """
def init(): pass
def run(data): return {"got": data}
"""


def reference_body(name):
    with open(os.path.join(REFERENCE_DATA, "swagger_%s.json" % name), "rb") as handle:
        return handle.read()


@pytest.fixture
def schema_http(served):
    pytest.importorskip("inference_schema")
    return http_for(served(SCHEMA_SCRIPT))


JSON = {"Content-Type": "application/json"}


def test_schema_run_gets_parameters_by_name_from_json_object(schema_http):
    body = json.dumps({"data": {"a": 5, "b": "y"}, "factor": 3, "extra": [1], "ignored": 0})
    answer = schema_http.post("/score", body, headers=JSON)
    assert answer.status == 200
    assert answer.json == {"data": {"a": 5, "b": "y"}, "factor": 3, "extra": [1], "types": ["dict", "int"]}


def test_schema_parameter_default_is_used_when_absent(schema_http):
    answer = schema_http.post("/score", '{"data": {"a": 5, "b": "y"}, "factor": 3}', headers=JSON)
    assert answer.status == 200
    assert answer.json["extra"] == "dflt"


def test_schema_missing_parameter_is_400_naming_it(schema_http):
    answer = schema_http.post("/score", '{"factor": 3}', headers=JSON)
    assert (answer.status, answer.json) == (400, {"message": "A value is not provided for the 'data' parameter."})
    answer = schema_http.post("/score", '{"data": 1}', headers=JSON)
    assert answer.json == {"message": "A value is not provided for the 'factor' parameter."}
    assert answer.headers["x-ms-run-function-failed"] == "False"
    assert "x-ms-run-fn-exec-ms" not in answer.headers


@pytest.mark.parametrize("body", ["[1, 2]", '"s"', "null", "3"])
def test_schema_body_that_is_not_a_json_object_is_400(schema_http, body):
    answer = schema_http.post("/score", body, headers=JSON)
    assert (answer.status, answer.json) == (400, {"message": "POST body should be a JSON dictionary."})


def test_schema_invalid_json_is_400_with_the_parser_error(schema_http):
    answer = schema_http.post("/score", "{bad", headers=JSON)
    assert answer.status == 400
    assert answer.json == {"message": "POST body could not be decoded as JSON: Expecting property name "
                                      "enclosed in double quotes: line 1 column 2 (char 1)"}


def test_schema_empty_body_is_400(schema_http):
    answer = schema_http.post("/score", b"", headers=JSON)
    assert (answer.status, answer.json) == (400, {"message": "POST body is empty. Expecting a JSON dictionary."})


def test_schema_body_that_is_not_utf8_is_400_and_server_keeps_serving(schema_http):
    answer = schema_http.post("/score", b"\xff\xfe{", headers=JSON)
    assert answer.status == 400  # the reference answers 500 (an uncaught UnicodeDecodeError)
    assert answer.json["message"].startswith("POST body could not be decoded as JSON: ")
    assert schema_http.post("/score", '{"data": {}, "factor": 1}', headers=JSON).status == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_schema_post_without_json_content_type_is_415(schema_http, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    answer = schema_http.post("/score", '{"data": {}, "factor": 1}', headers=headers)
    assert (answer.status, answer.json) == (415, {"message": "Expects Content-Type to be application/json"})


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON",
                                          "application/vnd.api+json"])
def test_schema_post_accepts_json_content_types(schema_http, content_type):
    answer = schema_http.post("/score", '{"data": {}, "factor": 1}', headers={"Content-Type": content_type})
    assert answer.status == 200
    assert answer.json == {"data": {}, "factor": 1, "extra": "dflt", "types": ["dict", "int"]}


def test_schema_get_takes_parameters_from_the_query(schema_http):
    answer = schema_http.get("/score?data=%7B%22a%22%3A1%7D&factor=2&extra=%5B1%2C2%5D")
    assert answer.status == 200
    assert answer.json == {"data": {"a": 1}, "factor": 2, "extra": [1, 2], "types": ["dict", "int"]}
    answer = schema_http.get("/score")
    assert (answer.status, answer.json) == (400, {"message": "A value is not provided for the 'data' parameter."})


def test_schema_run_with_request_headers_gets_them_too(served):
    pytest.importorskip("inference_schema")
    http = http_for(served("""
        from inference_schema.schema_decorators import input_schema
        from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
        def init(): pass
        @input_schema("data", StandardPythonParameterType({"a": 1}))
        def run(data, request_headers):
            return {"data": data, "foo": request_headers.get("X-Foo")}
        """))
    answer = http.post("/score", '{"data": {"a": 2}, "request_headers": 5}', headers=dict(JSON, **{"X-Foo": "bar"}))
    assert answer.json == {"data": {"a": 2}, "foo": "bar"}


def test_schema_numpy_parameter_reaches_run_converted(served):
    pytest.importorskip("inference_schema")
    pytest.importorskip("numpy")
    http = http_for(served("""
        import numpy as np
        from inference_schema.schema_decorators import input_schema
        from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
        def init(): pass
        @input_schema("data", NumpyParameterType(np.array([[1.0, 2.0], [3.0, 4.0]])))
        def run(data):
            return {"type": type(data).__name__, "shape": list(data.shape), "sum": float(data.sum())}
        """))
    answer = http.post("/score", '{"data": [[1.0, 2.0], [3.0, 4.0]]}', headers=JSON)
    assert answer.json == {"type": "ndarray", "shape": [2, 2], "sum": 10.0}


def test_rawhttp_and_input_schema_together_is_startup_error_exit_3(tmp_path):
    pytest.importorskip("inference_schema")
    write(tmp_path, "score.py", """
        from azureml.contrib.services.aml_request import rawhttp
        from inference_schema.schema_decorators import input_schema
        from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
        def init(): pass
        @input_schema("data", StandardPythonParameterType({"a": 1}))
        @rawhttp
        def run(data):
            return "x"
        """)
    code, output = run_cli(["--entry_script", "score.py", "--port", str(free_port())], cwd=str(tmp_path))
    assert code == 3
    assert "run() cannot be decorated with both @rawhttp and @input_schema" in output


@pytest.mark.parametrize("version,saved", [(None, "v2_decorated"), ("2", "v2_decorated"), ("2.0", "v2_decorated"),
                                           ("3", "v3_decorated"), ("3.0", "v3_decorated"),
                                           ("3.1", "v31_decorated")])
def test_swagger_for_decorated_run_is_the_references(schema_http, version, saved):
    answer = schema_http.get("/swagger.json" + ("?version=" + version if version else ""))
    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.body == reference_body(saved)  # same keys, same order, same bytes
    document = answer.json
    schemas = document["definitions"] if "swagger" in document else document["components"]["schemas"]
    assert schemas["ServiceInput"]["example"] == {"data": {"a": 1, "b": "x"}, "factor": 2.0, "extra": ""}
    assert schemas["ServiceInput"]["properties"]["factor"] == {"type": "number", "format": "double"}
    assert schemas["ServiceOutput"]["example"] == {"result": [1.0]}


@pytest.mark.parametrize("version,saved", [("2", "v2_plain"), ("3", "v3_plain"), ("3.1", "v31_plain")])
def test_swagger_for_plain_run_is_the_references(served, version, saved):
    http = http_for(served(PLAIN_SCRIPT))
    answer = http.get("/swagger.json?version=" + version)
    assert answer.body == reference_body(saved)
    document = answer.json
    schemas = document["definitions"] if "swagger" in document else document["components"]["schemas"]
    assert schemas["ServiceInput"] == schemas["ServiceOutput"] == {"type": "object", "example": {}}


def test_swagger_reflects_service_name_version_and_path_prefix(served):
    http = http_for(served(PLAIN_SCRIPT, env={"SERVICE_NAME": "mysvc", "SERVICE_VERSION": "9.9",
                                             "SERVICE_PATH_PREFIX": "/pre/fix/"}))
    v2, v3 = http.get("/swagger.json"), http.get("/swagger.json?version=3")
    assert v2.body == reference_body("v2_plain_envs") and v3.body == reference_body("v3_plain_envs")
    assert v2.json["info"] == {"title": "mysvc", "version": "9.9",
                               "description": "API specification for the Azure Machine Learning service mysvc"}
    assert list(v3.json["paths"]) == ["/pre/fix/", "/pre/fix/score", "/pre/fix/swagger.json"]


def test_swagger_unknown_version_is_404_with_the_references_message(served):
    http = http_for(served(PLAIN_SCRIPT))
    for version in ("4", "9", "", "3.10"):
        answer = http.get("/swagger.json?version=" + version)
        assert answer.status == 404
        assert answer.json == {"message": "Swagger version [%s] is not valid. Supported versions: [2, 3, 3.1]."
                                          % version}


def test_swagger_version_the_schema_cannot_express_is_404(served):
    pytest.importorskip("inference_schema")
    http = http_for(served("""
        from inference_schema.schema_decorators import input_schema
        from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
        def init(): pass
        @input_schema("data", StandardPythonParameterType([1, "a"]))  # mixed arrays: not in swagger 2.0
        def run(data):
            return data
        """))
    answer = http.get("/swagger.json?version=2.0")
    assert answer.status == 404
    assert answer.json == {"message": "Swagger version [2.0] is not supported for the scoring script. "
                                      "Supported swagger versions: [3, 3.1]."}
    assert http.get("/swagger.json?version=9").json == {
        "message": "Swagger version [9] is not valid. Supported versions: [3, 3.1]."}
    assert http.get("/swagger.json?version=3.1").json["openapi"] == "3.1.0"


def test_user_swagger_files_take_precedence_as_in_the_reference(tmp_path, served):
    write(tmp_path, "swagger.json", "{}")  # empty: as if absent, swagger2.json is next
    write(tmp_path, "swagger2.json", '{"swagger": "user-v2"}')
    write(tmp_path, "swagger3.json", '{"openapi": "user-v3"}')
    handle = served(PLAIN_SCRIPT)
    http = http_for(handle)
    assert http.get("/swagger.json").json == {"swagger": "user-v2"}
    assert http.get("/swagger.json?version=3").json == {"openapi": "user-v3"}
    assert http.get("/swagger.json?version=3.0").json == {"openapi": "user-v3"}
    assert http.get("/swagger.json?version=3.1").body == reference_body("v31_plain")  # 3.1 reads swagger3.1.json
    write(tmp_path, "swagger.json", '{"swagger": "user-any"}')  # read once at start-up, not per request
    assert http.get("/swagger.json?version=2").json == {"swagger": "user-v2"}
    # Through the CLI, from AML_APP_ROOT: a swagger.json with content wins over swagger2.json; 3.1 reads
    # swagger3.1.json.
    app = tmp_path / "cli"
    write(app, "score.py", PLAIN_SCRIPT)
    write(app, "swagger.json", '{"swagger": "from-swagger.json"}')
    write(app, "swagger2.json", '{"swagger": "from-swagger2.json"}')
    write(app, "swagger3.1.json", '{"openapi": "user-v31"}')
    with ServerProcess(["--entry_script", "score.py"], cwd=str(app), env={"AML_APP_ROOT": str(app)}) as server:
        assert server.http.get("/swagger.json?version=2").json == {"swagger": "from-swagger.json"}
        assert server.http.get("/swagger.json?version=3.1").json == {"openapi": "user-v31"}
        assert server.http.get("/swagger.json?version=3").body == reference_body("v3_plain")
        wait_output(server, "Loaded user's swagger file for version [3.1] from %s"
                    % os.path.join(str(app), "swagger3.1.json"))


def test_user_swagger_file_that_is_not_json_is_startup_error_exit_3(tmp_path):
    write(tmp_path, "score.py", PLAIN_SCRIPT)
    write(tmp_path, "swagger3.json", "{bad")
    code, output = run_cli(["--entry_script", "score.py", "--port", str(free_port())], cwd=str(tmp_path),
                           env={"AML_APP_ROOT": str(tmp_path)})
    assert code == 3
    assert "swagger3.json" in output and "line 1 column 2" in output


def test_server_starts_and_serves_swagger_without_inference_schema(tmp_path):
    # A package that cannot be imported stands in for an environment without inference-schema.
    write(tmp_path, "blocked/inference_schema/__init__.py", "raise ImportError('inference_schema is absent')\n")
    write(tmp_path, "score.py", PLAIN_SCRIPT)
    env = {"PYTHONPATH": os.path.join(str(tmp_path), "blocked"), "AML_APP_ROOT": str(tmp_path)}
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        assert server.http.post("/score", b'{"x": 1}').json == {"got": '{"x": 1}'}
        assert server.http.get("/swagger.json?version=3").body == reference_body("v3_plain")



def test_optional_integrations_are_imported_only_when_used(tmp_path):
    # Where PyYAML, debugpy and inference-schema are installed (CI installs all three), a plain server
    # imports none of them; and with no site-packages at all (python -S) it serves all the same.
    write(tmp_path, "score.py", """
        import sys
        def init():
            pass
        def run(data):
            return sorted(name for name in ("yaml", "debugpy", "inference_schema") if name in sys.modules)
        """)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        assert server.http.post("/score", b"x").json == []
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), python_args=["-S"]) as server:
        answer = server.http.post("/score", b"x")
        assert answer.status == 200 and answer.json == []
        assert server.http.get("/swagger.json").json["swagger"] == "2.0"
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit(15) == 0


# ===========================================================================
# Hostile and slow clients, overload, timeouts, shutdown
# ===========================================================================

def test_request_that_never_got_a_worker_gets_503_and_run_never_sees_it(served):
    # The 503 and the worker's start are decided atomically: a request answered "no worker became
    # free" must not run later on (its client was told to retry elsewhere). With one worker, slow-1
    # times out and its thread is replaced; slow-2 takes the new thread; "third", which arrived
    # after slow-2, reaches its own deadline still waiting.
    server = served("import time\ncalls = []\ndef init():\n    pass\n"
                    "def run(data):\n    if data == 'count':\n        return calls\n"
                    "    calls.append(data)\n    if data.startswith('slow'):\n        time.sleep(3)\n    return data\n",
                    worker_count=1, scoring_timeout_ms=600)
    http = http_for(server)
    answers = {}
    slow = [threading.Thread(target=lambda name=name: answers.setdefault(name, http.post("/score", name.encode())))
            for name in ("slow-1", "slow-2")]
    slow[0].start()
    assert wait_until(lambda: server.app.pool.busy == 1, timeout=5)
    slow[1].start()
    assert wait_until(lambda: server.app.pool.queued == 1, timeout=5)
    third = http.post("/score", b"third")
    assert third.status == 503 and "No worker became free" in third.json["message"]
    for thread in slow:
        thread.join(10)
    assert [answers[name].json["message"] for name in ("slow-1", "slow-2")] == ["Scoring timeout after 600 ms"] * 2
    counted = http.post("/score", b"count")
    assert counted.status == 200 and counted.json == ["slow-1", "slow-2"]


ECHO = """
import time

def init():
    pass

def run(data):
    if data.startswith("sleep "):
        time.sleep(float(data[6:]))
    return {"data": data}
"""


def _post(body, extra=b"", version=b"HTTP/1.1"):
    return (b"POST /score " + version + b"\r\nHost: x\r\nContent-Length: %d\r\n" % len(body) + extra +
            b"Connection: close\r\n\r\n" + body)


def _chunked(body, extra=b""):
    return b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + extra + b"\r\n" + body


_GET_CLOSE = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

#: name, raw request, expected statuses in order, options (half_close, head, data, forbid).
HOSTILE = [
    ("line_missing_version", b"GET /\r\n\r\n", [400], {}),
    ("line_extra_part", b"GET / HTTP/1.1 x\r\nHost: x\r\n\r\n", [400], {}),
    ("line_double_space", b"GET  / HTTP/1.1\r\n\r\n", [400], {}),
    ("line_tabs", b"GET\t/\tHTTP/1.1\r\n\r\n", [400], {}),
    ("line_leading_space", b" GET / HTTP/1.1\r\n\r\n", [400], {}),
    ("method_bad_character", b"G(T / HTTP/1.1\r\n\r\n", [400], {}),
    ("method_unknown", b"BREW /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [405], {}),
    ("version_lowercase", b"GET / http/1.1\r\n\r\n", [400], {}),
    ("version_garbage", b"GET / HTTP/1.1.1\r\n\r\n", [400], {}),
    ("version_not_http", b"GET / FOO/1.1\r\n\r\n", [400], {}),
    ("version_http2", b"GET / HTTP/2.0\r\n\r\n", [505], {}),
    ("version_http3", b"GET / HTTP/3\r\n\r\n", [505], {}),
    ("version_http09", b"GET / HTTP/0.9\r\n\r\n", [505], {}),
    ("tls_client_hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)), [400],
     {"half_close": True}),
    ("binary_garbage_line", bytes(range(1, 256)) + b"\r\n\r\n", [400], {}),
    ("target_relative", b"GET score HTTP/1.1\r\n\r\n", [400], {}),
    ("target_authority_connect", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
     [400], {}),
    ("target_nul", b"GET /sc\x00ore HTTP/1.1\r\n\r\n", [400], {}),
    ("target_non_ascii_utf8", b"GET /sc\xc3\xb6re HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [404], {}),
    ("target_non_ascii_latin1", b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [404], {}),
    ("target_traversal", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [404], {}),
    ("target_absolute_uri", b"POST http://example.com/score HTTP/1.1\r\nHost: example.com\r\n"
     b"Content-Length: 5\r\nConnection: close\r\n\r\nhello", [200], {"data": "hello"}),
    ("target_absolute_uri_no_path", b"GET http://example.com HTTP/1.1\r\nHost: example.com\r\n"
     b"Connection: close\r\n\r\n", [200], {}),
    ("target_options_star", b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [404], {}),
    ("target_too_long_414", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", [414], {}),
    ("target_too_long_no_newline", b"GET /" + b"a" * 20000, [414], {}),
    ("query_encoded_crlf_not_injected", b"GET /?a=%0d%0aSet-Cookie:%20x HTTP/1.1\r\nHost: x\r\n"
     b"Connection: close\r\n\r\n", [200], {"forbid": b"Set-Cookie"}),
    ("header_nul_in_value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", [400], {}),
    ("header_nul_in_name", b"GET / HTTP/1.1\r\nHost: x\r\nX\x00A: b\r\n\r\n", [400], {}),
    ("header_injection_bare_cr", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rX-Injected: 1\r\n\r\n", [400], {}),
    ("header_injection_request_id", b"POST /score HTTP/1.1\r\nHost: x\r\nx-request-id: a\rSet-Cookie: x\r\n"
     b"Content-Length: 0\r\n\r\n", [400], {"forbid": b"Set-Cookie"}),
    ("header_no_colon", b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n", [400], {}),
    ("header_space_before_colon", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello",
     [400], {}),
    ("header_empty_name", b"GET / HTTP/1.1\r\n: x\r\n\r\n", [400], {}),
    ("header_non_ascii_name", b"GET / HTTP/1.1\r\nX-\xc3\xa9: x\r\n\r\n", [400], {}),
    ("header_del_in_value", b"GET / HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n", [400], {}),
    ("header_obs_fold", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n", [400], {}),
    ("header_duplicate_host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", [400], {}),
    ("headers_too_many_431", b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) +
     b"\r\n", [431], {}),
    ("headers_too_large_431", b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", [431], {}),
    ("headers_many_within_limit", b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(90)) +
     b"Connection: close\r\n\r\n", [200], {}),
    ("bare_lf", b"GET / HTTP/1.1\nHost: x\nConnection: close\n\n", [200], {}),
    ("bare_lf_then_crlf_pipelined", b"GET / HTTP/1.1\nHost: x\n\n" + _GET_CLOSE, [200, 200], {}),
    ("leading_empty_lines", b"\r\n\r\n" + _GET_CLOSE, [200], {}),
    ("only_empty_lines", b"\r\n\r\n\r\n", [], {"half_close": True}),
    ("nothing_sent", b"", [], {"half_close": True}),
    ("cl_conflicting_duplicates", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
     b"Content-Length: 6\r\n\r\nhello!", [400], {}),
    ("cl_identical_duplicates", _post(b"hello", b"Content-Length: 5\r\n"), [200], {"data": "hello"}),
    ("cl_list_conflicting", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!", [400], {}),
    ("cl_negative", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello", [400], {}),
    ("cl_plus_sign", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", [400], {}),
    ("cl_not_a_number", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nhello", [400], {}),
    ("cl_unicode_digit", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 8\xb2\r\n\r\nhello", [400], {}),
    ("cl_hex", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello", [400], {}),
    ("cl_huge_number", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 30 + b"\r\n\r\n", [400], {}),
    ("cl_and_te_smuggling", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n", [400], {}),
    ("te_unsupported_gzip", _chunked(b"0\r\n\r\n", b"Transfer-Encoding: gzip\r\n").replace(
        b"Transfer-Encoding: chunked\r\n", b""), [501], {}),
    ("te_chunked_then_identity", _chunked(b"0\r\n\r\n", b"Transfer-Encoding: identity\r\n"), [501], {}),
    ("te_with_http10", b"POST /score HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", [400], {}),
    ("chunk_size_not_hex", _chunked(b"zz\r\nhello\r\n0\r\n\r\n"), [400], {}),
    ("chunk_size_negative", _chunked(b"-1\r\nhello\r\n0\r\n\r\n"), [400], {}),
    ("chunk_size_overflow", _chunked(b"1" * 17 + b"\r\nhello\r\n0\r\n\r\n"), [400], {}),
    ("chunk_size_empty", _chunked(b"\r\nhello\r\n0\r\n\r\n"), [400], {}),
    ("chunk_missing_crlf", _chunked(b"5\r\nhelloXX0\r\n\r\n"), [400], {}),
    ("chunk_line_too_long", _chunked(b"5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n"), [400], {}),
    ("chunk_extension_accepted", _chunked(b"5;name=value\r\nhello\r\n0\r\n\r\n", b"Connection: close\r\n"),
     [200], {"data": "hello"}),
    ("chunk_trailers_accepted", _chunked(b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n", b"Connection: close\r\n"),
     [200], {"data": "hello"}),
    ("chunked_body_decoded", _chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"Connection: close\r\n"),
     [200], {"data": "hello world"}),
    # RFC 9112 strictness where leniency lets a request hide behind a proxy (issue 9).
    ("target_bare_cr", b"GET /sc\rore HTTP/1.1\r\nHost: x\r\n\r\n", [400], {}),
    ("header_bare_cr", b"GET / HTTP/1.1\r\nHost: x\rX-Y: 1\r\n\r\n", [400], {}),
    ("chunk_size_trailing_space", _chunked(b"5 \r\nhello\r\n0\r\n\r\n"), [400], {}),
    ("chunk_size_leading_space", _chunked(b" 5\r\nhello\r\n0\r\n\r\n"), [400], {}),
    ("chunk_size_bare_lf", _chunked(b"5\nhello\r\n0\r\n\r\n"), [400], {}),
    ("chunk_last_bare_lf", _chunked(b"5\r\nhello\r\n0\n\r\n"), [400], {}),
    ("chunk_extension_after_bws", _chunked(b"5 ;name=value\r\nhello\r\n0\r\n\r\n", b"Connection: close\r\n"),
     [200], {"data": "hello"}),
    ("trailer_hides_a_request", _chunked(b"5\r\nhello\r\n0\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
     [400], {}),
    ("trailer_bare_lf", _chunked(b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n"), [400], {}),
    ("trailer_section_ends_with_bare_lf", _chunked(b"5\r\nhello\r\n0\r\n\n"), [400], {}),
    ("trailer_cannot_change_framing", _chunked(b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n",
                                               b"Connection: close\r\n"), [200], {"data": "hello"}),
    # Paths as the reference routes them: percent-decoded, '//' merged, a fragment ignored.
    ("path_double_slash", _post(b"hello").replace(b"POST /score", b"POST //score"), [200], {"data": "hello"}),
    ("path_percent_encoded", _post(b"hello").replace(b"POST /score", b"POST /%73core"), [200], {"data": "hello"}),
    ("path_fragment_ignored", _post(b"hello").replace(b"POST /score", b"POST /score#part"), [200],
     {"data": "hello"}),
    ("path_trailing_slash_is_another_path", _post(b"hello").replace(b"POST /score", b"POST /score/"), [404], {}),
    ("truncated_body_content_length", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhello",
     [400], {"half_close": True}),
    ("truncated_chunked_body", _chunked(b"5\r\nhel"), [400], {"half_close": True}),
    ("truncated_head", b"GET / HTTP/1.1\r\nHost: x\r\n", [400], {"half_close": True}),
    ("body_too_large_413_unsent", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
     [413], {}),
    ("body_too_large_chunked_413", _chunked(b"1000000\r\n"), [413], {}),
    ("expect_unknown_417", b"POST /score HTTP/1.1\r\nHost: x\r\nExpect: tea\r\nContent-Length: 1\r\n\r\nx",
     [417], {}),
    ("http10_closed_after_answer", b"GET / HTTP/1.0\r\n\r\n", [200], {}),
    ("http10_post", _post(b"hello", version=b"HTTP/1.0"), [200], {"data": "hello"}),
    ("head_root", b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [200], {"head": True}),
    ("pipelined_in_order", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + _post(b"one").replace(b"Connection: close\r\n", b"")
     + b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n" + _post(b"two"), [200, 200, 404, 200], {}),
    ("pipelined_after_close_ignored", _GET_CLOSE + _GET_CLOSE, [200], {}),
]


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    with script_server(tmp_path_factory.mktemp("hostile"), ECHO,
                       ["--max_body_bytes", "1000000", "--client_timeout", "3"]) as server:
        record_figure("malformed/hostile requests tried", len(HOSTILE))
        yield server


@pytest.mark.parametrize("name,data,statuses,options", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_request_gets_clean_answer(hostile_server, name, data, statuses, options):
    raw, closed_after = exchange(hostile_server.port, data, half_close=options.get("half_close", False))
    assert closed_after is not None, "the server did not close the connection: %r" % raw[:300]
    answers = parse_responses(raw, head_only=options.get("head", False))
    assert [status for status, _, _ in answers] == statuses, raw[:500]
    for status, headers, body in answers[-1:]:
        assert headers["connection"] == "close"
    if "data" in options:
        assert json.loads(answers[-1][2])["data"] == options["data"]
    if "forbid" in options:
        assert options["forbid"].lower() not in b"".join(
            b"%s" % name.encode() for _, headers, _ in answers for name in headers)
    if name == "pipelined_in_order":
        assert [b for _, _, b in answers][:2] == [b"Healthy", b'{"data": "one"}']
        assert json.loads(answers[3][2]) == {"data": "two"}
    if name == "head_root":
        assert answers[0][1]["content-length"] == "7" and raw.endswith(b"\r\n\r\n")
    # The server keeps serving after each one.
    assert hostile_server.http.post("/score", b"ok").status == 200


def test_oversize_body_is_413_before_the_body_is_sent(hostile_server):
    with socket.create_connection(("127.0.0.1", hostile_server.port), timeout=5) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
        sock.sendall(b"x" * 65536)  # a client that starts sending anyway still reads the answer, no reset
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status, headers, body = parse_responses(data)[0]
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["message"] == "The request body is 50000000 bytes; the limit is 1000000."


def test_expect_100_continue_then_200(hostile_server):
    with socket.create_connection(("127.0.0.1", hostile_server.port), timeout=5) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = sock.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        data = b""
        while not data.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    status, headers, body = parse_responses(data)[0]
    assert (status, json.loads(body)) == (200, {"data": "hello"})
    assert headers["connection"] == "keep-alive"


def test_slowloris_does_not_block_normal_requests(tmp_path):
    with script_server(tmp_path, ECHO, ["--client_timeout", "1"]) as server:
        socks = []
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(sock)
        started = time.monotonic()
        closed = {}
        slowest = 0.0
        served = 0
        while len(closed) < len(socks) and time.monotonic() - started < 6:
            for index, sock in enumerate(socks):  # one more byte each, every ~50 ms
                if index not in closed:
                    try:
                        sock.sendall(b"a")
                    except OSError:
                        closed[index] = (time.monotonic() - started, b"")
            begin = time.monotonic()
            answer = server.http.post("/score", b"normal", timeout=5)
            slowest = max(slowest, time.monotonic() - begin)
            assert answer.status == 200
            served += 1
            readable = select.select([s for i, s in enumerate(socks) if i not in closed], [], [], 0.05)[0]
            for sock in readable:
                index = socks.index(sock)
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                closed[index] = (time.monotonic() - started, data)
        for sock in socks:
            sock.close()
    assert len(closed) == 50, "%d slow connections still open after 6 s" % (50 - len(closed))
    latest = max(t for t, _ in closed.values())
    assert latest < 1 + 3.0
    for _, data in closed.values():  # 408 JSON, then the close
        if data:
            assert parse_responses(data)[0][0] == 408
    assert slowest < 2.0
    record_figure("slowloris: slowest normal request with 50 trickling connections", "%.3f s (%d served)"
                  % (slowest, served))
    record_figure("slowloris: slow connections closed after (client_timeout 1 s)", "%.2f s" % latest)


def test_a_chunked_body_trickled_slowly_gets_408_within_its_deadline(served):
    # A length body must arrive within --client_timeout plus its size at 64 KB/s; a chunked one too,
    # not within --client_timeout per chunk (one client could hold a thread and the body budget forever).
    server = served(HELLO, client_timeout=1)
    port = port_of(server)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        start = time.monotonic()
        answered = False
        while time.monotonic() - start < 4:  # a byte every 0.2 s: each chunk well within the timeout
            if select.select([sock], [], [], 0.2)[0]:
                answered = True
                break
            sock.sendall(b"1\r\nx\r\n")
        if not answered:
            sock.sendall(b"0\r\n\r\n")
        answer = sock.recv(65536)
        elapsed = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert elapsed < 3


def test_large_body_cut_short_gets_400_and_the_server_keeps_serving(hello_server):
    with socket.create_connection(("127.0.0.1", hello_server.port), timeout=5) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n" + b"a" * 300000)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"closed before the request was complete" in answer
    assert hello_server.http.post("/score", b"x" * 500000).status == 200


def test_idle_keep_alive_connections_do_not_hold_the_worker(tmp_path):
    with script_server(tmp_path, ECHO, ["--worker_count", "1"]) as server:
        idle = []
        for index in range(6):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            conn.request("POST", "/score", body=b"first %d" % index)
            assert conn.getresponse().read()
            idle.append(conn)
        answer = server.http.post("/score", b"while idle", timeout=5)
        assert answer.status == 200 and answer.json == {"data": "while idle"}
        for conn in idle:  # and the idle ones still work
            conn.request("POST", "/score", body=b"again")
            assert conn.getresponse().status == 200
            conn.close()


def test_liveness_answers_while_every_worker_is_busy(tmp_path):
    with script_server(tmp_path, ECHO, ["--worker_count", "1", "--max_queue", "1"]) as server:
        results = []
        threads = [threading.Thread(target=lambda: results.append(server.http.post("/score", b"sleep 2").status))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        # Both are in: one running, one queued (the scrape itself is the third request in flight).
        assert wait_until(lambda: scrape_metric(server, "azmlinfsrv_workers_busy") == 1
                          and scrape_metric(server, "azmlinfsrv_queue_depth") == 1, timeout=5)
        begin = time.monotonic()
        answer = server.http.get("/", timeout=5)
        took = time.monotonic() - begin
        assert answer.status == 200 and answer.body == b"Healthy"
        assert took < 1.0
        for thread in threads:
            thread.join(10)
        assert results == [200, 200]


def test_overload_gets_200_or_503_never_a_hang_or_reset(tmp_path):
    with script_server(tmp_path, ECHO, ["--worker_count", "1", "--max_queue", "2"]) as server:
        barrier = threading.Barrier(12)
        outcomes = []

        def client():
            barrier.wait(5)
            try:
                answer = server.http.post("/score", b"sleep 0.3", timeout=10)
                outcomes.append((answer.status, answer.headers.get("retry-after"), answer.body))
            except Exception as exc:  # a reset or a hang is a failure
                outcomes.append((type(exc).__name__, None, str(exc)))

        threads = [threading.Thread(target=client) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        assert len(outcomes) == 12
        statuses = sorted(status for status, _, _ in outcomes)
        assert set(statuses) <= {200, 503}, outcomes
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1
        for status, retry_after, body in outcomes:
            if status == 503:
                assert retry_after == "1" and "busy" in json.loads(body)["message"]
        assert server.http.post("/score", b"after").status == 200
        record_figure("overload: 12 concurrent slow requests, 1 worker, queue 2",
                      "%d x 200, %d x 503" % (statuses.count(200), statuses.count(503)))


def test_scoring_timeout_answers_on_time_and_frees_the_worker(tmp_path):
    write(tmp_path, "score.py", """
        import time
        def init():
            pass
        def run(data):
            if data == "slow":
                time.sleep(1.5)
            return {"data": data}
    """)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "1"], cwd=str(tmp_path),
                       env={"SCORING_TIMEOUT_MS": "500"}) as server:
        begin = time.monotonic()
        answer = server.http.post("/score", b"slow", headers={"x-request-id": "stuck-1"}, timeout=5)
        lateness = time.monotonic() - begin - 0.5
        assert answer.status == 500
        assert answer.json["message"] == "Scoring timeout after 500 ms"
        assert answer.headers["x-ms-run-function-failed"] == "True"
        assert answer.json["error"]["location"]["source"] == "time.sleep(1.5)"
        assert -0.01 < lateness < 0.5
        assert server.http.get("/").status == 200  # the server answers at once
        # The slot is back at once (the timed-out call's thread is replaced), not when run() returns.
        answer = server.http.post("/score", b"fast", timeout=5)
        assert answer.status == 200 and answer.json == {"data": "fast"}
        log = wait_output(server, "POST /score 200") and server.output
    assert "Scoring timeout after 500 ms for request stuck-1. run() was at score.py, line 7, in run: " \
           "time.sleep(1.5)" in log
    record_figure("timeout answer lateness (SCORING_TIMEOUT_MS 500)", "%.1f ms" % (lateness * 1000))


def test_stream_that_raises_ends_without_last_chunk(tmp_path):
    write(tmp_path, "score.py", """
        from azureml_inference_server_http.api.aml_response import AMLResponse
        def init():
            pass
        def chunks():
            yield "one;"
            yield "two;"
            raise ValueError("broken generator")
        def run(data):
            return AMLResponse(chunks(), 200) if data == "stream" else {"data": data}
    """)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("POST", "/score", body=b"stream", headers={"x-request-id": "stream-1"})
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
        assert info.value.partial == b"one;two;"
        conn.close()
        assert server.http.post("/score", b"x").json == {"data": "x"}
        assert server.http.get("/").status == 200
        log = wait_output(server, "broke off") and server.output
    assert "The streamed response of request stream-1 broke off: ValueError: broken generator" in log
    assert "at score.py, line 8, in chunks" in log


STREAM_EXITS = """
import sys
from azureml_inference_server_http.api.aml_response import AMLResponse

def init():
    pass

def run(data):
    def chunks():
        yield "first;"
        sys.exit(1)  # user code of a streamed body runs on the connection's thread
    return AMLResponse(chunks(), 200) if data == "exit" else {"data": data}
"""


def test_a_streamed_body_raising_systemexit_closes_its_connection_and_frees_its_thread(served):
    server = served(STREAM_EXITS)
    port = port_of(server)
    connections = server.app.server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nexit")
        received = b""
        while True:  # the head and the first chunk, then the close (no last chunk: the client sees it broke)
            data = sock.recv(65536)
            if not data:
                break
            received += data
    assert received.startswith(b"HTTP/1.1 200") and b"first;" in received and not received.endswith(b"0\r\n\r\n")
    assert wait_until(lambda: connections.busy == 0 and connections.open_connections == 0, timeout=5)
    assert http_for(server).post("/score", b"next").json == {"data": "next"}


def test_health_port_answers_503_and_closes_during_a_drain(tmp_path):
    write(tmp_path, "score.py", ECHO)
    health = free_port()
    with ServerProcess(["--entry_script", "score.py", "--health_port", str(health)], cwd=str(tmp_path)) as server:
        slow = threading.Thread(target=lambda: server.http.post("/score", b"sleep 1.5", timeout=10))
        slow.start()
        assert wait_until(lambda: scrape_metric(server, "azmlinfsrv_workers_busy") == 1, timeout=5)
        assert Http(health).get("/").status == 200
        server.proc.send_signal(signal.SIGTERM)
        answer = None
        deadline = time.monotonic() + 1.0
        while answer is None and time.monotonic() < deadline:
            got = Http(health).get("/", timeout=2)
            answer = got if got.status == 503 else None
        slow.join(10)
        assert server.wait_exit(10) == 0
    # One drain state for both ports: the health port says so too, and closes (no keep-alive on a server going away).
    assert answer is not None and answer.json["message"] == "The server is shutting down."
    assert answer.headers["connection"] == "close"


def test_sigterm_as_soon_as_ready_drains_and_exits_0(tmp_path):
    # Signal handlers and the banner come before the first request is accepted: a SIGTERM sent the
    # moment GET / answers must drain (exit 0), not kill the process (-15) before the banner.
    write(tmp_path, "score.py", HELLO)
    for extra in ([], ["--reload"], ["--reload"], ["--reload"]):
        server = ServerProcess(["--entry_script", "score.py"] + extra, cwd=str(tmp_path))
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output
        assert "Routes:" in server.output and "Traceback" not in server.output


def test_sigterm_drains_requests_in_flight(tmp_path):
    with script_server(tmp_path, ECHO, ["--worker_count", "5"]) as server:
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            server.http.post("/score", b"sleep 1.5", timeout=10).status)) for _ in range(5)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: scrape_metric(server, "azmlinfsrv_workers_busy") == 5, timeout=5)
        server.proc.send_signal(signal.SIGTERM)
        draining = None
        deadline = time.monotonic() + 1.0
        while draining is None and time.monotonic() < deadline:
            try:
                answer = server.http.get("/", timeout=2)
            except OSError:
                break
            if answer.status == 503:
                draining = answer
            time.sleep(0.02)
        for thread in threads:
            thread.join(10)
        code = server.wait_exit(10)
        log = server.output
    assert results == [200] * 5
    assert code == 0
    assert draining is not None and draining.json["message"] == "The server is shutting down."
    assert draining.headers["connection"] == "close"
    assert log.count("Shut down on SIGTERM") == 1
    finished = re.search(r"Shut down on SIGTERM: (\d+) request\(s\) in flight finished", log)
    assert finished and int(finished.group(1)) >= 5  # the five (and the last gauge scrape, if still being answered)
    assert "Traceback" not in log


def _rss_and_threads(pid):
    values = {}
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            name, _, value = line.partition(":")
            values[name] = value.strip()
    return int(values["VmRSS"].split()[0]), int(values["Threads"])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_soak_zero_errors_and_no_growth(tmp_path):
    concurrency, warmup, total = 32, 60, int(os.environ.get("AZMLINFSRV_SOAK_REQUESTS", "20000"))
    with script_server(tmp_path, ECHO, ["--worker_count", "4", "--access_log", "false"]) as server:
        pid = server.proc.pid
        errors = []
        counts = [0] * concurrency
        start_soak = threading.Barrier(concurrency + 1)
        end_soak = threading.Barrier(concurrency + 1)
        per_thread = total // concurrency

        def client(index):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            body = json.dumps({"client": index}).encode()

            def one():
                try:
                    conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.status != 200 or json.loads(data) != {"data": body.decode()}:
                        errors.append((resp.status, data[:100]))
                except Exception as exc:
                    errors.append(repr(exc))
                    conn.close()

            for _ in range(warmup):
                one()
            start_soak.wait(30)
            for _ in range(per_thread):
                one()
                counts[index] += 1
            end_soak.wait(120)
            conn.close()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
        for thread in threads:
            thread.start()
        start_soak.wait(30)
        rss_before, threads_before = _rss_and_threads(pid)
        begin = time.monotonic()
        end_soak.wait(120)
        seconds = time.monotonic() - begin
        rss_after, threads_after = _rss_and_threads(pid)
        for thread in threads:
            thread.join(10)
        assert server.http.get("/").status == 200
    sent = sum(counts)
    record_figure("soak", "%d requests at concurrency %d in %.1f s (%.0f req/s), %d errors"
                  % (sent, concurrency, seconds, sent / seconds, len(errors)))
    record_figure("soak server RSS", "%d kB after warm-up -> %d kB after (%+d kB)"
                  % (rss_before, rss_after, rss_after - rss_before))
    record_figure("soak server threads", "%d after warm-up -> %d after" % (threads_before, threads_after))
    assert sent == per_thread * concurrency
    assert errors == []
    assert rss_after - rss_before < 10 * 1024
    assert threads_after - threads_before <= 2


_FUZZ_SEEDS = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{\"a\": 1}",
    b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n2;x=y\r\nef\r\n0\r\n\r\n",
    b"GET /swagger.json?version=3 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    b"POST /score HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
    b"HEAD /score?x=1 HTTP/1.1\r\nHost: x\r\nx-request-id: r1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
]
_FUZZ_TOKENS = [b"\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b":", b";", b"\xff", b"\xc3\xa9", b"HTTP/1.1",
                b"HTTP/2.0", b"Content-Length: 99\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n",
                b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"ffffffffffffffff", b"-1", b"0\r\n\r\n",
                b"/" * 300, b"9" * 25]


def _mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(7)
        pos = rng.randint(0, len(data))
        if kind == 0 and data:  # flip a byte
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif kind == 1:  # insert random bytes
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 2:  # delete a span
            del data[pos:pos + rng.randint(1, 16)]
        elif kind == 3:  # duplicate a span
            data[pos:pos] = data[pos:pos + rng.randint(1, 40)] * rng.randint(1, 3)
        elif kind == 4:  # insert a token that means something to a parser
            data[pos:pos] = rng.choice(_FUZZ_TOKENS)
        elif kind == 5:  # truncate
            del data[pos:]
        else:  # swap two lines
            lines = bytes(data).split(b"\r\n")
            if len(lines) > 2:
                i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
                lines[i], lines[j] = lines[j], lines[i]
                data = bytearray(b"\r\n".join(lines))
    return bytes(data)


def test_fuzz_request_parser(tmp_path):
    write(tmp_path, "score.py", ECHO)
    rng = random.Random(int(os.environ.get("AZMLINFSRV_FUZZ_SEED", "20240603")))
    limit = int(os.environ.get("AZMLINFSRV_FUZZ_CASES", "1500"))
    with ServerProcess(["--entry_script", "score.py", "--client_timeout", "2", "--max_body_bytes", "100000"],
                       cwd=str(tmp_path)) as server:
        cases, answered, statuses = 0, 0, {}
        deadline = time.monotonic() + float(os.environ.get("AZMLINFSRV_FUZZ_SECONDS", "5"))
        while time.monotonic() < deadline and cases < limit:
            data = _mutate(rng, rng.choice(_FUZZ_SEEDS))
            cases += 1
            try:
                raw, closed_after = exchange(server.port, data, half_close=True, timeout=5)
            except ConnectionResetError:
                raise AssertionError("connection reset on case %d: %r" % (cases, data[:300]))
            assert closed_after is not None, "no close within 5 s on case %d: %r" % (cases, data[:300])
            try:
                answers = parse_responses(raw, head_only=None if b"HEAD" in data else False)
            except (AssertionError, ValueError) as exc:
                raise AssertionError("case %d %r -> %r: %s" % (cases, data[:300], raw[:300], exc))
            answered += bool(answers)
            for status, _, _ in answers:
                statuses[status] = statuses.get(status, 0) + 1
        assert server.proc.poll() is None
        assert server.http.post("/score", b"still up").status == 200
        log = wait_output(server, "POST /score 200") and server.output
    for bad in ("Traceback", "Unexpected error", "Internal error"):
        assert bad not in log, log[max(0, log.find(bad) - 300):log.find(bad) + 3000]
    record_figure("fuzz", "%d mutated requests, %d answered, statuses %s"
                  % (cases, answered, dict(sorted(statuses.items()))))


# ===========================================================================
# Bounded resources: idle connections without threads, arrival order, the body budget, stuck run()
# ===========================================================================

def process_threads(pid):
    with open("/proc/%d/status" % pid) as handle:
        return int(re.search(r"^Threads:\s+(\d+)", handle.read(), re.M).group(1))


def raise_open_file_limit(wanted):
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip("the open-file limit (%d) is below %d" % (hard, wanted))
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_thousand_idle_connections_hold_no_threads_and_a_new_client_is_served(tmp_path):
    raise_open_file_limit(4096)
    with script_server(tmp_path, ECHO, ["--max_connections", "2000"]) as server:
        held = []
        try:
            for index in range(1000):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                held.append(sock)
                if index % 2 == 0:  # half of them served once and kept alive, half never say a word
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            assert wait_until(lambda: sample(server.http.get("/metrics").text, "azmlinfsrv_connections_open")
                              >= 1001, timeout=20)
            page = server.http.get("/metrics").text
            assert sample(page, "azmlinfsrv_connections_busy") <= 8  # the scrapes, closing
            # Threads follow the requests in progress (here: a few, plus spares kept for a minute), never
            # the 1000 open connections.
            assert sample(page, "azmlinfsrv_handler_threads") <= 32
            assert process_threads(server.proc.pid) <= 48
            start = time.perf_counter()
            answer = server.http.post("/score", b"hello")
            record_figure("1000 idle connections open: a new request answered in ms",
                          round((time.perf_counter() - start) * 1000, 1))
            record_figure("1000 idle connections open: server threads", process_threads(server.proc.pid))
            assert answer.status == 200 and answer.json == {"data": "hello"}
        finally:
            for sock in held:
                sock.close()


def test_without_msg_dontwait_a_kept_alive_connection_serves_its_second_request(tmp_path):
    # Windows has no socket.MSG_DONTWAIT: the selector thread's fallbacks must not block on a recv.
    site = tmp_path / "site"
    write(site, "sitecustomize.py", "import socket\ndel socket.MSG_DONTWAIT\n")
    write(tmp_path, "score.py", HELLO)
    env = {"PYTHONPATH": str(site)}
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            for _ in range(3):
                conn.request("POST", "/score", body=b"hi")
                answer = conn.getresponse()
                assert answer.status == 200 and json.loads(answer.read())["data"] == "hi"
        finally:
            conn.close()
        assert server.http.get("/", timeout=5).status == 200  # and a new connection is accepted


def test_connection_cap_closes_the_longest_idle_and_refuses_only_when_all_are_busy(served, tmp_path):
    gate = str(tmp_path / "gate")
    server = served(GATED, worker_count=3, max_connections=3)
    port = port_of(server)
    connections = server.app.server
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    body = ("wait:" + gate).encode()
    for sock in held:
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert wait_until(lambda: server.app.pool.busy == 3, timeout=5)
    # Every connection has a request in progress: a new client is refused at once.
    for _ in range(2):
        raw, closed_after = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_after is not None
        status, headers, reply = parse_responses(raw)[0]
        assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
        assert "all busy" in json.loads(reply)["message"]
    open(gate, "w").close()
    for sock in held:  # the three answers come; the connections stay open
        assert b"HTTP/1.1 200" in sock.recv(65536)
    assert wait_until(lambda: connections.idle_connections == 3, timeout=5)  # ... and idle, in the selector
    # A new client is served: the longest-idle connection made room, and only that one.
    raw, _ = exchange(port, _GET_CLOSE)
    assert parse_responses(raw)[0][0] == 200
    readable, _, _ = select.select(held, [], [], 5)
    assert len(readable) == 1 and readable[0].recv(65536) == b""
    assert server.app.metrics.counters["evicted_connections"] == 1
    assert server.app.metrics.counters["rejected_connections"] == 2
    for sock in held:
        sock.close()


def test_empty_lines_before_a_request_do_not_take_a_handler_thread(served):
    # RFC 9112 2.2: empty lines before a request line are ignored. They are not a request head: the
    # connection stays idle in the selector instead of holding a thread for --client_timeout.
    server = served(HELLO)
    port = port_of(server)
    connections = server.app.server
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
    try:
        for sock in held:
            sock.sendall(b"\r\n\n\r\n")
        assert http_for(server).get("/").status == 200
        assert wait_until(lambda: connections.busy == 0, timeout=2), "%d busy" % connections.busy
        for sock in held:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        for sock in held:  # a second request: its handler waits a moment for a third, and gets empty lines
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.sendall(b"\r\n\r\n")
        assert wait_until(lambda: connections.busy == 0, timeout=2), "%d busy after a follow-up" % connections.busy
    finally:
        for sock in held:
            sock.close()


def test_a_crlf_after_a_body_leaves_the_connection_idle_and_evictable_at_the_cap(served):
    # Some old clients send CRLF after a POST body (RFC 9112 2.2 lets the server ignore it): that
    # connection is idle, not one whose next head is arriving, so a new client at the cap evicts it.
    server = served(HELLO, max_connections=1)
    port = port_of(server)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as old:
        old.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi\r\n")
        assert old.recv(65536).startswith(b"HTTP/1.1 200")
        assert wait_until(lambda: server.app.server.idle_connections == 1, timeout=5)
        answer = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]


NO_THREADS = """
import os, threading, time

def init():
    pass

def run(data):
    if data == "break":  # from now on no new thread can start (its stack cannot be mapped)
        threading.stack_size(2 ** 46)
    elif data == "fix":
        threading.stack_size(0)
    elif data.startswith("wait:"):
        while not os.path.exists(data[5:]):
            time.sleep(0.005)
    return {"data": data[:5]}
"""


def test_a_connection_that_cannot_get_a_thread_is_answered_503_and_the_server_keeps_serving(served, tmp_path):
    gate = str(tmp_path / "gate")
    server = served(NO_THREADS, worker_count=2)
    port = port_of(server)
    http = http_for(server)
    busy = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        busy.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nbreak")
        assert busy.recv(65536).startswith(b"HTTP/1.1 200")
        body = ("wait:" + gate).encode()  # the one handler thread there is, kept busy
        busy.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert wait_until(lambda: server.app.pool.busy == 1, timeout=5)
        refused = raw_exchange(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        assert refused.startswith(b"HTTP/1.1 503"), refused[:80]
        open(gate, "w").close()
        assert busy.recv(65536).startswith(b"HTTP/1.1 200")
        busy.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nfix")
        assert busy.recv(65536).startswith(b"HTTP/1.1 200")
        assert http.post("/score", b"again", timeout=5).json == {"data": "again"}
    finally:
        threading.stack_size(0)
        open(gate, "w").close()
        busy.close()


def test_concurrent_large_uploads_stay_within_the_body_budget(tmp_path):
    write(tmp_path, "score.py", GATED)
    size, budget = 3 * 1024 * 1024, 4 * 1024 * 1024
    with ServerProcess(["--entry_script", "score.py", "--max_buffered_bytes", str(budget)],
                       cwd=str(tmp_path)) as server:
        results = []
        body = b"x" * size

        def upload():
            results.append(server.http.post("/score", body, timeout=60))

        threads = [threading.Thread(target=upload) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [a.status for a in results] == [200] * 8
        assert all(a.json["size"] == size for a in results)
        page = server.http.get("/metrics").text
        peak = sample(page, "azmlinfsrv_buffered_body_bytes_peak")
        # Each 3 MiB body waits until the one before has been answered: never two in memory at once.
        assert size <= peak <= budget
        assert sample(page, "azmlinfsrv_buffered_body_bytes") == 0


def test_a_small_chunked_body_does_not_hold_the_whole_body_budget_while_run_runs(served, tmp_path):
    # A chunked body's size is unknown until read, so it reserves the whole budget while it is read;
    # once read, it holds its size, else one chunked request serialises every /score with a body.
    gate = str(tmp_path / "gate")
    server = served(GATED, worker_count=2, scoring_timeout_ms=3000)
    port = port_of(server)
    body = ("wait:" + gate).encode()
    first = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        first.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert wait_until(lambda: server.app.pool.busy == 1, timeout=5)
        second = http_for(server).post("/score", b"hello", timeout=10)
        assert second.status == 200 and second.json["data"] == "hello"
        open(gate, "w").close()
        assert first.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        open(gate, "w").close()
        first.close()


def test_requests_start_run_in_the_order_they_arrived(served, tmp_path):
    gate = str(tmp_path / "gate")
    server = served(GATED, worker_count=1)
    http = http_for(server)
    answers = []
    first = threading.Thread(target=lambda: answers.append(http.post("/score", ("wait:" + gate).encode())))
    first.start()
    assert wait_until(lambda: server.app.pool.busy == 1, timeout=5)
    threads = []
    for index in range(12):  # each one queued before the next is sent
        thread = threading.Thread(target=lambda n=index: answers.append(http.post("/score", b"req-%02d" % n)))
        thread.start()
        threads.append(thread)
        assert wait_until(lambda: server.app.pool.queued == index + 1, timeout=5)
    open(gate, "w").close()
    for thread in [first] + threads:
        thread.join(10)
    assert [a.status for a in answers] == [200] * 13
    calls = http.post("/score", b"calls").json
    assert calls[1:13] == ["req-%02d" % n for n in range(12)]


def test_a_run_that_never_returns_is_interrupted_and_the_next_request_is_served(tmp_path):
    write(tmp_path, "score.py", """
        def init():
            pass

        def run(data):
            if data == "spin":
                while True:  # a run() that never returns on its own
                    pass
            return {"data": data}
        """)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "1"], env={"SCORING_TIMEOUT_MS": "500"},
                       cwd=str(tmp_path)) as server:
        answer = server.http.post("/score", b"spin")
        assert answer.status == 500 and answer.json["message"] == "Scoring timeout after 500 ms"
        after = server.http.post("/score", b"next")
        assert after.status == 200 and after.json == {"data": "next"}
        page = lambda: server.http.get("/metrics").text  # noqa: E731
        assert wait_until(lambda: sample(page(), "azmlinfsrv_runs_stuck") == 0, timeout=10)
        assert sample(page(), "azmlinfsrv_runs_abandoned_total") == 1
        assert server.http.get("/").status == 200
        assert wait_until(lambda: "given up on returned" in server.output, timeout=10)
        assert "Interrupting it; its worker thread is replaced" in server.output
        # The line of the loop (the script starts with an empty line): 7, the `while`, or 8, the `pass`,
        # depending on the Python version.
        assert re.search(r"run\(\) was at score.py, line [78], in run", server.output)


BLOCKED = """
import threading
forever = threading.Event()

def init():
    pass

def run(data):
    if data == "block":
        forever.wait()  # blocked in C code: an interrupt cannot reach it
    return {"data": data}
"""


def test_stuck_runs_beyond_the_bound_make_the_liveness_probe_fail(tmp_path):
    with script_server(tmp_path, BLOCKED, ["--worker_count", "1"], env={"SCORING_TIMEOUT_MS": "400"}) as server:
        assert server.http.post("/score", b"block").status == 500
        assert server.http.get("/").status == 200  # one stuck call: within the bound (worker_count)
        assert server.http.post("/score", b"still serving").status == 200
        assert server.http.post("/score", b"block").status == 500
        probe = server.http.get("/")
        assert probe.status == 503 and "2 run() call(s)" in probe.json["message"]
        page = server.http.get("/metrics").text
        assert sample(page, "azmlinfsrv_runs_stuck") == 2 and sample(page, "azmlinfsrv_runs_abandoned_total") == 2
        wait_output(server, "Stuck at: run() was at score.py, line 10, in run: forever.wait()")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="pre-fork mode needs os.fork")
def test_prefork_process_with_stuck_runs_is_replaced(tmp_path):
    write(tmp_path, "score.py", BLOCKED + "\nimport os\nplain_run = run\n\ndef run(data):\n"
                                          "    return dict(plain_run(data), pid=os.getpid())\n")
    with ServerProcess(["--entry_script", "score.py", "--processes", "2", "--max_stuck_runs", "0"],
                       env={"SCORING_TIMEOUT_MS": "400"}, cwd=str(tmp_path)) as server:
        assert server.http.post("/score", b"block").status == 500
        assert wait_until(lambda: "it stops and a new one takes its place" in server.output, timeout=15)
        assert wait_until(lambda: "starting a new one" in server.output, timeout=15)
        assert server.http.post("/score", b"after").status == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0


# ===========================================================================
# Pre-fork processes
# ===========================================================================

PID_SCRIPT = """
import os, time
def init(): pass
def run(data):
    time.sleep(0.05)
    return {"pid": os.getpid()}
"""


def worker_pids(server, wanted, seconds=15):
    """The pids that answer /score, from bursts of 8 concurrent requests until ``wanted`` are seen."""
    pids = set()
    deadline = time.time() + seconds
    while len(pids) < wanted and time.time() < deadline:
        threads = [threading.Thread(target=lambda: pids.add(server.http.post("/score", b"x").json["pid"]))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    return pids


@pytest.mark.skipif(not hasattr(os, "fork"), reason="pre-fork mode needs os.fork")
def test_prefork_with_a_health_port_binds_it_once_and_every_process_serves(tmp_path):
    write(tmp_path, "score.py", PID_SCRIPT)
    health = free_port()
    with ServerProcess(["--entry_script", "score.py", "--processes", "2", "--health_port", str(health)],
                       cwd=str(tmp_path)) as server:
        pids = worker_pids(server, 2)
        assert len(pids) == 2
        answer = Http(health).get("/")
        assert (answer.status, answer.body) == (200, b"Healthy")
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    # the same words under the opposite conditions: test_port_in_use_exits_1,
    # test_prefork_processes_share_the_port_and_are_restarted
    assert "already in use" not in server.output
    assert "starting a new one" not in server.output


@pytest.mark.skipif(not hasattr(os, "fork"), reason="pre-fork mode needs os.fork")
def test_prefork_processes_share_the_port_and_are_restarted(tmp_path):
    with script_server(tmp_path, PID_SCRIPT, ["--processes", "2"]) as server:
        pids = worker_pids(server, 2)
        assert len(pids) == 2 and server.proc.pid not in pids
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        fresh = set()

        def a_new_pid():
            try:
                fresh.add(server.http.post("/score", b"x", timeout=5).json["pid"])
            except OSError:
                pass
            return fresh - pids

        assert wait_until(a_new_pid, timeout=15, interval=0.02), "a new worker process should replace the killed one"
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    assert "starting a new one" in server.output
    assert "Pre-fork mode: 2 processes" in server.output  # not when debugging: test_debug_port_breakpoint_in_run...
    assert "Traceback" not in server.output
    for pid in pids | fresh:
        with pytest.raises(OSError):
            os.kill(pid, 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="pre-fork mode needs os.fork")
def test_prefork_start_up_failure_exits_3(tmp_path):
    write(tmp_path, "score.py", "def init(): raise RuntimeError('no model')\ndef run(d): return d\n")
    code, out = run_cli(["--entry_script", "score.py", "--processes", "2"], cwd=str(tmp_path))
    assert code == 3
    assert "RuntimeError: no model" in out


# ===========================================================================
# App Insights telemetry
# ===========================================================================

ISO_TIME = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"
AI_DURATION = r"^\d+\.\d\d:\d\d:\d\d\.\d{6}$"


def by_request_id(request_id, kind="RequestData"):
    return lambda items: [i for i in items if i["data"]["baseType"] == kind
                          and i["tags"].get("ai.operation.id") == request_id]


def request_ids(items):
    return [i["tags"].get("ai.operation.id") for i in items if i["data"]["baseType"] == "RequestData"]


def test_telemetry_request_record_fields_types_and_formats(tmp_path, collector):
    with script_server(tmp_path, HELLO, env=telemetry_env(collector)) as server:
        answer = server.http.post("/score?v=1", b'{"x": 1}', headers={
            "x-request-id": "req-fields-1", "x-ms-client-request-id": "client-9", "Host": "example.test"})
        assert answer.status == 200
        assert server.http.get("/missing", headers={"x-request-id": "req-404"}).status == 404
        server.http.get("/")  # the liveness probe is never recorded
        [record] = collector.wait_for(by_request_id("req-fields-1"))
        [missing] = collector.wait_for(by_request_id("req-404"))
        wait_output(server, "Telemetry:    on, to %s" % collector.url)
        wait_output(server, "Try:")  # the banner's last line
    assert IKEY not in server.output
    assert re.match(r"^Microsoft\.ApplicationInsights\.%s\.Request$" % IKEY.replace("-", ""), record["name"])
    assert re.match(ISO_TIME, record["time"])
    assert record["iKey"] == IKEY
    tags = record["tags"]
    assert tags["ai.operation.id"] == "req-fields-1"
    assert tags["ai.operation.name"] == "POST /score"
    assert tags["ai.cloud.roleInstance"] == "container-7"
    assert tags["ai.cloud.role"] == "svc-1"
    assert re.match(r"^py\d+\.\d+\.\d+:azmlinfsrv", tags["ai.internal.sdkVersion"])
    assert record["data"]["baseType"] == "RequestData"
    data = record["data"]["baseData"]
    assert data["ver"] == 2
    assert data["id"] == "req-fields-1"
    assert data["name"] == "POST /score"
    assert data["url"] == "http://example.test/score?v=1"
    assert re.match(AI_DURATION, data["duration"]), data["duration"]
    assert data["responseCode"] == "200" and data["success"] is True
    props = data["properties"]
    assert all(isinstance(v, str) for v in props.values()), props
    assert props["Container Id"] == "container-7"
    assert props["Request Id"] == "req-fields-1"
    assert props["Client Request Id"] == "client-9"
    assert props["Response Value"] == json.dumps(answer.body.decode("utf-8"))
    assert props["Workspace Name"] == "ws-1" and props["Service Name"] == "svc-1"
    assert missing["data"]["baseData"]["responseCode"] == "404"
    assert missing["data"]["baseData"]["success"] is False
    items = collector.items()
    assert not [i for i in items if i["data"]["baseData"].get("url", "").endswith(":%d/" % server.port)]
    assert not [i for i in items if i["data"]["baseData"].get("message") == "model_data_collection"]
    path, headers, _, _ = collector.uploads[0]
    assert path == "/v2/track"
    assert headers["Content-Encoding"] == "gzip" and headers["Content-Type"].startswith("application/json")


def test_telemetry_response_value_left_out_when_disabled(tmp_path, collector):
    write(tmp_path, "score.py", HELLO)
    env = telemetry_env(collector, APP_INSIGHTS_LOG_RESPONSE_ENABLED="false")
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        assert server.http.post("/score", b"{}", headers={"x-request-id": "no-body"}).status == 200
        [record] = collector.wait_for(by_request_id("no-body"))
    props = record["data"]["baseData"]["properties"]
    assert "Response Value" not in props and props["Request Id"] == "no-body"


def test_telemetry_exception_record_matches_json_diagnostics(tmp_path, collector):
    write(tmp_path, "score.py", """
        def init():
            pass

        def helper(data):
            raise ValueError("bad input: " + data)

        def run(data):
            return helper(data)
        """)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=telemetry_env(collector)) as server:
        answer = server.http.post("/score", b"xyz", headers={"x-request-id": "req-exc"})
        assert answer.status == 500
        [record] = collector.wait_for(by_request_id("req-exc", "ExceptionData"))
        [request] = collector.wait_for(by_request_id("req-exc"))
    location = answer.json["error"]["location"]
    assert record["name"].endswith(".Exception") and re.match(ISO_TIME, record["time"])
    assert record["tags"]["ai.operation.parentId"] == "req-exc"
    data = record["data"]["baseData"]
    assert data["ver"] == 2 and data["severityLevel"] == 3
    assert data["properties"]["Request Id"] == "req-exc"
    [detail] = data["exceptions"]
    assert detail["typeName"] == "ValueError" and detail["message"] == "bad input: xyz"
    stack = detail["parsedStack"]
    assert [f["level"] for f in stack] == list(range(len(stack))) and len(stack) == 2
    top = stack[0]
    assert (top["fileName"], top["line"], top["method"]) == (location["file"], location["line"],
                                                             location["function"])
    assert (stack[1]["method"], stack[1]["fileName"]) == ("run", "score.py")
    assert all(isinstance(f["line"], int) for f in stack)
    assert request["data"]["baseData"]["responseCode"] == "500"
    assert request["data"]["baseData"]["success"] is False


def test_telemetry_timeout_is_an_exception_record_where_run_was(tmp_path, collector):
    write(tmp_path, "score.py", """
        import time

        def init():
            pass

        def run(data):
            time.sleep(3)
            return 1
        """)
    env = telemetry_env(collector, SCORING_TIMEOUT_MS=300)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        assert server.http.post("/score", b"1", headers={"x-request-id": "req-slow"}).status == 500
        [record] = collector.wait_for(by_request_id("req-slow", "ExceptionData"))
    [detail] = record["data"]["baseData"]["exceptions"]
    assert detail["typeName"] == "TimeoutError"
    assert detail["parsedStack"][0]["fileName"] == "score.py"
    assert detail["parsedStack"][0]["line"] == 8 and detail["parsedStack"][0]["method"] == "run"


def test_telemetry_print_and_logging_lines_become_messages_with_the_request_id(tmp_path, collector):
    write(tmp_path, "score.py", """
        import logging

        log = logging.getLogger("my.model")

        def init():
            print("init ran")

        def run(data):
            print("scoring", data)
            log.warning("careful with %s", data)
            logging.error("root says %s", data)
            return data
        """)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=telemetry_env(collector)) as server:
        for n in range(2):
            assert server.http.post("/score", b"p%d" % n, headers={"x-request-id": "req-log-%d" % n}).status == 200
        messages = collector.wait_for(lambda items: len(by_request_id("req-log-1", "MessageData")(items)) >= 3 and
                                      by_request_id("req-log-1", "MessageData")(items))
        first = by_request_id("req-log-0", "MessageData")(collector.items())
        # the lines still reach the console as without telemetry (logging.lastResort, basicConfig)
        wait_output(server, "careful with p1")
        wait_output(server, "ERROR:root:root says p1")
    texts = {m["data"]["baseData"]["message"]: m for m in messages}
    assert set(texts) == {"scoring p1", "careful with p1", "root says p1"}
    assert {m["data"]["baseData"]["message"] for m in first} == {"scoring p0", "careful with p0", "root says p0"}
    printed = texts["scoring p1"]
    assert printed["name"] == "Microsoft.ApplicationInsights.%s.Message" % IKEY.replace("-", "")
    assert printed["data"]["baseType"] == "MessageData" and printed["data"]["baseData"]["ver"] == 2
    assert printed["data"]["baseData"]["severityLevel"] == 1
    assert printed["data"]["baseData"]["properties"]["Request Id"] == "req-log-1"
    assert printed["tags"]["ai.operation.parentId"] == "req-log-1"
    assert re.match(ISO_TIME, printed["time"])
    assert texts["careful with p1"]["data"]["baseData"]["severityLevel"] == 2
    assert texts["careful with p1"]["data"]["baseData"]["properties"]["Logger"] == "my.model"
    assert texts["root says p1"]["data"]["baseData"]["severityLevel"] == 3
    # the server's own lines (access log, start-up) stay in the log, not in telemetry
    all_messages = [i["data"]["baseData"]["message"] for i in collector.items("MessageData")]
    assert not [m for m in all_messages if "POST /score" in m or "user's init" in m.lower() or "user script" in m]
    assert "init ran" in all_messages  # telemetry starts before the script: init()'s print() is sent too


def test_telemetry_model_data_collection(tmp_path, collector):
    write(tmp_path, "score.py", HELLO)
    os.makedirs(str(tmp_path / "models" / "iris" / "3"))
    env = telemetry_env(collector, AML_MODEL_DC_STORAGE_ENABLED="true")
    args = ["--entry_script", "score.py", "--model_dir", str(tmp_path / "models")]
    with ServerProcess(args, cwd=str(tmp_path), env=env) as server:
        answer = server.http.post("/score", b'{"a": [1, 2]}', headers={"x-request-id": "req-mdc"})
        assert answer.status == 200
        [record] = collector.wait_for(by_request_id("req-mdc", "MessageData"))
    data = record["data"]["baseData"]
    assert data["message"] == "model_data_collection"
    props = data["properties"]
    assert props["Input"] == json.dumps('{"a": [1, 2]}')
    assert json.loads(props["Prediction"]) == answer.json
    assert props["Models"] == json.dumps(["iris:3"])
    assert props["Request Id"] == "req-mdc" and props["Container Id"] == "container-7"
    assert props["Workspace Name"] == "ws-1" and props["Service Name"] == "svc-1"


def test_telemetry_retries_500_then_delivers_once_and_counts_sent(tmp_path, collector):
    collector.plan = [500, 500]
    with script_server(tmp_path, HELLO, env=telemetry_env(collector)) as server:
        for n in range(3):
            assert server.http.post("/score", b"1", headers={"x-request-id": "r500-%d" % n}).status == 200
        collector.wait_for(lambda items: {"r500-0", "r500-1", "r500-2"} <= set(request_ids(items)))
        assert [u[3] for u in collector.uploads[:3]] == [500, 500, 200]
        assert collector.uploads[0][2] == collector.uploads[1][2] == collector.uploads[2][2][:len(
            collector.uploads[0][2])]  # the same items, resent
        sent = scrape_metric(server, "azmlinfsrv_telemetry_items_sent_total")
        assert sent >= 3
        assert scrape_metric(server, "azmlinfsrv_telemetry_items_dropped_total") == 0
        wait_output(server, "the collector answered 500")
    ids = request_ids(collector.items())
    assert sorted(i for i in ids if i.startswith("r500")) == ["r500-0", "r500-1", "r500-2"]  # no duplicates
    assert server.output.count("the collector answered 500") == 1  # logged once per kind


def test_telemetry_honours_retry_after_on_429(tmp_path, collector):
    collector.plan = [(429, {"Retry-After": "1"}, None)]
    with script_server(tmp_path, HELLO, env=telemetry_env(collector)) as server:
        assert server.http.post("/score", b"1", headers={"x-request-id": "r429"}).status == 200
        first = time.time()
        collector.wait_for(by_request_id("r429"))
        waited = time.time() - first
    statuses = [u[3] for u in collector.uploads]
    assert statuses[:2] == [429, 200]
    assert waited >= 0.8  # Retry-After: 1, not the 0.2 s backoff


def test_telemetry_206_resends_only_the_retriable_items(tmp_path, collector):
    def partial(items):
        ids = [i["tags"].get("ai.operation.id") for i in items]
        errors = [{"index": n, "statusCode": 503 if rid == "p-retry" else 400, "message": "no"}
                  for n, rid in enumerate(ids) if rid in ("p-retry", "p-refuse")]
        accepted = len(items) - len(errors)
        return 206, {}, {"itemsReceived": len(items), "itemsAccepted": accepted, "errors": errors}

    collector.plan = [partial] * 4
    write(tmp_path, "score.py", HELLO)
    env = telemetry_env(collector, AZMLINFSRV_TELEMETRY_FLUSH_SECONDS="1")
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        for rid in ("p-ok", "p-retry", "p-refuse"):
            assert server.http.post("/score", b"1", headers={"x-request-id": rid}).status == 200
        collector.plan = [partial]  # the first answer marks them; the resend is accepted
        collector.wait_for(lambda items: "p-retry" in request_ids(items))
    sent_ids = [i["tags"].get("ai.operation.id") for u in collector.uploads for i in u[2]
                if i["data"]["baseType"] == "RequestData"]
    assert sent_ids.count("p-ok") == 1  # accepted the first time: never resent
    assert sent_ids.count("p-refuse") == 1  # refused for good: dropped, not resent
    assert sent_ids.count("p-retry") == 2
    assert "p-refuse" not in request_ids(collector.items())


def test_telemetry_hanging_collector_never_slows_scoring_and_memory_stays_bounded(tmp_path, collector):
    collector.plan = ["hang"] * 50
    write(tmp_path, "score.py", HELLO)
    env = telemetry_env(collector, AZMLINFSRV_TELEMETRY_TIMEOUT="1", AZMLINFSRV_TELEMETRY_MAX_QUEUE="20")
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        assert server.http.post("/score", b'"x"', headers={"x-request-id": "hang-first"}).status == 200
        assert wait_until(lambda: collector.uploads, timeout=10, interval=0.02)  # the first upload is now stuck
        slowest = 0.0
        for n in range(60):
            start = time.time()
            answer = server.http.post("/score", b'"x"', headers={"x-request-id": "hang-%d" % n})
            slowest = max(slowest, time.time() - start)
            assert answer.status == 200 and answer.json["data"] == '"x"'
        assert slowest < 3.0  # an upload blocks for up to 1 s at a time; scoring never waits for it
        dropped = scrape_metric(server, "azmlinfsrv_telemetry_items_dropped_total")
        assert dropped >= 60 - 20 - len(collector.uploads[0][2]) > 0
        assert len(collector.uploads[0][2]) < 20
        collector.plan = []
        collector.release.set()  # the collector recovers
        collector.wait_for(lambda items: "hang-59" in request_ids(items))
        assert scrape_metric(server, "azmlinfsrv_telemetry_items_sent_total") >= 1
        wait_output(server, "cannot reach")
    delivered = [i for i in request_ids(collector.items()) if i.startswith("hang-")]
    assert len(delivered) <= 20 + len(collector.uploads[0][2])  # the queue cap plus the batch in flight
    assert server.output.count("cannot reach") == 1


def test_telemetry_collector_not_listening_then_recovering(tmp_path):
    port = free_port()  # nothing listens here yet
    write(tmp_path, "score.py", HELLO)
    url = "http://127.0.0.1:%d/v2/track" % port
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=telemetry_env(url)) as server:
        for n in range(3):
            assert server.http.post("/score", b"1", headers={"x-request-id": "down-%d" % n}).status == 200
        wait_output(server, "cannot reach")  # the first upload failed: now the collector comes up
        late = Collector(port)
        try:
            late.wait_for(lambda items: {"down-0", "down-1", "down-2"} <= set(request_ids(items)))
        finally:
            late.close()
    assert server.output.count("cannot reach") == 1


def test_telemetry_flushed_on_clean_shutdown(tmp_path, collector):
    write(tmp_path, "score.py", """
        def init():
            pass

        def run(data):
            print("last words", data)
            return data
        """)
    env = telemetry_env(collector, AZMLINFSRV_TELEMETRY_FLUSH_SECONDS="60")
    server = ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env)
    for n in range(3):
        assert server.http.post("/score", b"q%d" % n, headers={"x-request-id": "bye-%d" % n}).status == 200
    assert collector.uploads == []  # nothing yet: the flush interval is a minute
    server.stop()
    assert server.proc.returncode == 0
    assert {"bye-0", "bye-1", "bye-2"} <= set(request_ids(collector.items()))
    messages = [i["data"]["baseData"]["message"] for i in collector.items("MessageData")]
    assert {"last words q0", "last words q1", "last words q2"} <= set(messages)


def test_telemetry_configuration_key_checks_and_connection_string(tmp_path, collector):
    write(tmp_path, "score.py", HELLO)
    env = {"AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_INSIGHTS_KEY": "not-a-uuid"}
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        wait_output(server, "not a valid UUID")
        wait_output(server, "Telemetry:    off")
    conn = "instrumentationkey=%s;INGESTIONENDPOINT=http://127.0.0.1:%d/" % (IKEY, collector.port)
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": conn, "AZMLINFSRV_TELEMETRY_FLUSH_SECONDS": "0.2"}
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        assert server.http.post("/score", b"1", headers={"x-request-id": "via-conn"}).status == 200
        [record] = collector.wait_for(by_request_id("via-conn"))
        wait_output(server, "on, to http://127.0.0.1:%d/v2.1/track" % collector.port)
        wait_output(server, "Try:")  # the banner's last line
    assert record["iKey"] == IKEY
    assert collector.uploads[0][0] == "/v2.1/track"
    assert IKEY not in server.output
    with ServerProcess(["--entry_script", "score.py", "--appinsights_instrumentation_key", IKEY], cwd=str(tmp_path),
                       env={"AML_APP_INSIGHTS_ENDPOINT": collector.url}) as server:
        wait_output(server, "Telemetry:    on, to %s" % collector.url)
        wait_output(server, "Try:")
    assert IKEY not in server.output


# ===========================================================================
# The developer loop: reload, --check, serve(), /metrics, helps, debugging
# ===========================================================================

def test_serve_that_cannot_bind_its_health_port_stops_its_workers(tmp_path, scrubbed_environ):
    # A start-up failure after init() (here: the health port is taken) must not leave run() worker
    # threads behind in the test process.
    path = write(tmp_path, "score.py", HELLO)

    def workers():
        return sum(1 for t in threading.enumerate() if t.name.startswith("azmlinfsrv-worker"))

    assert wait_until(lambda: workers() == 0, timeout=10), threading.enumerate()  # other tests' workers are gone
    before = workers()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(azmlinfsrv.StartupError, match="already in use"):
            azmlinfsrv.serve(path, worker_count=3, health_port=taken.getsockname()[1]).__enter__()
    finally:
        taken.close()
    assert wait_until(lambda: workers() <= before, timeout=5), threading.enumerate()


RELOAD_V1 = """
def init():
    pass

def run(data):
    return {"version": 1}
"""


def test_reload_syntax_error_answers_503_naming_file_and_line_then_a_fix_recovers(tmp_path):
    with script_server(tmp_path, RELOAD_V1, ["--reload"]) as server:
        assert server.http.post("/score", b"{}").json == {"version": 1}
        write(tmp_path, "score.py", "def init():\n    pass\n\ndef run(data) oops:\n    return 1\n")
        broken = wait_until(lambda: (lambda a: a if a.status == 503 else None)(server.http.post("/score", b"{}")))
        assert broken is not None, server.output
        error = broken.json["error"]
        assert error["type"] == "SyntaxError"
        assert error["location"]["file"] == "score.py"
        assert error["location"]["line"] == 4
        assert "def run(data) oops:" in error["location"]["source"]
        assert "score.py" in broken.json["error"]["message"]
        assert server.http.get("/").status == 200  # liveness is not the script's business
        write(tmp_path, "score.py", RELOAD_V1.replace('{"version": 1}', '{"version": 2, "fixed": True}'))
        fixed = wait_until(lambda: (lambda a: a if a.status == 200 else None)(server.http.post("/score", b"{}")))
        assert fixed is not None, server.output
        assert fixed.json == {"version": 2, "fixed": True}
        metrics = server.http.get("/metrics").text
        assert "azmlinfsrv_reloads_total 1" in metrics
        assert "azmlinfsrv_reload_failures_total 1" in metrics
    failed = [line for line in server.output.splitlines() if "Reload failed" in line]
    assert len(failed) == 1  # one clear line per reload, with file, line and cause
    assert "score.py, line 4: SyntaxError" in failed[0]
    assert len([line for line in server.output.splitlines() if "Reloaded score.py" in line]) == 1


def test_reload_follows_a_helper_module_and_a_script_without_run(tmp_path):
    write(tmp_path, "helper.py", "VALUE = 'first'\n")
    script = """
    import helper

    def init():
        pass

    def run(data):
        return {"value": helper.VALUE}
    """
    write(tmp_path, "score.py", script)
    with ServerProcess(["--entry_script", "score.py", "--reload"], cwd=str(tmp_path)) as server:
        assert server.http.post("/score", b"{}").json == {"value": "first"}
        write(tmp_path, "helper.py", "VALUE = 'second, longer'\n")
        assert wait_until(lambda: server.http.post("/score", b"{}").json == {"value": "second, longer"}), \
            server.output
        write(tmp_path, "helper.py", "VALUE = (\n")
        broken = wait_until(lambda: (lambda a: a if a.status == 503 else None)(server.http.post("/score", b"{}")))
        assert broken is not None, server.output
        error = broken.json["error"]
        assert error["location"]["file"] == "helper.py" and error["location"]["line"] == 1
        assert [f["file"] for f in error["frames"]] == ["score.py", "helper.py"]  # reached via import helper
        write(tmp_path, "helper.py", "VALUE = 'third'\n")
        assert wait_until(lambda: server.http.post("/score", b"{}").json == {"value": "third"}), server.output
        write(tmp_path, "score.py", script.replace("def run(data)", "def predict(data)"))
        gone = wait_until(lambda: (lambda a: a if a.status == 503 else None)(server.http.post("/score", b"{}")))
        assert gone is not None, server.output
        assert "does not have a run() function" in gone.json["error"]["text"]
        assert gone.json["error"]["location"]["file"] == "score.py"
    assert "helper.py, line 1: SyntaxError" in server.output
    assert "(via score.py, line 2)" in server.output


EXAMPLES = os.path.join(HERE, "examples")


def test_check_passes_on_the_example_and_exits_0(tmp_path):
    report = str(tmp_path / "report.xml")
    code, output = run_cli(["--entry_script", "score.py", "--check", "requests.json", "--check_report", report],
                           cwd=EXAMPLES)
    assert code == 0, output
    assert "5 passed, 0 failed" in output
    assert output.count("PASS  ") == 5
    import xml.etree.ElementTree as ET
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite.get("tests") == "5" and suite.get("failures") == "0"


CHECKED = """
import json

def init():
    pass

def run(data):
    payload = json.loads(data)
    return {"double": payload["x"] * 2}
"""


def test_check_failure_exits_1_with_a_valid_junit_report(tmp_path):
    import xml.etree.ElementTree as ET
    write(tmp_path, "score.py", CHECKED)
    cases = [
        {"name": "doubles", "json": {"x": 2}, "expect": {"status": 200, "json": {"double": 4}}},
        {"name": "wrong <answer> & \"quotes\" \x01", "json": {"x": 3}, "expect": {"json": {"double": 7}}},
        {"name": "missing x is a 500", "json": {}, "expect": {"status": 500, "contains": "KeyError"}},
        {"name": "crash is unexpected", "json": {"y": 1}},
        {"name": "liveness", "method": "GET", "path": "/", "expect": {"contains": "Healthy"}},
    ]
    write(tmp_path, "requests.json", json.dumps(cases))
    report = str(tmp_path / "out" / "report.xml")
    os.makedirs(os.path.dirname(report))
    code, output = run_cli(["--entry_script", "score.py", "--check", "requests.json", "--check_report", report],
                           cwd=str(tmp_path))
    assert code == 1, output
    lines = output.splitlines()
    assert "3 passed, 2 failed" in lines
    assert [l.split("  ")[0] for l in lines if l.startswith(("PASS", "FAIL"))] == \
        ["PASS", "FAIL", "PASS", "FAIL", "PASS"]
    assert "status 500, expected 200" in output
    assert "KeyError" in output and "score.py, line 9" in output  # the failing case says where run() broke

    root = ET.parse(report).getroot()  # parses: well-formed, control characters replaced
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("5", "2", "0")
    float(suite.get("time"))
    testcases = suite.findall("testcase")
    assert [t.get("name") for t in testcases][0] == "doubles"
    assert testcases[1].get("name").startswith('wrong <answer> & "quotes"')
    for case in testcases:
        assert case.get("classname") and float(case.get("time")) >= 0
    failed = [t for t in testcases if t.find("failure") is not None]
    assert [t.get("name") for t in failed] == [testcases[1].get("name"), "crash is unexpected"]
    failure = failed[1].find("failure")
    assert "status 500, expected 200" in failure.get("message")
    assert "KeyError" in failure.text
    assert "KeyError" in failed[1].find("system-out").text  # the server log of the failing case


def test_check_sends_a_body_only_file_as_one_post_and_json_lines_as_cases(tmp_path):
    write(tmp_path, "score.py", CHECKED)
    write(tmp_path, "body.json", '{"x": 21}')
    code, output = run_cli(["--entry_script", "score.py", "--check", "body.json"], cwd=str(tmp_path))
    assert code == 0, output
    assert "PASS  body.json (the whole file as the body)" in output
    assert "1 passed, 0 failed" in output
    write(tmp_path, "cases.jsonl", '{"name": "one", "json": {"x": 1}, "expect": {"json": {"double": 2}}}\n'
                                   '{"x": 5}\n')
    code, output = run_cli(["--entry_script", "score.py", "--check", "cases.jsonl"], cwd=str(tmp_path))
    assert code == 0, output
    assert "PASS  one" in output and "PASS  cases.jsonl line 2" in output
    write(tmp_path, "typo.json", '[{"name": "t", "json": {"x": 1}, "expected": {"status": 200}}]')
    code, output = run_cli(["--entry_script", "score.py", "--check", "typo.json"], cwd=str(tmp_path))
    assert code == 1 and "unknown key(s) 'expected'" in output


def test_check_on_a_broken_script_exits_3_with_diagnostics(tmp_path):
    import xml.etree.ElementTree as ET
    write(tmp_path, "score.py", "def init():\n    pass\n\ndef run(data) oops:\n    pass\n")
    write(tmp_path, "requests.json", '[{"json": {"x": 1}}]')
    report = str(tmp_path / "report.xml")
    code, output = run_cli(["--entry_script", "score.py", "--check", "requests.json", "--check_report", report],
                           cwd=str(tmp_path))
    assert code == 3, output
    assert "score.py has a syntax error" in output and "at score.py, line 4" in output
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite.get("errors") == "1"
    assert "line 4" in suite.find("testcase").find("error").text


def test_check_listens_on_loopback_only(tmp_path):
    write(tmp_path, "score.py", """
    import gc, socket

    def init():
        pass

    def run(data):
        listening = []
        for obj in gc.get_objects():
            if isinstance(obj, socket.socket) and obj.fileno() >= 0:
                try:
                    if obj.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                        listening.append(obj.getsockname()[0])
                except OSError:
                    pass
        return {"listening": sorted(set(listening))}
    """)
    write(tmp_path, "requests.json", '{"json": {}, "expect": {"json": {"listening": ["127.0.0.1"]}}}')
    port = free_port()
    code, output = run_cli(["--entry_script", "score.py", "--check", "requests.json"], cwd=str(tmp_path),
                           env={"AZMLINFSRV_HOST": "0.0.0.0", "AZMLINFSRV_PORT": str(port),
                                "AZMLINFSRV_HEALTH_PORT": str(free_port())})
    assert code == 0, output
    assert "on http://127.0.0.1:" in output and ":%d" % port not in output


def test_serve_in_a_users_pytest(tmp_path, scrubbed_environ):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.txt").write_text("3")
    script = write(tmp_path, "score.py", """
    import json, os

    def init():
        global weight, greeting
        with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "weights.txt")) as f:
            weight = int(f.read())
        greeting = os.environ["GREETING"]

    def run(data):
        return {"y": json.loads(data)["x"] * weight, "greeting": greeting}
    """)
    before_env, before_path = dict(os.environ), list(sys.path)
    with azmlinfsrv.serve(script, model_dir=str(model), env={"GREETING": "hi"}) as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, headers, body = server.score({"x": 2})
        assert (status, body) == (200, {"y": 6, "greeting": "hi"})
        assert headers["content-type"] == "application/json"
        reply = server.request("GET", "/")
        assert reply.status == 200 and reply.body == b"Healthy"
        port = port_of(server)
    assert dict(os.environ) == before_env and sys.path == before_path
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    broken = write(tmp_path, "broken.py", "def init():\n    raise RuntimeError('no model')\n\ndef run(d):\n    pass\n")
    with pytest.raises(azmlinfsrv.StartupError) as info:
        with azmlinfsrv.serve(broken):
            pass
    assert "broken.py, line 2" in str(info.value) and "no model" in str(info.value)
    assert dict(os.environ) == before_env
    with pytest.raises(TypeError):
        azmlinfsrv.serve(script, workers=2)


_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"


def parse_prometheus(text):
    """A strict reading of the Prometheus text exposition format (0.0.4).

    Returns {family: {"type", "help", "samples": [(name, labels dict, value)]}}; raises
    AssertionError at the first deviation.
    """
    import math
    import re
    assert text.endswith("\n"), "the exposition must end with a newline"
    sample_re = re.compile(r"^(%s)(\{(.*)\})? (\S+)( -?\d+)?$" % _METRIC_NAME)
    label_re = re.compile(r'(%s)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"' % _LABEL_NAME)
    families, order, seen_samples = {}, [], set()
    current = None

    def family_of(name):
        for suffix, kinds in (("_bucket", ("histogram",)), ("_sum", ("histogram", "summary")),
                              ("_count", ("histogram", "summary"))):
            base = name[:-len(suffix)]
            if name.endswith(suffix) and base in families and families[base]["type"] in kinds:
                return base
        return name

    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = "line %d: %r" % (number, line)
        assert line, "empty line at " + where
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert re.match("^%s$" % _METRIC_NAME, name), where
                fam = families.setdefault(name, {"type": "untyped", "help": None, "samples": [], "typed": False})
                assert not fam["samples"], "HELP/TYPE after samples of its family at " + where
                if name not in order:
                    order.append(name)
                if parts[1] == "TYPE":
                    assert not fam["typed"], "second TYPE at " + where
                    assert len(parts) == 4 and parts[3] in ("counter", "gauge", "histogram", "summary",
                                                          "untyped"), where
                    fam["type"], fam["typed"] = parts[3], True
                else:
                    assert fam["help"] is None, "second HELP at " + where
                    help_text = parts[3] if len(parts) == 4 else ""
                    assert not re.search(r"\\[^\\n]", help_text), "bad escape in HELP at " + where
                    fam["help"] = help_text
                current = name
            continue
        match = sample_re.match(line)
        assert match, "not a sample: " + where
        name, _, label_text, value_text, _ = match.groups()
        labels = {}
        if label_text:
            position = 0
            while position < len(label_text):
                label = label_re.match(label_text, position)
                assert label, "bad label at " + where
                key = label.group(1)
                assert not key.startswith("__") and key not in labels, where
                labels[key] = label.group(2).replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
                position = label.end()
                if position < len(label_text):
                    assert label_text[position] == ",", where
                    position += 1
        if value_text in ("+Inf", "-Inf", "NaN"):
            value = float(value_text.replace("Inf", "inf").replace("NaN", "nan"))
        else:
            assert re.match(r"^[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?)$", value_text), where
            value = float(value_text)
        fam_name = family_of(name)
        assert fam_name in families, "sample before its HELP/TYPE: " + where
        assert fam_name == current, "samples of %s are not together: %s" % (fam_name, where)
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen_samples, "duplicate sample at " + where
        seen_samples.add(key)
        fam = families[fam_name]
        if fam["type"] == "counter":
            assert value >= 0 and not math.isnan(value), where
        fam["samples"].append((name, labels, value))

    for name, fam in families.items():
        if fam["type"] != "histogram":
            continue
        series = {}
        for sample, labels, value in fam["samples"]:
            rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            entry = series.setdefault(rest, {"buckets": [], "sum": None, "count": None})
            if sample == name + "_bucket":
                entry["buckets"].append((float(labels["le"].replace("+Inf", "inf")), labels["le"], value))
            elif sample == name + "_sum":
                entry["sum"] = value
            else:
                entry["count"] = value
        for rest, entry in series.items():
            bounds = [b for b, _, _ in entry["buckets"]]
            assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), name
            assert entry["buckets"][-1][1] == "+Inf", "%s%s must end with le=+Inf" % (name, rest)
            counts = [v for _, _, v in entry["buckets"]]
            assert counts == sorted(counts), "%s%s buckets are not cumulative" % (name, rest)
            assert entry["count"] == counts[-1], "%s%s: +Inf bucket != _count" % (name, rest)
            assert entry["sum"] is not None and entry["sum"] >= 0, name
    return families


def metric(families, family, sample=None, **labels):
    sample = sample or family
    for name, got, value in families[family]["samples"]:
        if name == sample and all(got.get(k) == v for k, v in labels.items()):
            return value
    return None


def test_metrics_follow_the_prometheus_text_format_and_count_what_happened(served):
    server = served("""
    import time

    def init():
        pass

    def run(data):
        if data == "boom":
            raise ValueError("boom")
        if data == "slow":
            time.sleep(1.0)
        return {"ok": data}
    """, worker_count=2, scoring_timeout_ms=400)
    http = http_for(server)
    assert http.post("/score", b"a").status == 200
    assert http.post("/score", b"b").status == 200
    assert http.post("/score", b"boom").status == 500
    assert http.post("/score", b"slow").status == 500  # a timeout
    assert http.get("/nothing-here").status == 404
    assert http.get("/").status == 200
    # A request is counted once its answer has been sent, so the client can be a hair faster than the
    # count: scrape until the connection threads of the requests above have finished their bookkeeping.
    def settled():
        answer = http.get("/metrics")
        assert answer.status == 200
        families = parse_prometheus(answer.text)
        if (metric(families, "azmlinfsrv_requests_in_flight") == 1
                and metric(families, "azmlinfsrv_requests_total", route="/", status="200") == 1):
            return answer, families
        return None

    scraped = wait_until(settled, timeout=5, interval=0.05)
    assert scraped, http.get("/metrics").text
    answer, first = scraped
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert metric(first, "azmlinfsrv_requests_total", route="/score", status="200") == 2
    assert metric(first, "azmlinfsrv_requests_total", route="/score", status="500") == 2
    assert metric(first, "azmlinfsrv_requests_total", route="(other)", status="404") == 1
    assert metric(first, "azmlinfsrv_requests_total", route="/", status="200") == 1
    assert first["azmlinfsrv_request_duration_seconds"]["type"] == "histogram"
    assert metric(first, "azmlinfsrv_request_duration_seconds", "azmlinfsrv_request_duration_seconds_count",
                  route="/score") == 4
    assert metric(first, "azmlinfsrv_run_duration_seconds", "azmlinfsrv_run_duration_seconds_count") == 3
    assert metric(first, "azmlinfsrv_timeouts_total") == 1
    assert metric(first, "azmlinfsrv_run_errors_total") == 1
    assert metric(first, "azmlinfsrv_workers") == 2
    assert metric(first, "azmlinfsrv_queue_depth") == 0
    assert metric(first, "azmlinfsrv_requests_in_flight") == 1  # this scrape
    assert metric(first, "azmlinfsrv_reloads_total") == 0
    assert metric(first, "azmlinfsrv_reload_failures_total") == 0
    assert metric(first, "azmlinfsrv_telemetry_items_sent_total") == 0
    assert metric(first, "azmlinfsrv_telemetry_items_dropped_total") == 0
    for fam in first.values():
        assert fam["help"] and fam["typed"]
    assert http.post("/score", b"c").status == 200
    second = wait_until(lambda: (lambda families: families if metric(
        families, "azmlinfsrv_requests_total", route="/score", status="200") == 3 else None)(
        parse_prometheus(http.get("/metrics").text)), timeout=5, interval=0.05)
    assert second, http.get("/metrics").text
    for name, fam in first.items():
        if fam["type"] not in ("counter", "histogram"):
            continue
        for sample, labels, value in fam["samples"]:
            if sample.endswith("_bucket") or sample.endswith("_count") or fam["type"] == "counter":
                assert metric(second, name, sample, **labels) >= value, (sample, labels)
    assert metric(second, "azmlinfsrv_requests_total", route="/score", status="200") == 3
    assert metric(second, "azmlinfsrv_requests_total", route="/metrics", status="200") >= 1


def test_metrics_can_be_switched_off(tmp_path):
    with script_server(tmp_path, HELLO, ["--metrics", "false"]) as server:
        answer = server.http.get("/metrics")
        assert answer.status == 404 and answer.json["message"].startswith("The requested URL was not found")
        wait_output(server, "Try:")  # the banner's last line: the routes are listed above it
        assert "/metrics" not in server.output
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path),
                       env={"AZMLINFSRV_METRICS": "false"}) as server:
        assert server.http.get("/metrics").status == 404
        wait_output(server, "Try:")
        assert "/metrics" not in server.output
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:  # on: listed and served
        assert server.http.get("/metrics").status == 200
        wait_output(server, "Metrics:        GET  http://127.0.0.1:%d/metrics" % server.port)  # "/metrics" too


def test_run_returning_json_text_is_warned_once(tmp_path):
    write(tmp_path, "score.py", """
    import json

    def init():
        pass

    def run(data):
        return json.dumps({"label": "cat"})
    """)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        for _ in range(3):
            answer = server.http.post("/score", b"{}")
            assert answer.json == '{"label": "cat"}'  # what the reference sends too: a JSON string
        assert wait_until(lambda: "clients receive a JSON *string*" in server.output, timeout=5)
    warnings = [l for l in server.output.splitlines() if "clients receive a JSON *string*" in l]
    assert len(warnings) == 1
    assert '"{\\"label\\": \\"cat\\"}"' in warnings[0] and "json.dumps" in warnings[0]


def test_banner_shows_python_app_root_model_dir_and_urls(tmp_path):
    write(tmp_path, "score.py", HELLO)
    model = tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "model.pkl").write_bytes(b"x" * 2048)
    (model / "tokenizer" / "vocab.txt").write_text("a b c")
    for index in range(12):
        (model / ("shard_%02d.bin" % index)).write_bytes(b"")
    with ServerProcess(["--entry_script", "score.py", "--model_dir", str(model)], cwd=str(tmp_path)) as server:
        port = server.port
    out = server.output
    assert "Python:       %s" % sys.executable in out
    assert "App root:     %s" % os.path.realpath(str(tmp_path)) in out or "App root:     %s" % tmp_path in out
    assert "Model dir:    %s" % model in out
    assert "model.pkl  (2.0 KB)" in out
    assert "... and" in out  # only the first lines of a large model directory
    assert "POST http://127.0.0.1:%d/score" % port in out
    assert "GET  http://127.0.0.1:%d/metrics" % port in out
    assert "curl -d" in out


DEBUG_SCORE = """
import sys

def init():
    pass

def run(data):
    loaded = "debugpy" in sys.modules
    return {"debugpy_loaded": loaded}
"""
DEBUG_RUN_LINE = 8  # the first line of run() in DEBUG_SCORE (it starts with a newline)


def _stop_in_run_and_continue(dap, server, script):
    """VS Code's sequence: breakpoint on run()'s first line, POST /score, check where it stopped, continue."""
    dap.request("initialize", clientID="test", adapterID="debugpy", pathFormat="path",
                linesStartAt1=True, columnsStartAt1=True)
    dap.send("attach", justMyCode=True)  # answered after configurationDone by debugpy's adapter
    dap.event("initialized")
    placed = dap.request("setBreakpoints", source={"path": os.path.realpath(script)},
                         breakpoints=[{"line": DEBUG_RUN_LINE}])
    assert placed["breakpoints"][0]["verified"], placed
    with pytest.raises(OSError):  # nothing answers until the debugger says configurationDone
        server.http.get("/", timeout=0.5)
    dap.request("configurationDone")
    server.wait_ready()
    answers = []
    poster = threading.Thread(target=lambda: answers.append(server.http.post("/score", b"{}")))
    poster.start()
    stopped = dap.event("stopped")
    assert stopped["body"]["reason"] == "breakpoint", stopped
    thread_id = stopped["body"]["threadId"]
    threads = dap.request("threads")["threads"]
    name = [t["name"] for t in threads if t["id"] == thread_id]
    assert name and "azmlinfsrv-worker" in name[0], threads  # run() runs on a pool thread
    top = dap.request("stackTrace", threadId=thread_id)["stackFrames"][0]
    assert top["name"] == "run" and top["line"] == DEBUG_RUN_LINE, top
    assert os.path.realpath(top["source"]["path"]) == os.path.realpath(script), top
    assert not answers  # the request waits at the breakpoint
    dap.request("continue", threadId=thread_id)
    poster.join(30)
    assert answers and answers[0].status == 200, answers
    assert answers[0].json == {"debugpy_loaded": True}


def test_debug_port_breakpoint_in_run_stops_on_the_pool_thread(tmp_path):
    """The README's attach configuration: VS Code listens, AZUREML_DEBUG_PORT makes the server connect."""
    pytest.importorskip("debugpy", reason="debugpy (a test-only dependency) is not installed")
    script = write(tmp_path, "score.py", DEBUG_SCORE)
    with open(script, encoding="utf-8") as handle:
        assert handle.read().splitlines()[DEBUG_RUN_LINE - 1].strip() == 'loaded = "debugpy" in sys.modules'
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(30)
    debug_port = listener.getsockname()[1]
    env = {"AZUREML_DEBUG_PORT": str(debug_port), "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    # --processes 2: debugging serves in one process, or a breakpoint could miss the request.
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "2", "--processes", "2"],
                       cwd=str(tmp_path), env=env, wait=False) as server:
        conn, _ = listener.accept()
        listener.close()
        with conn:
            _stop_in_run_and_continue(DapClient(conn), server, script)
    out = server.output
    assert "!! Starting the inference server in DEBUGGING mode because AZUREML_DEBUG_PORT is set." in out
    assert "** Connecting to debugger at port %d..." % debug_port in out
    assert "serving in one process (not 2)" in out
    assert "Pre-fork mode" not in out


def test_debugpy_launch_breakpoint_in_run_stops_on_the_pool_thread(tmp_path):
    pytest.importorskip("debugpy", reason="debugpy (a test-only dependency) is not installed")
    script = write(tmp_path, "score.py", DEBUG_SCORE)
    debug_port = free_port()
    with _LaunchedByDebugpy(["--entry_script", "score.py", "--worker_count", "2"], str(tmp_path),
                            debug_port) as server:
        def connect():
            try:
                return socket.create_connection(("127.0.0.1", debug_port), timeout=1)
            except OSError:
                assert server.proc.poll() is None, server.output
                return None
        conn = wait_until(connect, timeout=30, interval=0.05)
        assert conn, server.output
        with conn:
            _stop_in_run_and_continue(DapClient(conn), server, script)
    assert "DEBUGGING mode" not in server.output  # no AZUREML_DEBUG_PORT: the launcher did it (the words
    # are there with AZUREML_DEBUG_PORT: test_debug_port_breakpoint_in_run_stops_on_the_pool_thread)


def test_debug_port_breakpoint_in_init_stops_before_serving(tmp_path):
    """From a config file too (the reference reads AZUREML_DEBUG_PORT there); init() stops, then serving starts."""
    pytest.importorskip("debugpy", reason="debugpy (a test-only dependency) is not installed")
    script = write(tmp_path, "score.py", DEBUG_SCORE)
    init_line = DEBUG_SCORE.splitlines().index("    pass") + 1
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(30)
    write(tmp_path, "config.json", json.dumps({"AZUREML_DEBUG_PORT": listener.getsockname()[1]}))
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), wait=False,
                       env={"PYDEVD_DISABLE_FILE_VALIDATION": "1"}) as server:
        conn, _ = listener.accept()
        listener.close()
        with conn:
            dap = DapClient(conn)
            dap.request("initialize", clientID="test", adapterID="debugpy", pathFormat="path",
                        linesStartAt1=True, columnsStartAt1=True)
            dap.send("attach", justMyCode=True)
            dap.event("initialized")
            dap.request("setBreakpoints", source={"path": os.path.realpath(script)},
                        breakpoints=[{"line": init_line}])
            dap.request("configurationDone")
            stopped = dap.event("stopped")
            top = dap.request("stackTrace", threadId=stopped["body"]["threadId"])["stackFrames"][0]
            assert (top["name"], top["line"]) == ("init", init_line), top
            with pytest.raises(OSError):  # init() has not finished: nothing is served yet
                server.http.get("/", timeout=0.5)
            dap.request("continue", threadId=stopped["body"]["threadId"])
            server.wait_ready()
            assert server.http.post("/score", b"{}").json == {"debugpy_loaded": True}


def test_debugpy_is_not_imported_without_debug_port(tmp_path):
    with script_server(tmp_path, DEBUG_SCORE) as server:
        assert server.http.post("/score", b"{}").json == {"debugpy_loaded": False}
        wait_output(server, "Try:")  # the banner's last line; the debugger's comes before it
    # the same words are there with AZUREML_DEBUG_PORT: test_debug_port_breakpoint_in_run_stops_on_the_pool_thread
    assert "DEBUGGING mode" not in server.output


def test_debug_port_without_debugpy_is_a_clear_startup_error(tmp_path):
    write(tmp_path, "score.py", DEBUG_SCORE)
    # -S -E: no site-packages, no PYTHONPATH: debugpy cannot be imported whether or not this machine has it.
    code, out = run_cli(["--entry_script", "score.py"], cwd=str(tmp_path), python_args=["-S", "-E"],
                        env={"AZUREML_DEBUG_PORT": str(free_port())})
    assert code == 3, out
    assert "** Cannot connect to a debugger because debugpy is not installed." in out
    assert "AZUREML_DEBUG_PORT=" in out and "pip install debugpy" in out
    assert "Invoking user's init" not in out  # there on a normal start: test_startup_prints_the_references...


def test_debug_port_with_no_debugger_listening_is_a_clear_startup_error(tmp_path):
    pytest.importorskip("debugpy", reason="debugpy (a test-only dependency) is not installed")
    write(tmp_path, "score.py", DEBUG_SCORE)
    closed = free_port()
    code, out = run_cli(["--entry_script", "score.py", "--port", str(free_port())], cwd=str(tmp_path),
                        env={"AZUREML_DEBUG_PORT": str(closed)})
    assert code == 3, out
    assert "No debugger is listening on 127.0.0.1:%d (AZUREML_DEBUG_PORT)" % closed in out


# ===========================================================================
# Deployment files and endpoint emulation: --deployment, --emulate_endpoint, drift
# ===========================================================================

# testdata/deployments/azureml-examples holds copies of Azure/azureml-examples files (see its README.md);
# the synthetic deployments below are JSON, so that only the tests that read YAML need PyYAML.

AZURE_EXAMPLES = os.path.join(HERE, "testdata", "deployments", "azureml-examples")
BLUE = os.path.join(AZURE_EXAMPLES, "managed", "sample", "blue-deployment.yml")
BLUE_JSON = os.path.join(AZURE_EXAMPLES, "managed", "sample", "blue-deployment.json")
MODEL1 = os.path.join(AZURE_EXAMPLES, "model-1")
SCHEMA_SAMPLE = os.path.join(AZURE_EXAMPLES, "managed", "inference-schema")

# Stand-in for model-1's score.py where scikit-learn is not installed: the same model path expression,
# the pickle read as bytes instead of unpickled; it reports what the script sees of the layout.
MODEL1_STANDIN = """
import json, os
def init():
    global model_bytes
    model_path = os.path.join(os.getenv("AZUREML_MODEL_DIR"), "model/sklearn_regression_model.pkl")
    with open(model_path, "rb") as handle:
        model_bytes = handle.read()
def run(raw_data):
    data = json.loads(raw_data)["data"]
    model_dir = os.environ["AZUREML_MODEL_DIR"]
    return {"rows": len(data), "model_bytes": len(model_bytes),
            "pickled": model_bytes[3:60].decode("latin-1"), "entries": sorted(os.listdir(model_dir)),
            "link": os.path.islink(os.path.join(model_dir, "model")),
            "target": os.path.realpath(os.path.join(model_dir, "model"))}
"""

SLEEPY = """
import json, os, time
def init(): pass
def run(raw):
    data = json.loads(raw)
    if data.get("hold"):
        print("holding %s" % data["hold"])
        deadline = time.time() + 20
        while not os.path.exists(os.environ["RELEASE_FILE"]) and time.time() < deadline:
            time.sleep(0.01)
    time.sleep(data.get("sleep", 0))
    return {"slept": data.get("sleep", 0), "greeting": os.environ.get("GREETING"),
            "shadowed": os.environ.get("SHADOWED"), "entries": sorted(os.listdir(os.environ["AZUREML_MODEL_DIR"]))}
"""


def deployment_file(folder, script=SLEEPY, **fields):
    """A JSON deployment in folder/dep: code in dep/src, a one-file model dep/weights.bin."""
    dep = os.path.join(str(folder), "dep")
    write(dep, "src/score.py", script)
    write(dep, "weights.bin", "w")
    doc = {"$schema": "https://azuremlschemas.azureedge.net/latest/managedOnlineDeployment.schema.json",
           "name": "green", "endpoint_name": "local", "model": {"path": "weights.bin"},
           "code_configuration": {"code": "src", "scoring_script": "score.py"}, "instance_count": 1}
    doc.update(fields)
    path = os.path.join(dep, "deployment.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(doc, handle)
    return path


def test_deployment_model1_mounts_the_model_folder_under_its_name(tmp_path):
    pytest.importorskip("yaml")
    standin = write(tmp_path, "standin.py", MODEL1_STANDIN)
    with open(os.path.join(MODEL1, "sample-request.json"), "rb") as handle:
        sample = handle.read()
    with ServerProcess(["--deployment", BLUE, "--entry_script", standin], cwd=str(tmp_path)) as server:
        answer = server.http.post("/score", sample, headers={"Content-Type": "application/json"})
        assert answer.status == 200, server.output
        seen = answer.json
        # As the endpoint mounts a registered folder: AZUREML_MODEL_DIR/model/..., linked, not copied.
        assert seen["entries"] == ["model"] and seen["link"] is True
        assert seen["target"] == os.path.realpath(os.path.join(MODEL1, "model"))
        assert seen["rows"] == 2 and seen["model_bytes"] == 756 and "LinearRegression" in seen["pickled"]
        wait_output(server, "timeout 5000 ms")  # request_timeout_ms's default, not the reference's hour
        wait_output(server, "Deployment:   blue (endpoint my-endpoint)")
        wait_output(server, "[deployment (AZUREML_MODEL_DIR)]")


def test_deployment_model1_real_score_script_answers_the_sample_request(tmp_path):
    pytest.importorskip("yaml")
    pytest.importorskip("numpy")
    pytest.importorskip("joblib")
    pytest.importorskip("sklearn")
    with open(os.path.join(MODEL1, "sample-request.json"), "rb") as handle:
        sample = handle.read()
    with ServerProcess(["--deployment", BLUE], cwd=str(tmp_path)) as server:
        answer = server.http.post("/score", sample, headers={"Content-Type": "application/json"})
        assert answer.status == 200, server.output
        assert [round(v, 3) for v in answer.json] == [11055.977, 4503.08]


def test_deployment_inference_schema_sample_answers_its_sample_input(tmp_path):
    pytest.importorskip("yaml")
    pytest.importorskip("inference_schema")
    pytest.importorskip("joblib")
    sklearn = pytest.importorskip("sklearn")
    if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 3):
        pytest.skip("the sample's iris.pkl (scikit-learn 1.0.2) does not unpickle in scikit-learn >= 1.3")
    with open(os.path.join(SCHEMA_SAMPLE, "sample-inputs", "standard.json"), "rb") as handle:
        sample = handle.read()
    local = os.path.join(SCHEMA_SAMPLE, "deployment-standard-local.yml")
    with ServerProcess(["--deployment", local], cwd=str(tmp_path)) as server:
        answer = server.http.post("/score", sample, headers={"Content-Type": "application/json"})
        assert answer.status == 200, server.output
        assert answer.json == {"Category": ["Virginica", "Setosa"]}


def test_deployment_registered_model_is_a_clear_error(tmp_path):
    pytest.importorskip("yaml")
    code, output = run_cli(["--deployment", os.path.join(SCHEMA_SAMPLE, "deployment-standard.yml")],
                           cwd=str(tmp_path))
    assert code == 3, output
    assert "azureml:azureml-infschema:1" in output and "local copy" in output and "--model_dir" in output


def test_deployment_environment_variables_limits_and_warnings(tmp_path):
    path = deployment_file(tmp_path, environment_variables={"GREETING": "hello", "WORKER_COUNT": 2,
                                                            "SHADOWED": "from-deployment"},
                           request_settings={"request_timeout_ms": 1500, "max_queue_wait_ms": 500},
                           scale_settings={"type": "default"})
    with ServerProcess(["--deployment", path, "--worker_count", "3"], cwd=str(tmp_path),
                       env={"SHADOWED": "from-shell"}) as server:
        answer = post_json(server, {})
        assert answer.status == 200, server.output
        assert answer.json["greeting"] == "hello" and answer.json["shadowed"] == "from-deployment"
        assert answer.json["entries"] == ["weights.bin"]  # a one-file model: the file itself
        out = wait_output(server, "Try:") and server.output  # the banner's last line
        assert "3 run() at once" in out and "timeout 1500 ms" in out  # the flag beats WORKER_COUNT: 2
        assert "WORKER_COUNT is 3 (command line) but request_settings.max_concurrent_requests_per_instance is 1" \
            in out
        assert out.count("does not emulate") == 1
        assert "request_settings.max_queue_wait_ms, scale_settings" in out
        assert "SHADOWED=from-deployment" in out  # the shell's value is named as not used


def test_emulated_408_when_the_answer_is_later_than_request_timeout_ms(tmp_path):
    path = deployment_file(tmp_path, request_settings={"request_timeout_ms": 400},
                           environment_variables={"SCORING_TIMEOUT_MS": 5000})
    with ServerProcess(["--deployment", path, "--emulate_endpoint"], cwd=str(tmp_path)) as server:
        fast = post_json(server, {"sleep": 0})
        assert fast.status == 200 and "x-azmlinfsrv-server-status" not in fast.headers
        slow = post_json(server, {"sleep": 0.7})
        assert slow.status == 408
        assert slow.headers["x-azmlinfsrv-server-status"] == "200"
        assert slow.json["slept"] == 0.7  # the server's own answer, kept
        took = wait_output(server, re.compile(r"408: run\(\) took (\d+\.\d) s, request_timeout_ms is 400"))
        assert float(took.group(1)) >= 0.7, server.output
        wait_output(server, "more than request_timeout_ms 400")


def test_emulated_424_keeps_the_scripts_status_in_model_error_headers(tmp_path):
    script = """
    from azureml_inference_server_http.api.aml_response import AMLResponse
    def init(): pass
    def run(data):
        if data == "boom":
            raise ValueError("boom")
        if data == "teapot":
            return AMLResponse("short and stout", 418)
        return {"ok": True}
    """
    path = deployment_file(tmp_path, script=script)
    with ServerProcess(["--deployment", path, "--emulate_endpoint"], cwd=str(tmp_path)) as server:
        ok = server.http.post("/score", b"fine")
        assert ok.status == 200 and "ms-azureml-model-error-statuscode" not in ok.headers
        boom = server.http.post("/score", b"boom")
        assert boom.status == 424
        assert boom.headers["ms-azureml-model-error-statuscode"] == "500"
        assert boom.headers["ms-azureml-model-error-reason"] == "Internal Server Error"
        assert boom.json["message"].startswith("An unexpected error occurred in scoring script")
        teapot = server.http.post("/score", b"teapot")
        assert (teapot.status, teapot.headers["ms-azureml-model-error-statuscode"]) == (424, "418")
        assert teapot.body == b"short and stout"
        put = server.http.request("PUT", "/score", b"x")
        assert (put.status, put.headers["ms-azureml-model-error-statuscode"]) == (424, "405")
        wait_output(server, "424: the server answered 500 Internal Server Error")


def test_emulated_429_beyond_twice_max_concurrent_times_instance_count(tmp_path):
    release = os.path.join(str(tmp_path), "release")
    path = deployment_file(tmp_path, instance_count=2,
                           request_settings={"max_concurrent_requests_per_instance": 1},
                           environment_variables={"WORKER_COUNT": 4, "RELEASE_FILE": release})
    with ServerProcess(["--deployment", path, "--emulate_endpoint"], cwd=str(tmp_path)) as server:
        answers = {}

        def hold(n):
            answers[n] = post_json(server, {"hold": n})

        threads = [threading.Thread(target=hold, args=(n,)) for n in range(1, 5)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: server.output.count("holding") >= 4, timeout=20, interval=0.02), server.output
        assert server.output.count("holding") == 4, server.output
        rejected = post_json(server, {})
        assert rejected.status == 429
        assert "allows 4 (2 x max_concurrent_requests_per_instance 1 x instance_count 2)" in \
            rejected.headers["x-azmlinfsrv-endpoint"]
        assert "x-azmlinfsrv-server-status" not in rejected.headers  # never reached the server
        open(release, "w").close()
        for thread in threads:
            thread.join(20)
        assert sorted(a.status for a in answers.values()) == [200] * 4
        assert post_json(server, {}).status == 200  # the slots came back
        wait_output(server, "429: 4 requests in flight already")


CONDA_WITH_DRIFT = """
name: planted
channels: [conda-forge]
dependencies:
  - python={python}
  - pip
  - pip:
    - pytest==0.0.1
    - Pluggy=={pluggy}
    - no-such-package-azmlinfsrv==1.0
    - packaging>=20
    - azureml-inference-server-http==1.4.1
"""


def test_drift_check_reports_a_planted_mismatch_and_strict_stops(tmp_path):
    pytest.importorskip("yaml")
    import pluggy
    write(tmp_path, "dep/conda.yml", CONDA_WITH_DRIFT.format(python="%d.%d" % sys.version_info[:2],
                                                             pluggy=pluggy.__version__))
    path = deployment_file(tmp_path, environment={"conda_file": "conda.yml", "image": "mcr.microsoft.com/x"})
    with ServerProcess(["--deployment", path], cwd=str(tmp_path)) as server:
        assert post_json(server, {}).status == 200
    out = server.output  # complete: leaving the block stopped the server and joined its reader
    table = out[out.index("Environment drift:"):]
    assert re.search(r"pytest\s+==0\.0\.1\s+%s\s+MISMATCH" % re.escape(pytest.__version__), table), table
    assert re.search(r"no-such-package-azmlinfsrv\s+==1\.0\s+-\s+MISSING", table), table
    assert "2 other pin(s) match" in table  # python=3.x and Pluggy (pluggy, normalised)
    assert "Unchecked (not pinned with == or conda's =): pip, packaging>=20" in table
    assert "Not compared (this server stands in for it): azureml-inference-server-http==1.4.1" in table
    code, output = run_cli(["--deployment", path, "--strict_environment"], cwd=str(tmp_path))
    assert code == 3 and "pytest" in output and "--strict_environment" in output, output


def test_yaml_deployment_without_pyyaml_is_a_clear_error_and_json_works(tmp_path):
    shadow = write(tmp_path, "no_yaml/yaml.py", "raise ImportError(\"No module named 'yaml'\")\n")
    env = {"PYTHONPATH": os.path.dirname(shadow)}
    code, output = run_cli(["--deployment", BLUE], env=env, cwd=str(tmp_path))
    assert code == 3, output
    assert "needs PyYAML" in output and "-m pip install pyyaml" in output and ".json file" in output
    standin = write(tmp_path, "standin.py", MODEL1_STANDIN)
    with ServerProcess(["--deployment", BLUE_JSON, "--entry_script", standin], env=env,
                       cwd=str(tmp_path)) as server:
        answer = post_json(server, {"data": [[1] * 10]})
        assert answer.status == 200 and answer.json["entries"] == ["model"], server.output
        wait_output(server, "Environment drift check skipped")  # conda.yaml is YAML
        wait_output(server, "needs PyYAML")


def test_check_with_deployment_and_emulation_fails_a_request_that_would_time_out(tmp_path):
    path = deployment_file(tmp_path, request_settings={"request_timeout_ms": 300})
    cases = os.path.join(str(tmp_path), "requests.json")
    with open(cases, "w") as handle:
        json.dump([{"name": "fast", "json": {"sleep": 0}}, {"name": "slow", "json": {"sleep": 1.0}}], handle)
    code, output = run_cli(["--deployment", path, "--emulate_endpoint", "--check", cases], cwd=str(tmp_path))
    assert code == 1, output
    assert "PASS  fast" in output and "FAIL  slow" in output and "status 408, expected 200" in output
    assert "408: run() was still running after" in output
    code, output = run_cli(["--deployment", path, "--check", cases], cwd=str(tmp_path))
    assert code == 1 and "status 500, expected 200" in output, output  # the deployment's timeout, not emulated


def test_start_up_longer_than_the_liveness_probe_allows_is_warned(tmp_path):
    script = """
    import time
    def init():
        time.sleep(2.3)
    def run(data):
        return data
    """
    path = deployment_file(tmp_path, script=script,
                           liveness_probe={"initial_delay": 1, "period": 1, "failure_threshold": 1})
    with ServerProcess(["--deployment", path], cwd=str(tmp_path)) as server:
        assert server.http.post("/score", b"x").status == 200
        wait_output(server, re.compile(r"Start-up took 2\.\d s; the liveness probe allows 2 s \(initial_delay 1 \+ "
                                       r"failure_threshold 1 x period 1\)"))
        wait_output(server, "liveness every 1 s after 1 s, restart after 1 failures")


# =====================================================================================================
# Drop-in checks against real scripts: what the reference's own black-box tests and the azureml-examples
# score scripts rely on
# =====================================================================================================

PRINT_AND_FAIL = """
import json
def init():
    print("Initializing")
def run(data):
    token = json.loads(data)["token"]
    print("printed by run %s" % token)
    if token.startswith("fail"):
        raise ValueError("failing on purpose %s" % token)
    return {"token": token}
"""


def test_run_output_is_on_stdout_before_the_answer_is_sent(tmp_path):
    # The reference writes print() and its run() traceback synchronously, before the answer: its black-box
    # tests read the log file as soon as the answer is in, then SIGKILL the server.
    write(tmp_path, "score.py", PRINT_AND_FAIL)
    server = ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path),
                           log_file=str(tmp_path / "stdout.txt"))
    try:
        for i in range(40):
            token = ("fail-%d" if i % 4 == 3 else "ok-%d") % i
            answer = server.http.post("/score", json.dumps({"token": token}).encode(),
                                      headers={"Content-Type": "application/json"})
            assert answer.status == (500 if token.startswith("fail") else 200), answer.body
            output = server.output
            assert "printed by run %s\n" % token in output, (token, output[-2000:])
            if token.startswith("fail"):
                assert "ValueError: failing on purpose %s" % token in output, (token, output[-2000:])
        answer = server.http.post("/score", b'{"token": "last"}', headers={"Content-Type": "application/json"})
        assert answer.status == 200
    finally:
        server.kill()
    assert "printed by run last\n" in server.output


# binary-payloads/code/multi-file-to-json-score.py from azureml-examples, without PIL (the sizes are lengths)
MULTI_FILE_TO_JSON = """
from azureml.contrib.services.aml_request import AMLRequest, rawhttp

def init():
    pass

@rawhttp
def run(req: AMLRequest):
    files = req.files.getlist("file[]")
    sizes = [{"filename": f.filename, "size": len(f.stream.read())} for f in files]
    return {"response": sizes, "form": dict(req.form.lists()), "data": req.get_data(as_text=True)}
"""


@pytest.mark.parametrize("content_type, body, data", [
    ("multipart/form-data", b"garbage", "garbage"),  # no boundary: werkzeug leaves the body unread
    ("multipart/form-data; boundary=x", b"garbage", ""),
    ("multipart/form-data; boundary=x", b"", ""),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue', ""),
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n'
                                        b'--x\r\nContent-Disposition: form-data; name="file[]"; filename="q"\r\n'
                                        b'\r\nfff\r\n', ""),  # a complete part, then no closing boundary
    ("multipart/form-data; boundary=x", b"--x\r\nno colon here\r\n\r\nvalue\r\n--x--\r\n", ""),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Type: text/plain\r\n\r\nvalue\r\n--x--\r\n", ""),
])
def test_a_malformed_multipart_upload_is_an_empty_form_as_werkzeug_parses_it(served, content_type, body, data):
    # werkzeug (the reference's Request) parses forms silently: a body it cannot parse gives empty form and
    # files, and the script answers; it is not a 500 from req.files.
    server = served(MULTI_FILE_TO_JSON)
    port = port_of(server)
    answer = Http(port).post("/score", body, headers={"Content-Type": content_type})
    assert answer.status == 200, answer.body
    assert json.loads(answer.body) == {"response": [], "form": {}, "data": data}
    good = (b'--x\r\nContent-Disposition: form-data; name="file[]"; filename="a.jpg"\r\n'
            b'Content-Type: image/jpeg\r\n\r\nJPEG\r\n--x--\r\n')
    answer = Http(port).post("/score", good, headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert json.loads(answer.body) == {"response": [{"filename": "a.jpg", "size": 4}], "form": {}, "data": ""}


# ===========================================================================
# The docs: README.md is the short path, docs/ the manual; every relative link resolves
# ===========================================================================

_DOC_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _doc_files():
    docs = os.path.join(HERE, "docs")
    return [os.path.join(HERE, "README.md")] + sorted(
        os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md"))


def _doc_text(path):
    """The file's text without fenced code blocks and HTML comments (a link in an example is not a link)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return re.sub(r"^```.*?^```|<!--.*?-->", "", text, flags=re.S | re.M)


def _doc_anchors(path):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _doc_text(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else "%s-%d" % (slug, count))
    return anchors


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for source in _doc_files():
        for target in _DOC_LINK.findall(_doc_text(source)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:: not checked offline
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(source), path)) if path else source
            where = "%s -> %s" % (os.path.relpath(source, HERE), target)
            if not os.path.exists(resolved):
                broken.append(where + ": no such file")
            elif anchor and (not resolved.endswith(".md") or anchor not in _doc_anchors(resolved)):
                broken.append(where + ": no such heading")
    assert not broken, "\n".join(broken)


def test_the_docs_index_and_the_readme_link_every_docs_page():
    pages = {os.path.basename(path) for path in _doc_files()[1:]} - {"README.md"}
    index = {target.partition("#")[0] for target in _DOC_LINK.findall(_doc_text(os.path.join(HERE, "docs", "README.md")))}
    readme = {target.partition("#")[0] for target in _DOC_LINK.findall(_doc_text(os.path.join(HERE, "README.md")))}
    assert pages - index == set(), "pages missing from docs/README.md"
    assert {"docs/" + page for page in pages} - readme == set(), "pages missing from README.md's list"


def test_readme_first_screen_has_the_two_commands():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as handle:
        first_screen = handle.read().splitlines()[:15]
    assert any(line.startswith("python3 azmlinfsrv.py --entry_script examples/score.py") for line in first_screen)
    assert any(line.startswith("python3 -m pip install pytest && python3 -m pytest -q") for line in first_screen)
    assert os.path.exists(os.path.join(HERE, "examples", "score.py"))


def test_the_readmes_settings_rows_are_the_settings_pages_rows():
    """README.md repeats the settings most people touch: each row as docs/settings.md has it."""
    with open(os.path.join(HERE, "docs", "settings.md"), encoding="utf-8") as handle:
        page = set(handle.read().splitlines())
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as handle:
        rows = [line for line in handle.read().splitlines() if re.match(r"\| (`--|\s*\| `)", line)]
    assert len(rows) >= 5, rows
    assert [row for row in rows if row not in page] == []


# ===========================================================================
# Tracing (issue 17): W3C trace context, OTLP/HTTP trace export, JSON logs
# ===========================================================================
# One loopback receiver plays both collectors: App Insights' ingestion API (/v2/track, gzip'd JSON) and
# an OTLP/HTTP traces endpoint (/v1/traces, protobuf or JSON). The OTLP bodies are decoded with the
# official opentelemetry-proto definitions (a test-only dependency that .ci/run installs, pinned).

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
CALLER_TRACEPARENT = "00-%s-%s-01" % (CALLER_TRACE, CALLER_SPAN)
TRACE_IKEY = "1b0e8f6c-2d4a-4b7e-9c3f-0a1b2c3d4e5f"

TRACED_SCORE = """
import logging

def init():
    pass

def run(data, request_headers):
    print("run() got", data)
    if data == '"boom"':
        raise ValueError("boom in run")
    return {"traceparent": request_headers.get("Traceparent"), "tracestate": request_headers.get("Tracestate")}
"""


def otlp_proto():
    """The official definitions (opentelemetry-proto + protobuf), or a skip; a failure where CI requires them."""
    try:
        from google.protobuf import json_format
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    except ImportError as exc:
        if os.environ.get("AZMLINFSRV_OTLP_PROTO_REQUIRED") == "1":
            raise AssertionError("opentelemetry-proto and protobuf are required here (.ci/run installs them): %s"
                                 % exc)
        pytest.skip("opentelemetry-proto and protobuf are not installed (.ci/run installs them)")
    return json_format, trace_service_pb2


class TraceReceiver:
    """A loopback collector: App Insights items at /v2/track, OTLP trace exports at /v1/traces.

    ``plan`` holds the statuses for the next OTLP uploads (then 200).
    """

    def __init__(self):
        import gzip
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        receiver = self
        self.lock = threading.Lock()
        self.ai_items = []
        self.otlp = []  # (headers, body, status answered), every attempt
        self.plan = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 200
                with receiver.lock:
                    if self.path == "/v2/track":
                        receiver.ai_items.extend(json.loads(gzip.decompress(body).decode("utf-8")))
                    elif self.path == "/v1/traces":
                        status = receiver.plan.pop(0) if receiver.plan else 200
                        receiver.otlp.append((dict((k.lower(), v) for k, v in self.headers.items()), body, status))
                    else:
                        status = 404
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def ai(self, kind):
        with self.lock:
            return [i for i in self.ai_items if i["data"]["baseType"] == kind]

    def accepted_exports(self):
        with self.lock:
            return [(h, b) for h, b, status in self.otlp if status == 200]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = TraceReceiver()
    yield r
    r.close()


def ai_env(receiver, **extra):
    env = {"AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_INSIGHTS_KEY": TRACE_IKEY,
           "AML_APP_INSIGHTS_ENDPOINT": receiver.base + "/v2/track", "AZMLINFSRV_TELEMETRY_FLUSH_SECONDS": "0.1"}
    env.update(extra)
    return env


def otlp_env(receiver, protocol="http/protobuf", **extra):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.base, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
           "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "scorer",
           "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,team=ml%20ops",
           "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s%3Dcret,x-tenant=t1"}
    env.update(extra)
    return env


def decoded_spans(headers, body):
    """One OTLP upload -> (resource attributes, scope, [span dicts]) through the official definitions."""
    json_format, trace_service_pb2 = otlp_proto()
    import base64
    message = trace_service_pb2.ExportTraceServiceRequest()
    if headers["content-type"] == "application/x-protobuf":
        message.ParseFromString(body)
        assert message.SerializeToString() == body  # nothing our encoder wrote was unknown or out of place
    else:
        assert headers["content-type"] == "application/json"
        document = json.loads(body)
        for resource_spans in document["resourceSpans"]:  # OTLP/JSON ids are hex; protobuf's JSON form is base64
            for scope_spans in resource_spans["scopeSpans"]:
                for span in scope_spans["spans"]:
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in span:
                            span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
        json_format.ParseDict(document, message)  # unknown fields or wrong types raise
    [resource_spans] = message.resource_spans
    [scope_spans] = resource_spans.scope_spans

    def value(v):
        return getattr(v, v.WhichOneof("value"))

    resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
    spans = []
    for span in scope_spans.spans:
        spans.append({"trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                      "parent": span.parent_span_id.hex(), "state": span.trace_state, "name": span.name,
                      "kind": span.kind, "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                      "attributes": {kv.key: value(kv.value) for kv in span.attributes},
                      "status": span.status.code, "flags": span.flags,
                      "events": [(e.name, {kv.key: value(kv.value) for kv in e.attributes}) for e in span.events]})
    return resource, (scope_spans.scope.name, scope_spans.scope.version), spans


def all_spans(receiver):
    spans = []
    for headers, body in receiver.accepted_exports():
        spans.extend(decoded_spans(headers, body)[2])
    return spans


def test_traceparent_is_parsed_as_the_w3c_spec_says():
    parse = azmlinfsrv._parse_traceparent
    assert parse(CALLER_TRACEPARENT) == (CALLER_TRACE, CALLER_SPAN, 1)
    assert parse(" %s\t" % CALLER_TRACEPARENT) == (CALLER_TRACE, CALLER_SPAN, 1)  # optional whitespace
    assert parse("00-%s-%s-00" % (CALLER_TRACE, CALLER_SPAN)) == (CALLER_TRACE, CALLER_SPAN, 0)
    # A later version: its first four fields are read, whatever follows a dash.
    assert parse("cc-%s-%s-01" % (CALLER_TRACE, CALLER_SPAN)) == (CALLER_TRACE, CALLER_SPAN, 1)
    assert parse("cc-%s-%s-09-what-comes-later" % (CALLER_TRACE, CALLER_SPAN)) == (CALLER_TRACE, CALLER_SPAN, 9)
    for bad in ["", "00", CALLER_TRACEPARENT.upper(), CALLER_TRACEPARENT + "-extra",  # 00 is exactly 55 long
                "cc-%s-%s-01extra" % (CALLER_TRACE, CALLER_SPAN),  # a later version: a dash must follow
                "ff-%s-%s-01" % (CALLER_TRACE, CALLER_SPAN),  # version ff is invalid
                "00-%s-%s-01" % ("0" * 32, CALLER_SPAN), "00-%s-%s-01" % (CALLER_TRACE, "0" * 16),
                "00-%s-%s-01" % (CALLER_TRACE[:-1], CALLER_SPAN), "00-%s-%s-1" % (CALLER_TRACE, CALLER_SPAN),
                "00-%s-%s-0g" % (CALLER_TRACE, CALLER_SPAN), "00_%s_%s_01" % (CALLER_TRACE, CALLER_SPAN),
                "%s, %s" % (CALLER_TRACEPARENT, CALLER_TRACEPARENT)]:  # two headers, joined
        assert parse(bad) is None, bad


def test_a_callers_traceparent_makes_its_trace_the_app_insights_operation(tmp_path, receiver):
    write(tmp_path, "score.py", TRACED_SCORE)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=ai_env(receiver)) as server:
        answer = server.http.post("/score", b'"hi"', headers={
            "Content-Type": "application/json", "traceparent": CALLER_TRACEPARENT,
            "tracestate": "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7", "x-request-id": "req-w3c-1"})
        assert answer.status == 200
        seen = answer.json["traceparent"]  # run() sees the caller's trace, with this server's span as parent
        version, trace_id, span_id, flags = seen.split("-")
        assert (version, trace_id, flags) == ("00", CALLER_TRACE, "01") and re.match("^[0-9a-f]{16}$", span_id)
        assert span_id != CALLER_SPAN
        assert answer.json["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
        failed = server.http.post("/score", b'"boom"', headers={
            "Content-Type": "application/json", "traceparent": "00-%s-%s-01" % ("1" * 32, "2" * 16),
            "x-request-id": "req-w3c-2"})
        assert failed.status == 500
        plain = server.http.post("/score", b'"plain"', headers={"Content-Type": "application/json",
                                                                "x-request-id": "req-plain"})
        assert wait_until(lambda: len(receiver.ai("RequestData")) >= 3 and len(receiver.ai("ExceptionData")) >= 1
                          and len(receiver.ai("MessageData")) >= 3, timeout=15)
    requests = {i["data"]["baseData"]["properties"]["Request Id"]: i for i in receiver.ai("RequestData")}
    first = requests["req-w3c-1"]
    assert first["tags"]["ai.operation.id"] == CALLER_TRACE
    assert first["tags"]["ai.operation.parentId"] == CALLER_SPAN
    assert first["data"]["baseData"]["id"] == span_id  # the request item's id is the span run() was told of
    [printed] = [i for i in receiver.ai("MessageData") if "'hi'" in i["data"]["baseData"]["message"]
                 or '"hi"' in i["data"]["baseData"]["message"]]
    assert printed["tags"]["ai.operation.id"] == CALLER_TRACE and printed["tags"]["ai.operation.parentId"] == span_id
    second = requests["req-w3c-2"]
    [exception] = receiver.ai("ExceptionData")
    assert second["tags"]["ai.operation.id"] == exception["tags"]["ai.operation.id"] == "1" * 32
    assert exception["tags"]["ai.operation.parentId"] == second["data"]["baseData"]["id"]
    assert second["tags"]["ai.operation.parentId"] == "2" * 16
    # Without a traceparent the items keep the reference's correlation: the request id is the operation.
    own = requests["req-plain"]
    assert own["tags"]["ai.operation.id"] == "req-plain" and own["data"]["baseData"]["id"] == "req-plain"
    assert plain.json["traceparent"].split("-")[1] != CALLER_TRACE


@pytest.mark.parametrize("header", [
    CALLER_TRACEPARENT.upper(), "00-%s-%s-01" % ("0" * 32, CALLER_SPAN), "ff-%s-%s-01" % (CALLER_TRACE, CALLER_SPAN),
    CALLER_TRACEPARENT + "-x"])
def test_an_invalid_traceparent_starts_a_new_trace(tmp_path, receiver, header):
    write(tmp_path, "score.py", TRACED_SCORE)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path),
                       env=otlp_env(receiver, "http/json")) as server:
        answer = server.http.post("/score", b'"hi"', headers={
            "Content-Type": "application/json", "traceparent": header, "tracestate": "rojo=1"})
        assert answer.status == 200
        version, trace_id, span_id, flags = answer.json["traceparent"].split("-")
        assert re.match("^[0-9a-f]{32}$", trace_id) and trace_id not in (CALLER_TRACE, "0" * 32)
        assert answer.json["tracestate"] is None  # tracestate is not read when traceparent is invalid
        assert wait_until(lambda: all_spans(receiver), timeout=15)
    [span] = all_spans(receiver)
    assert (span["trace_id"], span["span_id"], span["parent"], span["state"]) == (trace_id, span_id, "", "")


@pytest.mark.parametrize("protocol", ["http/protobuf", "http/json"])
def test_otlp_exports_one_server_span_per_score_and_swagger_request(tmp_path, receiver, protocol):
    otlp_proto()
    write(tmp_path, "score.py", TRACED_SCORE)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=otlp_env(receiver, protocol)) as server:
        wait_output(server, "Trace export: OTLP %s to %s/v1/traces" % (protocol, receiver.base))
        unsampled = server.http.post("/score", b'"hi"', headers={  # the caller did not sample: no span
            "Content-Type": "application/json", "traceparent": "00-%s-%s-00" % ("3" * 32, "4" * 16)})
        assert unsampled.status == 200
        ok = server.http.post("/score?debug=1", b'"hi"', headers={
            "Content-Type": "application/json", "traceparent": CALLER_TRACEPARENT, "tracestate": "rojo=00f067aa",
            "User-Agent": "trace-test/1", "x-request-id": "req-span-1"})
        failed = server.http.post("/score", b'"boom"', headers={"Content-Type": "application/json"})
        assert (ok.status, failed.status) == (200, 500)
        assert server.http.get("/").status == 200
        assert server.http.get("/metrics").status == 200
        assert server.http.get("/swagger.json").status in (200, 404)
        assert wait_until(lambda: len(all_spans(receiver)) >= 3, timeout=15)
        headers, body = receiver.accepted_exports()[0]
    spans = all_spans(receiver)
    assert sorted(s["name"] for s in spans) == ["GET /swagger.json", "POST /score", "POST /score"]  # no / nor /metrics
    assert "3" * 32 not in [s["trace_id"] for s in spans]
    assert headers["x-api-key"] == "s=cret" and headers["x-tenant"] == "t1"
    resource, scope, _ = decoded_spans(headers, body)
    assert resource["service.name"] == "scorer" and resource["deployment.environment"] == "test"
    assert resource["team"] == "ml ops" and resource["telemetry.sdk.name"] == "azmlinfsrv"
    assert scope == ("azmlinfsrv", azmlinfsrv.__version__)
    [first] = [s for s in spans if s["attributes"].get("azureml.request_id") == "req-span-1"]
    assert first["trace_id"] == CALLER_TRACE and first["parent"] == CALLER_SPAN and first["state"] == "rojo=00f067aa"
    assert first["span_id"] == ok.json["traceparent"].split("-")[2]
    assert first["kind"] == 2 and first["status"] == 0 and first["flags"] & 0x1 and first["flags"] & 0x300 == 0x300
    assert 0 < first["end"] - first["start"] < 30e9 and abs(first["start"] / 1e9 - time.time()) < 60
    attrs = first["attributes"]
    assert attrs["http.request.method"] == "POST" and attrs["http.route"] == "/score"
    assert attrs["url.path"] == "/score" and attrs["url.query"] == "debug=1" and attrs["url.scheme"] == "http"
    assert attrs["http.response.status_code"] == 200 and attrs["network.protocol.version"] == "1.1"
    assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == server.port
    assert attrs["client.address"] == "127.0.0.1" and attrs["user_agent.original"] == "trace-test/1"
    assert 0 <= attrs["azureml.run.duration_ms"] < 30000
    [bad] = [s for s in spans if s["name"] == "POST /score" and s is not first]
    assert bad["status"] == 2 and bad["parent"] == "" and bad["attributes"]["http.response.status_code"] == 500
    assert bad["attributes"]["error.type"] == "ValueError"
    assert bad["events"] == [("exception", {"exception.type": "ValueError", "exception.message": "boom in run"})]


def test_otlp_export_retries_and_a_collector_that_is_down_never_slows_an_answer(tmp_path, receiver):
    write(tmp_path, "score.py", TRACED_SCORE)
    receiver.plan = [503, 429]  # retried with backoff, then accepted
    env = otlp_env(receiver, "http/json", OTEL_BSP_SCHEDULE_DELAY="50")
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        assert server.http.post("/score", b'"hi"', headers={"Content-Type": "application/json"}).status == 200
        assert wait_until(lambda: receiver.accepted_exports(), timeout=15)
    assert [status for _, _, status in receiver.otlp][:3] == [503, 429, 200]
    assert len(json.loads(receiver.accepted_exports()[0][1])["resourceSpans"][0]["scopeSpans"][0]["spans"]) == 1
    down = "http://127.0.0.1:%d" % free_port()  # nothing listens there
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": down + "/custom/path", "OTEL_BSP_SCHEDULE_DELAY": "20",
           "OTEL_BSP_MAX_QUEUE_SIZE": "3"}
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        wait_output(server, "Trace export: OTLP http/protobuf to %s/custom/path" % down)
        for n in range(20):
            start = time.monotonic()
            answer = server.http.post("/score", b'"hi"', headers={"Content-Type": "application/json"})
            assert answer.status == 200 and time.monotonic() - start < 2.0
        wait_output(server, "Trace export: cannot reach %s/custom/path" % down)
        wait_output(server, "Trace export: 3 items wait for the collector; dropping the oldest. (said once)")


@pytest.mark.parametrize("env", [{}, {"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}])
def test_without_an_endpoint_or_with_otel_disabled_nothing_is_exported_and_headers_pass_unchanged(
        tmp_path, receiver, env):
    write(tmp_path, "score.py", TRACED_SCORE)
    if env:  # an endpoint is set, but the standard switches turn export off
        env = dict(env, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.base, OTEL_BSP_SCHEDULE_DELAY="20")
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        answer = server.http.post("/score", b'"hi"', headers={
            "Content-Type": "application/json", "traceparent": CALLER_TRACEPARENT, "tracestate": "rojo=1"})
        # Nothing records traces: the server does not join them, and run() sees the caller's headers as sent.
        assert answer.json == {"traceparent": CALLER_TRACEPARENT, "tracestate": "rojo=1"}
        assert server.http.get("/metrics").status == 200
    assert "Trace export" not in server.output
    assert receiver.otlp == []


JSON_LOG_SCORE = """
import logging

def init():
    logging.getLogger("user.init").warning("init says hi")

def run(data):
    print("printed", data)
    logging.getLogger("user.run").warning("user logging %s", data)
    if data == "boom":
        raise KeyError("missing")
    return {"ok": data}
"""


def json_lines(output, after):
    """Every line of the log after the line containing ``after``, each parsed as JSON (it must be)."""
    lines = output[output.index(after):].splitlines()[1:]
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_json_logs_one_object_per_line_with_the_requests_ids(tmp_path, how):
    write(tmp_path, "score.py", JSON_LOG_SCORE)
    args, env = ["--entry_script", "score.py"], {}
    if how == "flag":
        args += ["--log_format", "json"]
    else:
        env["AZMLINFSRV_LOG_FORMAT"] = "JSON"
    with ServerProcess(args, cwd=str(tmp_path), env=env) as server:
        ok = server.http.post("/score", b"hi", headers={"traceparent": CALLER_TRACEPARENT, "x-request-id": "req-j1"})
        assert ok.status == 200
        failed = server.http.post("/score", b"boom", headers={"x-request-id": "req-j2"})
        assert failed.status == 500
        wait_output(server, '"message": "POST /score 500')
        assert "--log_format                         json" in server.output
    start = json.loads([line for line in server.output.splitlines() if "init says hi" in line][0])
    assert start["logger"] == "user.init" and start["level"] == "WARNING" and "request_id" not in start
    records = json_lines(server.output, "Worker with pid")
    for record in records:
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", record["time"])
        assert {"time", "level", "logger", "message"} <= set(record)
    mine = [r for r in records if r.get("request_id") == "req-j1"]
    by_logger = {r["logger"]: r for r in mine}
    assert by_logger["azmlinfsrv.print"]["message"] == "printed hi"
    assert by_logger["user.run"]["message"] == "user logging hi" and by_logger["user.run"]["level"] == "WARNING"
    assert by_logger["azmlinfsrv"]["message"].startswith("POST /score 200")  # the access line
    for record in mine:  # the caller's trace, and this server's span
        assert record["trace_id"] == CALLER_TRACE and record["span_id"] != CALLER_SPAN
        assert re.match("^[0-9a-f]{16}$", record["span_id"])
    [error] = [r for r in records if r.get("request_id") == "req-j2" and r["level"] == "ERROR"]
    assert error["logger"] == "azmlinfsrv" and "run() failed for request req-j2" in error["message"]
    assert error["exception"]["type"] == "KeyError" and error["exception"]["message"] == "'missing'"
    assert error["exception"]["location"]["file"] == "score.py" and error["exception"]["location"]["line"] == 11
    assert re.match("^[0-9a-f]{32}$", error["trace_id"]) and error["trace_id"] != CALLER_TRACE


def test_text_logs_stay_the_default_and_a_logging_json_wins_over_json_logs(tmp_path):
    write(tmp_path, "score.py", JSON_LOG_SCORE)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        assert server.http.post("/score", b"hi").status == 200
        line = wait_output(server, re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} I \[\d+\] azmlinfsrv - "
                                              r"POST /score 200 .*$", re.M)).group(0)
        assert not line.startswith("{")
    write(tmp_path, "logging.json", json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "PLAIN %(levelname)s %(name)s %(message)s"}},
        "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stdout"}},
        "loggers": {"azmlinfsrv": {"handlers": ["out"], "level": "INFO", "propagate": False}}}))
    with ServerProcess(["--entry_script", "score.py", "--log_format", "json"], cwd=str(tmp_path)) as server:
        assert server.http.post("/score", b"hi").status == 200
        wait_output(server, "PLAIN INFO azmlinfsrv POST /score 200")
        assert "PLAIN WARNING azmlinfsrv --log_format json is ignored" in server.output
    code, out = run_cli(["--entry_script", "score.py", "--log_format", "xml"], cwd=str(tmp_path))
    assert code != 0 and "expected text or json" in out


def test_a_rawhttp_run_sees_this_servers_span_in_traceparent(tmp_path):
    write(tmp_path, "score.py", """
        from azureml_inference_server_http.api.aml_response import AMLResponse
        from azureml_inference_server_http.api.aml_request import rawhttp

        def init():
            pass

        @rawhttp
        def run(request):
            return AMLResponse({"traceparent": request.headers.get("traceparent"),
                                "tracestate": request.headers.get("tracestate")}, 200, json_str=True)
        """)
    with ServerProcess(["--entry_script", "score.py", "--log_format", "json"], cwd=str(tmp_path)) as server:
        answer = server.http.post("/score", b"x", headers={"traceparent": "00-%s-%s-00" % (CALLER_TRACE, CALLER_SPAN),
                                                           "tracestate": "a=1,b=2"})
        assert answer.status == 200, answer
        version, trace_id, span_id, flags = answer.json["traceparent"].split("-")
        # The caller did not sample: neither does this server (flags 00), but the trace goes on.
        assert (version, trace_id, flags) == ("00", CALLER_TRACE, "00") and span_id != CALLER_SPAN
        assert answer.json["tracestate"] == "a=1,b=2"
        line = wait_output(server, re.compile(r'^\{.*"message": "POST /score 200.*$', re.M)).group(0)
        assert json.loads(line)["span_id"] == span_id


# ===========================================================================
# The try page: GET /try, its switch, and the page itself in headless Chromium
# ===========================================================================

TRY_PLAIN = """
def init():
    pass

def run(data):
    import json
    value = json.loads(data)
    if value.get("fail"):
        raise ValueError("no model for %r" % value["fail"])
    return {"sum": sum(value.get("x", [])), "version": 1}
"""
TRY_PLAIN_FAIL_LINE = 9  # the raise above


def _try_line(server):
    return "  Try page:       GET  http://127.0.0.1:%d/try" % server.port


def _comparable(answer):
    """An answer without what differs between any two requests (ids, date)."""
    varying = {"x-request-id", "x-ms-request-id", "date", "x-ms-run-fn-exec-ms"}
    return answer.status, [(n.lower(), v) for n, v in answer.header_list if n.lower() not in varying], answer.body


def test_try_page_is_served_by_default_with_a_strict_policy_and_is_in_the_banner(tmp_path):
    write(tmp_path, "score.py", TRY_PLAIN)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        page = server.http.get("/try")
        assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert policy.startswith("default-src 'none'; script-src 'sha256-")
        assert "connect-src 'self'" in policy and "img-src 'self' blob: data:" in policy
        assert "unsafe" not in policy and "http" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert not re.search(rb"<script src|<link (?!rel=\"icon\" href=\"data:,\">)|@import|url\(", page.body)
        assert set(re.findall(rb"https?://[^\"' ]*", page.body)) == {b"http://www.w3.org/2000/svg"}  # a namespace
        assert _try_line(server) in server.output
        state = server.http.get("/try/state").json
        assert state["entry_script"] == "score.py" and state["mode"] == "text" and state["generation"] == 0
        assert state["error"] is None and "cases" not in state
        assert server.http.request("HEAD", "/try").status == 200
        assert server.http.post("/try", b"x").status == 405


@pytest.mark.parametrize("args", [["--try_page", "false"], ["--hide_error_details"],
                                  ["--hide_error_details", "--try_page", "true"]])
def test_try_page_is_404_when_off_and_whenever_error_details_are_hidden(tmp_path, args):
    write(tmp_path, "score.py", TRY_PLAIN)
    with ServerProcess(["--entry_script", "score.py"] + args, cwd=str(tmp_path)) as server:
        assert server.http.get("/try").status == 404
        assert server.http.get("/try/state").status == 404
        assert "Try page:" not in server.output
        if "true" in args:
            assert "--try_page true is ignored: error details are hidden" in server.output


def test_try_page_env_switch_and_auto(tmp_path):
    write(tmp_path, "score.py", TRY_PLAIN)
    with ServerProcess(["--entry_script", "score.py"], env={"AZMLINFSRV_TRY_PAGE": "false"},
                       cwd=str(tmp_path)) as server:
        assert server.http.get("/try").status == 404
    with ServerProcess(["--entry_script", "score.py"], env={"AZMLINFSRV_TRY_PAGE": "auto"},
                       cwd=str(tmp_path)) as server:
        assert server.http.get("/try").status == 200
    code, out = run_cli(["--entry_script", "score.py", "--try_page", "maybe"], cwd=str(tmp_path))
    assert code == 1 and "--try_page" in out


def test_try_page_takes_a_real_boolean_from_a_config_file_and_serve(tmp_path, served):
    write(tmp_path, "score.py", TRY_PLAIN)
    for value, status in ((False, 404), (True, 200)):
        write(tmp_path, "config.json", json.dumps({"AZMLINFSRV_TRY_PAGE": value}))
        with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
            assert server.http.get("/try").status == status
    os.remove(os.path.join(str(tmp_path), "config.json"))
    assert http_for(served(TRY_PLAIN, name="off.py", try_page=False)).get("/try").status == 404


def test_a_bad_try_cases_file_stops_start_up_before_init_even_with_processes(tmp_path):
    write(tmp_path, "score.py", """
        def init():
            print("init ran")

        def run(data):
            return data
    """)
    for extra in ([], ["--processes", "2"]):
        code, out = run_cli(["--entry_script", "score.py", "--try_cases", "missing.json"] + extra,
                            cwd=str(tmp_path), timeout=60)
        assert code == 1, out
        assert "Cannot read the --try_cases file missing.json" in out
        assert "init ran" not in out and "starting a new one" not in out
    code, out = run_cli(["--entry_script", "score.py", "--check", "missing.json"], cwd=str(tmp_path))
    assert code == 1 and "Cannot read the --check file missing.json" in out  # the same reader, its own flag


def test_try_page_leaves_health_score_and_swagger_unchanged(tmp_path):
    write(tmp_path, "score.py", TRY_PLAIN)
    requests = [("GET", "/", None), ("POST", "/score", b'{"x": [1, 2]}'), ("POST", "/score", b'{"fail": "a"}'),
                ("GET", "/score", None), ("OPTIONS", "/score", None), ("GET", "/swagger.json", None),
                ("GET", "/swagger.json?version=3", None), ("GET", "/nothing", None), ("OPTIONS", "/", None)]
    answers = []
    for switch in ("true", "false"):
        with ServerProcess(["--entry_script", "score.py", "--try_page", switch], cwd=str(tmp_path)) as server:
            answers.append([_comparable(server.http.request(m, p, body=b, headers={"Content-Type": "application/json"}))
                            for m, p, b in requests])
    assert answers[0] == answers[1]


def test_try_cases_are_offered_to_the_page_and_a_bad_file_stops_start_up(tmp_path):
    write(tmp_path, "score.py", TRY_PLAIN)
    write(tmp_path, "cases.json", json.dumps([
        {"name": "sum", "json": {"x": [1, 2]}, "expect": {"json": {"sum": 3, "version": 1}}},
        {"name": "text body", "body": "{\"x\": [5]}", "headers": {"Content-Type": "application/json"}}]))
    with ServerProcess(["--entry_script", "score.py", "--try_cases", "cases.json"], cwd=str(tmp_path)) as server:
        cases = server.http.get("/try/state?cases").json["cases"]
        assert cases == [{"name": "sum", "json": {"x": [1, 2]}},
                         {"name": "text body", "body": "{\"x\": [5]}", "headers": {"Content-Type": "application/json"}}]
    write(tmp_path, "bad.json", json.dumps([{"name": "typo", "jsn": {}, "expect": {"status": 200}}]))
    code, out = run_cli(["--entry_script", "score.py", "--try_cases", "bad.json"], cwd=str(tmp_path))
    assert code == 1 and "unknown key(s) 'jsn'" in out


def test_production_recipes_turn_the_try_page_off():
    def read(*parts):
        with open(os.path.join(HERE, "deploy", *parts), encoding="utf-8") as handle:
            return handle.read()
    assert re.search(r"^\s*AZMLINFSRV_TRY_PAGE=false\b", read("Dockerfile"), re.M)
    assert re.search(r'^\s*AZMLINFSRV_TRY_PAGE: "false"', read("azureml", "deployment.yml"), re.M)
    assert re.search(r'- name: AZMLINFSRV_TRY_PAGE\b[^\n]*\n\s*value: "false"', read("k8s", "deployment.yaml"))


# ---- in a real browser: headless Chromium driven by selenium (pinned in .ci/run) --------------------------

TRY_SCHEMA = """
from inference_schema.schema_decorators import input_schema, output_schema
from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType

def init():
    pass

@input_schema("data", StandardPythonParameterType([[1.0, 2.0], [3.0, 4.0]]))
@output_schema(StandardPythonParameterType([3.0, 7.0]))
def run(data):
    return [sum(row) for row in data]
"""

TRY_IMAGE = """
from azureml_inference_server_http.api.aml_request import AMLRequest, rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

def init():
    pass

@rawhttp
def run(request):
    if request.files:
        upload = request.files["file"]
        return AMLResponse(upload.read(), 200, {"Content-Type": upload.mimetype or "image/png"})
    body = request.get_data()
    if not body.startswith(b"\\x89PNG"):
        return AMLResponse({"error": "send a PNG image"}, 400, json_str=True)
    return AMLResponse(body, 200, {"Content-Type": "image/png"})
"""

TRY_STREAM = """
import os
import time
from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

GATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gate")

def init():
    pass

@rawhttp
def run(request):
    def tokens():
        yield "first token\\n"
        deadline = time.time() + 30
        while not os.path.exists(GATE) and time.time() < deadline:
            time.sleep(0.02)
        yield "second token\\n"
    return AMLResponse(tokens(), 200, {"Content-Type": "text/plain; charset=utf-8"})
"""


def _png(width=8, height=6):
    """A small valid PNG (an RGB gradient), written with zlib only."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    rows = b"".join(b"\x00" + b"".join(bytes((x * 30 % 256, y * 40 % 256, 160)) for x in range(width))
                    for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _browser_required():
    return os.environ.get("CI") == "true" or os.environ.get("AZMLINFSRV_BROWSER_REQUIRED") == "1"


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    """One headless Chromium for the section (each test's server is its own origin: its own storage)."""
    import shutil
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        reason = "selenium is not installed (.ci/run installs it)"
    else:
        chromium_path = shutil.which("chromium") or shutil.which("chromium-browser")
        driver_path = shutil.which("chromedriver")
        reason = None if chromium_path and driver_path else "Debian's chromium and chromium-driver are not installed"
    if reason:
        if _browser_required():
            pytest.fail("CI=true (or AZMLINFSRV_BROWSER_REQUIRED=1) but " + reason, pytrace=False)
        pytest.skip(reason)
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium_path
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--user-data-dir=%s" % tmp_path_factory.mktemp("profile")):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.downloads = str(downloads)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    except Exception:
        pass
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, name):
    """A screenshot of the page's state, when AZMLINFSRV_SCREENSHOTS names a folder (docs/img/ has the best)."""
    folder = os.environ.get("AZMLINFSRV_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        driver.save_screenshot(os.path.join(folder, "try-%s.png" % name))


def _text(driver, element_id):
    return driver.execute_script("var e = document.getElementById(arguments[0]); return e ? e.textContent : ''",
                                 element_id)


def _page_waits_for(driver, check, what, timeout=20):
    found = wait_until(check, timeout=timeout, interval=0.05)
    assert found, "the page never showed %s; status %r, answer %r, badge %r" % (
        what, _text(driver, "status"), _text(driver, "answer-body")[:500], _text(driver, "reload-status"))
    return found


def _open_try_page(driver, server):
    driver.get("http://127.0.0.1:%d/try" % server.port)
    _page_waits_for(driver, lambda: driver.execute_script("return document.body.getAttribute('data-ready')"),
                    "ready")


def _send_and_wait(driver):
    before = len(driver.find_elements("css selector", "#history li"))
    driver.find_element("id", "send").click()
    _page_waits_for(driver, lambda: len(driver.find_elements("css selector", "#history li")) > before,
                    "the answer in the history")


def _other_origins(driver, port):
    """Every resource the page loaded from anywhere else than its own origin, and its console's errors."""
    origin = "http://127.0.0.1:%d/" % port
    names = driver.execute_script("return performance.getEntriesByType('navigation').concat("
                                  "performance.getEntriesByType('resource')).map(function (e) { return e.name; })")
    assert any(n.endswith("/swagger.json") for n in names) and any(n.endswith("/metrics") for n in names)
    elsewhere = [n for n in names if not n.startswith(origin) and not n.startswith("blob:" + origin[:-1])]
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
              and "the server responded with a status of 500" not in e["message"]]  # the failure we provoked
    return elsewhere, errors


def test_try_page_in_chromium_sends_the_example_shows_a_failure_and_saves_a_check_case(chromium, tmp_path):
    driver = chromium
    script = write(tmp_path, "score.py", TRY_PLAIN)
    write(tmp_path, "cases.json", json.dumps([{"name": "sum of three", "json": {"x": [1, 2, 3]}}]))
    with ServerProcess(["--entry_script", "score.py", "--try_cases", "cases.json"], cwd=str(tmp_path)) as server:
        driver.get_log("browser")  # start with an empty console
        _open_try_page(driver, server)
        assert _text(driver, "svc-name") == "ML service"
        assert "score.py (plain)" in _text(driver, "info")
        assert json.loads(driver.find_element("id", "body").get_attribute("value")) == {"x": [1, 2, 3]}
        _send_and_wait(driver)
        assert _text(driver, "status") == "200 OK"
        assert json.loads(_text(driver, "answer-body")) == {"sum": 6, "version": 1}
        assert "x-ms-run-fn-exec-ms" in _text(driver, "timing")
        _page_waits_for(driver, lambda: _text(driver, "m-rps") != "-" and _text(driver, "m-p50") != "-",
                        "the metrics panel")
        _shot(driver, "answer")

        body = driver.find_element("id", "body")
        body.clear()
        body.send_keys('{"fail": "tomorrow"}')
        _send_and_wait(driver)
        assert _text(driver, "status") == "500 Internal Server Error"
        assert _text(driver, "diag-exception") == "ValueError: no model for 'tomorrow'"
        assert _text(driver, "diag-where") == "at score.py, line %d, in run" % TRY_PLAIN_FAIL_LINE
        assert "raise ValueError" in _text(driver, "diagnosis")
        _shot(driver, "failure")

        # Both tries become --check cases: the answer each got is its expectation.
        for button in reversed(driver.find_elements("css selector", "#history li .save-case")):
            button.click()
        saved = json.loads(driver.find_element("id", "cases").get_attribute("value"))
        assert [c["expect"]["status"] for c in saved] == [200, 500]
        driver.find_element("id", "cases-download").click()
        downloaded = os.path.join(driver.downloads, "requests.json")
        assert wait_until(lambda: os.path.exists(downloaded) and os.path.getsize(downloaded) > 0), "no download"
        _shot(driver, "cases")
        _page_waits_for(driver, lambda: _text(driver, "m-errors") == "1", "the 500 in the metrics panel")
        elsewhere, errors = _other_origins(driver, server.port)
        assert elsewhere == [] and errors == []

        # The history, the last request and the saved cases are kept in the browser; any try can be sent again.
        _open_try_page(driver, server)
        assert _text(driver, "example").startswith("Last sent from this browser")
        assert json.loads(driver.find_element("id", "body").get_attribute("value")) == {"fail": "tomorrow"}
        assert len(json.loads(driver.find_element("id", "cases").get_attribute("value"))) == 2
        entries = driver.find_elements("css selector", "#history li")
        assert len(entries) == 2 and "-> 200" in entries[1].text
        entries[1].find_element("xpath", ".//button[text()='re-send']").click()
        _page_waits_for(driver, lambda: len(driver.find_elements("css selector", "#history li")) == 3, "the re-send")
        assert _text(driver, "status") == "200 OK" and json.loads(_text(driver, "answer-body"))["sum"] == 6
    code, out = run_cli(["--entry_script", script, "--check", downloaded], cwd=str(tmp_path))
    assert code == 0 and "2 passed, 0 failed" in out, out
    write(tmp_path, "score.py", TRY_PLAIN.replace('"version": 1', '"version": 2'))
    code, out = run_cli(["--entry_script", script, "--check", downloaded], cwd=str(tmp_path))
    assert code == 1 and "1 passed, 1 failed" in out, out


def test_try_page_in_chromium_says_when_the_script_reloaded_or_failed_to(chromium, tmp_path):
    driver = chromium
    write(tmp_path, "score.py", TRY_PLAIN)
    with ServerProcess(["--entry_script", "score.py", "--reload"], cwd=str(tmp_path)) as server:
        _open_try_page(driver, server)
        assert _text(driver, "reload-status") == "Watching for changes (--reload)"
        write(tmp_path, "score.py", TRY_PLAIN.replace('"version": 1', '"version": 2'))
        _page_waits_for(driver, lambda: "Reloaded at" in _text(driver, "reload-status"), "the reload")
        _send_and_wait(driver)
        assert json.loads(_text(driver, "answer-body"))["version"] == 2
        _shot(driver, "reloaded")
        write(tmp_path, "score.py", TRY_PLAIN.replace("def run(data):", "def run(data)"))
        _page_waits_for(driver, lambda: "Reload failed" in _text(driver, "reload-status"), "the failed reload")
        assert "score.py, line 5" in _text(driver, "reload-status")
        _send_and_wait(driver)
        assert _text(driver, "status") == "503 Service Unavailable"
        assert _text(driver, "diag-where").startswith("at score.py, line 5")
        _shot(driver, "reload-failed")


def test_try_page_in_chromium_prefills_the_inference_schema_example(chromium, tmp_path):
    pytest.importorskip("inference_schema")
    driver = chromium
    write(tmp_path, "score.py", TRY_SCHEMA)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        _open_try_page(driver, server)
        assert "score.py (inference-schema)" in _text(driver, "info")
        assert _text(driver, "example").startswith("swagger.json example")
        assert json.loads(driver.find_element("id", "body").get_attribute("value")) == {"data": [[1.0, 2.0],
                                                                                                [3.0, 4.0]]}
        _send_and_wait(driver)
        assert _text(driver, "status") == "200 OK" and json.loads(_text(driver, "answer-body")) == [3.0, 7.0]
        _page_waits_for(driver, lambda: _text(driver, "m-p50") != "-", "the request in the metrics panel")
        _shot(driver, "inference-schema")


def test_try_page_in_chromium_sends_a_file_to_a_rawhttp_script_and_shows_the_image(chromium, tmp_path):
    driver = chromium
    write(tmp_path, "score.py", TRY_IMAGE)
    image = os.path.join(str(tmp_path), "photo.png")
    with open(image, "wb") as handle:
        handle.write(_png(64, 48))
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        _open_try_page(driver, server)
        assert "score.py (@rawhttp)" in _text(driver, "info")
        ctype = driver.find_element("id", "ctype")
        ctype.clear()
        ctype.send_keys("image/png")
        for mode in ("raw", "form"):
            driver.find_element("id", "file").send_keys(image)
            driver.find_element("css selector", "#file-as option[value=%s]" % mode).click()
            _send_and_wait(driver)
            assert _text(driver, "status") == "200 OK"
            size = _page_waits_for(driver, lambda: driver.execute_script(
                "var i = document.getElementById('answer-image'); return i && i.complete && i.naturalWidth"),
                "the image")
            assert size == 64
        _shot(driver, "image")
        assert driver.find_element("css selector", "#history li .save-case").get_attribute("disabled")


def test_try_page_in_chromium_shows_a_streamed_answer_as_it_arrives(chromium, tmp_path):
    driver = chromium
    write(tmp_path, "score.py", TRY_STREAM)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        _open_try_page(driver, server)
        driver.find_element("id", "send").click()
        _page_waits_for(driver, lambda: "first token" in _text(driver, "answer-body"), "the first token")
        assert "second token" not in _text(driver, "answer-body")
        assert "receiving..." in _text(driver, "timing")
        _shot(driver, "streaming")
        open(os.path.join(str(tmp_path), "gate"), "w").close()
        _page_waits_for(driver, lambda: "second token" in _text(driver, "answer-body"), "the second token")
        _page_waits_for(driver, lambda: "total" in _text(driver, "timing"), "the end of the answer")
        assert _text(driver, "answer-body") == "first token\nsecond token\n"


# ===========================================================================
# MLflow no-code models: no entry script, an MLflow model folder (Azure's generated scoring script, built in)
# ===========================================================================

# The models are real MLflow models built by testdata/mlflow_build_models.py in a venv with pinned
# mlflow-skinny, scikit-learn, pandas and numpy; .ci/run makes it and sets AZMLINFSRV_MLFLOW_PYTHON.  The
# server under test runs in that venv (its model's environment, as in the cloud); the test process needs
# none of it.  Without the variable these tests skip, unless CI=true.  Expected answers are those of Azure's
# mlflow_score_script.py under the reference (bench/compare_mlflow.py compares them side by side).

MLFLOW_PYTHON = os.environ.get("AZMLINFSRV_MLFLOW_PYTHON")
JSON_TYPE = {"Content-Type": "application/json"}
SCRIPT_FAILED = "An unexpected error occurred in scoring script. Check the logs for more info."


def needs_mlflow():
    if MLFLOW_PYTHON and os.path.isfile(MLFLOW_PYTHON):
        return MLFLOW_PYTHON
    reason = "AZMLINFSRV_MLFLOW_PYTHON (a Python with mlflow-skinny, scikit-learn, pandas, numpy) is not set"
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but " + reason, pytrace=False)
    pytest.skip(reason)


def MlflowServer(args, env=None, cwd=None, timeout=120):
    """ServerProcess, run by the MLflow venv's Python instead of this one."""
    return ServerProcess(args, env=env, cwd=cwd, python=needs_mlflow(), ready_timeout=timeout)


def mlflow_cli(args, python=None, cwd=None, timeout=180):
    """The CLI to completion under the MLflow venv (or ``python``): (exit code, output)."""
    return run_cli(args, cwd=cwd, timeout=timeout, python=python or needs_mlflow())


@pytest.fixture(scope="module")
def mlflow_models(tmp_path_factory):
    """{name: folder} for the models testdata/mlflow_build_models.py builds: table, tensor, params, named, nosig."""
    python = needs_mlflow()
    out = str(tmp_path_factory.mktemp("mlflow-models"))
    proc = subprocess.run([python, os.path.join(HERE, "testdata", "mlflow_build_models.py"), out],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout.decode("utf-8", "replace")
    return {name: os.path.join(out, name) for name in ("table", "tensor", "params", "named", "nosig")}


@pytest.fixture(scope="module")
def mlflow_servers(mlflow_models, tmp_path_factory):
    """One server per model (--model_dir FOLDER, no entry script), started when first asked for."""
    servers = {}

    def get(name):
        if name not in servers:
            cwd = str(tmp_path_factory.mktemp("mlflow-" + name))
            servers[name] = MlflowServer(["--model_dir", mlflow_models[name]], cwd=cwd)
        return servers[name]

    yield get
    for server in servers.values():
        server.stop()


TABLE_INPUT = {"columns": ["a", "b", "c"], "data": [[0.9, 0.9, 0.1], [0.1, 0.1, 0.1]]}


def test_mlflow_model_dir_serves_the_model_and_the_banner_says_so(mlflow_servers, mlflow_models):
    server = mlflow_servers("table")
    assert "Entry script: none: the MLflow model %s" % os.path.realpath(mlflow_models["table"]) in server.output
    answer = post_json(server, {"input_data": TABLE_INPUT})
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-ms-run-function-failed"] == "False"
    assert answer.json == [1, 0]


@pytest.mark.parametrize("input_data", [
    dict(TABLE_INPUT, index=[7, 8]),
    {"columns": ["c", "a", "b"], "data": [[0.1, 0.9, 0.9], [0.1, 0.1, 0.1]]},
    {"columns": ["a", "b", "c"], "data": [[1, 1, 0], [0, 0, 0]]},
], ids=["with_index", "columns_in_another_order", "integers"])
def test_mlflow_table_input_is_split_orientation_with_optional_index_and_any_column_order(mlflow_servers, input_data):
    answer = post_json(mlflow_servers("table"), {"input_data": input_data})
    assert (answer.status, answer.json) == (200, [1, 0])


@pytest.mark.parametrize("body, headers, status, message", [
    (b'{"input_data": [[1]]}', {}, 415, "Expects Content-Type to be application/json"),
    (b'{"input_data": [[1]]}', {"Content-Type": "text/plain"}, 415, "Expects Content-Type to be application/json"),
    (b"", JSON_TYPE, 400, "POST body is empty. Expecting a JSON dictionary."),
    (b"[1, 2]", JSON_TYPE, 400, "POST body should be a JSON dictionary."),
    (b'{"data": [[1, 2, 3]]}', JSON_TYPE, 400, "A value is not provided for the 'input_data' parameter."),
], ids=["no_content_type", "text_plain", "empty", "list_body", "no_input_data"])
def test_mlflow_bad_requests_get_the_status_and_message_of_azures_script(mlflow_servers, body, headers, status,
                                                                          message):
    answer = mlflow_servers("table").http.post("/score", body, headers=headers)
    assert (answer.status, answer.headers["content-type"], answer.json) == (status, "application/json",
                                                                            {"message": message})


def test_mlflow_malformed_json_is_400(mlflow_servers):
    answer = mlflow_servers("table").http.post("/score", b'{"input_data": ', headers=JSON_TYPE)
    assert answer.status == 400
    assert answer.json["message"].startswith("POST body could not be decoded as JSON")


@pytest.mark.parametrize("input_data", [
    [{"a": 0.1, "b": 0.2, "c": 0.3}],
    {"columns": ["a", "b"], "data": [[0.1, 0.2]]},
    {"columns": ["a", "b", "c"], "data": [["x", 0.2, 0.3]]},
    5,
], ids=["records_orientation", "missing_column", "string_in_a_double_column", "a_number"])
def test_mlflow_failures_inside_the_model_are_the_usual_500_with_a_diagnosis(mlflow_servers, input_data):
    answer = post_json(mlflow_servers("table"), {"input_data": input_data})
    assert answer.status == 500
    assert answer.headers["x-ms-run-function-failed"] == "True"
    assert answer.json["message"] == SCRIPT_FAILED
    assert answer.json["error"]["type"]


def test_mlflow_tensor_model_takes_a_list_of_rows_and_answers_a_list(mlflow_servers):
    server = mlflow_servers("tensor")
    answer = post_json(server, {"input_data": [[1.0, 1.0, 1.0], [0, 0, 0]]})
    assert answer.status == 200, answer
    assert [round(v, 6) for v in answer.json] == [6.5, 0.5]  # y = x1 + 2 x2 + 3 x3 + 0.5, fitted exactly
    for wrong in ([[1.0, 2.0]], [1.0, 2.0, 3.0], {"x": [[1, 2, 3]]}):
        assert post_json(server, {"input_data": wrong}).status == 500, wrong


def test_mlflow_named_tensors_are_an_object_of_rows_by_name(mlflow_servers):
    server = mlflow_servers("named")
    answer = post_json(server, {"input_data": {"x": [[1, 2], [3, 4]], "y": [10, 20]}})
    assert (answer.status, answer.json) == (200, [13.0, 27.0])
    for wrong in ({"x": [[1, 2]]}, {"x": 1, "y": [1]}, [[1, 2, 3]]):
        answer = post_json(server, {"input_data": wrong})
        assert (answer.status, answer.json["message"]) == (500, SCRIPT_FAILED), wrong
    example = server.http.get("/swagger.json").json["definitions"]["ServiceInput"]["example"]
    assert example == {"input_data": {"x": [[0.0, 0.0]], "y": [0.0]}, "params": {}}


def test_mlflow_params_are_checked_against_the_schema_and_a_model_may_answer_a_table_or_a_dict(mlflow_servers):
    server = mlflow_servers("params")
    rows = {"columns": ["x", "y"], "data": [[1.0, 2.0], [3.0, 4.0]]}
    assert post_json(server, {"input_data": rows}).json == [{"x": 1.0, "y": 2.0}, {"x": 3.0, "y": 4.0}]
    assert post_json(server, {"input_data": rows, "params": {"multiplier": 2}}).json == [
        {"x": 2.0, "y": 4.0}, {"x": 6.0, "y": 8.0}]
    assert post_json(server, {"input_data": rows, "params": {"as_dict": True, "multiplier": 0.5}}).json == {
        "x": [0.5, 1.5], "y": [1.0, 2.0]}
    for params in ({"multiplier": "x"}, [1]):
        answer = post_json(server, {"input_data": rows, "params": params})
        assert (answer.status, answer.json["message"]) == (500, SCRIPT_FAILED), params


def test_mlflow_model_without_signature_takes_the_json_as_it_comes(mlflow_servers):
    server = mlflow_servers("nosig")
    assert post_json(server, {"input_data": [[0.9, 0.9, 0.1], [0.1, 0.1, 0.1]]}).json == [1, 0]
    assert post_json(server, {"input_data": json.dumps([[0.9, 0.9, 0.1]])}).json == [1]
    # A split table with an index is read as a table; Azure's script fails it with pandas 3 (docs/mlflow.md).
    assert post_json(server, {"input_data": dict(TABLE_INPUT, index=[0, 1])}).json == [1, 0]
    assert post_json(server, {"input_data": [[0.1, 0.2]]}).status == 500


def test_mlflow_swagger_comes_from_the_signature_in_every_version(mlflow_servers):
    server = mlflow_servers("params")
    document = server.http.get("/swagger.json?version=2").json
    service_input = document["definitions"]["ServiceInput"]
    assert service_input["properties"]["input_data"]["format"] == "pandas.DataFrame:split"
    assert service_input["example"] == {"input_data": {"columns": ["x", "y"], "index": [], "data": []},
                                        "params": {"multiplier": 1.0, "as_dict": False}}
    assert service_input["properties"]["params"]["properties"]["multiplier"] == {"type": "number",
                                                                                 "format": "double"}
    assert document["definitions"]["ServiceOutput"]["format"] == "pandas.DataFrame:records"
    for version, key in (("3", "3.0.3"), ("3.1", "3.1.0")):
        other = server.http.get("/swagger.json?version=" + version).json
        assert other["openapi"] == key
        assert other["components"]["schemas"]["ServiceInput"] == service_input
    tensor = mlflow_servers("tensor").http.get("/swagger.json").json["definitions"]["ServiceInput"]
    assert tensor["properties"]["input_data"]["format"] == "numpy.ndarray"
    assert tensor["example"] == {"input_data": [[0.0, 0.0, 0.0]], "params": {}}


def mlflow_deployment(folder, model, **fields):
    """A no-code deployment JSON in folder: model: {path: <copy of model>, type: mlflow_model}, no code."""
    import shutil
    shutil.copytree(model, os.path.join(str(folder), "model"))
    doc = dict({"name": "blue", "endpoint_name": "local-ep",
                "model": {"path": "./model", "type": "mlflow_model"}}, **fields)
    return write(folder, "deployment.json", json.dumps(doc))


def test_mlflow_no_code_deployment_serves_the_model_and_writes_the_enabled_collections(mlflow_models, tmp_path):
    path = mlflow_deployment(tmp_path, mlflow_models["table"], data_collector={
        "collections": {"model_inputs": {"enabled": "true"}, "model_outputs": {"enabled": "True"}}})
    collected = str(tmp_path / "collected")
    with MlflowServer(["--deployment", path, "--data_collector_dir", collected], cwd=str(tmp_path)) as server:
        assert "Entry script: none: the MLflow model" in server.output
        assert "conda.yaml: 5 pin(s) match, 0 drift" in server.output  # the model's own environment
        answer = post_json(server, {"input_data": TABLE_INPUT})
        assert (answer.status, answer.json) == (200, [1, 0])
        request_id = answer.headers["x-request-id"]
    records = {}
    for name in ("model_inputs", "model_outputs"):
        files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(collected, name)) for f in fs]
        assert len(files) == 1 and files[0].endswith(".jsonl"), files
        assert re.search(r"%s/\d{4}/\d\d/\d\d/\d\d/" % name, files[0].replace(os.sep, "/"))
        with open(files[0], encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        assert len(lines) == 1
        records[name] = json.loads(lines[0])
    inputs, outputs = records["model_inputs"], records["model_outputs"]
    assert inputs["type"] == "azureml.inference.model_inputs"
    assert outputs["type"] == "azureml.inference.model_outputs"
    assert inputs["data"] == [{"a": 0.9, "b": 0.9, "c": 0.1}, {"a": 0.1, "b": 0.1, "c": 0.1}]
    assert outputs["data"] == [{"0": 1}, {"0": 0}]
    assert inputs["correlationid"] == outputs["correlationid"] and inputs["correlationid"]
    assert inputs["xrequestid"] == outputs["xrequestid"] == request_id
    assert inputs["source"] == "/local/onlineEndpoints/local-ep/deployments/blue"
    for record in (inputs, outputs):
        assert record["specversion"] == "1.0" and record["datacontenttype"] == "application/json"
        assert record["collectdatatype"] == "pandas.core.frame.DataFrame"
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", record["time"])


def test_mlflow_without_a_data_collector_nothing_is_collected_and_serving_goes_on(mlflow_models, tmp_path):
    path = mlflow_deployment(tmp_path, mlflow_models["tensor"])
    with MlflowServer(["--deployment", path], cwd=str(tmp_path)) as server:
        assert post_json(server, {"input_data": [[0, 0, 0]]}).status == 200
        assert "Error initializing model_inputs collector and model_outputs collector. collection model_inputs " \
               "is not enabled" in server.output
    assert not os.path.exists(str(tmp_path / "model-data"))


def test_mlflow_drift_reads_the_models_own_environment_and_strict_makes_it_fatal(mlflow_models, tmp_path):
    import shutil
    model = str(tmp_path / "model")
    shutil.copytree(mlflow_models["tensor"], model)
    with open(os.path.join(model, "requirements.txt"), "a", encoding="utf-8") as handle:
        handle.write("\nnumpy==0.0.1\n")  # requirements.txt is read besides conda.yaml
    with open(os.path.join(model, "python_env.yaml"), "w", encoding="utf-8") as handle:
        handle.write("python: 3.0.1\nbuild_dependencies: [pip]\ndependencies: [-r requirements.txt]\n")
    with open(os.path.join(model, "conda.yaml"), "w", encoding="utf-8") as handle:
        handle.write('{"dependencies": [{"pip": ["scikit-learn==0.0.2"]}]}\n')
    with MlflowServer(["--model_dir", model], cwd=str(tmp_path)) as server:
        wait_output(server, "Environment drift: the MLflow model")
        for line in ("python  =3.0.1  this Python has 3.", "numpy  ==0.0.1  this Python has 2.",
                     "scikit-learn  ==0.0.2  this Python has 1."):
            assert line in server.output
        assert post_json(server, {"input_data": [[0, 0, 0]]}).status == 200
    code, output = mlflow_cli(["--model_dir", model, "--strict_environment"], cwd=str(tmp_path))
    assert code == 3, output
    assert "--strict_environment: install the pinned versions" in output and "numpy  ==0.0.1" in output


def test_mlflow_model_that_cannot_load_stops_start_up_naming_the_model_and_the_cause(mlflow_models, tmp_path):
    import shutil
    model = str(tmp_path / "model")
    shutil.copytree(mlflow_models["tensor"], model)
    with open(os.path.join(model, "model.pkl"), "wb") as handle:
        handle.write(b"not a pickle")  # the MLmodel file is fine; the model it names is broken
    code, output = mlflow_cli(["--model_dir", model], cwd=str(tmp_path))
    assert code == 3, output
    assert "Failed to load the MLflow model %s" % os.path.realpath(model) in output or \
        "Failed to load the MLflow model %s" % model in output, output
    assert "Traceback (most recent call last)" in output, output


def test_mlflow_check_gate_runs_requests_against_the_model(mlflow_models, tmp_path):
    cases = [{"name": "ok", "headers": JSON_TYPE, "json": {"input_data": TABLE_INPUT},
              "expect": {"status": 200, "json": [1, 0]}},
             {"name": "no input", "headers": JSON_TYPE, "json": {"x": 1}, "expect": {"status": 400}}]
    write(tmp_path, "cases.json", json.dumps(cases))
    code, output = mlflow_cli(["--model_dir", mlflow_models["table"], "--check", "cases.json"], cwd=str(tmp_path))
    assert code == 0, output
    assert "2 passed" in output or "2/2" in output, output


def test_mlflow_model_without_mlflow_installed_stops_naming_what_to_install(tmp_path):
    # Needs no MLflow at all: this Python without its site-packages (-S), and a folder that only looks like
    # an MLflow model.
    write(tmp_path, "model/MLmodel", "flavors: {}\n")
    requirements = write(tmp_path, "model/requirements.txt", "mlflow==3.18.0\n")
    code, output = run_cli(["--model_dir", "model"], cwd=str(tmp_path), timeout=60, python_args=["-S"])
    assert code == 3, output
    assert "needs mlflow, pandas and numpy in this Python" in output
    assert "lacks: mlflow (mlflow-skinny is enough), pandas, numpy" in output
    assert "-m pip install -r %s" % os.path.realpath(requirements) in output


def test_monitoring_collector_is_provided_and_refuses_a_collection_no_deployment_enables(served):
    # Any script (not only MLflow's) may import azureml.ai.monitoring; without azureml-ai-monitoring the server
    # provides it, and as in the cloud a collection the deployment does not enable is refused at creation.
    server = served("""
        from azureml.ai.monitoring import Collector
        def init():
            pass
        def run(data):
            try:
                Collector(name="model_inputs")
            except Exception as exc:
                return {"refused": str(exc)}
            return {"refused": None}
    """)
    answer = http_for(server).post("/score", b"{}")
    assert answer.status == 200
    assert answer.json["refused"].startswith("collection model_inputs is not enabled")


def test_mlflow_deployment_whose_model_path_is_not_an_mlflow_folder_says_so(tmp_path):
    # No MLflow needed: the message comes before any model is loaded.
    write(tmp_path, "model/weights.bin", "x")
    write(tmp_path, "deployment.json", json.dumps({"name": "blue", "model": {"path": "./model",
                                                                             "type": "mlflow_model"}}))
    code, output = run_cli(["--deployment", "deployment.json"], cwd=str(tmp_path))
    assert code == 3, output
    assert "has no MLmodel file: point model.path at the MLflow model folder" in output


# ===========================================================================
# Production traffic: no run() and no answer for clients that left; a listening socket per process
# ===========================================================================

HOLD = """
import os, time
HERE = os.path.dirname(os.path.abspath(__file__))

def init():
    if os.path.exists(os.path.join(HERE, "hold-init")):  # a process started later waits for the test
        open(os.path.join(HERE, "init-waits-%d" % os.getpid()), "w").close()
        while not os.path.exists(os.path.join(HERE, "release-init")):
            time.sleep(0.005)

def run(data):
    open(os.path.join(HERE, "ran-" + data), "w").close()  # the test sees that run() was called for it
    if data.startswith("hold"):
        while not os.path.exists(os.path.join(HERE, "release-" + data)):
            time.sleep(0.005)
    return {"data": data, "pid": os.getpid()}
"""


def send_score(port, body, request_id="", extra=b""):
    """A connection with one POST /score sent on it (its answer is read later, or never)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(score_request(body, request_id, extra))
    return sock


def score_request(body, request_id="", extra=b""):
    ids = b"x-request-id: %s\r\n" % request_id.encode() if request_id else b""
    return (b"POST /score HTTP/1.1\r\nHost: x\r\n%s%sContent-Length: %d\r\n\r\n%s"
            % (ids, extra, len(body), body.encode()))


def read_answer(stream):
    """One answer from a connection's binary file: (status, body); an interim 1xx is returned as such."""
    status = int(stream.readline().split()[1])
    length = 0
    for line in iter(stream.readline, b"\r\n"):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, stream.read(length)


def dropped(port, stage):
    page = Http(port).get("/metrics").text
    match = re.search(r'^azmlinfsrv_requests_dropped_total\{reason="client_gone",stage="%s"\} (\d+)$' % stage,
                      page, re.M)
    assert match, page
    return int(match.group(1))


def ran(folder, data):
    return os.path.exists(os.path.join(str(folder), "ran-" + data))


def release(folder, name):
    open(os.path.join(str(folder), "release-" + name), "w").close()


@contextlib.contextmanager
def worker_held(port, folder, name="hold-a"):
    """The server's one worker busy with HOLD's run(name) until release(folder, name) (at the latest on
    leaving the block): yields the held request's connection, whose answer comes once released."""
    conn = send_score(port, name)
    try:
        assert wait_until(lambda: ran(folder, name), timeout=10)
        yield conn
    finally:
        release(folder, name)
        conn.close()


def test_a_client_that_leaves_while_queued_is_dropped_and_its_run_never_called(tmp_path):
    write(tmp_path, "score.py", HOLD)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "1"], cwd=str(tmp_path)) as server:
        with worker_held(server.port, tmp_path) as busy:
            send_score(server.port, "gone-b", "queued-and-gone").close()
            line = wait_output(server, re.compile(r"Request queued-and-gone dropped: its client left while it "
                                                  r"waited (\d+) ms for a worker; run\(\) was not called\."))
            assert int(line.group(1)) >= 0
            release(tmp_path, "hold-a")
            assert read_answer(busy.makefile("rb"))[0] == 200
        assert server.http.post("/score", b"after").json["data"] == "after"  # the worker went past it
        assert not ran(tmp_path, "gone-b")
        assert dropped(server.port, "queued") == 1 and dropped(server.port, "running") == 0
        assert wait_until(lambda: server.output.count("POST /score 200") >= 2)  # hold-a's and after's
        assert server.output.count("POST /score 200") == 2  # no answer (and no access line) for it
        assert server.output.count("queued-and-gone") == 1  # logged once


def test_a_queued_request_whose_client_left_is_dropped_when_a_worker_takes_it(served, tmp_path, monkeypatch):
    monkeypatch.setattr(azmlinfsrv, "_CLIENT_WATCH_SECONDS", 3600.0)  # only the worker's look can find it
    server = served(HOLD, worker_count=1)
    port = int(server.url.rsplit(":", 1)[1])
    with worker_held(port, tmp_path) as busy:
        gone = send_score(port, "gone-b")
        assert wait_until(lambda: sample(http_for(server).get("/metrics").text, "azmlinfsrv_queue_depth") == 1,
                          timeout=10)  # queued for the worker
        gone.close()
        release(tmp_path, "hold-a")
        assert read_answer(busy.makefile("rb"))[0] == 200
        assert wait_until(lambda: dropped(port, "queued") == 1, timeout=10)
    assert http_for(server).post("/score", b"after").json["data"] == "after"
    assert not ran(tmp_path, "gone-b")


def test_a_client_that_leaves_during_run_is_counted_and_gets_no_answer(tmp_path):
    write(tmp_path, "score.py", HOLD)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "1"], cwd=str(tmp_path)) as server:
        try:
            conn = send_score(server.port, "hold-c", "left-during-run")
            assert wait_until(lambda: ran(tmp_path, "hold-c"), timeout=10)
            conn.close()
            wait_output(server, re.compile(r"Request left-during-run: its client left while run\(\) was executing "
                                           r"\(\d+ ms after the request arrived, \d+ ms in run\(\)\); the answer "
                                           r"will not be sent\."))
        finally:
            release(tmp_path, "hold-c")
        assert server.http.post("/score", b"after").json["data"] == "after"  # run() after hold-c's returned
        assert dropped(server.port, "running") == 1 and dropped(server.port, "queued") == 0
        assert wait_until(lambda: "POST /score 200" in server.output)  # after's
        assert server.output.count("POST /score 200") == 1  # after's alone: hold-c's answer was not written
        assert server.output.count("left-during-run") == 1


HOLD_THEN_FAIL = """
import os, time
HERE = os.path.dirname(os.path.abspath(__file__))

def init():
    pass

def run(data):
    open(os.path.join(HERE, "ran-" + data), "w").close()
    while not os.path.exists(os.path.join(HERE, "release-" + data)):
        time.sleep(0.005)
    raise RuntimeError("important failure of " + data)
"""


def test_a_run_that_fails_after_its_client_left_is_still_logged_and_counted_but_not_answered(tmp_path):
    write(tmp_path, "score.py", HOLD_THEN_FAIL)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        try:
            conn = send_score(server.port, "hold-f", "left-then-failed")
            assert wait_until(lambda: ran(tmp_path, "hold-f"), timeout=10)
            conn.close()
            wait_output(server, "Request left-then-failed: its client left while run() was executing")
        finally:
            release(tmp_path, "hold-f")
        wait_output(server, "RuntimeError: important failure of hold-f")  # its traceback, as for any failure
        page = server.http.get("/metrics").text
        assert sample(page, "azmlinfsrv_run_errors_total") == 1
        assert dropped(server.port, "running") == 1
        assert 'status="500"' not in page  # no answer was written, so none was counted


def test_a_run_that_times_out_after_its_client_left_is_given_up_on_but_not_answered(tmp_path):
    write(tmp_path, "score.py", HOLD)
    with ServerProcess(["--entry_script", "score.py"], env={"SCORING_TIMEOUT_MS": "1500"},
                       cwd=str(tmp_path)) as server:
        try:
            conn = send_score(server.port, "hold-t", "left-then-timed-out")
            assert wait_until(lambda: ran(tmp_path, "hold-t"), timeout=10)
            conn.close()
            wait_output(server, "Request left-then-timed-out: its client left while run() was executing")
            wait_output(server, "Scoring timeout after 1500 ms for request left-then-timed-out")
            page = server.http.get("/metrics").text
            assert sample(page, "azmlinfsrv_timeouts_total") == 1
            assert dropped(server.port, "running") == 1
            assert 'status="500"' not in page
            assert "POST /score 500" not in server.output
        finally:
            release(tmp_path, "hold-t")


def test_pipelined_requests_queued_behind_a_busy_worker_are_all_answered(tmp_path):
    write(tmp_path, "score.py", HOLD)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "1"], cwd=str(tmp_path)) as server:
        with worker_held(server.port, tmp_path) as busy:
            pipelined = send_score(server.port, "p1")
            assert wait_until(lambda: sample(server.http.get("/metrics").text, "azmlinfsrv_queue_depth") == 1,
                              timeout=10)
            # p2 and p3 wait in the socket, unread, while p1 waits for the worker: bytes to read are a
            # client that is there; p4 and p5 come in one segment (one is read with the other).
            pipelined.sendall(score_request("p2") + score_request("p3"))
            pipelined.sendall(score_request("p4") + score_request("p5"))
            release(tmp_path, "hold-a")
            assert read_answer(busy.makefile("rb"))[0] == 200
            stream = pipelined.makefile("rb")
            for name in ("p1", "p2", "p3", "p4", "p5"):
                status, body = read_answer(stream)
                assert (status, json.loads(body)["data"]) == (200, name)
            pipelined.close()
        assert dropped(server.port, "queued") == 0 and dropped(server.port, "running") == 0


def test_expect_100_continue_queued_behind_a_busy_worker_is_answered(tmp_path):
    write(tmp_path, "score.py", HOLD)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "1"], cwd=str(tmp_path)) as server:
        with worker_held(server.port, tmp_path) as busy:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as waiting:
                waiting.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                b"Content-Length: 4\r\n\r\n")
                stream = waiting.makefile("rb")
                assert read_answer(stream) == (100, b"")
                waiting.sendall(b"body")
                assert wait_until(lambda: sample(server.http.get("/metrics").text, "azmlinfsrv_queue_depth") == 1,
                                  timeout=10)
                release(tmp_path, "hold-a")
                status, body = read_answer(stream)
                assert (status, json.loads(body)["data"]) == (200, "body")
            assert read_answer(busy.makefile("rb"))[0] == 200
        assert dropped(server.port, "queued") == 0 and dropped(server.port, "running") == 0


def listening_sockets(port):
    """How many sockets listen on ``port`` (Linux: /proc/net/tcp and tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            for line in handle.read().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    count += 1
    return count


def pids_of_new_connections(port, count):
    """The pid that answers each of ``count`` new connections, one after the other."""
    return [Http(port).post("/score", b"pid", timeout=10).json["pid"] for _ in range(count)]


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads connections on Linux")


@linux_only
def test_prefork_processes_listen_on_sockets_of_their_own_and_share_new_connections(tmp_path):
    write(tmp_path, "score.py", HOLD)
    with ServerProcess(["--entry_script", "score.py", "--processes", "2"], cwd=str(tmp_path)) as server:
        wait_output(server, "each with a socket of its own (SO_REUSEPORT)")
        assert wait_until(lambda: server.output.count("ready for serving traffic") == 2, timeout=15)
        assert listening_sockets(server.port) == 2
        pids = pids_of_new_connections(server.port, 64)
        shares = sorted(pids.count(pid) for pid in set(pids))
        assert len(shares) == 2 and server.proc.pid not in pids
        assert shares[0] >= 13, shares  # the kernel's hash: 64 connections put fewer than 13 on one of two ~1e-7
        code, out = run_cli(["--entry_script", "score.py", "--port", str(server.port)], cwd=str(tmp_path))
        assert code == 1 and "already in use" in out  # the port is still ours alone
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    assert "Traceback" not in server.output


@linux_only
def test_a_replaced_process_listens_once_its_script_is_loaded(tmp_path):
    write(tmp_path, "score.py", HOLD)
    with ServerProcess(["--entry_script", "score.py", "--processes", "2"], cwd=str(tmp_path)) as server:
        assert wait_until(lambda: server.output.count("ready for serving traffic") == 2, timeout=15)
        first = set(pids_of_new_connections(server.port, 32))
        assert len(first) == 2
        open(os.path.join(str(tmp_path), "hold-init"), "w").close()
        victim = sorted(first)[0]
        survivor = sorted(first)[1]
        os.kill(victim, signal.SIGKILL)
        waiting = wait_until(lambda: [n for n in os.listdir(str(tmp_path)) if n.startswith("init-waits-")])
        assert waiting, server.output
        fresh = int(waiting[0].rsplit("-", 1)[1])
        try:
            # Its init() is still running: no socket of its own yet, every connection goes to the other.
            assert listening_sockets(server.port) == 1
            assert set(pids_of_new_connections(server.port, 32)) == {survivor}
        finally:
            open(os.path.join(str(tmp_path), "release-init"), "w").close()
        wait_output(server, "Worker with pid %d ready for serving traffic" % fresh)
        assert listening_sockets(server.port) == 2
        assert fresh in set(pids_of_new_connections(server.port, 32))
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0
    assert "starting a new one" in server.output
    assert "Traceback" not in server.output
