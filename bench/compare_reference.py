#!/usr/bin/env python3
"""Side-by-side behaviour checker: our azmlinfsrv.py vs the reference azureml-inference-server-http 1.5.1.

Usage:
    python compare_reference.py --ours "python /path/to/azmlinfsrv.py" [--ref /path/to/ref-venv/bin/azmlinfsrv]
                                [--allow-diff NAME ...] [--only SUBSTR ...] [--strict-body] [--no-startup] [-v]

Both commands are started as `CMD --entry_script S --port P` with env AML_APP_ROOT=<tempdir> (cwd = tempdir),
on a free port; we wait for `GET /` to answer 200, send the same requests to both (stdlib http.client) and compare
status, body (parsed-JSON compare when both parse, else bytes) and the headers named in REFERENCE.md (random values
such as generated UUIDs, x-ms-run-fn-exec-ms, Date, Server are normalised). Start-up failure cases compare exit codes
and key message lines.

When --ref is not given: $AZMLINFSRV_REF, else ~/.cache/azmlinfsrv/ref-venv/bin/azmlinfsrv, creating that venv
(pip install azureml-inference-server-http==1.5.1 inference-schema) if missing. The venv lives outside the repo.

For the inference-schema case, our server's interpreter must be able to import `inference_schema`; if it cannot,
we put a directory of symlinks (inference_schema, wrapt, dateutil, pytz, six) taken from the reference venv on
PYTHONPATH for *our* server only (nothing else from the reference is exposed).

Case names are `<config>.<case>`; `--allow-diff` takes exact names or fnmatch patterns (e.g. `plain.post_form`, `resp.*`).
A few differences that REFERENCE.md deliberately asks for are listed in EXPECTED_DIFFS; they are reported as
"DIFF*" and do not fail the run unless --strict is given.
Exit code: 0 if every case matches (or is allowed), 1 otherwise, 2 on setup problems.
"""
import argparse
import atexit
import fnmatch
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

# --------------------------------------------------------------------------------------------------------------------
# Differences that REFERENCE.md explicitly asks us to have (reference behaviour is a bug/limitation we don't copy).
EXPECTED_DIFFS = {
    # Reference passes "" because Flask consumed the form body; REFERENCE.md: pass the body verbatim.
    "plain.post_form": "REFERENCE.md: urlencoded body is passed verbatim (reference passes \"\")",
    # Reference ignores AML_CORS_ORIGINS in config.json; REFERENCE.md: honour every documented key.
    "cfgcors.*": "REFERENCE.md: honour AML_CORS_ORIGINS from config.json (reference ignores it)",
    "cfgfile.*": "REFERENCE.md: honour AML_CORS_ORIGINS from config.json (reference ignores it)",
    # REFERENCE.md: match header names case-insensitively (the reference duplicates a lower-case content-type).
    "resp.r_ct_lower": "REFERENCE.md: a lower-case content-type is not duplicated",
}

# Headers compared (lower-case). Values normalised by normalise_header().
COMPARED_HEADERS = [
    "content-type", "x-ms-run-function-failed", "x-ms-run-fn-exec-ms", "x-ms-server-version",
    "x-request-id", "x-ms-request-id", "x-ms-client-request-id", "traceid",
    "access-control-allow-origin", "access-control-allow-methods", "access-control-allow-headers", "vary",
    "x-multi", "x-one", "x-custom",
]
REQUEST_ID_HEADERS = {"x-request-id", "x-ms-request-id", "x-ms-client-request-id", "x-ms-server-version"}

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", re.I)
MS_RE = re.compile(r"^\d+\.\d{3}$")
EXACT_VERSION = False  # --exact-version: also compare the version number in x-ms-server-version

# --------------------------------------------------------------------------------------------------------------------
# Score scripts written into the temp dir.
SCRIPTS = {
    "plain.py": '''
        def init():
            print("plain init")
        def run(data):
            return {"got": data, "type": type(data).__name__}
    ''',
    "hdrs.py": '''
        def init():
            pass
        def run(data, request_headers):
            return {"data": data, "headers": request_headers}
    ''',
    "raw.py": '''
        from azureml_inference_server_http.api.aml_request import rawhttp
        def init():
            pass
        @rawhttp
        def run(request):
            body = request.get_data(as_text=True)
            return {"method": request.method, "path": request.path, "full_path": request.full_path,
                    "url": request.url, "args": request.args.to_dict(flat=False),
                    "query_string": request.query_string.decode(), "headers": dict(request.headers),
                    "data": body, "content_type": request.content_type, "mimetype": request.mimetype,
                    "is_json": request.is_json, "json": request.get_json(silent=True)}
    ''',
    "raw_legacy.py": '''
        from azureml.contrib.services.aml_request import rawhttp
        from azureml.contrib.services.aml_response import AMLResponse
        def init():
            pass
        @rawhttp
        def run(request):
            return AMLResponse(request.get_data(), 207, {"X-Custom": request.method})
    ''',
    "resp.py": '''
        import json
        from azureml_inference_server_http.api.aml_response import AMLResponse
        def init():
            pass
        def run(data):
            d = json.loads(data) if data else {}
            k = d.get("k")
            if k == "none": return None
            if k == "str": return "hello"
            if k == "int": return 42
            if k == "list": return [1, "a", None, True, 1.5]
            if k == "nested": return {"a": {"b": [1, 2, {"c": None}]}, "u": "\\u00e9"}
            if k == "bytes": return b"abc"
            if k == "set": return {1, 2}
            if k == "obj": return object()
            if k == "nan": return float("nan")
            if k == "tuple": return (1, "a")
            if k == "raise": raise ValueError("boom")
            if k == "r_none": return AMLResponse(None, 202)
            if k == "r_jsonstr": return AMLResponse({"x": [1, 2]}, 201, json_str=True)
            if k == "r_str": return AMLResponse("plain text", 200)
            if k == "r_bytes": return AMLResponse(b"\\x00\\x01raw", 200, {"Content-Type": "application/octet-stream"})
            if k == "r_gen":
                def g():
                    yield "a"
                    yield b"b"
                    yield "c"
                return AMLResponse(g(), 200)
            if k == "r_list": return AMLResponse(["x", "y"], 200)
            if k == "r_ct": return AMLResponse("<b>x</b>", 200, {"Content-Type": "text/plain"})
            if k == "r_ct_lower": return AMLResponse("x", 200, {"content-type": "text/plain"})
            if k == "r_commas": return AMLResponse("x", 200, {"X-Multi": "a, b,c", "X-One": "v"})
            if k == "r_500": return AMLResponse("bad", 500)
            if k == "r_503_hdr": return AMLResponse("bad", 503, {"x-ms-run-function-failed": "nope"})
            if k == "r_400": return AMLResponse({"error": "bad"}, 400, json_str=True)
            if k == "r_failed_flag": return AMLResponse("x", 200, run_function_failed=True)
            if k == "r_reqid": return AMLResponse("x", 200, {"x-request-id": "mine", "TraceId": "t"})
            if k == "r_dict_nojson": return AMLResponse({"a": 1}, 200)
            return {"echo": d}
    ''',
    "schema.py": '''
        from inference_schema.schema_decorators import input_schema, output_schema
        from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
        def init():
            pass
        @input_schema("data", StandardPythonParameterType({"a": 1, "b": "x"}))
        @input_schema("factor", StandardPythonParameterType(2.0))
        @output_schema(StandardPythonParameterType({"result": [1.0]}))
        def run(data, factor, extra="dflt"):
            return {"data": data, "factor": factor, "extra": extra}
    ''',
    "slow.py": '''
        import time
        def init():
            pass
        def run(data):
            time.sleep(float(data or 0))
            return "done"
    ''',
    "real_score.py": '''
        def init():
            print("REAL init")
        def run(data):
            return {"from": "real", "data": data}
    ''',
    "driver.py": '''
        import real_score as driver_module
        def init():
            print("DRIVER init")
        def run(data):
            return {"from": "driver"}
    ''',
    "userswag/score.py": '''
        def init():
            pass
        def run(data):
            return data
    ''',
    "userswag/swagger.json": '{"swagger": "user-v2", "k": [1, 2]}',
    "userswag/swagger3.json": '{"openapi": "user-v3"}',
    "cfgdir/score.py": '''
        def init():
            pass
        def run(data):
            return data
    ''',
    "cfgdir/config.json": '{"SCORING_TIMEOUT_MS": 4321, "SERVICE_NAME": "fromfile", "AML_CORS_ORIGINS": "http://a.com"}',
    # what the script finds in its environment (the values that do not depend on the port or the version)
    "envdump.py": '''
        import os
        NAMES = ("WORKER_COUNT", "AML_APP_INSIGHTS_ENABLED", "TRANSPORT_PROTOCOL", "AML_CORS_ORIGINS",
                 "AZUREML_CONFIG_FILE", "AZUREML_MODEL_DIR")
        SEEN = {name: os.environ.get(name) for name in NAMES}
        SEEN["app_root_set"] = bool(os.environ.get("AML_APP_ROOT"))
        SEEN["key_set"] = "AML_APP_INSIGHTS_KEY" in os.environ
        SEEN["ports_set_and_equal"] = (os.environ.get("SERVER_PORT") or "").isdigit() and \\
            os.environ.get("SERVER_PORT") == os.environ.get("HEALTH_PORT")
        SEEN["server_version"] = (os.environ.get("HTTP_X_MS_SERVER_VERSION") or "").split("/")[0]
        def init():
            SEEN["enabled_in_init"] = os.environ.get("AML_APP_INSIGHTS_ENABLED")
        def run(data):
            return SEEN
    ''',
    # a logging.json written for the reference (its formatter and filter classes)
    "logjson/score.py": '''
        def init():
            print("init")
        def run(data):
            return data
    ''',
    "logjson/logging.json": json.dumps({
        "version": 1,
        "handlers": {"h": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "f"}},
        "formatters": {"f": {"class": "azureml_inference_server_http.log_config.AMLLogFormatter",
                             "format": "MYAPP %(asctime)s %(levelname)s %(name)s - %(message)s"}},
        "loggers": {"azmlinfsrv": {"level": "INFO", "handlers": ["h"], "propagate": False},
                    "gunicorn.access": {"level": "INFO", "handlers": ["h"], "filters": ["RootAccessFilter"]}},
        "filters": {"RootAccessFilter": {"()": "azureml_inference_server_http.log_config.RootAccessFilter"}}}),
    # start-up failure scripts
    "fail/cfgonly.json": '{"SERVICE_NAME": "no entry script here"}',
    "fail/syntax.py": "def init(:\n    pass\n",
    "fail/importraise.py": 'raise RuntimeError("import boom")\n',
    "fail/noinit.py": "def run(d):\n    return d\n",
    "fail/norun.py": "def init():\n    pass\n",
    "fail/runargs.py": "def init():\n    pass\ndef run(*args):\n    return 1\n",
    "fail/runnoparam.py": "def init():\n    pass\ndef run():\n    return 1\n",
    "fail/runonlyhdrs.py": "def init():\n    pass\ndef run(request_headers):\n    return 1\n",
    "fail/initraise.py": 'def init():\n    raise ValueError("init boom")\ndef run(d):\n    return d\n',
    "fail/ok.py": "def init():\n    pass\ndef run(d):\n    return d\n",
    "fail/both.py": '''
        from azureml_inference_server_http.api.aml_request import rawhttp
        from inference_schema.schema_decorators import input_schema
        from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
        def init():
            pass
        @rawhttp
        @input_schema("data", StandardPythonParameterType([1]))
        def run(data):
            return data
    ''',
}

J = {"Content-Type": "application/json"}
LONG = "a" * 101
OK100 = "b" * 100


def R(name, method, path, body=None, headers=None, **flags):
    return dict(name=name, method=method, path=path, body=body, headers=headers or {}, **flags)


# Each config: name -> (script relative path, extra env, app_root subdir or None, list of requests)
def build_configs():
    plain = [
        R("health", "GET", "/"),
        R("root_post", "POST", "/", b"x", route_level=True),
        R("get_noquery", "GET", "/score"),
        R("get_query", "GET", "/score?a=1&b=x&a=2&c=[1,2]&d=null&e=%7B%22k%22%3A%201%7D&f=&g=1.50&h=true&i=%22s%22"),
        R("get_query_unicode", "GET", "/score?u=%C3%A9&n=-3e2&s=%20sp"),
        R("post_json", "POST", "/score", b'{"a": 1, "b": [1, 2]}', J),
        R("post_text", "POST", "/score", "caf\u00e9 text".encode(), {"Content-Type": "text/plain"}),
        R("post_no_ct", "POST", "/score", b"raw body"),
        R("post_empty", "POST", "/score", b""),
        R("post_invalid_utf8", "POST", "/score", b"\xff\xfeabc"),
        R("post_form", "POST", "/score", b"a=1&b=2", {"Content-Type": "application/x-www-form-urlencoded"}),
        R("options", "OPTIONS", "/score"),
        R("head", "HEAD", "/score", compare_length=True),
        R("put", "PUT", "/score", b"x", route_level=True),
        R("delete", "DELETE", "/score", route_level=True),
        R("patch", "PATCH", "/score", b"x", route_level=True),
        R("unknown_get", "GET", "/nope", route_level=True),
        R("unknown_post", "POST", "/nope", b"x", route_level=True),
        R("trailing_slash", "GET", "/score/", route_level=True),
        R("rid_given", "GET", "/score", headers={"x-request-id": "rid-1"}),
        R("rid_traceid", "GET", "/score", headers={"x-request-id": "rid-1", "TraceId": "trace-1"}),
        R("rid_legacy", "GET", "/score", headers={"x-ms-request-id": "legacy-1"}),
        R("rid_client", "GET", "/score", headers={"x-ms-client-request-id": "cli-1"}),
        R("rid_all", "GET", "/score", headers={"x-request-id": "r1", "x-ms-request-id": "l1",
                                               "x-ms-client-request-id": "c1"}),
        R("rid_100_ok", "GET", "/score", headers={"x-request-id": OK100}),
        R("rid_101", "GET", "/score", headers={"x-request-id": LONG}),
        R("rid_101_health", "GET", "/", headers={"x-request-id": LONG}),
        R("legacy_101", "POST", "/score", b"x", {"x-ms-request-id": LONG}),
        R("client_101", "POST", "/score", b"x", {"x-ms-client-request-id": LONG}),
        R("swagger_default", "GET", "/swagger.json"),
        R("swagger_2", "GET", "/swagger.json?version=2"),
        R("swagger_20", "GET", "/swagger.json?version=2.0"),
        R("swagger_3", "GET", "/swagger.json?version=3"),
        R("swagger_30", "GET", "/swagger.json?version=3.0"),
        R("swagger_31", "GET", "/swagger.json?version=3.1"),
        R("swagger_bad", "GET", "/swagger.json?version=9"),
        R("swagger_empty", "GET", "/swagger.json?version="),
        R("swagger_post", "POST", "/swagger.json", b"", route_level=True),
    ]
    hdrs = [
        R("post_headers", "POST", "/score", b"hi", {"Content-Type": "text/plain", "x-custom-HEADER": "v",
                                                    "TraceId": "t"}),
        R("get_headers", "GET", "/score?x=1"),
    ]
    raw = [
        R("get", "GET", "/score"),
        R("get_query", "GET", "/score?a=1&a=2&b=x"),
        R("post_json", "POST", "/score", b'{"z": 1}', J),
        R("post_form", "POST", "/score", b"a=1&b=2", {"Content-Type": "application/x-www-form-urlencoded"}),
        R("options", "OPTIONS", "/score"),
        R("head", "HEAD", "/score"),
        R("put", "PUT", "/score", b"p", route_level=True),
    ]
    raw_legacy = [
        R("post", "POST", "/score", b"echo me"),
        R("get", "GET", "/score"),
    ]
    resp = [R(k, "POST", "/score", json.dumps({"k": k}).encode(), {"x-request-id": "rid"}) for k in [
        "none", "str", "int", "list", "nested", "bytes", "set", "obj", "nan", "tuple", "raise", "r_none",
        "r_jsonstr", "r_str", "r_bytes", "r_gen", "r_list", "r_ct", "r_ct_lower", "r_commas", "r_500", "r_503_hdr",
        "r_400", "r_failed_flag", "r_reqid", "r_dict_nojson"]]
    schema = [
        R("post_ok", "POST", "/score", b'{"data": {"a": 5, "b": "y"}, "factor": 3}', J),
        R("post_extra_keys", "POST", "/score", b'{"data": {"a": 5}, "factor": 3, "extra": 7, "junk": 1}', J),
        R("post_ct_charset", "POST", "/score", b'{"data": {"a": 5}, "factor": 3}',
          {"Content-Type": "application/json; charset=utf-8"}),
        R("post_ct_plus_json", "POST", "/score", b'{"data": {"a": 5}, "factor": 3}',
          {"Content-Type": "application/vnd.api+json"}),
        R("post_ct_text", "POST", "/score", b'{"data": {"a": 5}, "factor": 3}', {"Content-Type": "text/plain"}),
        R("post_no_ct", "POST", "/score", b'{"data": {"a": 5}, "factor": 3}'),
        R("post_list", "POST", "/score", b"[1, 2]", J),
        R("post_bad_json", "POST", "/score", b"{bad", J),
        R("post_empty", "POST", "/score", b"", J),
        R("post_missing_data", "POST", "/score", b'{"factor": 3}', J),
        R("post_missing_factor", "POST", "/score", b'{"data": {"a": 1}}', J),
        R("get_ok", "GET", "/score?data=%7B%22a%22%3A1%7D&factor=2"),
        R("get_missing", "GET", "/score"),
        R("get_wrong_type", "GET", "/score?data=x&factor=2"),
        R("options", "OPTIONS", "/score"),
        R("head", "HEAD", "/score", compare_length=True),
        R("swagger_2", "GET", "/swagger.json"),
        R("swagger_3", "GET", "/swagger.json?version=3"),
        R("swagger_31", "GET", "/swagger.json?version=3.1"),
    ]
    origin_a = {"Origin": "http://a.com"}
    cors = [
        R("allowed_get", "GET", "/score", headers=origin_a),
        R("allowed_post", "POST", "/score", b"x", {"Origin": "http://b.com"}),
        R("allowed_case", "GET", "/score", headers={"Origin": "HTTP://A.COM"}),
        R("disallowed", "GET", "/score", headers={"Origin": "http://c.com"}),
        R("no_origin", "GET", "/score"),
        R("preflight", "OPTIONS", "/score", headers={"Origin": "http://a.com", "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "content-type,x-foo"}),
        R("preflight_put", "OPTIONS", "/score", headers={"Origin": "http://a.com",
                                                         "Access-Control-Request-Method": "PUT"}),
        R("preflight_disallowed", "OPTIONS", "/score", headers={"Origin": "http://c.com",
                                                                "Access-Control-Request-Method": "POST"}),
        R("health", "GET", "/", headers=origin_a),
        R("bad_utf8", "POST", "/score", b"\xff", origin_a),
    ]
    cors_star = [
        R("with_origin", "GET", "/score", headers=origin_a),
        R("no_origin", "GET", "/score"),
        R("preflight", "OPTIONS", "/score", headers={"Origin": "http://a.com", "Access-Control-Request-Method": "GET"}),
    ]
    cors_single = [
        R("with_origin", "GET", "/score", headers=origin_a),
        R("no_origin", "GET", "/score"),
    ]
    timeout = [
        R("times_out", "POST", "/score", b"3"),
        R("fast", "POST", "/score", b"0"),
    ]
    driver = [R("post", "POST", "/score", b"q")]
    nover = [R("get", "GET", "/score"), R("health", "GET", "/")]
    swagenv = [R("swagger_2", "GET", "/swagger.json"), R("swagger_3", "GET", "/swagger.json?version=3")]
    userswag = [R("swagger_2", "GET", "/swagger.json"), R("swagger_3", "GET", "/swagger.json?version=3"),
                R("swagger_31", "GET", "/swagger.json?version=3.1")]
    cfgtimeout = [R("swagger_title", "GET", "/swagger.json")]
    cfgcors = [R("origin", "GET", "/score", headers=origin_a)]
    envdump = [R("env", "GET", "/score")]
    return [
        ("plain", "plain.py", {}, None, plain),
        ("hdrs", "hdrs.py", {}, None, hdrs),
        ("raw", "raw.py", {}, None, raw),
        ("rawlegacy", "raw_legacy.py", {}, None, raw_legacy),
        ("resp", "resp.py", {}, None, resp),
        ("schema", "schema.py", {}, None, schema),
        ("cors", "plain.py", {"AML_CORS_ORIGINS": "http://a.com, http://b.com"}, None, cors),
        ("corsstar", "plain.py", {"AML_CORS_ORIGINS": "*"}, None, cors_star),
        ("corssingle", "plain.py", {"AML_CORS_ORIGINS": "http://a.com"}, None, cors_single),
        ("timeout", "slow.py", {"SCORING_TIMEOUT_MS": "500"}, None, timeout),
        ("driver", "driver.py", {}, None, driver),
        ("nover", "plain.py", {"SERVER_VERSION_LOG_RESPONSE_ENABLED": "false"}, None, nover),
        ("swagenv", "plain.py", {"SERVICE_NAME": "mysvc", "SERVICE_VERSION": "9.9",
                                 "SERVICE_PATH_PREFIX": "/pre/fix/"}, None, swagenv),
        ("userswag", "userswag/score.py", {}, "userswag", userswag),
        ("cfgfile", "cfgdir/score.py", {}, "cfgdir", cfgtimeout),
        ("cfgcors", "cfgdir/score.py", {}, "cfgdir", cfgcors),
        ("envdump", "envdump.py", {}, None, envdump),
        ("envdump_cors", "envdump.py", {"AML_CORS_ORIGINS": "*", "WORKER_COUNT": "2"}, None, envdump),
        ("envdump_ai_asdf", "envdump.py", {"AML_APP_INSIGHTS_ENABLED": "asdf",
                                           "AML_APP_INSIGHTS_KEY": "11111111-2222-3333-4444-555555555555"},
         None, envdump),
        ("envdump_ai_badkey", "envdump.py", {"AML_APP_INSIGHTS_ENABLED": "true", "AML_APP_INSIGHTS_KEY": "bad"},
         None, envdump),
        ("envdump_tolerated", "envdump.py", {"AML_MODEL_DC_STORAGE_ENABLED": "asdf", "SEPERATE_HEALTH_ENDPOINT": "asdf",
                                             "AZUREML_LOG_LEVEL": "loud"}, None, envdump),
        ("logjson", "logjson/score.py", {}, "logjson", [R("post", "POST", "/score", b"x")]),
    ]


# Start-up failure cases: name -> (args (PORT placeholder), env, substrings expected in output when the ref has them)
def build_startup_cases():
    return [
        ("missing_script", ["--entry_script", "fail/nope.py", "--port", "PORT"], {}, ["No such file or directory"]),
        ("syntax_error", ["--entry_script", "fail/syntax.py", "--port", "PORT"], {}, ["SyntaxError"]),
        ("import_raises", ["--entry_script", "fail/importraise.py", "--port", "PORT"], {}, ["import boom"]),
        ("no_init", ["--entry_script", "fail/noinit.py", "--port", "PORT"], {},
         ["does not have a init() function defined."]),
        ("no_run", ["--entry_script", "fail/norun.py", "--port", "PORT"], {},
         ["does not have a run() function defined."]),
        ("run_args", ["--entry_script", "fail/runargs.py", "--port", "PORT"], {},
         ["run() cannot accept positional-only arguments, *args, or **kwargs."]),
        ("run_noparam", ["--entry_script", "fail/runnoparam.py", "--port", "PORT"], {},
         ["run() needs to accept an argument for input data."]),
        ("run_onlyhdrs", ["--entry_script", "fail/runonlyhdrs.py", "--port", "PORT"], {},
         ['run() needs to accept an argument other than "request_headers".']),
        ("init_raises", ["--entry_script", "fail/initraise.py", "--port", "PORT"], {}, ["init boom"]),
        ("rawhttp_and_schema", ["--entry_script", "fail/both.py", "--port", "PORT"], {},
         ["run() cannot be decorated with both @rawhttp and @input_schema"]),
        ("bad_timeout_env", ["--entry_script", "fail/ok.py", "--port", "PORT"], {"SCORING_TIMEOUT_MS": "abc"},
         ["SCORING_TIMEOUT_MS"]),
        ("bad_log_response_env", ["--entry_script", "fail/ok.py", "--port", "PORT"],
         {"APP_INSIGHTS_LOG_RESPONSE_ENABLED": "asdf"}, []),
        ("config_file_without_entry_or_main", ["--config_file", "fail/cfgonly.json", "--port", "PORT"], {},
         ["No score script found. Expected score script main.py."]),
        ("bad_port", ["--entry_script", "fail/ok.py", "--port", "0"], {}, []),
        ("bad_port_text", ["--entry_script", "fail/ok.py", "--port", "abc"], {}, []),
        ("worker_count_0", ["--entry_script", "fail/ok.py", "--worker_count", "0", "--port", "PORT"], {}, []),
        ("unknown_option", ["--entry_script", "fail/ok.py", "--bogus", "1", "--port", "PORT"], {}, []),
        ("no_entry_script", ["--port", "PORT"], {}, []),
        ("port_in_use", ["--entry_script", "fail/ok.py", "--port", "BUSYPORT"], {}, []),
    ]


# --------------------------------------------------------------------------------------------------------------------
_started = []  # Popen objects we started (killed at exit)


def kill_proc(p, grace=10):
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)  # its own session/group: started with start_new_session=True
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _cleanup():
    for p in _started:
        kill_proc(p, grace=3)


atexit.register(_cleanup)


def _on_signal(signum, frame):
    _cleanup()
    sys.exit(130)


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, label, cmd, script, env_extra, app_root, workdir, log_dir, startup_timeout):
        self.label = label
        self.port = free_port()
        env = dict(os.environ)
        if label.endswith("-ours"):  # our extra diagnostics (the "error" key) off: the reference's bodies exactly
            env.setdefault("AZMLINFSRV_HIDE_ERROR_DETAILS", "true")
        env.update(env_extra)
        env["AML_APP_ROOT"] = app_root
        self.log_path = os.path.join(log_dir, f"{label}.log")
        self.log = open(self.log_path, "wb")
        argv = cmd + ["--entry_script", os.path.join(workdir, script), "--port", str(self.port)]
        self.p = subprocess.Popen(argv, env=env, cwd=app_root, stdout=self.log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        _started.append(self.p)
        self.ready = False
        self.error = None
        deadline = time.time() + startup_timeout
        while time.time() < deadline:
            if self.p.poll() is not None:
                self.error = f"exited with code {self.p.returncode} before becoming ready (log: {self.log_path})"
                return
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3)
                c.request("GET", "/")
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    self.ready = True
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.2)
        self.error = f"not ready after {startup_timeout}s (log: {self.log_path})"

    def request(self, req, timeout):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(req["method"], req["path"], body=req["body"], headers=req["headers"])
            r = c.getresponse()
            body = r.read()
            return r.status, r.getheaders(), body
        except (OSError, http.client.HTTPException) as ex:
            return None, [], f"<request failed: {type(ex).__name__}: {ex}>".encode()
        finally:
            c.close()

    def stop(self):
        kill_proc(self.p)
        self.log.close()


def normalise_body(body, port):
    text = body.replace(f"127.0.0.1:{port}".encode(), b"127.0.0.1:PORT")
    text = text.replace(f"localhost:{port}".encode(), b"localhost:PORT")
    return text


def parse_json(b):
    try:
        return True, json.loads(b.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return False, None


def header_view(headers, req):
    """Return {lower-name: [normalised values...]} for the compared headers."""
    out = {}
    rid = None
    for k, v in headers:
        if k.lower() == "x-request-id":
            rid = v
    for k, v in headers:
        lk = k.lower()
        if lk not in COMPARED_HEADERS and not (req.get("compare_length") and lk == "content-length"):
            continue
        if lk == "x-ms-server-version" and not EXACT_VERSION and v.startswith("azmlinfsrv/"):
            v = "azmlinfsrv/<version>"
        elif lk == "x-ms-run-fn-exec-ms" and MS_RE.match(v):
            v = "<ms>"
        elif lk in ("x-ms-request-id", "x-ms-client-request-id") and rid is not None and v == rid \
                and UUID_RE.match(v):
            v = "<same as x-request-id uuid>"
        elif UUID_RE.match(v):
            v = "<uuid4>"
        out.setdefault(lk, []).append(v)
    # the case of the header *name* matters only for the duplicated lower-case content-type; compare names too for
    # content-type so that 'Content-Type' + 'content-type' duplicates are visible.
    return out


def compare_response(req, ours, ref, strict_body, ours_port, ref_port):
    diffs = []
    o_status, o_headers, o_body = ours
    r_status, r_headers, r_body = ref
    if o_status != r_status:
        diffs.append(f"status: ours={o_status} ref={r_status}")
    ob = normalise_body(o_body, ours_port)
    rb = normalise_body(r_body, ref_port)
    oj_ok, oj = parse_json(ob)
    rj_ok, rj = parse_json(rb)
    if oj_ok and rj_ok and not strict_body:
        if oj != rj and not (oj != oj and rj != rj):  # NaN
            diffs.append(f"json body: ours={_short(json.dumps(oj))} ref={_short(json.dumps(rj))}")
    elif ob != rb:
        diffs.append(f"body: ours={_short(ob)} ref={_short(rb)}")
    oh = header_view(o_headers, req)
    rh = header_view(r_headers, req)
    for name in sorted(set(oh) | set(rh)):
        ov, rv = oh.get(name), rh.get(name)
        if req.get("route_level") and name in REQUEST_ID_HEADERS and rv is None:
            continue  # REFERENCE.md: adding request-id headers to route-level 404/405 is fine
        if sorted(ov or []) != sorted(rv or []):
            diffs.append(f"header {name}: ours={ov} ref={rv}")
    return diffs


def _short(x, n=300):
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[:n] + f"...(+{len(s) - n})"


def is_allowed(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def expected_reason(name):
    for pat, why in EXPECTED_DIFFS.items():
        if fnmatch.fnmatchcase(name, pat):
            return why
    return None


# --------------------------------------------------------------------------------------------------------------------
def ensure_reference(explicit):
    if explicit:
        return shlex.split(explicit)
    env = os.environ.get("AZMLINFSRV_REF")
    if env:
        return shlex.split(env)
    venv = os.path.expanduser("~/.cache/azmlinfsrv/ref-venv")
    exe = os.path.join(venv, "bin", "azmlinfsrv")
    if os.path.exists(exe):
        return [exe]
    print(f"[setup] creating reference venv in {venv} (outside the repo) ...", flush=True)
    os.makedirs(os.path.dirname(venv), exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "azureml-inference-server-http==1.5.1",
                    "inference-schema"], check=True, timeout=1800)
    if not os.path.exists(exe):
        raise SystemExit(f"[setup] reference install did not produce {exe}")
    return [exe]


def ref_site_packages(ref_cmd):
    exe = os.path.realpath(shutil.which(ref_cmd[0]) or ref_cmd[0])
    bindir = os.path.dirname(exe)
    py = os.path.join(bindir, "python")
    if not os.path.exists(py):
        return None
    try:
        out = subprocess.run([py, "-c", "import inference_schema, os; "
                                        "print(os.path.dirname(os.path.dirname(inference_schema.__file__)))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def ours_can_import_schema(ours_cmd):
    first = os.path.basename(ours_cmd[0])
    if not first.startswith("python"):
        return None  # unknown interpreter
    try:
        r = subprocess.run([ours_cmd[0], "-c", "import inference_schema"], capture_output=True, timeout=60)
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return None


def make_schema_shim(ref_cmd, workdir):
    sp = ref_site_packages(ref_cmd)
    if not sp:
        return None
    shim = os.path.join(workdir, "_schema_shim")
    os.makedirs(shim, exist_ok=True)
    for name in ("inference_schema", "wrapt", "dateutil", "pytz", "six.py"):
        src = os.path.join(sp, name)
        if os.path.exists(src):
            os.symlink(src, os.path.join(shim, name))
    return shim


def write_scripts(workdir):
    for rel, text in SCRIPTS.items():
        path = os.path.join(workdir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text).lstrip("\n"))


def run_startup_case(cmd, args, env_extra, workdir, timeout, busy_port):
    env = dict(os.environ)
    env.update(env_extra)
    env["AML_APP_ROOT"] = workdir
    argv = cmd + [a.replace("BUSYPORT", str(busy_port)).replace("PORT", str(free_port())) for a in args]
    p = subprocess.Popen(argv, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    _started.append(p)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        kill_proc(p, grace=3)
        try:
            out, _ = p.communicate(timeout=5)
        except (subprocess.TimeoutExpired, ValueError):
            out = b""
        return "still running (timeout)", (out or b"").decode("utf-8", "replace")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", required=True, help='command for our server, e.g. "python /path/azmlinfsrv.py"')
    ap.add_argument("--ref", default=None, help="command for the reference server (default: see above)")
    ap.add_argument("--allow-diff", action="append", default=[], metavar="NAME",
                    help="case name or fnmatch pattern whose difference is tolerated (repeatable)")
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTR",
                    help="run only configs/cases whose name contains SUBSTR (repeatable)")
    ap.add_argument("--strict", action="store_true", help="also fail on EXPECTED_DIFFS")
    ap.add_argument("--strict-body", action="store_true", help="compare bodies byte-for-byte even when JSON")
    ap.add_argument("--exact-version", action="store_true",
                    help="compare the version in x-ms-server-version too (default: only 'azmlinfsrv/' prefix)")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up failure cases")
    ap.add_argument("--startup-timeout", type=float, default=60.0)
    ap.add_argument("--request-timeout", type=float, default=30.0)
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    global EXACT_VERSION
    EXACT_VERSION = args.exact_version
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    ours_cmd = shlex.split(args.ours)
    try:
        ref_cmd = ensure_reference(args.ref)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as ex:
        print(f"[setup] cannot prepare the reference: {ex}")
        return 2

    workdir = tempfile.mkdtemp(prefix="azmlinfsrv-compare-")
    log_dir = os.path.join(workdir, "_logs")
    os.makedirs(log_dir)
    write_scripts(workdir)

    ours_env_extra = {}
    can = ours_can_import_schema(ours_cmd)
    if can is not True:
        shim = make_schema_shim(ref_cmd, workdir)
        if shim:
            ours_env_extra["PYTHONPATH"] = shim + (os.pathsep + os.environ["PYTHONPATH"]
                                                   if os.environ.get("PYTHONPATH") else "")
            print(f"[setup] inference_schema shim for ours: {shim}")

    def selected(name):
        return not args.only or any(s in name for s in args.only)

    rows = []  # (name, verdict, details)

    for cfg_name, script, env_extra, app_sub, requests in build_configs():
        reqs = [r for r in requests if selected(f"{cfg_name}.{r['name']}")]
        if not reqs:
            continue
        app_root = os.path.join(workdir, app_sub) if app_sub else workdir
        print(f"[run] {cfg_name}: starting servers ({script})", flush=True)
        o_env = dict(env_extra)
        o_env.update(ours_env_extra)
        ours = Server(f"{cfg_name}-ours", ours_cmd, script, o_env, app_root, workdir, log_dir, args.startup_timeout)
        ref = Server(f"{cfg_name}-ref", ref_cmd, script, env_extra, app_root, workdir, log_dir, args.startup_timeout)
        try:
            if not (ours.ready and ref.ready):
                for r in reqs:
                    rows.append((f"{cfg_name}.{r['name']}", "DIFF",
                                 [f"server start: ours={'ok' if ours.ready else ours.error} "
                                  f"ref={'ok' if ref.ready else ref.error}"]))
                continue
            for r in reqs:
                name = f"{cfg_name}.{r['name']}"
                o = ours.request(r, args.request_timeout)
                f = ref.request(r, args.request_timeout)
                diffs = compare_response(r, o, f, args.strict_body, ours.port, ref.port)
                rows.append((name, "MATCH" if not diffs else "DIFF", diffs))
                if args.verbose:
                    print(f"   {name}: ours={o[0]} ref={f[0]}")
        finally:
            ours.stop()
            ref.stop()

    if not args.no_startup:
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        busy.bind(("0.0.0.0", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        try:
            for case_name, cargs, cenv, needles in build_startup_cases():
                name = f"startup.{case_name}"
                if not selected(name):
                    continue
                print(f"[run] {name}", flush=True)
                o_env = dict(cenv)
                o_env.update(ours_env_extra)
                orc, oout = run_startup_case(ours_cmd, cargs, o_env, workdir, 40, busy_port)
                rrc, rout = run_startup_case(ref_cmd, cargs, cenv, workdir, 40, busy_port)
                diffs = []
                if orc != rrc:
                    diffs.append(f"exit code: ours={orc} ref={rrc}")
                for n in needles:
                    if n in rout and n not in oout:
                        diffs.append(f"message missing in ours: {n!r}")
                if args.verbose and diffs:
                    diffs.append("ours output tail: " + _short(oout[-600:], 600))
                rows.append((name, "MATCH" if not diffs else "DIFF", diffs))
        finally:
            busy.close()

    # ---- report
    failed = 0
    width = max((len(n) for n, _, _ in rows), default=10)
    print()
    print(f"{'CASE':<{width}}  RESULT")
    print(f"{'-' * width}  ------")
    for name, verdict, diffs in rows:
        label = verdict
        if verdict == "DIFF":
            why = expected_reason(name)
            if is_allowed(name, args.allow_diff):
                label = "DIFF (allowed)"
            elif why and not args.strict:
                label = f"DIFF* (expected: {why})"
            else:
                failed += 1
        print(f"{name:<{width}}  {label}")
        if verdict == "DIFF":
            for d in diffs:
                print(f"{'':<{width}}    - {d}")
    n_match = sum(1 for _, v, _ in rows if v == "MATCH")
    print()
    print(f"{n_match}/{len(rows)} MATCH, {failed} failing DIFF(s). Logs: {log_dir}")
    if not args.keep_tmp and failed == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
