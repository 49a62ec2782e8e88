#!/usr/bin/env python3
"""Side-by-side for MLflow no-code models: our azmlinfsrv.py serving an MLflow folder (no entry script) vs the
reference azureml-inference-server-http 1.5.1 running Azure's own generated mlflow_score_script.py.

Usage (run by hand; nothing here is part of the test suite):
    python bench/compare_mlflow.py --script PATH/mlflow_score_script.py --python MLFLOW_VENV/bin/python \
        --ref REF_MLFLOW_VENV/bin/azmlinfsrv [--only SUBSTR ...] [-v]

--script: Azure's script, from Azure/azureml-assets (assets/inference/environments/mlflow-py312-inference/
context/mlflow_score_script.py); it is read from that path, never copied into this repository.
--python: a Python with mlflow-skinny, scikit-learn, pandas, numpy ($AZMLINFSRV_MLFLOW_PYTHON by default): it
builds the models (testdata/mlflow_build_models.py) and runs our server.
--ref: the reference's azmlinfsrv in a venv that also has inference-schema, mlflow-skinny, scikit-learn,
pandas, numpy and azureml-ai-monitoring (the packages Azure's script imports).

The reference gets the cloud's layout: AZUREML_MODEL_DIR=<tmp>/azureml-models/<name>/1 holding a copy of the
model folder (mlflow refuses a symlinked one), MLFLOW_MODEL_FOLDER=<name>, the script in AML_APP_ROOT.  Ours gets
--model_dir <the model folder>.  Each request goes to both; status, content type, x-ms-run-function-failed and
body are compared (bodies
as JSON; our diagnosis object "error" beside "message" is left out, as --hide_error_details would).  Swagger
documents (?version=2, 3, 3.1) are compared too.  Exit 0 when all match, 1 otherwise.
"""
import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
JSON = {"Content-Type": "application/json"}


def body(value):
    return json.dumps(value).encode()


def C(name, value=None, raw=None, headers=JSON, method="POST", path="/score"):
    return (name, method, path, raw if raw is not None else body(value), headers)


TABLE = {"columns": ["a", "b", "c"], "data": [[0.9, 0.9, 0.1], [0.1, 0.1, 0.1]]}
COMMON = [
    C("no_content_type", raw=body({"input_data": [[1]]}), headers={}),
    C("text_plain", raw=body({"input_data": [[1]]}), headers={"Content-Type": "text/plain"}),
    C("empty_body", raw=b""),
    C("malformed", raw=b"{\"input_data\": "),
    C("body_list", [1, 2]),
    C("body_string", "x"),
    C("no_input_data", {"data": [[1, 2, 3]]}),
    C("input_data_null", {"input_data": None}),
    C("input_data_number", {"input_data": 5}),
    C("get_score", method="GET", raw=b"", headers={}),
    C("swagger_2", method="GET", path="/swagger.json?version=2", raw=b"", headers={}),
    C("swagger_3", method="GET", path="/swagger.json?version=3", raw=b"", headers={}),
    C("swagger_31", method="GET", path="/swagger.json?version=3.1", raw=b"", headers={}),
]
CASES = {
    "table": [
        C("split", {"input_data": TABLE}),
        C("split_index", {"input_data": dict(TABLE, index=[5, 6])}),
        C("split_reordered", {"input_data": {"columns": ["c", "a", "b"], "data": [[0.1, 0.9, 0.9]]}}),
        C("split_ints", {"input_data": {"columns": ["a", "b", "c"], "data": [[1, 1, 0]]}}),
        C("split_missing_column", {"input_data": {"columns": ["a", "b"], "data": [[0.1, 0.2]]}}),
        C("split_extra_column", {"input_data": {"columns": ["a", "b", "c", "d"], "data": [[0.1, 0.2, 0.3, 9]]}}),
        C("split_string_value", {"input_data": {"columns": ["a", "b", "c"], "data": [["x", 0.2, 0.3]]}}),
        C("records", {"input_data": [{"a": 0.1, "b": 0.2, "c": 0.3}]}),
        C("rows", {"input_data": [[0.1, 0.2, 0.3]]}),
        C("with_params", {"input_data": TABLE, "params": {"k": 1}}),
        C("params_not_dict", {"input_data": TABLE, "params": 3}),
        C("get_query", method="GET", raw=b"", headers={},
          path="/score?input_data=" + json.dumps(TABLE).replace(" ", "")),
    ] + COMMON,
    "tensor": [
        C("rows", {"input_data": [[0.1, 0.2, 0.3], [1, 2, 3]]}),
        C("one_row", {"input_data": [[1.0, 1.0, 1.0]]}),
        C("ints", {"input_data": [[1, 2, 3]]}),
        C("wrong_width", {"input_data": [[1.0, 2.0]]}),
        C("flat", {"input_data": [1.0, 2.0, 3.0]}),
        C("strings", {"input_data": [["a", "b", "c"]]}),
        C("dict", {"input_data": {"x": [[1, 2, 3]]}}),
        C("split", {"input_data": TABLE}),
        C("with_params", {"input_data": [[1, 2, 3]], "params": {"k": 1}}),
    ] + COMMON,
    "params": [
        C("plain", {"input_data": {"columns": ["x", "y"], "data": [[1.0, 2.0]]}}),
        C("multiplier", {"input_data": {"columns": ["x", "y"], "data": [[1.0, 2.0]]}, "params": {"multiplier": 3}}),
        C("as_dict", {"input_data": {"columns": ["x", "y"], "data": [[1.0, 2.0], [3, 4]]},
                      "params": {"as_dict": True, "multiplier": 0.5}}),
        C("bad_type", {"input_data": {"columns": ["x", "y"], "data": [[1.0, 2.0]]}, "params": {"multiplier": "x"}}),
        C("unknown_param", {"input_data": {"columns": ["x", "y"], "data": [[1.0, 2.0]]}, "params": {"zzz": 1}}),
        C("params_list", {"input_data": {"columns": ["x", "y"], "data": [[1.0, 2.0]]}, "params": [1]}),
        C("params_null", {"input_data": {"columns": ["x", "y"], "data": [[1.0, 2.0]]}, "params": None}),
        C("missing_column", {"input_data": {"columns": ["x"], "data": [[1.0]]}}),
    ] + COMMON,
    "named": [
        C("both", {"input_data": {"x": [[1, 2], [3, 4]], "y": [10, 20]}}),
        C("one_missing", {"input_data": {"x": [[1, 2], [3, 4]]}}),
        C("extra_name", {"input_data": {"x": [[1, 2]], "y": [1], "z": [5]}}),
        C("not_a_list", {"input_data": {"x": 1, "y": [1]}}),
        C("rows", {"input_data": [[1, 2, 3]]}),
        C("strings", {"input_data": {"x": [["a", "b"]], "y": [1]}}),
    ] + COMMON,
    "nosig": [
        C("rows", {"input_data": [[0.9, 0.9, 0.1], [0.1, 0.1, 0.1]]}),
        C("split_index", {"input_data": dict(TABLE, index=[0, 1])}),
        C("split_no_index", {"input_data": TABLE}),
        C("named", {"input_data": {"a": [0.1], "b": [0.2], "c": [0.3]}}),
        C("json_text", {"input_data": json.dumps([[0.1, 0.2, 0.3]])}),
        C("nested_input_data", {"input_data": {"input_data": [[0.1, 0.2, 0.3]]}}),
        C("wrong_width", {"input_data": [[0.1, 0.2]]}),
    ] + COMMON,
}


def json_diff(a, b, where=""):
    """[(path, reference value, our value)] where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            out += json_diff(a.get(key, "<absent>"), b.get(key, "<absent>"), "%s/%s" % (where, key))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in json_diff(x, y, "%s/%d" % (where, i))]
    return [] if a == b else [(where or "/", a, b)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, env, cwd, port, log):
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited (%s): see %s" % (proc.returncode, log.name))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not answer within 120 s: see %s" % log.name)


def send(port, case):
    _, method, path, data, headers = case
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=data if method != "GET" else None, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw
    if isinstance(parsed, dict) and "message" in parsed:
        parsed.pop("error", None)
    ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip()
    return resp.status, ctype, resp.getheader("x-ms-run-function-failed"), parsed


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--script", required=True, help="Azure's mlflow_score_script.py")
    ap.add_argument("--python", default=os.environ.get("AZMLINFSRV_MLFLOW_PYTHON"))
    ap.add_argument("--ref", default=os.environ.get("AZMLINFSRV_MLFLOW_REF"))
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if not (args.python and args.ref):
        ap.error("--python and --ref are needed (or AZMLINFSRV_MLFLOW_PYTHON / AZMLINFSRV_MLFLOW_REF)")
    work = tempfile.mkdtemp(prefix="compare-mlflow-")
    models = os.path.join(work, "models")
    subprocess.run([args.python, os.path.join(ROOT, "testdata", "mlflow_build_models.py"), models], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resources = os.path.join(work, "mlflow_resources")
    os.makedirs(resources)
    shutil.copy(args.script, os.path.join(resources, "mlflow_score_script.py"))
    total = same = 0
    differences = []
    try:
        for name, cases in CASES.items():
            cases = [c for c in cases if not args.only or any(s in "%s.%s" % (name, c[0]) for s in args.only)]
            if not cases:
                continue
            model_dir = os.path.join(work, "azureml-models", name, "1")
            shutil.copytree(os.path.join(models, name), os.path.join(model_dir, name))
            env = dict(os.environ, AZUREML_MODEL_DIR=model_dir, MLFLOW_MODEL_FOLDER=name, AML_APP_ROOT=resources)
            env.pop("AZUREML_ENTRY_SCRIPT", None)
            ref_port, our_port = free_port(), free_port()
            with open(os.path.join(work, name + "-ref.log"), "w") as ref_log, \
                    open(os.path.join(work, name + "-ours.log"), "w") as our_log:
                ref = start([args.ref, "--entry_script", "mlflow_score_script.py", "--port", str(ref_port)], env,
                            resources, ref_port, ref_log)
                our_env = {k: v for k, v in os.environ.items() if k not in ("AZUREML_MODEL_DIR", "AML_APP_ROOT")}
                ours = start([args.python, os.path.join(ROOT, "azmlinfsrv.py"), "--model_dir",
                              os.path.join(models, name), "--port", str(our_port)], our_env, work, our_port, our_log)
                try:
                    for case in cases:
                        total += 1
                        a, b = send(ref_port, case), send(our_port, case)
                        label = "%s.%s" % (name, case[0])
                        if a == b:
                            same += 1
                            if args.verbose:
                                print("same  %-28s %s %s %s" % (label, a[0], a[1], json.dumps(a[3])[:100]))
                        else:
                            differences.append(label)
                            print("DIFF  %s" % label)
                            if a[:3] == b[:3] and isinstance(a[3], dict) and isinstance(b[3], dict):
                                for where, x, y in json_diff(a[3], b[3])[:12]:
                                    print("   at %s\n      reference: %s\n      ours:      %s" % (
                                        where, json.dumps(x, default=repr)[:400], json.dumps(y, default=repr)[:400]))
                                continue
                            for who, x in (("reference", a), ("ours     ", b)):
                                print("   %s: %s %s failed=%s %s" % (who, x[0], x[1], x[2],
                                                                    json.dumps(x[3], default=repr)[:600]))
                finally:
                    for proc in (ref, ours):
                        proc.terminate()
                        try:
                            proc.wait(30)
                        except subprocess.TimeoutExpired:
                            proc.kill()
    finally:
        print("logs in %s" % work)
    print("%d of %d requests answer the same (status, content type, x-ms-run-function-failed, body); %d differ: %s"
          % (same, total, len(differences), ", ".join(differences) or "none"))
    return 0 if not differences else 1


if __name__ == "__main__":
    sys.exit(main())
