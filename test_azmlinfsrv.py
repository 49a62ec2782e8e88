"""Tests for azmlinfsrv: the real server on free loopback ports, real HTTP.

Grouped by the section of ../shared/REFERENCE.md (or the issue) they prove.
Every test starts a server (a subprocess through the CLI, or in-process with
azmlinfsrv.serve) and speaks HTTP to it; no mocks stand in for the server.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse

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


class ServerProcess:
    """The CLI in a subprocess: ``python azmlinfsrv.py --entry_script ... --port ...``."""

    def __init__(self, args, env=None, cwd=None, port=None, wait=True, ready_path="/"):
        self.port = port or free_port()
        full_env = dict(os.environ)
        full_env.pop("AZUREML_ENTRY_SCRIPT", None)
        full_env.pop("AZUREML_MODEL_DIR", None)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.setdefault("AZMLINFSRV_HOST", "127.0.0.1")
        full_env.update(env or {})
        cmd = [sys.executable, MODULE] + list(args)
        if "--port" not in args:
            cmd += ["--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._output = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.http = Http(self.port)
        if wait:
            self.wait_ready(ready_path)

    def _read(self):
        for line in iter(self.proc.stdout.readline, b""):
            self._output.append(line.decode("utf-8", "replace"))

    @property
    def output(self):
        return "".join(self._output)

    def wait_ready(self, path="/", timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise AssertionError("server exited %s:\n%s" % (self.proc.returncode, self.output))
            try:
                if self.http.get(path, timeout=2).status in (200, 503):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("server not ready:\n" + self.output)

    def wait_exit(self, timeout=20):
        code = self.proc.wait(timeout)
        self._reader.join(2)
        return code

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def run_cli(args, env=None, cwd=None, timeout=30):
    """Run the CLI to completion (start-up failures): (exit code, combined output)."""
    full_env = dict(os.environ)
    full_env.pop("AZUREML_ENTRY_SCRIPT", None)
    full_env.update(env or {})
    full_env.setdefault("AZMLINFSRV_HOST", "127.0.0.1")
    proc = subprocess.run([sys.executable, MODULE] + list(args), cwd=cwd, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
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


HELLO = """
def init():
    pass

def run(data):
    return {"message": "Hello, World!", "data": data}
"""


@pytest.fixture
def app_dir(tmp_path):
    return tmp_path


@pytest.fixture
def hello_server(tmp_path):
    write(tmp_path, "score.py", HELLO)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        yield server


@pytest.fixture
def served(tmp_path):
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


def http_for(handle):
    return Http(int(handle.url.rsplit(":", 1)[1]))


# ===========================================================================
# REFERENCE.md: Routes
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


def test_score_put_is_405_with_reference_message(hello_server):
    answer = hello_server.http.request("PUT", "/score", body=b"{}")
    assert answer.status == 405
    assert answer.json == {"message": "The method is not allowed for the requested URL."}


def test_unknown_path_is_404_json(hello_server):
    answer = hello_server.http.get("/nope")
    assert answer.status == 404
    assert answer.json["message"].startswith("The requested URL was not found on the server.")


def test_head_score_on_undecorated_run_is_405(hello_server):
    answer = hello_server.http.request("HEAD", "/score")
    assert answer.status == 405


def test_swagger_unknown_version_is_404_listing_supported(hello_server):
    answer = hello_server.http.get("/swagger.json?version=9")
    assert answer.status == 404
    assert "Supported versions" in answer.json["message"]


def test_swagger_default_version_is_2(hello_server):
    answer = hello_server.http.get("/swagger.json")
    assert answer.status == 200
    assert answer.json["swagger"] == "2.0"


def test_user_swagger_file_is_served(tmp_path):
    write(tmp_path, "score.py", HELLO)
    write(tmp_path, "swagger3.json", '{"openapi": "3.0.1", "info": {"title": "mine"}}')
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path),
                       env={"AML_APP_ROOT": str(tmp_path)}) as server:
        assert server.http.get("/swagger.json?version=3").json["info"]["title"] == "mine"


# ===========================================================================
# REFERENCE.md: Calling run()
# ===========================================================================


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


# ===========================================================================
# REFERENCE.md: Responses
# ===========================================================================

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


def test_amlresponse_default_content_type_is_html(responses_server):
    status, headers, body = responses_server.score("str_body_not_used") if False else (None, None, None)
    status, headers, body = responses_server.request("POST", "/score", "lower")
    assert headers["content-type"] == "text/plain"


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


def test_hide_error_details_keeps_only_message(served):
    handle = served("""
        def init(): pass
        def run(data): raise ValueError("secret")
    """, hide_error_details=True)
    status, _, body = handle.score("x")
    assert status == 500
    assert body == {"message": "An unexpected error occurred in scoring script. Check the logs for more info."}


def test_scoring_timeout_answers_500_in_time(served):
    handle = served("""
        import time
        def init(): pass
        def run(data):
            time.sleep(3)
            return "late"
    """, env={"SCORING_TIMEOUT_MS": "300"})
    start = time.time()
    status, headers, body = handle.score("x")
    elapsed = time.time() - start
    assert status == 500
    assert body["message"] == "Scoring timeout after 300 ms"
    assert headers["x-ms-run-function-failed"] == "True"
    assert elapsed < 0.3 + 0.5
    assert body["error"]["location"]["source"] == "time.sleep(3)"


# ===========================================================================
# REFERENCE.md: Headers
# ===========================================================================


def test_request_id_is_generated_uuid(hello_server):
    answer = hello_server.http.post("/score", b"x")
    rid = answer.headers["x-request-id"]
    assert len(rid) == 36 and rid.count("-") == 4
    assert answer.headers["x-ms-request-id"] == rid
    assert "x-ms-client-request-id" not in answer.headers


def test_request_id_is_echoed(hello_server):
    answer = hello_server.http.post("/score", b"x", headers={"x-request-id": "abc"})
    assert answer.headers["x-request-id"] == "abc"


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


def test_trace_id_echoed_and_server_version(hello_server):
    answer = hello_server.http.post("/score", b"x", headers={"TraceId": "t-1"})
    assert answer.headers["traceid"] == "t-1"
    assert answer.headers["x-ms-server-version"] == "azmlinfsrv/" + azmlinfsrv.__version__


def test_server_version_header_can_be_disabled(tmp_path):
    write(tmp_path, "score.py", HELLO)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path),
                       env={"SERVER_VERSION_LOG_RESPONSE_ENABLED": "false"}) as server:
        assert "x-ms-server-version" not in server.http.post("/score", b"x").headers


def test_cors_allowed_origin_only(tmp_path):
    write(tmp_path, "score.py", HELLO)
    with ServerProcess(["--entry_script", "score.py", "--access_control_allow_origins",
                        "http://a.example, http://b.example"], cwd=str(tmp_path)) as server:
        ok = server.http.post("/score", b"x", headers={"Origin": "http://b.example"})
        assert ok.headers["access-control-allow-origin"] == "http://b.example"
        other = server.http.post("/score", b"x", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_from_config_file(tmp_path):
    write(tmp_path, "score.py", HELLO)
    write(tmp_path, "config.json", json.dumps({"AML_CORS_ORIGINS": "*"}))
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path)) as server:
        answer = server.http.post("/score", b"x", headers={"Origin": "http://any.example"})
        assert answer.headers["access-control-allow-origin"] == "*"


# ===========================================================================
# REFERENCE.md: Start-up, configuration, exit codes, logs
# ===========================================================================


# ===========================================================================
# REFERENCE.md: inference-schema and swagger.json
# ===========================================================================


# ===========================================================================
# Issue 3: concurrency and resilience
# ===========================================================================


# ===========================================================================
# Issue 4: performance features (pre-fork mode)
# ===========================================================================


# ===========================================================================
# Issue 5: App Insights telemetry
# ===========================================================================

IKEY = "1b0e8f6c-2d4a-4b7e-9c3f-0a1b2c3d4e5f"
ISO_TIME = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"
AI_DURATION = r"^\d+\.\d\d:\d\d:\d\d\.\d{6}$"


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
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate(self.items())
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError("collector never saw it; uploads: %r" % [(u[0], u[3], len(u[2])) for u in self.uploads])

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


def telemetry_env(collector_or_url, **extra):
    url = collector_or_url if isinstance(collector_or_url, str) else collector_or_url.url
    env = {"AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_INSIGHTS_KEY": IKEY, "AML_APP_INSIGHTS_ENDPOINT": url,
           "AZMLINFSRV_TELEMETRY_FLUSH_SECONDS": "0.2", "HOSTNAME": "container-7", "WORKSPACE_NAME": "ws-1",
           "SERVICE_NAME": "svc-1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def by_request_id(request_id, kind="RequestData"):
    return lambda items: [i for i in items if i["data"]["baseType"] == kind
                          and i["tags"].get("ai.operation.id") == request_id]


def request_ids(items):
    return [i["tags"].get("ai.operation.id") for i in items if i["data"]["baseType"] == "RequestData"]


def metric(server, name):
    for line in server.http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


def test_telemetry_request_record_fields_types_and_formats(tmp_path, collector):
    write(tmp_path, "score.py", HELLO)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=telemetry_env(collector)) as server:
        answer = server.http.post("/score?v=1", b'{"x": 1}', headers={
            "x-request-id": "req-fields-1", "x-ms-client-request-id": "client-9", "Host": "example.test"})
        assert answer.status == 200
        assert server.http.get("/missing", headers={"x-request-id": "req-404"}).status == 404
        server.http.get("/")  # the liveness probe is never recorded
        [record] = collector.wait_for(by_request_id("req-fields-1"))
        [missing] = collector.wait_for(by_request_id("req-404"))
    assert "Telemetry:    on, to %s" % collector.url in server.output
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
    # the lines still reach the console as without telemetry (logging.lastResort, basicConfig)
    assert "careful with p1" in server.output and "ERROR:root:root says p1" in server.output
    # the server's own lines (access log, start-up) stay in the log, not in telemetry
    all_messages = [i["data"]["baseData"]["message"] for i in collector.items("MessageData")]
    assert not [m for m in all_messages if "POST /score" in m or "init" in m.lower()]


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
    write(tmp_path, "score.py", HELLO)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=telemetry_env(collector)) as server:
        for n in range(3):
            assert server.http.post("/score", b"1", headers={"x-request-id": "r500-%d" % n}).status == 200
        collector.wait_for(lambda items: {"r500-0", "r500-1", "r500-2"} <= set(request_ids(items)))
        assert [u[3] for u in collector.uploads[:3]] == [500, 500, 200]
        assert collector.uploads[0][2] == collector.uploads[1][2] == collector.uploads[2][2][:len(
            collector.uploads[0][2])]  # the same items, resent
        sent = metric(server, "azmlinfsrv_telemetry_items_sent_total")
        assert sent >= 3
        assert metric(server, "azmlinfsrv_telemetry_items_dropped_total") == 0
    ids = request_ids(collector.items())
    assert sorted(i for i in ids if i.startswith("r500")) == ["r500-0", "r500-1", "r500-2"]  # no duplicates
    assert server.output.count("the collector answered 500") == 1  # logged once per kind


def test_telemetry_honours_retry_after_on_429(tmp_path, collector):
    collector.plan = [(429, {"Retry-After": "1"}, None)]
    write(tmp_path, "score.py", HELLO)
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=telemetry_env(collector)) as server:
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
        deadline = time.time() + 10
        while not collector.uploads and time.time() < deadline:  # the first upload is now stuck
            time.sleep(0.02)
        slowest = 0.0
        for n in range(60):
            start = time.time()
            answer = server.http.post("/score", b'"x"', headers={"x-request-id": "hang-%d" % n})
            slowest = max(slowest, time.time() - start)
            assert answer.status == 200 and answer.json["data"] == '"x"'
        assert slowest < 3.0  # an upload blocks for up to 1 s at a time; scoring never waits for it
        dropped = metric(server, "azmlinfsrv_telemetry_items_dropped_total")
        assert dropped >= 60 - 20 - len(collector.uploads[0][2]) > 0
        assert len(collector.uploads[0][2]) < 20
        collector.plan = []
        collector.release.set()  # the collector recovers
        collector.wait_for(lambda items: "hang-59" in request_ids(items))
        assert metric(server, "azmlinfsrv_telemetry_items_sent_total") >= 1
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
        time.sleep(0.5)
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
        pass
    assert "not a valid UUID" in server.output and "Telemetry:    off" in server.output
    conn = "instrumentationkey=%s;INGESTIONENDPOINT=http://127.0.0.1:%d/" % (IKEY, collector.port)
    env = {"APPLICATIONINSIGHTS_CONNECTION_STRING": conn, "AZMLINFSRV_TELEMETRY_FLUSH_SECONDS": "0.2"}
    with ServerProcess(["--entry_script", "score.py"], cwd=str(tmp_path), env=env) as server:
        assert server.http.post("/score", b"1", headers={"x-request-id": "via-conn"}).status == 200
        [record] = collector.wait_for(by_request_id("via-conn"))
    assert record["iKey"] == IKEY
    assert collector.uploads[0][0] == "/v2.1/track"
    assert "on, to http://127.0.0.1:%d/v2.1/track" % collector.port in server.output
    assert IKEY not in server.output
    with ServerProcess(["--entry_script", "score.py", "--appinsights_instrumentation_key", IKEY], cwd=str(tmp_path),
                       env={"AML_APP_INSIGHTS_ENDPOINT": collector.url}) as server:
        pass
    assert "Telemetry:    on, to %s" % collector.url in server.output and IKEY not in server.output


# ===========================================================================
# Issue 6: developer loop (reload, --check, serve(), /metrics, helps)
# ===========================================================================
