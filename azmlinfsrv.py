#!/usr/bin/env python3
"""azmlinfsrv: the Azure ML inference HTTP server in one standard-library module.

A drop-in replacement for Microsoft's ``azureml-inference-server-http`` (the
``azmlinfsrv`` command that Azure ML online endpoints run): copy this file next
to your ``score.py`` and run::

    python azmlinfsrv.py --entry_script score.py
    curl -d '{"x": 1}' 127.0.0.1:5001/score

It needs nothing beyond the Python standard library (3.8+).  Scripts written
for the reference run unchanged: ``init()`` / ``run(data)``, ``@rawhttp`` with
``AMLRequest`` / ``AMLResponse`` (imported from
``azureml_inference_server_http.api`` or the legacy ``azureml.contrib.services``),
and ``inference_schema`` decorators when that package is installed.

What it is not: it does not sandbox the score script (it runs in this process,
with this process's rights), and it is not a general-purpose web server.

The module reads top to bottom in the order a request travels: constants and
limits, configuration, the compatibility API, the user script, HTTP handling,
swagger.json, telemetry, metrics, the server and its lifecycle, the validation gate, the CLI.
"""

import argparse
import atexit
import bisect
import collections
import email.utils
import errno
import gzip
import http.client
import http.server
import importlib.util
import inspect
import io
import itertools
import json
import linecache
import logging
import logging.config
import os
import queue
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import types
import urllib.parse
import urllib.request
import uuid

__version__ = "1.0.0"

__all__ = [
    # For score scripts (also importable from the reference's module paths).
    "AMLRequest", "AMLResponse", "rawhttp",
    # For tests and tools: run the real server in-process, or the CLI.
    "serve", "Reply", "StartupError", "main", "__version__",
    # Building blocks, for embedding; score scripts never need them.
    "Config", "Script", "App", "Server", "Request", "Response", "HttpError", "BadRequestError",
    "Telemetry", "Metrics", "describe_exception", "load_script", "swagger_document", "swagger_documents",
    "run_server", "run_check",
]


###############################################################################
# Constants and limits
###############################################################################

#: Status line reasons, from the standard library's table.
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}

#: Exit codes, as the reference uses them.
EXIT_OK, EXIT_USAGE, EXIT_SCRIPT = 0, 1, 3

_MAX_REQUEST_LINE = 8192  # bytes, without CRLF -> 414 beyond
_MAX_HEADER_COUNT = 100  # -> 431 beyond
_MAX_HEADER_BYTES = 65536  # the whole header block -> 431 beyond
_MAX_CHUNK_LINE = 4096  # a chunk-size line -> 400 beyond
_LINGER_SECONDS = 1.0  # after our last answer, read and drop what the client still sends (no reset)
_REQUEST_ID_LIMIT = 100  # characters, as the reference
_DEFAULT_HEALTH_PORT = 5000  # the reference's, with SEPERATE_HEALTH_ENDPOINT=true

_MSG_NOT_FOUND = (
    "The requested URL was not found on the server. If you entered the URL manually "
    "please check your spelling and try again."
)
_MSG_METHOD_NOT_ALLOWED = "The method is not allowed for the requested URL."
_MSG_RUN_FAILED = "An unexpected error occurred in scoring script. Check the logs for more info."
_MSG_INTERNAL = "An unexpected internal error occurred. Check the logs for more info."

_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEAD_END_RE = re.compile(rb"\n\r?\n")
# The fast path of the parser: a well-formed request line, and header fields matched back to back.
_REQUEST_LINE_RE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^ \t]+) HTTP/1\.([01])\r?\Z")
_HEADER_FIELD_RE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*?)[ \t]*\r?\n")
_HEADER_BLOCK_RE = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r?\n)*")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_DIGITS_RE = re.compile(r"^[0-9]+$")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")

_ID_HEADERS = frozenset(("x-request-id", "x-ms-request-id", "x-ms-client-request-id"))

_HERE = os.path.abspath(__file__)
_IS_POSIX = os.name == "posix"

logger = logging.getLogger("azmlinfsrv")
_user_logger = logging.getLogger("azmlinfsrv.user_script")
_print_logger = logging.getLogger("azmlinfsrv.print")


###############################################################################
# Configuration
###############################################################################


class StartupError(Exception):
    """A problem that stops the server from starting; carries the exit code."""

    def __init__(self, message, code=EXIT_SCRIPT, diagnostics=None, traceback_text=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.diagnostics = diagnostics
        self.traceback_text = traceback_text  #: the full Python traceback, printed after the diagnostics


def _parse_bool(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false, got %r" % text)


def _parse_port(text):
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return port


def _parse_positive_int(text):
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _parse_non_negative_int(text):
    value = int(text)
    if value < 0:
        raise ValueError("must be zero or more")
    return value


def _parse_seconds(text):
    value = float(text)
    if value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


class _Tolerated(ValueError):
    """A value the reference starts with anyway: warn, name the default, and use it (env / config file only)."""


def _tolerant(parse):
    """``parse``, but a value it rejects falls back to the setting's default with a warning."""
    def tolerant(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise _Tolerated(str(exc))
    tolerant.parses = parse
    return tolerant


def _parse_timeout_ms(text):
    value = int(text)  # not a number: exit 3, as the reference
    if value <= 0:  # the reference starts with it (and times every request out); we use the default
        raise _Tolerated("must be a positive integer")
    return value


def _parse_log_level(text):
    if not isinstance(logging.getLevelName(str(text).strip().upper()), int):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return str(text).strip().upper()


def _is_bool_setting(parse):
    return getattr(parse, "parses", parse) is _parse_bool


#: name, CLI flag, environment variable / config-file key, default, parser, help.
#: The CLI, the config file, the banner and the README table all come from this.  A parser wrapped in
#: _tolerant() (or one raising _Tolerated) marks values the reference starts with anyway: from the
#: environment or a config file they warn and leave the default; other bad values stop start-up.
_SETTINGS = [
    ("entry_script", "--entry_script", "AZUREML_ENTRY_SCRIPT", None, str,
     "The score script: on the command line relative to the working directory, else to the app root."),
    ("model_dir", "--model_dir", "AZUREML_MODEL_DIR", None, str,
     "The model directory; exported as AZUREML_MODEL_DIR before the script loads."),
    ("port", "--port", "AZMLINFSRV_PORT", 5001, _parse_port, "The serving port."),
    ("health_port", "--health_port", "AZMLINFSRV_HEALTH_PORT", None, _parse_port,
     "A second port that answers only the liveness probe GET / (5000 with SEPERATE_HEALTH_ENDPOINT=true)."),
    ("worker_count", "--worker_count", "WORKER_COUNT", 1, _parse_positive_int,
     "How many run() calls may execute at once."),
    ("appinsights_key", "--appinsights_instrumentation_key", "AML_APP_INSIGHTS_KEY", None, str,
     "Application Insights instrumentation key (a UUID)."),
    ("cors_origins", "--access_control_allow_origins", "AML_CORS_ORIGINS", None, str,
     "Comma-separated origins allowed by CORS; * allows any."),
    ("config_file", "--config_file", "AZUREML_CONFIG_FILE", None, str,
     "A JSON file whose keys are these environment variable names."),
    ("app_root", None, "AML_APP_ROOT", None, str, "The app root (default: the working directory)."),
    ("source_dir", None, "AZUREML_SOURCE_DIRECTORY", None, str,
     "A directory under the app root that is added to sys.path."),
    ("worker_timeout", None, "WORKER_TIMEOUT", 300, _parse_non_negative_int,
     "Accepted for compatibility (gunicorn's worker timeout); scoring uses SCORING_TIMEOUT_MS."),
    ("scoring_timeout_ms", None, "SCORING_TIMEOUT_MS", 3600000, _parse_timeout_ms,
     "How long run() may take before the client gets a 500 timeout answer."),
    ("service_name", None, "SERVICE_NAME", "ML service", str, "Service name in swagger.json."),
    ("service_version", None, "SERVICE_VERSION", "1.0", str, "Service version in swagger.json."),
    ("service_path_prefix", None, "SERVICE_PATH_PREFIX", "", str, "Path prefix in swagger.json."),
    ("log_level", None, "AZUREML_LOG_LEVEL", "INFO", _tolerant(_parse_log_level),
     "Log level (DEBUG, INFO, WARNING, ERROR)."),
    ("appinsights_enabled", None, "AML_APP_INSIGHTS_ENABLED", False, _tolerant(_parse_bool),
     "Send telemetry to Application Insights (needs a key)."),
    ("appinsights_connection_string", None, "APPLICATIONINSIGHTS_CONNECTION_STRING", None, str,
     "Application Insights connection string (InstrumentationKey=...;IngestionEndpoint=...)."),
    ("appinsights_endpoint", None, "AML_APP_INSIGHTS_ENDPOINT", None, str,
     "Full track URL for telemetry (default https://dc.services.visualstudio.com/v2/track)."),
    ("appinsights_log_response", None, "APP_INSIGHTS_LOG_RESPONSE_ENABLED", True, _parse_bool,
     "Include the response body in request telemetry."),
    ("model_dc_storage", None, "AML_MODEL_DC_STORAGE_ENABLED", False, _tolerant(_parse_bool),
     "Send model inputs and predictions to telemetry."),
    ("server_version_header", None, "SERVER_VERSION_LOG_RESPONSE_ENABLED", "true", str,
     "Send x-ms-server-version unless set to something other than true."),
    ("hostname", None, "HOSTNAME", "Unknown", str, "Container id in telemetry."),
    ("workspace_name", None, "WORKSPACE_NAME", "", str, "Workspace name in telemetry."),
    ("separate_health_endpoint", None, "SEPERATE_HEALTH_ENDPOINT", False, _tolerant(_parse_bool),
     "true (the reference's spelling): also answer the liveness probe on --health_port (default 5000)."),
    # ---- beyond the reference -------------------------------------------------
    ("host", "--host", "AZMLINFSRV_HOST", "0.0.0.0", str, "The address to listen on."),
    ("hide_error_details", "--hide_error_details", "AZMLINFSRV_HIDE_ERROR_DETAILS", False, _parse_bool,
     "Answer run() failures with the reference's message only (no exception, no location)."),
    ("max_queue", "--max_queue", "AZMLINFSRV_MAX_QUEUE", 64, _parse_non_negative_int,
     "Requests that may wait for a worker; beyond it the answer is 503 with Retry-After."),
    ("max_body_bytes", "--max_body_bytes", "AZMLINFSRV_MAX_BODY_BYTES", 100 * 1024 * 1024, _parse_positive_int,
     "Largest request body accepted (413 beyond, answered before the body is read)."),
    ("max_connections", "--max_connections", "AZMLINFSRV_MAX_CONNECTIONS", 512, _parse_positive_int,
     "Open connections at most; more are answered 503 and closed."),
    ("client_timeout", "--client_timeout", "AZMLINFSRV_CLIENT_TIMEOUT", 30.0, _parse_seconds,
     "Seconds a client may take to send a request, or stay idle between requests."),
    ("grace_period", "--grace_period", "AZMLINFSRV_GRACE_PERIOD", 30.0, _parse_seconds,
     "Seconds requests in flight get to finish on SIGTERM or Ctrl+C."),
    ("processes", "--processes", "AZMLINFSRV_PROCESSES", 1, _parse_positive_int,
     "Pre-forked server processes sharing the port (POSIX; for CPU-bound run())."),
    ("reload", "--reload", "AZMLINFSRV_RELOAD", False, _parse_bool,
     "Reload the script when a .py file under the app root changes."),
    ("metrics", "--metrics", "AZMLINFSRV_METRICS", True, _parse_bool,
     "Serve Prometheus metrics at GET /metrics."),
    ("access_log", "--access_log", "AZMLINFSRV_ACCESS_LOG", True, _parse_bool,
     "Log one line per /score and /swagger.json request."),
    ("telemetry_flush_seconds", None, "AZMLINFSRV_TELEMETRY_FLUSH_SECONDS", 5.0, _parse_seconds,
     "Seconds between telemetry uploads (sooner once 100 items wait)."),
    ("telemetry_max_queue", None, "AZMLINFSRV_TELEMETRY_MAX_QUEUE", 10000, _parse_positive_int,
     "Telemetry items kept while the collector is slow or down; beyond it the oldest are dropped."),
    ("telemetry_timeout", None, "AZMLINFSRV_TELEMETRY_TIMEOUT", 10.0, _parse_seconds,
     "Seconds one telemetry upload may take before it counts as failed (and is retried)."),
]

_SETTING_BY_ENV = {env: name for name, _, env, _, _, _ in _SETTINGS}
_FLAG_ONLY = {"reload", "hide_error_details"}  # flags that take no value on the command line


class Config:
    """The server's settings, resolved CLI > environment > config file > default.

    Attribute names are the first column of ``_SETTINGS``; ``sources`` says
    where each value came from.
    """

    def __init__(self, **values):
        self.sources = {}
        for name, _, _, default, _, _ in _SETTINGS:
            setattr(self, name, default)
            self.sources[name] = "default"
        for name, value in values.items():
            setattr(self, name, value)
            self.sources[name] = "argument"
        self.warnings = []

    @classmethod
    def resolve(cls, cli_values=None, environ=None, cwd=None):
        """Build a Config from CLI values (already parsed), an environment and the config file."""
        environ = os.environ if environ is None else environ
        cli_values = {k: v for k, v in (cli_values or {}).items() if v is not None}
        cfg = cls()
        cwd = cwd or os.getcwd()
        app_root = environ.get("AML_APP_ROOT") or cwd

        # Find the config file: --config_file, AZUREML_CONFIG_FILE, config.json in the
        # app root, then next to the entry script.
        candidates = [cli_values.get("config_file"), environ.get("AZUREML_CONFIG_FILE")]
        entry = cli_values.get("entry_script") or environ.get("AZUREML_ENTRY_SCRIPT")
        candidates.append(os.path.join(app_root, "config.json"))
        if entry:
            base = cwd if cli_values.get("entry_script") else app_root
            candidates.append(os.path.join(os.path.dirname(os.path.abspath(os.path.join(base, entry))),
                                           "config.json"))
        explicit = cli_values.get("config_file") or environ.get("AZUREML_CONFIG_FILE")
        file_values = {}
        for path in candidates:
            if not path:
                continue
            if not os.path.isfile(path):
                if path == explicit:
                    raise StartupError("Config file not found: %s" % path)
                continue
            if os.path.getsize(path) == 0:
                continue
            file_values = _read_config_file(path, cfg)
            cfg.config_file = path
            cfg.sources["config_file"] = "command line" if path == cli_values.get("config_file") else "found"
            break

        for name, flag, env, default, parse, _ in _SETTINGS:
            if name == "config_file":
                continue
            raw, source = None, None
            if name in cli_values:
                raw, source = cli_values[name], "command line"
            elif env in environ and environ[env] != "":
                raw, source = environ[env], "environment (%s)" % env
            elif env in file_values and file_values[env] is not None:
                raw, source = file_values[env], "config file (%s)" % env
            if source is None:
                continue
            try:
                if isinstance(raw, bool) and not _is_bool_setting(parse):
                    raise ValueError("expected a number, not %s" % raw)
                value = str(raw) if parse is str else parse(raw)
            except _Tolerated as exc:
                if source == "command line":
                    raise StartupError("Invalid value %r for %s: %s" % (raw, flag, exc), EXIT_USAGE)
                # The reference starts with such a value (and ignores or replaces it): so do we, saying so.
                cfg.warnings.append("Invalid value %r for %s (%s): using the default, %s." % (
                    raw, env, exc, _shown_default(default)))
                continue
            except (TypeError, ValueError) as exc:
                where = flag if source == "command line" else env
                code = EXIT_USAGE if source == "command line" else EXIT_SCRIPT
                raise StartupError("Invalid value %r for %s: %s" % (raw, where, exc), code)
            if name == "entry_script" and source == "command line":
                value = os.path.join(cwd, value)  # as the reference: --entry_script is relative to the cwd
            setattr(cfg, name, value)
            cfg.sources[name] = source

        cfg.app_root = os.path.abspath(cfg.app_root or cwd)
        if cfg.appinsights_key and cfg.sources.get("appinsights_key") == "command line":
            cfg.appinsights_enabled = True  # as the reference: a key on the command line turns telemetry on
            cfg.sources["appinsights_enabled"] = "--appinsights_instrumentation_key"
        if cfg.separate_health_endpoint and cfg.health_port is None:
            cfg.health_port = _DEFAULT_HEALTH_PORT
            cfg.sources["health_port"] = "SEPERATE_HEALTH_ENDPOINT"
        return cfg

    def describe(self):
        """(name, value, source) rows for the banner; the key is never shown."""
        rows = []
        for name, flag, env, _, _, _ in _SETTINGS:
            value = getattr(self, name)
            if name in ("appinsights_key", "appinsights_connection_string") and value:
                value = "(set)"
            rows.append((env if flag is None else flag, value, self.sources.get(name, "default")))
        return rows


def _shown_default(default):
    return str(default).lower() if isinstance(default, bool) else str(default)


def _read_config_file(path, cfg):
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except ValueError as exc:
        raise StartupError("Config file %s is not valid JSON: %s" % (path, exc))
    except OSError as exc:
        raise StartupError("Cannot read config file %s: %s" % (path, exc))
    if not isinstance(values, dict):
        raise StartupError("Config file %s must hold a JSON object, not %s" % (path, type(values).__name__))
    unknown = sorted(k for k in values if k not in _SETTING_BY_ENV)
    if unknown:
        cfg.warnings.append("Found extra keys in the config file that are not supported by the server: %s"
                            % ", ".join(unknown))
    return values


###############################################################################
# Compatibility API: rawhttp, AMLRequest, AMLResponse and the import shims
###############################################################################

_rawhttp_uses = []  # functions marked by @rawhttp; the loader checks it per load


def rawhttp(func):
    """Mark run() to receive the raw request (an :class:`AMLRequest`).

    Example::

        @rawhttp
        def run(request):
            return AMLResponse(request.get_data(), 200)
    """
    try:
        func.__azmlinfsrv_rawhttp__ = True
    except (AttributeError, TypeError):
        pass
    _rawhttp_uses.append(func)
    return func


class _MultiDict(dict):
    """A dict of first values that also keeps every value (werkzeug's MultiDict, in part)."""

    def __init__(self, pairs=()):
        super().__init__()
        self._lists = {}
        for key, value in pairs:
            self.add(key, value)

    def add(self, key, value):
        self._lists.setdefault(key, []).append(value)
        if key not in self:
            dict.__setitem__(self, key, value)

    def getlist(self, key, type=None):
        values = self._lists.get(key, [])
        if type is None:
            return list(values)
        result = []
        for value in values:
            try:
                result.append(type(value))
            except (TypeError, ValueError):
                pass
        return result

    def get(self, key, default=None, type=None):
        if key not in self:
            return default
        value = dict.__getitem__(self, key)
        if type is None:
            return value
        try:
            return type(value)
        except (TypeError, ValueError):
            return default

    def items(self, multi=False):
        if multi:
            return [(k, v) for k, vs in self._lists.items() for v in vs]
        return list(dict.items(self))

    def lists(self):
        return [(k, list(vs)) for k, vs in self._lists.items()]

    def to_dict(self, flat=True):
        if flat:
            return dict(dict.items(self))
        return {k: list(vs) for k, vs in self._lists.items()}


class _Headers:
    """Case-insensitive request headers, iterable as (name, value) pairs."""

    def __init__(self, pairs):
        self._pairs = list(pairs)
        self._first = {}
        for name, value in self._pairs:
            self._first.setdefault(name.lower(), value)

    def get(self, name, default=None, type=None):
        value = self._first.get(name.lower())
        if value is None:
            return default
        if type is not None:
            try:
                return type(value)
            except (TypeError, ValueError):
                return default
        return value

    def getlist(self, name):
        lower = name.lower()
        return [v for n, v in self._pairs if n.lower() == lower]

    get_all = getlist

    def __getitem__(self, name):
        value = self._first.get(name.lower())
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name):
        return isinstance(name, str) and name.lower() in self._first

    def __iter__(self):
        return iter(self._pairs)

    def __len__(self):
        return len(self._pairs)

    def keys(self):
        return [n for n, _ in self._pairs]

    def values(self):
        return [v for _, v in self._pairs]

    def items(self):
        return list(self._pairs)

    def to_wsgi_list(self):
        return list(self._pairs)

    def __repr__(self):
        return "Headers(%r)" % (self._pairs,)


def _title_case(name):
    return "-".join(part.capitalize() for part in name.split("-"))


class _FileStorage:
    """One uploaded file of a multipart/form-data body."""

    def __init__(self, data, filename, name, content_type, headers):
        self.stream = io.BytesIO(data)
        self.filename = filename
        self.name = name
        self.content_type = content_type
        self.mimetype = (content_type or "").split(";")[0].strip().lower()
        self.headers = headers
        self.content_length = len(data)

    def read(self, size=-1):
        return self.stream.read(size)

    def save(self, dst, buffer_size=16384):
        if isinstance(dst, (str, os.PathLike)):
            with open(dst, "wb") as handle:
                shutil.copyfileobj(self.stream, handle, buffer_size)
        else:
            shutil.copyfileobj(self.stream, dst, buffer_size)

    def __bool__(self):
        return bool(self.filename)

    def __repr__(self):
        return "<FileStorage: %r (%r)>" % (self.filename, self.content_type)


def _parse_options_header(value):
    """'text/plain; charset=utf-8' -> ('text/plain', {'charset': 'utf-8'})."""
    if not value:
        return "", {}
    parts = value.split(";")
    main = parts[0].strip().lower()
    params = {}
    for part in parts[1:]:
        if "=" in part:
            key, _, val = part.partition("=")
            val = val.strip()
            if len(val) >= 2 and val[0] == val[-1] == '"':
                val = val[1:-1].replace('\\"', '"')
            params[key.strip().lower()] = val
    return main, params


class BadRequestError(ValueError):
    """A request body that cannot be parsed the way the script asked for."""


def _parse_multipart(body, boundary, charset="utf-8"):
    """Split a multipart/form-data body into form fields and files (RFC 7578)."""
    if not boundary or len(boundary) > 200:
        raise BadRequestError("multipart/form-data body without a valid boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    form, files = [], []
    start = body.find(delimiter)
    if start < 0:
        raise BadRequestError("multipart body does not contain its boundary")
    pos = start + len(delimiter)
    while True:
        if body[pos:pos + 2] == b"--":
            break  # the closing delimiter
        if body[pos:pos + 2] != b"\r\n":
            raise BadRequestError("malformed multipart delimiter line")
        pos += 2
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise BadRequestError("multipart part without a header end")
        headers = []
        for line in body[pos:head_end].split(b"\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(b":")
            if not sep:
                raise BadRequestError("malformed multipart part header")
            headers.append((name.decode("latin-1").strip(), value.decode("utf-8", "replace").strip()))
        part_headers = _Headers(headers)
        data_start = head_end + 4
        next_delim = body.find(b"\r\n" + delimiter, data_start)
        if next_delim < 0:
            raise BadRequestError("multipart body is truncated (no closing boundary)")
        data = body[data_start:next_delim]
        disposition, params = _parse_options_header(part_headers.get("Content-Disposition", ""))
        if disposition != "form-data" or "name" not in params:
            raise BadRequestError("multipart part without Content-Disposition: form-data; name=...")
        if "filename" in params:
            files.append((params["name"], _FileStorage(
                data, params["filename"], params["name"], part_headers.get("Content-Type"), part_headers)))
        else:
            form.append((params["name"], data.decode(charset, "replace")))
        pos = next_delim + 2 + len(delimiter)
    return form, files


class AMLRequest:
    """The request a ``@rawhttp`` run() receives: the part of werkzeug's Request that score scripts use."""

    def __init__(self, method, target, headers, body, remote_addr="127.0.0.1", server=("127.0.0.1", 5001),
                 scheme="http"):
        self.method = method
        path, _, query = target.partition("?")
        self.path = urllib.parse.unquote(path)
        self.query_string = query.encode("latin-1", "replace")
        self.headers = headers if isinstance(headers, _Headers) else _Headers(headers)
        self.remote_addr = remote_addr
        self.scheme = scheme
        self._server = server
        self._body = body
        self._stream = None
        self._form = None
        self._files = None
        self._json_cache = {}

    # -- URL ------------------------------------------------------------------
    @property
    def args(self):
        return _MultiDict(urllib.parse.parse_qsl(self.query_string.decode("latin-1"), keep_blank_values=True))

    @property
    def full_path(self):
        return self.path + "?" + self.query_string.decode("latin-1")

    @property
    def host(self):
        return self.headers.get("Host") or "%s:%s" % self._server[:2]

    @property
    def host_url(self):
        return "%s://%s/" % (self.scheme, self.host)

    @property
    def base_url(self):
        return "%s://%s%s" % (self.scheme, self.host, urllib.parse.quote(self.path))

    @property
    def url(self):
        query = self.query_string.decode("latin-1")
        return self.base_url + ("?" + query if query else "")

    @property
    def url_root(self):
        return self.host_url

    # -- body -----------------------------------------------------------------
    @property
    def content_type(self):
        return self.headers.get("Content-Type")

    @property
    def mimetype(self):
        return _parse_options_header(self.content_type or "")[0]

    @property
    def mimetype_params(self):
        return _parse_options_header(self.content_type or "")[1]

    @property
    def content_length(self):
        return len(self._body) if self._body or self.headers.get("Content-Length") else None

    @property
    def content_encoding(self):
        return self.headers.get("Content-Encoding")

    @property
    def data(self):
        return self.get_data()

    @property
    def stream(self):
        # One stream per request, as werkzeug's: `while request.stream.read(n)` must reach the end.
        if self._stream is None:
            self._stream = io.BytesIO(self._body)
        return self._stream

    input_stream = stream

    def get_data(self, cache=True, as_text=False, parse_form_data=False):
        if as_text:
            return self._body.decode(self.mimetype_params.get("charset", "utf-8"), "replace")
        return self._body

    @property
    def is_json(self):
        mt = self.mimetype
        return mt == "application/json" or (mt.startswith("application/") and mt.endswith("+json"))

    def get_json(self, force=False, silent=False, cache=True):
        key = (force, silent)
        if key in self._json_cache:
            return self._json_cache[key]
        if not (force or self.is_json):
            if silent:
                return None
            raise BadRequestError("Did not attempt to load JSON data because the request Content-Type "
                                  "was not 'application/json'.")
        try:
            value = json.loads(self._body)
        except ValueError as exc:
            if silent:
                return None
            raise BadRequestError("Failed to decode JSON object: %s" % exc)
        self._json_cache[key] = value
        return value

    @property
    def json(self):
        return self.get_json(silent=not self.is_json) if self.is_json else None

    def _parse_form(self):
        if self._form is not None:
            return
        form, files = [], []
        mt, params = _parse_options_header(self.content_type or "")
        if mt == "application/x-www-form-urlencoded":
            form = urllib.parse.parse_qsl(self._body.decode("utf-8", "replace"), keep_blank_values=True)
        elif mt == "multipart/form-data":
            form, files = _parse_multipart(self._body, params.get("boundary"), params.get("charset", "utf-8"))
        self._form, self._files = _MultiDict(form), _MultiDict(files)

    @property
    def form(self):
        self._parse_form()
        return self._form

    @property
    def files(self):
        self._parse_form()
        return self._files

    @property
    def values(self):
        merged = _MultiDict(self.args.items(multi=True))
        if self.method != "GET":
            for key, value in self.form.items(multi=True):
                merged.add(key, value)
        return merged

    @property
    def cookies(self):
        jar = {}
        for header in self.headers.getlist("Cookie"):
            for item in header.split(";"):
                name, sep, value = item.strip().partition("=")
                if sep:
                    jar.setdefault(name.strip(), urllib.parse.unquote(value.strip().strip('"')))
        return jar

    @property
    def environ(self):
        env = {
            "REQUEST_METHOD": self.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": self.path,
            "QUERY_STRING": self.query_string.decode("latin-1"),
            "SERVER_NAME": str(self._server[0]),
            "SERVER_PORT": str(self._server[1]),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": self.remote_addr,
            "wsgi.url_scheme": self.scheme,
            "wsgi.input": self.stream,
        }
        if self.content_type:
            env["CONTENT_TYPE"] = self.content_type
        env["CONTENT_LENGTH"] = str(len(self._body)) if self._body else ""
        for name, value in self.headers:
            key = "HTTP_" + name.upper().replace("-", "_")
            if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                continue
            env[key] = env[key] + "," + value if key in env else value
        return env

    @property
    def access_route(self):
        forwarded = self.headers.get("X-Forwarded-For")
        if forwarded:
            return [ip.strip() for ip in forwarded.split(",")]
        return [self.remote_addr]

    def __repr__(self):
        return "<AMLRequest %r [%s]>" % (self.url, self.method)


class AMLResponse:
    """A response from run(), with the reference's arguments.

    ``message`` may be None (``{}`` as JSON), a str or bytes (sent as is), any
    JSON-encodable value with ``json_str=True``, or an iterable/generator of
    str or bytes, which is streamed chunk by chunk.  ``response_headers`` values
    are split on commas into repeated headers.

    Example::

        return AMLResponse({"ok": True}, 200, json_str=True)
        return AMLResponse(png_bytes, 200, {"Content-Type": "image/png"})
    """

    default_mimetype = "text/html"

    def __init__(self, message, status_code=200, response_headers=None, json_str=False, run_function_failed=False):
        response_headers = response_headers or {}
        if isinstance(status_code, str):  # werkzeug takes "201 CREATED" as well as 201
            status_code = status_code.strip().split(" ", 1)[0]
        self.status_code = int(status_code)
        self.headers = _ResponseHeaders()  # (name, value) pairs, in order
        self.stream = None
        content_type = None
        if message is None:
            self.body = b"{}"
            content_type = "application/json"
        elif json_str:
            self.body = json.dumps(message).encode("utf-8")
            content_type = "application/json"
        elif isinstance(message, str):
            self.body = message.encode("utf-8")
        elif isinstance(message, (bytes, bytearray, memoryview)):
            self.body = bytes(message)
        else:
            self.body = None
            self.stream = iter(message)
        if content_type is None:
            given = [v for k, v in response_headers.items() if k.lower() == "content-type"]
            if not given:
                content_type = "text/html; charset=utf-8"
        if content_type:
            self.headers.append(("Content-Type", content_type))
        self.headers.append(("x-ms-run-function-failed", str(bool(run_function_failed))))
        for name, value in response_headers.items():
            for part in str(value).split(","):
                self.headers.append((name, part.strip()))

    @property
    def status(self):
        return "%d %s" % (self.status_code, _REASONS.get(self.status_code, "UNKNOWN"))

    @property
    def data(self):
        if self.body is None:
            return b"".join(_to_bytes(c) for c in self.stream)
        return self.body

    def get_data(self, as_text=False):
        return self.data.decode("utf-8", "replace") if as_text else self.data

    @property
    def content_type(self):
        for name, value in self.headers:
            if name.lower() == "content-type":
                return value
        return None

    @property
    def is_streamed(self):
        return self.body is None

    def __repr__(self):
        return "<AMLResponse %s>" % self.status


class _ResponseHeaders(list):
    """AMLResponse.headers: a list of (name, value) pairs that also takes werkzeug's Headers calls
    that scripts use (``resp.headers["X-A"] = "1"``, ``get``, ``add``, ``set``, ``in``, ``del``);
    names match case-insensitively."""

    def _matches(self, name):
        lower = name.lower()
        return [i for i, (n, _) in enumerate(self) if n.lower() == lower]

    def __getitem__(self, key):
        if isinstance(key, str):
            found = self._matches(key)
            if not found:
                raise KeyError(key)
            return list.__getitem__(self, found[0])[1]
        return list.__getitem__(self, key)

    def __setitem__(self, key, value):
        if isinstance(key, str):
            self.set(key, value)
        else:
            list.__setitem__(self, key, value)

    def __delitem__(self, key):
        if isinstance(key, str):
            for index in reversed(self._matches(key)):
                list.__delitem__(self, index)
        else:
            list.__delitem__(self, key)

    def __contains__(self, key):
        if isinstance(key, str):
            return bool(self._matches(key))
        return list.__contains__(self, key)

    def get(self, key, default=None):
        found = self._matches(key)
        return list.__getitem__(self, found[0])[1] if found else default

    def getlist(self, key):
        return [list.__getitem__(self, i)[1] for i in self._matches(key)]

    def add(self, key, value):
        self.append((key, str(value)))

    def set(self, key, value):
        """Replace every ``key`` header with one (in the first one's place), or add it."""
        found = self._matches(key)
        if not found:
            self.append((key, str(value)))
            return
        list.__setitem__(self, found[0], (key, str(value)))
        for index in reversed(found[1:]):
            list.__delitem__(self, index)

    def keys(self):
        return [n for n, _ in self]

    def items(self):
        return list(self)


def _to_bytes(chunk):
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError("a streamed response chunk must be str or bytes, not %s" % type(chunk).__name__)


def _install_compat_modules():
    """Make the reference's import paths resolve to this module, with or without it installed."""
    this = sys.modules.get(__name__) or sys.modules.get("azmlinfsrv")
    leaves = {
        "azureml_inference_server_http.api.aml_request": {"rawhttp": rawhttp, "AMLRequest": AMLRequest},
        "azureml_inference_server_http.api.aml_response": {"AMLResponse": AMLResponse},
        "azureml.contrib.services.aml_request": {"rawhttp": rawhttp, "AMLRequest": AMLRequest},
        "azureml.contrib.services.aml_response": {"AMLResponse": AMLResponse},
        # What a logging.json written for the reference names (its formatter and filter classes).
        "azureml_inference_server_http.log_config": {"AMLLogFormatter": _AMLLogFormatter,
                                                     "RootAccessFilter": _RootAccessFilter},
    }
    for name, attrs in leaves.items():
        parts = name.split(".")
        for depth in range(1, len(parts)):
            _package_or_shim(".".join(parts[:depth]))
        module = types.ModuleType(name, "azmlinfsrv compatibility shim for %s" % name)
        module.__dict__.update(attrs)
        module.__file__ = _HERE
        sys.modules[name] = module
        setattr(sys.modules[".".join(parts[:-1])], parts[-1], module)
    return this


def _package_or_shim(name):
    """The real package ``name`` if one is installed (azureml-core, say), else an empty shim."""
    if name in sys.modules:
        return sys.modules[name]
    spec = None
    if not name.startswith("azureml_inference_server_http"):  # the reference's own server: always ours
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
    if spec is not None:
        try:
            return importlib.import_module(name)
        except Exception:  # a broken optional package must not stop the server
            pass
    module = types.ModuleType(name, "azmlinfsrv compatibility shim")
    module.__path__ = []
    module.__file__ = _HERE
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


###############################################################################
# User script: load it, analyse run(), call it, and say where it failed
###############################################################################

_context = threading.local()  # request_id of the request a worker thread is scoring


class _UserPrint:
    """print() for the user's script: stdout goes to the ``azmlinfsrv.print`` logger."""

    def __call__(self, *objects, sep=" ", end="\n", file=None, flush=False):
        if file is None or file is sys.stdout:
            _print_logger.info((sep if sep is not None else " ").join(map(str, objects)))
        else:
            print(*objects, sep=sep, end=end, file=file, flush=flush)


_user_print = _UserPrint()


def _frame_dict(filename, lineno, name, line, roots):
    return {"file": _relative_to_roots(filename, roots), "line": lineno, "function": name,
            "source": (line or linecache.getline(filename, lineno) or "").strip()}


def _relative_to_roots(filename, roots):
    path = os.path.abspath(filename)
    for root in roots:
        if root and (path == root or path.startswith(root.rstrip(os.sep) + os.sep)):
            return os.path.relpath(path, root).replace(os.sep, "/")
    return path


def _is_user_file(filename, roots):
    path = os.path.abspath(filename)
    if path == _HERE or filename.startswith("<"):
        return False
    if "site-packages" in path or "dist-packages" in path:
        return False
    return any(root and path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def describe_exception(exc, roots):
    """What went wrong and where in the user's code: type, text, location, user frames."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [_frame_dict(f.filename, f.lineno, f.name, f.line, roots) for f in frames
            if _is_user_file(f.filename, roots)]
    info = {"type": type(exc).__name__, "text": str(exc)}
    if isinstance(exc, SyntaxError) and exc.filename:
        loc = {"file": _relative_to_roots(exc.filename, roots), "line": exc.lineno, "function": None,
               "source": (exc.text or "").rstrip("\n").strip(), "column": exc.offset}
        info["text"] = exc.msg
        info["location"] = loc
        user.append(loc)
    elif user:
        info["location"] = user[-1]
    elif frames:  # it failed outside the user's files (a library): say where anyway
        last = frames[-1]
        info["location"] = _frame_dict(last.filename, last.lineno, last.name, last.line, roots)
    info["frames"] = user
    return info


def _format_traceback(exc):
    """The full Python traceback, from the first frame that is neither this module's nor the import machinery's."""
    tb = exc.__traceback__
    while tb is not None and (os.path.abspath(tb.tb_frame.f_code.co_filename) == _HERE
                              or tb.tb_frame.f_code.co_filename.startswith("<frozen")):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip("\n")


def _format_diagnosis(info, prefix=""):
    """Diagnostics as log text: the location first, then the user frames."""
    lines = [] if info["type"] == "ScriptError" else ["%s%s: %s" % (prefix, info["type"], info["text"])]
    loc = info.get("location")
    if loc:
        where = "  at %s, line %s" % (loc["file"], loc["line"]) if loc.get("line") else "  in %s" % loc["file"]
        if loc.get("function"):
            where += ", in %s" % loc["function"]
        lines.append(where)
        if loc.get("source"):
            lines.append("    " + loc["source"])
            if loc.get("column"):
                lines.append("    " + " " * max(0, loc["column"] - 1) + "^")
    if len(info.get("frames", ())) > 1:
        lines.append("  user-code traceback (most recent call last):")
        for frame in info["frames"]:
            lines.append("    %s:%s in %s: %s" % (frame["file"], frame["line"], frame["function"],
                                                  frame["source"]))
    return "\n".join(lines)


class _BadInput(Exception):
    """The request cannot be turned into run()'s arguments (400, or ``status``)."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.message = message
        self.status = status


class _MethodNotAllowed(Exception):
    pass


def _json_or_text(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _query_to_object(query):
    """?a=1&b=x&a=2 -> {"a": [1, 2], "b": "x"}, each value JSON-parsed where it parses."""
    if not query:
        return {}
    grouped = collections.OrderedDict()
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        grouped.setdefault(key, []).append(_json_or_text(value))
    return {k: (v[0] if len(v) == 1 else v) for k, v in grouped.items()}


class Script:
    """A loaded score script: its module, init(), run() and how run() wants its input.

    ``mode`` is ``"text"`` (undecorated run(data)), ``"raw"`` (@rawhttp) or
    ``"schema"`` (inference-schema decorators).
    """

    _generation = itertools.count(1)

    def __init__(self, path, app_root, source_dir=None):
        self.path = os.path.realpath(path)
        self.app_root = app_root
        self.roots = [app_root, os.path.dirname(self.path)]
        if source_dir:
            self.roots.insert(0, os.path.abspath(os.path.join(app_root, source_dir)))
        self.roots = sorted(set(self.roots), key=len, reverse=True)
        self.module = None
        self.run = None
        self.init = None
        self.mode = "text"
        self.data_param = None
        self.schema_params = []
        self.wants_headers = False
        self.swagger = None  #: (documents, versions), built by swagger_documents()

    def load(self):
        """Import the script and analyse run(); raises StartupError with diagnostics."""
        if not os.path.isfile(self.path):
            raise StartupError("No such file or directory. Entry script not found: %s" % self.path)
        del _rawhttp_uses[:]
        name = "azmlinfsrv_entry_%d" % next(self._generation)
        try:
            spec = importlib.util.spec_from_file_location(name, self.path)
            module = importlib.util.module_from_spec(spec)
            module.print = _user_print
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except BaseException as exc:  # SystemExit in a script is a failure too
            sys.modules.pop(name, None)
            if isinstance(exc, KeyboardInterrupt):
                raise
            info = describe_exception(exc, self.roots)
            what = "raised an exception while importing"
            if isinstance(exc, SyntaxError):
                where = os.path.realpath(exc.filename) if exc.filename else self.path
                what = "has a syntax error" if where == self.path else (
                    "could not be imported: %s has a syntax error" % _relative_to_roots(where, self.roots))
            raise StartupError("Failed to import user script because it raised an unhandled exception: %s %s"
                               % (_relative_to_roots(self.path, self.roots), what), EXIT_SCRIPT, info,
                               _format_traceback(exc))
        self.module = module
        try:
            for attr in ("init", "run"):
                if not callable(getattr(module, attr, None)):
                    raise StartupError("User script at %s does not have a %s() function defined."
                                       % (self.path, attr))
            self.init = module.init
            self.run = module.run
            driver = getattr(module, "driver_module", None)
            if isinstance(driver, types.ModuleType) and callable(getattr(driver, "run", None)):
                self.run = driver.run
                if getattr(driver, "print", None) is None:
                    driver.print = _user_print
            self._analyse_run()
        except StartupError as exc:
            exc.diagnostics = exc.diagnostics or self.locate(exc.message)
            raise
        return self

    def locate(self, message):
        """Diagnostics for a script problem without a traceback: point at run(), else the script."""
        code = getattr(self.run, "__code__", None)
        if code is not None:
            loc = _frame_dict(code.co_filename, code.co_firstlineno, code.co_name, None, self.roots)
        else:
            loc = {"file": _relative_to_roots(self.path, self.roots), "line": None, "function": None, "source": ""}
        return {"type": "ScriptError", "text": message, "location": loc, "frames": [loc]}

    def _analyse_run(self):
        try:
            params = list(inspect.signature(self.run).parameters.values())
        except (TypeError, ValueError) as exc:
            raise StartupError("Cannot inspect run(): %s" % exc)
        allowed = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if any(p.kind not in allowed for p in params):
            raise StartupError("run() cannot accept positional-only arguments, *args, or **kwargs.")
        self.wants_headers = any(p.name == "request_headers" for p in params)
        params = [p for p in params if p.name != "request_headers"]
        if not params:
            if self.wants_headers:
                raise StartupError('run() needs to accept an argument other than "request_headers".')
            raise StartupError("run() needs to accept an argument for input data.")
        raw = bool(getattr(self.run, "__azmlinfsrv_rawhttp__", False)) or bool(_rawhttp_uses)
        schema = _is_schema_decorated(self.run)
        if raw and schema:
            raise StartupError("run() cannot be decorated with both @rawhttp and @input_schema")
        self.data_param = params[0].name
        if raw:
            self.mode = "raw"
        elif schema:
            self.mode = "schema"
            self.schema_params = params
        else:
            self.mode = "text"

    def call_init(self):
        """Run the script's init(); raises StartupError with diagnostics."""
        try:
            self.init()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            info = describe_exception(exc, self.roots)
            raise StartupError("User's init function failed: init() in %s failed"
                               % _relative_to_roots(self.path, self.roots), EXIT_SCRIPT, info, _format_traceback(exc))

    def arguments(self, request):
        """run()'s keyword arguments for a request, or _BadInput / _MethodNotAllowed."""
        method = request.method
        if self.mode == "raw":
            kwargs = {self.data_param: request.aml_request()}
        elif method == "POST":
            if self.mode == "text":
                try:
                    kwargs = {self.data_param: request.body.decode("utf-8")}
                    request.body = b""  # a queued request holds one copy of a large body, not two
                except UnicodeDecodeError as exc:
                    raise _BadInput("Input cannot be decoded as UTF-8: %s" % exc)
            else:
                kwargs = self._schema_post(request)
        elif method == "GET":
            query = _query_to_object(request.query)
            if self.mode == "text":
                kwargs = {self.data_param: json.dumps(query)}
            else:
                kwargs = self._pick(query)
        else:
            raise _MethodNotAllowed(method)
        if self.wants_headers:
            kwargs["request_headers"] = request.title_case_headers()
        return kwargs

    def _schema_post(self, request):
        mimetype = _parse_options_header(request.header("content-type"))[0]
        if not (mimetype == "application/json" or (mimetype.startswith("application/")
                                                   and mimetype.endswith("+json"))):
            raise _BadInput("Expects Content-Type to be application/json", 415)
        try:
            body = json.loads(request.body)
        except ValueError as exc:
            if request.body:
                raise _BadInput("POST body could not be decoded as JSON: %s" % exc)
            raise _BadInput("POST body is empty. Expecting a JSON dictionary.")
        if not isinstance(body, dict):
            raise _BadInput("POST body should be a JSON dictionary.")
        return self._pick(body)

    def _pick(self, values):
        kwargs = {}
        for param in self.schema_params:
            value = values.get(param.name, param.default)
            if value is inspect.Parameter.empty:
                raise _BadInput("A value is not provided for the %r parameter." % param.name)
            kwargs[param.name] = value
        return kwargs

    def watched_files(self):
        """The .py files whose change should reload this script."""
        files = {self.path}
        skip = {".git", "__pycache__", "node_modules", ".venv", "venv", "site-packages", ".tox"}
        for root in self.roots:
            count = 0
            for folder, dirs, names in os.walk(root):
                dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
                for n in names:
                    if n.endswith(".py"):
                        files.add(os.path.join(folder, n))
                        count += 1
                if count > 2000:  # a huge tree: watch what we have
                    break
        return files


def _is_schema_decorated(func):
    if "inference_schema" not in sys.modules:  # the script never imported it
        return False
    try:
        from inference_schema.schema_util import is_schema_decorated
    except Exception:
        return False
    try:
        return bool(is_schema_decorated(func))
    except Exception:
        return False


class _Job:
    """One call handed to the pool; ``wait(timeout)`` is True once it has finished."""

    __slots__ = ("func", "kwargs", "request_id", "_done", "finished", "result", "error", "elapsed_ms",
                 "thread_id", "started", "abandoned")

    def __init__(self, func, kwargs, request_id):
        self.func = func
        self.kwargs = kwargs
        self.request_id = request_id
        self._done = threading.Lock()  # held until the job finishes: cheaper than an Event
        self._done.acquire()
        self.finished = False
        self.result = self.error = None
        self.elapsed_ms = 0.0
        self.thread_id = None
        self.started = 0.0  # perf_counter() when run() began
        self.abandoned = False

    def wait(self, timeout=None):
        if self.finished:
            return True
        if timeout is None:
            return self._done.acquire()
        return timeout > 0 and self._done.acquire(True, timeout)


class _Overloaded(Exception):
    pass


class _RunPool:
    """At most ``workers`` run() calls at once; up to ``max_queue`` more wait.

    run() executes on the pool's threads so that a connection can answer a
    timeout while run() is still blocked (even in C code); the slot comes back
    when run() returns.  init() runs on a pool thread too, so that with one
    worker init() and run() share a thread, as in the reference's workers.
    """

    def __init__(self, workers, max_queue):
        self.workers = workers
        self.max_queue = max_queue
        self._jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.pending = 0  # queued + running
        self.busy = 0
        self._threads = []
        for index in range(workers):
            thread = threading.Thread(target=self._work, name="azmlinfsrv-worker-%d" % index, daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def queued(self):
        return max(0, self.pending - self.busy)

    def submit(self, func, kwargs, request_id=None, bounded=True):
        job = _Job(func, kwargs, request_id)
        with self._lock:
            if bounded and self.pending >= self.workers + self.max_queue:
                raise _Overloaded()
            self.pending += 1
        self._jobs.put(job)
        return job

    def call(self, func):
        """Run ``func()`` on a pool thread and wait for it (init, reload); re-raises its exception."""
        job = self.submit(func, {}, bounded=False)
        job.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _work(self):
        lock = self._lock
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with lock:  # start it or drop it, atomically with abandon()
                if job.abandoned:
                    self.pending -= 1
                    continue
                self.busy += 1
                job.started = start = time.perf_counter()
            job.thread_id = threading.get_ident()
            _context.request_id = job.request_id
            try:
                job.result = job.func(**job.kwargs)
            except BaseException as exc:  # user code may raise anything, SystemExit included
                job.error = exc
            job.elapsed_ms = (time.perf_counter() - start) * 1000.0
            _context.request_id = None
            with lock:
                self.busy -= 1
                self.pending -= 1
            job.finished = True
            job._done.release()
            job = None

    def abandon(self, job):
        """Withdraw a job no worker has started (its client gets a 503); False if one already has."""
        with self._lock:
            if job.started:
                return False
            job.abandoned = True
            return True

    def where(self, job):
        """The stack of the thread running ``job`` now, innermost last."""
        frame = sys._current_frames().get(job.thread_id) if job.thread_id else None
        return traceback.extract_stack(frame) if frame is not None else []

    def stop(self):
        for _ in self._threads:
            self._jobs.put(None)


###############################################################################
# HTTP: read a request, route it, answer it
###############################################################################


class HttpError(Exception):
    """An answer decided while handling a request: status, JSON message, extra fields."""

    def __init__(self, status, message, close=False, headers=(), extra=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = list(headers)
        self.extra = extra or {}


class _ClientGone(Exception):
    """The client closed the connection, or went idle between requests."""


class _Reader:
    """Buffered reads from a socket with a deadline for the whole read (slowloris-proof)."""

    __slots__ = ("sock", "buf", "timeout", "eof")

    def __init__(self, sock, timeout):
        self.sock = sock
        self.buf = bytearray()
        self.timeout = timeout
        self.eof = False  # the client closed (or reset) its side

    def _fill(self, deadline, started):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(started)
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            raise _timeout_error(started)
        except (ConnectionError, OSError):
            self.eof = True
            raise _ClientGone()
        if not data:
            self.eof = True
            if started:
                raise HttpError(400, "The connection closed before the request was complete.", close=True)
            raise _ClientGone()
        self.buf += data

    def read_head(self):
        """The request line and headers as bytes (without the blank line), or _ClientGone."""
        buf = self.buf
        deadline = time.monotonic() + self.timeout
        searched = 0
        while True:
            # Empty lines before a request line are allowed (RFC 9112 2.2).
            while buf[:2] == b"\r\n":
                del buf[:2]
            while buf[:1] == b"\n":
                del buf[:1]
            # The head ends at the first empty line, CRLF or bare LF (lenient clients).
            match = _HEAD_END_RE.search(buf, max(0, searched - 2))
            if match is not None:
                head = bytes(buf[:match.start()])
                del buf[:match.end()]
                return head
            searched = len(buf)
            first_line_end = buf.find(b"\n")
            if (first_line_end < 0 and searched > _MAX_REQUEST_LINE) or first_line_end > _MAX_REQUEST_LINE + 1:
                raise HttpError(414, "The request line is longer than %d bytes." % _MAX_REQUEST_LINE, close=True)
            if searched > _MAX_REQUEST_LINE + _MAX_HEADER_BYTES:
                raise HttpError(431, "The request headers are larger than %d bytes." % _MAX_HEADER_BYTES,
                                close=True)
            self._fill(deadline, searched > 0)

    def read_exact(self, size):
        buf = self.buf
        deadline = time.monotonic() + self.timeout + size / 65536.0  # at least 64 KiB/s
        if size - len(buf) > 262144:
            return self._read_large(size, deadline)
        while len(buf) < size:
            self._fill(deadline, True)
        if len(buf) == size:  # the usual case: take the whole buffer without copying it twice
            data = bytes(buf)
            buf.clear()
            return data
        with memoryview(buf) as view:
            data = bytes(view[:size])
        del buf[:size]
        return data

    def _read_large(self, size, deadline):
        """A large body straight into one buffer of its size: no growing, one copy at the end."""
        body = bytearray(size)
        have = len(self.buf)
        body[:have] = self.buf
        self.buf.clear()
        view = memoryview(body)
        try:
            while have < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _timeout_error(True)
                self.sock.settimeout(remaining)
                try:
                    n = self.sock.recv_into(view[have:], min(size - have, 1048576))
                except socket.timeout:
                    raise _timeout_error(True)
                except OSError:
                    self.eof = True
                    raise _ClientGone()
                if not n:
                    self.eof = True
                    raise HttpError(400, "The connection closed before the request was complete.", close=True)
                have += n
        finally:
            view.release()
        return bytes(body)

    def read_line(self, limit):
        buf = self.buf
        deadline = time.monotonic() + self.timeout
        while True:
            end = buf.find(b"\n")
            if end > limit:
                raise HttpError(400, "A chunk-size line is longer than %d bytes." % limit, close=True)
            if end >= 0:
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                return line
            if len(buf) > limit:
                raise HttpError(400, "A chunk-size line is longer than %d bytes." % limit, close=True)
            self._fill(deadline, True)


def _timeout_error(started):
    if not started:
        return _ClientGone()
    return HttpError(408, "The client took too long to send the request.", close=True)


class Request:
    """One parsed HTTP request, as the server sees it (run() sees an AMLRequest)."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "hmap", "body", "keep_alive",
                 "client", "server_address", "request_id", "client_request_id", "legacy_request_id",
                 "start", "start_wall", "_aml")

    def header(self, name, default=""):
        return self.hmap.get(name, default)

    def title_case_headers(self):
        result = {}
        for name, value in self.headers:
            key = _title_case(name)
            result[key] = result[key] + "," + value if key in result else value
        return result

    def aml_request(self):
        if self._aml is None:
            self._aml = AMLRequest(self.method, self.target, _Headers(self.headers), self.body,
                                   self.client[0] if self.client else "127.0.0.1", self.server_address)
        return self._aml

    @property
    def full_target(self):
        return self.path + ("?" + self.query if self.query else "")


def _parse_head(head, client, server_address):
    """Request line and headers -> Request, or HttpError (400, 414, 431, 505)."""
    text = head.decode("latin-1")
    newline = text.find("\n")
    line = text if newline < 0 else text[:newline]
    block = "" if newline < 0 else text[newline + 1:] + "\n"
    match = _REQUEST_LINE_RE.match(line)
    fields = _HEADER_FIELD_RE.findall(block) if block else []
    # Fast path: every check in one go; anything unusual takes the careful path, which says what is wrong.
    if (match is None or _CONTROL_RE.search(text) or len(line) > _MAX_REQUEST_LINE
            or len(block) > _MAX_HEADER_BYTES or len(fields) > _MAX_HEADER_COUNT
            or (block and _HEADER_BLOCK_RE.fullmatch(block) is None)):
        _diagnose_head(head)  # raises the precise HttpError
        raise HttpError(400, "Malformed request head.", close=True)
    method, target, minor = match.groups()
    if target[0] != "/":
        if target.startswith(("http://", "https://")):  # absolute-form (proxies)
            rest = target.split("://", 1)[1]
            slash = rest.find("/")
            target = rest[slash:] if slash >= 0 else "/"
        elif not (target == "*" and method == "OPTIONS"):
            raise HttpError(400, "The request target must start with '/'.", close=True)
    headers = fields
    hmap = {}
    for name, value in fields:
        lower = name.lower()
        if lower in hmap:
            if lower in ("content-length", "host"):
                if lower == "host" or value != hmap[lower]:
                    raise HttpError(400, "Conflicting %s headers." % name, close=True)
                continue
            hmap[lower] = hmap[lower] + ", " + value
        else:
            hmap[lower] = value

    req = Request()
    req.method = method
    req.target = target
    path, _, query = target.partition("?")
    req.path = path
    req.query = query
    req.version = "HTTP/1.1" if minor == "1" else "HTTP/1.0"
    req.headers = headers
    req.hmap = hmap
    req.body = b""
    req.client = client
    req.server_address = server_address
    req._aml = None
    connection = hmap.get("connection", "").lower()
    if minor == "1":
        req.keep_alive = "close" not in connection
    else:
        req.keep_alive = "keep-alive" in connection
    return req


def _diagnose_head(head):
    """The careful parser: raises the HttpError that says what is wrong with a request head."""
    lines = head.split(b"\n")
    line = lines[0].rstrip(b"\r")
    if len(line) > _MAX_REQUEST_LINE:
        raise HttpError(414, "The request line is longer than %d bytes." % _MAX_REQUEST_LINE, close=True)
    if len(head) - len(lines[0]) > _MAX_HEADER_BYTES:
        raise HttpError(431, "The request headers are larger than %d bytes." % _MAX_HEADER_BYTES, close=True)
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise HttpError(400, "Malformed request line.", close=True)
    method_b, target_b, version_b = parts
    if not _TOKEN_RE.match(method_b):
        raise HttpError(400, "Malformed request method.", close=True)
    if version_b not in (b"HTTP/1.1", b"HTTP/1.0"):
        if re.match(rb"^HTTP/\d\.\d$", version_b) or re.match(rb"^HTTP/\d$", version_b):
            raise HttpError(505, "HTTP version %s is not supported; use HTTP/1.1 or HTTP/1.0."
                            % version_b.decode("latin-1"), close=True)
        raise HttpError(400, "Malformed HTTP version.", close=True)
    if _BAD_VALUE_RE.search(target_b) or b"\t" in target_b:
        raise HttpError(400, "The request target contains control characters.", close=True)
    if len(lines) - 1 > _MAX_HEADER_COUNT:
        raise HttpError(431, "Too many request headers (more than %d)." % _MAX_HEADER_COUNT, close=True)
    for raw in itertools.islice(lines, 1, None):
        if raw[-1:] == b"\r":
            raw = raw[:-1]
        if not raw:
            raise HttpError(400, "Malformed header block.", close=True)
        if raw[0] in (32, 9):
            raise HttpError(400, "Folded header lines are not allowed.", close=True)
        name_b, sep, value_b = raw.partition(b":")
        if not sep or not _TOKEN_RE.match(name_b):
            raise HttpError(400, "Malformed header line.", close=True)
        if _BAD_VALUE_RE.search(value_b.strip(b" \t")):
            raise HttpError(400, "A header value contains control characters.", close=True)


def _body_length(req, max_body):
    """How to read the body: ('length', n) or ('chunked', None); 400/411/413/501 otherwise."""
    te = req.hmap.get("transfer-encoding")
    cl = req.hmap.get("content-length")
    if te is not None:
        if cl is not None:
            raise HttpError(400, "Both Content-Length and Transfer-Encoding were sent.", close=True)
        if req.version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding is not allowed with HTTP/1.0.", close=True)
        if te.strip().lower() != "chunked":
            raise HttpError(501, "Transfer-Encoding %r is not supported; only chunked is." % te, close=True)
        return "chunked", None
    if cl is None:
        return "length", 0
    values = {v.strip() for v in cl.split(",")}
    if len(values) != 1:
        raise HttpError(400, "Conflicting Content-Length values.", close=True)
    value = values.pop()
    if not _DIGITS_RE.match(value) or len(value) > 18:  # not isdigit(): it takes "²" and other digits
        raise HttpError(400, "Content-Length must be a non-negative integer.", close=True)
    length = int(value)
    if length > max_body:
        raise HttpError(413, "The request body is %d bytes; the limit is %d." % (length, max_body), close=True)
    return "length", length


def _read_chunked(reader, max_body):
    parts = []
    total = 0
    while True:
        line = reader.read_line(_MAX_CHUNK_LINE).rstrip(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or not re.match(rb"^[0-9A-Fa-f]{1,15}$", size_text):
            raise HttpError(400, "Malformed chunk size in a chunked body.", close=True)
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > max_body:
            raise HttpError(413, "The request body is larger than the limit of %d bytes." % max_body, close=True)
        parts.append(reader.read_exact(size))
        if reader.read_exact(2) != b"\r\n":
            raise HttpError(400, "A chunk is not followed by CRLF.", close=True)
    for _ in range(_MAX_HEADER_COUNT + 1):  # trailers, ignored
        line = reader.read_line(_MAX_REQUEST_LINE)
        if line in (b"\r\n", b"\n"):
            return b"".join(parts)
    raise HttpError(431, "Too many trailer fields in a chunked body.", close=True)


_date_cache = [0, ""]


def _http_date():
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = email.utils.formatdate(now, usegmt=True)
    return _date_cache[1]


def _json_body(message, extra=None):
    payload = {"message": message}
    if extra:
        payload.update(extra)
    return json.dumps(payload).encode("utf-8")


class Response:
    """What the server sends: status, headers, and a body (bytes) or a stream of chunks."""

    __slots__ = ("status", "headers", "body", "stream", "log_message")

    def __init__(self, status, headers=None, body=b"", stream=None):
        self.status = status
        self.headers = headers if headers is not None else []
        self.body = body
        self.stream = stream
        self.log_message = None

    @classmethod
    def json(cls, status, value, headers=None):
        return cls(status, [("Content-Type", "application/json")] + list(headers or ()),
                   json.dumps(value).encode("utf-8"))

    @classmethod
    def error(cls, status, message, extra=None, run_failed=False, headers=()):
        return cls(status, [("Content-Type", "application/json"),
                            ("x-ms-run-function-failed", "True" if run_failed else "False")] + list(headers),
                   _json_body(message, extra))


def _cors_origins(text):
    if not text:
        return frozenset()
    return frozenset(o.strip() for o in text.split(",") if o.strip())


_NOT_TOKEN_RE = re.compile(r"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")


def _clean_header_name(name):
    """A script's header name as a token: other characters (spaces, CR/LF, ':') would break clients'
    parsers or forge headers."""
    name = str(name)
    return _NOT_TOKEN_RE.sub("-", name) if _NOT_TOKEN_RE.search(name) else name


def _clean_header_value(value):
    value = str(value)
    if "\r" in value or "\n" in value:  # never let a script split the header block
        value = value.replace("\r", " ").replace("\n", " ")
    return value


class App:
    """Routes requests and answers them; holds the script, the run() pool and the counters.

    Methods that may be overridden: ``handle()`` (every request) and one
    method per route in ``routes``.
    """

    def __init__(self, config, script, telemetry=None, metrics=None, pool=None):
        self.config = config
        self.script = script
        self.script_error = None  # diagnostics of a failed reload: /score answers 503 until fixed
        self.pool = pool or _RunPool(config.worker_count, config.max_queue)
        self.telemetry = telemetry or Telemetry(config)
        self.metrics = metrics or Metrics()
        self.metrics.workers = config.worker_count
        self.metrics.pool = self.pool
        self.cors = _cors_origins(config.cors_origins)
        self._cors_lower = {o.lower() for o in self.cors}
        self.server_version = str(config.server_version_header).strip().lower() == "true"
        self.hide_details = bool(config.hide_error_details)
        self.timeout_s = config.scoring_timeout_ms / 1000.0
        self.draining = False
        self.in_flight = 0
        self._lock = threading.Lock()
        self._warned = set()
        self.routes = {"/": self.health, "/score": self.score, "/swagger.json": self.swagger}
        if config.metrics:
            self.routes["/metrics"] = self.metrics_route
        self.access_log = bool(config.access_log)

    # -- one request ------------------------------------------------------------
    def handle(self, req):
        """Answer one request: ids, route, common headers."""
        route = self.routes.get(req.path)
        try:
            ids = self._request_ids(req)
            if route is None:
                resp = Response.error(404, _MSG_NOT_FOUND)
            else:
                resp = route(req)
        except HttpError as exc:
            if route is None:  # the reference routes first: an unknown path is a 404, never a 431
                exc = HttpError(404, _MSG_NOT_FOUND)
            resp = Response.error(exc.status, exc.message, exc.extra or None, headers=exc.headers)
            ids = getattr(req, "request_id", None) and self._ids_after_error(req)
        headers = resp.headers
        if ids:
            if req.path == "/score" and len(headers) > 3:  # a script cannot overwrite the request ids
                headers[:] = [h for h in headers if h[0].lower() not in _ID_HEADERS]
            headers.extend(ids)
        if self.server_version:
            headers.append(("x-ms-server-version", "azmlinfsrv/" + __version__))
        trace = req.hmap.get("traceid")
        if trace is not None:
            headers.append(("TraceId", trace))
        if self.cors and route is not None and resp.status not in (404, 405):
            headers.extend(self._cors_headers(req))
        return resp

    def _cors_headers(self, req):
        """flask-cors' answers, as the reference sends them."""
        origin = req.hmap.get("origin")
        many = len(self.cors) > 1 or "*" in self.cors
        if origin is None:
            allowed = "*" if "*" in self.cors else sorted(self.cors)[0]
            return [("Access-Control-Allow-Origin", allowed)] + ([("Vary", "Origin")] if many and allowed != "*"
                                                                 else [])
        if "*" not in self.cors and origin.lower() not in self._cors_lower:
            return []
        headers = [("Access-Control-Allow-Origin", origin)]
        if req.method == "OPTIONS" and req.hmap.get("access-control-request-method", "").upper() in ("GET", "POST"):
            wanted = req.hmap.get("access-control-request-headers")
            if wanted:
                headers.append(("Access-Control-Allow-Headers",
                                ", ".join(h.strip() for h in wanted.split(",") if h.strip())))
            headers.append(("Access-Control-Allow-Methods", "GET, POST"))
        if many:
            headers.append(("Vary", "Origin"))
        return headers

    def _request_ids(self, req):
        hmap = req.hmap
        request_id = hmap.get("x-request-id") or _new_request_id()
        req.request_id = None
        if len(request_id) > _REQUEST_ID_LIMIT:
            raise HttpError(431, "x-request-id must not exceed %d characters" % _REQUEST_ID_LIMIT)
        req.request_id = request_id
        legacy = hmap.get("x-ms-request-id", "")
        client = hmap.get("x-ms-client-request-id", "")
        if legacy:
            self.warn_once("x-ms-request-id", "x-ms-request-id header has been deprecated and will be removed "
                           "from future versions of the server. Please use x-ms-client-request-id.")
            client = client or legacy
        else:
            legacy = client or request_id
        req.client_request_id = client
        req.legacy_request_id = legacy
        if len(legacy) > _REQUEST_ID_LIMIT or len(client) > _REQUEST_ID_LIMIT:
            req.legacy_request_id = req.client_request_id = ""
            raise HttpError(431, "x-ms-request-id and x-ms-client-request-id must not exceed %d characters"
                            % _REQUEST_ID_LIMIT)
        return self._ids_after_error(req)

    @staticmethod
    def _ids_after_error(req):
        ids = [("x-request-id", req.request_id)]
        if req.legacy_request_id:
            ids.append(("x-ms-request-id", req.legacy_request_id))
        if req.client_request_id:
            ids.append(("x-ms-client-request-id", req.client_request_id))
        return ids

    def warn_once(self, key, message, *args):
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # -- routes -----------------------------------------------------------------
    def health(self, req):
        if req.method not in ("GET", "HEAD"):
            if req.method == "OPTIONS":
                return Response(200, [("Content-Type", "text/html; charset=utf-8"),
                                      ("Allow", "GET, HEAD, OPTIONS")])
            raise HttpError(405, _MSG_METHOD_NOT_ALLOWED, headers=[("Allow", "GET, HEAD, OPTIONS")])
        if self.draining:
            return Response.error(503, "The server is shutting down.", headers=[("Retry-After", "1")])
        return Response(200, [("Content-Type", "text/html; charset=utf-8")], b"Healthy")

    def swagger(self, req):
        if req.method not in ("GET", "HEAD"):
            raise HttpError(405, _MSG_METHOD_NOT_ALLOWED, headers=[("Allow", "GET, HEAD, OPTIONS")])
        version = _query_first(req.query, "version")
        if version is None:  # ?version= (empty) is not valid; no parameter at all means 2
            version = "2"
        status, document = swagger_document(self.script, self.config, version)
        if status != 200:
            return Response.error(status, document)
        return Response.json(200, document, [("x-ms-run-function-failed", "False")])

    def metrics_route(self, req):
        if req.method not in ("GET", "HEAD"):
            raise HttpError(405, _MSG_METHOD_NOT_ALLOWED, headers=[("Allow", "GET, HEAD")])
        return Response(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                        self.metrics.render(self).encode("utf-8"))

    def score(self, req):
        """/score: turn the request into run()'s arguments, run it on the pool, encode the answer."""
        method = req.method
        if method not in ("GET", "POST", "OPTIONS", "HEAD"):
            raise HttpError(405, _MSG_METHOD_NOT_ALLOWED, headers=[("Allow", "GET, HEAD, OPTIONS, POST")])
        if self.draining:
            return Response.error(503, "The server is shutting down; retry on another instance.",
                                  headers=[("Retry-After", "1")])
        script = self.script
        if self.script_error is not None:
            return Response.error(503, "The score script failed to reload; fix it and save again.",
                                  {"error": self.script_error})
        try:
            kwargs = script.arguments(req)
        except _BadInput as exc:
            return Response.error(exc.status, exc.message)
        except _MethodNotAllowed:
            if method == "OPTIONS":
                return Response(200, [("Content-Type", "text/html; charset=utf-8"),
                                      ("x-ms-run-function-failed", "False")])
            return Response.error(405, "Method not allowed")

        try:
            job = self.pool.submit(script.run, kwargs, req.request_id)
        except _Overloaded:
            self.metrics.count("rejected")
            return Response.error(503, "The server is busy: all %d workers are scoring and %d requests are "
                                  "waiting. Retry later." % (self.pool.workers, self.pool.queued),
                                  headers=[("Retry-After", "1")])
        if not job.wait(self.timeout_s):
            # The deadline counts from when run() started, as the reference's; a request that could
            # not even start within it gets a 503 (the workers are stuck), not a timeout.
            if self.pool.abandon(job):
                self.metrics.count("rejected")
                return Response.error(503, "No worker became free within %s ms: every worker is still "
                                      "running an earlier request. Retry later."
                                      % self.config.scoring_timeout_ms, headers=[("Retry-After", "1")])
            if not job.wait(job.started + self.timeout_s - time.perf_counter()):
                return self._timed_out(req, job, script)
        self.metrics.observe_run(job.elapsed_ms / 1000.0)
        if job.error is not None:
            return self._run_failed(req, job, script)
        return self._encode_result(req, job, script)

    def _timed_out(self, req, job, script):
        self.metrics.count("timeouts")
        ms = self.config.scoring_timeout_ms
        stack = self.pool.where(job)
        user = [f for f in stack if _is_user_file(f.filename, script.roots)]
        where = ""
        if user:
            f = user[-1]
            where = " run() was at %s, line %s, in %s: %s" % (
                _relative_to_roots(f.filename, script.roots), f.lineno, f.name, (f.line or "").strip())
        logger.error("Scoring timeout after %s ms for request %s.%s", ms, req.request_id, where)
        error = None
        if user:
            frames = [_frame_dict(f.filename, f.lineno, f.name, f.line, script.roots) for f in user]
            error = {"type": "TimeoutError", "text": "run() did not return within %s ms" % ms,
                     "location": frames[-1], "frames": frames}
        self.telemetry.track_exception(TimeoutError("Scoring timeout after %s ms" % ms), req, error)
        extra = {"error": error} if error and not self.hide_details else None
        return Response.error(500, "Scoring timeout after %s ms" % ms, extra, run_failed=True)

    def _run_failed(self, req, job, script):
        exc = job.error
        info = describe_exception(exc, script.roots)
        logger.error("run() failed for request %s: %s\n%s", req.request_id, _format_diagnosis(info),
                     "".join(traceback.format_exception(type(exc), exc, _without_our_frames(exc))).rstrip())
        self.metrics.count("run_errors")
        self.telemetry.track_exception(exc, req, info)
        return Response.error(500, _MSG_RUN_FAILED, None if self.hide_details else {"error": info},
                              run_failed=True)

    def _encode_result(self, req, job, script):
        result = job.result
        exec_ms = ("x-ms-run-fn-exec-ms", "%.3f" % job.elapsed_ms)
        if isinstance(result, AMLResponse):
            headers = list(result.headers)
            if result.status_code >= 500:
                headers = [(n, v) for n, v in headers if n.lower() != "x-ms-run-function-failed"]
                headers.append(("x-ms-run-function-failed", "True"))
            headers = [(_clean_header_name(n), _clean_header_value(v)) for n, v in headers]
            headers.append(exec_ms)
            resp = Response(result.status_code, headers, result.body, result.stream)
        else:
            if isinstance(result, str) and "str-json" not in self._warned and result[:1] in ("{", "["):
                self._warn_double_encoding(result)
            try:
                body = b"{}" if result is None else json.dumps(result).encode("utf-8")
            except (TypeError, ValueError) as exc:
                logger.error("run() returned a value that cannot be JSON-encoded for request %s: %s: %s",
                             req.request_id, type(exc).__name__, exc)
                extra = None if self.hide_details else {"error": {
                    "type": type(exc).__name__, "text": str(exc),
                    "hint": "run() returned %s; return JSON-serializable data or an AMLResponse."
                            % type(result).__name__}}
                return Response.error(500, _MSG_INTERNAL, extra)
            resp = Response(200, [("Content-Type", "application/json"),
                                  ("x-ms-run-function-failed", "False"), exec_ms], body)
        if self.telemetry.enabled:
            self.telemetry.track_model_data(req, job.kwargs, result, script)
        return resp

    def _warn_double_encoding(self, text):
        """run() returned json.dumps(obj): the client gets a JSON string, not the object (warned once)."""
        try:
            json.loads(text)
        except ValueError:
            return
        sent = json.dumps(text)
        self.warn_once("str-json", "run() returned a str that is JSON text, so clients receive a JSON *string*, "
                       "not an object: %s. Return the object itself (return result, not "
                       "return json.dumps(result)); the server encodes it. (Logged once.)",
                       sent if len(sent) <= 80 else sent[:77] + "...")


def _new_request_id():
    """A random (version 4) UUID as text, without uuid.UUID's overhead."""
    h = os.urandom(16).hex()
    return "%s-%s-4%s-%s%s-%s" % (h[:8], h[8:12], h[13:16], "89ab"[int(h[16], 16) & 3], h[17:20], h[20:])


def _without_our_frames(exc):
    """The traceback from the first frame that is not this module's (the pool's call of run())."""
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) == _HERE:
        tb = tb.tb_next
    return tb or exc.__traceback__


def _query_first(query, name):
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key == name:
            return value
    return None


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection: read requests (keep-alive, pipelining), hand them to the App, write answers."""

    protocol_version = "HTTP/1.1"
    server_version = "azmlinfsrv/" + __version__

    def setup(self):
        sock = self.request
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.reader = _Reader(sock, self.server.config.client_timeout)
        self.busy = False
        self.server.track(sock, self)

    def finish(self):
        """Lingering close: send our FIN first, then read and drop what the client still sends
        (bounded), so that unread input does not turn the close into a reset that destroys the
        answer before the client reads it. The server closes the socket."""
        self.busy = False
        if self.reader.eof:
            return
        sock = self.request
        deadline = time.monotonic() + _LINGER_SECONDS
        try:
            sock.shutdown(socket.SHUT_WR)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                sock.settimeout(remaining)
                if not sock.recv(65536):
                    return
        except OSError:
            pass

    def _writing(self):
        """A client that does not read our answer is dropped after --client_timeout."""
        self.request.settimeout(self.server.config.client_timeout)

    def handle(self):
        server = self.server
        config = server.config
        while True:
            try:
                req = self._read_request(config)
            except _ClientGone:
                return
            except HttpError as exc:
                self._send_early_error(exc)
                return
            if req is None:
                return
            app = server.app
            with app._lock:
                app.in_flight += 1
            try:
                try:
                    resp = app.handle(req)
                except Exception as exc:  # a bug of ours: answer 500, keep the details in the log
                    logger.exception("Internal error while handling %s %s", req.method, req.path)
                    resp = Response.error(500, _MSG_INTERNAL, {"error": {"type": type(exc).__name__,
                                                                         "text": str(exc)}})
                keep = self._send(req, resp, app)
            finally:
                self.busy = False
                with app._lock:
                    app.in_flight -= 1
            if not keep or app.draining:
                return

    def _read_request(self, config):
        self.busy = False
        head = self.reader.read_head()
        self.busy = True
        req = _parse_head(head, self.client_address, self.server.server_address)
        req.start = time.perf_counter()
        req.start_wall = time.time()
        req.request_id = req.client_request_id = req.legacy_request_id = None
        kind, length = _body_length(req, config.max_body_bytes)
        expect = req.hmap.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise HttpError(417, "Only 'Expect: 100-continue' is supported.", close=True)
            if req.version == "HTTP/1.1" and (kind == "chunked" or length) and not self.reader.buf:
                self._writing()
                try:
                    self.request.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    raise _ClientGone()
        if kind == "chunked":
            req.body = _read_chunked(self.reader, config.max_body_bytes)
        elif length:
            req.body = self.reader.read_exact(length)
        return req

    def _send_early_error(self, exc):
        """Answer a request we could not read (400, 408, 413, 414, 431, 505...) and close."""
        body = _json_body(exc.message)
        head = _head_bytes(exc.status, [("Content-Type", "application/json")] + exc.headers, self.server_version,
                           ["Content-Length: %d" % len(body), "Connection: close"])
        try:
            self._writing()
            self.request.sendall(head + body)
        except OSError:
            pass
        self.server.app.metrics.count_request("(invalid)", exc.status, 0.0)

    def _send(self, req, resp, app):
        """Write the answer in one send (or chunk by chunk for streams); returns keep-alive."""
        keep = req.keep_alive and not app.draining and resp.status not in (408, 413)
        status = resp.status
        head_only = req.method == "HEAD"
        stream = resp.stream
        framing = []
        if stream is not None:
            if req.version == "HTTP/1.1":
                framing.append("Transfer-Encoding: chunked")
            else:
                keep = False
        else:
            framing.append("Content-Length: %d" % len(resp.body))
        framing.append("Connection: keep-alive" if keep else "Connection: close")
        head = _head_bytes(status, resp.headers, self.server_version, framing)
        sock = self.request
        length = "N/A"
        try:
            self._writing()
            if stream is None:
                _send_parts(sock, head, b"" if head_only else resp.body)
                length = len(resp.body)
            else:
                sock.sendall(head)
                if head_only:
                    _close_iterable(stream)
                elif not self._stream(req, stream, app):
                    keep = False
        except OSError:
            keep = False
        duration = time.perf_counter() - req.start
        app.metrics.count_request(req.path if req.path in app.routes else "(other)", status, duration)
        if app.access_log and req.path in ("/score", "/swagger.json"):
            logger.info("%s %s %d %.3fms %s", req.method, req.full_target, status, duration * 1000.0, length)
        if req.path != "/" and app.telemetry.enabled:
            app.telemetry.track_request(req, resp, duration * 1000.0)
        return keep

    def _stream(self, req, stream, app):
        """Send a generator's chunks as they come; False if the stream broke."""
        chunked = req.version == "HTTP/1.1"
        sock = self.request
        try:
            for chunk in stream:
                data = _to_bytes(chunk)
                if not data:
                    continue
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        except OSError:
            _close_iterable(stream)
            return False
        except Exception as exc:
            roots = app.script.roots if app.script else []
            info = describe_exception(exc, roots)
            logger.error("The streamed response of request %s broke off: %s", req.request_id,
                         _format_diagnosis(info))
            return False  # no terminating chunk: the client sees an incomplete response, not a short one
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        return chunked

    def log_message(self, format, *args):  # http.server's own logging: ours is in _send
        pass


def _head_bytes(status, headers, server, framing):
    """Status line and header block, ready to send: the headers, Date, Server, then framing."""
    lines = ["HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Unknown"))]
    lines += [name + ": " + value for name, value in headers]
    lines.append("Date: " + _http_date())
    lines.append("Server: " + server)
    lines += framing
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def _send_parts(sock, head, body):
    """Head and body in one write; large bodies by scatter-gather, without joining them in memory."""
    if len(body) < 65536 or not hasattr(sock, "sendmsg"):
        sock.sendall(head + body)
        return
    parts = [memoryview(head), memoryview(body)]
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]


def _close_iterable(iterable):
    close = getattr(iterable, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


###############################################################################
# Swagger: the user's swagger*.json, or one generated from the script
###############################################################################

#: The swagger versions: (version, the ?version= spellings for it, inference-schema's name for it, the app's
#: own files that replace the generated document, first found wins).  As in the reference, 3.1 reads
#: swagger3.1.json, not swagger3.json.
_SWAGGER_VERSIONS = (
    ("2", ("2", "2.0"), "2.0", ("swagger.json", "swagger2.json")),
    ("3", ("3", "3.0"), "3.0", ("swagger3.json",)),
    ("3.1", ("3.1",), "3.1", ("swagger3.1.json",)),
)

_SWAGGER_ALIASES = frozenset(alias for _, aliases, _, _ in _SWAGGER_VERSIONS for alias in aliases)

_swagger_logger = logging.getLogger("azmlinfsrv.swagger")

#: ServiceInput and ServiceOutput of a run() without inference-schema decorators.
_UNDECORATED_SCHEMA = {"type": "object", "example": {}}
_SWAGGER_INPUT_TEXT = "The input payload for executing the real-time machine learning service."


def swagger_document(script, config, version):
    """(200, document) for ``?version=``, else (404, the reference's message).

    The documents are built once per loaded script (see swagger_documents) and then only looked up.
    """
    documents, supported = swagger_documents(script, config)
    if version not in _SWAGGER_ALIASES:
        return 404, ("Swagger version [%s] is not valid. Supported versions: [%s]."
                     % (version, ", ".join(supported)))
    if not documents.get(version):
        return 404, ("Swagger version [%s] is not supported for the scoring script. "
                     "Supported swagger versions: [%s]." % (version, ", ".join(supported)))
    return 200, documents[version]


def swagger_documents(script, config):
    """({?version= spelling: document}, [supported versions]) for a script, cached on it.

    Called at start-up after init() (a broken swagger*.json in the app root is then a start-up error,
    exit 3, as in the reference) and again, from the cache, on every request.
    """
    cached = getattr(script, "swagger", None)
    if cached is not None:
        return cached
    service_input, service_output, expressible = _script_schemas(script)
    documents, supported, skipped = {}, [], []
    for version, aliases, schema_version, files in _SWAGGER_VERSIONS:
        document = _user_swagger(config.app_root, version, files)
        if not document and schema_version in expressible:
            document = _generated_swagger(version, config, service_input, service_output)
        (supported if document else skipped).append(version)
        documents.update((alias, document) for alias in aliases)
    if supported and skipped:
        _swagger_logger.info("Swaggers are prepared for versions [%s] and skipped for versions [%s].",
                             ", ".join(supported), ", ".join(skipped))
    elif supported:
        _swagger_logger.info("Swaggers are prepared for the following versions: [%s].", ", ".join(supported))
    else:
        _swagger_logger.info("No swagger is prepared.")
    script.swagger = (documents, supported)
    return script.swagger


def _script_schemas(script):
    """(ServiceInput, ServiceOutput, the versions that can express them) for run()."""
    if script.mode != "schema":
        return _UNDECORATED_SCHEMA, _UNDECORATED_SCHEMA, ("2.0", "3.0", "3.1")
    from inference_schema import schema_util  # loaded already: mode "schema" means the script used it
    run = script.run
    return (schema_util.get_input_schema(run), schema_util.get_output_schema(run),
            schema_util.get_supported_versions(run))


def _user_swagger(app_root, version, names):
    """The app's own document for a version, or None (an empty one counts as none, as in the reference)."""
    for name in names:
        path = os.path.join(app_root, name)
        try:
            with open(path, encoding="utf-8-sig") as handle:
                document = json.load(handle)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise StartupError("Cannot read the app's %s: %s" % (path, exc), EXIT_SCRIPT)
        _swagger_logger.info("Loaded user's swagger file for version [%s] from %s", version, path)
        if document:
            return document
    return None


def _generated_swagger(version, config, service_input, service_output):
    """The reference's swagger 2.0 / OpenAPI 3.0.3 / 3.1.0 template, filled in: same keys, same order."""
    v2 = version == "2"
    prefix = config.service_path_prefix
    prefix = "/" + prefix.strip("/") if prefix else ""

    def ref(name):
        return {"$ref": ("#/definitions/" if v2 else "#/components/schemas/") + name}

    def content(schema, mime="application/json"):  # where a body's schema sits: 2.0 inline, 3.x per media type
        return {"schema": schema} if v2 else {"content": {mime: {"schema": schema}}}

    def answer(description, schema, mime="application/json"):
        return dict({"description": description}, **content(schema, mime))

    failed = answer("The service failed to execute due to an error.", ref("ErrorResponse"))
    healthy = "If service is up and running, this response will be returned with the content 'Healthy'"
    if v2:
        health = dict(answer(healthy, {"type": "string"}), examples={"application/json": "Healthy"})
        score_input = {"parameters": [dict({"name": "serviceInputPayload", "in": "body", "description":
                                            _SWAGGER_INPUT_TEXT}, **content(ref("ServiceInput")))]}
        version_param = {"type": "integer", "enum": [2, 3]}
    else:
        health = answer(healthy, {"type": "string", "example": "Healthy"}, "text/plain")
        score_input = {"requestBody": dict({"description": _SWAGGER_INPUT_TEXT}, **content(ref("ServiceInput")))}
        version_param = {"schema": {"type": "integer", "enum": [2, 3]}}
    bearer = {"Bearer": []}
    paths = {
        prefix + "/": {"get": {
            "operationId": "ServiceHealthCheck",
            "description": "Simple health check endpoint to ensure the service is up at any given point.",
            "responses": {"200": health, "default": failed}}},
        prefix + "/score": {"post": dict({
            "operationId": "RunMLService",
            "description": "Run web service's model and get the prediction output",
            "security": [bearer]}, **score_input, responses={
                "200": answer("The service processed the input correctly and provided a result prediction, "
                              "if applicable.", ref("ServiceOutput")),
                "default": failed})},
        prefix + "/swagger.json": {"get": {
            "operationId": "GetSwaggerSpec",
            "description": "Get the Swagger specification.",
            "parameters": [dict({"name": "version", "in": "query", "required": False}, **version_param)],
            "responses": {"200": answer("The Swagger specification.", {"type": "string"}, "text/plain"),
                          "default": failed}}},
    }
    schemas = {"ServiceInput": service_input, "ServiceOutput": service_output,
               "ErrorResponse": {"type": "object", "properties": {"message": {"type": "string"}}}}
    security = {"Bearer": {"type": "apiKey", "name": "Authorization", "in": "header",
                           "description": "For example: Bearer abc123"}}
    info = {"title": config.service_name,
            "description": "API specification for the Azure Machine Learning service " + config.service_name,
            "version": config.service_version}
    if v2:
        return {"swagger": "2.0", "info": info, "schemes": ["https"], "consumes": ["application/json"],
                "produces": ["application/json"], "securityDefinitions": security, "paths": paths,
                "definitions": schemas}
    return {"openapi": "3.1.0" if version == "3.1" else "3.0.3", "info": info, "security": [bearer],
            "paths": paths, "components": {"schemas": schemas, "securitySchemes": security}}


###############################################################################
# Telemetry: Application Insights over urllib, off the request path
###############################################################################

_AI_DEFAULT_INGESTION = "https://dc.services.visualstudio.com"
_AI_DEFAULT_TRACK_URL = _AI_DEFAULT_INGESTION + "/v2/track"
_AI_BATCH = 100  # items per upload at most; a full batch is sent without waiting for the flush tick
_AI_RETRY_STATUSES = frozenset((408, 429, 500, 502, 503, 504))  # the whole batch, or one item of a 206
_AI_MAX_BACKOFF = 60.0  # seconds between retries at most, unless Retry-After asks for more ...
_AI_MAX_RETRY_AFTER = 600.0  # ... up to this
_AI_MAX_REDIRECTS = 10
_AI_MAX_PROPERTY = 8192  # characters: the ingestion schema's limit for a property value
_AI_MAX_MESSAGE = 32768  # characters: MessageData.message and ExceptionDetails.message
_AI_MAX_URL = 2048
_AI_TRACED_LOGGERS = ("azmlinfsrv.print",)  # ours that carry the user's lines (as the reference's handler)
_MSG_BINARY_RESPONSE = "Scoring request response payload is a non serializable object or raw binary"


def _parse_connection_string(text):
    """``InstrumentationKey=...;IngestionEndpoint=...`` -> dict with lower-case keys."""
    values = {}
    for part in str(text).split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            values[key.strip().lower()] = value.strip()
    return values


def _ai_time(epoch):
    """Epoch seconds -> the envelope's time: ISO 8601 UTC with a trailing Z."""
    whole = int(epoch)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%06dZ" % int((epoch - whole) * 1e6)


def _ai_duration(ms):
    """Milliseconds -> the ingestion API's duration text ``d.hh:mm:ss.ffffff`` (``0.00:00:01.250000``)."""
    us = max(0, int(round(ms * 1000.0)))
    seconds, us = divmod(us, 1000000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return "%d.%02d:%02d:%02d.%06d" % (days, hours, minutes, seconds, us)


def _ai_severity(levelno):
    """logging level -> SeverityLevel: 0 Verbose, 1 Information, 2 Warning, 3 Error, 4 Critical."""
    return min(4, max(0, levelno - 1) // 10)


def _clip(text, limit):
    return text if len(text) <= limit else text[:limit]


def _json_property(value):
    """A value as the reference logs it (JSON text), clipped to the property limit."""
    if isinstance(value, str) and len(value) > _AI_MAX_PROPERTY:
        value = value[:_AI_MAX_PROPERTY]
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError):
        text = json.dumps(repr(value))
    return _clip(text, _AI_MAX_PROPERTY)


def _response_value(resp):
    """The response body as the reference's "Response Value": a JSON-encoded string."""
    if resp.stream is not None:
        return json.dumps("Streamed response (not recorded)")
    body = resp.body or b""
    head = body[:_AI_MAX_PROPERTY * 4]  # enough bytes for the characters that fit
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(body) > len(head) and exc.start >= len(head) - 3:  # a character cut at the limit
            text = head[:exc.start].decode("utf-8", "replace")
        else:
            text = _MSG_BINARY_RESPONSE
    return _clip(json.dumps(text[:_AI_MAX_PROPERTY]), _AI_MAX_PROPERTY)


def _retry_after_seconds(value):
    """Retry-After as seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def _model_ids(model_dir):
    """``name:version`` for each model under AZUREML_MODEL_DIR/<name>/<version>/, as the reference."""
    ids = []
    try:
        for name in sorted(os.listdir(model_dir)):
            folder = os.path.join(model_dir, name)
            if os.path.isdir(folder):
                ids.extend("%s:%d" % (name, int(v)) for v in sorted(os.listdir(folder)) if v.isdigit())
    except (OSError, TypeError):
        pass
    return ids


class Telemetry:
    """Application Insights over its ingestion HTTP API; does nothing unless a valid key is configured.

    The hooks (``track_request``, ``track_exception``, ``track_trace``,
    ``track_model_data``) build an envelope and append it to a bounded queue:
    constant time, never blocking, never raising.  A daemon thread uploads
    batches (gzip'd JSON arrays) every ``telemetry_flush_seconds`` or as soon
    as 100 items wait, resends what the collector marks retriable (408, 429,
    500, 502, 503, 504, network errors; Retry-After honoured; per item on a
    206), and ``close()`` flushes with a bounded wait.  When the queue is full
    the oldest item is dropped and counted in ``dropped``; ``sent`` counts
    items the collector accepted.
    """

    def __init__(self, config):
        self.config = config
        self.enabled = False
        self.sent = 0
        self.dropped = 0
        self.destination = None
        self.ikey = None
        self.url = None
        self._cap = getattr(config, "telemetry_max_queue", 10000)
        self._interval = getattr(config, "telemetry_flush_seconds", 5.0)
        self._timeout = getattr(config, "telemetry_timeout", 10.0)
        self._queue = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._close_deadline = None
        self._backing_off = False
        self._retry = []  # the items the collector asked to be resent (at most one batch)
        self._failures = 0
        self._next_try = 0.0
        self._redirects = 0
        self._warned = set()
        self._thread = None
        self._previous_factory = None
        if self._resolve(config):
            self._start()

    # -- configuration ----------------------------------------------------------
    def _resolve(self, config):
        """Key and track URL from the settings; warns and stays off when they do not add up."""
        conn = config.appinsights_connection_string
        explicitly_off = config.sources.get("appinsights_enabled", "default") != "default" \
            and not config.appinsights_enabled
        if config.appinsights_enabled and config.appinsights_key:
            key, url = config.appinsights_key.strip(), _AI_DEFAULT_TRACK_URL
        elif conn and not explicitly_off:
            parts = _parse_connection_string(conn)
            key = parts.get("instrumentationkey", "")
            endpoint = parts.get("ingestionendpoint")
            if not endpoint and parts.get("endpointsuffix"):
                endpoint = "https://dc." + parts["endpointsuffix"].strip(".")
            url = (endpoint or _AI_DEFAULT_INGESTION).rstrip("/") + "/v2.1/track"
            if not key:
                logger.warning("APPLICATIONINSIGHTS_CONNECTION_STRING has no InstrumentationKey: telemetry is off.")
                return False
        elif config.appinsights_enabled:
            logger.warning("AML_APP_INSIGHTS_ENABLED is true but no instrumentation key is set "
                           "(AML_APP_INSIGHTS_KEY, --appinsights_instrumentation_key or "
                           "APPLICATIONINSIGHTS_CONNECTION_STRING): telemetry is off.")
            return False
        else:
            return False
        if not _UUID_RE.match(key):
            logger.warning("The Application Insights instrumentation key is not a valid UUID: telemetry is off.")
            return False
        if config.appinsights_endpoint:
            url = config.appinsights_endpoint.strip()
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            logger.warning("AML_APP_INSIGHTS_ENDPOINT must be a full http(s) URL such as %s, not %r: telemetry "
                           "is off.", _AI_DEFAULT_TRACK_URL, url)
            return False
        self.ikey, self.url, self.destination, self.enabled = key, url, url, True
        return True

    def _start(self):
        config = self.config
        self._container_id = config.hostname
        instance = config.hostname if config.hostname and config.hostname != "Unknown" else socket.gethostname()
        self._tags = {
            "ai.cloud.role": config.service_name,
            "ai.cloud.roleInstance": instance,
            "ai.internal.sdkVersion": "py%d.%d.%d:azmlinfsrv%s" % (sys.version_info[:3] + (__version__,)),
        }
        prefix = "Microsoft.ApplicationInsights.%s." % self.ikey.replace("-", "").lower()
        self._names = {kind: prefix + kind for kind in ("Request", "Exception", "Message")}
        self._models = _model_ids(config.model_dir or os.environ.get("AZUREML_MODEL_DIR"))
        self._opener = self._make_opener(self.url)
        self._thread = threading.Thread(target=self._run, name="azmlinfsrv-telemetry", daemon=True)
        self._thread.start()
        # Every log record passes through the record factory, whatever logger made it and whether or
        # not that logger propagates.  A handler on the root logger would see the user's lines too,
        # but its mere presence turns off logging.lastResort and basicConfig(): warnings of a script
        # that configures no logging would vanish from the console whenever telemetry is on.
        previous = self._previous_factory = logging.getLogRecordFactory()

        def record_factory(*args, **kwargs):
            record = previous(*args, **kwargs)
            if not self._closing:
                try:
                    self.track_trace(record)
                except Exception:  # telemetry never breaks the caller's logging
                    pass
            return record

        self._record_factory = record_factory
        logging.setLogRecordFactory(record_factory)

    @staticmethod
    def _make_opener(url):
        host = urllib.parse.urlsplit(url).hostname
        if host in ("127.0.0.1", "localhost", "::1"):  # a local collector is never behind a proxy
            return urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return urllib.request.build_opener()

    # -- hooks: called on request threads; build an envelope, queue it, return --
    def track_request(self, req, resp, duration_ms):
        if not self.enabled:
            return
        try:
            config = self.config
            status = resp.status
            host = req.hmap.get("host") or "%s:%s" % tuple(req.server_address[:2])
            props = self._properties(req)
            if config.appinsights_log_response:
                props["Response Value"] = _response_value(resp)
            props["Workspace Name"] = config.workspace_name
            props["Service Name"] = config.service_name
            name = "%s %s" % (req.method, req.path)
            data = {"ver": 2, "id": req.request_id or str(uuid.uuid4()), "name": name,
                    "duration": _ai_duration(duration_ms), "responseCode": str(status), "success": status < 400,
                    "url": _clip("http://%s%s" % (host, req.full_target), _AI_MAX_URL), "properties": props}
            self._put(self._envelope("Request", "RequestData", data, req.start_wall, req.request_id, name))
        except Exception as exc:
            self._warn_once("build-request", "Telemetry: cannot record a request: %s: %s", type(exc).__name__, exc)

    def track_exception(self, exc, req, info):
        """run() failed (``info`` from describe_exception) or timed out (``info`` may be None);
        ``req`` None: the script failed at start-up (import or init()), as the reference reports it."""
        if not self.enabled:
            return
        try:
            if info is None:
                info = {"type": type(exc).__name__, "text": str(exc), "frames": []}
            frames = list(reversed(info.get("frames") or []))  # innermost first, as the API expects
            parsed = [{"level": level, "method": frame.get("function") or "<module>", "assembly": "",
                       "fileName": frame["file"], "line": frame.get("line") or 0}
                      for level, frame in enumerate(frames)]
            detail = {"id": 1, "outerId": 0, "typeName": info["type"],
                      "message": _clip(str(info["text"]), _AI_MAX_MESSAGE), "hasFullStack": False,
                      "parsedStack": parsed}
            if req is None:
                props, name, request_id = {"Container Id": self._container_id}, "start-up", None
            else:
                props, name, request_id = self._properties(req), "%s %s" % (req.method, req.path), req.request_id
            data = {"ver": 2, "exceptions": [detail], "severityLevel": 3, "properties": props}
            self._put(self._envelope("Exception", "ExceptionData", data, time.time(), request_id, name))
        except Exception as err:
            self._warn_once("build-exception", "Telemetry: cannot record an exception: %s: %s",
                            type(err).__name__, err)

    def track_trace(self, record):
        """A log record (print() or logging in the user's code) as a Message record."""
        if not self.enabled or self._closing or getattr(record, "_azmlinfsrv_traced", False):
            return
        name = record.name
        if not isinstance(name, str) or ((name == "azmlinfsrv" or name.startswith("azmlinfsrv."))
                                         and name not in _AI_TRACED_LOGGERS):
            return  # the server's own log lines stay in the log
        if threading.current_thread() is self._thread:
            return  # whatever the upload itself logs must not feed the queue
        record._azmlinfsrv_traced = True
        request_id = getattr(_context, "request_id", None)
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        props = {"Container Id": self._container_id, "Logger": name, "Level": record.levelname}
        if request_id:
            props["Request Id"] = request_id
        data = {"ver": 2, "message": _clip(message, _AI_MAX_MESSAGE), "severityLevel": _ai_severity(record.levelno),
                "properties": props}
        self._put(self._envelope("Message", "MessageData", data, record.created, request_id))

    def track_model_data(self, req, kwargs, result, script):
        """With AML_MODEL_DC_STORAGE_ENABLED: run()'s input and output, as the reference logs them."""
        if not self.enabled or not self.config.model_dc_storage:
            return
        try:
            if script.mode in ("text", "raw"):
                model_input = kwargs.get(script.data_param)
            else:
                model_input = {k: v for k, v in kwargs.items() if k != "request_headers"}
            props = self._properties(req)
            props.update({"Workspace Name": self.config.workspace_name, "Service Name": self.config.service_name,
                          "Models": json.dumps(self._models), "Input": _json_property(model_input),
                          "Prediction": _json_property(result)})
            data = {"ver": 2, "message": "model_data_collection", "severityLevel": 1, "properties": props}
            self._put(self._envelope("Message", "MessageData", data, time.time(), req.request_id))
        except Exception as exc:
            self._warn_once("build-model-data", "Telemetry: cannot record model data: %s: %s",
                            type(exc).__name__, exc)

    def _properties(self, req):
        return {"Container Id": self._container_id, "Request Id": req.request_id or "",
                "Client Request Id": req.client_request_id or ""}

    def _envelope(self, kind, base_type, data, epoch, request_id, operation=None):
        tags = dict(self._tags)
        if request_id:
            tags["ai.operation.id"] = request_id
            if kind != "Request":
                tags["ai.operation.parentId"] = request_id  # nests under the request's record
        if operation:
            tags["ai.operation.name"] = operation
        return {"name": self._names[kind], "time": _ai_time(epoch), "iKey": self.ikey, "tags": tags,
                "data": {"baseType": base_type, "baseData": data}}

    def _put(self, envelope):
        full = False
        with self._lock:
            queue = self._queue
            if len(queue) >= self._cap:
                queue.popleft()
                self.dropped += 1
                full = True
            queue.append(envelope)
            waiting = len(queue)
        if full:
            self._warn_once("queue-full", "Telemetry: %d items wait for the collector; dropping the oldest "
                            "(counted in azmlinfsrv_telemetry_items_dropped_total).", self._cap)
        if waiting >= _AI_BATCH and not self._backing_off and not self._wake.is_set():
            self._wake.set()

    def _warn_once(self, key, message, *args):
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message + " (said once)", *args)

    # -- delivery: the background thread ---------------------------------------------
    def _run(self):
        while not self._closing:
            wait = self._interval
            if self._retry:
                wait = max(0.0, self._next_try - time.monotonic())
            self._wake.wait(wait)
            self._wake.clear()
            if self._closing:
                break
            if self._retry and time.monotonic() < self._next_try:
                continue
            try:
                self._pump()
            except Exception as exc:  # a bug of ours must not end delivery
                self._warn_once("sender", "Telemetry: upload failed: %s: %s", type(exc).__name__, exc)
        self._drain()

    def _take(self):
        if self._retry:
            batch, self._retry = self._retry, []
            return batch
        with self._lock:
            queue = self._queue
            return [queue.popleft() for _ in range(min(_AI_BATCH, len(queue)))]

    def _pump(self, deadline=None):
        """Upload batches until the queue is empty (True) or an upload must be retried later (False)."""
        while not (self._closing and deadline is None):
            batch = self._take()
            if not batch:
                return True
            if not self._upload(batch, deadline):
                return False
        return True

    def _drain(self):
        """On close: send what is queued until done, a failure that cannot wait, or the deadline."""
        deadline = self._close_deadline or time.monotonic()
        while time.monotonic() < deadline:
            try:
                if self._pump(deadline):
                    break
            except Exception:
                break
            pause = self._next_try - time.monotonic()
            if time.monotonic() + pause >= deadline:
                break
            time.sleep(max(0.0, pause))
        with self._lock:
            left = len(self._queue) + len(self._retry)
            self._queue.clear()
            self._retry = []
            self.dropped += left
        if left:
            logger.warning("Telemetry: %d item(s) not delivered at shutdown.", left)

    def _upload(self, batch, deadline=None):
        """POST one batch; True when it is settled (sent or dropped), False when it waits to be retried."""
        timeout = self._timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                self._retry = batch
                return False
        parts = []
        for n, item in enumerate(batch):  # item by item, yielding the GIL: scoring threads never wait long
            parts.append(json.dumps(item, default=str, separators=(",", ":")))
            if n % 10 == 9:
                time.sleep(0)
        body = gzip.compress(("[" + ",".join(parts) + "]").encode("utf-8"), 6)
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json; charset=utf-8", "Content-Encoding": "gzip",
            "Accept": "application/json"})
        retry_after = location = None
        try:
            with self._opener.open(request, timeout=timeout) as resp:
                status = resp.status
                text = resp.read(1 << 20)
        except urllib.request.HTTPError as exc:
            status = exc.code
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            location = exc.headers.get("Location") if exc.headers else None
            try:
                text = exc.read(1 << 20)
            except Exception:
                text = b""
            exc.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, reset, timed out, DNS
            reason = getattr(exc, "reason", exc)
            self._warn_once(("network", type(reason).__name__), "Telemetry: cannot reach %s (%s: %s); will retry "
                            "with backoff", self.destination, type(reason).__name__, reason)
            return self._later(batch, None)

        if status in (307, 308) and location and self._redirects < _AI_MAX_REDIRECTS:
            self._redirects += 1  # the ingestion service moved this resource: follow for this process
            self.url = urllib.parse.urljoin(self.url, location)
            return self._upload(batch, deadline)
        self._redirects = 0
        if 200 <= status < 300 and status != 206:
            self._settled(len(batch), 0)
            return True
        if status == 206:
            retry, lost = self._partial(batch, text)
            self._settled(len(batch) - len(retry) - lost, lost)
            return self._later(retry, retry_after) if retry else True
        if status in _AI_RETRY_STATUSES:
            self._warn_once(("status", status), "Telemetry: the collector answered %d; will retry with backoff",
                            status)
            return self._later(batch, retry_after)
        self._warn_once(("status", status), "Telemetry: the collector answered %d (%s); dropped the batch",
                        status, text[:200].decode("utf-8", "replace"))
        self._settled(0, len(batch))
        return True

    def _partial(self, batch, text):
        """206: (items to resend, items the collector refused for good)."""
        try:
            errors = json.loads(text.decode("utf-8"))["errors"]
            retry, lost, seen = [], 0, set()
            for error in errors:
                index = int(error["index"])
                if not 0 <= index < len(batch) or index in seen:
                    continue
                seen.add(index)
                code = int(error.get("statusCode", 0))
                if code in _AI_RETRY_STATUSES:
                    retry.append(batch[index])
                else:
                    lost += 1
                    self._warn_once(("item", code), "Telemetry: the collector refused an item with %d (%s)",
                                    code, error.get("message", ""))
            return retry, lost
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self._warn_once("partial-body", "Telemetry: cannot read the collector's 206 answer (%s); not "
                            "resending", exc)
            return [], 0

    def _settled(self, sent, lost):
        self._failures = 0
        self._backing_off = False
        with self._lock:
            self.sent += sent
            self.dropped += lost

    def _later(self, batch, retry_after):
        """Keep ``batch`` for one more try after Retry-After or an exponential backoff."""
        self._retry = batch
        self._failures += 1
        self._backing_off = True
        delay = min(_AI_MAX_BACKOFF, self._interval * 2 ** min(self._failures - 1, 16))
        asked = _retry_after_seconds(retry_after)
        if asked is not None:
            delay = min(asked, _AI_MAX_RETRY_AFTER)
        self._next_try = time.monotonic() + delay
        return False

    def close(self, timeout=5.0):
        """Stop taking items and flush what is queued, waiting at most ``timeout`` seconds."""
        if not self.enabled or self._closing:
            return
        if logging.getLogRecordFactory() is self._record_factory:  # else someone wrapped it: it stays, idle
            logging.setLogRecordFactory(self._previous_factory)
        self._close_deadline = time.monotonic() + max(0.0, timeout)
        self._closing = True
        self._wake.set()
        self._thread.join(max(0.0, timeout) + 0.5)


###############################################################################
# Metrics: Prometheus text format at GET /metrics
###############################################################################

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    __slots__ = ("counts", "total", "count")

    def __init__(self):
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds):
        self.counts[bisect.bisect_left(_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


class Metrics:
    """Counters and histograms; cheap to update, rendered on demand."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # (route, status) -> n
        self.durations = collections.defaultdict(_Histogram)  # route -> histogram
        self.run_duration = _Histogram()
        self.counters = collections.Counter()  # timeouts, run_errors, rejected, reloads, reload_failures
        self.workers = 0
        self.pool = None
        self.started = time.time()

    def count_request(self, route, status, seconds):
        with self._lock:
            self.requests[(route, status)] += 1
            self.durations[route].observe(seconds)

    def observe_run(self, seconds):
        with self._lock:
            self.run_duration.observe(seconds)

    def count(self, name, n=1):
        with self._lock:
            self.counters[name] += n

    def render(self, app):
        out = []

        def family(name, kind, help_text):
            out.append("# HELP %s %s" % (name, help_text))
            out.append("# TYPE %s %s" % (name, kind))

        def histogram(name, labels, hist):
            cumulative = 0
            for bound, n in zip(_BUCKETS + (float("inf"),), hist.counts):
                cumulative += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append('%s_bucket{%sle="%s"} %d' % (name, labels, le, cumulative))
            out.append("%s_sum{%s} %s" % (name, labels.rstrip(","), repr(hist.total)) if labels
                       else "%s_sum %s" % (name, repr(hist.total)))
            out.append("%s_count{%s} %d" % (name, labels.rstrip(","), hist.count) if labels
                       else "%s_count %d" % (name, hist.count))

        with self._lock:
            family("azmlinfsrv_requests_total", "counter", "HTTP requests answered, by route and status.")
            for (route, status), n in sorted(self.requests.items()):
                out.append('azmlinfsrv_requests_total{route="%s",status="%d"} %d' % (_label(route), status, n))
            family("azmlinfsrv_request_duration_seconds", "histogram", "Time from request read to answer sent.")
            for route, hist in sorted(self.durations.items()):
                histogram("azmlinfsrv_request_duration_seconds", 'route="%s",' % _label(route), hist)
            family("azmlinfsrv_run_duration_seconds", "histogram", "Time run() took.")
            histogram("azmlinfsrv_run_duration_seconds", "", self.run_duration)
            counters = dict(self.counters)
        family("azmlinfsrv_requests_in_flight", "gauge", "Requests being handled now.")
        out.append("azmlinfsrv_requests_in_flight %d" % app.in_flight)
        family("azmlinfsrv_queue_depth", "gauge", "Requests waiting for a worker.")
        out.append("azmlinfsrv_queue_depth %d" % (self.pool.queued if self.pool else 0))
        family("azmlinfsrv_workers", "gauge", "run() calls that may execute at once (worker_count).")
        out.append("azmlinfsrv_workers %d" % self.workers)
        family("azmlinfsrv_workers_busy", "gauge", "Workers executing run() now.")
        out.append("azmlinfsrv_workers_busy %d" % (self.pool.busy if self.pool else 0))
        for name, help_text in (("timeouts", "run() calls that exceeded SCORING_TIMEOUT_MS."),
                                ("run_errors", "run() calls that raised."),
                                ("rejected", "Requests answered 503 because the queue was full."),
                                ("rejected_connections", "Connections answered 503 because max_connections "
                                                         "were open."),
                                ("reloads", "Successful script reloads."),
                                ("reload_failures", "Script reloads that failed.")):
            family("azmlinfsrv_%s_total" % name, "counter", help_text)
            out.append("azmlinfsrv_%s_total %d" % (name, counters.get(name, 0)))
        family("azmlinfsrv_telemetry_items_sent_total", "counter", "Telemetry items accepted by the collector.")
        out.append("azmlinfsrv_telemetry_items_sent_total %d" % getattr(app.telemetry, "sent", 0))
        family("azmlinfsrv_telemetry_items_dropped_total", "counter", "Telemetry items dropped.")
        out.append("azmlinfsrv_telemetry_items_dropped_total %d" % getattr(app.telemetry, "dropped", 0))
        family("azmlinfsrv_build_info", "gauge", "Always 1; the labels say what is running.")
        out.append('azmlinfsrv_build_info{version="%s",python="%s"} 1' % (
            _label(__version__), _label(sys.version.split()[0])))
        family("azmlinfsrv_uptime_seconds", "gauge", "Seconds since the server started.")
        out.append("azmlinfsrv_uptime_seconds %.3f" % (time.time() - self.started))
        return "\n".join(out) + "\n"


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


###############################################################################
# Server: sockets, connection threads, start-up, reload, drain, pre-fork
###############################################################################


class Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections, reused connection threads and a drain.

    Idle keep-alive connections hold a connection thread, never a run() worker.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address, app, bind_and_activate=True, sock=None):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.app = app
        self.config = app.config
        self._conn_lock = threading.Lock()
        self._open = {}  # socket -> its _Handler (None until the handler starts)
        self._idle_threads = 0
        self._handoff = queue.SimpleQueue()
        if sock is not None:
            http.server.HTTPServer.__init__(self, address, _Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
            host, port = self.server_address[:2]
            self.server_name, self.server_port = socket.getfqdn(host), port
        else:
            http.server.HTTPServer.__init__(self, address, _Handler, bind_and_activate)

    def server_bind(self):
        socketserver_bind = http.server.socketserver.TCPServer.server_bind
        socketserver_bind(self)  # skip HTTPServer's getfqdn(), which can stall on a DNS lookup
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    def process_request(self, sock, client_address):
        with self._conn_lock:
            if len(self._open) >= self.config.max_connections:
                self._reject(sock)
                return
            self._open[sock] = None
            if self._idle_threads:
                self._idle_threads -= 1
                self._handoff.put((sock, client_address))
                return
        threading.Thread(target=self._connection_thread, args=(sock, client_address),
                         name="azmlinfsrv-conn", daemon=True).start()

    def _reject(self, sock):
        body = _json_body("Too many open connections (limit %d). Retry later." % self.config.max_connections)
        try:
            sock.settimeout(0.5)
            sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            # FIN first, and drop the request already received: closing with unread input would
            # reset the connection and could destroy the answer. No waiting on the accept thread.
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            for _ in range(16):
                if not sock.recv(65536):
                    break
        except OSError:
            pass
        self.app.metrics.count("rejected_connections")
        self.shutdown_request(sock)

    def track(self, sock, handler):
        with self._conn_lock:
            if sock in self._open:
                self._open[sock] = handler

    def _connection_thread(self, sock, client_address):
        while True:
            try:
                self.finish_request(sock, client_address)
            except Exception:
                logger.exception("Unexpected error on a connection from %s", client_address)
            finally:
                with self._conn_lock:
                    self._open.pop(sock, None)
                self.shutdown_request(sock)
            with self._conn_lock:
                self._idle_threads += 1
            try:
                sock, client_address = self._handoff.get(timeout=60)
                continue
            except queue.Empty:
                pass
            with self._conn_lock:
                try:
                    sock, client_address = self._handoff.get_nowait()
                except queue.Empty:
                    self._idle_threads -= 1
                    return

    def close_idle_connections(self):
        """Wake connections waiting for a next request so that they close (drain).

        Connections with a request in flight are left alone: they close after their answer.
        """
        with self._conn_lock:
            socks = [sock for sock, handler in self._open.items() if handler is None or not handler.busy]
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    @property
    def busy_connections(self):
        """Connections between the start of a request and the end of its answer."""
        with self._conn_lock:
            return sum(1 for handler in self._open.values() if handler is not None and handler.busy)


class _UtcFormatter(logging.Formatter):
    """The reference's log format, in UTC; the date part is formatted once a second."""

    converter = time.gmtime
    _second = -1
    _text = ""

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
            self._second = second
        return "%s,%03d" % (self._text, record.msecs)


_LOG_FORMAT = "%(asctime)s %(levelname).1s [%(process)d] %(name)s - %(message)s"


class _AMLLogFormatter(_UtcFormatter):
    """``azureml_inference_server_http.log_config.AMLLogFormatter``: the reference's format, UTC, for logging.json."""

    def __init__(self, fmt=_LOG_FORMAT, datefmt=None, style="%", *args, **kwargs):
        super().__init__(fmt, datefmt, style, *args, **kwargs)

    def formatTime(self, record, datefmt=None):
        if datefmt or self.datefmt:
            return logging.Formatter.formatTime(self, record, datefmt or self.datefmt)
        return super().formatTime(record)


class _RootAccessFilter(logging.Filter):
    """``azureml_inference_server_http.log_config.RootAccessFilter``: drops access lines of the liveness probe."""

    def filter(self, record):
        message = record.getMessage()
        return "GET / HTTP/1.1" not in message and not message.startswith("GET / ")


class _LogPump(logging.Handler):
    """Writes log lines from a background thread, many per flush.

    Request threads only put the record on a queue: no handler lock for 64
    threads to queue on, and a slow stdout (a pipe nobody reads fast) never
    stalls scoring.
    """

    def __init__(self, target="stdout"):
        super().__init__()
        self.target = target
        self.stream = getattr(sys, target)  # the stream current now (see _stream)
        self._start()
        if hasattr(os, "register_at_fork"):  # a forked worker needs its own pump thread
            os.register_at_fork(after_in_child=self._start)

    def _start(self):
        self._records = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._pump, name="azmlinfsrv-log", daemon=True)
        self._thread.start()

    def handle(self, record):
        if self.filter(record):
            self._records.put(record)
            return True
        return False

    emit = handle

    def _pump(self):
        records = self._records
        while True:
            batch = [records.get()]
            while len(batch) < 1000:
                try:
                    batch.append(records.get_nowait())
                except queue.Empty:
                    break
            lines = []
            for record in batch:
                if isinstance(record, threading.Event):
                    continue
                try:
                    lines.append(self.format(record))
                except Exception:
                    self.handleError(record)
            try:
                if lines:
                    stream = self._stream()
                    stream.write("\n".join(lines) + "\n")
                    stream.flush()
            except Exception:
                pass
            for record in batch:
                if isinstance(record, threading.Event):
                    record.set()

    def _stream(self):
        # Bound to the stream of its creation; if a test runner closed that one, use the current one.
        if getattr(self.stream, "closed", False):
            self.stream = getattr(sys, self.target)
        return self.stream

    def retarget(self, target):
        """Write to sys.stdout or sys.stderr from now on (``--check`` keeps stdout for its report)."""
        self.flush()
        self.target = target
        self.stream = getattr(sys, target)

    def flush(self, timeout=2.0):
        """Wait until every line queued so far is written."""
        if threading.current_thread() is self._thread:
            return
        marker = threading.Event()
        self._records.put(marker)
        marker.wait(timeout)


def _flush_logs():
    for handler in logger.handlers:
        if isinstance(handler, _LogPump):
            handler.flush()


def _configure_logging(config, script_path=None):
    """The reference's log format (UTC), or the app's logging.json when there is one."""
    _install_compat_modules()  # a logging.json written for the reference names its classes: they must resolve
    for folder in (config.app_root, os.path.dirname(script_path) if script_path else None):
        if folder and os.path.isfile(os.path.join(folder, "logging.json")):
            path = os.path.join(folder, "logging.json")
            try:
                with open(path, encoding="utf-8") as handle:
                    logging.config.dictConfig(json.load(handle))
            except (ValueError, TypeError, AttributeError, ImportError, OSError) as exc:
                raise StartupError("Cannot use logging config %s: %s" % (path, exc))
            logger.info("Loaded logging config from %s", path)
            return
    level = logging.getLevelName(str(config.log_level).upper())
    if not isinstance(level, int):
        raise StartupError("AZUREML_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not %r"
                           % config.log_level)
    if not any(getattr(h, "_azmlinfsrv", False) for h in logger.handlers):
        handler = _LogPump()
        handler.setFormatter(_UtcFormatter(_LOG_FORMAT))
        handler._azmlinfsrv = True
        logger.addHandler(handler)
        logger.propagate = False
        atexit.register(_flush_logs)
    logger.setLevel(level)


def _resolve_entry_script(config):
    """The entry script's real path; with a config file but no entry script, main.py in the app root."""
    entry = config.entry_script
    if entry:
        return os.path.realpath(os.path.join(config.app_root, entry))
    if not config.config_file:
        raise StartupError("Either provide an entry_script using --entry_script or provide a path to the "
                           "configuration file using --config_file. (No entry script: give --entry_script, set "
                           "AZUREML_ENTRY_SCRIPT, or put it in a config file.)", EXIT_USAGE)
    main = os.path.join(config.app_root, "main.py")  # the reference's default score script
    if not os.path.isfile(main):
        if os.path.isdir(config.app_root):
            contents = "Current contents of AML_APP_ROOT: %s" % sorted(os.listdir(config.app_root))
        else:
            contents = "The directory %s not an accessible directory in the container." % config.app_root
        raise StartupError("No score script found. Expected score script main.py.\n"
                           "Expected script to be found in PYTHONPATH: %s\n%s\n"
                           "No AZUREML_ENTRY_SCRIPT in %s and no main.py in the app root %s."
                           % (sys.path, contents, config.config_file, config.app_root))
    return os.path.realpath(main)


def _prepare_environment(config, script_path, ports=None, telemetry_on=False):
    """What the script may read at import: the reference's exported settings, and sys.path.

    The reference writes its effective settings into the environment before it
    imports the script (defaults included), and scripts read them; the same
    variables with the same values here.  ``ports`` is (serving port, health
    port or None) as bound.
    """
    env = os.environ
    if not env.get("AML_APP_ROOT"):  # a set one is left as it is (an empty one means unset, as for the config)
        env["AML_APP_ROOT"] = config.app_root
    if config.entry_script:  # the main.py fallback leaves it unset, as the reference
        env["AZUREML_ENTRY_SCRIPT"] = script_path
    if config.model_dir:
        env["AZUREML_MODEL_DIR"] = config.model_dir
    env["WORKER_COUNT"] = str(config.worker_count)
    if ports:
        env["SERVER_PORT"] = str(ports[0])
        env["HEALTH_PORT"] = str(ports[1] or ports[0])
    env["TRANSPORT_PROTOCOL"] = "grpc"  # sic: the reference exports this value for its REST server
    if str(config.server_version_header).strip().lower() == "true":
        env["HTTP_X_MS_SERVER_VERSION"] = "azmlinfsrv/" + __version__
    if config.cors_origins:
        env["AML_CORS_ORIGINS"] = config.cors_origins
    if config.config_file and config.sources.get("config_file") == "command line":
        env["AZUREML_CONFIG_FILE"] = os.path.realpath(config.config_file)
    if config.appinsights_key and config.sources.get("appinsights_key") == "command line":
        env["AML_APP_INSIGHTS_KEY"] = config.appinsights_key
    env["AML_APP_INSIGHTS_ENABLED"] = "true" if telemetry_on else "false"  # true only when telemetry is on
    paths = [config.app_root]
    if config.source_dir:
        paths.append(os.path.abspath(os.path.join(config.app_root, config.source_dir)))
    paths.append(os.path.dirname(script_path))
    for path in paths:
        if path not in sys.path:
            sys.path.append(path)


def load_script(config, pool=None, ports=None, telemetry=None, banner=False):
    """Import the entry script, check run(), call init() (on a pool thread); StartupError on any failure.

    Before the import: the environment as the reference exports it and, with
    ``banner``, the reference's start-up lines; ``telemetry`` (started by the
    caller) already traces what the import and init() print and log.
    """
    script_path = _resolve_entry_script(config)
    _prepare_environment(config, script_path, ports, bool(telemetry and telemetry.enabled))
    if banner:
        _reference_banner(config, telemetry)
    logger.info("Starting up app insights client")  # the reference's line (its e2e tests look for it)
    _install_compat_modules()
    script = Script(script_path, config.app_root, config.source_dir).load()
    _user_logger.info("Found user script at %s", script.path)
    _user_logger.info({
        "text": "run() is not decorated. Server will invoke it with the input in JSON string.",
        "raw": "run() is decorated with @rawhttp. Server will invoke it with the request object.",
        "schema": "run() is decorated with @input_schema. Server will invoke it with the following arguments: "
                  + ", ".join(p.name for p in script.schema_params) + "."}[script.mode])
    _user_logger.info("Invoking user's init function")
    if pool is not None:
        pool.call(script.call_init)
    else:
        script.call_init()
    _user_logger.info("Users's init has completed successfully")
    swagger_documents(script, config)
    logger.info("Scoring timeout is set to %s", config.scoring_timeout_ms)
    return script


class _Reloader(threading.Thread):
    """Polls the script's .py files; on a change loads the new version while the old one serves.

    Polling (one ``os.walk`` and a ``stat`` per file each ``interval``) needs no
    platform API and costs about 2 ms of CPU per scan of 500 files.  A failed
    reload leaves ``app.script_error`` set, so /score answers 503 with the
    diagnostics until a later save loads cleanly.
    """

    def __init__(self, app, interval=1.0, settle=0.2):
        super().__init__(name="azmlinfsrv-reload", daemon=True)
        self.app = app
        self.interval = interval
        self.settle = settle  # an editor may save in several writes: wait for a quiet tree
        self.stopped = threading.Event()
        self._snapshot = self._scan()

    def _scan(self):
        stamps = {}
        for path in self.app.script.watched_files():
            try:
                stat = os.stat(path)
                stamps[path] = (stat.st_mtime_ns, stat.st_size)
            except OSError:
                pass
        return stamps

    def run(self):
        while not self.stopped.wait(self.interval):
            try:
                snapshot = self._scan()
                if snapshot == self._snapshot:
                    continue
                for _ in range(10):
                    if self.stopped.wait(self.settle):
                        return
                    again = self._scan()
                    if again == snapshot:
                        break
                    snapshot = again
                old = self._snapshot
                changed = sorted(p for p in set(snapshot) | set(old) if snapshot.get(p) != old.get(p))
                self._snapshot = snapshot
                self.reload(changed)
            except Exception:  # the watcher must outlive any surprise
                logger.exception("The reloader hit an unexpected error; it keeps watching.")

    def reload(self, changed=()):
        """Load and init() the script again; swap it in on success.  Returns True if it loaded."""
        app = self.app
        old = app.script
        reason = ", ".join(_relative_to_roots(p, old.roots) for p in changed[:3]) or "a file"
        if len(changed) > 3:
            reason += " and %d more" % (len(changed) - 3)
        for name, module in list(sys.modules.items()):  # the app's helper modules load afresh too
            path = getattr(module, "__file__", None) or ""
            if path and path != _HERE and _is_user_file(path, old.roots) and not name.startswith("azmlinfsrv"):
                sys.modules.pop(name, None)
        linecache.checkcache()  # diagnostics must quote the saved source, not a cached copy
        start = time.perf_counter()
        new = Script(old.path, old.app_root, app.config.source_dir)
        try:
            new.load()
            app.pool.call(new.call_init)
            swagger_documents(new, app.config)
        except StartupError as exc:
            info = _reload_error(exc, new)
            app.script_error = info
            self._forget_entry_modules(app.script)
            app.metrics.count("reload_failures")
            logger.error("Reload failed (%s changed): %s; /score answers 503 until the next save fixes it.",
                         reason, _one_line_diagnosis(info))
            return False
        app.script = new
        app.script_error = None
        self._forget_entry_modules(new)
        app.metrics.count("reloads")
        logger.info("Reloaded %s (%s changed): init() ran in %.0f ms; /score serves the new version.",
                    _relative_to_roots(new.path, new.roots), reason, (time.perf_counter() - start) * 1000.0)
        return True

    @staticmethod
    def _forget_entry_modules(keep):
        """Drop earlier versions of the entry module from sys.modules (the one serving stays)."""
        keep_name = keep.module.__name__ if keep.module is not None else None
        for name in [n for n in sys.modules if n.startswith("azmlinfsrv_entry_") and n != keep_name]:
            sys.modules.pop(name, None)


def _reload_error(exc, script):
    """The 503 body's ``error``: type, text, message and a location (file and line) in every case."""
    info = dict(exc.diagnostics or script.locate(exc.message))
    info["message"] = exc.message
    return info


def _one_line_diagnosis(info):
    """``file, line N: Type: text [source] (via file, line M)`` for a single log line."""
    loc = info.get("location") or {}
    text = "%s: %s" % (info.get("type"), info.get("text"))
    if info.get("type") == "ScriptError":
        text = str(info.get("text")).rstrip(".")
    where = str(loc.get("file", "?"))
    if loc.get("line"):
        where += ", line %s" % loc["line"]
    line = "%s: %s" % (where, text)
    if loc.get("source"):
        line += " [%s]" % loc["source"]
    frames = info.get("frames") or []
    if len(frames) > 1 and frames[0].get("file") != loc.get("file"):
        line += " (via %s, line %s)" % (frames[0].get("file"), frames[0].get("line"))
    return line


def _bind(config, host=None, port=None):
    host = config.host if host is None else host
    port = config.port if port is None else port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if _IS_POSIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(Server.request_queue_size)
        # Non-blocking: with --processes every worker's selector wakes for one connection; the losers'
        # accept() must return at once instead of blocking (and so blocking shutdown) until the next one.
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError("Port %s is already in use on %s: stop the other server or pick another "
                               "--port." % (port, host), EXIT_USAGE)
        raise StartupError("Cannot listen on %s:%s: %s" % (host, port, exc), EXIT_USAGE)
    return sock


def _human_size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024.0


def _model_dir_lines(path, limit=8):
    """The model directory's first entries as an indented tree with sizes, for the banner."""
    if not path:
        return []
    if not os.path.isdir(path):
        return ["    (%s)" % ("not a directory" if os.path.exists(path) else "does not exist")]
    lines, total = [], 0
    for folder, dirs, names in os.walk(path):
        dirs.sort()
        rel = os.path.relpath(folder, path)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        if depth:
            total += 1
            if len(lines) < limit:
                lines.append("  " + "  " * depth + os.path.basename(folder) + "/")
        for name in sorted(names):
            total += 1
            if len(lines) < limit:
                try:
                    size = _human_size(os.path.getsize(os.path.join(folder, name)))
                except OSError:
                    size = "?"
                lines.append("  " + "  " * (depth + 1) + "%s  (%s)" % (name, size))
        if total > 10000:
            break
    if not lines:
        return ["    (empty)"]
    if total > len(lines):
        lines.append("    ... and %d more" % (total - len(lines)))
    return lines


#: The reference's "Server Settings" block: label, and the environment variable whose value it shows.
_REFERENCE_SETTINGS = (
    ("Entry Script Name", "AZUREML_ENTRY_SCRIPT"), ("Model Directory", "AZUREML_MODEL_DIR"),
    ("Config File", "AZUREML_CONFIG_FILE"), ("Worker Count", "WORKER_COUNT"),
    ("Worker Timeout (seconds)", "WORKER_TIMEOUT"), ("Server Port", "SERVER_PORT"), ("Health Port", "HEALTH_PORT"),
    ("Application Insights Enabled", "AML_APP_INSIGHTS_ENABLED"), ("Application Insights Key", "AML_APP_INSIGHTS_KEY"),
    ("Inferencing HTTP server version", "HTTP_X_MS_SERVER_VERSION"),
    ("CORS for the specified origins", "AML_CORS_ORIGINS"),
    ("Create dedicated endpoint for health", "SEPERATE_HEALTH_ENDPOINT"),
)


def _reference_banner(config, telemetry=None):
    """The reference's start-up lines, verbatim (log scrapers and its docs look for them), from the exported
    environment, before the script is imported; ours follow once it has loaded (_banner)."""
    env = os.environ
    lines = []
    if "AZUREML_MODEL_DIR" not in env:
        lines += ["The environment variable 'AZUREML_MODEL_DIR' has not been set.",
                  "Use the --model_dir command line argument to set it."]
    if config.appinsights_enabled and config.appinsights_key:
        if telemetry is not None and telemetry.enabled:
            lines.append("Valid Application Insights instrumentation key provided.")
        else:
            lines += ["Invalid Application Insights instrumentation key provided.",
                      "Application Insights has been disabled."]
    lines += ["", "Azure ML Inferencing HTTP server v%s" % __version__, "", "", "Server Settings", "---------------"]
    for label, name in _REFERENCE_SETTINGS:
        value = str(env.get(name))
        if name == "AML_APP_INSIGHTS_KEY" and name in env:
            value = "AppInsights key provided"
        elif name == "AML_CORS_ORIGINS" and name in env:
            value = "Enabling CORS for %s" % env[name]
        lines.append("%s: %s" % (label, value))
    lines += ["", "", "Server Routes", "---------------",
              "Liveness Probe: GET   127.0.0.1:%s/" % env.get("HEALTH_PORT"),
              "Score:          POST  127.0.0.1:%s/score" % env.get("SERVER_PORT"), ""]
    _flush_logs()
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _banner(config, app, address, health_address=None):
    _flush_logs()
    host, port = address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    shown = "[%s]" % shown if ":" in shown else shown
    lines = [
        "",
        "azmlinfsrv v%s, standard-library edition: %s is loaded" % (__version__, os.path.basename(app.script.path)),
        "",
        "Python:       %s (%s)" % (sys.executable, sys.version.split()[0]),
        "App root:     %s" % config.app_root,
        "Entry script: %s" % app.script.path,
        "Model dir:    %s" % (config.model_dir or os.environ.get("AZUREML_MODEL_DIR") or "(not set)"),
    ]
    lines += _model_dir_lines(config.model_dir or os.environ.get("AZUREML_MODEL_DIR"))
    lines += [
        "Workers:      %d run() at once, queue %d, timeout %d ms%s" % (
            config.worker_count, config.max_queue, config.scoring_timeout_ms,
            ", %d processes" % config.processes if config.processes > 1 else ""),
        "Telemetry:    %s" % (("on, to " + app.telemetry.destination) if app.telemetry.enabled else "off"),
        "Reload:       %s" % ("on (watching %d .py files under %s)" % (
            len(app.script.watched_files()), ", ".join(app.script.roots)) if config.reload else "off"),
        "",
        "Settings from the command line, environment or config file:",
    ]
    for name, value, source in app.config.describe():
        if source != "default":
            lines.append("  %-36s %s  [%s]" % (name, value, source))
    lines += [
        "",
        "Routes:",
        "  Liveness probe: GET  http://%s:%s/" % (shown, health_address[1] if health_address else port),
        "  Score:          POST http://%s:%s/score" % (shown, port),
        "  Swagger:        GET  http://%s:%s/swagger.json" % (shown, port),
    ]
    if config.metrics:
        lines.append("  Metrics:        GET  http://%s:%s/metrics" % (shown, port))
    lines += ["", "Try:  curl -d '{\"x\": 1}' http://%s:%s/score" % (shown, port), ""]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


class _Instance:
    """One running server in this process: app, listener(s), serving threads, reloader."""

    def __init__(self, config, sock, health_sock=None, banner=False):
        # Telemetry first: what the script prints and logs at import and in init() reaches App Insights too.
        telemetry = Telemetry(config)
        pool = _RunPool(config.worker_count, config.max_queue)
        port = sock.getsockname()[1]
        health_port = config.health_port if config.health_port and config.health_port != port else None
        try:
            script = load_script(config, pool, (port, health_port), telemetry, banner)
        except BaseException as exc:
            if isinstance(exc, StartupError) and exc.traceback_text and exc.diagnostics:
                telemetry.track_exception(exc, None, exc.diagnostics)  # the import or init() raised
            telemetry.close(timeout=5.0)  # what the import or init() logged before failing still goes out
            pool.stop()
            raise
        self.config = config
        self.health = None
        try:
            self.app = App(config, script, telemetry, pool=pool)
            self.server = Server((config.host, config.port), self.app, sock=sock)
            if config.health_port and config.health_port != self.server.server_address[1]:
                health_app = App.__new__(App)
                health_app.__dict__.update(self.app.__dict__)
                health_app.routes = {"/": self.app.health}
                self.health = Server((config.host, config.health_port), health_app,
                                     sock=health_sock or _bind(config, port=config.health_port))
            self.reloader = _Reloader(self.app) if config.reload else None
        except BaseException:  # e.g. the health port is taken: stop the threads started so far
            telemetry.close(timeout=0)
            pool.stop()
            raise
        self._threads = []

    @property
    def address(self):
        return self.server.server_address

    def start(self):
        for server in (self.server, self.health):
            if server is not None:
                thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                          name="azmlinfsrv-accept", daemon=True)
                thread.start()
                self._threads.append(thread)
        if self.reloader:
            self.reloader.start()
        return self

    def drain(self, grace):
        """Stop taking work, let requests in flight finish (up to ``grace`` s), flush, close."""
        app = self.app
        app.draining = True
        if self.reloader:
            self.reloader.stopped.set()
        deadline = time.monotonic() + grace
        self.server.close_idle_connections()
        while (app.in_flight > 0 or self.server.busy_connections) and time.monotonic() < deadline:
            time.sleep(0.02)
        unfinished = max(app.in_flight, self.server.busy_connections)
        for server in (self.server, self.health):
            if server is not None:
                server.shutdown()
                server.server_close()
        app.telemetry.close(timeout=max(1.0, min(5.0, deadline - time.monotonic())))
        app.pool.stop()
        return unfinished


def _startup_error_text(exc, prefix=""):
    """The message, our location summary, then the full Python traceback (when there is one)."""
    text = prefix + exc.message
    if exc.diagnostics:
        text += "\n" + _format_diagnosis(exc.diagnostics)
    if exc.traceback_text:
        text += "\n" + exc.traceback_text
    return text


def _print_startup_error(exc, stream=None):
    """A problem with the script or the config (exit 3) goes to stdout, where the reference logs it and its
    users' tools look; a command-line problem (exit 1) to stderr.  ``--check`` keeps stdout for its report."""
    _flush_logs()
    stream = stream or (sys.stdout if exc.code == EXIT_SCRIPT else sys.stderr)
    stream.write(_startup_error_text(exc, "azmlinfsrv: error: ") + "\n")
    stream.flush()


def _run_forever(config, sock, banner=True, health_sock=None):
    """Serve in this process until SIGTERM or Ctrl+C; returns the exit code."""
    instance = _Instance(config, sock, health_sock, banner=banner)
    stop = threading.Event()
    received = []

    def on_signal(signum, frame):
        received.append(signum)
        if len(received) > 1:  # a second Ctrl+C: stop now
            os._exit(130 if signum == signal.SIGINT else 0)
        stop.set()

    # Handlers and banner before the first request is accepted: a client (or an orchestrator) that
    # sees the server answer may send SIGTERM at once, and must get a drain and exit 0, not a kill.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if banner:
        _banner(config, instance.app, instance.address,
                instance.health.server_address if instance.health else None)
    instance.start()
    logger.info("Worker with pid %d ready for serving traffic", os.getpid())
    while not stop.wait(0.5):
        pass
    name = "SIGTERM" if received and received[0] == signal.SIGTERM else "Ctrl+C"
    in_flight = instance.app.in_flight
    unfinished = instance.drain(config.grace_period)
    if unfinished:
        logger.warning("Shut down on %s after %.0f s grace with %d request(s) unfinished.", name,
                       config.grace_period, unfinished)
    else:
        logger.info("Shut down on %s: %d request(s) in flight finished, telemetry flushed.", name, in_flight)
    _flush_logs()
    return EXIT_OK


def _prefork(config, sock, health_sock=None):
    """POSIX pre-fork: N children serve the shared socket; the parent restarts any that dies."""
    children = {}
    stopping = []

    def spawn(index, restarted=False):
        pid = os.fork()
        if pid == 0:
            code = EXIT_SCRIPT
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                code = _run_forever(config, sock, banner=index == 0 and not restarted,
                                    health_sock=health_sock)
            except StartupError as exc:
                _print_startup_error(exc)
                code = exc.code
            except BaseException:
                traceback.print_exc()
            finally:
                _flush_logs()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = (index, time.monotonic())
        if stopping:  # the signal came between fork() and this line: the new child was not told
            os.kill(pid, signal.SIGTERM)

    def on_signal(signum, frame):
        stopping.append(signum)
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(config.processes):
        spawn(index)
    logger.info("Pre-fork mode: %d processes (pids %s) share port %s", config.processes,
                ", ".join(map(str, children)), config.port)
    exit_code = EXIT_OK
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index, started = children.pop(pid, (None, 0))
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8
        if stopping:
            continue
        if code == EXIT_SCRIPT and time.monotonic() - started < 60:
            logger.error("A worker process failed to start (exit %d); stopping.", code)
            exit_code = code
            on_signal(signal.SIGTERM, None)
            stopping.append(signal.SIGTERM)
            continue
        logger.warning("Worker process %d exited with %s; starting a new one.", pid, code)
        time.sleep(0.5)
        if not stopping:  # a SIGTERM during the pause must not be answered with a new worker
            spawn(index, restarted=True)
    sock.close()
    logger.info("All %d worker processes stopped.", config.processes)
    _flush_logs()
    return exit_code


def run_server(config):
    """Start the server described by ``config`` and serve until stopped; returns an exit code."""
    script_path = _resolve_entry_script(config)
    _configure_logging(config, script_path)
    for warning in config.warnings:
        logger.warning(warning)
    sock = _bind(config)
    try:
        if config.processes > 1:
            if not hasattr(os, "fork"):
                logger.warning("--processes needs os.fork (POSIX); serving with threads in one process.")
            else:
                # Every process serves the health port too: bind it once, here, and share it like the main port.
                if config.health_port and config.health_port != config.port:
                    health_sock = _bind(config, port=config.health_port)
                    try:
                        return _prefork(config, sock, health_sock)
                    finally:
                        health_sock.close()
                return _prefork(config, sock)
        return _run_forever(config, sock)
    finally:
        try:
            sock.close()
        except OSError:
            pass


#: What serve().request() and serve().score() return; unpacks as (status, headers, body).
Reply = collections.namedtuple("Reply", "status headers body")


class serve:
    """Run the real server in a background thread on a free loopback port, for tests.

    Example (a test in the score script's own pytest suite)::

        import azmlinfsrv

        def test_prediction():
            with azmlinfsrv.serve("score.py", model_dir="model", env={"THRESHOLD": "0.5"}) as server:
                status, headers, body = server.score({"x": 1})
                assert status == 200 and body["prediction"] == 3.0

    ``server.url`` is the base URL (``http://127.0.0.1:<port>``).  ``score()``
    and ``request()`` return a :data:`Reply` ``(status, headers, body)``: header
    names in lower case, the body decoded from JSON when it is JSON.  ``env``
    variables are set while the server runs; on exit the environment and
    ``sys.path`` are restored.  Other keyword arguments are settings by name
    (``worker_count=2``, ``scoring_timeout_ms=500``, ``reload=True``).
    A script that fails to load raises :class:`StartupError` with the diagnostics.
    """

    def __init__(self, entry_script, model_dir=None, env=None, host="127.0.0.1", port=0, **settings):
        known = {name for name, _, _, _, _, _ in _SETTINGS}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError("serve() got unknown setting(s) %s; known: %s" % (", ".join(unknown),
                                                                             ", ".join(sorted(known))))
        self.entry_script = entry_script
        self.model_dir = model_dir
        self.env = dict(env or {})
        self.host = host
        self.port = port
        self.settings = settings
        self._saved_env = None
        self._saved_path = None
        self._instance = None

    def __enter__(self):
        self._saved_env = dict(os.environ)
        self._saved_path = list(sys.path)
        for key, value in self.env.items():
            os.environ[key] = str(value)
        try:
            script = os.path.abspath(self.entry_script)
            values = {"entry_script": script, "host": self.host}
            if self.model_dir:
                values["model_dir"] = os.path.abspath(self.model_dir)
            values.update(self.settings)
            config = Config.resolve(values, cwd=os.path.dirname(script))
            config.port = self.port
            _configure_logging(config, script)
            for warning in config.warnings:
                logger.warning(warning)
            sock = _bind(config, host=self.host, port=self.port)
            try:
                self._instance = _Instance(config, sock).start()
            except BaseException:
                sock.close()
                raise
        except StartupError as exc:
            self._restore()
            raise StartupError(_startup_error_text(exc), exc.code, exc.diagnostics) from None
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info):
        try:
            if self._instance is not None:
                self._instance.drain(grace=5.0)
                self._instance = None
        finally:
            self._restore()

    start = __enter__

    def stop(self):
        """Stop the server (what leaving the ``with`` block does)."""
        self.__exit__(None, None, None)

    def _restore(self):
        if self._saved_env is not None:
            for key in set(os.environ) - set(self._saved_env):
                os.environ.pop(key, None)
            for key, value in self._saved_env.items():
                if os.environ.get(key) != value:
                    os.environ[key] = value
            self._saved_env = None
        if self._saved_path is not None:
            sys.path[:] = [p for p in sys.path if p in self._saved_path]
            self._saved_path = None

    @property
    def app(self):
        return self._instance.app

    @property
    def url(self):
        host, port = self._instance.address[:2]
        return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def request(self, method, path, body=None, headers=None, timeout=30.0):
        """Send one request: a dict or list ``body`` goes as JSON, str as UTF-8, bytes as is."""
        host, port = self._instance.address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            headers = dict(headers or {})
            if body is not None and not isinstance(body, (bytes, str)):
                body = json.dumps(body)
                if not any(k.lower() == "content-type" for k in headers):
                    headers["Content-Type"] = "application/json"
            if isinstance(body, str):
                body = body.encode("utf-8")
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            resp_headers = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        if "json" in resp_headers.get("content-type", ""):
            try:
                data = json.loads(data)
            except ValueError:
                pass
        return Reply(resp.status, resp_headers, data)

    def score(self, payload=None, headers=None, method="POST"):
        """POST ``payload`` to /score (JSON-encoded unless str/bytes): a Reply (status, headers, body)."""
        return self.request(method, "/score", payload, headers)


###############################################################################
# Validation gate: --check requests.json (for CI)
###############################################################################

_CASE_KEYS = frozenset(("name", "method", "path", "headers", "body", "json", "expect"))
_EXPECT_KEYS = frozenset(("status", "json", "contains", "headers"))
_XML_INVALID_RE = re.compile(u"[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _looks_like_case(item):
    """A request case rather than a body?  Loose on purpose: a near-miss (a typo in a key) is
    taken as a case and then rejected with the key's name, instead of being sent as a body."""
    if not isinstance(item, dict) or not item:
        return False
    keys = set(item)
    if keys & {"expect", "expected", "expects", "expectation"}:
        return True
    if keys <= _CASE_KEYS and keys & {"json", "body", "method", "path"}:
        return True
    return len(keys & _CASE_KEYS) >= 2 and bool(keys & {"json", "body"})


def _validate_case(case, where):
    unknown = sorted(set(case) - _CASE_KEYS)
    if unknown:
        raise StartupError("%s: unknown key(s) %s (a case has %s)" % (where, ", ".join(map(repr, unknown)),
                                                                   ", ".join(sorted(_CASE_KEYS))), EXIT_USAGE)
    if "body" in case and "json" in case:
        raise StartupError("%s: give either \"body\" or \"json\", not both" % where, EXIT_USAGE)
    for key, kind in (("name", str), ("method", str), ("path", str), ("headers", dict), ("expect", dict)):
        if key in case and not isinstance(case[key], kind):
            raise StartupError("%s: %r must be a %s" % (where, key, "string" if kind is str else "JSON object"),
                               EXIT_USAGE)
    if not str(case.get("path", "/")).startswith("/"):
        raise StartupError("%s: \"path\" must start with /" % where, EXIT_USAGE)
    unknown = sorted(set(case.get("expect") or {}) - _EXPECT_KEYS)
    if unknown:
        raise StartupError("%s: unknown expect key(s) %s (expect has %s)" % (
            where, ", ".join(map(repr, unknown)), ", ".join(sorted(_EXPECT_KEYS))), EXIT_USAGE)
    return case


def _body_case(name, body, is_json):
    return {"name": name, "method": "POST", "path": "/score", "body": body,
            "headers": {"Content-Type": "application/json"} if is_json else {}}


def _load_cases(path):
    """The requests of a --check file: a JSON list of cases, JSON lines, one case, or only a body.

    A case is ``{"name", "method", "path", "headers", "body" | "json", "expect": {"status",
    "json", "contains", "headers"}}``.  A file that is not cases is sent whole as one POST
    to /score (a JSON line that is not a case is sent as one POST per line).
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise StartupError("Cannot read the --check file %s: %s" % (path, exc.strerror or exc), EXIT_USAGE)
    base = os.path.basename(path)
    if not raw.strip():
        raise StartupError("The --check file %s is empty." % path, EXIT_USAGE)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        try:
            data = json.loads(text)
        except ValueError as exc:
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            try:
                items = [(n, line, json.loads(line)) for n, line in lines]
            except ValueError:
                if path.lower().endswith((".json", ".jsonl", ".ndjson")):
                    raise StartupError("%s is neither JSON nor JSON lines: %s" % (path, exc), EXIT_USAGE)
            else:
                return [_validate_case(item, "%s line %d" % (base, n)) if _looks_like_case(item)
                        else _body_case("%s line %d" % (base, n), line, True) for n, line, item in items]
        else:
            if isinstance(data, list) and data and any(_looks_like_case(d) for d in data):
                for index, item in enumerate(data):
                    if not isinstance(item, dict):
                        raise StartupError("%s: item %d is not a case (a JSON object)" % (base, index + 1),
                                           EXIT_USAGE)
                    _validate_case(item, "%s: case %d (%s)" % (base, index + 1, item.get("name", "no name")))
                return data
            if _looks_like_case(data):
                return [_validate_case(data, base)]
            return [_body_case("%s (the whole file as the body)" % base, raw, True)]
    return [_body_case("%s (the whole file as the body)" % base, raw, False)]


def _check_case(server, case, index, timeout):
    """Send one case and compare: (name, ok, problems, seconds)."""
    name = case.get("name") or "case %d" % (index + 1)
    method = case.get("method", "POST" if ("body" in case or "json" in case) else "GET").upper()
    path = case.get("path", "/score")
    headers = {str(k): str(v) for k, v in (case.get("headers") or {}).items()}
    if "json" in case:
        body = json.dumps(case["json"])
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
    elif "body" in case:
        body = case["body"] if isinstance(case["body"], (str, bytes)) else json.dumps(case["body"])
    else:
        body = None
    expect = dict(case.get("expect") or {})
    expect.setdefault("status", 200)
    start = time.perf_counter()
    try:
        status, resp_headers, data = server.request(method, path, body, headers, timeout=timeout)
    except Exception as exc:
        return name, False, ["no answer: %s: %s" % (type(exc).__name__, exc)], time.perf_counter() - start
    elapsed = time.perf_counter() - start
    problems = []
    if status != expect["status"]:
        problems.append("status %s, expected %s" % (status, expect["status"]))
    if "json" in expect and data != expect["json"]:
        shown = json.dumps(data) if not isinstance(data, bytes) else repr(data)
        problems.append("body %s, expected %s" % (shown[:300], json.dumps(expect["json"])[:300]))
    if "contains" in expect:
        text = data if isinstance(data, (str, bytes)) else json.dumps(data)
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        wanted = expect["contains"] if isinstance(expect["contains"], list) else [expect["contains"]]
        for piece in wanted:
            if str(piece) not in text:
                problems.append("body does not contain %r" % piece)
    for header, value in (expect.get("headers") or {}).items():
        got = resp_headers.get(header.lower())
        if got != str(value):
            problems.append("header %s: %r, expected %r" % (header, got, str(value)))
    if problems and isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        loc = error.get("location") or {}
        problems.append("server said: %s: %s%s" % (error.get("type"), error.get("text"),
                                                   " at %s, line %s: %s" % (loc.get("file"), loc.get("line"),
                                                                            loc.get("source")) if loc else ""))
    return name, not problems, problems, elapsed


def _xml_text(value):
    return _XML_INVALID_RE.sub("?", str(value))


def _junit_xml(results, suite_name, total_time, startup_error=None):
    """A JUnit XML report: one <testcase> per case; a start-up failure is one <error> case.

    ``results`` rows are (name, ok, problems, seconds, log lines).
    """
    from xml.sax.saxutils import escape, quoteattr

    def attr(value):
        return quoteattr(_xml_text(value))

    failures = sum(1 for r in results if not r[1])
    errors = 1 if startup_error is not None else 0
    tests = len(results) + errors
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<testsuites name="azmlinfsrv --check" tests="%d" failures="%d" errors="%d" time="%.3f">'
           % (tests, failures, errors, total_time),
           '  <testsuite name=%s tests="%d" failures="%d" errors="%d" skipped="0" time="%.3f" timestamp="%s">'
           % (attr(suite_name), tests, failures, errors, total_time, stamp)]
    if startup_error is not None:
        message, details = startup_error
        out.append('    <testcase classname=%s name="start-up: load the script and run init()" time="0.000">'
                   % attr(suite_name))
        out.append('      <error message=%s type="StartupError">%s</error>' % (attr(message),
                                                                              escape(_xml_text(details))))
        out.append("    </testcase>")
    for name, ok, problems, elapsed, log_lines in results:
        out.append('    <testcase classname=%s name=%s time="%.3f">' % (attr(suite_name), attr(name), elapsed))
        if not ok:
            out.append('      <failure message=%s type="AssertionError">%s</failure>' % (
                attr("; ".join(problems)), escape(_xml_text("\n".join(problems)))))
            if log_lines:
                out.append("      <system-out>%s</system-out>" % escape(_xml_text("\n".join(log_lines))))
        out.append("    </testcase>")
    out += ["  </testsuite>", "</testsuites>", ""]
    return "\n".join(out)


class _CaseLog(logging.Handler):
    """Collects the server's log lines during one case (shown only if the case fails)."""

    def __init__(self, formatter):
        super().__init__()
        self.setFormatter(formatter)
        self.lines = []

    def emit(self, record):
        try:
            self.lines.extend(self.format(record).splitlines())
        except Exception:
            pass


def run_check(config, cases_path, report_path=None, stream=None):
    """Load the script, send each case to the real server on 127.0.0.1, report; returns the exit code.

    Exit 0 when every case passes, 1 when any fails; a script that cannot load
    raises StartupError (exit 3), after writing the report when one is asked for.
    """
    stream = stream or sys.stdout
    cases = _load_cases(cases_path)
    # Loopback only, an ephemeral port, one process, no watcher; the report is on stdout.
    config.host, config.port, config.health_port = "127.0.0.1", 0, None
    config.reload, config.processes, config.access_log = False, 1, False
    if config.sources.get("scoring_timeout_ms") == "default":
        config.scoring_timeout_ms = 60000  # a hung run() fails its case in a minute, not an hour
    script_path = _resolve_entry_script(config)
    _configure_logging(config, script_path)
    consoles = [h for h in logger.handlers if isinstance(h, _LogPump)]
    for handler in consoles:
        handler.retarget("stderr")
    try:
        return _run_cases(config, cases, cases_path, script_path, report_path, stream)
    finally:
        for handler in consoles:
            handler.retarget("stdout")


def _run_cases(config, cases, cases_path, script_path, report_path, stream):
    suite = "%s: %s" % (os.path.basename(script_path), os.path.basename(cases_path))
    start = time.perf_counter()
    try:
        sock = _bind(config, host="127.0.0.1", port=0)
        try:
            instance = _Instance(config, sock).start()
        except BaseException:
            sock.close()
            raise
    except StartupError as exc:
        if report_path:
            details = exc.message + ("\n" + _format_diagnosis(exc.diagnostics) if exc.diagnostics else "")
            _write_report(report_path, _junit_xml([], suite, time.perf_counter() - start, (exc.message, details)))
        raise
    handle = serve.__new__(serve)
    handle._instance = instance
    stream.write("Checking %s with %d request(s) from %s on %s\n" % (
        os.path.basename(script_path), len(cases), cases_path, handle.url))
    formatter = next((h.formatter for h in logger.handlers if h.formatter), None) or logging.Formatter(
        "%(levelname).1s %(name)s - %(message)s")
    timeout = config.scoring_timeout_ms / 1000.0 + 10.0
    results = []
    try:
        for index, case in enumerate(cases):
            capture = _CaseLog(formatter)
            saved = logger.handlers[:], logger.propagate
            logger.handlers[:], logger.propagate = [capture], False
            try:
                name, ok, problems, elapsed = _check_case(handle, case, index, timeout)
            finally:
                logger.handlers[:], logger.propagate = saved
            results.append((name, ok, problems, elapsed, capture.lines))
            stream.write("%s  %s  (%.1f ms)\n" % ("PASS" if ok else "FAIL", name, elapsed * 1000.0))
            for problem in problems:
                stream.write("      %s\n" % problem)
            if not ok and capture.lines:
                shown = capture.lines[:20]
                stream.write("      server log:\n" + "".join("        %s\n" % line for line in shown))
                if len(capture.lines) > len(shown):
                    stream.write("        ... (%d more lines)\n" % (len(capture.lines) - len(shown)))
            stream.flush()
    finally:
        instance.drain(grace=5.0)
    failed = sum(1 for r in results if not r[1])
    stream.write("%d passed, %d failed\n" % (len(results) - failed, failed))
    if report_path:
        _write_report(report_path, _junit_xml(results, suite, time.perf_counter() - start))
        stream.write("JUnit report: %s\n" % report_path)
    stream.flush()
    return EXIT_OK if failed == 0 else 1


def _write_report(path, text):
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise StartupError("Cannot write the report %s: %s" % (path, exc.strerror or exc), EXIT_USAGE)


###############################################################################
# Command line
###############################################################################


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, "%s: error: %s\n" % (self.prog, message))


def _argument_parser():
    parser = _ArgumentParser(prog="azmlinfsrv", description="Azure ML inference HTTP server v%s "
                             "(standard-library edition)." % __version__)
    for name, flag, env, default, parse, help_text in _SETTINGS:
        if flag is None:
            continue
        text = "%s Env: %s. Default: %s." % (help_text, env, default)
        if name in _FLAG_ONLY:
            parser.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=text)
        elif _is_bool_setting(parse):
            parser.add_argument(flag, dest=name, default=None, metavar="true|false", help=text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=text)
    parser.add_argument("--check", metavar="REQUESTS.json", help="Validate the script for CI: start the server "
                        "on 127.0.0.1 only, send each request in the file (a JSON list or JSON lines of "
                        "{name, method, path, headers, body|json, expect: {status, json, contains, headers}}, "
                        "or a file that is only a body: one POST), print PASS/FAIL per request and a summary; "
                        "exit 0 if all pass, 1 if any fails, 3 if the script cannot load.")
    parser.add_argument("--check_report", metavar="REPORT.xml", help="With --check: write a JUnit XML report.")
    parser.add_argument("--version", action="version", version="azmlinfsrv %s" % __version__)
    return parser


def main(argv=None):
    """Run the command line; returns the exit code (0, 1 usage, 3 script/config)."""
    parser = _argument_parser()
    args = parser.parse_args(argv)
    cli_values = {k: v for k, v in vars(args).items() if k not in ("check", "check_report") and v is not None}
    try:
        config = Config.resolve(cli_values)
        if args.check:
            return run_check(config, args.check, args.check_report)
        return run_server(config)
    except StartupError as exc:
        _print_startup_error(exc, sys.stderr if args.check else None)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_OK


def main_exit():
    """Console-script entry point: ``azmlinfsrv`` exits with main()'s code."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
