"""Tests for azmlinfsrv: the real server on free loopback ports, real HTTP.

Grouped by the section of ../shared/REFERENCE.md (or the issue) they prove.
Every test starts a server (a subprocess through the CLI, or in-process with
azmlinfsrv.serve) and speaks HTTP to it; no mocks stand in for the server.
"""

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
    folder = tmp_path_factory.mktemp("hostile")
    write(folder, "score.py", ECHO)
    with ServerProcess(["--entry_script", "score.py", "--max_body_bytes", "1000000", "--client_timeout", "3"],
                       cwd=str(folder)) as server:
        yield server


def test_hostile_battery_has_at_least_40_requests():
    assert len(HOSTILE) >= 40
    assert len({name for name, _, _, _ in HOSTILE}) == len(HOSTILE)
    record_figure("malformed/hostile requests tried", len(HOSTILE))


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
    write(tmp_path, "score.py", ECHO)
    with ServerProcess(["--entry_script", "score.py", "--client_timeout", "1"], cwd=str(tmp_path)) as server:
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


def test_idle_keep_alive_connections_do_not_hold_the_worker(tmp_path):
    write(tmp_path, "score.py", ECHO)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "1"], cwd=str(tmp_path)) as server:
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
    write(tmp_path, "score.py", ECHO)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "1", "--max_queue", "1"],
                       cwd=str(tmp_path)) as server:
        results = []
        threads = [threading.Thread(target=lambda: results.append(server.http.post("/score", b"sleep 2").status))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.4)
        begin = time.monotonic()
        answer = server.http.get("/", timeout=5)
        took = time.monotonic() - begin
        assert answer.status == 200 and answer.body == b"Healthy"
        assert took < 1.0
        for thread in threads:
            thread.join(10)
        assert results == [200, 200]


def test_overload_gets_200_or_503_never_a_hang_or_reset(tmp_path):
    write(tmp_path, "score.py", ECHO)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "1", "--max_queue", "2"],
                       cwd=str(tmp_path)) as server:
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


def test_connection_cap_rejects_extra_connections_with_503(tmp_path):
    write(tmp_path, "score.py", ECHO)
    with ServerProcess(["--entry_script", "score.py", "--max_connections", "3"], cwd=str(tmp_path)) as server:
        held = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: the connection stays open
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            held.append(sock)
        for _ in range(3):
            raw, closed_after = exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_after is not None
            status, headers, body = parse_responses(raw)[0]
            assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
            assert "Too many open connections" in json.loads(body)["message"]
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5
        while True:
            raw, _ = exchange(server.port, _GET_CLOSE)
            if parse_responses(raw)[0][0] == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert parse_responses(raw)[0][0] == 200


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
        assert -0.01 < lateness < 0.5
        assert server.http.get("/").status == 200  # the server answers at once
        time.sleep(max(0.0, 1.5 + 0.3 - (time.monotonic() - begin)))  # run() has returned: the slot is back
        answer = server.http.post("/score", b"fast", timeout=5)
        assert answer.status == 200 and answer.json == {"data": "fast"}
        time.sleep(0.2)
        log = server.output
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
        time.sleep(0.2)
        log = server.output
    assert "The streamed response of request stream-1 broke off: ValueError: broken generator" in log
    assert "at score.py, line 8, in chunks" in log


def test_sigterm_drains_requests_in_flight(tmp_path):
    write(tmp_path, "score.py", ECHO)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "5"], cwd=str(tmp_path)) as server:
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            server.http.post("/score", b"sleep 1.5", timeout=10).status)) for _ in range(5)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
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
    assert "Shut down on SIGTERM: 5 request(s) in flight finished" in log
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
    write(tmp_path, "score.py", ECHO)
    with ServerProcess(["--entry_script", "score.py", "--worker_count", "4", "--access_log", "false"],
                       cwd=str(tmp_path)) as server:
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
        time.sleep(0.2)
        log = server.output
    for bad in ("Traceback", "Unexpected error", "Internal error"):
        assert bad not in log, log[max(0, log.find(bad) - 300):log.find(bad) + 3000]
    record_figure("fuzz", "%d mutated requests, %d answered, statuses %s"
                  % (cases, answered, dict(sorted(statuses.items()))))


# ===========================================================================
# Issue 4: performance features (pre-fork mode)
# ===========================================================================


# ===========================================================================
# Issue 5: App Insights telemetry
# ===========================================================================


# ===========================================================================
# Issue 6: developer loop (reload, --check, serve(), /metrics, helps)
# ===========================================================================
