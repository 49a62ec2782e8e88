#!/usr/bin/env python3
"""Compare azmlinfsrv's AMLResponse/AMLRequest with the reference's (flask/werkzeug) attribute by attribute.

    ~/.cache/azmlinfsrv-bench/ref-venv/bin/python bench/compare_werkzeug.py [-v]

Run it with a Python that has the reference installed (azureml-inference-server-http, hence flask
and werkzeug): each case below is applied to the reference's ``AMLResponse`` (a flask Response) and
to ours, or to a werkzeug ``Request`` and our ``AMLRequest`` built from the same HTTP request, and
every result is compared: the value (or the exception type), the headers and the body afterwards.
The expected values the test suite checks over HTTP (test_azmlinfsrv.py, "werkzeug's Response and
Request") were read from this script's output.  Exit status 1 when anything differs.

Test-only: azmlinfsrv itself never imports werkzeug.
"""

import importlib.util
import io
import os
import sys
import urllib.parse

from azureml_inference_server_http.api.aml_response import AMLResponse as RefResponse  # noqa: E402
from werkzeug.wrappers import Request as WerkzeugRequest  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("azmlinfsrv_under_test", os.path.join(_HERE, "..", "azmlinfsrv.py"))
ours = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ours)

#: (constructor arguments, statements run on ``r`` first, expression compared).  The statements'
#: effect is compared too: the header list, status and body afterwards.
RESPONSE_CASES = [
    ("'abc', 200", "", "r.headers.to_wsgi_list()"),
    ("b'abc', 201", "", "r.status"),
    ("'abc', '201 CREATED'", "", "(r.status, r.status_code)"),
    ("'abc', '299 Whatever'", "", "(r.status, r.status_code)"),
    ("'abc', 299", "", "r.status"),
    ("'abc', 200", "r.status_code = 299", "r.status"),
    ("'abc', 200", "r.status_code = 418", "r.status"),
    ("'abc', 200", "r.status_code = 511", "r.status"),
    ("'abc', 200", "r.status = 'teapot'", "(r.status, r.status_code)"),
    ("'abc', 200", "r.status = 404", "(r.status, r.status_code)"),
    ("'abc', 200", "", "(r.mimetype, r.content_type, r.mimetype_params)"),
    ("'abc', 200", "r.mimetype = 'image/jpg'", "(r.mimetype, r.content_type)"),
    ("'abc', 200", "r.mimetype = 'text/plain'", "(r.mimetype, r.content_type)"),
    ("'abc', 200", "r.mimetype = 'application/xml'", "r.content_type"),
    ("'abc', 200", "r.mimetype = 'application/atom+xml'", "r.content_type"),
    ("'abc', 200", "r.mimetype = 'application/json'", "(r.content_type, r.is_json)"),
    ("'abc', 200", "r.content_type = 'image/png'", "(r.mimetype, r.content_type)"),
    ("'abc', 200", "r.content_type = 'text/csv; charset=latin-1; header=present'", "r.mimetype_params"),
    ("'abc', 200", "r.mimetype_params['charset'] = 'latin-1'", "r.content_type"),
    ("'abc', 200", "r.mimetype_params['q'] = 'a b'", "r.content_type"),
    ("'abc', 200", "del r.content_type", "(r.content_type, r.mimetype)"),
    ("'abc', 200", "", "(r.content_length, r.data, r.get_data(as_text=True))"),
    ("'abc', 200", "r.set_data('h\u00e9llo')", "(r.content_length, r.data)"),
    ("'abc', 200", "r.data = b'12345'", "(r.content_length, r.get_data())"),
    ("'abc', 200", "r.content_length = 7", "(r.content_length, r.headers['Content-Length'])"),
    ("'abc', 200", "r.headers['Content-Length'] = 'x'", "r.content_length"),
    ("(c for c in ['a', 'b']), 200", "", "(r.is_streamed, r.is_sequence, r.content_length)"),
    ("(c for c in ['a', 'b']), 200", "x = r.data", "(r.is_streamed, r.is_sequence, r.data, r.content_length)"),
    ("['a', b'b'], 200", "", "(r.is_streamed, r.is_sequence, r.get_data())"),
    ("None, 202", "", "(r.data, r.content_type, r.status)"),
    ("{'a': 1}, 200, json_str=True", "", "(r.data, r.content_type, r.json, r.get_json())"),
    ("'x', 200, {'Content-Type': 'text/plain', 'X-Many': 'a, b,c'}", "", "r.headers.to_wsgi_list()"),
    ("'x', 200, run_function_failed=True", "", "r.headers['x-ms-run-function-failed']"),
    ("'x', 200", "r.headers.add('Content-Disposition', 'attachment', filename='a b.png')",
     "r.headers['content-disposition']"),
    ("'x', 200", "r.headers.add('X-A', 'v', q=None, max_age=3)", "r.headers['x-a']"),
    ("'x', 200", "r.headers.add('X-A', '1'); r.headers.add('x-a', '2'); r.headers.set('X-A', '3')",
     "r.headers.to_wsgi_list()"),
    ("'x', 200", "r.headers.setdefault('X-B', 5)", "(r.headers.setdefault('x-b', 6), r.headers.getlist('X-B'))"),
    ("'x', 200", "r.headers.extend({'X-C': ['1', '2']}, X_D='3')", "r.headers.to_wsgi_list()"),
    ("'x', 200", "r.headers.extend([('X-C', 1)])", "r.headers.get('x-c', type=int)"),
    ("'x', 200", "r.headers.update({'Content-Type': 'text/csv'})", "r.headers.to_wsgi_list()"),
    ("'x', 200", "r.headers.remove('content-type')", "('Content-Type' in r.headers, r.mimetype)"),
    ("'x', 200", "del r.headers['CONTENT-TYPE']", "r.headers.get('content-type')"),
    ("'x', 200", "", "(r.headers[0], list(r.headers.keys()), len(r.headers))"),
    ("'x', 200", "", "r.headers.pop('X-Missing', 'd')"),
    ("'x', 200", "", "r.headers['X-Missing']"),
    ("'x', 200", "r.headers['X-Bad'] = 'a\\r\\nb'", "1"),
    ("'x', 200", "r.headers.getlist('X-N', type=int)", "r.headers.get('content-length', type=int)"),
    ("'x', 200", "r.set_cookie('sid', 'abc')", "r.headers.getlist('Set-Cookie')"),
    ("'x', 200", "r.set_cookie('sid', 'a b;c\u00e9', path='/x y', domain='.Example.com:80', secure=True, "
     "httponly=True, samesite='lax')", "r.headers.getlist('Set-Cookie')"),
    ("'x', 200", "r.set_cookie('sid', '1', expires=0)", "r.headers.getlist('Set-Cookie')"),
    ("'x', 200", "import datetime; r.set_cookie('sid', '1', expires=datetime.datetime(2030, 1, 2, 3, 4, 5))",
     "r.headers.getlist('Set-Cookie')"),
    ("'x', 200", "r.set_cookie('sid', '1', partitioned=True)", "r.headers.getlist('Set-Cookie')"),
    ("'x', 200", "r.delete_cookie('sid')", "r.headers.getlist('Set-Cookie')"),
    ("'x', 200", "r.set_cookie('sid', '1', samesite='bogus')", "1"),
    ("'x', 200", "r.location = '/elsewhere'", "(r.location, r.headers['Location'])"),
    ("'x', 200", "", "(r.location, r.content_encoding, r.access_control_allow_origin)"),
    ("'x', 200", "r.access_control_allow_origin = '*'", "r.headers.get('Access-Control-Allow-Origin')"),
    ("'x', 200", "r.freeze()", "r.content_length"),
    ("'x', 200", "r.set_etag('abc', weak=True)", "r.get_etag()"),
    ("'x', 200", "r.add_etag()", "r.get_etag()"),
    ("'x', 200", "", "(r.default_mimetype, r.default_status, r.max_cookie_size)"),
    ("'x', 200", "r.custom = 1", "r.custom"),
    # the cases test_azmlinfsrv.py sends over HTTP ("werkzeug's Response and Request")
    ("b'\\xff\\xd8\\xff', 200", "r.mimetype_params['charset'] = 'latin-1'", "r.content_type"),
    ("b'\\xff\\xd8\\xff', 200", "r.set_data('h\u00e9llo')", "r.headers.to_wsgi_list()"),
    ("'made', '201 CREATED'", "", "r.status_code"),
    ("b'\\xff\\xd8\\xff', 200", "r.status = 418", "r.status"),
    ("b'\\xff\\xd8\\xff', 200",
     "r.headers.add('Content-Disposition', 'attachment', filename='a b.png'); r.headers.add('X-Multi', '1'); "
     "r.headers.add('x-multi', '2'); r.headers.setdefault('X-Default', 5); r.headers.setdefault('x-default', 6); "
     "r.headers.extend({'X-Ext': ['a', 'b']}); r.headers.set('X-Set', 'old'); r.headers['x-set'] = 'new'; "
     "r.headers.add('X-Gone', '1'); r.headers.remove('x-gone'); r.headers.add('X-Del', '1'); "
     "del r.headers['X-DEL']", "r.headers.to_wsgi_list()"),
    ("b'\\xff\\xd8\\xff', 200", "r.set_cookie('sid', 'abc', max_age=60, httponly=True, samesite='lax'); "
     "r.set_cookie('odd', 'a b;c', path='/x y', secure=True); r.delete_cookie('old')",
     "r.headers.getlist('Set-Cookie')"),
    ("(c for c in ['a']), 200", "", "(r.is_streamed, r.content_length)"),
    ("'', 418", "", "r.status"),
    ("None, 202", "", "(r.data, r.status)"),
]

#: Werkzeug attributes we decline: the reference has them, ours must raise an AttributeError naming them.
DECLINED = ["cache_control", "make_conditional", "stream", "vary", "date", "call_on_close"]


def _outcome(env, statements, expression):
    try:
        if statements:
            exec(statements, env)
        value = eval(expression, env)
    except Exception as exc:  # the type is what must match
        return "raises %s" % _exception_family(exc)
    return repr(_plain(value))


def _exception_family(exc):
    if isinstance(exc, KeyError):  # werkzeug's BadRequestKeyError is one too
        return "KeyError"
    code = getattr(exc, "code", None)  # werkzeug's HTTPException, our BadRequestError
    if isinstance(code, int):
        return "with HTTP status %d" % code
    for kind in (ValueError, TypeError, AttributeError):
        if isinstance(exc, kind):
            return kind.__name__
    return type(exc).__name__


def _plain(value):
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _state(r):
    try:
        return (r.status, r.headers.to_wsgi_list(), r.get_data())
    except Exception as exc:
        return "raises %s" % _exception_family(exc)


def _same_cookie_time(a, b):
    return a == b  # expires= from max_age uses the clock: compared as text, the same second in practice


def compare_responses(verbose):
    failures = 0
    for args, statements, expression in RESPONSE_CASES:
        results = []
        for cls in (RefResponse, ours.AMLResponse):
            env = {}
            env["r"] = eval("cls(%s)" % args, {"cls": cls})
            results.append((_outcome(env, statements, expression), _state(env["r"])))
        ok = results[0] == results[1]
        failures += not ok
        if verbose or not ok:
            print("%s AMLResponse(%s); %s -> %s" % ("ok  " if ok else "DIFF", args, statements, expression))
            print("     reference: %s\n                %s" % results[0])
            if not ok:
                print("     ours:      %s\n                %s" % results[1])
    for name in DECLINED:
        r = ours.AMLResponse("x", 200)
        try:
            getattr(r, name)
        except AttributeError as exc:
            ok = ("AMLResponse.%s" % name) in str(exc)
        else:
            ok = False
        failures += not ok
        if verbose or not ok:
            print("%s AMLResponse.%s raises an AttributeError naming it" % ("ok  " if ok else "DIFF", name))
    return failures


#: (method, target, headers, body, expressions on the request ``q``)
REQUEST_CASES = [
    # test_amlrequest_attributes_read_as_werkzeug_gives_them sends this one over HTTP
    ("POST", "/score?a=1&a=2&n=7&e=%C3%A9",
     [("Host", "example.com:80"), ("Content-Type", "Text/Plain; Charset=UTF-8"), ("User-Agent", "curl/8.0"),
      ("Cookie", 'a=%41; b="x\\073y"'), ("Authorization", "Basic dXNlcjpwYXNz"), ("X-Custom", "v"),
      ("X-Forwarded-For", "1.2.3.4, 5.6.7.8"), ("Origin", "http://o.example"), ("Content-Length", "5")],
     b"hello",
     ["q.method", "q.path", "q.full_path", "q.url", "q.base_url", "q.url_root", "q.host_url", "q.host",
      "q.scheme", "q.is_secure", "q.content_type", "q.mimetype", "q.mimetype_params", "q.content_length",
      "q.is_json", "q.remote_addr", "q.access_route", "q.root_path", "q.script_root", "q.origin", "q.referrer",
      "q.query_string", "q.args.to_dict(flat=False)", "q.args.get('n', type=int)", "dict(q.cookies)",
      "q.user_agent.string", "[q.authorization.type, q.authorization.username, q.authorization.password]",
      "[q.headers.get('x-custom'), 'X-CUSTOM' in q.headers]",
      "[q.environ['PATH_INFO'], q.environ['QUERY_STRING']]",
      "q.stream.read(2)", "q.get_data(as_text=True)", "q.stream.read()", "q.json"]),
    ("GET", "/score?a=1&a=2&b=&c=%C3%A9", [("Host", "localhost:5001")], b"",
     ["q.method", "q.path", "q.full_path", "q.url", "q.base_url", "q.url_root", "q.host_url", "q.host",
      "q.query_string", "dict(q.args)", "q.args.getlist('a')", "q.args.get('a', type=int)", "q.args['c']",
      "q.args['zz']", "q.scheme", "q.is_secure", "q.remote_addr", "q.content_length", "q.content_type",
      "q.mimetype", "q.mimetype_params", "q.get_data()", "q.data", "dict(q.form)", "sorted(q.values.items(multi=True))",
      "q.is_json", "q.json", "q.get_json(silent=True)", "q.access_route", "q.root_path", "q.script_root",
      "q.root_url", "q.environ['PATH_INFO']", "q.environ['QUERY_STRING']", "q.environ['REQUEST_METHOD']",
      "q.user_agent.string", "str(q.user_agent)", "q.authorization", "q.cookies", "q.headers.get('host')",
      "'HOST' in q.headers", "q.headers['Host']", "q.origin", "q.referrer"]),
    ("GET", "/sc%20ore/%C3%A9", [("Host", "example.com")], b"",
     ["q.path", "q.full_path", "q.url", "q.base_url", "q.host", "q.host_url"]),
    ("POST", "/score", [("Host", "h:80"), ("Content-Type", "Application/JSON; Charset=UTF-8"),
                        ("Content-Length", "9"), ("User-Agent", "curl/8.0"), ("Cookie", "a=1; b=\"x y\""),
                        ("Authorization", "Basic dXNlcjpwYXNz"), ("X-Forwarded-For", "1.2.3.4, 5.6.7.8")],
     b'{"a": 1}\n',
     ["q.content_type", "q.mimetype", "q.mimetype_params", "q.content_length", "q.is_json", "q.json",
      "q.get_json()", "q.get_data(as_text=True)", "q.user_agent.string", "q.cookies", "dict(q.cookies)",
      "q.authorization.type", "q.authorization.username", "q.authorization.password", "q.access_route",
      "q.host", "q.url", "q.stream.read()", "q.headers.getlist('cookie')"]),
    ("POST", "/score?x=1", [("Host", "h"), ("Content-Type", "application/x-www-form-urlencoded"),
                            ("Content-Length", "12")], b"a=1&b=%C3%A9",
     ["dict(q.form)", "sorted(q.values.items(multi=True))", "q.values.getlist('x')", "q.form['b']", "q.form.getlist('a')", "q.get_data()"]),
    ("POST", "/score", [("Host", "h"), ("Content-Type", "text/plain"), ("Content-Length", "3")], b"abc",
     ["q.get_json(silent=True)", "q.json", "q.get_json(force=True, silent=True)", "q.get_data(as_text=True)",
      "q.authorization", "q.get_json()"]),
    ("POST", "/score", [("Host", "h"), ("Content-Type", "application/json"), ("Content-Length", "3")], b"{x}",
     ["q.get_json(silent=True)", "q.get_json()", "q.json"]),
    ("POST", "/score", [("Host", "h"), ("Authorization", "Bearer tok123"), ("Content-Length", "0")], b"",
     ["q.authorization.type", "q.authorization.token", "q.content_length", "q.get_data()"]),
    ("POST", "/score", [("Content-Length", "6"), ("Cookie", "a=%41; b=\"q\\\"x\\101\"; c"),
                        ("Authorization", 'Digest username="u", realm="r b", nonce=n1')], b"abcdef",
     ["q.stream.read(2)", "q.get_data()", "q.stream.read()", "q.host", "q.url", "q.host_url", "q.cookies",
      "q.cookies.getlist('a')", "q.authorization.type", "q.authorization.username",
      "q.authorization.realm", "q.authorization.nonce", "q.environ['CONTENT_LENGTH']"]),
    ("POST", "/score", [("Host", "[::1]:5001"), ("Content-Length", "162"),
                        ("Content-Type", "multipart/form-data; boundary=XyZ")],
     b'--XyZ\r\nContent-Disposition: form-data; name="f"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n'
     b'hi\r\n--XyZ\r\nContent-Disposition: form-data; name="k"\r\n\r\nv\r\n--XyZ--\r\n',
     ["q.host", "q.url", "dict(q.form)", "q.files['f'].filename", "q.files['f'].read()",
      "q.files['f'].content_type", "q.files['f'].mimetype", "q.get_data()", "q.content_length"]),
] + [  # bodies werkzeug cannot parse as multipart: it is silent (empty form and files), ours must be too
    ("POST", "/score", [("Content-Type", content_type), ("Content-Length", str(len(body)))], body,
     ["dict(q.form)", "dict(q.files)", "q.get_data()"])
    for content_type, body in [
        ("multipart/form-data", b"garbage"),
        ("multipart/form-data; boundary=x", b"garbage"),
        ("multipart/form-data; boundary=x", b""),
        ("multipart/form-data; boundary=x", b"--x--\r\n"),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue'),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n'
                                            b'--x\r\nContent-Disposition: form-data; name="f"; filename="q"\r\n\r\nf\r\n'),
        ("multipart/form-data; boundary=x", b"--x\r\nno colon here\r\n\r\nvalue\r\n--x--\r\n"),
        ("multipart/form-data; boundary=x", b"--x\r\nContent-Type: text/plain\r\n\r\nvalue\r\n--x--\r\n"),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--x--\r\njunk'),
        ("multipart/form-data; boundary=x", b'pre\r\n--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--x--\r\n'),
    ]
]


def _environ(method, target, headers, body):
    path, _, query = target.partition("?")
    env = {"REQUEST_METHOD": method, "SCRIPT_NAME": "",
           "PATH_INFO": urllib.parse.unquote_to_bytes(path).decode("latin-1"),  # as gunicorn builds it
           "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5001",
           "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000",
           "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
           "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False, "wsgi.version": (1, 0)}
    for name, value in headers:
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            env[key] = value
        else:
            env["HTTP_" + key] = value
    return env


def compare_requests(verbose):
    failures = 0
    for method, target, headers, body, expressions in REQUEST_CASES:
        theirs = WerkzeugRequest(_environ(method, target, headers, body))
        mine = ours.AMLRequest(method, target, headers, body, "127.0.0.1", ("127.0.0.1", 5001))
        for expression in expressions:
            results = [_outcome({"q": q}, "", expression) for q in (theirs, mine)]
            ok = results[0] == results[1]
            failures += not ok
            if verbose or not ok:
                print("%s %s %s: %s" % ("ok  " if ok else "DIFF", method, target, expression))
                print("     reference: %s" % results[0])
                if not ok:
                    print("     ours:      %s" % results[1])
    return failures


def main():
    verbose = "-v" in sys.argv
    failures = compare_responses(verbose) + compare_requests(verbose)
    print("%d difference(s)" % failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
