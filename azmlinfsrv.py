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

How this file reads (a map; each part's banner says where its sections begin):

  Part I, every request: what you read to know how any request is served.
    I.1  limits and fixed values        I.6  HTTP 3/6: route and decide (App.handle)
    I.2  settings (_SETTINGS, Config)   I.7  HTTP 4/6: admission and run() (App.score, _RunPool)
    I.3  errors and diagnostics         I.8  HTTP 5/6: the script (Script, load_script)
    I.4  HTTP 1/6: connections          I.9  HTTP 6/6: write the answer (_write_answer)
    I.5  HTTP 2/6: read a request       I.10 start and stop (logging, banner, run_server)
  Part II, what a score script sees: rawhttp and AMLRequest, AMLResponse, the
    werkzeug parity behind them, the azureml_* import shims.
  Part III, optional features, each entered through one hook named in its banner:
    III.1 swagger.json, III.2 /metrics, III.3 telemetry, III.4 --reload,
    III.5 --processes, III.6 the debugger, III.7 deployment files and endpoint
    emulation, III.8 --check and serve(), III.9 traces, III.10 JSON logs,
    III.11 the try page, III.12 MLflow models without a script, III.13 clients
    that left, III.14 one listening socket per process.
  Then the command line.

One request's whole path is ``_Connection.answer_requests()`` (I.4): ``_read_request``
(I.5), ``App.handle`` (I.6) -> ``App.score`` (I.7) -> ``Script.arguments``
(I.8) and run() on the pool, ``_write_answer`` (I.9), ``App.record``.  It leaves
Part I only for the hooks: the /score wrapper of the emulated endpoint, the
AMLRequest/AMLResponse a @rawhttp run() takes and gives, and the observers
App.record feeds (metrics, telemetry).
"""

import argparse
import atexit
import bisect
import collections
import email.utils
import errno
import gzip
import heapq
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
import select
import selectors
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types
import urllib.parse
import urllib.request
import uuid

__version__ = "1.2.0"

#: The public surface, with a stability promise.  Everything else (App, Server, Request, Config's
#: internals, ...) is a building block that may change in any release.
__all__ = [
    # For score scripts (also importable from the reference's module paths).
    "AMLRequest", "AMLResponse", "rawhttp", "BadRequestError",
    # For tests and tools: run the real server in-process, or the CLI, and its exit codes.
    "serve", "Reply", "StartupError", "main", "main_exit", "__version__",
    "EXIT_OK", "EXIT_USAGE", "EXIT_SCRIPT", "EXIT_STUCK",
]


###############################################################################
#                              PART I  EVERY REQUEST
###############################################################################


###############################################################################
# I.1  Limits and fixed values
###############################################################################

#: Status line reasons, from the standard library's table.
_REASONS = {s.value: s.phrase for s in http.HTTPStatus}

#: Exit codes, as the reference uses them.
EXIT_OK, EXIT_USAGE, EXIT_SCRIPT = 0, 1, 3
EXIT_STUCK = 4  # a pre-forked worker process whose run() calls are stuck; its parent replaces it

# Every fixed limit and timeout, named once with its unit (the ones a user can set are rows of
# _SETTINGS in I.2).  Grouped by where they bite, in the order a request meets them.

# -- Reading a request (the status a client gets beyond the limit is on the right)
_MAX_REQUEST_LINE = 8192  # bytes, without CRLF -> 414 beyond
_MAX_HEADER_COUNT = 100  # fields, in the head or in a chunked body's trailers -> 431 beyond
_MAX_HEADER_BYTES = 65536  # bytes, the whole header block (or trailer section) -> 431 beyond
_MAX_CHUNK_LINE = 4096  # bytes, one chunk-size line -> 400 beyond
_MIN_UPLOAD_BYTES_PER_SECOND = 65536  # a body may take --client_timeout plus its size at this rate -> 408
_MAX_LENGTH_DIGITS = 18  # digits of a Content-Length (more could overflow a 64-bit size) -> 400 beyond
_DISCARD_BODY_BYTES = 65536  # bytes: a body nobody read (a 404, a 405) is dropped to keep the connection; larger closes it
_RECV_BYTES = 65536  # bytes asked of one recv() for a head, or for what a closing client still sends
_RECV_BODY_BYTES = 262144  # bytes asked of one recv() for a body; a body this much larger than what is
#                            buffered is read straight into a buffer of its own size

# -- Connections
_LINGER_SECONDS = 1.0  # after our last answer, read and drop what the client still sends (no reset)
_FOLLOW_UP_SECONDS = 0.05  # after an answer on a connection that has sent several requests, its handler
#                             thread waits this long for the next one before the connection goes back to the
#                             selector (saves two thread hand-offs per request under keep-alive load)
_SPARE_THREAD_SECONDS = 60.0  # a handler thread with no connection to serve for this long ends
_SWEEP_SECONDS = 0.25  # how often the selector thread looks for connections idle past --client_timeout
_REJECT_DRAIN_READS = 16  # recv() calls at most to drop a refused client's request before closing
_CLIENT_WATCH_SECONDS = 0.2  # a request waiting longer for its run() looks this often whether its client
#                               left (III.13); one answered sooner costs no look

# -- Writing an answer
_SCATTER_BYTES = 65536  # a body this large goes out beside its head with sendmsg(), not copied into one buffer

# -- Logging (one thread writes every log line; see _LogPump)
_LOG_BATCH_LINES = 1000  # lines written in one go at most
_LOG_FLUSH_SECONDS = 2.0  # how long a flush (before an answer, at exit) waits for the log thread

# -- Start, stop and the script
_MALLOC_ARENAS = 2  # glibc malloc arenas for the whole process, unless MALLOC_ARENA_MAX says otherwise
_M_ARENA_MAX = -8  # glibc's mallopt() parameter number for it
_DEFAULT_HEALTH_PORT = 5000  # the reference's, with SEPERATE_HEALTH_ENDPOINT=true
_DRAIN_POLL_SECONDS = 0.02  # how often a drain looks whether the requests in flight have finished
_STUCK_POLL_SECONDS = 0.5  # how often the main thread looks at the stuck run() count
_TELEMETRY_CLOSE_SECONDS = 5.0  # at exit, telemetry gets at most this long to send what is queued
_SERVE_GRACE_SECONDS = 5.0  # serve() and --check: grace of the drain when they stop
_CHECK_SCORING_TIMEOUT_MS = 60000  # --check's default run() deadline (the server's default is an hour)
_CHECK_EXTRA_SECONDS = 10.0  # --check: a case's client waits the scoring timeout plus this
_MAX_WATCHED_FILES = 2000  # --reload: .py files watched at most (a huge tree: watch what was found)
_RELOAD_POLL_SECONDS = 1.0  # --reload: how often the tree is scanned
_RELOAD_SETTLE_SECONDS = 0.2  # --reload: a change must hold still this long before the reload ...
_RELOAD_SETTLE_ROUNDS = 10  # ... or this many rounds, if an editor keeps writing
_MAX_BANNER_ENTRIES = 10000  # model-directory entries the banner looks at, at most
_FAST_FAIL_SECONDS = 60  # --processes: a child that fails to load this soon after its start stops all
_RESPAWN_PAUSE_SECONDS = 0.5  # --processes: pause before a dead child is replaced

# -- Optional features (Part III): App Insights delivery, trace context, the managed endpoint's defaults
_AI_BATCH = 100  # items per upload at most; a full batch is sent without waiting for the flush tick
_AI_MAX_BACKOFF = 60.0  # seconds between retries at most, unless Retry-After asks for more ...
_AI_MAX_RETRY_AFTER = 600.0  # ... up to this
_AI_MAX_REDIRECTS = 10  # redirects followed in a row by an upload
_AI_MAX_PROPERTY = 8192  # characters: the ingestion schema's limit for a property value
_AI_MAX_MESSAGE = 32768  # characters: MessageData.message and ExceptionDetails.message
_AI_MAX_URL = 2048  # characters of a request URL in a request item
_TRACESTATE_MAX = 512  # characters kept of tracestate (the W3C spec asks vendors to pass at least 512)
# A managed online deployment's defaults when its file does not say (ms, requests, instances; probe seconds).
_ENDPOINT_DEFAULTS = {"request_timeout_ms": 5000, "max_concurrent_requests_per_instance": 1, "instance_count": 1}
_PROBE_DEFAULTS = (("initial_delay", 10), ("period", 10), ("timeout", 2), ("success_threshold", 1),
                   ("failure_threshold", 30))

# -- Request ids
_REQUEST_ID_LIMIT = 100  # characters, as the reference -> 431 beyond

_MSG_NOT_FOUND = (
    "The requested URL was not found on the server. If you entered the URL manually "
    "please check your spelling and try again."
)
_MSG_METHOD_NOT_ALLOWED = "The method is not allowed for the requested URL."  # a route's (werkzeug's)
_MSG_RUN_METHOD_NOT_ALLOWED = "Method not allowed"  # sic: the reference's own wording when run() does not take it
_MSG_RUN_FAILED = "An unexpected error occurred in scoring script. Check the logs for more info."
_MSG_INTERNAL = "An unexpected internal error occurred. Check the logs for more info."

_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEAD_END_RE = re.compile(rb"\n\r?\n")
_BARE_CR_RE = re.compile(r"\r(?!\n|\Z)")  # a CR that does not end a line (the head's last CR ends it)
_SLASHES_RE = re.compile(r"//+")
# RFC 9112 7.1: chunk-size, optional extensions (BWS ";" ...), CRLF; a trailer field is a header field.
_CHUNK_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?\r\n\Z")
_TRAILER_FIELD_RE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*\r\n\Z")
# The fast path of the parser: a well-formed request line, and header fields matched back to back.
_REQUEST_LINE_RE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^ \t\r]+) HTTP/1\.([01])\r?\Z")
_HEADER_FIELD_RE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*?)[ \t]*\r?\n")
_HEADER_BLOCK_RE = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r?\n)*")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_DIGITS_RE = re.compile(r"^[0-9]+$")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")

_ID_HEADERS = frozenset(("x-request-id", "x-ms-request-id", "x-ms-client-request-id"))

_HERE = os.path.abspath(__file__)
_SERVER_HEADER = "azmlinfsrv/" + __version__

# Platform facts, decided once here, never per call.
_IS_POSIX = os.name == "posix"
_CAN_FORK = hasattr(os, "fork")  # --processes needs it (POSIX)
_CAN_SENDMSG = hasattr(socket.socket, "sendmsg")  # scatter-gather sends (not on Windows)
_register_at_fork = getattr(os, "register_at_fork", None)  # POSIX, Python 3.7+
_exit_code_of = getattr(os, "waitstatus_to_exitcode", lambda status: status >> 8)  # Python 3.9+ has it
_REUSEPORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")

logger = logging.getLogger("azmlinfsrv")
_user_logger = logging.getLogger("azmlinfsrv.user_script")
_print_logger = logging.getLogger("azmlinfsrv.print")


###############################################################################
# I.2  Settings: one table drives the CLI, the environment, the config file and the banner
###############################################################################

def _parse_bool(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false, got %r" % text)


def _parse_auto_bool(text):
    """auto, true or false: ``"auto"`` (the feature decides from other settings), True or False."""
    if str(text).strip().lower() == "auto":
        return "auto"
    return _parse_bool(text)


_parse_auto_bool.parses = _parse_bool  # a JSON true/false in a config file (or serve(try_page=False)) is fine


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


def _parse_log_format(text):
    value = str(text).strip().lower()
    if value not in ("text", "json"):
        raise ValueError("expected text or json")
    return value


def _is_bool_setting(parse):
    return getattr(parse, "parses", parse) is _parse_bool


class _Setting(collections.namedtuple("_Setting", "name flag env default parse unit kind help")):
    """One row of the settings table.

    ``name`` is the Config attribute; ``flag`` the command-line option (None: environment and config file
    only); ``env`` the environment variable, which is also the config-file key; ``parse`` turns text into
    the value; ``unit`` says what a number counts ("s", "ms", "bytes", ...); ``kind`` is "value" (a flag
    that takes a value), "switch" (a flag that takes none: given means true) or "env" (no flag).
    """


def _row(name, flag, env, default, parse, help, unit="", kind=None):
    return _Setting(name, flag, env, default, parse, unit, kind or ("env" if flag is None else "value"), help)


#: Every setting.  The CLI, the config file, the banner and the settings page all come from this.  A parser
#: wrapped in _tolerant() (or one raising _Tolerated) marks values the reference starts with anyway: from
#: the environment or a config file they warn and leave the default; other bad values stop start-up.
_SETTINGS = [
    _row("entry_script", "--entry_script", "AZUREML_ENTRY_SCRIPT", None, str,
     "The score script: on the command line relative to the working directory, else to the app root."),
    _row("model_dir", "--model_dir", "AZUREML_MODEL_DIR", None, str,
     "The model directory; exported as AZUREML_MODEL_DIR before the script loads."),
    _row("port", "--port", "AZMLINFSRV_PORT", 5001, _parse_port, "The serving port.", unit="port"),
    _row("health_port", "--health_port", "AZMLINFSRV_HEALTH_PORT", None, _parse_port,
     "A second port that answers only the liveness probe GET / (5000 with SEPERATE_HEALTH_ENDPOINT=true).", unit="port"),
    _row("worker_count", "--worker_count", "WORKER_COUNT", 1, _parse_positive_int,
     "How many run() calls may execute at once.", unit="calls"),
    _row("appinsights_key", "--appinsights_instrumentation_key", "AML_APP_INSIGHTS_KEY", None, str,
     "Application Insights instrumentation key (a UUID)."),
    _row("cors_origins", "--access_control_allow_origins", "AML_CORS_ORIGINS", None, str,
     "Comma-separated origins allowed by CORS; * allows any."),
    _row("config_file", "--config_file", "AZUREML_CONFIG_FILE", None, str,
     "A JSON file whose keys are these environment variable names."),
    _row("app_root", None, "AML_APP_ROOT", None, str, "The app root (default: the working directory)."),
    _row("source_dir", None, "AZUREML_SOURCE_DIRECTORY", None, str,
     "A directory under the app root that is added to sys.path."),
    _row("worker_timeout", None, "WORKER_TIMEOUT", 300, _parse_non_negative_int,
     "Accepted for compatibility (gunicorn's worker timeout); scoring uses SCORING_TIMEOUT_MS.", unit="s"),
    _row("scoring_timeout_ms", None, "SCORING_TIMEOUT_MS", 3600000, _parse_timeout_ms,
     "How long run() may take before the client gets a 500 timeout answer.", unit="ms"),
    _row("service_name", None, "SERVICE_NAME", "ML service", str, "Service name in swagger.json."),
    _row("service_version", None, "SERVICE_VERSION", "1.0", str, "Service version in swagger.json."),
    _row("service_path_prefix", None, "SERVICE_PATH_PREFIX", "", str, "Path prefix in swagger.json."),
    _row("log_level", None, "AZUREML_LOG_LEVEL", "INFO", _tolerant(_parse_log_level),
     "Log level (DEBUG, INFO, WARNING, ERROR)."),
    _row("appinsights_enabled", None, "AML_APP_INSIGHTS_ENABLED", False, _tolerant(_parse_bool),
     "Send telemetry to Application Insights (needs a key)."),
    _row("appinsights_connection_string", None, "APPLICATIONINSIGHTS_CONNECTION_STRING", None, str,
     "Application Insights connection string (InstrumentationKey=...;IngestionEndpoint=...)."),
    _row("appinsights_endpoint", None, "AML_APP_INSIGHTS_ENDPOINT", None, str,
     "Full track URL for telemetry (default https://dc.services.visualstudio.com/v2/track)."),
    _row("appinsights_log_response", None, "APP_INSIGHTS_LOG_RESPONSE_ENABLED", True, _parse_bool,
     "Include the response body in request telemetry."),
    _row("model_dc_storage", None, "AML_MODEL_DC_STORAGE_ENABLED", False, _tolerant(_parse_bool),
     "Send model inputs and predictions to telemetry."),
    _row("server_version_header", None, "SERVER_VERSION_LOG_RESPONSE_ENABLED", "true", str,
     "Send x-ms-server-version unless set to something other than true."),
    _row("hostname", None, "HOSTNAME", "Unknown", str, "Container id in telemetry."),
    _row("workspace_name", None, "WORKSPACE_NAME", "", str, "Workspace name in telemetry."),
    _row("debug_port", None, "AZUREML_DEBUG_PORT", None, _parse_port,
     "Connect to a debugger listening on 127.0.0.1 at this port (VS Code's attach in listen mode) and wait "
     "for it before the script loads; needs debugpy (see Debugging with VS Code).", unit="port"),
    _row("separate_health_endpoint", None, "SEPERATE_HEALTH_ENDPOINT", False, _tolerant(_parse_bool),
     "true (the reference's spelling): also answer the liveness probe on --health_port (default 5000)."),
    # ---- beyond the reference -------------------------------------------------
    _row("host", "--host", "AZMLINFSRV_HOST", "0.0.0.0", str, "The address to listen on."),
    _row("hide_error_details", "--hide_error_details", "AZMLINFSRV_HIDE_ERROR_DETAILS", False, _parse_bool,
     "Answer run() failures with the reference's message only (no exception, no location).", kind="switch"),
    _row("max_queue", "--max_queue", "AZMLINFSRV_MAX_QUEUE", 64, _parse_non_negative_int,
     "Requests that may wait for a worker; beyond it the answer is 503 with Retry-After.", unit="requests"),
    _row("max_buffered_bytes", "--max_buffered_bytes", "AZMLINFSRV_MAX_BUFFERED_BYTES", 8 * 1024 * 1024,
     _parse_positive_int,
     "Bytes of request bodies held in memory while they wait for run(); a request whose body does not fit "
     "waits its turn (in arrival order) before its body is read. One body larger than this is taken when no "
     "other is held.", unit="bytes"),
    _row("max_stuck_runs", "--max_stuck_runs", "AZMLINFSRV_MAX_STUCK_RUNS", None, _parse_non_negative_int,
     "run() calls past SCORING_TIMEOUT_MS that did not return when interrupted; beyond this many GET / "
     "answers 503 (with --processes the process is replaced). Default: worker_count.", unit="calls"),
    _row("max_body_bytes", "--max_body_bytes", "AZMLINFSRV_MAX_BODY_BYTES", 100 * 1024 * 1024, _parse_positive_int,
     "Largest request body accepted (413 beyond, answered before the body is read).", unit="bytes"),
    _row("max_connections", "--max_connections", "AZMLINFSRV_MAX_CONNECTIONS", 512, _parse_positive_int,
     "Open connections at most; beyond it the longest-idle one is closed, or, if all are busy, the new "
     "one is answered 503.", unit="connections"),
    _row("client_timeout", "--client_timeout", "AZMLINFSRV_CLIENT_TIMEOUT", 30.0, _parse_seconds,
     "Seconds a client may take to send a request, or stay idle between requests.", unit="s"),
    _row("grace_period", "--grace_period", "AZMLINFSRV_GRACE_PERIOD", 30.0, _parse_seconds,
     "Seconds requests in flight get to finish on SIGTERM or Ctrl+C.", unit="s"),
    _row("processes", "--processes", "AZMLINFSRV_PROCESSES", 1, _parse_positive_int,
     "Pre-forked server processes sharing the port (POSIX; for CPU-bound run()).", unit="processes"),
    _row("reload", "--reload", "AZMLINFSRV_RELOAD", False, _parse_bool,
     "Reload the script when a .py file under the app root changes.", kind="switch"),
    _row("metrics", "--metrics", "AZMLINFSRV_METRICS", True, _parse_bool,
     "Serve Prometheus metrics at GET /metrics."),
    _row("access_log", "--access_log", "AZMLINFSRV_ACCESS_LOG", True, _parse_bool,
     "Log one line per /score and /swagger.json request."),
    _row("log_format", "--log_format", "AZMLINFSRV_LOG_FORMAT", "text", _parse_log_format,
     "text (the reference's lines) or json: one JSON object per line, with the request's ids "
     "(a logging.json wins)."),
    _row("try_page", "--try_page", "AZMLINFSRV_TRY_PAGE", "auto", _parse_auto_bool,
     "Serve the try page at GET /try (auto, true or false): auto is on unless error details are hidden, "
     "which always turns it off."),
    _row("try_cases", "--try_cases", "AZMLINFSRV_TRY_CASES", None, str,
     "A --check requests file whose cases the try page offers as examples (read at start-up)."),
    _row("deployment", "--deployment", "AZMLINFSRV_DEPLOYMENT", None, str,
     "An Azure ML managed online deployment YAML (or JSON): code, model, environment variables, limits."),
    _row("emulate_endpoint", "--emulate_endpoint", "AZMLINFSRV_EMULATE_ENDPOINT", False, _parse_bool,
     "Answer as the managed endpoint would: 408 over request_timeout_ms, 424 for non-200, 429 when full.", kind="switch"),
    _row("strict_environment", "--strict_environment", "AZMLINFSRV_STRICT_ENVIRONMENT", False, _parse_bool,
     "With --deployment or an MLflow model: packages that differ from the conda file's pins stop the start-up "
     "(exit 3).", kind="switch"),
    _row("data_collector_dir", "--data_collector_dir", "AZMLINFSRV_DATA_COLLECTOR_DIR", "model-data", str,
     "Where collections a deployment's data_collector enables are written (JSON Lines, a folder each)."),
    _row("telemetry_flush_seconds", None, "AZMLINFSRV_TELEMETRY_FLUSH_SECONDS", 5.0, _parse_seconds,
     "Seconds between telemetry uploads (sooner once 100 items wait).", unit="s"),
    _row("telemetry_max_queue", None, "AZMLINFSRV_TELEMETRY_MAX_QUEUE", 10000, _parse_positive_int,
     "Telemetry items kept while the collector is slow or down; beyond it the oldest are dropped.", unit="items"),
    _row("telemetry_timeout", None, "AZMLINFSRV_TELEMETRY_TIMEOUT", 10.0, _parse_seconds,
     "Seconds one telemetry upload may take before it counts as failed (and is retried).", unit="s"),
]

_SETTING_BY_NAME = {setting.name: setting for setting in _SETTINGS}
_SETTING_BY_ENV = {setting.env: setting.name for setting in _SETTINGS}


class Config:
    """The server's settings, resolved CLI > environment > config file > default.

    Attribute names are the ``name`` column of ``_SETTINGS``; ``sources`` says where each value came
    from.  A Config is frozen once ``resolve()`` returns, so the banner's settings are the ones that run:
    code that needs other values (``--check``, ``serve()``) makes a changed copy with ``replace()``.
    """

    deployment_info = None  #: the parsed --deployment file (a Deployment), else None
    endpoint = None  #: the EndpointEmulator with --emulate_endpoint, else None
    _frozen = False

    def __init__(self):
        self.sources = {}
        for setting in _SETTINGS:
            setattr(self, setting.name, setting.default)
            self.sources[setting.name] = "default"
        self.warnings = []

    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError("Config is frozen after resolve(); make a copy with replace(%s=...)" % name)
        object.__setattr__(self, name, value)

    def replace(self, source, **changes):
        """A frozen copy with ``changes``, each recorded as coming from ``source``."""
        copy = object.__new__(Config)
        object.__setattr__(copy, "__dict__", dict(self.__dict__, _frozen=False))
        copy.sources = dict(self.sources)
        for name, value in changes.items():
            setattr(copy, name, value)
            copy.sources[name] = source
        copy._frozen = True
        return copy

    @classmethod
    def resolve(cls, cli_values=None, environ=None, cwd=None):
        """Build a Config from CLI values (already parsed), an environment and the config file."""
        environ = os.environ if environ is None else environ
        cli_values = {k: v for k, v in (cli_values or {}).items() if v is not None}
        cfg = cls()
        cwd = cwd or os.getcwd()
        deployment = _load_deployment(cli_values, environ, cwd)  # --deployment FILE: its values beat the shell's
        if deployment is not None:
            environ = _overlay_environment(environ, deployment)
        env_of = {setting.name: setting.env for setting in _SETTINGS}
        app_root = environ.get(env_of["app_root"]) or cwd

        # Find the config file: --config_file, AZUREML_CONFIG_FILE, config.json in the
        # app root, then next to the entry script.
        candidates = [cli_values.get("config_file"), environ.get(env_of["config_file"])]
        entry = cli_values.get("entry_script") or environ.get(env_of["entry_script"])
        candidates.append(os.path.join(app_root, "config.json"))
        if entry:
            base = cwd if cli_values.get("entry_script") else app_root
            candidates.append(os.path.join(os.path.dirname(os.path.abspath(os.path.join(base, entry))),
                                           "config.json"))
        explicit = cli_values.get("config_file") or environ.get(env_of["config_file"])
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

        for name, flag, env, default, parse in (s[:5] for s in _SETTINGS):
            if name == "config_file" or (name == "deployment" and deployment is None):
                continue
            raw, source = None, None
            if name in cli_values:
                raw, source = cli_values[name], "command line"
            elif env in environ and environ[env] != "":
                raw, source = environ[env], getattr(environ, "labels", {}).get(env) or "environment (%s)" % env
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
        if cfg.hide_error_details and cfg.try_page is True:
            cfg.warnings.append("--try_page true is ignored: error details are hidden (--hide_error_details), "
                                "and the try page is a diagnosis tool; GET /try answers 404.")
        if cfg.debug_port is not None and cfg.processes > 1:
            cfg.warnings.append("AZUREML_DEBUG_PORT is set: serving in one process (not %d) so that the debugger "
                                "sees every request." % cfg.processes)
            cfg.processes = 1
            cfg.sources["processes"] = "AZUREML_DEBUG_PORT"
        if deployment is not None or cfg.emulate_endpoint:
            _finish_endpoint(cfg, deployment)
        cfg._frozen = True
        return cfg

    @property
    def sends_server_version(self):
        """x-ms-server-version on answers: the reference sends it unless the setting is other than true."""
        return str(self.server_version_header).strip().lower() == "true"

    @property
    def model_folder(self):
        """The model directory: the setting, or AZUREML_MODEL_DIR as the environment holds it now."""
        return self.model_dir or os.environ.get("AZUREML_MODEL_DIR")

    def health_port_beside(self, port):
        """The health port when it is a second port beside ``port`` (the main one), else None."""
        return self.health_port if self.health_port and self.health_port != port else None

    def describe(self):
        """(name, value, source) rows for the banner; the key is never shown."""
        rows = []
        for setting in _SETTINGS:
            value = getattr(self, setting.name)
            if setting.name in ("appinsights_key", "appinsights_connection_string") and value:
                value = "(set)"
            rows.append((setting.flag or setting.env, value, self.sources.get(setting.name, "default")))
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
# I.3  Errors and diagnostics: raised where found, rendered once
###############################################################################

class StartupError(Exception):
    """A problem that stops the server from starting; carries the exit code."""

    def __init__(self, message, code=EXIT_SCRIPT, diagnostics=None, traceback_text=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.diagnostics = diagnostics
        self.traceback_text = traceback_text  #: the full Python traceback, printed after the diagnostics


class HttpError(Exception):
    """The one HTTP error value: a status, a JSON message, extra fields and headers.

    Raised where the problem is found: reading the request, routing, admission, run()'s arguments,
    run()'s outcome, the endpoint emulator.  ``response()`` is the one place an error becomes an answer,
    whoever sends it (``App.handle``; ``_Connection.answer_requests`` for a request that could not be read;
    ``Server._reject`` at the connection cap).  ``close`` ends the connection after the answer.
    ``run_failed`` is the x-ms-run-function-failed header the reference sends with every error of its
    app (True for run()'s own failures); None leaves it out, for answers that do not come from the app
    (the connection cap, the emulated endpoint's 429).
    """

    def __init__(self, status, message, close=False, headers=(), extra=None, run_failed=False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = list(headers)
        self.extra = extra or {}
        self.run_failed = run_failed

    def response(self):
        headers = [("Content-Type", "application/json")]
        if self.run_failed is not None:
            headers.append(("x-ms-run-function-failed", "True" if self.run_failed else "False"))
        return Response(self.status, headers + self.headers, _json_body(self.message, self.extra), close=self.close)


class _WarnOnce:
    """Say a warning the first time its key comes up, then never again (one per running server, shared
    by App and what it drives, so a flood of bad requests logs one line, not one per request)."""

    def __init__(self):
        self._said = set()

    def __call__(self, key, message, *args):
        if key not in self._said:
            self._said.add(key)
            logger.warning(message, *args)

    def said(self, key):
        return key in self._said


class _ClientGone(Exception):
    """The client closed the connection, or went idle between requests."""


def _frame_dict(filename, lineno, name, line, roots):
    return {"file": _relative_to_roots(filename, roots), "line": lineno, "function": name,
            "source": (line or linecache.getline(filename, lineno) or "").strip()}


def _relative_to_roots(filename, roots):
    """A file's name in error answers: relative to the app root (or the script's folder) when it
    is in one, else to the ``sys.path`` entry it was imported from
    (``inference_schema/schema_decorators.py``, ``json/decoder.py``), else its bare name -- never
    an absolute path that tells a client how the machine is laid out.  The log's tracebacks keep
    Python's absolute paths: they are for the operator."""
    if not filename or filename.startswith("<"):
        return filename
    candidates = [os.path.abspath(filename)]
    real = os.path.realpath(filename)
    if real != candidates[0]:
        candidates.append(real)
    for prefixes in ([r.rstrip(os.sep) + os.sep for r in roots if r], _import_prefixes()):
        for path in candidates:
            for prefix in prefixes:
                if path.startswith(prefix) or path + os.sep == prefix:
                    return path[len(prefix):].replace(os.sep, "/") or "."
    return os.path.basename(candidates[0])


_import_prefix_cache = [None, ()]  # sys.path as last seen, and its entries longest first


def _import_prefixes():
    """``sys.path`` entries as ``/abs/dir/``, longest first (the most specific entry names a file)."""
    key = tuple(p for p in sys.path if isinstance(p, str))
    if _import_prefix_cache[0] != key:
        entries = {os.path.abspath(p or os.curdir).rstrip(os.sep) + os.sep for p in key}
        entries |= {os.path.realpath(p or os.curdir).rstrip(os.sep) + os.sep for p in key}
        _import_prefix_cache[:] = [key, sorted(entries, key=len, reverse=True)]
    return _import_prefix_cache[1]


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


def _traceback_text(exc, skip_imports=False):
    """The full Python traceback from the first frame that is not this module's (the loader's or the pool's
    call), nor, with ``skip_imports``, the import machinery's; the whole traceback if every frame is ours."""
    tb = exc.__traceback__
    while tb is not None and (os.path.abspath(tb.tb_frame.f_code.co_filename) == _HERE
                              or (skip_imports and tb.tb_frame.f_code.co_filename.startswith("<frozen"))):
        tb = tb.tb_next
    if tb is None and not skip_imports:
        tb = exc.__traceback__
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip("\n")


def _format_diagnosis(info):
    """Diagnostics as log text: the location first, then the user frames."""
    lines = [] if info["type"] == "ScriptError" else ["%s: %s" % (info["type"], info["text"])]
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


###############################################################################
# I.4  HTTP 1/6: connections (accept, idle connections in one selector, handler threads)
###############################################################################

class Server(http.server.ThreadingHTTPServer):
    """The listening socket and every connection opened on it.

    It keeps what ThreadingHTTPServer does well (bind, listen, accept, verify, close) and replaces
    its one-thread-per-connection ``process_request`` and its ``serve_forever`` loop: an idle
    connection waits in the same selector as the listening socket, in ``serve_forever``'s thread,
    and costs no thread; once a whole request head has arrived on it, it goes to a handler thread,
    which answers it (and any request pipelined behind it) and hands the connection back. So the
    number of threads follows the requests in progress, not the open connections, and a slow
    client that sends its head byte by byte holds nothing but a buffer.

    This class owns the connections: the table of open ones, which are idle, which are busy, and
    the count of requests in flight (changed only through ``request_started``/``request_done``).
    ``sock`` is bound and listening already (``_bind``); ``paths`` limits the routes it serves (the
    health port).
    """

    request_queue_size = 1024  # the listen() backlog _bind asks for

    def __init__(self, sock, app, paths=None):
        self.address_family = sock.family
        self.app = app
        self.config = app.config
        self.paths = paths
        self._lock = threading.Lock()
        self._open = {}  # socket -> _Connection, every open connection
        self._idle = collections.OrderedDict()  # _Connection -> None: in the selector, longest idle first
        self._returned = collections.deque()  # connections handed back by handler threads
        self._ready = queue.SimpleQueue()  # connections with a request to answer
        self._spare_threads = 0  # handler threads waiting on _ready
        self.handler_threads = 0
        self.busy = 0  # connections in a handler thread
        self.in_flight = 0  # requests read and not yet answered
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)  # drained to empty by _take_back: never a blocking recv
        self._wake_w.setblocking(False)
        self._selector = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        # TCPServer's __init__ makes a socket of its own (unbound): close it and serve on the one given.
        http.server.HTTPServer.__init__(self, sock.getsockname(), _Connection, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()

    def request_started(self):
        with self._lock:
            self.in_flight += 1

    def request_done(self):
        with self._lock:
            self.in_flight -= 1

    # -- the selector thread --------------------------------------------------------------
    def serve_forever(self, poll_interval=0.25):
        """Accept connections and wait on idle ones until shutdown(); one thread, one selector."""
        self._stopped.clear()
        selector = self._selector = selectors.DefaultSelector()
        selector.register(self.socket, selectors.EVENT_READ, None)
        selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        next_sweep = 0.0
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(poll_interval):
                    if key.data is None:
                        self._handle_request_noblock()  # socketserver: accept, verify, process_request
                    elif key.data is self._wake_r:
                        self._take_back()
                    else:
                        self._on_readable(key.data)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + _SWEEP_SECONDS
        finally:
            for conn in list(self._idle):
                self._close(conn)
            selector.close()
            self._stopped.set()

    def shutdown(self):
        self._stop.set()
        self.wake()
        self._stopped.wait()

    def server_close(self):
        super().server_close()
        with self._lock:
            socks = list(self._open)
        for sock in socks:  # connections still open (a drain past its grace): close them
            try:
                sock.close()
            except OSError:
                pass
        self._wake_r.close()
        self._wake_w.close()

    def wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (the selector is already due to wake) or closed
            pass

    def process_request(self, sock, client_address):
        """A new connection: wait in the selector for its first request (at the cap: make room)."""
        if len(self._open) >= self.config.max_connections and not self._close_longest_idle():
            self._take_back()  # connections handed back but not yet idle again: idle now, and evictable
        if len(self._open) >= self.config.max_connections and not self._close_longest_idle():
            self._reject(sock)
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        conn = _Connection(sock, client_address, self)
        with self._lock:
            self._open[sock] = conn
        self._wait(conn)

    def _wait(self, conn):
        conn.idle_since = time.monotonic()
        self._idle[conn] = None
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _on_readable(self, conn):
        status = conn.reader.fill_nowait()
        if status == "closed":
            self._close(conn)
        elif status == "request":  # a whole head (or more than the limits allow): answer it
            del self._idle[conn]
            self._selector.unregister(conn.sock)
            self._dispatch(conn)

    def _sweep(self, now):
        """Close connections idle past --client_timeout; a head still arriving then gets its 408."""
        timeout = self.config.client_timeout
        for conn in list(self._idle):
            if conn.reader.head_started is not None:
                if now - conn.reader.head_started > timeout:
                    del self._idle[conn]
                    self._selector.unregister(conn.sock)
                    self._dispatch(conn)  # the handler's read finds the deadline passed: 408
            elif now - conn.idle_since > timeout or (self.app.draining and conn.served):
                self._close(conn)  # (a new connection during a drain gets its 503 instead)

    def _close_longest_idle(self):
        """At the connection cap, close the connection idle the longest (nginx, waitress); False if none is."""
        for conn in self._idle:
            if conn.reader.head_started is None:
                self._close(conn)
                self.app.metrics.count("evicted_connections")
                return True
        return False

    def _reject(self, sock, message=None):
        """Every connection is busy (or no thread can start): answer 503 at once and close (no thread, no waiting)."""
        resp = HttpError(503, message or "Too many open connections (limit %d), all busy. Retry later."
                         % self.config.max_connections, headers=[("Retry-After", "1")], run_failed=None).response()
        try:
            sock.setblocking(False)
            # One send() from the selector thread: no thread to spare, and a client that does not read loses it.
            sock.send(_head_bytes(resp.status, resp.headers, None, None,
                                  ["Connection: close", "Content-Length: %d" % len(resp.body)]) + resp.body)
            # FIN first, and drop the request already received: closing with unread input would
            # reset the connection and could destroy the answer.
            sock.shutdown(socket.SHUT_WR)
            for _ in range(_REJECT_DRAIN_READS):
                if not sock.recv(_RECV_BYTES):
                    break
        except OSError:
            pass
        self.app.metrics.count("rejected_connections")
        self.shutdown_request(sock)

    def _take_back(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass
        while self._returned:
            conn = self._returned.popleft()
            if self.app.draining:
                self._close(conn)
            else:
                self._wait(conn)
        if self.app.draining:
            self._sweep(time.monotonic())

    def _close(self, conn):
        if conn in self._idle:
            del self._idle[conn]
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        self._forget(conn)

    def _forget(self, conn):
        with self._lock:
            self._open.pop(conn.sock, None)
        self.shutdown_request(conn.sock)

    # -- handler threads --------------------------------------------------------------------
    def _dispatch(self, conn):
        with self._lock:
            self.busy += 1
            if self._spare_threads:  # under the lock: a spare thread giving up re-checks _ready under it
                self._spare_threads -= 1
                self._ready.put(conn)
                return
            self.handler_threads += 1
        try:
            threading.Thread(target=self._handler_thread, args=(conn,), name="azmlinfsrv-conn", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had (memory, a limit): answer here, keep the selector alive
            with self._lock:
                self.busy -= 1
                self.handler_threads -= 1
                self._open.pop(conn.sock, None)
            logger.error("Cannot start a thread to answer a connection from %s (%s): answered 503.",
                         conn.client_address, exc)
            self._reject(conn.sock, "The server cannot start a thread to answer the request (%s). Retry later." % exc)

    def _handler_thread(self, conn):
        """Answer ``conn``, then wait as a spare thread for the next connection with a request.

        The hand-off between the selector thread (``_dispatch``) and spare threads rests on one rule: the
        count of spare threads and the queue ``_ready`` change together under ``_lock``.  ``_dispatch`` puts
        a connection on the queue only if it took a spare from the count, so a thread that counted itself
        spare must take one more look at the queue, under the lock, before it gives up after
        _SPARE_THREAD_SECONDS; otherwise a connection dispatched in that instant would wait for nobody.
        A thread counts itself spare *before* handing its connection back, so that the connection's next
        request, which may be dispatched at once, finds it instead of starting a thread of its own.
        """
        ready = self._ready
        while True:
            try:
                keep = conn.answer_requests()
            except BaseException:  # never lose the thread's count and the connection with it
                logger.exception("Unexpected error on a connection from %s", conn.client_address)
                keep = False
            if keep:
                # Spare before the hand-back: the connection's next request may be dispatched at once,
                # and must find this thread waiting rather than start another one.
                with self._lock:
                    self.busy -= 1
                    self._spare_threads += 1
                self._returned.append(conn)
                self.wake()
            else:
                conn.linger()
                self._forget(conn)
                with self._lock:
                    self.busy -= 1
                    self._spare_threads += 1
            try:
                conn = ready.get(timeout=_SPARE_THREAD_SECONDS)
            except queue.Empty:
                with self._lock:
                    try:  # a connection may have been dispatched to us just now
                        conn = ready.get_nowait()
                    except queue.Empty:
                        self._spare_threads -= 1
                        self.handler_threads -= 1
                        return

    def close_idle_connections(self):
        """Drain: close the connections waiting for a next request (busy ones close after their answer)."""
        self.wake()  # the selector thread sees app.draining and closes its idle connections

    @property
    def open_connections(self):
        return len(self._open)

    @property
    def idle_connections(self):
        """Connections waiting in the selector for their next request."""
        return len(self._idle)

    @property
    def busy_connections(self):
        return self.busy


class _Connection:
    """One client connection: read its requests, have the App answer them, write the answers.

    Not a ``BaseHTTPRequestHandler``: that class reads from blocking file objects and parses with
    ``http.client``; here a connection spends its idle time in the server's selector, reads under
    deadlines and limits of its own, and is handed from thread to thread. ``answer_requests()`` is
    the whole life of a request: read -> route and call (``App.handle``) -> write -> record.
    ``idle_since`` is the Server's to write: it is when the selector took the connection back.
    """

    __slots__ = ("sock", "client_address", "server", "reader", "idle_since", "served")

    def __init__(self, sock, client_address, server):
        self.sock = sock
        self.client_address = client_address
        self.server = server
        self.reader = _Reader(sock, server.config.client_timeout)
        self.idle_since = 0.0
        self.served = 0  # requests answered on it

    def answer_requests(self):
        """Answer requests while they come; True to keep the connection (it goes back to the selector)."""
        server = self.server
        app = server.app
        reader = self.reader
        while True:
            try:
                req = _read_request(reader, self.sock, self.client_address, server.server_address, app.config)
            except _ClientGone:
                return False
            except HttpError as exc:  # unreadable: answer and close
                resp = exc.response()
                _write_answer(self.sock, resp, "HTTP/1.1", False, False, server.config.client_timeout,
                              app.warn_once)
                app.metrics.count_request("(invalid)", exc.status, 0.0)
                return False
            server.request_started()
            _new_request_on_this_thread()
            try:
                resp = app.handle(req, server.paths)
                keep = req.keep_alive and not resp.close and _finish_body(req) and not app.draining
                streamed = resp.stream is not None
                if streamed:  # recorded as the head goes out, as the reference logs it: a stream may be long
                    app.record(req, resp, None)
                _settle_logs()  # what handling it logged (a timeout, a stuck call) is in the log before the answer
                keep, sent = _write_answer(self.sock, resp, req.version, keep, req.method == "HEAD",
                                           server.config.client_timeout, app.warn_once, req, app.script)
                if not streamed:
                    app.record(req, resp, sent)
                self.served += 1
                reader.finish_request()
            except _ClientGone:
                return False
            finally:
                server.request_done()
            if not keep or app.draining:
                return False
            if not reader.has_head():
                if self.served < 2:  # not (yet) a client that sends request after request: no waiting
                    return True
                try:  # a keep-alive client's next request often follows at once: wait a moment before the hand-off
                    if not reader.wait_readable(_FOLLOW_UP_SECONDS) or not reader.has_head():
                        return True  # idle, or a head still arriving: the selector waits for the rest
                except _ClientGone:
                    return False

    def linger(self):
        """Lingering close: send our FIN first, then read and drop what the client still sends
        (bounded), so that unread input does not turn the close into a reset that destroys the
        answer before the client reads it."""
        if self.reader.eof:
            return
        sock = self.sock
        deadline = time.monotonic() + _LINGER_SECONDS
        try:
            sock.shutdown(socket.SHUT_WR)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                sock.settimeout(remaining)
                if not sock.recv(_RECV_BYTES):
                    return
        except OSError:
            pass


###############################################################################
# I.5  HTTP 2/6: read a request (head, limits, body)
###############################################################################

_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


class _Reader:
    """Buffered reads from one connection's socket, each under a deadline (slowloris-proof).

    ``head_started`` is when the first byte of the request head now arriving came in: the head
    must be complete within --client_timeout of it, whichever thread is reading.
    """

    __slots__ = ("sock", "buf", "timeout", "eof", "head_started")

    def __init__(self, sock, timeout):
        self.sock = sock
        self.buf = bytearray()
        self.timeout = timeout
        self.eof = False  # the client closed (or reset) its side
        self.head_started = None

    def fill_nowait(self):
        """What the socket has now (the selector said it is readable): "request" once a whole head
        is buffered (or more than a head may be), "waiting" for more, "closed"."""
        try:
            if not _MSG_DONTWAIT:
                self.sock.setblocking(False)
            data = self.sock.recv(_RECV_BYTES, _MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return "waiting"
        except OSError:
            self.eof = True
            return "closed"
        if not data:
            self.eof = True
            return "request" if self.buf else "closed"  # a head cut short gets its 400
        self.buf += data
        self._skip_empty_lines()
        if not self.buf:  # only empty lines (RFC 9112 2.2: ignored): still idle, no head begun
            return "waiting"
        if self.head_started is None:
            self.head_started = time.monotonic()
        return "request" if self.has_head() or self._too_long() else "waiting"

    def finish_request(self):
        """After an answer: drop the CRLF some clients send after a body; with nothing of a next request
        yet, no head deadline is running."""
        self._skip_empty_lines()
        if not self.buf:
            self.head_started = None

    def _skip_empty_lines(self):
        """Drop empty lines before a request line (RFC 9112 2.2 allows them)."""
        buf = self.buf
        while buf[:1] == b"\n" or buf[:2] == b"\r\n":
            del buf[:1 if buf[:1] == b"\n" else 2]

    def has_head(self):
        return _HEAD_END_RE.search(self.buf) is not None

    def _too_long(self):
        buf = self.buf
        return (len(buf) > _MAX_REQUEST_LINE + _MAX_HEADER_BYTES
                or (len(buf) > _MAX_REQUEST_LINE + 1 and buf.find(b"\n", 0, _MAX_REQUEST_LINE + 2) < 0))

    def wait_readable(self, timeout):
        """Wait up to ``timeout`` s for the start of a request (True), else False; _ClientGone if the client closed."""
        if self.buf:
            return True
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(_RECV_BYTES)
        except socket.timeout:
            return False
        except OSError:
            self.eof = True
            raise _ClientGone()
        if not data:
            self.eof = True
            raise _ClientGone()
        self.buf += data
        self._skip_empty_lines()
        if not self.buf:  # only empty lines: no request yet, the selector waits for one
            return False
        self.head_started = time.monotonic()
        return True

    def _fill(self, deadline, started):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(started)
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(_RECV_BODY_BYTES)
        except socket.timeout:
            raise _timeout_error(started)
        except OSError:
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
        started = self.head_started
        deadline = (started if started is not None else time.monotonic()) + self.timeout
        searched = 0
        while True:
            self._skip_empty_lines()
            # The head ends at the first empty line, CRLF or bare LF (RFC 9112 2.2 allows a bare LF).
            match = _HEAD_END_RE.search(buf, max(0, searched - 2))
            if match is not None:
                head = bytes(buf[:match.start()])
                del buf[:match.end()]
                self.head_started = time.monotonic() if buf else None  # a pipelined request's head
                return head
            searched = len(buf)
            first_line_end = buf.find(b"\n")
            if (first_line_end < 0 and searched > _MAX_REQUEST_LINE) or first_line_end > _MAX_REQUEST_LINE + 1:
                raise HttpError(414, "The request line is longer than %d bytes." % _MAX_REQUEST_LINE, close=True)
            if searched > _MAX_REQUEST_LINE + _MAX_HEADER_BYTES:
                raise HttpError(431, "The request headers are larger than %d bytes." % _MAX_HEADER_BYTES,
                                close=True)
            self._fill(deadline, searched > 0)

    def read_exact(self, size, deadline=None):
        buf = self.buf
        if deadline is None:
            deadline = time.monotonic() + self.timeout + size / _MIN_UPLOAD_BYTES_PER_SECOND
        if size - len(buf) > _RECV_BODY_BYTES:
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

    def read_line(self, limit, what, deadline=None):
        """One line, LF included; 400 beyond ``limit`` bytes."""
        buf = self.buf
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        while True:
            end = buf.find(b"\n", 0, limit + 1)
            if end >= 0:
                line = bytes(buf[:end + 1])
                del buf[:end + 1]
                return line
            if len(buf) > limit:
                raise HttpError(400, "%s is longer than %d bytes." % (what, limit), close=True)
            self._fill(deadline, True)


def _timeout_error(started):
    if not started:
        return _ClientGone()
    return HttpError(408, "The client took too long to send the request.", close=True)


_arrivals = itertools.count(1)  # the order request heads arrived in: run() calls start in this order


class Request:
    """One parsed HTTP request, as the server sees it (run() sees an AMLRequest).

    The body is not read with the head: ``read_body()`` reads it when the request is admitted
    (see _RunPool.enter), so that bodies waiting for a worker do not pile up in memory.
    """

    __slots__ = ("method", "target", "path", "query", "version", "headers", "hmap", "body", "keep_alive",
                 "client", "server_address", "request_id", "client_request_id", "legacy_request_id",
                 "start", "start_wall", "arrival", "body_kind", "body_length", "reader", "socket", "_aml",
                 "trace")

    def __init__(self, method, target, version, headers, hmap, body_kind, body_length, client, server_address,
                 reader, sock):
        self.arrival = next(_arrivals)
        self.start = time.perf_counter()
        self.start_wall = time.time()
        self.method = method
        self.target = target
        path, _, self.query = target.partition("?")
        self.path = _route_path(path)
        self.version = version
        self.headers = headers
        self.hmap = hmap
        connection = hmap.get("connection", "").lower()
        self.keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        self.body_kind = body_kind
        self.body_length = body_length
        self.body = None
        self.client = client
        self.server_address = server_address
        self.reader = reader
        self.socket = sock
        self.request_id = self.client_request_id = self.legacy_request_id = None  # decide_ids() sets them
        self.trace = None  # the W3C trace context (_Tracer.begin), when traces are recorded
        self._aml = None

    def header(self, name, default=""):
        return self.hmap.get(name, default)

    def decide_ids(self, warn_once):
        """The reference's request-id policy: x-request-id (or a new UUID), and the client's id under its
        legacy and current names; HttpError 431 when one is too long (the ids decided so far are kept
        for the error's answer)."""
        hmap = self.hmap
        request_id = hmap.get("x-request-id") or _new_request_id()
        if len(request_id) > _REQUEST_ID_LIMIT:
            raise HttpError(431, "x-request-id must not exceed %d characters" % _REQUEST_ID_LIMIT)
        self.request_id = request_id
        legacy = hmap.get("x-ms-request-id", "")
        client = hmap.get("x-ms-client-request-id", "")
        if legacy:
            warn_once("x-ms-request-id", "x-ms-request-id header has been deprecated and will be removed "
                      "from future versions of the server. Please use x-ms-client-request-id.")
            client = client or legacy
        else:
            legacy = client or request_id
        if len(legacy) > _REQUEST_ID_LIMIT or len(client) > _REQUEST_ID_LIMIT:
            self.legacy_request_id = self.client_request_id = ""
            raise HttpError(431, "x-ms-request-id and x-ms-client-request-id must not exceed %d characters"
                            % _REQUEST_ID_LIMIT)
        self.client_request_id = client
        self.legacy_request_id = legacy

    def id_headers(self):
        """The id headers every answer carries (an error's too)."""
        ids = [("x-request-id", self.request_id)]
        if self.legacy_request_id:
            ids.append(("x-ms-request-id", self.legacy_request_id))
        if self.client_request_id:
            ids.append(("x-ms-client-request-id", self.client_request_id))
        return ids

    def join_trace(self, trace):
        """This request belongs to ``trace`` (III.9): run() sees this server's span as its traceparent."""
        self.trace = trace
        hmap = self.hmap
        headers = [h for h in self.headers if h[0].lower() not in ("traceparent", "tracestate")]
        headers.append(("traceparent", trace.traceparent))
        hmap["traceparent"] = trace.traceparent
        if trace.state:
            headers.append(("tracestate", trace.state))
            hmap["tracestate"] = trace.state
        else:
            hmap.pop("tracestate", None)
        self.headers = headers

    def title_case_headers(self):
        result = {}
        for name, value in self.headers:
            key = _title_case(name)
            result[key] = result[key] + "," + value if key in result else value
        return result

    def aml_request(self):
        if self._aml is None:
            self._aml = AMLRequest(self.method, self.target, _Headers._trusted(self.headers), self.body,
                                   self.client[0] if self.client else "127.0.0.1", self.server_address)
        return self._aml

    @property
    def full_target(self):
        return self.path + ("?" + self.query if self.query else "")

    def body_reservation(self, budget, max_body):
        """The bytes this request's body will take in memory: its Content-Length; for a chunked
        body, whose size is unknown until read, the whole budget (it is read alone)."""
        if self.body_kind == "chunked":
            return min(budget, max_body)
        return self.body_length

    def read_body(self, max_body):
        """Read the body now (once): bytes; HttpError 400/408/413 or _ClientGone."""
        if self.body is None:
            if self.body_kind == "chunked" or self.body_length:
                if (self.hmap.get("expect", "").lower() == "100-continue" and self.version == "HTTP/1.1"
                        and not self.reader.buf):
                    try:  # the client waits for this before it sends the body: only now that it will be read
                        self.socket.settimeout(self.reader.timeout)
                        self.socket.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    except OSError:
                        raise _ClientGone()
                if self.body_kind == "chunked":
                    self.body = _read_chunked(self.reader, max_body)[0]  # trailers are read and dropped
                else:
                    self.body = self.reader.read_exact(self.body_length)
            else:
                self.body = b""
        return self.body

    def take_body(self):
        """The body, handed over (run()'s argument is made from it): the request keeps no copy."""
        body, self.body = self.body, b""
        return body


def _read_request(reader, sock, client, server_address, config):
    """Read and check one request head: a Request whose body is still unread. HttpError or _ClientGone."""
    head = reader.read_head()
    method, target, version, headers, hmap = _parse_head(head)
    body_kind, body_length = _body_length(hmap, version, config.max_body_bytes)
    expect = hmap.get("expect")
    if expect is not None and expect.lower() != "100-continue":
        raise HttpError(417, "Only 'Expect: 100-continue' is supported.", close=True)
    return Request(method, target, version, headers, hmap, body_kind, body_length, client, server_address,
                   reader, sock)


def _parse_head(head):
    """Request line and headers -> (method, target, version, headers, hmap), or HttpError (400, 414, 431, 505)."""
    text = head.decode("latin-1")
    newline = text.find("\n")
    line = text if newline < 0 else text[:newline]
    block = "" if newline < 0 else text[newline + 1:] + "\n"
    match = _REQUEST_LINE_RE.match(line)
    fields = _HEADER_FIELD_RE.findall(block) if block else []
    # Fast path: every check in one go; anything unusual takes the careful path, which says what is wrong.
    if (match is None or _CONTROL_RE.search(text) or _BARE_CR_RE.search(text) or len(line) > _MAX_REQUEST_LINE
            or len(block) > _MAX_HEADER_BYTES or len(fields) > _MAX_HEADER_COUNT
            or (block and _HEADER_BLOCK_RE.fullmatch(block) is None)):
        _diagnose_head(head)  # raises the precise HttpError
        raise HttpError(400, "Malformed request head.", close=True)
    method, target, minor = match.groups()
    if "#" in target:  # a fragment is the client's business (RFC 9110 4.2.4), never the server's
        target = target[:target.index("#")]
    if target[:1] != "/":
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
    return method, target, "HTTP/1.1" if minor == "1" else "HTTP/1.0", headers, hmap


def _route_path(path):
    """The path a route is matched on, as the reference (werkzeug under gunicorn) matches it:
    percent-decoded, and runs of '/' merged (a base URL ending in '/' plus '/score' is '/score')."""
    if "%" in path:
        path = urllib.parse.unquote(path, errors="replace")
    if "//" in path:
        path = _SLASHES_RE.sub("/", path)
    return path


def _diagnose_head(head):
    """The careful parser: raises the HttpError that says what is wrong with a request head."""
    lines = head.split(b"\n")
    line = lines[0].rstrip(b"\r")
    if len(line) > _MAX_REQUEST_LINE:
        raise HttpError(414, "The request line is longer than %d bytes." % _MAX_REQUEST_LINE, close=True)
    if len(head) - len(lines[0]) > _MAX_HEADER_BYTES:
        raise HttpError(431, "The request headers are larger than %d bytes." % _MAX_HEADER_BYTES, close=True)
    if _BARE_CR_RE.search(head.decode("latin-1")):  # RFC 9112 2.2: a bare CR is invalid, never a line end
        raise HttpError(400, "A bare CR (not followed by LF) in the request line or headers.", close=True)
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


def _body_length(hmap, version, max_body):
    """How the body is framed: ('length', n) or ('chunked', None); 400/413/501 otherwise."""
    te = hmap.get("transfer-encoding")
    cl = hmap.get("content-length")
    if te is not None:
        if cl is not None:
            raise HttpError(400, "Both Content-Length and Transfer-Encoding were sent.", close=True)
        if version == "HTTP/1.0":
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
    if not _DIGITS_RE.match(value) or len(value) > _MAX_LENGTH_DIGITS:  # not isdigit(): it takes "²" and other digits
        raise HttpError(400, "Content-Length must be a non-negative integer.", close=True)
    length = int(value)
    if length > max_body:
        raise HttpError(413, "The request body is %d bytes; the limit is %d." % (length, max_body), close=True)
    return "length", length


def _read_chunked(reader, max_body):
    """A chunked body, strictly (RFC 9112 7.1): (body, trailer fields). Leniency here is how a
    request is smuggled past a proxy, so every line must be exactly what the grammar allows."""
    parts = []
    total = 0
    # One deadline for the whole body, as for a length body (not one per line or chunk, which a
    # client trickling a byte a chunk would never reach): it grows with the bytes announced.
    base = time.monotonic() + reader.timeout
    while True:
        line = reader.read_line(_MAX_CHUNK_LINE, "A chunk-size line", base + total / _MIN_UPLOAD_BYTES_PER_SECOND)
        match = _CHUNK_LINE_RE.match(line)
        if match is None:
            raise HttpError(400, "Malformed chunk-size line in a chunked body (hex digits, optional "
                            "';' extensions, then CRLF).", close=True)
        size = int(match.group(1), 16)
        if size == 0:
            break
        total += size
        if total > max_body:
            raise HttpError(413, "The request body is larger than the limit of %d bytes." % max_body, close=True)
        deadline = base + total / _MIN_UPLOAD_BYTES_PER_SECOND
        parts.append(reader.read_exact(size, deadline))
        if reader.read_exact(2, deadline) != b"\r\n":
            raise HttpError(400, "A chunk is not followed by CRLF.", close=True)
    trailers = []
    size = 0
    while True:  # the trailer section: fields, each on a CRLF line, then an empty line
        line = reader.read_line(_MAX_HEADER_BYTES, "A trailer line", base + total / _MIN_UPLOAD_BYTES_PER_SECOND)
        if line == b"\r\n":
            return b"".join(parts), trailers
        size += len(line)
        field = _TRAILER_FIELD_RE.match(line)
        if field is None:
            raise HttpError(400, "Malformed trailer section in a chunked body.", close=True)
        if len(trailers) >= _MAX_HEADER_COUNT or size > _MAX_HEADER_BYTES:
            raise HttpError(431, "The trailer section of a chunked body is too large.", close=True)
        trailers.append((field.group(1).decode("latin-1"), field.group(2).decode("latin-1")))


def _finish_body(req):
    """Before the next request on a connection: drop a body nobody read; False if it cannot be
    (too large, chunked, a client waiting for 100 Continue): then the connection closes."""
    if req.body is not None:
        return True
    if req.body_kind == "length" and req.body_length <= _DISCARD_BODY_BYTES and (
            not req.body_length or req.hmap.get("expect", "").lower() != "100-continue"):
        if req.body_length:
            try:
                req.reader.read_exact(req.body_length)
            except (HttpError, _ClientGone):
                return False
        return True
    return False


###############################################################################
# I.6  HTTP 3/6: route the request and decide the answer (one route table)
###############################################################################

def _json_body(message, extra=None):
    payload = {"message": message}
    if extra:
        payload.update(extra)
    return json.dumps(payload).encode("utf-8")


class Response:
    """What the server sends: status, headers, and a body (bytes) or a stream of chunks.

    ``close`` ends the connection after this answer (a request that could not be read whole,
    or a script's ``Connection: close``).
    """

    __slots__ = ("status", "headers", "body", "stream", "close")

    def __init__(self, status, headers=None, body=b"", stream=None, close=False):
        self.status = status
        self.headers = headers if headers is not None else []
        self.body = body
        self.stream = stream
        self.close = close

    @classmethod
    def json(cls, status, value, headers=None):
        return cls(status, [("Content-Type", "application/json")] + list(headers or ()),
                   json.dumps(value).encode("utf-8"))


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


#: A row of the route table, the whole truth about a path's methods: the handler; the methods routed to it
#: (any other is a 405 with Allow); the methods Allow lists; for /score, the methods that reach run() (None
#: elsewhere: the route answers OPTIONS itself); a wrapper around the whole answer (the emulated endpoint); and
#: for /score the script it serves, so that a reload swaps the script and its methods in one step.
_Route = collections.namedtuple("_Route", "handler methods allow run_methods wrapper script")

_GET_METHODS = ("GET", "HEAD", "OPTIONS")
_SCORE_METHODS = ("GET", "HEAD", "OPTIONS", "POST")
#: An undecorated or inference-schema run() gets GET and POST.  HEAD is routed to /score too (as Flask routes
#: HEAD wherever GET goes) and answered 405 there, OPTIONS 200; Allow lists what the reference's route has.
#: A @rawhttp run() gets every routed method, HEAD and OPTIONS included, and answers them itself.
_PLAIN_SCORE_ALLOW = ("GET", "OPTIONS", "POST")
_PLAIN_RUN_METHODS = ("GET", "POST")


class App:
    """Routes requests and answers them; holds the script, the run() pool and the counters.

    ``handle()`` is the one place where a request becomes an answer: routing, the common headers,
    and every error (an HttpError raised anywhere below it) rendered as JSON.
    """

    def __init__(self, config, script, telemetry=None, metrics=None, pool=None):
        self.config = config
        self.script = script
        self.script_error = None  # diagnostics of a failed reload: /score answers 503 until fixed
        self.pool = pool or _RunPool.from_config(config)
        self.telemetry = telemetry or Telemetry(config)
        self.tracer = _Tracer.from_config(config, self.telemetry)  # None unless something records traces
        self.metrics = metrics or Metrics()
        self.cors = _cors_origins(config.cors_origins)
        self._cors_lower = {o.lower() for o in self.cors}
        self.server_version = config.sends_server_version
        self.hide_details = bool(config.hide_error_details)
        self.timeout_s = config.scoring_timeout_ms / 1000.0
        self.draining = False  # start_drain() sets it once: every server of this app stops taking work
        self.server = None  # the main Server (serve_on()): its connection counts go into /metrics
        self.warn_once = _WarnOnce()
        self.routes = {
            "/": _Route(self.health, _GET_METHODS, _GET_METHODS, None, None, None),
            "/score": self._score_route(script),
            "/swagger.json": _Route(self.swagger, _GET_METHODS, _GET_METHODS, None, None, None),
        }
        if config.metrics:
            self.routes["/metrics"] = _Route(self.metrics_route, _GET_METHODS, _GET_METHODS, None, None, None)
        if _try_page_enabled(config):  # III.11: GET /try and the state it polls
            self.routes.update(_TryPage(self).routes)
        self.access_log = bool(config.access_log)

    def _score_route(self, script):
        """/score's row: its methods depend on the kind of run(), so a reload may change it."""
        # --emulate_endpoint: every /score answer, a 405 included, goes through the managed endpoint's rules.
        wrapper = self.config.endpoint.wrap if self.config.endpoint is not None else None
        if script is not None and script.mode == "raw":
            return _Route(self.score, _SCORE_METHODS, _SCORE_METHODS, _SCORE_METHODS, wrapper, script)
        return _Route(self.score, _SCORE_METHODS, _PLAIN_SCORE_ALLOW, _PLAIN_RUN_METHODS, wrapper, script)

    # -- one request ------------------------------------------------------------
    def handle(self, req, paths=None):
        """Answer one request: route it, call its handler, add the common headers, render errors."""
        path = req.path
        route = self.routes.get(path) if paths is None or path in paths else None
        matched = route is not None and (route.wrapper is not None or req.method in route.methods)
        try:
            try:
                ids = self._request_ids(req)
            except HttpError:
                if matched:
                    raise
                ids = req.request_id and req.id_headers()  # the reference routes first: 404, not 431
            if route is None:
                raise HttpError(404, _MSG_NOT_FOUND)
            if route.wrapper is not None:
                resp = route.wrapper(req, lambda req: self._dispatch(req, route))
            else:
                resp = self._dispatch(req, route)
        except HttpError as exc:
            if exc.status == 405 and route is not None:
                exc.headers.append(("Allow", ", ".join(route.allow)))
            resp = exc.response()
            ids = req.request_id and req.id_headers()
        except _ClientGone:
            raise
        except Exception as exc:  # a bug of ours: answer 500, keep the details in the log
            logger.exception("Internal error while handling %s %s", req.method, req.path)
            resp = HttpError(500, _MSG_INTERNAL, extra=None if self.hide_details else {
                "error": {"type": type(exc).__name__, "text": str(exc)}}).response()
        headers = resp.headers
        if ids:
            if path == "/score":  # a script cannot overwrite the request ids, however few headers it sends
                headers[:] = [h for h in headers if h[0].lower() not in _ID_HEADERS]
            headers.extend(ids)
        if self.server_version:
            headers.append(("x-ms-server-version", _SERVER_HEADER))
        trace = req.hmap.get("traceid")
        if trace is not None:
            headers.append(("TraceId", trace))
        if self.cors and matched:  # the reference's 404/405 from routing carry no CORS headers
            headers.extend(self._cors_headers(req))
        return resp

    @staticmethod
    def _dispatch(req, route):
        """The route's answer: a method it is not routed is a 405; OPTIONS outside /score is answered here."""
        if req.method not in route.methods:
            raise HttpError(405, _MSG_METHOD_NOT_ALLOWED)
        if req.method == "OPTIONS" and route.run_methods is None:
            return Response(200, [("Content-Type", "text/html; charset=utf-8"), ("Allow", ", ".join(route.allow))])
        return route.handler(req)

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
        """Decide the request's ids (431 when they are too long) and join its trace: the id headers."""
        req.decide_ids(self.warn_once)
        if self.tracer is not None:
            trace = self.tracer.begin(req)
            if trace is not None:
                req.join_trace(trace)
        return req.id_headers()

    # -- what its owners change, through these methods only ------------------------
    def serve_on(self, server):
        """``server`` is the main port's: /metrics reports its connections."""
        self.server = server

    def start_drain(self):
        """Stop taking work, on every port: /score and GET / answer 503, connections close after their answer."""
        self.draining = True

    def replace_script(self, script):
        """A reloaded script serves from the next request on (and a failed reload is forgotten)."""
        self.routes["/score"] = self._score_route(script)  # the script and its methods, swapped in one step
        self.script = script
        self.script_error = None

    def script_failed(self, info):
        """A reload failed: /score answers 503 with ``info`` until a later one succeeds."""
        self.script_error = info

    def gauges(self):
        """What /metrics reads from the owners of the state it reports, at one moment."""
        server, pool, telemetry = self.server, self.pool, self.telemetry
        return {
            "in_flight": server.in_flight if server else 0,
            "connections_open": server.open_connections if server else 0,
            "connections_busy": server.busy if server else 0,
            "handler_threads": server.handler_threads if server else 0,
            "buffered": pool.buffered,
            "buffered_peak": pool.buffered_peak,
            "buffered_limit": pool.body_budget if pool.body_budget != float("inf") else 0,
            "runs_stuck": pool.stuck,
            "runs_abandoned": pool.abandoned,
            "queued": pool.queued,
            "workers": self.config.worker_count,
            "workers_busy": pool.busy,
            "telemetry_sent": getattr(telemetry, "sent", 0),
            "telemetry_dropped": getattr(telemetry, "dropped", 0),
        }

    # -- routes -----------------------------------------------------------------
    def health(self, req):
        if self.draining:
            raise HttpError(503, "The server is shutting down.", headers=[("Retry-After", "1")], close=True)
        pool = self.pool
        if pool.stuck > pool.max_stuck:
            raise HttpError(503, "%d run() call(s) passed SCORING_TIMEOUT_MS and never returned (limit %d): "
                                  "this instance needs a restart." % (pool.stuck, pool.max_stuck))
        return Response(200, [("Content-Type", "text/html; charset=utf-8")], b"Healthy")

    def swagger(self, req):
        version = _query_first(req.query, "version")
        if version is None:  # ?version= (empty) is not valid; no parameter at all means 2
            version = "2"
        status, document = swagger_document(self.script, self.config, version)
        if status != 200:
            raise HttpError(status, document)
        return Response.json(200, document, [("x-ms-run-function-failed", "False")])

    def metrics_route(self, req):
        return Response(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                        self.metrics.render(self.gauges()).encode("utf-8"))

    def score(self, req):
        """/score: wait for the request's turn, read its body, run() it on the pool, encode the answer."""
        if self.draining:
            raise HttpError(503, "The server is shutting down; retry on another instance.",
                                  headers=[("Retry-After", "1")])
        route = self.routes["/score"]
        script = route.script  # read once, with its methods: a reload may swap both at any moment
        if self.script_error is not None:
            raise HttpError(503, "The score script failed to reload; fix it and save again.",
                            extra={"error": self.script_error})
        if req.method not in route.run_methods:
            return self._not_for_run(req)  # before the admission line: it will not call run()
        pool = self.pool
        max_body = self.config.max_body_bytes
        try:
            ticket = pool.enter(req.arrival, req.body_reservation(pool.body_budget, max_body),
                                req.start + self.timeout_s)
        except _Overloaded:
            self.metrics.count("rejected")
            raise HttpError(503, "The server is busy: all %d workers are scoring and %d requests are "
                            "waiting. Retry later." % (pool.workers, pool.queued), headers=[("Retry-After", "1")])
        except _WaitedTooLong:
            self.metrics.count("rejected")
            raise self._no_turn()
        try:
            req.read_body(max_body)
            if req.body_kind == "chunked":
                pool.resize(ticket, len(req.body))
            kwargs = script.arguments(req)
            run = script.run if req.trace is None else _Tracer.wrap(script.run, req.trace)
            job = pool.start(ticket, run, kwargs, req.request_id, req)
            # The deadline counts from when run() started, as the reference's; a request that could
            # not even start within it gets a 503 (the workers are stuck), not a timeout.
            if not _wait_watching_client(self, job, req, req.start + self.timeout_s - time.perf_counter()):
                if pool.withdraw(job):
                    self.metrics.count("rejected")
                    raise self._no_turn()
                if not _wait_watching_client(self, job, req, job.started + self.timeout_s - time.perf_counter()):
                    timeout = self._timed_out(req, job, script)  # logged, counted and given up on, whoever waits
                    if job.left:  # III.13: its client left; no answer is written
                        _drop_answer(self, req, job)
                    raise timeout
        finally:
            pool.leave(ticket)
        if job.left and not job.started:  # III.13: dropped before its run() started
            _drop_answer(self, req, job)
        self.metrics.observe_run(job.elapsed_ms / 1000.0)
        failure = self._run_failed(req, job, script) if job.error is not None else None  # logged either way
        if job.left:  # III.13: its client left while run() ran; no answer is written
            _drop_answer(self, req, job)
        if failure is not None:
            raise failure
        return self._encode_result(req, job, script)

    @staticmethod
    def _not_for_run(req):
        """A method run() does not take: OPTIONS is 200 (empty), any other 405."""
        if req.method == "OPTIONS":
            return Response(200, [("Content-Type", "text/html; charset=utf-8"), ("x-ms-run-function-failed", "False")])
        raise HttpError(405, _MSG_RUN_METHOD_NOT_ALLOWED)

    def _no_turn(self):
        return HttpError(503, "No worker became free within %s ms: every worker is still running an "
                         "earlier request. Retry later." % self.config.scoring_timeout_ms,
                         headers=[("Retry-After", "1")])

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
        given_up = self.pool.give_up(job, where)
        logger.error("Scoring timeout after %s ms for request %s.%s%s", ms, req.request_id, where,
                     " Interrupting it; its worker thread is replaced." if given_up else "")
        error = None
        if user:
            frames = [_frame_dict(f.filename, f.lineno, f.name, f.line, script.roots) for f in user]
            error = {"type": "TimeoutError", "text": "run() did not return within %s ms" % ms,
                     "location": frames[-1], "frames": frames}
        self.telemetry.track_exception(TimeoutError("Scoring timeout after %s ms" % ms), req, error)
        extra = {"error": error} if error and not self.hide_details else None
        return HttpError(500, "Scoring timeout after %s ms" % ms, extra=extra, run_failed=True)

    def _run_failed(self, req, job, script):
        exc = job.error
        info = describe_exception(exc, script.roots)
        logger.error("run() failed for request %s: %s\n%s", req.request_id, _format_diagnosis(info),
                     _traceback_text(exc), extra={"azmlinfsrv_error": info})
        self.metrics.count("run_errors")
        self.telemetry.track_exception(exc, req, info)
        _settle_logs()  # the traceback is in the log before the 500 goes out, as the reference's
        return HttpError(500, _MSG_RUN_FAILED, extra=None if self.hide_details else {"error": info},
                              run_failed=True)

    def _encode_result(self, req, job, script):
        result = job.result
        exec_ms = ("x-ms-run-fn-exec-ms", "%.3f" % job.elapsed_ms)
        if isinstance(result, AMLResponse):
            try:
                status, headers, body, chunks = result._wire()
            except TypeError as exc:  # a body chunk that is neither str nor bytes
                self._unencodable(req, exc, "an AMLResponse with a body chunk of type %s" % _chunk_type(result),
                                         "sent")
            if status < 200:  # 1xx is never a final answer: a client would wait for the real one forever
                logger.error("run() returned an AMLResponse with status %d for request %s: a 1xx status is "
                             "not a final answer, so the client gets a 500.", status, req.request_id)
                extra = None if self.hide_details else {"error": {
                    "type": "ValueError", "text": "run() returned status %d, which is not a final HTTP status"
                                                  % status}}
                raise HttpError(500, _MSG_INTERNAL, extra=extra, run_failed=True)
            if status >= 500:
                headers = [(n, v) for n, v in headers if n.lower() != "x-ms-run-function-failed"]
                headers.append(("x-ms-run-function-failed", "True"))
            headers = [(_clean_header_name(n), _clean_header_value(v)) for n, v in headers]
            headers.append(exec_ms)
            resp = Response(status, headers, body, chunks)
        else:
            if isinstance(result, str) and not self.warn_once.said("str-json") and result[:1] in ("{", "["):
                self._warn_double_encoding(result)
            try:
                body = b"{}" if result is None else json.dumps(result).encode("utf-8")
            except (TypeError, ValueError) as exc:
                self._unencodable(req, exc, type(result).__name__)
            resp = Response(200, [("Content-Type", "application/json"),
                                  ("x-ms-run-function-failed", "False"), exec_ms], body)
        if self.telemetry.enabled:
            self.telemetry.track_model_data(req, job.kwargs, result, script)
        return resp

    def _unencodable(self, req, exc, what, verb="JSON-encoded"):
        logger.error("run() returned a value that cannot be %s for request %s: %s: %s",
                     verb, req.request_id, type(exc).__name__, exc)
        extra = None if self.hide_details else {"error": {
            "type": type(exc).__name__, "text": str(exc),
            "hint": "run() returned %s; return JSON-serializable data or an AMLResponse." % what}}
        raise HttpError(500, _MSG_INTERNAL, extra=extra)

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

    # -- after the answer ---------------------------------------------------------
    def record(self, req, resp, sent):
        """Everything done once an answer is sent: metrics, the access line, telemetry."""
        duration = time.perf_counter() - req.start
        path = req.path
        self.metrics.count_request(path if path in self.routes else "(other)", resp.status, duration)
        if self.access_log and path in ("/score", "/swagger.json"):
            logger.info("%s %s %d %.3fms %s", req.method, req.full_target, resp.status, duration * 1000.0,
                        "N/A" if sent is None else sent)
        if path != "/" and self.telemetry.enabled:
            self.telemetry.track_request(req, resp, duration * 1000.0)
        if req.trace is not None:
            self.tracer.end(req, resp, duration)


def _new_request_id():
    """A random (version 4) UUID as text, without uuid.UUID's overhead."""
    h = os.urandom(16).hex()
    return "%s-%s-4%s-%s%s-%s" % (h[:8], h[8:12], h[13:16], "89ab"[int(h[16], 16) & 3], h[17:20], h[20:])


def _query_first(query, name):
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key == name:
            return value
    return None


###############################################################################
# I.7  HTTP 4/6: admission and run() (arrival order, a memory budget, the run() pool)
###############################################################################

class _Overloaded(Exception):
    """More requests are waiting than --max_queue allows: 503 at once."""


class _WaitedTooLong(Exception):
    """A request waited for its turn past its deadline: 503 with Retry-After."""


class _ScoringTimeout(BaseException):
    """Raised inside a run() that passed SCORING_TIMEOUT_MS, to get its worker thread back.

    A BaseException, so that a script's ``except Exception`` does not swallow it.
    """


class _Ticket:
    """A request's place in the admission line: its arrival order and the body bytes it holds."""

    __slots__ = ("order", "size")

    def __init__(self, order, size):
        self.order = order
        self.size = size

    def __lt__(self, other):
        return self.order < other.order


class _Job:
    """One call handed to the pool; ``wait(timeout)`` is True once it has finished.

    ``state``: queued -> running -> done; or withdrawn (never started: its client got a 503), or
    abandoned (still running past its deadline: its thread was interrupted and replaced).
    """

    __slots__ = ("func", "kwargs", "request_id", "order", "_done", "finished", "result", "error", "elapsed_ms",
                 "thread_id", "started", "state", "where", "ticket", "client", "left")

    def __init__(self, func, kwargs, request_id, order):
        self.func = func
        self.kwargs = kwargs
        self.request_id = request_id
        self.order = order
        self._done = threading.Lock()  # held until the job finishes: cheaper than an Event
        self._done.acquire()
        self.finished = False
        self.result = self.error = None
        self.elapsed_ms = 0.0
        self.thread_id = None
        self.started = 0.0  # perf_counter() when run() began
        self.state = "queued"
        self.where = ""
        self.ticket = None  # its request's place in the admission line (None: init() or a reload)
        self.client = None  # III.13: its Request, when it waits for a worker (its client is looked at first)
        self.left = 0.0  # III.13: perf_counter() when its client was found gone

    def wait(self, timeout=None):
        if self.finished:
            return True
        if timeout is None:
            return self._done.acquire()
        return timeout > 0 and self._done.acquire(True, timeout)


class _RunPool:
    """The run() calls: at most ``workers`` at once, started in the order their requests arrived,
    with the request bodies they hold in memory under ``body_budget`` bytes.

    A request first ``enter()``s: it waits (in arrival order) until its body fits the budget (one
    body larger than the budget is taken when no other is held), and only then is its body read.
    ``start()`` queues its run() call; workers take the earliest arrival first, and a body counts
    against the budget until its run() starts (from then on it is one of at most ``workers`` bodies
    being scored). ``leave()``, once the request is answered, gives its place back. run() executes on the pool's threads so that a
    connection can answer a timeout while run() is still blocked (even in C code); ``give_up()``
    then interrupts it and puts a new thread in its place, so the pool's capacity comes back at
    once. init() runs on a pool thread too, so that with one worker init() and run() share a
    thread, as in the reference's workers.

    This class owns the admission line, the run queue, the budget and the counts of busy, stuck
    and abandoned calls; one lock guards them all.
    """

    def __init__(self, workers, max_queue, body_budget=None, max_stuck=None):
        self.workers = workers
        self.max_queue = max_queue
        self.body_budget = body_budget if body_budget else float("inf")
        self.max_stuck = workers if max_stuck is None else max_stuck
        self._lock = threading.Lock()
        self._turns = threading.Condition(self._lock)  # admission: a ticket's turn may have come
        self._tokens = queue.SimpleQueue()  # one token per queued job (or per worker to stop): wakes a worker
        self._waiting = []  # tickets waiting for admission, sorted by arrival
        self._jobs = []  # heap of (arrival, seq, job)
        self._seq = itertools.count()
        self._stopping = False
        self.pending = 0  # requests entered and not left: waiting, reading a body, queued or running
        self.busy = 0  # run() calls executing on a live worker
        self.buffered = 0  # body bytes held by admitted requests
        self.buffered_peak = 0
        self.stuck = 0  # calls given up on that have not returned yet
        self.abandoned = 0  # calls given up on, ever
        self.stuck_at = {}  # thread id -> where its call was when given up on
        for _ in range(workers):
            self._spawn()

    @classmethod
    def from_config(cls, config):
        return cls(config.worker_count, config.max_queue, config.max_buffered_bytes, config.max_stuck_runs)

    @property
    def queued(self):
        return max(0, self.pending - self.busy)

    def _spawn(self):
        threading.Thread(target=self._work, name="azmlinfsrv-worker", daemon=True).start()

    # -- admission ------------------------------------------------------------------------
    def enter(self, order, size, deadline):
        """Wait for this request's turn (arrival ``order``, ``size`` body bytes); a _Ticket.
        _Overloaded when the line is full, _WaitedTooLong past ``deadline`` (perf_counter)."""
        ticket = _Ticket(order, size)
        with self._lock:
            if self.pending >= self.workers + self.max_queue:
                raise _Overloaded()
            self.pending += 1
            if not self._waiting and self._fits(size):  # the usual case: nobody ahead, room in the budget
                self._hold(size)
                return ticket
            bisect.insort(self._waiting, ticket)
            while self._waiting[0] is not ticket or not self._fits(size):
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._stopping:
                    self._waiting.remove(ticket)
                    self.pending -= 1
                    self._turns.notify_all()
                    raise _WaitedTooLong()
                self._turns.wait(remaining)
            self._waiting.pop(0)
            self._hold(size)
            self._turns.notify_all()  # the next in line may fit too
            return ticket

    def _fits(self, size):
        return self.buffered == 0 or self.buffered + size <= self.body_budget

    def _hold(self, size):
        self.buffered += size
        if self.buffered > self.buffered_peak:
            self.buffered_peak = self.buffered

    def resize(self, ticket, size):
        """A body read at last (chunked: it reserved the whole budget): it holds its real size now."""
        with self._lock:
            self.buffered += size - ticket.size
            ticket.size = size
            if self._waiting:
                self._turns.notify_all()

    def leave(self, ticket):
        """The request is answered (or failed): its place and its body bytes are free."""
        with self._lock:
            self.pending -= 1
            self.buffered -= ticket.size
            if self._waiting:
                self._turns.notify_all()

    # -- running --------------------------------------------------------------------------
    def start(self, ticket, func, kwargs, request_id=None, client=None):
        """Queue run() for an admitted request; workers take the earliest arrival first."""
        job = _Job(func, kwargs, request_id, ticket.order)
        job.ticket = ticket
        with self._lock:
            if self.busy + len(self._jobs) >= self.workers:  # III.13: no worker free for it: it waits
                job.client = client
            heapq.heappush(self._jobs, (ticket.order, next(self._seq), job))
        self._tokens.put(None)
        return job

    def call(self, func):
        """Run ``func()`` on a pool thread and wait for it (init, reload); re-raises its exception."""
        job = _Job(func, {}, None, 0)  # ahead of every request
        with self._lock:
            heapq.heappush(self._jobs, (0, next(self._seq), job))
        self._tokens.put(None)
        job.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _work(self):
        try:
            while self._run_one():
                pass
        except _ScoringTimeout:  # landed after the given-up run() returned: this thread ends anyway
            self._returned(threading.get_ident())

    def _run_one(self):
        """Take the earliest job and run it; False when this thread must end."""
        lock = self._lock
        self._tokens.get()  # a job was queued (the earliest one is taken, not necessarily that one)
        with lock:
            if not self._jobs:  # the token of stop()
                return False
            job = heapq.heappop(self._jobs)[2]
            if job.state == "withdrawn":
                return True
            if job.client is not None and _client_left(job.client):  # III.13: nobody waits for its answer
                job.state = "dropped"
                job.left = time.perf_counter()
                job.finished = True
                job._done.release()
                return True
            job.state = "running"
            self.busy += 1
            ticket = job.ticket
            if ticket is not None and ticket.size:  # a body in run() is the worker's, no longer waiting:
                self.buffered -= ticket.size        # the next in line may be read now
                ticket.size = 0
                if self._waiting:
                    self._turns.notify_all()
            job.thread_id = threading.get_ident()
            job.started = start = time.perf_counter()
        _context.request_id = job.request_id
        try:
            job.result = job.func(**job.kwargs)
        except BaseException as exc:  # user code may raise anything, SystemExit included
            job.error = exc
        job.elapsed_ms = (time.perf_counter() - start) * 1000.0
        _context.request_id = None
        _settle_logs()  # run()'s print() lines are written before its answer, as the reference's
        with lock:
            given_up = job.state == "abandoned"
            if not given_up:
                job.state = "done"
                self.busy -= 1
        if given_up:
            self._returned(job.thread_id, job)
            return False  # a new thread took this one's place
        job.finished = True
        job._done.release()
        return True

    def withdraw(self, job):
        """Withdraw a job no worker has started (its client gets a 503); False if one already has."""
        with self._lock:
            if job.state != "queued":
                return False
            job.state = "withdrawn"
            return True

    def give_up(self, job, where=""):
        """A run() past its deadline: interrupt it (an asynchronous exception in its thread, which
        takes effect when Python code runs there again) and replace its thread. True if it was running."""
        with self._lock:
            if job.state != "running":
                return False
            job.state = "abandoned"
            job.where = where
            self.busy -= 1
            self.stuck += 1
            self.abandoned += 1
            self.stuck_at[job.thread_id] = where.strip() or "(no line of the script on its stack)"
            replace = not self._stopping
            over = self.stuck > self.max_stuck
            stuck, stuck_at = self.stuck, "; ".join(self.stuck_at.values())
        # Outside the lock: admission must not wait on a thread start or a slow log sink. The interrupt is
        # safe here too: if run() has just returned, its thread sees "abandoned" and ends all the same.
        if replace:
            self._spawn()
        _interrupt_thread(job.thread_id)
        if over:
            logger.error("%d run() call(s) passed SCORING_TIMEOUT_MS and have not returned (limit %d): GET / "
                         "answers 503 so that the orchestrator restarts this instance. Stuck at: %s",
                         stuck, self.max_stuck, stuck_at)
        return True

    def _returned(self, thread_id, job=None):
        """A thread whose call was given up on came back: it is no longer stuck, and it ends."""
        with self._lock:
            if self.stuck_at.pop(thread_id, None) is not None:
                self.stuck -= 1
        if job is not None:
            logger.warning("The run() of request %s that was given up on returned after %.0f ms%s.",
                           job.request_id, job.elapsed_ms,
                           " (interrupted)" if isinstance(job.error, _ScoringTimeout) else "")

    def where(self, job):
        """The stack of the thread running ``job`` now, innermost last."""
        frame = sys._current_frames().get(job.thread_id) if job.thread_id else None
        return traceback.extract_stack(frame) if frame is not None else []

    def stop(self):
        with self._lock:
            self._stopping = True
            self._turns.notify_all()
            threads = self.workers + self.stuck
        for _ in range(threads):
            self._tokens.put(None)


def _interrupt_thread(thread_id):
    """Raise _ScoringTimeout in another thread, at its next Python instruction (CPython's
    PyThreadState_SetAsyncExc; a thread blocked in C code sees it when it comes back)."""
    try:
        import ctypes
        set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    except (ImportError, AttributeError):  # not CPython: the thread is replaced all the same
        return False
    return set_async_exc(ctypes.c_ulong(thread_id), ctypes.py_object(_ScoringTimeout)) == 1


###############################################################################
# I.8  HTTP 5/6: the script (load it, analyse run(), build its arguments)
###############################################################################

_context = threading.local()  # request_id of the request a worker thread is scoring; its trace (III.9)


class _UserPrint:
    """print() for the user's script: stdout goes to the ``azmlinfsrv.print`` logger."""

    def __call__(self, *objects, sep=" ", end="\n", file=None, flush=False):
        if file is None or file is sys.stdout:
            _print_logger.info((sep if sep is not None else " ").join(map(str, objects)))
        else:
            print(*objects, sep=sep, end=end, file=file, flush=flush)


_user_print = _UserPrint()


def _is_json_type(mimetype):
    """application/json or application/*+json, as werkzeug's is_json decides (for requests and answers)."""
    return mimetype is not None and (mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")))


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
        self._swagger = None  # (documents, versions): swagger_documents() builds them once

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
                               _traceback_text(exc, skip_imports=True))
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
                               % _relative_to_roots(self.path, self.roots), EXIT_SCRIPT, info,
                               _traceback_text(exc, skip_imports=True))

    def arguments(self, request):
        """run()'s keyword arguments for a request; HttpError (400, 415) when there are none."""
        method = request.method
        if self.mode == "raw":
            kwargs = {self.data_param: request.aml_request()}
        elif method == "POST":
            if self.mode == "text":
                try:
                    kwargs = {self.data_param: request.take_body().decode("utf-8")}
                except UnicodeDecodeError as exc:
                    raise HttpError(400, "Input cannot be decoded as UTF-8: %s" % exc)
            else:
                kwargs = self._schema_post(request)
        else:  # GET: the route table lets nothing else reach run() (App._score_route)
            query = _query_to_object(request.query)
            if self.mode == "text":
                kwargs = {self.data_param: json.dumps(query)}
            else:
                kwargs = self._pick(query)
        if self.wants_headers:
            kwargs["request_headers"] = request.title_case_headers()
        return kwargs

    def _schema_post(self, request):
        if not _is_json_type(_parse_options_header(request.header("content-type"))[0]):
            raise HttpError(415, "Expects Content-Type to be application/json")
        try:
            body = json.loads(request.body)
        except ValueError as exc:
            if request.body:
                raise HttpError(400, "POST body could not be decoded as JSON: %s" % exc)
            raise HttpError(400, "POST body is empty. Expecting a JSON dictionary.")
        if not isinstance(body, dict):
            raise HttpError(400, "POST body should be a JSON dictionary.")
        return self._pick(body)

    def _pick(self, values):
        kwargs = {}
        for param in self.schema_params:
            value = values.get(param.name, param.default)
            if value is inspect.Parameter.empty:
                raise HttpError(400, "A value is not provided for the %r parameter." % param.name)
            kwargs[param.name] = value
        return kwargs

    def swagger_documents(self, config, build):
        """Its swagger.json documents (III.1), built by ``build`` the first time they are asked for."""
        if self._swagger is None:
            self._swagger = build(self, config)
        return self._swagger

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
                if count > _MAX_WATCHED_FILES:
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


def _resolve_entry_script(config):
    """The entry script's real path; with a config file but no entry script, main.py in the app root."""
    entry = config.entry_script
    if entry:
        return os.path.realpath(os.path.join(config.app_root, entry))
    mlflow_folder = _mlflow_model_folder(config)  # III.12: no entry script, an MLflow model: Azure's no-code script
    if mlflow_folder:
        return os.path.join(mlflow_folder, _MLMODEL)
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
    _export_deployment_environment(config)
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
    if config.sends_server_version:
        env["HTTP_X_MS_SERVER_VERSION"] = _SERVER_HEADER
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
        _print_reference_banner(config, telemetry)
    logger.info("Starting up app insights client")  # the reference's line (its e2e tests look for it)
    _install_compat_modules()
    _install_monitoring_shim(config)  # III.12
    script = _script_for(script_path, config).load()
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
    _user_logger.info("Users's init has completed successfully")  # sic: the reference's line, word for word
    swagger_documents(script, config)
    logger.info("Scoring timeout is set to %s", config.scoring_timeout_ms)
    return script


###############################################################################
# I.9  HTTP 6/6: write the answer (framing no script can break)
###############################################################################

#: Headers that describe the connection or the framing, not the answer: the server decides them
#: (as gunicorn and werkzeug do), whatever a script puts in its AMLResponse.
_CONNECTION_HEADERS = frozenset(("connection", "content-length", "keep-alive", "proxy-connection", "te",
                                 "trailer", "transfer-encoding", "upgrade"))


def _write_answer(sock, resp, version, keep, head_only, timeout, warn_once, req=None, script=None):
    """Send one answer: (keep the connection, body bytes sent or None for a stream).

    The framing is ours alone: a 1xx, 204 or 304 never carries a body, Content-Length or
    Transfer-Encoding; a script's own framing and connection headers are dropped (its
    ``Connection: close`` is honoured), and its Date and Server replace ours instead of doubling them.
    ``warn_once`` says what a script did wrong, once; ``script`` locates a stream that broke off.
    """
    status = resp.status
    keep = keep and not resp.close and status not in (408, 413)
    headers = resp.headers
    date = server = None
    kept = []
    for name, value in headers:
        lower = name.lower()
        if lower in _CONNECTION_HEADERS:
            if lower == "connection" and "close" in value.lower():
                keep = False
            elif lower not in ("connection", "content-length", "transfer-encoding"):
                warn_once(("hop", lower), "run() set the %s header, which belongs to the connection; "
                              "the server decides it. (Logged once.)", name)
            continue
        if lower == "date":
            date = value
        elif lower == "server":
            server = value
        else:
            kept.append((name, value))
    body, stream = resp.body, resp.stream
    framing = []
    if status < 200 or status in (204, 304):
        if body or stream is not None:
            warn_once(("bodyless", status), "A %d answer cannot carry a body; the body run() gave was "
                          "dropped. (Logged once per status.)", status)
            if stream is not None:
                _close_iterable(stream)
            body, stream = b"", None
    elif stream is not None:
        if version == "HTTP/1.1":
            framing.append("Transfer-Encoding: chunked")
        else:
            keep = False  # HTTP/1.0: the end of the body is the end of the connection
    else:
        framing.append("Content-Length: %d" % len(body))
    framing.append("Connection: keep-alive" if keep else "Connection: close")
    head = _head_bytes(status, kept, date, server, framing)
    sent = None
    try:
        sock.settimeout(timeout)  # a client that does not read our answer is dropped after --client_timeout
        if stream is None:
            _send_parts(sock, head, b"" if head_only else body)
            sent = len(body)
        else:
            sock.sendall(head)
            if head_only:
                _close_iterable(stream)
            elif not _send_stream(sock, stream, version == "HTTP/1.1", req, script):
                keep = False
    except OSError:
        keep = False
    return keep, sent


def _head_bytes(status, headers, date, server, framing):
    """Status line and header block, ready to send: the headers, Date, Server, then framing."""
    lines = ["HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Unknown"))]
    lines += [name + ": " + value for name, value in headers]
    lines.append("Date: " + (date or _http_date()))
    lines.append("Server: " + (server or _SERVER_HEADER))
    lines += framing
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


_date_cache = [0, ""]


def _http_date():
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = email.utils.formatdate(now, usegmt=True)
    return _date_cache[1]


def _send_parts(sock, head, body):
    """Head and body in one write; large bodies by scatter-gather, without joining them in memory."""
    if len(body) < _SCATTER_BYTES or not _CAN_SENDMSG:
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


def _send_stream(sock, stream, chunked, req, script):
    """Send a generator's chunks as they come; False if the stream broke."""
    try:
        for chunk in stream:
            data = _to_bytes(chunk)
            if not data:
                continue
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
    except OSError:
        _close_iterable(stream)
        return False
    except BaseException as exc:  # the script's generator runs here, on the connection's thread: SystemExit too
        info = describe_exception(exc, script.roots if script else [])
        logger.error("The streamed response of request %s broke off: %s", req.request_id if req else "?",
                     _format_diagnosis(info))
        return False  # no terminating chunk: the client sees an incomplete response, not a short one
    if chunked:
        sock.sendall(b"0\r\n\r\n")
    return chunked


def _close_iterable(iterable):
    close = getattr(iterable, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass


###############################################################################
# I.10  Start and stop: logging, bind, banner, one running server, signals and drain
###############################################################################

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
        if _register_at_fork is not None:  # a forked worker needs its own pump thread
            _register_at_fork(after_in_child=self._start)

    def _start(self):
        self._records = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._pump, name="azmlinfsrv-log", daemon=True)
        self._thread.start()

    def handle(self, record):
        if self.filter(record):
            self._records.put(record)
            _log_queued.pending = True
            return True
        return False

    emit = handle

    def _pump(self):
        records = self._records
        while True:
            batch = [records.get()]
            while len(batch) < _LOG_BATCH_LINES:
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

    def flush(self, timeout=_LOG_FLUSH_SECONDS):
        """Wait until every line queued so far is written."""
        if threading.current_thread() is self._thread:
            return
        marker = threading.Event()
        self._records.put(marker)
        marker.wait(timeout)


_log_queued = threading.local()  # pending: this thread queued a line that may not be written yet


def _flush_logs():
    for handler in logger.handlers:
        if isinstance(handler, _LogPump):
            handler.flush()


def _new_request_on_this_thread():
    """A new request on this handler thread: what the thread queued for an earlier answer need not be
    waited for, and the earlier request's trace (III.9), if its answer was never recorded (a client that
    left), must not label this one's log lines."""
    _log_queued.pending = False
    _context.trace = None


def _settle_logs():
    """Wait until the lines this thread queued are written, if it queued any since it last waited.

    Called before an answer goes out: the reference writes run()'s print() lines and its traceback
    synchronously, so whoever holds the answer (its black-box tests, then SIGKILL) finds them in the log.
    """
    if getattr(_log_queued, "pending", False):
        _log_queued.pending = False
        _flush_logs()


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
            if config.log_format == "json":
                logger.warning("--log_format json is ignored: %s decides the log format.", path)
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
    for handler in logger.handlers:
        if getattr(handler, "_azmlinfsrv", False):
            _JsonLogs.apply(handler, config.log_format == "json")
    logger.setLevel(level)


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
    for folder, dirs, names in os.walk(path, followlinks=True):  # --deployment links the model in
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
        if total > _MAX_BANNER_ENTRIES:
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


def _print_reference_banner(config, telemetry=None):
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


def _print_banner(config, app, address, health_address=None):
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
        "Entry script: %s" % getattr(app.script, "banner_text", app.script.path),
        "Model dir:    %s" % (config.model_folder or "(not set)"),
    ]
    lines += _model_dir_lines(config.model_folder)
    lines += [
        "Workers:      %d run() at once, queue %d, timeout %d ms%s" % (
            config.worker_count, config.max_queue, config.scoring_timeout_ms,
            ", %d processes" % config.processes if config.processes > 1 else ""),
        "Telemetry:    %s" % (("on, to " + app.telemetry.destination) if app.telemetry.enabled else "off"),
        "Reload:       %s" % ("on (watching %d .py files under %s)" % (
            len(app.script.watched_files()), ", ".join(app.script.roots)) if config.reload else "off"),
    ]
    if config.deployment_info is not None:
        lines += config.deployment_info.banner_lines(config)
    elif config.endpoint is not None:
        endpoint = config.endpoint
        lines.append("Endpoint:     emulated with the cloud's defaults (request_timeout_ms %d, 429 beyond %d "
                     "in flight)" % (endpoint.request_timeout_ms, endpoint.limit))
    lines += [
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
    if "/try" in app.routes:
        lines.append("  Try page:       GET  http://%s:%s/try" % (shown, port))
    lines += ["", "Try:  curl -d '{\"x\": 1}' http://%s:%s/score" % (shown, port), ""]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


class _RunningServer:
    """One running server in this process: app, listener(s), serving threads, reloader."""

    def __init__(self, config, sock, health_sock=None, banner=False):
        # Telemetry first: what the script prints and logs at import and in init() reaches App Insights too.
        telemetry = Telemetry(config)
        pool = _RunPool.from_config(config)
        port = sock.getsockname()[1]
        health_port = config.health_port_beside(port)
        try:
            script = load_script(config, pool, (port, health_port), telemetry, banner)
        except BaseException as exc:
            if isinstance(exc, StartupError) and exc.traceback_text and exc.diagnostics:
                telemetry.track_exception(exc, None, exc.diagnostics)  # the import or init() raised
            telemetry.close(timeout=_TELEMETRY_CLOSE_SECONDS)  # what the import or init() logged before failing still goes out
            pool.stop()
            raise
        self.config = config
        self.health = None
        try:
            self.app = App(config, script, telemetry, pool=pool)
            self.server = Server(sock, self.app)
            self.app.serve_on(self.server)
            if health_port:
                # The same app, serving only the liveness probe: one drain state, one set of counters.
                self.health = Server(health_sock or _bind(config, port=config.health_port), self.app, paths=("/",))
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
                thread = threading.Thread(target=server.serve_forever, name="azmlinfsrv-accept", daemon=True)
                thread.start()
                self._threads.append(thread)
        if self.reloader:
            self.reloader.start()
        return self

    def drain(self, grace):
        """Stop taking work, let requests in flight finish (up to ``grace`` s), flush, close."""
        app = self.app
        app.start_drain()
        if self.reloader:
            self.reloader.stopped.set()
        deadline = time.monotonic() + grace
        servers = [s for s in (self.server, self.health) if s is not None]
        for server in servers:
            server.close_idle_connections()
        while any(s.busy_connections for s in servers) and time.monotonic() < deadline:
            time.sleep(_DRAIN_POLL_SECONDS)
        unfinished = sum(s.busy_connections for s in servers)
        for server in servers:
            server.shutdown()
            server.server_close()
        close_in = max(1.0, min(_TELEMETRY_CLOSE_SECONDS, deadline - time.monotonic()))
        app.telemetry.close(timeout=close_in)
        if app.tracer is not None:
            app.tracer.close(timeout=close_in)
        app.pool.stop()
        return unfinished


def _run_forever(config, sock, banner=True, health_sock=None, replace_when_stuck=False, before_serving=None):
    """Serve in this process until SIGTERM or Ctrl+C; returns the exit code.

    ``replace_when_stuck`` (a pre-forked worker): when more run() calls are stuck than
    --max_stuck_runs allows, drain and exit with EXIT_STUCK, and the parent starts a fresh process.
    ``before_serving()``, if given, is called once the script is loaded, before the first accept.
    """
    if os.getpid() == 1:
        # PID 1 in a container: the kernel drops a signal that has no handler, so a SIGTERM during
        # init() (a model still loading) would wait for the platform's SIGKILL. Nothing is in flight
        # yet: stop at once, as any other process would (exit 143, killed by SIGTERM).
        def on_early_signal(signum, frame):
            logger.warning("SIGTERM before start-up finished: stopping without serving.")
            _flush_logs()
            os._exit(128 + signum)

        signal.signal(signal.SIGTERM, on_early_signal)
    instance = _RunningServer(config, sock, health_sock, banner=banner)
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
        _print_banner(config, instance.app, instance.address,
                instance.health.server_address if instance.health else None)
    if before_serving is not None:
        before_serving()
    instance.start()
    logger.info("Worker with pid %d ready for serving traffic", os.getpid())
    pool = instance.app.pool
    stuck = False
    while not stop.wait(_STUCK_POLL_SECONDS):
        if replace_when_stuck and pool.stuck > pool.max_stuck:
            logger.error("Process %d has %d stuck run() call(s) (limit %d): it stops and a new one takes its place.",
                         os.getpid(), pool.stuck, pool.max_stuck)
            stuck = True
            break
    name = "SIGTERM" if received and received[0] == signal.SIGTERM else "Ctrl+C"
    if stuck:
        instance.drain(config.grace_period)
        _flush_logs()
        return EXIT_STUCK
    in_flight = instance.server.in_flight
    unfinished = instance.drain(config.grace_period)
    if unfinished:
        logger.warning("Shut down on %s after %.0f s grace with %d request(s) unfinished.", name,
                       config.grace_period, unfinished)
    else:
        logger.info("Shut down on %s: %d request(s) in flight finished, telemetry flushed.", name, in_flight)
    _flush_logs()
    return EXIT_OK


def _limit_malloc_arenas(arenas=_MALLOC_ARENAS):
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core), and a freed
    large body stays in the arena of the thread that read it: with many handler threads reading
    1 MB bodies, peak memory was 2.4x the single-threaded reference's. Two arenas keep it near
    (1.4x, bench/bench.py echo-1MB at 64 connections) and were faster too. MALLOC_ARENA_MAX, when
    set, is glibc's own and wins; elsewhere (musl, macOS, Windows) this does nothing."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return False
    return mallopt(_M_ARENA_MAX, arenas) == 1


def run_server(config):
    """Start the server described by ``config`` and serve until stopped; returns an exit code."""
    _limit_malloc_arenas()  # before the server's threads exist: their arenas are made as they first allocate
    script_path = _resolve_entry_script(config)
    _configure_logging(config, script_path)
    for warning in config.warnings:
        logger.warning(warning)
    if _try_page_enabled(config) and config.try_cases:
        _try_cases(config)  # III.11: a bad --try_cases file stops start-up before any script loads or forks
    sock = _bind(config)
    try:
        _start_debugger(config)  # AZUREML_DEBUG_PORT: before any run-pool thread is created
        if config.processes > 1:
            if not _CAN_FORK:
                logger.warning("--processes needs os.fork (POSIX); serving with threads in one process.")
            else:
                # Every process serves the health port too: bind it once, here, and share it like the main port.
                if config.health_port_beside(config.port):
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


###############################################################################
#                              PART II  WHAT A SCORE SCRIPT SEES
###############################################################################


###############################################################################
# II.1  rawhttp and AMLRequest: what run() is given
###############################################################################

# Functions marked by @rawhttp; the loader checks it per load.  Marking any function makes run() raw, as
# the reference's rawhttp does by setting its module global _rawHttpRequested: that is compatibility, not a bug.
_rawhttp_uses = []


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


#: werkzeug's (flask's) public Request attributes; those AMLRequest lacks raise an AttributeError naming them.
_WERKZEUG_REQUEST_NAMES = frozenset("""
accept_charsets accept_encodings accept_languages accept_mimetypes access_control_request_headers
access_control_request_method access_route application args authorization base_url blueprint blueprints
cache_control close content_encoding content_length content_md5 content_type cookies data date
dict_storage_class endpoint files form form_data_parser_class from_values full_path get_data get_json host
host_url if_match if_modified_since if_none_match if_range if_unmodified_since input_stream is_json
is_multiprocess is_multithread is_run_once is_secure json json_module list_storage_class
make_form_data_parser max_content_length max_form_memory_size max_form_parts max_forwards mimetype
mimetype_params on_json_loading_failed origin parameter_storage_class pragma range referrer remote_user
root_url routing_exception script_root stream trusted_hosts url url_root url_rule user_agent
user_agent_class values view_args want_form_data_parsed method scheme server root_path path query_string
headers remote_addr environ shallow""".split())


class AMLRequest:
    """The request a ``@rawhttp`` run() receives: werkzeug's (flask's) Request for what score
    scripts use -- method, path, url, args, headers, cookies, get_data(), get_json(), form, files,
    stream, environ and the rest listed in the README.  A werkzeug attribute it lacks raises an
    AttributeError that names it.

    The body is read once, as werkzeug's: after ``stream.read()`` the data is gone, after
    ``get_data()`` the stream is at its end.
    """

    root_path = ""
    script_root = ""

    def __init__(self, method, target, headers, body, remote_addr="127.0.0.1", server=("127.0.0.1", 5001),
                 scheme="http"):
        self.method = method.upper()
        path, _, query = target.partition("?")
        self.path = "/" + urllib.parse.unquote(path).lstrip("/")
        self.query_string = query.encode("latin-1", "replace")
        self.headers = headers if isinstance(headers, _Headers) else _Headers._trusted(headers)
        self.remote_addr = remote_addr
        self.scheme = scheme
        self.server = tuple(server[:2]) if server else None
        self._body = body
        self._stream = None
        self._cached = None  # get_data()'s bytes, once read
        self._form = None
        self._files = None
        self._json_cache = {}

    def __getattr__(self, name):  # only called when normal lookup failed
        if name in _WERKZEUG_REQUEST_NAMES:
            raise AttributeError(_unsupported(type(self).__name__, name, _AMLREQUEST_SUPPORTED))
        raise AttributeError("%r object has no attribute %r" % (type(self).__name__, name))

    # -- URL ------------------------------------------------------------------
    @property
    def args(self):
        return _MultiDict(urllib.parse.parse_qsl(self.query_string.decode("utf-8", "replace"),
                                                 keep_blank_values=True, errors="replace"))

    @property
    def full_path(self):
        return self.path + "?" + self.query_string.decode("utf-8", "replace")

    @property
    def host(self):
        host = self.headers.get("Host")
        if host is None:
            if not self.server or self.server[1] is None:
                return ""
            name = str(self.server[0])
            host = "%s:%s" % ("[%s]" % name if ":" in name and name[0] != "[" else name, self.server[1])
        suffix = {"http": ":80", "ws": ":80", "https": ":443", "wss": ":443"}.get(self.scheme)
        if suffix and host.endswith(suffix):
            host = host[:-len(suffix)]
        return host

    @property
    def host_url(self):
        return _current_url(self.scheme, self.host)

    @property
    def root_url(self):
        return _current_url(self.scheme, self.host, "")

    url_root = root_url

    @property
    def base_url(self):
        return _current_url(self.scheme, self.host, self.path)

    @property
    def url(self):
        return _current_url(self.scheme, self.host, self.path, self.query_string)

    @property
    def is_secure(self):
        return self.scheme in ("https", "wss")

    # -- headers --------------------------------------------------------------
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
        if self.headers.get("Transfer-Encoding", "") == "chunked":
            return None
        value = self.headers.get("Content-Length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    @property
    def content_encoding(self):
        return self.headers.get("Content-Encoding")

    @property
    def user_agent(self):
        return _UserAgent(self.headers.get("User-Agent", ""))

    @property
    def authorization(self):
        return _Authorization.from_header(self.headers.get("Authorization"))

    @property
    def origin(self):
        return self.headers.get("Origin")

    @property
    def referrer(self):
        return self.headers.get("Referer")

    @property
    def cookies(self):
        return _MultiDict(_parse_cookie(";".join(self.headers.getlist("Cookie"))))

    @property
    def access_route(self):
        forwarded = self.headers.get("X-Forwarded-For")
        if forwarded is not None:
            return [ip.strip() for ip in urllib.request.parse_http_list(forwarded)]
        return [self.remote_addr] if self.remote_addr is not None else []

    # -- body -----------------------------------------------------------------
    @property
    def stream(self):
        # One stream per request, as werkzeug's: `while request.stream.read(n)` must reach the end,
        # and it is at its end once get_data() has read the body.
        if self._stream is None:
            self._stream = io.BytesIO(self._body)
            if self._cached is not None:
                self._stream.seek(0, io.SEEK_END)
        return self._stream

    input_stream = stream

    def get_data(self, cache=True, as_text=False, parse_form_data=False):
        data = self._cached
        if data is None:
            if parse_form_data:
                self._parse_form()
            if self._stream is None:  # nothing read yet: the body itself, without a copy
                data = self._body
                self._stream = io.BytesIO(b"")
            else:
                data = self._stream.read()
            if cache:
                self._cached = data
        return data.decode(self.mimetype_params.get("charset", "utf-8"), "replace") if as_text else data

    @property
    def data(self):
        return self.get_data()

    @property
    def is_json(self):
        return _is_json_type(self.mimetype)

    def get_json(self, force=False, silent=False, cache=True):
        """The body as JSON; raises BadRequestError (415 when the Content-Type is not JSON, 400 when
        the body does not parse) as werkzeug does, or returns None with ``silent=True``."""
        key = (force, silent)
        if key in self._json_cache:
            return self._json_cache[key]
        if not (force or self.is_json):
            if silent:
                return None
            raise BadRequestError("Did not attempt to load JSON data because the request Content-Type "
                                  "was not 'application/json'.", 415)
        try:
            value = json.loads(self.get_data(cache=cache))
        except ValueError as exc:
            if silent:
                value = None
            else:
                raise BadRequestError("Failed to decode JSON object: %s" % exc)
        if cache:
            self._json_cache[key] = value
        return value

    @property
    def json(self):
        return self.get_json()

    def _parse_form(self):
        if self._form is not None:
            return
        form, files = [], []
        mt, params = _parse_options_header(self.content_type or "")
        if mt == "multipart/form-data" and not params.get("boundary"):
            mt = None  # werkzeug gives up before reading: empty form and files, get_data() still has the body
        if mt in ("application/x-www-form-urlencoded", "multipart/form-data"):
            # werkzeug reads the form from the stream: afterwards get_data() is empty unless it ran first
            body = self._cached if self._cached is not None else (
                self._body if self._stream is None else self._stream.read())
            if self._stream is None:
                self._stream = io.BytesIO(b"")
            if mt == "multipart/form-data":
                try:
                    form, files = _parse_multipart(body, params["boundary"], params.get("charset", "utf-8"))
                except BadRequestError:  # werkzeug parses forms silently: a broken body is an empty form
                    form, files = [], []
            else:
                form = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                                              errors="replace")
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
    def environ(self):
        env = {
            "REQUEST_METHOD": self.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": self.path.encode("utf-8").decode("latin-1"),  # WSGI's "bytes as latin-1"
            "QUERY_STRING": self.query_string.decode("latin-1"),
            "SERVER_NAME": str(self.server[0]) if self.server else "",
            "SERVER_PORT": str(self.server[1]) if self.server else "",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": self.remote_addr,
            "wsgi.url_scheme": self.scheme,
            "wsgi.input": self.stream,
        }
        if self.content_type:
            env["CONTENT_TYPE"] = self.content_type
        env["CONTENT_LENGTH"] = self.headers.get("Content-Length", "")
        for name, value in self.headers:
            key = "HTTP_" + name.upper().replace("-", "_")
            if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                continue
            env[key] = env[key] + "," + value if key in env else value
        return env

    def close(self):
        pass

    def __repr__(self):
        return "<AMLRequest %r [%s]>" % (self.url, self.method)


_AMLREQUEST_SUPPORTED = sorted(n for n in _WERKZEUG_REQUEST_NAMES if hasattr(AMLRequest, n) or n in (
    "method", "scheme", "server", "path", "query_string", "headers", "remote_addr"))


###############################################################################
# II.2  AMLResponse: what run() may return, and its wire form
###############################################################################

#: Reason phrases as werkzeug spells them (AMLResponse.status); the rest as http.HTTPStatus.
_WERKZEUG_REASONS = dict(_REASONS)
_WERKZEUG_REASONS.update({
    103: "Early Hints", 203: "Non Authoritative Information", 207: "Multi Status", 306: "Switch Proxy",
    414: "Request URI Too Long", 418: "I'm a teapot", 425: "Too Early", 449: "Retry With",
    511: "Network Authentication Failed"})

#: Types that get "; charset=utf-8" when set as a mimetype, besides text/* and */*+xml (werkzeug's list).
_CHARSET_MIMETYPES = frozenset((
    "application/ecmascript", "application/javascript", "application/sql", "application/xml",
    "application/xml-dtd", "application/xml-external-parsed-entity"))

_TOKEN_CHARS = frozenset("!#$%&'*+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz|~")


def _content_type_for(mimetype, charset="utf-8"):
    """'text/plain' -> 'text/plain; charset=utf-8'; 'image/png' stays as it is (as werkzeug)."""
    if mimetype.startswith("text/") or mimetype in _CHARSET_MIMETYPES or mimetype.endswith("+xml"):
        return "%s; charset=%s" % (mimetype, charset)
    return mimetype


def _quote_header_value(value):
    text = str(value)
    if not text:
        return '""'
    if _TOKEN_CHARS.issuperset(text):
        return text
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


def _dump_options_header(header, options):
    """('attachment', {'filename': 'a b.png'}) -> 'attachment; filename="a b.png"'."""
    segments = [] if header is None else [header]
    for key, value in options.items():
        if value is not None:
            segments.append("%s=%s" % (key, value if key.endswith("*") else _quote_header_value(value)))
    return "; ".join(segments)


_COOKIE_NO_QUOTE_RE = re.compile(r"[\w!#$%&'()*+\-./:<=>?@\[\]^`{|}~]*", re.ASCII)
_COOKIE_SLASH_RE = re.compile(rb"[\x00-\x19\",;\\\x7f-\xff]")


def _cookie_escape(match):
    char = match.group()
    return b"\\" + char if char in (b'"', b"\\") else b"\\%03o" % ord(char)


def _cookie_date(value):
    import datetime
    if isinstance(value, datetime.date):
        if not isinstance(value, datetime.datetime):
            value = datetime.datetime.combine(value, datetime.time(), tzinfo=datetime.timezone.utc)
        elif value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return email.utils.format_datetime(value.astimezone(datetime.timezone.utc), usegmt=True)
    if isinstance(value, time.struct_time):
        value = time.mktime(value)
    return email.utils.formatdate(value, usegmt=True)


def _dump_cookie(key, value="", max_age=None, expires=None, path="/", domain=None, secure=False,
                 httponly=False, samesite=None, partitioned=False, max_size=4093):
    """A Set-Cookie value, byte for byte as werkzeug's dump_cookie writes it."""
    import datetime
    if path is not None:
        path = urllib.parse.quote(path, safe="%!$&'()*+,/:=@")
    if domain:
        domain = domain.partition(":")[0].lstrip(".").encode("idna").decode("ascii")
    if isinstance(max_age, datetime.timedelta):
        max_age = int(max_age.total_seconds())
    if expires is not None:
        if not isinstance(expires, str):
            expires = _cookie_date(expires)
    elif max_age is not None:
        expires = _cookie_date(time.time() + max_age)
    if samesite is not None:
        samesite = samesite.title()
        if samesite not in ("Strict", "Lax", "None"):
            raise ValueError("SameSite must be 'Strict', 'Lax', or 'None'.")
    if partitioned:
        secure = True
    if not _COOKIE_NO_QUOTE_RE.fullmatch(value):
        value = '"%s"' % _COOKIE_SLASH_RE.sub(_cookie_escape, value.encode()).decode("ascii")
    parts = ["%s=%s" % (key.encode().decode("latin-1"), value)]
    for name, attr in (("Domain", domain), ("Expires", expires), ("Max-Age", max_age), ("Secure", secure),
                       ("HttpOnly", httponly), ("Path", path), ("SameSite", samesite),
                       ("Partitioned", partitioned)):
        if attr is None or attr is False:
            continue
        parts.append(name if attr is True else "%s=%s" % (name, attr))
    text = "; ".join(parts)
    if max_size and len(text) > max_size:
        import warnings
        warnings.warn("The %r cookie is too large: the value was %d bytes but the header required %d extra "
                      "bytes. The final size was %d bytes but the limit is %d bytes. Browsers may silently "
                      "ignore cookies larger than this." % (key, len(value), len(text) - len(value), len(text),
                                                            max_size), stacklevel=3)
    return text


class _CallbackDict(dict):
    """A dict that calls ``on_update(self)`` after each change (AMLResponse.mimetype_params)."""

    def __init__(self, initial, on_update):
        dict.__init__(self, initial)
        self._on_update = on_update

    def _changed(method):
        def changed(self, *args, **kwargs):
            result = method(self, *args, **kwargs)
            self._on_update(self)
            return result
        changed.__name__ = method.__name__
        return changed

    __setitem__ = _changed(dict.__setitem__)
    __delitem__ = _changed(dict.__delitem__)
    clear = _changed(dict.clear)
    pop = _changed(dict.pop)
    popitem = _changed(dict.popitem)
    setdefault = _changed(dict.setdefault)
    update = _changed(dict.update)
    del _changed


def _header_property(name, load=None, dump=None, doc=None):
    """A response attribute backed by a header, as werkzeug's header_property (None when absent)."""

    def fget(self):
        if name not in self.headers:
            return None
        value = self.headers[name]
        if load is None:
            return value
        try:
            return load(value)
        except (ValueError, TypeError):
            return None

    def fset(self, value):
        self.headers[name] = dump(value) if dump is not None else value

    def fdel(self):
        self.headers.pop(name, None)

    return property(fget, fset, fdel, doc or "The %s header." % name)


#: werkzeug's (flask's) public Response attributes; those AMLResponse lacks raise an AttributeError naming them.
_WERKZEUG_RESPONSE_NAMES = frozenset("""
accept_ranges access_control_allow_credentials access_control_allow_headers access_control_allow_methods
access_control_allow_origin access_control_expose_headers access_control_max_age add_etag age allow
autocorrect_location_header automatically_set_content_length cache_control calculate_content_length
call_on_close close content_encoding content_language content_length content_location content_md5
content_range content_security_policy content_security_policy_report_only content_type
cross_origin_embedder_policy cross_origin_opener_policy data date default_mimetype default_status
delete_cookie expires force_type freeze from_app get_app_iter get_data get_etag get_json get_wsgi_headers
get_wsgi_response implicit_sequence_conversion is_json is_sequence is_streamed iter_encoded json
json_module last_modified location make_conditional make_sequence max_cookie_size mimetype
mimetype_params retry_after set_cookie set_data set_etag status status_code stream vary
www_authenticate direct_passthrough response""".split())


_STATUS_TEXT = {code: "%d %s" % (code, phrase.upper()) for code, phrase in _WERKZEUG_REASONS.items()}


class AMLResponse:
    """A response from run(): the reference's constructor over werkzeug's (flask's) Response.

    ``message`` may be None (``{}`` as JSON), a str or bytes, any JSON-encodable value with
    ``json_str=True``, a list of str/bytes chunks (sent as one body) or another iterable such as a
    generator (streamed chunk by chunk).  ``response_headers`` values are split on commas into
    repeated headers.  After construction the object behaves as werkzeug's Response for
    ``status``, ``status_code``, ``headers`` (werkzeug's Headers), ``mimetype``, ``content_type``,
    ``mimetype_params``, ``content_length``, ``data``, ``get_data()``, ``set_data()``,
    ``set_cookie()``, ``delete_cookie()`` and the rest listed in the README; a werkzeug attribute
    it lacks raises an AttributeError that names it.

    Example::

        return AMLResponse({"ok": True}, 200, json_str=True)
        resp = AMLResponse(jpeg_bytes, 200)
        resp.mimetype = "image/jpeg"     # Content-Type: image/jpeg
        return resp

    The HTTP layer reads it through :meth:`_wire` only.
    """

    default_mimetype = "text/html"  # flask's
    default_status = 200
    max_cookie_size = 4093
    automatically_set_content_length = True
    implicit_sequence_conversion = True
    autocorrect_location_header = False
    direct_passthrough = False
    charset = "utf-8"  # werkzeug 2's attribute, read by older scripts
    json_module = json

    def __init__(self, message, status_code=None, response_headers=None, json_str=False,
                 run_function_failed=False):
        # Built straight into __dict__ and the header list (every run() that answers raw goes
        # through here); the result is what the reference's constructor makes through werkzeug.
        response_headers = response_headers if response_headers is not None else {}
        pairs = list(response_headers.items()) if hasattr(response_headers, "items") else list(response_headers)
        state = self.__dict__
        headers = state["headers"] = _Headers()
        first = headers._list
        code = self.default_status if status_code is None else status_code
        if type(code) is int and code in _STATUS_TEXT:
            state["_status_code"], state["_status"] = code, _STATUS_TEXT[code]
        else:
            self.status = code
        if message is None or json_str:
            body = json.dumps({} if message is None else message).encode()
            first.append(("Content-Type", "application/json"))
        elif isinstance(message, (str, bytes, bytearray, memoryview)):
            body = message.encode(self.charset) if isinstance(message, str) else bytes(message)
        elif not hasattr(message, "__iter__"):  # werkzeug fails later, when sending: say it here
            raise TypeError("AMLResponse's message must be str, bytes, an iterable of them, or None "
                            "(or any JSON value with json_str=True), not %s" % type(message).__name__)
        else:
            body = None
        if not (message is None or json_str):
            # The reference drops its default Content-Type when the script gives one (matched here
            # case-insensitively, so "content-type" does not produce two).
            if not any(str(name).lower() == "content-type" for name, _ in pairs):
                first.append(("Content-Type", _content_type_for(self.default_mimetype)))
        if body is None:
            state["response"] = message
        else:
            state["response"] = [body]
            if self.automatically_set_content_length:
                first.append(("Content-Length", str(len(body))))
        first.append(("x-ms-run-function-failed", _header_value(run_function_failed)))
        for name, value in pairs:
            for part in str(value).split(","):
                headers.add(name, part.strip())

    # -- guard: werkzeug attributes we lack fail loudly, instead of being silently ignored --------
    def __getattr__(self, name):  # only called when normal lookup failed
        if name in _WERKZEUG_RESPONSE_NAMES:
            raise AttributeError(_unsupported(type(self).__name__, name, _AMLRESPONSE_SUPPORTED))
        raise AttributeError("%r object has no attribute %r" % (type(self).__name__, name))

    def __setattr__(self, name, value):
        if name in _AMLRESPONSE_UNSUPPORTED:
            raise AttributeError(_unsupported(type(self).__name__, name, _AMLRESPONSE_SUPPORTED))
        object.__setattr__(self, name, value)

    # -- status ---------------------------------------------------------------------------------
    @property
    def status(self):
        """The status line's text, e.g. ``"201 CREATED"``; set it to an int or such a string."""
        return self._status

    @status.setter
    def status(self, value):
        if isinstance(value, int):  # http.HTTPStatus too
            code = int(value)
        else:
            value = str(value).strip()
            if not value:
                raise ValueError("Empty status argument")
            head, sep, _ = value.partition(" ")
            try:
                code = int(head)
            except ValueError:
                self._status, self._status_code = "0 %s" % value, 0
                return
            if sep:
                self._status, self._status_code = value, code
                return
        self._status_code = code
        self._status = _STATUS_TEXT.get(code) or "%d UNKNOWN" % code

    @property
    def status_code(self):
        """The status as an int; setting it sets :attr:`status` (``299`` -> ``"299 UNKNOWN"``)."""
        return self._status_code

    @status_code.setter
    def status_code(self, code):
        self.status = code

    # -- content type -----------------------------------------------------------------------------
    content_type = _header_property("Content-Type")
    content_location = _header_property("Content-Location")
    content_encoding = _header_property("Content-Encoding")
    content_md5 = _header_property("Content-MD5")
    location = _header_property("Location")
    access_control_allow_origin = _header_property("Access-Control-Allow-Origin")
    content_length = _header_property("Content-Length", int, str)

    @property
    def mimetype(self):
        """The Content-Type without parameters; setting ``"text/plain"`` gives
        ``text/plain; charset=utf-8``, ``"image/jpeg"`` stays as it is."""
        value = self.headers.get("content-type")
        return value.partition(";")[0].strip() if value else None

    @mimetype.setter
    def mimetype(self, value):
        self.headers["Content-Type"] = _content_type_for(value, self.charset)

    @property
    def mimetype_params(self):
        """The Content-Type's parameters as a dict; changing the dict rewrites the header."""
        def on_update(params):
            self.headers["Content-Type"] = _dump_options_header(self.mimetype, params)
        return _CallbackDict(_parse_options_header(self.headers.get("content-type", ""))[1], on_update)

    @property
    def is_json(self):
        return _is_json_type(self.mimetype)

    # -- body -------------------------------------------------------------------------------------
    def get_data(self, as_text=False):
        """The body as bytes (a generator is consumed and kept), or str with ``as_text=True``."""
        self.make_sequence()
        data = b"".join(self.iter_encoded())
        return data.decode() if as_text else data

    def set_data(self, value):
        """Replace the body with ``value`` (str is UTF-8 encoded) and set Content-Length."""
        if isinstance(value, str):
            value = value.encode(self.charset)
        elif isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        self.response = [value]
        if self.automatically_set_content_length:
            self.headers["Content-Length"] = str(len(value))

    data = property(get_data, set_data, doc="The body: :meth:`get_data` and :meth:`set_data`.")

    @property
    def json(self):
        return self.get_json()

    def get_json(self, force=False, silent=False):
        if not (force or self.is_json):
            return None
        try:
            return self.json_module.loads(self.get_data())
        except ValueError:
            if not silent:
                raise
            return None

    def iter_encoded(self):
        return (item.encode(self.charset) if isinstance(item, str) else item for item in self.response)

    @property
    def is_streamed(self):
        try:
            len(self.response)
        except (TypeError, AttributeError):
            return True
        return False

    @property
    def is_sequence(self):
        return isinstance(self.response, (tuple, list))

    def make_sequence(self):
        if not self.is_sequence:
            close = getattr(self.response, "close", None)
            self.response = list(self.iter_encoded())
            if close is not None:
                close()

    def calculate_content_length(self):
        self.make_sequence()
        return sum(len(x) for x in self.iter_encoded())

    def freeze(self):
        self.response = list(self.iter_encoded())
        self.headers["Content-Length"] = str(sum(map(len, self.response)))
        self.add_etag()

    def set_etag(self, etag, weak=False):
        if '"' in etag:
            raise ValueError("invalid etag")
        self.headers["ETag"] = ('W/"%s"' if weak else '"%s"') % etag

    def get_etag(self):
        """``(etag, weak)`` from the ETag header, or ``(None, None)``."""
        etag = (self.headers.get("ETag") or "").strip()
        if not etag:
            return None, None
        weak = etag[:2] in ("W/", "w/")
        etag = etag[2:] if weak else etag
        return (etag[1:-1] if etag[:1] == etag[-1:] == '"' else etag), weak

    def add_etag(self, overwrite=False, weak=False):
        """Set ETag to the SHA-1 of the body unless there is one (werkzeug's choice of hash)."""
        import hashlib
        if overwrite or "etag" not in self.headers:
            self.set_etag(hashlib.sha1(self.get_data()).hexdigest(), weak)

    def close(self):
        close = getattr(self.response, "close", None)
        if close is not None:
            close()

    # -- cookies ----------------------------------------------------------------------------------
    def set_cookie(self, key, value="", max_age=None, expires=None, path="/", domain=None, secure=False,
                   httponly=False, samesite=None, partitioned=False):
        """Add a Set-Cookie header, as werkzeug writes it."""
        self.headers.add("Set-Cookie", _dump_cookie(
            key, value=value, max_age=max_age, expires=expires, path=path, domain=domain, secure=secure,
            httponly=httponly, samesite=samesite, partitioned=partitioned, max_size=self.max_cookie_size))

    def delete_cookie(self, key, path="/", domain=None, secure=False, httponly=False, samesite=None,
                      partitioned=False):
        """Expire a cookie in the client (Max-Age=0, Expires in 1970)."""
        self.set_cookie(key, expires=0, max_age=0, path=path, domain=domain, secure=secure,
                        httponly=httponly, samesite=samesite, partitioned=partitioned)

    # -- for the HTTP layer -----------------------------------------------------------------------
    def _wire(self):
        """What the HTTP layer sends: ``(status_code, headers, body, chunks)``.

        ``headers`` is a list of (name, str value) pairs in the script's order, without
        Content-Length (the HTTP layer frames the body itself; werkzeug also recomputes it for a
        buffered body).  A buffered response gives ``body`` as bytes and ``chunks`` None; a
        streamed one (a generator) ``body`` None and ``chunks`` an iterator of str/bytes, whose
        ``close()`` (if any) the HTTP layer calls when the client goes away.
        """
        headers = [(n, v) for n, v in self.headers if n.lower() != "content-length"]
        body = self.response
        if isinstance(body, (list, tuple)):
            if len(body) == 1 and type(body[0]) is bytes:  # set_data()'s one chunk: no copy
                return self._status_code, headers, body[0], None
            return self._status_code, headers, b"".join(_to_bytes(c) for c in body), None
        return self._status_code, headers, None, iter(body)

    def __repr__(self):
        try:
            body = "%d bytes" % sum(map(len, self.iter_encoded())) if self.is_sequence else "streamed"
        except TypeError:
            body = "unsendable"
        return "<%s %s [%s]>" % (type(self).__name__, body, self._status)


def _unsupported(cls, name, supported):
    return ("%s.%s is not supported by azmlinfsrv (werkzeug's %s has it); supported: %s"
            % (cls, name, "Response" if cls == "AMLResponse" else "Request", ", ".join(supported)))


_AMLRESPONSE_SUPPORTED = sorted(n for n in _WERKZEUG_RESPONSE_NAMES | {"headers", "charset"}
                                if hasattr(AMLResponse, n) or n in ("headers", "response"))
_AMLRESPONSE_UNSUPPORTED = _WERKZEUG_RESPONSE_NAMES - set(_AMLRESPONSE_SUPPORTED)


def _chunk_type(resp):
    """The type name of the first body chunk of ``resp`` that is neither str nor bytes."""
    for chunk in resp.response:
        if not isinstance(chunk, (str, bytes, bytearray, memoryview)):
            return type(chunk).__name__
    return "non-str"


def _to_bytes(chunk):
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError("a streamed response chunk must be str or bytes, not %s" % type(chunk).__name__)


###############################################################################
# II.3  werkzeug parity: multi-dicts, headers, forms, URLs, cookies, authorization
###############################################################################

class _MultiDict(dict):
    """werkzeug's MultiDict: a dict of first values that also keeps every value of a key.

    ``d[key]`` and ``d.get(key)`` give the first value, ``d.getlist(key)`` all of them;
    ``dict(d)``, ``json.dumps(d)`` and iteration see the first values, as with werkzeug.
    """

    def __init__(self, pairs=()):
        super().__init__()
        self._lists = {}
        if isinstance(pairs, _MultiDict):
            pairs = pairs.items(multi=True)
        elif hasattr(pairs, "items"):
            pairs = [(k, v) for k, vs in pairs.items() for v in (vs if isinstance(vs, (list, tuple)) else [vs])]
        for key, value in pairs:
            self.add(key, value)

    def add(self, key, value):
        self._lists.setdefault(key, []).append(value)
        if not dict.__contains__(self, key):
            dict.__setitem__(self, key, value)

    def __setitem__(self, key, value):
        self.setlist(key, [value])

    def __delitem__(self, key):
        dict.__delitem__(self, key)
        del self._lists[key]

    def setlist(self, key, values):
        values = list(values)
        if not values:
            self.pop(key, None)
            return
        self._lists[key] = values
        dict.__setitem__(self, key, values[0])

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def setlistdefault(self, key, default_list=None):
        if key not in self:
            self.setlist(key, default_list or [])
        return self._lists.setdefault(key, [])

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

    def pop(self, key, *default):
        self._lists.pop(key, None)
        return dict.pop(self, key, *default)

    def poplist(self, key):
        dict.pop(self, key, None)
        return self._lists.pop(key, [])

    def popitem(self):
        key, value = dict.popitem(self)
        self._lists.pop(key, None)
        return key, value

    def clear(self):
        dict.clear(self)
        self._lists.clear()

    def update(self, other=(), **kwargs):
        """Adds the values (werkzeug's update extends, it does not replace)."""
        for key, value in _MultiDict(other).items(multi=True):
            self.add(key, value)
        for key, value in kwargs.items():
            self.add(key, value)

    def items(self, multi=False):
        if multi:
            return [(k, v) for k, vs in self._lists.items() for v in vs]
        return list(dict.items(self))

    def values(self):
        return list(dict.values(self))

    def keys(self):
        return list(dict.keys(self))

    def lists(self):
        return [(k, list(vs)) for k, vs in self._lists.items()]

    def listvalues(self):
        return [list(vs) for vs in self._lists.values()]

    def to_dict(self, flat=True):
        if flat:
            return dict(dict.items(self))
        return {k: list(vs) for k, vs in self._lists.items()}

    def copy(self):
        return _MultiDict(self.items(multi=True))

    __copy__ = copy

    def __repr__(self):
        return "MultiDict(%r)" % (self.items(multi=True),)


def _header_value(value):
    """A header value as werkzeug stores it: str, and never a line break (a script error)."""
    if not isinstance(value, str):
        value = str(value)
    if "\r" in value or "\n" in value:
        raise ValueError("Header values must not contain newline characters.")
    return value


def _multi_items(arg):
    """(key, value) pairs of a Headers, a MultiDict, a mapping (list values repeat) or pairs."""
    if isinstance(arg, (_Headers, _MultiDict)):
        return arg.items(multi=True) if isinstance(arg, _MultiDict) else list(arg)
    if hasattr(arg, "items"):
        return [(k, v) for k, vs in arg.items() for v in (vs if isinstance(vs, (list, tuple, set)) else [vs])]
    return list(arg)


class _Headers:
    """werkzeug's Headers: ordered (name, value) pairs, names matched case-insensitively.

    Iterating gives ``(name, value)`` tuples; ``h[name]`` the first value (KeyError when absent),
    ``h[i]`` the i-th pair.  ``add``/``set`` take werkzeug's keyword parameters:
    ``h.add("Content-Disposition", "attachment", filename="x.png")``.
    """

    def __init__(self, defaults=None):
        self._list = []
        if defaults is not None:
            self.extend(defaults)

    @classmethod
    def _trusted(cls, pairs):
        """Headers from pairs the request parser has already checked."""
        headers = cls()
        headers._list = list(pairs)
        return headers

    def _get_key(self, key):
        lower = key.lower()
        for name, value in self._list:
            if name.lower() == lower:
                return value
        raise KeyError(key)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._get_key(key)
        if isinstance(key, int):
            return self._list[key]
        return self.__class__._trusted(self._list[key])

    def get(self, key, default=None, type=None):
        try:
            value = self._get_key(key)
        except KeyError:
            return default
        if type is None:
            return value
        try:
            return type(value)
        except ValueError:
            return default

    def getlist(self, key, type=None):
        lower = key.lower()
        values = [v for n, v in self._list if n.lower() == lower]
        if type is None:
            return values
        result = []
        for value in values:
            try:
                result.append(type(value))
            except ValueError:
                pass
        return result

    def get_all(self, name):
        return self.getlist(name)

    def items(self, lower=False):
        return [(n.lower(), v) for n, v in self._list] if lower else list(self._list)

    def keys(self, lower=False):
        return [n.lower() if lower else n for n, _ in self._list]

    def values(self):
        return [v for _, v in self._list]

    def extend(self, arg=None, **kwargs):
        if arg is not None:
            for key, value in _multi_items(arg):
                self.add(key, value)
        for key, value in _multi_items(kwargs):
            self.add(key, value)

    def add(self, key, value, **kwargs):
        if kwargs:
            value = _dump_options_header(value, {k.replace("_", "-"): v for k, v in kwargs.items()})
        self._list.append((key, _header_value(value)))

    add_header = add

    def set(self, key, value, **kwargs):
        """Replace every ``key`` header by one, in the first one's place (or add it at the end)."""
        if kwargs:
            value = _dump_options_header(value, {k.replace("_", "-"): v for k, v in kwargs.items()})
        value = _header_value(value)
        lower = key.lower()
        for index, (name, _) in enumerate(self._list):
            if name.lower() == lower:
                self._list[index] = (key, value)
                self._list[index + 1:] = [p for p in self._list[index + 1:] if p[0].lower() != lower]
                return
        self._list.append((key, value))

    def setlist(self, key, values):
        values = list(values)
        if not values:
            self.remove(key)
            return
        self.set(key, values[0])
        for value in values[1:]:
            self.add(key, value)

    def setdefault(self, key, default):
        try:
            return self._get_key(key)
        except KeyError:
            self.set(key, default)
            return self._get_key(key)

    def setlistdefault(self, key, default):
        if key not in self:
            self.setlist(key, default)
        return self.getlist(key)

    def update(self, arg=None, **kwargs):
        """Replace the headers named in ``arg``/``kwargs`` (werkzeug's update; extend adds)."""
        if arg is not None:
            if isinstance(arg, (_Headers, _MultiDict)):
                for key in dict.fromkeys(arg.keys()):
                    self.setlist(key, arg.getlist(key))
            elif hasattr(arg, "items"):
                for key, value in arg.items():
                    self.setlist(key, value) if isinstance(value, (list, tuple, set)) else self.set(key, value)
            else:
                for key, value in arg:
                    self.set(key, value)
        for key, value in kwargs.items():
            self.setlist(key, value) if isinstance(value, (list, tuple, set)) else self.set(key, value)

    def __setitem__(self, key, value):
        if isinstance(key, str):
            self.set(key, value)
        elif isinstance(key, int):
            self._list[key] = (value[0], _header_value(value[1]))
        else:
            self._list[key] = [(k, _header_value(v)) for k, v in value]

    def remove(self, key):
        lower = key.lower()
        self._list[:] = [p for p in self._list if p[0].lower() != lower]

    def __delitem__(self, key):
        if isinstance(key, str):
            self.remove(key)
        else:
            del self._list[key]

    _MISSING = object()

    def pop(self, key=None, default=_MISSING):
        if key is None:
            return self._list.pop()
        if isinstance(key, int):
            return self._list.pop(key)
        try:
            value = self._get_key(key)
        except KeyError:
            if default is not _Headers._MISSING:
                return default
            raise
        self.remove(key)
        return value

    def popitem(self):
        return self._list.pop()

    def clear(self):
        del self._list[:]

    def __contains__(self, key):
        try:
            self._get_key(key)
        except (KeyError, AttributeError):
            return False
        return True

    def __iter__(self):
        return iter(self._list)

    def __len__(self):
        return len(self._list)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return {(n.lower(), v) for n, v in other._list} == {(n.lower(), v) for n, v in self._list}

    __hash__ = None

    def to_wsgi_list(self):
        return list(self._list)

    def copy(self):
        return self.__class__._trusted(self._list)

    __copy__ = copy

    def __str__(self):
        return "\r\n".join(["%s: %s" % pair for pair in self._list] + ["\r\n"])

    def __repr__(self):
        return "Headers(%r)" % (self._list,)


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
    """A request body that cannot be parsed the way the script asked for; ``code`` is the HTTP
    status werkzeug's exception would carry (400, or 415 for get_json() on a non-JSON body)."""

    def __init__(self, message, code=400):
        super().__init__(message)
        self.code = code


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


_SURROGATE_RE = re.compile("[\udc80-\udcff]")


def _iri_unquote(text, keep):
    """werkzeug's uri_to_iri for one URL part: %XX escapes become characters, except those of
    ``keep`` (a compiled pattern of escapes to leave alone) and bytes that are not UTF-8."""
    out = []
    for index, part in enumerate(keep.split(text)):
        if index % 2:
            out.append(part)
        else:
            decoded = urllib.parse.unquote_to_bytes(part).decode("utf-8", "surrogateescape")
            out.append(_SURROGATE_RE.sub(lambda m: "%%%02X" % (ord(m.group()) - 0xDC00), decoded))
    return "".join(out)


def _escapes_of(chars):
    return re.compile("((?:%%(?:%s))+)" % "|".join("%02X" % ord(c) for c in sorted(chars)), re.I)


_ALWAYS_QUOTED = bytes(list(range(0x21)) + [0x25, 0x7F]).decode()
_KEEP_IN_PATH = _escapes_of(_ALWAYS_QUOTED + "/?#")
_KEEP_IN_QUERY = _escapes_of(_ALWAYS_QUOTED + "&=+#")


def _current_url(scheme, host, path=None, query=b""):
    """AMLRequest.url and friends, as werkzeug's get_current_url writes them (an IRI)."""
    url = scheme + "://" + host + "/"
    if path is not None:
        url += urllib.parse.quote(path.lstrip("/"), safe="!$&'()*+,/:;=@%")
        if query:
            url += "?" + urllib.parse.quote(query, safe="!$&'()*+,/:;=?@%")
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    try:
        netloc = netloc.encode("ascii").decode("idna")
    except UnicodeError:
        pass
    if ":" in netloc:
        netloc = "[%s]" % netloc
    if parts.port is not None:
        netloc = "%s:%d" % (netloc, parts.port)
    return urllib.parse.urlunsplit((parts.scheme, netloc, _iri_unquote(parts.path, _KEEP_IN_PATH),
                                    _iri_unquote(parts.query, _KEEP_IN_QUERY), ""))


_COOKIE_RE = re.compile(r"""[ \t]*([^ \t=";]+)(?:[ \t]*=[ \t]*("(?:[^\\"]|\\.)*"|[^ \t";]*))?[ \t]*(?:;|\Z)""",
                        re.ASCII)
_COOKIE_UNSLASH_RE = re.compile(rb"\\([0-3][0-7]{2}|.)")


def _parse_cookie(text):
    """Cookie header(s) -> (name, value) pairs, as werkzeug's parse_cookie (no %-decoding)."""
    pairs, pos = [], 0
    while text:
        match = _COOKIE_RE.match(text, pos)
        if match is None:
            pos = text.find(";", pos) + 1
            if pos == 0:
                break
            continue
        name, value = match.group(1), match.group(2) or ""
        pos = match.end()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = _COOKIE_UNSLASH_RE.sub(
                lambda m: m.group(1) if len(m.group(1)) == 1 else bytes([int(m.group(1), 8)]),
                value[1:-1].encode()).decode(errors="replace")
        pairs.append((name, value))
        if pos >= len(text):
            break
    return pairs


class _UserAgent:
    """AMLRequest.user_agent: the User-Agent text (werkzeug 3 no longer parses it either)."""

    platform = browser = version = language = None

    def __init__(self, string):
        self.string = string

    def to_header(self):
        return self.string

    def __str__(self):
        return self.string

    def __bool__(self):
        return bool(self.string)

    def __repr__(self):
        return "<UserAgent %r/%s>" % (self.browser, self.version)


class _Authorization:
    """AMLRequest.authorization: ``type`` (lower case), ``parameters`` and ``token``;
    ``auth.username``/``auth.password`` for Basic, as werkzeug's Authorization."""

    def __init__(self, auth_type, parameters=None, token=None):
        self.type = auth_type
        self.parameters = parameters or {}
        self.token = token

    @classmethod
    def from_header(cls, value):
        import base64
        import binascii
        if not value:
            return None
        scheme, _, rest = value.partition(" ")
        scheme, rest = scheme.lower(), rest.strip(" \t")
        if scheme == "basic":
            try:
                username, _, password = base64.b64decode(rest, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeError):
                return None
            return cls(scheme, {"username": username, "password": password})
        if "=" in rest.rstrip("="):
            params = {}
            for item in urllib.request.parse_http_list(rest):
                key, sep, val = item.partition("=")
                val = val.strip()
                if len(val) >= 2 and val[0] == val[-1] == '"':
                    val = val[1:-1].replace('\\\\', '\\').replace('\\"', '"')
                params[key.strip()] = val if sep else None
            return cls(scheme, params)
        return cls(scheme, None, rest)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self.parameters.get(name)

    def __getitem__(self, name):
        return self.parameters.get(name)

    def get(self, key, default=None):
        return self.parameters.get(key, default)

    def __contains__(self, key):
        return key in self.parameters

    def __repr__(self):
        return "<Authorization %s>" % self.type


###############################################################################
# II.4  Import shims: azureml_inference_server_http.*, azureml.contrib.services
###############################################################################

def _install_compat_modules():
    """Make the reference's import paths resolve to this module, with or without it installed."""
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
#                              PART III  OPTIONAL FEATURES, EACH BEHIND ONE HOOK
###############################################################################


###############################################################################
# III.1  swagger.json (hook: the /swagger.json route)
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
    """({?version= spelling: document}, [supported versions]) for a script, built once (Script keeps them).

    Called at start-up after init() (a broken swagger*.json in the app root is then a start-up error,
    exit 3, as in the reference) and again, from the script's copy, on every request.
    """
    return script.swagger_documents(config, _build_swagger_documents)


def _build_swagger_documents(script, config):
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
    return documents, supported


def _script_schemas(script):
    """(ServiceInput, ServiceOutput, the versions that can express them) for run()."""
    if hasattr(script, "swagger_schemas"):  # III.12: an MLflow model's signature
        return script.swagger_schemas()
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
# III.2  /metrics (hook: the /metrics route; counters on App)
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


#: /metrics families read from App.gauges(): (name, type, help, key).
_SNAPSHOT_FAMILIES = (
    ("azmlinfsrv_requests_in_flight", "gauge", "Requests being handled now.", "in_flight"),
    ("azmlinfsrv_connections_open", "gauge", "Open client connections.", "connections_open"),
    ("azmlinfsrv_connections_busy", "gauge", "Connections with a request being read or answered.", "connections_busy"),
    ("azmlinfsrv_handler_threads", "gauge", "Threads that read requests and write answers.", "handler_threads"),
    ("azmlinfsrv_buffered_body_bytes", "gauge", "Request body bytes held in memory now.", "buffered"),
    ("azmlinfsrv_buffered_body_bytes_peak", "gauge", "The most request body bytes held at once.", "buffered_peak"),
    ("azmlinfsrv_buffered_body_bytes_limit", "gauge", "The budget for request bodies in memory "
     "(--max_buffered_bytes).", "buffered_limit"),
    ("azmlinfsrv_runs_stuck", "gauge", "run() calls given up on after the scoring timeout that have not returned.",
     "runs_stuck"),
    ("azmlinfsrv_runs_abandoned_total", "counter", "run() calls given up on after the scoring timeout "
     "(interrupted, their thread replaced).", "runs_abandoned"),
    ("azmlinfsrv_queue_depth", "gauge", "Requests waiting for a worker.", "queued"),
    ("azmlinfsrv_workers", "gauge", "run() calls that may execute at once (worker_count).", "workers"),
    ("azmlinfsrv_workers_busy", "gauge", "Workers executing run() now.", "workers_busy"),
)

#: Metrics.count(name) counters, rendered as azmlinfsrv_<name>_total: (name, help).
_COUNTER_FAMILIES = (
    ("timeouts", "run() calls that exceeded SCORING_TIMEOUT_MS."),
    ("run_errors", "run() calls that raised."),
    ("rejected", "Requests answered 503 because the queue was full."),
    ("rejected_connections", "Connections answered 503 at once: max_connections open and all busy, or no thread "
                             "could be started."),
    ("evicted_connections", "Idle connections closed to make room for a new one at max_connections."),
    ("reloads", "Successful script reloads."),
    ("reload_failures", "Script reloads that failed."),
)

#: Telemetry's own counters, read from App.gauges() after the others: (name, type, help, key).
_TELEMETRY_FAMILIES = (
    ("azmlinfsrv_telemetry_items_sent_total", "counter", "Telemetry items accepted by the collector.",
     "telemetry_sent"),
    ("azmlinfsrv_telemetry_items_dropped_total", "counter", "Telemetry items dropped.", "telemetry_dropped"),
)


class Metrics:
    """Counters and histograms; cheap to update, rendered on demand from them and a snapshot of gauges."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # (route, status) -> n
        self.durations = collections.defaultdict(_Histogram)  # route -> histogram
        self.run_duration = _Histogram()
        self.counters = collections.Counter()  # timeouts, run_errors, rejected, reloads, reload_failures
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

    def render(self, gauges):
        """The Prometheus text: these counters, and ``gauges`` (App.gauges()) for the rest."""
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
        for name, kind, help_text, key in _SNAPSHOT_FAMILIES:
            family(name, kind, help_text)
            out.append("%s %d" % (name, gauges[key]))
        for name, help_text in _COUNTER_FAMILIES:
            family("azmlinfsrv_%s_total" % name, "counter", help_text)
            out.append("azmlinfsrv_%s_total %d" % (name, counters.get(name, 0)))
        out.extend(_dropped_metric_lines(counters))  # III.13
        for name, kind, help_text, key in _TELEMETRY_FAMILIES:
            family(name, kind, help_text)
            out.append("%s %d" % (name, gauges[key]))
        family("azmlinfsrv_build_info", "gauge", "Always 1; the labels say what is running.")
        out.append('azmlinfsrv_build_info{version="%s",python="%s"} 1' % (
            _label(__version__), _label(sys.version.split()[0])))
        family("azmlinfsrv_uptime_seconds", "gauge", "Seconds since the server started.")
        out.append("azmlinfsrv_uptime_seconds %.3f" % (time.time() - self.started))
        return "\n".join(out) + "\n"


def _label(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


###############################################################################
# III.3  Telemetry: Application Insights over urllib (hook: App.record)
###############################################################################

_AI_DEFAULT_INGESTION = "https://dc.services.visualstudio.com"
_AI_DEFAULT_TRACK_URL = _AI_DEFAULT_INGESTION + "/v2/track"
_AI_RETRY_STATUSES = frozenset((408, 429, 500, 502, 503, 504))  # the whole batch, or one item of a 206
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


def _resolve_appinsights(config):
    """The configuration: (instrumentation key, track URL) from the settings, or (None, None) with a
    warning when they do not add up (or nothing asks for telemetry)."""
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
            return None, None
    elif config.appinsights_enabled:
        logger.warning("AML_APP_INSIGHTS_ENABLED is true but no instrumentation key is set "
                       "(AML_APP_INSIGHTS_KEY, --appinsights_instrumentation_key or "
                       "APPLICATIONINSIGHTS_CONNECTION_STRING): telemetry is off.")
        return None, None
    else:
        return None, None
    if not _UUID_RE.match(key):
        logger.warning("The Application Insights instrumentation key is not a valid UUID: telemetry is off.")
        return None, None
    if config.appinsights_endpoint:
        url = config.appinsights_endpoint.strip()
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        logger.warning("AML_APP_INSIGHTS_ENDPOINT must be a full http(s) URL such as %s, not %r: telemetry "
                       "is off.", _AI_DEFAULT_TRACK_URL, url)
        return None, None
    return key, url


class _Delivery:
    """The delivery: items queued by request threads, POSTed in batches by one daemon thread.

    ``put()`` appends to a bounded queue: constant time, never blocking, never raising; when the
    queue is full the oldest item is dropped and counted in ``dropped``.  The thread uploads a
    batch every ``interval`` seconds or as soon as ``batch`` items wait, resends what the collector
    marks retriable (408, 429, 500, 502, 503, 504, network errors; Retry-After honoured; per item
    on a 206 when ``partial`` reads the answer), follows 307/308, and ``close()`` flushes with a
    bounded wait.  ``sent`` counts items the collector accepted.  It owns its queue, its counters
    and its thread; ``encode(batch) -> (body, headers)`` is the only thing a user of it provides.
    """

    def __init__(self, what, url, encode, cap, interval, timeout, batch=_AI_BATCH, partial=None,
                 dropped_metric="azmlinfsrv_telemetry_items_dropped_total"):
        self.what = what  # "Telemetry", "Trace export": how its warnings begin
        self.url = self.destination = url
        self.sent = 0
        self.dropped = 0
        self._encode = encode
        self._partial_answer = partial
        self._cap = cap
        self._interval = interval
        self._timeout = timeout
        self._batch = batch
        self._dropped_metric = dropped_metric
        self._queue = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.closing = False
        self._close_deadline = None
        self._backing_off = False
        self._retry = []  # the items the collector asked to be resent (at most one batch)
        self._failures = 0
        self._next_try = 0.0
        self._redirects = 0
        self._warned = _WarnOnce()
        self._opener = self._make_opener(url)
        self.thread = threading.Thread(target=self._run, name="azmlinfsrv-" + what.lower().replace(" ", "-"),
                                       daemon=True)
        self.thread.start()

    @staticmethod
    def _make_opener(url):
        host = urllib.parse.urlsplit(url).hostname
        if host in ("127.0.0.1", "localhost", "::1"):  # a local collector is never behind a proxy
            return urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return urllib.request.build_opener()

    def put(self, item):
        full = False
        with self._lock:
            queue = self._queue
            if len(queue) >= self._cap:
                queue.popleft()
                self.dropped += 1
                full = True
            queue.append(item)
            waiting = len(queue)
        if full:
            self.warn_once("queue-full", "%d items wait for the collector; dropping the oldest%s.", self._cap,
                           " (counted in %s)" % self._dropped_metric if self._dropped_metric else "")
        if waiting >= self._batch and not self._backing_off and not self._wake.is_set():
            self._wake.set()

    def warn_once(self, key, message, *args):
        self._warned(key, self.what + ": " + message + " (said once)", *args)

    # -- the background thread ----------------------------------------------------------
    def _run(self):
        while not self.closing:
            wait = self._interval
            if self._retry:
                wait = max(0.0, self._next_try - time.monotonic())
            self._wake.wait(wait)
            self._wake.clear()
            if self.closing:
                break
            if self._retry and time.monotonic() < self._next_try:
                continue
            try:
                self._pump()
            except Exception as exc:  # a bug of ours must not end delivery
                self.warn_once("sender", "upload failed: %s: %s", type(exc).__name__, exc)
        self._drain()

    def _take(self):
        if self._retry:
            batch, self._retry = self._retry, []
            return batch
        with self._lock:
            queue = self._queue
            return [queue.popleft() for _ in range(min(self._batch, len(queue)))]

    def _pump(self, deadline=None):
        """Upload batches until the queue is empty (True) or an upload must be retried later (False)."""
        while not (self.closing and deadline is None):
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
            logger.warning("%s: %d item(s) not delivered at shutdown.", self.what, left)

    def _upload(self, batch, deadline=None):
        """POST one batch; True when it is settled (sent or dropped), False when it waits to be retried."""
        timeout = self._timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                self._retry = batch
                return False
        body, headers = self._encode(batch)
        request = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
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
            self.warn_once(("network", type(reason).__name__), "cannot reach %s (%s: %s); will retry "
                           "with backoff", self.destination, type(reason).__name__, reason)
            return self._later(batch, None)

        if status in (307, 308) and location and self._redirects < _AI_MAX_REDIRECTS:
            self._redirects += 1  # the collector moved this resource: follow for this process
            self.url = urllib.parse.urljoin(self.url, location)
            return self._upload(batch, deadline)
        self._redirects = 0
        if 200 <= status < 300 and (status != 206 or self._partial_answer is None):
            self._settled(len(batch), 0)
            return True
        if status == 206:
            retry, lost = self._partial(batch, text)
            self._settled(len(batch) - len(retry) - lost, lost)
            return self._later(retry, retry_after) if retry else True
        if status in _AI_RETRY_STATUSES:
            self.warn_once(("status", status), "the collector answered %d; will retry with backoff", status)
            return self._later(batch, retry_after)
        self.warn_once(("status", status), "the collector answered %d (%s); dropped the batch",
                       status, text[:200].decode("utf-8", "replace"))
        self._settled(0, len(batch))
        return True

    def _partial(self, batch, text):
        """206: (items to resend, items the collector refused for good)."""
        try:
            return self._partial_answer(batch, text, self.warn_once)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.warn_once("partial-body", "cannot read the collector's 206 answer (%s); not resending", exc)
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
        if self.closing:
            return
        self._close_deadline = time.monotonic() + max(0.0, timeout)
        self.closing = True
        self._wake.set()
        self.thread.join(max(0.0, timeout) + 0.5)


def _ai_encode(batch):
    """A batch of envelopes as the ingestion API takes it: a gzip'd JSON array."""
    parts = []
    for n, item in enumerate(batch):  # item by item, yielding the GIL: scoring threads never wait long
        parts.append(json.dumps(item, default=str, separators=(",", ":")))
        if n % 10 == 9:
            time.sleep(0)
    body = gzip.compress(("[" + ",".join(parts) + "]").encode("utf-8"), 6)
    return body, {"Content-Type": "application/json; charset=utf-8", "Content-Encoding": "gzip",
                  "Accept": "application/json"}


def _ai_partial(batch, text, warn_once):
    """The ingestion API's 206 answer: (items to resend, items refused for good)."""
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
            warn_once(("item", code), "the collector refused an item with %d (%s)", code, error.get("message", ""))
    return retry, lost


class Telemetry:
    """Application Insights over its ingestion HTTP API; does nothing unless a valid key is configured.

    Three parts: the configuration (``_resolve_appinsights``), the envelopes (the hooks
    ``track_request``, ``track_exception``, ``track_trace``, ``track_model_data`` build one and
    hand it over: constant time, never blocking, never raising) and the delivery (a ``_Delivery``:
    gzip'd JSON batches every ``telemetry_flush_seconds`` or as soon as 100 items wait, retries,
    a bounded queue whose overflow is counted in ``dropped``; ``sent`` counts accepted items).
    """

    def __init__(self, config):
        self.config = config
        self.enabled = False
        self.destination = None
        self.ikey = None
        self.url = None
        self._delivery = None
        self._closing = False
        self._previous_factory = None
        key, url = _resolve_appinsights(config)
        if key:
            self.ikey, self.url, self.destination, self.enabled = key, url, url, True
            self._start()

    @property
    def sent(self):
        return self._delivery.sent if self._delivery else 0

    @property
    def dropped(self):
        return self._delivery.dropped if self._delivery else 0

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
        self._models = _model_ids(config.model_folder)
        self._delivery = _Delivery("Telemetry", self.url, _ai_encode, config.telemetry_max_queue,
                                   config.telemetry_flush_seconds, config.telemetry_timeout, partial=_ai_partial)
        self._put = self._delivery.put
        self._warn_once = self._delivery.warn_once
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
            trace = req.trace
            item_id = trace.span_id if trace is not None and trace.parent_id else req.request_id
            data = {"ver": 2, "id": item_id or str(uuid.uuid4()), "name": name,
                    "duration": _ai_duration(duration_ms), "responseCode": str(status), "success": status < 400,
                    "url": _clip("http://%s%s" % (host, req.full_target), _AI_MAX_URL), "properties": props}
            self._put(self._envelope("Request", "RequestData", data, req.start_wall, req.request_id, name, trace))
        except Exception as exc:
            self._warn_once("build-request", "cannot record a request: %s: %s", type(exc).__name__, exc)

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
                props, name, request_id, trace = {"Container Id": self._container_id}, "start-up", None, None
            else:
                props, name, request_id = self._properties(req), "%s %s" % (req.method, req.path), req.request_id
                trace = req.trace
            data = {"ver": 2, "exceptions": [detail], "severityLevel": 3, "properties": props}
            self._put(self._envelope("Exception", "ExceptionData", data, time.time(), request_id, name, trace))
        except Exception as err:
            self._warn_once("build-exception", "cannot record an exception: %s: %s",
                            type(err).__name__, err)

    def track_trace(self, record):
        """A log record (print() or logging in the user's code) as a Message record."""
        if not self.enabled or self._closing or getattr(record, "_azmlinfsrv_traced", False):
            return
        name = record.name
        if not isinstance(name, str) or ((name == "azmlinfsrv" or name.startswith("azmlinfsrv."))
                                         and name not in _AI_TRACED_LOGGERS):
            return  # the server's own log lines stay in the log
        if threading.current_thread() is self._delivery.thread:
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
        self._put(self._envelope("Message", "MessageData", data, record.created, request_id, None,
                                 getattr(_context, "trace", None)))

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
            self._put(self._envelope("Message", "MessageData", data, time.time(), req.request_id, None, req.trace))
        except Exception as exc:
            self._warn_once("build-model-data", "cannot record model data: %s: %s",
                            type(exc).__name__, exc)

    def _properties(self, req):
        return {"Container Id": self._container_id, "Request Id": req.request_id or "",
                "Client Request Id": req.client_request_id or ""}

    def _envelope(self, kind, base_type, data, epoch, request_id, operation=None, trace=None):
        tags = dict(self._tags)
        if trace is not None and trace.parent_id:  # W3C: the caller's trace is the operation
            tags["ai.operation.id"] = trace.trace_id
            tags["ai.operation.parentId"] = trace.parent_id if kind == "Request" else trace.span_id
        elif request_id:
            tags["ai.operation.id"] = request_id
            if kind != "Request":
                tags["ai.operation.parentId"] = request_id  # nests under the request's record
        if operation:
            tags["ai.operation.name"] = operation
        return {"name": self._names[kind], "time": _ai_time(epoch), "iKey": self.ikey, "tags": tags,
                "data": {"baseType": base_type, "baseData": data}}

    def close(self, timeout=5.0):
        """Stop taking items and flush what is queued, waiting at most ``timeout`` seconds."""
        if not self.enabled or self._closing:
            return
        if logging.getLogRecordFactory() is self._record_factory:  # else someone wrapped it: it stays, idle
            logging.setLogRecordFactory(self._previous_factory)
        self._closing = True
        self._delivery.close(timeout)


###############################################################################
# III.4  Reload: --reload (hook: App.replace_script)
###############################################################################

class _Reloader(threading.Thread):
    """Polls the script's .py files; on a change loads the new version while the old one serves.

    Polling (one ``os.walk`` and a ``stat`` per file each ``interval``) needs no
    platform API and costs about 2 ms of CPU per scan of 500 files.  A failed
    reload leaves ``app.script_error`` set, so /score answers 503 with the
    diagnostics until a later save loads cleanly.
    """

    def __init__(self, app, interval=_RELOAD_POLL_SECONDS, settle=_RELOAD_SETTLE_SECONDS):
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
                for _ in range(_RELOAD_SETTLE_ROUNDS):
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
        new = _script_for(old.path, app.config)  # III.12: an MLflow model reloads as one
        try:
            new.load()
            app.pool.call(new.call_init)
            swagger_documents(new, app.config)
        except StartupError as exc:
            info = _reload_error(exc, new)
            app.script_failed(info)
            self._forget_entry_modules(app.script)
            app.metrics.count("reload_failures")
            logger.error("Reload failed (%s changed): %s; /score answers 503 until the next save fixes it.",
                         reason, _one_line_diagnosis(info))
            return False
        app.replace_script(new)
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


###############################################################################
# III.5  Pre-fork: --processes (hook: run_server)
###############################################################################

def _prefork(config, sock, health_sock=None):
    """POSIX pre-fork: N children serve the port (on Linux each on a socket of its own, see _PortShare;
    elsewhere the shared socket); the parent restarts any that dies."""
    children = {}
    stopping = []
    share = _PortShare.open(config, sock)  # III.14: Linux: a socket of its own for each process; else None

    def spawn(index, restarted=False):
        pid = os.fork()
        if pid == 0:
            code = EXIT_SCRIPT
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                own, ready = share.child(index) if share else (sock, None)
                code = _run_forever(config, own, banner=index == 0 and not restarted,
                                    health_sock=health_sock, replace_when_stuck=True, before_serving=ready)
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
        if share:
            share.forked(index)
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
    logger.info("Pre-fork mode: %d processes (pids %s) share port %s%s", config.processes,
                ", ".join(map(str, children)), config.port,
                ", each with a socket of its own (SO_REUSEPORT)" if share else "")
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
        code = _exit_code_of(status)
        if stopping:
            continue
        if code in (EXIT_SCRIPT, EXIT_USAGE) and time.monotonic() - started < _FAST_FAIL_SECONDS:
            logger.error("A worker process failed to start (exit %d); stopping.", code)
            exit_code = code
            on_signal(signal.SIGTERM, None)  # (it records the stop, so no new child is started)
            continue
        logger.warning("Worker process %d exited with %s; starting a new one.", pid, code)
        time.sleep(_RESPAWN_PAUSE_SECONDS)
        if not stopping:  # a SIGTERM during the pause must not be answered with a new worker
            spawn(index, restarted=True)
    sock.close()
    if share:
        share.close()
    logger.info("All %d worker processes stopped.", config.processes)
    _flush_logs()
    return exit_code


###############################################################################
# III.6  Debugger: --debug_port (hook: run_server, before the script loads)
###############################################################################

def _start_debugger(config):
    """AZUREML_DEBUG_PORT, as in the reference: connect to the debugger listening there and wait for it.

    Called before the run pool's threads exist, so debugpy traces them and a breakpoint in run() stops.
    debugpy is imported only here.
    """
    port = config.debug_port
    if not port:
        return
    sys.stdout.write("!! Starting the inference server in DEBUGGING mode because AZUREML_DEBUG_PORT is set.\n"
                     "!! This environment variable should not be set in a production environment.\n")
    sys.stdout.flush()
    try:
        import debugpy
    except ImportError:
        sys.stdout.write("** Cannot connect to a debugger because debugpy is not installed.\n")
        sys.stdout.flush()
        raise StartupError("AZUREML_DEBUG_PORT=%d needs debugpy: pip install debugpy (or unset "
                           "AZUREML_DEBUG_PORT)." % port)
    sys.stdout.write("** Connecting to debugger at port %d...\n" % port)
    sys.stdout.flush()
    try:
        debugpy.connect(port)
    except OSError as exc:
        raise StartupError("No debugger is listening on 127.0.0.1:%d (AZUREML_DEBUG_PORT): start it first "
                           "(VS Code: the attach configuration with \"listen\"), then the server. (%s)"
                           % (port, exc))
    debugpy.wait_for_client()
    logger.info("Debugger attached on port %d.", port)


###############################################################################
# III.7  Deployment files and endpoint emulation: --deployment, --emulate_endpoint (hook: Config.resolve; the /score route)
###############################################################################

# What a managed online endpoint adds around the container, read from the Azure ML CLI v2 deployment
# YAML: where the code and the model are, the environment variables, the request limits, the probes and
# the conda file.  The endpoint's own behaviour (408 / 424 / 429) is EndpointEmulator, hooked in front
# of App.score.  Cloud defaults are from the deployment schema's reference page.


#: Deployment fields this server reads (a tuple: the sub-fields it reads), or that mean nothing for a
#: local run (None).  Anything else is listed in one warning: not emulated.
_DEPLOYMENT_FIELDS = {
    "$schema": None, "name": None, "endpoint_name": None, "description": None, "tags": None,
    "properties": None, "instance_type": None, "instance_count": None, "environment_variables": None,
    "model": ("path", "name", "version", "description", "tags", "$schema", "type"),
    "code_configuration": ("code", "scoring_script"),
    "environment": ("conda_file", "image", "name", "version", "description", "tags", "$schema"),
    "request_settings": ("request_timeout_ms", "max_concurrent_requests_per_instance"),
    "data_collector": ("collections", "sampling_rate", "rolling_rate", "request_logging"),
    "liveness_probe": tuple(k for k, _ in _PROBE_DEFAULTS),
    "readiness_probe": tuple(k for k, _ in _PROBE_DEFAULTS),
}

#: Distributions the drift check does not compare: this module stands in for them.
_REPLACED_DISTS = frozenset(("azureml-inference-server-http",))


def _read_structured(path, what):
    """A JSON or YAML file as Python data; PyYAML is imported only for a file that is not JSON."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except OSError as exc:
        raise StartupError("Cannot read the %s %s: %s" % (what, path, exc.strerror or exc))
    if path.lower().endswith(".json"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise StartupError("The %s %s is not valid JSON: %s" % (what, path, exc))
    try:
        import yaml
    except ImportError:
        try:  # JSON is YAML: a JSON text under a .yml name needs no PyYAML
            return json.loads(text)
        except ValueError:
            pass
        raise StartupError(
            "Reading the %s %s needs PyYAML, which this Python (%s) does not have. Install it with "
            "`%s -m pip install pyyaml` (the Azure ML CLI and SDK bring it), or pass the same content as a "
            ".json file (JSON is YAML, so the Azure ML CLI reads that file too)."
            % (what, path, sys.executable, os.path.basename(sys.executable) or "python"))
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StartupError("The %s %s is not valid YAML: %s" % (what, path, exc))


def _positive_field(section, key, default, where):
    value = (section or {}).get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise StartupError("%s: %s must be a positive integer, not %r" % (where, key, value))
    return value


def _env_text(value):
    """A YAML scalar as the container's environment would hold it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


class _Overlay(dict):
    """The process environment with the deployment's variables on top; ``labels`` names their source."""

    labels = {}


class Deployment:
    """An Azure ML CLI v2 managed online deployment file, as the endpoint would run it.

    ``settings`` maps environment-variable names of ``_SETTINGS`` to values (the code folder as
    AML_APP_ROOT, the scoring script, AZUREML_MODEL_DIR, SCORING_TIMEOUT_MS from request_timeout_ms,
    then the file's ``environment_variables``); ``environ`` is all of the file's environment_variables,
    exported before the script loads.
    """

    def __init__(self, path, cli_values, environ):
        self.path = os.path.abspath(path)
        self.folder = os.path.dirname(self.path)
        self.loaded_at = time.monotonic()
        self.warnings = []
        self.model_layout = None  # (what the file names, where AZUREML_MODEL_DIR points)
        self.drift = None  # (mismatches, matched, unchecked, note) once checked
        doc = _read_structured(self.path, "deployment file")
        if not isinstance(doc, dict):
            raise StartupError("The deployment file %s must hold a mapping (name:, model:, code_configuration: "
                               "...), not %s" % (path, type(doc).__name__))
        self.doc = doc
        where = os.path.basename(self.path)
        self.name = doc.get("name") or "(no name)"
        self.endpoint_name = doc.get("endpoint_name")
        for key in ("code_configuration", "request_settings", "liveness_probe", "readiness_probe",
                    "environment_variables"):
            if doc.get(key) is not None and not isinstance(doc[key], dict):
                raise StartupError("%s: %s must be a mapping, not %s" % (where, key, type(doc[key]).__name__))
        unsupported = []
        for key, value in doc.items():
            if key not in _DEPLOYMENT_FIELDS:
                unsupported.append(key)
            elif isinstance(_DEPLOYMENT_FIELDS[key], tuple) and isinstance(value, dict):
                unsupported += ["%s.%s" % (key, k) for k in value if k not in _DEPLOYMENT_FIELDS[key]]
        if unsupported:
            self.warnings.append("The deployment file %s has field(s) this server does not emulate; they are "
                                 "ignored locally: %s" % (self.path, ", ".join(sorted(unsupported))))

        request = doc.get("request_settings") or {}
        self.request_timeout_ms = _positive_field(request, "request_timeout_ms",
                                                  _ENDPOINT_DEFAULTS["request_timeout_ms"], where)
        self.max_concurrent = _positive_field(request, "max_concurrent_requests_per_instance",
                                              _ENDPOINT_DEFAULTS["max_concurrent_requests_per_instance"], where)
        self.instance_count = _positive_field(doc, "instance_count", _ENDPOINT_DEFAULTS["instance_count"], where)
        self.probes = {}
        for probe in ("liveness_probe", "readiness_probe"):
            section = doc.get(probe) or {}
            self.probes[probe] = {k: _positive_field(section, k, d, "%s: %s" % (where, probe))
                                  for k, d in _PROBE_DEFAULTS}

        settings = collections.OrderedDict()
        code = doc.get("code_configuration") or {}
        mlflow_folder = _mlflow_deployment_model(doc, self.folder, "entry_script" not in cli_values)  # III.12
        if "entry_script" not in cli_values and not mlflow_folder:
            if not code.get("scoring_script"):
                raise StartupError("%s has no code_configuration.scoring_script (a no-code MLflow deployment?): "
                                   "give --entry_script." % self.path)
            code_dir = str(code.get("code") or ".")
            if code_dir.startswith("azureml:") or "://" in code_dir:
                raise StartupError("%s: code_configuration.code is %s, a registered or remote asset; point it at "
                                   "a local copy of the code folder." % (where, code_dir))
            settings["AML_APP_ROOT"] = os.path.normpath(os.path.join(self.folder, code_dir))
            settings["AZUREML_ENTRY_SCRIPT"] = str(code["scoring_script"])
        if "model_dir" not in cli_values and doc.get("model") is not None:
            settings["AZUREML_MODEL_DIR"] = self._lay_out_model(doc["model"], where)
        settings["SCORING_TIMEOUT_MS"] = str(self.request_timeout_ms)

        variables = doc.get("environment_variables") or {}
        self.environ = collections.OrderedDict((str(k), _env_text(v)) for k, v in variables.items())
        if mlflow_folder:  # III.12: as the cloud sets it for a no-code deployment
            self.environ.setdefault("MLFLOW_MODEL_FOLDER", os.path.basename(mlflow_folder))
        settings.update((k, v) for k, v in self.environ.items() if k in _SETTING_BY_ENV)
        self.settings = settings
        given = dict(settings)
        given.update(self.environ)
        shadowed = sorted(k for k, v in given.items() if environ.get(k, v) != v)
        if shadowed:
            self.warnings.append("The deployment sets %s, as the endpoint's container would have them; the "
                                 "different value(s) in this shell's environment are not used (a command-line "
                                 "flag still overrides)." % ", ".join("%s=%s" % (k, given[k]) for k in shadowed))

        env = doc.get("environment")
        self.image = env.get("image") if isinstance(env, dict) else None
        self.conda_file = None
        self.environment_note = None
        if isinstance(env, dict) and env.get("conda_file"):
            self.conda_file = os.path.normpath(os.path.join(self.folder, str(env["conda_file"])))
        elif isinstance(env, str):
            self.environment_note = "environment %s is a registered asset: nothing local to compare" % env
        else:
            self.environment_note = "no environment.conda_file: nothing to compare"
        if mlflow_folder and env is None and _mlflow_environment_file(mlflow_folder):  # III.12: Azure builds it
            self.conda_file, self.environment_note = _mlflow_environment_file(mlflow_folder), None

    def _lay_out_model(self, model, where):
        """AZUREML_MODEL_DIR as the endpoint mounts a model: a folder under its own name, a file as is.

        The model is linked, never copied, from a temporary folder that goes away at exit.
        """
        path = model.get("path") if isinstance(model, dict) else None
        text = model if isinstance(model, str) else path
        if isinstance(text, str) and (text.startswith("azureml:") or "://" in text):
            raise StartupError(
                "%s: the model is %s, a registered or remote asset, which a local run cannot download. Point at "
                "a local copy: in the file, model: {path: ./my-model-folder}, or on the command line, "
                "--model_dir FOLDER." % (where, text))
        if not path:
            raise StartupError("%s: model must be a mapping with a local path (model: {path: ./model}), not %r"
                               % (where, model))
        source = os.path.normpath(os.path.join(self.folder, str(path)))
        if not os.path.exists(source):
            raise StartupError("%s: the model path %s does not exist (relative paths are resolved against "
                               "the deployment file's folder, as the Azure ML CLI does)." % (where, source))
        name = str(model.get("name") or "model")
        version = str(model.get("version") or "1")
        import tempfile
        root = tempfile.mkdtemp(prefix="azmlinfsrv-model-")
        atexit.register(shutil.rmtree, root, True)
        model_dir = os.path.join(root, "azureml-models", name, version)
        os.makedirs(model_dir)
        link = os.path.join(model_dir, os.path.basename(source))
        try:
            os.symlink(source, link, target_is_directory=os.path.isdir(source))
        except (OSError, NotImplementedError) as exc:  # e.g. Windows without the symlink privilege
            model_dir = os.path.dirname(source)
            self.warnings.append("Cannot link the model into a temporary AZUREML_MODEL_DIR (%s); using its parent "
                                 "folder %s instead, so the script also sees that folder's other entries." %
                                 (exc, model_dir))
            link = source
        self.model_layout = (path, link)
        return model_dir

    def check_environment(self, strict):
        """Compare the conda file's == / = pins with this Python; a warning (or, strict, an error)."""
        if self.conda_file is None:
            self.drift = ([], 0, [], self.environment_note)
            return None
        try:
            conda = _read_conda(self.conda_file)
        except StartupError as exc:
            if strict:
                raise
            self.drift = ([], 0, [], "not checked: " + exc.message)
            return "Environment drift check skipped: %s" % exc.message
        mismatches, matched, unchecked, replaced = _environment_drift(conda)
        self.drift = (mismatches, matched, unchecked, None)
        if not mismatches:
            return None
        rows = [("package", "deployment pins", "this Python has", "")]
        rows += [(name, pin, have or "-", "MISSING" if have is None else "MISMATCH")
                 for name, pin, have in mismatches]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["Environment drift: %s pins %d package(s) that this Python (%s) does not have as pinned "
                 "(%d other pin(s) match):" % (_shown_path(self.conda_file), len(mismatches), sys.executable,
                                              matched)]
        lines += ["  %s  %s  %s  %s" % (r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2]),
                                        r[3]) for r in rows]
        if unchecked:
            lines.append("  Unchecked (not pinned with == or conda's =): %s" % ", ".join(unchecked))
        if replaced:
            lines.append("  Not compared (this server stands in for it): %s" % ", ".join(replaced))
        text = "\n".join(lines)
        if strict:
            raise StartupError(text + "\n--strict_environment: install the pinned versions, or change the pins.")
        return text

    def banner_lines(self, config):
        """The deployment's part of the start-up banner; warns when start-up outlasts the liveness probe."""
        lines = ["Deployment:   %s%s from %s" % (self.name, " (endpoint %s)" % self.endpoint_name
                                                 if self.endpoint_name else "", self.path)]
        if self.model_layout:
            lines.append("  Model:      %s linked as %s" % self.model_layout)
        limit = 2 * self.max_concurrent * self.instance_count
        lines.append("  Requests:   request_timeout_ms %d, max_concurrent_requests_per_instance %d, instance_count "
                     "%d: the endpoint answers 429 beyond %d in flight%s" % (
                         self.request_timeout_ms, self.max_concurrent, self.instance_count, limit,
                         "" if config.emulate_endpoint else " (emulate with --emulate_endpoint)"))
        started = time.monotonic() - self.loaded_at
        live = self.probes["liveness_probe"]
        ready = self.probes["readiness_probe"]
        budget = live["initial_delay"] + live["failure_threshold"] * live["period"]
        lines.append("  Probes:     GET / (liveness every %d s after %d s, restart after %d failures; readiness "
                     "every %d s after %d s): start-up took %.1f s" % (
                         live["period"], live["initial_delay"], live["failure_threshold"], ready["period"],
                         ready["initial_delay"], started))
        if started > budget:
            logger.warning("Start-up took %.1f s; the liveness probe allows %d s (initial_delay %d + failure_threshold "
                           "%d x period %d), so the endpoint would restart this container before it is ready.",
                           started, budget, live["initial_delay"], live["failure_threshold"], live["period"])
        if self.drift is not None:
            mismatches, matched, unchecked, note = self.drift
            lines.append("  Environment: %s" % (note or "%s: %d pin(s) match, %d drift%s, %d unchecked" % (
                _shown_path(self.conda_file), matched, len(mismatches),
                " (see the warning above)" if mismatches else "", len(unchecked))))
        return lines


def _shown_path(path):
    """A path relative to the working directory when that is shorter (and possible: not across drives)."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return relative if len(relative) < len(path) else path


_PIP_SPEC_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")


def _normalise_dist(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_key(version):
    """'1.20.0rc1+cpu' -> ((1, 20), 'rc1'): release numbers without trailing zeros (1.2 == 1.2.0, as pip
    compares them) and the rest; a local label (+cpu) is left out."""
    text = version.split("+")[0].strip().lower().lstrip("v")
    match = re.match(r"\d+(?:\.\d+)*", text)
    if not match:
        return (), text
    numbers = [int(p) for p in match.group().split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers), text[match.end():].lstrip(".-_")


def _version_matches(pin, have, prefix):
    if prefix:  # conda's 'numpy=1.2' and pip's '==1.2.*': 1.2, 1.2.0, 1.2.5, not 1.20
        want = pin.rstrip(".*").lower().split(".")
        return re.split(r"[.+]", have.lower())[:len(want)] == want
    if "+" in pin:
        return have.lower() == pin.lower()
    return _version_key(have) == _version_key(pin)


def _parse_pin(spec, conda):
    """(name, pin text, version, prefix) for an == (or conda =) pin; (name or spec, None, ...) otherwise."""
    spec = spec.split("#")[0].split(";")[0].strip()
    if conda and "::" in spec:
        spec = spec.split("::", 1)[1]  # conda-forge::numpy=1.2
    if not spec or spec.startswith("-") or "://" in spec or " @ " in spec:
        return spec, None, None, False
    match = _PIP_SPEC_RE.match(spec)
    if not match:
        return spec, None, None, False
    name, rest = match.group(1), match.group(2).replace(" ", "")
    if rest and rest[0] not in "=<>!~":
        return spec, None, None, False  # 'numpy 1.2' and other forms: not guessed
    if conda and rest.startswith("=") and not rest.startswith("=="):
        version = rest[1:].split("=")[0]  # numpy=1.2=py38_0: the build string is not a version
        return name, "=" + version, version, True
    if rest.startswith("==") and not rest.startswith("===") and "," not in rest:
        version = rest[2:].split("=")[0] if conda else rest[2:]
        prefix = version.endswith("*")
        return name, "==" + version, version.rstrip(".*") if prefix else version, prefix
    return spec, None, None, False


def _environment_drift(conda):
    """(mismatches [(name, pin, installed or None)], matched count, unchecked [spec], replaced [spec])."""
    import importlib.metadata

    installed = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            installed.setdefault(_normalise_dist(name), dist.version)  # the first on sys.path wins, as import
    specs = []
    dependencies = conda.get("dependencies") if isinstance(conda, dict) else None
    for item in dependencies if isinstance(dependencies, list) else []:
        if isinstance(item, dict):
            specs += [(str(p), False) for p in item.get("pip") or []]
        elif item is not None:
            specs.append((str(item), True))
    mismatches, unchecked, replaced, matched = [], [], [], 0
    for spec, conda_spec in specs:
        name, pin, version, prefix = _parse_pin(spec, conda_spec)
        if pin is None:
            if name:
                unchecked.append(name)
            continue
        key = _normalise_dist(name)
        if key in _REPLACED_DISTS:
            replaced.append(name + pin)
            continue
        have = "%d.%d.%d" % sys.version_info[:3] if key == "python" else installed.get(key)
        if have is not None and _version_matches(version, have, prefix):
            matched += 1
        else:
            mismatches.append((name, pin, have))
    return mismatches, matched, unchecked, replaced


def _load_deployment(cli_values, environ, cwd):
    """The --deployment file (command line or AZMLINFSRV_DEPLOYMENT) as a Deployment, or None."""
    path = cli_values.get("deployment") or environ.get("AZMLINFSRV_DEPLOYMENT")
    if not path:
        return None
    path = os.path.join(cwd, path)
    if not os.path.isfile(path):
        raise StartupError("Deployment file not found: %s" % path)
    return Deployment(path, cli_values, environ)


def _overlay_environment(environ, deployment):
    """The environment the settings are read from: the deployment's variables win over the shell's."""
    overlay = _Overlay(environ)
    overlay.update(deployment.settings)
    overlay.labels = {k: "deployment (%s)" % k for k in deployment.settings}
    return overlay


def _finish_endpoint(cfg, deployment):
    """After the settings are resolved: the emulator's limits, the worker check, the drift check."""
    cfg.deployment_info = deployment
    cfg.warnings.extend(deployment.warnings if deployment else ())
    limits = dict(_ENDPOINT_DEFAULTS)
    if deployment is not None:
        limits.update(request_timeout_ms=deployment.request_timeout_ms, instance_count=deployment.instance_count,
                      max_concurrent_requests_per_instance=deployment.max_concurrent)
        if cfg.worker_count != deployment.max_concurrent:
            cfg.warnings.append(
                "WORKER_COUNT is %d (%s) but request_settings.max_concurrent_requests_per_instance is %d: Azure "
                "does not derive one from the other, so the endpoint %s. Set both to the same number." % (
                    cfg.worker_count, cfg.sources.get("worker_count"), deployment.max_concurrent,
                    "sends more requests than there are workers and they queue in the container"
                    if deployment.max_concurrent > cfg.worker_count else "never keeps every worker busy"))
        if cfg.scoring_timeout_ms > deployment.request_timeout_ms:
            cfg.warnings.append("SCORING_TIMEOUT_MS is %d (%s), more than request_timeout_ms %d: the endpoint "
                                "answers 408 before the server's own timeout." % (
                                    cfg.scoring_timeout_ms, cfg.sources.get("scoring_timeout_ms"),
                                    deployment.request_timeout_ms))
        drift = deployment.check_environment(cfg.strict_environment)
        if drift:
            cfg.warnings.append(drift)
    elif cfg.sources.get("scoring_timeout_ms") == "default":
        cfg.scoring_timeout_ms = limits["request_timeout_ms"]  # the cloud's default, not the reference's hour
        cfg.sources["scoring_timeout_ms"] = "--emulate_endpoint (request_timeout_ms default)"
    if cfg.emulate_endpoint:
        cfg.endpoint = EndpointEmulator(**limits)
        if cfg.processes > 1:
            cfg.warnings.append("--emulate_endpoint with %d processes: each counts its own requests in flight, so "
                                "the 429 comes only beyond %d x %d." % (cfg.processes, cfg.processes,
                                                                         cfg.endpoint.limit))


def _export_deployment_environment(config):
    """The deployment's environment_variables, where the script reads them (os.environ)."""
    deployment = getattr(config, "deployment_info", None)
    for key, value in (deployment.environ.items() if deployment else ()):
        os.environ[key] = value


class EndpointEmulator:
    """What a managed online endpoint turns the container's answers into (--emulate_endpoint).

    From Azure's "troubleshoot online endpoints" status table: an answer later than
    ``request_timeout_ms`` is a 408; any status but 200 from the container is a 424 that carries
    it in ``ms-azureml-model-error-statuscode`` (and its reason phrase in
    ``ms-azureml-model-error-reason``); more than 2 x ``max_concurrent_requests_per_instance``
    x ``instance_count`` requests in flight get a 429.  The server's own answer stays visible:
    its body is kept as is and its status is in ``x-azmlinfsrv-server-status``; the reason is in
    ``x-azmlinfsrv-endpoint`` and in one log line per request.

    ``admit()`` / ``release()`` count requests in flight; ``transform()`` decides the answer.
    """

    def __init__(self, request_timeout_ms, max_concurrent_requests_per_instance, instance_count):
        self.request_timeout_ms = request_timeout_ms
        self.max_concurrent = max_concurrent_requests_per_instance
        self.instance_count = instance_count
        self.limit = 2 * max_concurrent_requests_per_instance * instance_count
        self.in_flight = 0
        self._lock = threading.Lock()

    def admit(self):
        """Count one request in; False (answer rejected()) when the endpoint would not pass it on."""
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            return True

    def release(self):
        with self._lock:
            self.in_flight -= 1

    def rejected(self):
        """The 429 answer, as an HttpError, and its log line."""
        why = ("%d requests in flight already; the endpoint allows %d (2 x max_concurrent_requests_per_instance "
               "%d x instance_count %d)" % (self.limit, self.limit, self.max_concurrent, self.instance_count))
        error = HttpError(429, "Too many pending requests: " + why + ". Not sent to the server (emulated by "
                          "azmlinfsrv --emulate_endpoint).", headers=[("x-azmlinfsrv-endpoint", "429; " + why)],
                          run_failed=None)
        return error, "429: " + why

    def transform(self, status, headers, body, elapsed_ms):
        """The endpoint's answer for the server's (status, headers, body) that took ``elapsed_ms``."""
        run_ms = next((v for n, v in headers if n.lower() == "x-ms-run-fn-exec-ms"), None)
        if run_ms:
            took = "run() took %.1f s" % (float(run_ms) / 1000.0)
        elif status == 500 and b"Scoring timeout after" in (body or b"")[:80]:
            took = "run() was still running after %.1f s (the server's scoring timeout)" % (elapsed_ms / 1000.0)
        else:
            took = "the server answered %s after %.1f s" % (status, elapsed_ms / 1000.0)
        if elapsed_ms >= self.request_timeout_ms:
            why = "%s, request_timeout_ms is %d" % (took, self.request_timeout_ms)
            if run_ms and float(run_ms) < elapsed_ms - 50:
                why += " (%.1f s with the wait for a worker)" % (elapsed_ms / 1000.0)
            code = 408
        elif status != 200:
            why = "the server answered %d %s; the endpoint passes any status but 200 on as 424" % (
                status, _REASONS.get(status, ""))
            headers.append(("ms-azureml-model-error-statuscode", str(status)))
            headers.append(("ms-azureml-model-error-reason", _REASONS.get(status, "Unknown")))
            code = 424
        else:
            return status, headers, body, "200: passed on (%.0f ms of request_timeout_ms %d)" % (
                elapsed_ms, self.request_timeout_ms)
        headers.append(("x-azmlinfsrv-server-status", str(status)))
        headers.append(("x-azmlinfsrv-endpoint", "%d; %s" % (code, why)))
        return code, headers, body, "%d: %s" % (code, why)

    def wrap(self, req, answer):
        """The /score route's wrapper with --emulate_endpoint: ``answer(req)`` is the container's answer."""
        if not self.admit():
            error, line = self.rejected()
            logger.warning("Endpoint emulation for request %s: %s", req.request_id, line)
            raise error
        start = time.perf_counter()
        try:
            try:
                resp = answer(req)
            except HttpError as exc:  # the container's error answer: the endpoint transforms it too
                resp = exc.response()
        finally:
            self.release()
        resp.status, resp.headers, resp.body, line = self.transform(
            resp.status, resp.headers, resp.body, (time.perf_counter() - start) * 1000.0)
        (logger.info if resp.status == 200 else logger.warning)("Endpoint emulation for request %s: %s",
                                                                 req.request_id, line)
        return resp


###############################################################################
# III.8  --check and serve(): clients of the public API
###############################################################################

class Reply(collections.namedtuple("Reply", "status headers body")):
    """What serve().request() and serve().score() return; unpacks as (status, headers, body).

    ``headers`` is a dict of lower-cased names (the last value wins); ``header_list`` is every header
    as sent, in order, duplicates kept, as (name, value) pairs.
    """

    header_list = ()

    def __new__(cls, status, headers, body, header_list=()):
        self = super().__new__(cls, status, headers, body)
        self.header_list = list(header_list)
        return self


class _Json:
    """A value to send as JSON text, whatever its type (a str included)."""

    def __init__(self, value):
        self.value = value


def _base_url(address):
    host, port = address[:2]
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)


def _start_instance(config, host, port):
    """Bind ``host``:``port`` and start a server there (serve(), --check): the running _RunningServer."""
    sock = _bind(config, host=host, port=port)
    try:
        return _RunningServer(config, sock).start()
    except BaseException:
        sock.close()
        raise


def _send_request(address, method, path, body=None, headers=None, timeout=30.0):
    """One request to ``address``: a Reply.  A dict, a list or a _Json ``body`` goes as JSON (with
    Content-Type application/json unless ``headers`` name one), str as UTF-8, bytes as is."""
    host, port = address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body.value if isinstance(body, _Json) else body)
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
        if isinstance(body, str):
            body = body.encode("utf-8")
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        header_list = resp.getheaders()
        resp_headers = {k.lower(): v for k, v in header_list}
    finally:
        conn.close()
    if "json" in resp_headers.get("content-type", ""):
        try:
            data = json.loads(data)
        except ValueError:
            pass
    return Reply(resp.status, resp_headers, data, header_list)


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
        known = set(_SETTING_BY_NAME)
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
            config = Config.resolve(values, cwd=os.path.dirname(script)).replace("serve()", port=self.port)
            _configure_logging(config, script)
            for warning in config.warnings:
                logger.warning(warning)
            self._instance = _start_instance(config, self.host, self.port)
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
                self._instance.drain(grace=_SERVE_GRACE_SECONDS)
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
        return _base_url(self._instance.address)

    def request(self, method, path, body=None, headers=None, timeout=30.0):
        """Send one request: a dict or list ``body`` goes as JSON, str as UTF-8, bytes as is."""
        return _send_request(self._instance.address, method, path, body, headers, timeout)

    def score(self, payload=None, headers=None, method="POST"):
        """POST ``payload`` to /score (JSON-encoded unless str/bytes): a Reply (status, headers, body)."""
        return self.request(method, "/score", payload, headers)


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


def _load_cases(path, flag="--check"):
    """The requests of a --check file: a JSON list of cases, JSON lines, one case, or only a body.

    A case is ``{"name", "method", "path", "headers", "body" | "json", "expect": {"status",
    "json", "contains", "headers"}}``.  A file that is not cases is sent whole as one POST
    to /score (a JSON line that is not a case is sent as one POST per line).
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise StartupError("Cannot read the %s file %s: %s" % (flag, path, exc.strerror or exc), EXIT_USAGE)
    base = os.path.basename(path)
    if not raw.strip():
        raise StartupError("The %s file %s is empty." % (flag, path), EXIT_USAGE)
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


def _check_case(address, case, index, timeout):
    """Send one case and compare: (name, ok, problems, seconds)."""
    name = case.get("name") or "case %d" % (index + 1)
    method = case.get("method", "POST" if ("body" in case or "json" in case) else "GET").upper()
    path = case.get("path", "/score")
    headers = {str(k): str(v) for k, v in (case.get("headers") or {}).items()}
    if "json" in case:
        body = _Json(case["json"])
    elif "body" in case:
        body = case["body"] if isinstance(case["body"], (str, bytes)) else json.dumps(case["body"])
    else:
        body = None
    expect = dict(case.get("expect") or {})
    expect.setdefault("status", 200)
    start = time.perf_counter()
    try:
        status, resp_headers, data = _send_request(address, method, path, body, headers, timeout=timeout)
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
    changes = dict(host="127.0.0.1", port=0, health_port=None, reload=False, processes=1, access_log=False)
    if config.sources.get("scoring_timeout_ms") == "default":
        changes["scoring_timeout_ms"] = _CHECK_SCORING_TIMEOUT_MS  # a hung run() fails its case in a minute
    config = config.replace("--check", **changes)
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
        instance = _start_instance(config, "127.0.0.1", 0)
    except StartupError as exc:
        if report_path:
            details = exc.message + ("\n" + _format_diagnosis(exc.diagnostics) if exc.diagnostics else "")
            _write_report(report_path, _junit_xml([], suite, time.perf_counter() - start, (exc.message, details)))
        raise
    stream.write("Checking %s with %d request(s) from %s on %s\n" % (
        os.path.basename(script_path), len(cases), cases_path, _base_url(instance.address)))
    formatter = next((h.formatter for h in logger.handlers if h.formatter), None) or logging.Formatter(
        "%(levelname).1s %(name)s - %(message)s")
    timeout = config.scoring_timeout_ms / 1000.0 + _CHECK_EXTRA_SECONDS
    results = []
    try:
        for index, case in enumerate(cases):
            capture = _CaseLog(formatter)
            saved = logger.handlers[:], logger.propagate
            logger.handlers[:], logger.propagate = [capture], False
            try:
                name, ok, problems, elapsed = _check_case(instance.address, case, index, timeout)
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
        instance.drain(grace=_SERVE_GRACE_SECONDS)
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
# III.9  Tracing: W3C trace context and OTLP/HTTP export (hook: App.tracer, asked in App._request_ids, App.score,
#       App.record and _RunningServer.drain)
###############################################################################
# A request that carries a valid ``traceparent`` joins the caller's trace: its App Insights items take the
# caller's trace id as operation id, its span (exported over OTLP when an endpoint is set) the caller's
# span as parent.  Any other request starts a new trace.  run() sees ``traceparent`` naming this server's
# span, so what it calls continues the trace.  Nothing here runs unless something records traces (App
# Insights, an OTLP endpoint, JSON logs): then ``App.tracer`` is None and ``req.trace`` stays None.

_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_OTLP_SPAN_KIND_SERVER = 2
_OTLP_STATUS_ERROR = 2
_OTLP_TRACED_PATHS = frozenset(("/score", "/swagger.json"))  # not the probe (GET /) nor /metrics


def _parse_traceparent(value):
    """W3C ``traceparent`` -> (trace id, parent span id, flags), or None when it is not valid.

    Version 00 is exactly 55 characters of lowercase hex fields; a later version is read by its first
    four fields when what follows them is a dash; version ff and all-zero ids are invalid.
    """
    if not value:
        return None
    match = _TRACEPARENT_RE.match(value.strip(" \t"))
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, int(flags, 16)


def _clean_tracestate(value):
    """``tracestate`` as passed on: at most 32 list members, at most _TRACESTATE_MAX characters; else ''."""
    if not value:
        return ""
    members = [m.strip(" \t") for m in value.split(",") if m.strip(" \t")]
    if len(members) > 32 or any("=" not in m for m in members):
        return ""
    text = ",".join(members)
    return text if len(text) <= _TRACESTATE_MAX else ""


class _Trace:
    """One request's place in a trace: the ids its log lines, App Insights items and span carry."""

    __slots__ = ("trace_id", "span_id", "parent_id", "flags", "state", "request_id", "run_ms", "error")

    def __init__(self, trace_id, span_id, parent_id, flags, state, request_id):
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # the caller's span; None: a trace of our own
        self.flags = flags
        self.state = state
        self.request_id = request_id
        self.run_ms = None  # how long run() took, when it ran
        self.error = None  # run()'s exception, when it raised

    @property
    def traceparent(self):
        """The header run() passes on: this server's span as the parent of whatever run() calls."""
        return "00-%s-%s-%02x" % (self.trace_id, self.span_id, self.flags & 1)


class _Tracer:
    """Gives each request a _Trace (``begin``) and, with an OTLP exporter, sends its span (``end``).

    Owns the exporter; ``App`` asks it at three points: when the request ids are decided, around
    run() (``wrap``), and once the answer is sent.
    """

    def __init__(self, exporter=None):
        self.exporter = exporter

    @classmethod
    def from_config(cls, config, telemetry):
        """None unless something records traces: App Insights, OTLP export, or JSON logs."""
        exporter = _OtlpExporter.from_environment(os.environ)
        if exporter is None and not telemetry.enabled and getattr(config, "log_format", "text") != "json":
            return None
        return cls(exporter)

    def begin(self, req):
        """The request's trace (None for the liveness probe), once its ids are decided (App._request_ids)."""
        if req.path == "/":  # the liveness probe: no trace, no work
            _context.trace = None
            return None
        hmap = req.hmap
        parsed = _parse_traceparent(hmap.get("traceparent"))
        if parsed is None:
            trace_id, parent_id, flags, state = os.urandom(16).hex(), None, 1, ""
        else:
            trace_id, parent_id, flags = parsed
            state = _clean_tracestate(hmap.get("tracestate"))
        trace = _Trace(trace_id, os.urandom(8).hex(), parent_id, flags, state, req.request_id)
        _context.trace = trace
        return trace

    @staticmethod
    def wrap(run, trace):
        """run() on its worker thread with the request's trace current (for log lines), timed."""
        def traced_run(**kwargs):
            _context.trace = trace
            start = time.perf_counter()
            try:
                return run(**kwargs)
            except BaseException as exc:
                trace.error = exc
                raise
            finally:
                trace.run_ms = (time.perf_counter() - start) * 1000.0
                _context.trace = None
        return traced_run

    def end(self, req, resp, duration):
        """Called once the answer is sent (App.record): the span, when one is exported."""
        _context.trace = None
        trace = req.trace
        exporter = self.exporter
        if exporter is not None and trace.flags & 1 and req.path in _OTLP_TRACED_PATHS:
            exporter.export(req, resp, trace, duration)

    def close(self, timeout=5.0):
        if self.exporter is not None:
            self.exporter.close(timeout)


def _otel_pairs(text):
    """``key1=value1,key2=value2`` (OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES), percent-decoded."""
    pairs = []
    for part in (text or "").split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            pairs.append((urllib.parse.unquote(key.strip()), urllib.parse.unquote(value.strip())))
    return pairs


def _otel_number(env, names, default, what):
    for name in names:
        text = env.get(name, "").strip()
        if text:
            try:
                value = float(text)
                if value > 0:
                    return value
            except ValueError:
                pass
            logger.warning("%s=%r is not a positive number: using %s for %s.", name, text, default, what)
            return default
    return default


class _OtlpExporter:
    """Server spans to an OTLP/HTTP collector (http/protobuf or http/json), through a _Delivery.

    ``export()`` runs on the request thread: it turns the request into a small tuple and queues it; the
    encoding (a hand-written protobuf or the OTLP JSON form) happens on the delivery thread.
    """

    def __init__(self, url, protocol, headers, resource, delay, queue_size, batch, timeout):
        self.url = url
        self.protocol = protocol
        self._headers = dict(headers)
        self._resource = resource  # [(key, value)]
        encode = self._encode_protobuf if protocol == "http/protobuf" else self._encode_json
        self._delivery = _Delivery("Trace export", url, encode, queue_size, delay, timeout, batch=batch,
                                   dropped_metric=None)
        logger.info("Trace export: OTLP %s to %s", protocol, url)

    @classmethod
    def from_environment(cls, env):
        """The standard OTEL_* variables; None (with a warning when they ask for what is not here)."""
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        exporters = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
        if "otlp" not in exporters:
            if [e for e in exporters if e != "none"]:
                logger.warning("OTEL_TRACES_EXPORTER=%s: only otlp is supported here; no traces are exported.",
                               env.get("OTEL_TRACES_EXPORTER"))
            return None
        url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if not url:
            base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
            if not base:
                return None  # nothing is exported unless an endpoint is set
            url = base.rstrip("/") + "/v1/traces"
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            logger.warning("The OTLP traces endpoint must be an http(s) URL, not %r: no traces are exported.", url)
            return None
        protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
                    or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip() or "http/protobuf")
        if protocol not in ("http/protobuf", "http/json"):
            logger.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: only http/protobuf and http/json are supported "
                           "here; no traces are exported.", protocol)
            return None
        headers = _otel_pairs(env.get("OTEL_EXPORTER_OTLP_HEADERS"))
        headers += _otel_pairs(env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS"))
        attributes = _otel_pairs(env.get("OTEL_RESOURCE_ATTRIBUTES"))
        service = env.get("OTEL_SERVICE_NAME", "").strip() or dict(attributes).get("service.name") \
            or "unknown_service:" + os.path.basename(sys.executable or "python")
        resource = [(k, v) for k, v in attributes if k != "service.name"]
        resource = [("service.name", service)] + resource + [
            ("telemetry.sdk.name", "azmlinfsrv"), ("telemetry.sdk.language", "python"),
            ("telemetry.sdk.version", __version__)]
        delay = _otel_number(env, ("OTEL_BSP_SCHEDULE_DELAY",), 5000, "the export delay") / 1000.0
        queue_size = int(_otel_number(env, ("OTEL_BSP_MAX_QUEUE_SIZE",), 2048, "the span queue"))
        batch = int(_otel_number(env, ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE",), 512, "the export batch"))
        timeout = _otel_number(env, ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"), 10000,
                               "the export timeout") / 1000.0
        return cls(url, protocol, headers, resource, delay, queue_size, min(batch, queue_size), timeout)

    @property
    def sent(self):
        return self._delivery.sent

    @property
    def dropped(self):
        return self._delivery.dropped

    def export(self, req, resp, trace, duration):
        """Queue the request's span: constant time, never blocking, never raising."""
        try:
            status = resp.status
            host, _, port = (req.hmap.get("host") or "").rpartition(":")
            if not host or not port.isdigit():
                host, port = req.hmap.get("host") or str(req.server_address[0]), str(req.server_address[1])
            attrs = [("http.request.method", req.method), ("http.route", req.path), ("url.path", req.path),
                     ("url.scheme", "http"), ("http.response.status_code", status),
                     ("network.protocol.version", req.version[5:]), ("server.address", host.strip("[]")),
                     ("server.port", int(port))]
            if req.query:
                attrs.append(("url.query", req.query))
            if req.client:
                attrs += [("client.address", req.client[0]), ("network.peer.address", req.client[0]),
                          ("network.peer.port", req.client[1])]
            agent = req.hmap.get("user-agent")
            if agent:
                attrs.append(("user_agent.original", agent))
            if status >= 500:
                attrs.append(("error.type", type(trace.error).__name__ if trace.error is not None else str(status)))
            attrs.append(("azureml.request_id", req.request_id or ""))
            if trace.run_ms is not None:
                attrs.append(("azureml.run.duration_ms", float(trace.run_ms)))
            start = int(req.start_wall * 1e9)
            event = None
            if trace.error is not None:
                exc = trace.error
                event = (start + int(duration * 1e9), "exception", [
                    ("exception.type", type(exc).__name__), ("exception.message", str(exc))])
            self._delivery.put((trace.trace_id, trace.span_id, trace.parent_id, trace.state, trace.flags,
                                "%s %s" % (req.method, req.path), start, start + int(duration * 1e9), attrs,
                                status >= 500, event))
        except Exception as exc:
            self._delivery.warn_once("build-span", "cannot record a span: %s: %s", type(exc).__name__, exc)

    # -- encodings, on the delivery thread --------------------------------------------------------
    def _encode_protobuf(self, spans):
        body = _pb_message(1, _pb_message(1, b"".join(_pb_message(1, _pb_key_value(k, v))
                                                      for k, v in self._resource))
                           + _pb_message(2, _pb_message(1, _pb_string(1, "azmlinfsrv") + _pb_string(2, __version__))
                                         + b"".join(_pb_message(2, self._span_protobuf(s)) for s in spans)))
        headers = dict(self._headers)
        headers["Content-Type"] = "application/x-protobuf"
        return body, headers

    @staticmethod
    def _span_protobuf(span):
        trace_id, span_id, parent_id, state, flags, name, start, end, attrs, failed, event = span
        out = [_pb_bytes(1, bytes.fromhex(trace_id)), _pb_bytes(2, bytes.fromhex(span_id))]
        if state:
            out.append(_pb_string(3, state))
        if parent_id:
            out.append(_pb_bytes(4, bytes.fromhex(parent_id)))
        out += [_pb_string(5, name), _pb_varint_field(6, _OTLP_SPAN_KIND_SERVER), _pb_fixed64(7, start),
                _pb_fixed64(8, end)]
        out += [_pb_message(9, _pb_key_value(k, v)) for k, v in attrs]
        if event is not None:
            when, event_name, event_attrs = event
            out.append(_pb_message(11, _pb_fixed64(1, when) + _pb_string(2, event_name) + b"".join(
                _pb_message(3, _pb_key_value(k, v)) for k, v in event_attrs)))
        if failed:
            out.append(_pb_message(15, _pb_varint_field(3, _OTLP_STATUS_ERROR)))
        out.append(_pb_fixed32(16, _otlp_flags(flags, parent_id)))
        return b"".join(out)

    def _encode_json(self, spans):
        def attributes(pairs):
            return [{"key": k, "value": _otlp_json_value(v)} for k, v in pairs]

        items = []
        for trace_id, span_id, parent_id, state, flags, name, start, end, attrs, failed, event in spans:
            span = {"traceId": trace_id, "spanId": span_id, "name": name, "kind": _OTLP_SPAN_KIND_SERVER,
                    "startTimeUnixNano": str(start), "endTimeUnixNano": str(end), "attributes": attributes(attrs),
                    "flags": _otlp_flags(flags, parent_id)}
            if parent_id:
                span["parentSpanId"] = parent_id
            if state:
                span["traceState"] = state
            if event is not None:
                span["events"] = [{"timeUnixNano": str(event[0]), "name": event[1], "attributes": attributes(event[2])}]
            span["status"] = {"code": _OTLP_STATUS_ERROR} if failed else {}
            items.append(span)
        document = {"resourceSpans": [{"resource": {"attributes": attributes(self._resource)}, "scopeSpans": [
            {"scope": {"name": "azmlinfsrv", "version": __version__}, "spans": items}]}]}
        headers = dict(self._headers)
        headers["Content-Type"] = "application/json"
        return json.dumps(document, separators=(",", ":")).encode("utf-8"), headers

    def close(self, timeout=5.0):
        self._delivery.close(timeout)


def _otlp_flags(flags, parent_id):
    """Span.flags: the W3C trace flags, and bits 8-9 saying whether the parent is remote (it always is here)."""
    return (flags & 0xff) | (0x300 if parent_id else 0x100)


def _otlp_json_value(value):
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": str(value)}


# A protobuf writer for the few wire types OTLP's trace messages use (varint, fixed32/64, length-delimited).
def _pb_varint(n):
    out = bytearray()
    while n > 0x7f:
        out.append((n & 0x7f) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _pb_varint_field(field, n):
    return _pb_varint(field << 3) + _pb_varint(n & 0xffffffffffffffff)  # int64: two's complement


def _pb_bytes(field, data):
    return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data


_pb_message = _pb_bytes  # an embedded message is its encoding, length-delimited


def _pb_string(field, text):
    return _pb_bytes(field, text.encode("utf-8"))


def _pb_fixed64(field, n):
    return _pb_varint(field << 3 | 1) + struct.pack("<Q", n)


def _pb_fixed32(field, n):
    return _pb_varint(field << 3 | 5) + struct.pack("<I", n)


def _pb_key_value(key, value):
    """KeyValue {key = 1; AnyValue value = 2}; AnyValue: string 1, bool 2, int 3, double 4."""
    if isinstance(value, bool):
        any_value = _pb_varint_field(2, int(value))
    elif isinstance(value, int):
        any_value = _pb_varint_field(3, value)
    elif isinstance(value, float):
        any_value = _pb_varint(4 << 3 | 1) + struct.pack("<d", value)
    else:
        any_value = _pb_string(1, str(value))
    return _pb_string(1, key) + _pb_message(2, any_value)


###############################################################################
# III.10  JSON logs: --log_format json (hook: _configure_logging; run()'s failure passes its diagnosis as extra)
###############################################################################

class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request's ids, the exception and where."""

    def format(self, record):
        entry = {"time": _ai_time(record.created), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), "process": record.process}
        request_id, trace_id, span_id = getattr(record, "azmlinfsrv_ids", (None, None, None))
        if request_id:
            entry["request_id"] = request_id
        if trace_id:
            entry["trace_id"] = trace_id
            entry["span_id"] = span_id
        info = getattr(record, "azmlinfsrv_error", None)  # run() failed or timed out: its diagnosis
        if info:
            entry["exception"] = {"type": info.get("type"), "message": info.get("text"),
                                  "location": info.get("location")}
        elif record.exc_info and record.exc_info[0] is not None:
            exc_type, exc, tb = record.exc_info
            frames = traceback.extract_tb(tb)
            entry["exception"] = {"type": exc_type.__name__, "message": str(exc), "location": {
                "file": frames[-1].filename, "line": frames[-1].lineno, "function": frames[-1].name} if frames else None,
                "traceback": self.formatException(record.exc_info)}
        elif record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False)


class _JsonLogs:
    """--log_format json: the server's handler writes JSON; the root logger (the script's logging) too.

    A record factory stamps each record with the ids of the request its thread works on (``_context``),
    as the record is made: the lines are formatted later, on the log thread.
    """

    installed = False
    _root_handler = None

    @classmethod
    def apply(cls, handler, on):
        if on:
            handler.setFormatter(_JsonFormatter())
            root = logging.getLogger()
            if not root.handlers:  # the script's own logging, which otherwise goes to logging.lastResort
                cls._root_handler = handler
                root.addHandler(handler)
            if not cls.installed:
                cls.installed = True
                previous = logging.getLogRecordFactory()

                def record_factory(*args, **kwargs):
                    record = previous(*args, **kwargs)
                    trace = getattr(_context, "trace", None)
                    if trace is not None:  # a private name: extra={"request_id": ...} must keep working
                        record.azmlinfsrv_ids = (trace.request_id, trace.trace_id, trace.span_id)
                    else:
                        record.azmlinfsrv_ids = (getattr(_context, "request_id", None), None, None)
                    return record

                logging.setLogRecordFactory(record_factory)
        else:
            handler.setFormatter(_UtcFormatter(_LOG_FORMAT))
            if cls._root_handler is not None:
                logging.getLogger().removeHandler(cls._root_handler)
                cls._root_handler = None


###############################################################################
# III.11  The try page: GET /try (hooks: the /try routes in App.__init__; run_server checks --try_cases)
###############################################################################

#: GET /try is one self-contained page (below: HTML, CSS and JavaScript, nothing fetched from elsewhere);
#: in the browser it calls only /score (or the path typed in), /swagger.json, /metrics and /try/state,
#: so it gives the browser nothing a client of /score does not already have.  /try/state is what the
#: page polls: what is served, and the reload generation with the last load error (the same error
#: object /score's 503 carries).  Off whenever error details are hidden: the page is a diagnosis tool.

def _try_page_enabled(config):
    """--try_page auto (the default) or true, unless --hide_error_details (which always wins)."""
    wanted = config.try_page
    if config.hide_error_details:  # (Config.resolve warns about a --try_page true it overrules)
        return False
    return wanted is True or wanted == "auto"


def _try_cases(config):
    """The --try_cases file's cases, in the form the page uses (a body is text); a bad file stops start-up."""
    if not config.try_cases:
        return []
    cases = []
    for index, case in enumerate(_load_cases(config.try_cases, "--try_cases")):
        shown = {key: case[key] for key in ("method", "path", "headers", "json") if key in case}
        shown["name"] = case.get("name") or "case %d" % (index + 1)
        if "body" in case:
            body = case["body"]
            if isinstance(body, bytes):
                body = body.decode("utf-8", "replace")
            shown["body"] = body if isinstance(body, str) else json.dumps(body)
        cases.append(shown)
    return cases


class _TryPage:
    """The routes GET /try (the page) and GET /try/state (what it polls); owns the page's cases."""

    def __init__(self, app):
        self.app = app
        self.cases = _try_cases(app.config)
        self.routes = {"/try": _Route(self.page, _GET_METHODS, _GET_METHODS, None, None, None),
                       "/try/state": _Route(self.state, _GET_METHODS, _GET_METHODS, None, None, None)}

    def page(self, req):
        body, policy = _try_page_body()
        return Response(200, [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Security-Policy", policy),
                              ("X-Content-Type-Options", "nosniff"),
                              ("X-Frame-Options", "DENY"),
                              ("Referrer-Policy", "no-referrer"),
                              ("Cache-Control", "no-store")], body)

    def state(self, req):
        app, config = self.app, self.app.config
        script = app.script
        counters = app.metrics.counters
        model_dir = config.model_dir or os.environ.get("AZUREML_MODEL_DIR")
        state = {
            "generation": counters.get("reloads", 0) + counters.get("reload_failures", 0),
            "error": app.script_error,
            "reload": bool(config.reload),
            "service": {"name": config.service_name, "version": config.service_version},
            "server": {"version": __version__, "python": sys.version.split()[0]},
            "entry_script": _relative_to_roots(script.path, script.roots),
            "mode": script.mode,
            "model_dir": _relative_to_roots(model_dir, [config.app_root]) if model_dir else None,
            "workers": config.worker_count,
            "processes": config.processes,
            "metrics": bool(config.metrics),
            "max_body_bytes": config.max_body_bytes,
        }
        if _query_first(req.query, "cases") is not None:
            state["cases"] = self.cases
        return Response.json(200, state, [("Cache-Control", "no-store")])


_try_page_cache = []


def _try_page_body():
    """(the page as bytes, its Content-Security-Policy): the script and style allowed by their hashes."""
    if not _try_page_cache:
        import base64
        import hashlib

        def digest(text):
            return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")

        html = _TRY_HTML.replace("@@STYLE@@", _TRY_CSS).replace("@@SCRIPT@@", _TRY_JS)
        policy = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
                  "img-src 'self' blob: data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
                  % (digest(_TRY_JS), digest(_TRY_CSS)))
        _try_page_cache.append((html.encode("utf-8"), policy))
    return _try_page_cache[0]


_TRY_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>azmlinfsrv: try</title>
<link rel="icon" href="data:,">
<style>@@STYLE@@</style>
</head>
<body>
<header>
  <h1><span id="svc-name">azmlinfsrv</span> <small id="svc-version"></small></h1>
  <dl id="info"></dl>
  <div id="reload-status" class="badge">connecting...</div>
</header>
<main>
<section id="request">
  <h2>Request</h2>
  <div class="row"><label for="example">Example</label><select id="example"></select></div>
  <div class="row">
    <select id="method" aria-label="method"><option>POST</option><option>GET</option><option>PUT</option>
      <option>PATCH</option><option>DELETE</option><option>OPTIONS</option><option>HEAD</option></select>
    <input id="path" value="/score" aria-label="path" spellcheck="false">
  </div>
  <div class="row"><label for="ctype">Content-Type</label>
    <input id="ctype" list="ctypes" value="application/json" spellcheck="false">
    <datalist id="ctypes"><option value="application/json"><option value="text/plain">
      <option value="application/octet-stream"><option value="image/png"><option value="image/jpeg"></datalist>
  </div>
  <label for="headers">Headers <small>(one <code>Name: value</code> a line)</small></label>
  <textarea id="headers" rows="2" spellcheck="false"></textarea>
  <label for="body">Body</label>
  <textarea id="body" rows="12" spellcheck="false"></textarea>
  <div class="row"><label for="file">or a file</label><input type="file" id="file">
    <select id="file-as" aria-label="send the file"><option value="raw">as the body</option>
      <option value="form">as form field "file"</option></select>
    <button type="button" id="file-clear">clear</button></div>
  <div class="row"><button type="button" id="send" class="primary">Send</button><span id="send-note"></span></div>
</section>
<section id="answer">
  <h2>Answer</h2>
  <div id="status-line"><span id="status"></span> <span id="timing"></span></div>
  <div id="diagnosis" hidden></div>
  <div id="answer-body"></div>
  <details id="answer-headers-box"><summary>Headers</summary><pre id="answer-headers"></pre></details>
</section>
<section id="metrics">
  <h2>Live metrics <small id="metrics-note"></small></h2>
  <div class="tiles">
    <div><b id="m-rps">-</b><span>/score req/s</span></div>
    <div><b id="m-errors">-</b><span>/score errors (5xx)</span></div>
    <div><b id="m-p50">-</b><span>p50</span></div>
    <div><b id="m-p90">-</b><span>p90</span></div>
    <div><b id="m-p99">-</b><span>p99</span></div>
    <div><b id="m-queue">-</b><span>queued</span></div>
    <div><b id="m-busy">-</b><span>busy workers</span></div>
  </div>
  <svg id="m-spark" viewBox="0 0 120 24" preserveAspectRatio="none" aria-label="requests per second"></svg>
</section>
<section id="history-box">
  <h2>History <small>(this browser)</small> <button type="button" id="history-clear">clear</button></h2>
  <ol id="history"></ol>
</section>
<section id="cases-box">
  <h2>Saved --check cases <small>(<code>azmlinfsrv --entry_script ... --check requests.json</code>)</small></h2>
  <textarea id="cases" rows="8" spellcheck="false" aria-label="saved cases"></textarea>
  <div class="row"><button type="button" id="cases-download">Download requests.json</button>
    <button type="button" id="cases-copy">Copy</button><button type="button" id="cases-clear">Clear</button>
    <span id="cases-note"></span></div>
</section>
</main>
<script>@@SCRIPT@@</script>
</body>
</html>
"""

_TRY_CSS = """
:root { --fg: #1d2430; --muted: #5b6472; --line: #d6dbe3; --bg: #f6f7f9; --ok: #17813a; --bad: #b3261e;
  --warn: #9a6700; --accent: #0b5cad; font-family: system-ui, -apple-system, "Segoe UI", sans-serif; }
body { margin: 0; color: var(--fg); background: var(--bg); font-size: 14px; }
header { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 24px; padding: 10px 16px;
  background: #fff; border-bottom: 1px solid var(--line); }
h1 { font-size: 18px; margin: 0; } h1 small { color: var(--muted); font-weight: normal; }
h2 { font-size: 15px; margin: 0 0 8px; } h2 small { color: var(--muted); font-weight: normal; }
dl#info { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 0; color: var(--muted); }
dl#info div { display: flex; gap: 4px; } dl#info dt::after { content: ":"; }
dl#info dd { margin: 0; color: var(--fg); }
.badge { margin-left: auto; padding: 3px 10px; border-radius: 12px; background: #e8ebf0; }
.badge.ok { background: #dcf3e3; color: var(--ok); } .badge.bad { background: #fbe3e1; color: var(--bad); }
main { display: grid; grid-template-columns: minmax(320px, 1fr) minmax(320px, 1fr); gap: 12px; padding: 12px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 12px; min-width: 0; }
#metrics, #history-box, #cases-box { grid-column: span 1; }
.row { display: flex; flex-wrap: wrap; align-items: center; gap: 6px; margin: 6px 0; }
label { color: var(--muted); } textarea, input, select, button { font: inherit; }
textarea, #path, #ctype { box-sizing: border-box; border: 1px solid var(--line); border-radius: 4px; padding: 6px; }
textarea { width: 100%; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
#path { flex: 1; font-family: ui-monospace, Menlo, Consolas, monospace; } #ctype { flex: 1; }
button { border: 1px solid var(--line); background: #fff; border-radius: 4px; padding: 4px 10px; cursor: pointer; }
button.primary { background: var(--accent); color: #fff; border-color: var(--accent); padding: 6px 18px; }
button:disabled { opacity: 0.5; cursor: default; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; font-family: ui-monospace, Menlo, Consolas, monospace;
  font-size: 13px; }
#status { font-weight: bold; } #status.ok { color: var(--ok); } #status.bad { color: var(--bad); }
#status.warn { color: var(--warn); } #timing { color: var(--muted); }
#answer-body { margin-top: 8px; max-height: 60vh; overflow: auto; }
#answer-body img { max-width: 100%; border: 1px solid var(--line); }
.j-key { color: #7a3e9d; } .j-str { color: #17813a; } .j-num { color: #0b5cad; } .j-lit { color: #9a6700; }
#diagnosis { border: 1px solid #f1b8b3; background: #fff6f5; border-radius: 4px; padding: 8px; margin-top: 8px; }
#diagnosis .exc { font-weight: bold; color: var(--bad); } #diagnosis .where { margin: 4px 0; }
.src { background: #2b303b; color: #e8eaed; border-radius: 4px; padding: 6px 8px; margin: 4px 0; }
.src .ln { color: #8b93a1; display: inline-block; min-width: 3em; }
.tiles { display: flex; flex-wrap: wrap; gap: 8px; }
.tiles div { display: flex; flex-direction: column; min-width: 80px; padding: 6px 8px; border: 1px solid var(--line);
  border-radius: 4px; } .tiles b { font-size: 18px; } .tiles span { color: var(--muted); font-size: 12px; }
#m-spark { width: 100%; height: 40px; margin-top: 8px; }
#m-spark polyline { fill: none; stroke: var(--accent); stroke-width: 1.5; vector-effect: non-scaling-stroke; }
#history { list-style: none; padding: 0; margin: 0; max-height: 40vh; overflow: auto; }
#history li { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; padding: 4px 0;
  border-bottom: 1px solid var(--line); } #history li code { flex: 1; min-width: 160px; }
@media (max-width: 800px) { main { grid-template-columns: 1fr; } }
"""

_TRY_JS = r"""
"use strict";
(function () {
  var $ = function (id) { return document.getElementById(id); };
  var state = null, cases = [], store = "azmlinfsrv.try.", examples = [], lastUrl = null, busy = false;

  function el(tag, attrs, kids) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { node.textContent = attrs[k]; } else if (k === "cls") { node.className = attrs[k]; }
      else { node.setAttribute(k, attrs[k]); }
    });
    (kids || []).forEach(function (kid) { if (kid) { node.appendChild(kid); } });
    return node;
  }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } return node; }
  function load(key, fallback) {
    try { var v = localStorage.getItem(store + key); return v === null ? fallback : JSON.parse(v); }
    catch (e) { return fallback; }
  }
  function save(key, value) {
    try { localStorage.setItem(store + key, JSON.stringify(value)); return true; } catch (e) { return false; }
  }
  function ms(x) {
    return x < 10 ? x.toFixed(2) + " ms" : x < 1000 ? x.toFixed(1) + " ms" : (x / 1000).toFixed(2) + " s";
  }

  // ---- what is served, and the reload status (polled) -------------------------------------------------
  function showInfo(s) {
    $("svc-name").textContent = s.service.name;
    $("svc-version").textContent = "v" + s.service.version;
    var dl = clear($("info"));
    var kind = {raw: "@rawhttp", schema: "inference-schema", text: "plain"}[s.mode] || s.mode;
    [["Entry script", s.entry_script + " (" + kind + ")"],
     ["Model dir", s.model_dir || "(not set)"],
     ["Workers", String(s.workers) + (s.processes > 1 ? " x " + s.processes + " processes" : "")],
     ["Server", "azmlinfsrv " + s.server.version + ", Python " + s.server.python]].forEach(function (r) {
      dl.appendChild(el("div", {}, [el("dt", {text: r[0]}), el("dd", {text: r[1]})]));
    });
  }
  function where(loc) {
    if (!loc) { return ""; }
    return loc.file + (loc.line ? ", line " + loc.line : "") + (loc.column ? ", column " + loc.column : "") +
      (loc.function ? ", in " + loc.function : "");
  }
  function showReload(s, previous) {
    var badge = $("reload-status"), t = new Date().toLocaleTimeString();
    if (s.error) {
      var e = s.error;
      badge.className = "badge bad";
      badge.textContent = "Reload failed at " + t + ": " + (e.type && e.type !== "ScriptError" ? e.type + ": " : "") +
        (e.text || e.message) + (e.location ? " (" + where(e.location) + ")" : "");
    } else if (previous && s.generation !== previous.generation) {
      badge.className = "badge ok";
      badge.textContent = "Reloaded at " + t + ": /score serves the new version (reload " + s.generation + ")";
    } else if (!previous) {
      badge.className = "badge";
      badge.textContent = s.reload ? "Watching for changes (--reload)"
                                   : "Loaded (start with --reload to reload on save)";
    }
  }
  function poll() {
    fetch("/try/state", {cache: "no-store"}).then(function (r) { return r.json(); }).then(function (s) {
      var previous = state;
      state = s;
      if (!previous || s.generation !== previous.generation) { showInfo(s); showReload(s, previous); }
      if (previous && s.generation !== previous.generation) { loadSwagger(); }
    }).catch(function () {
      $("reload-status").className = "badge bad"; $("reload-status").textContent = "The server does not answer";
    }).then(function () { setTimeout(poll, 1000); });
  }

  // ---- examples: the last request sent here, the --try_cases cases, the swagger example -------------------
  function caseToRequest(c) {
    var headers = Object.assign({}, c.headers || {}), ctype = "";
    Object.keys(headers).forEach(function (k) {
      if (k.toLowerCase() === "content-type") { ctype = headers[k]; delete headers[k]; }
    });
    var body = "json" in c ? JSON.stringify(c.json, null, 2) : ("body" in c ? c.body : "");
    if ("json" in c && !ctype) { ctype = "application/json"; }
    return {method: c.method || (body ? "POST" : "GET"), path: c.path || "/score", ctype: ctype, headers: headers,
            body: body};
  }
  function fillExamples(swaggerExample) {
    examples = [];
    var last = load("last", null);
    if (last) { examples.push(["Last sent from this browser", last]); }
    cases.forEach(function (c) { examples.push(["Case: " + c.name, caseToRequest(c)]); });
    if (swaggerExample !== undefined) {
      examples.push(["swagger.json example", {method: "POST", path: "/score", ctype: "application/json", headers: {},
                                              body: JSON.stringify(swaggerExample, null, 2)}]);
    }
    if (!examples.length) {
      examples.push(["Empty JSON object", {method: "POST", path: "/score", ctype: "application/json", headers: {},
                                           body: "{}"}]);
    }
    var select = clear($("example"));
    examples.forEach(function (e, i) { select.appendChild(el("option", {value: String(i), text: e[0]})); });
  }
  function serviceInputExample(doc) {
    var schemas = doc.definitions || (doc.components && doc.components.schemas) || {};
    var input = schemas.ServiceInput;
    if (input && input.example !== undefined && !(typeof input.example === "object" && input.example !== null &&
        !Array.isArray(input.example) && Object.keys(input.example).length === 0)) { return input.example; }
    return undefined;
  }
  function loadSwagger(first) {
    return fetch("/swagger.json", {cache: "no-store"}).then(function (r) {
      if (r.ok) { return r.json(); }
      return fetch("/swagger.json?version=3", {cache: "no-store"})
        .then(function (r3) { return r3.ok ? r3.json() : {}; });
    }).catch(function () { return {}; }).then(function (doc) {
      var before = $("example").value;
      fillExamples(serviceInputExample(doc));
      if (first) { useExample(0); } else if (before && before < examples.length) { $("example").value = before; }
    });
  }
  function useExample(i) {
    var r = examples[i] && examples[i][1];
    if (!r) { return; }
    $("example").value = String(i);
    fillEditor(r);
  }
  function fillEditor(r) {
    $("method").value = r.method || "POST"; $("path").value = r.path || "/score"; $("ctype").value = r.ctype || "";
    $("headers").value = Object.keys(r.headers || {}).map(function (k) { return k + ": " + r.headers[k]; })
      .join("\n");
    $("body").value = r.body || "";
  }

  // ---- send, and show the answer as it arrives ----------------------------------------------------------
  function parseHeaders(text) {
    var headers = {};
    text.split("\n").forEach(function (line) {
      var i = line.indexOf(":");
      if (line.trim() && i > 0) { headers[line.slice(0, i).trim()] = line.slice(i + 1).trim(); }
    });
    return headers;
  }
  function currentRequest() {
    var file = $("file").files[0];
    return {method: $("method").value, path: $("path").value || "/score", ctype: $("ctype").value.trim(),
            headers: parseHeaders($("headers").value), body: $("body").value,
            file: file ? {name: file.name, size: file.size, as: $("file-as").value} : null};
  }
  function send(r) {
    if (busy) { return; }
    if (!/^\/(?!\/)/.test(r.path)) {  // //host/... would be another origin (which connect-src refuses anyway)
      $("send-note").textContent = "The path is on this server: it starts with one /.";
      return;
    }
    var init = {method: r.method, headers: Object.assign({}, r.headers), cache: "no-store"};
    var file = r.file && $("file").files[0];
    if (r.file && (!file || file.name !== r.file.name)) {
      $("send-note").textContent = "Attach " + r.file.name + " again to re-send it."; return;
    }
    if (r.method !== "GET" && r.method !== "HEAD") {
      if (file && r.file.as === "form") {
        var form = new FormData();
        form.append("file", file, file.name);
        init.body = form;  // the browser writes the multipart Content-Type, boundary included
      }
      else { init.body = file || r.body; if (r.ctype) { init.headers["Content-Type"] = r.ctype; } }
    }
    busy = true; $("send").disabled = true; $("send-note").textContent = "";
    if (!r.file) { save("last", {method: r.method, path: r.path, ctype: r.ctype, headers: r.headers, body: r.body}); }
    var start = performance.now(), status = $("status"), timing = $("timing"), out = clear($("answer-body"));
    status.className = ""; status.textContent = "sending..."; timing.textContent = "";
    $("diagnosis").hidden = true; clear($("answer-headers"));
    if (lastUrl) { URL.revokeObjectURL(lastUrl); lastUrl = null; }
    var entry = {when: new Date().toISOString(), request: r};
    fetch(r.path, init).then(function (resp) {
      var headersAt = performance.now(), ctype = resp.headers.get("Content-Type") || "";
      status.className = resp.status < 300 ? "ok" : resp.status < 500 ? "warn" : "bad";
      status.textContent = resp.status + " " + resp.statusText;
      var lines = [];
      resp.headers.forEach(function (v, k) { lines.push(k + ": " + v); });
      $("answer-headers").textContent = lines.join("\n");
      var exec = resp.headers.get("x-ms-run-fn-exec-ms");
      var binary = /^(image|audio|video)\/|octet-stream|application\/(pdf|zip)/i.test(ctype);
      var pre = el("pre", {id: "answer-text"}), parts = [], text = "", size = 0, decoder = new TextDecoder();
      if (!binary) { out.appendChild(pre); }
      function show(piece) { if (piece) { text += piece; pre.appendChild(document.createTextNode(piece)); } }
      function timingText(end) {
        return "first byte " + ms(headersAt - start) + (end ? ", total " + ms(end - start) : ", receiving...") +
          (exec ? ", run() " + ms(parseFloat(exec)) + " (x-ms-run-fn-exec-ms)" : "") + ", " + size + " bytes";
      }
      timing.textContent = timingText(0);
      function finish() {
        var end = performance.now();
        timing.textContent = timingText(end);
        entry.status = resp.status; entry.ctype = ctype; entry.ms = end - start; entry.size = size;
        if (binary) {
          var blob = new Blob(parts, {type: ctype});
          lastUrl = URL.createObjectURL(blob);
          if (/^image\//i.test(ctype)) {
            out.appendChild(el("img", {src: lastUrl, alt: "the answer", id: "answer-image"}));
          }
          out.appendChild(el("div", {}, [el("a", {href: lastUrl, download: "answer",
                                                  text: "download " + size + " bytes (" + ctype + ")"})]));
        } else {
          entry.text = text.length <= 65536 ? text : null;
          var value;
          if (/json/i.test(ctype) && text.length <= 4194304) {  // larger: left as it came, not pretty-printed
            try { value = JSON.parse(text); } catch (e) { value = undefined; }
          }
          if (value !== undefined) { clear(pre); pre.appendChild(pretty(value)); diagnose(resp.status, value); }
        }
        addHistory(entry);
      }
      if (!resp.body) { finish(); return; }
      var reader = resp.body.getReader();
      function next() {
        return reader.read().then(function (chunk) {
          if (chunk.done) { if (!binary) { show(decoder.decode()); } finish(); return; }
          size += chunk.value.length;
          if (binary) { parts.push(chunk.value); }
          else { show(decoder.decode(chunk.value, {stream: true})); }
          timing.textContent = timingText(0);
          return next();
        });
      }
      return next();
    }).catch(function (err) {
      status.className = "bad"; status.textContent = "No answer: " + err;
    }).then(function () { busy = false; $("send").disabled = false; });
  }
  function pretty(value) {
    var frag = document.createDocumentFragment();
    function put(text, cls) {
      frag.appendChild(cls ? el("span", {cls: cls, text: text}) : document.createTextNode(text));
    }
    function walk(v, indent) {
      var pad = "  ".repeat(indent + 1), end = "  ".repeat(indent);
      if (Array.isArray(v)) {
        if (!v.length) { put("[]"); return; }
        put("[\n");
        v.forEach(function (x, i) { put(pad); walk(x, indent + 1); put(i < v.length - 1 ? ",\n" : "\n"); });
        put(end + "]");
      } else if (v !== null && typeof v === "object") {
        var keys = Object.keys(v);
        if (!keys.length) { put("{}"); return; }
        put("{\n");
        keys.forEach(function (k, i) {
          put(pad); put(JSON.stringify(k), "j-key"); put(": "); walk(v[k], indent + 1);
          put(i < keys.length - 1 ? ",\n" : "\n");
        });
        put(end + "}");
      } else {
        put(JSON.stringify(v), typeof v === "string" ? "j-str" : typeof v === "number" ? "j-num" : "j-lit");
      }
    }
    walk(value, 0);
    return frag;
  }

  // ---- a failure, as a person wants to read it ------------------------------------------------------------
  function diagnose(code, value) {
    var e = value && value.error, box = clear($("diagnosis"));
    if (code < 500 || !e || typeof e !== "object") { return; }
    box.appendChild(el("div", {cls: "exc", id: "diag-exception",
      text: (e.type && e.type !== "ScriptError" ? e.type + ": " : "") + (e.text || e.message || value.message)}));
    if (e.location) {
      box.appendChild(el("div", {cls: "where", id: "diag-where", text: "at " + where(e.location)}));
      if (e.location.source) {
        box.appendChild(el("pre", {cls: "src"}, [el("span", {cls: "ln", text: String(e.location.line || "")}),
          document.createTextNode(e.location.source)]));
      }
    }
    if (e.hint) { box.appendChild(el("div", {text: e.hint})); }
    var frames = e.frames || [];
    if (frames.length > 1) {
      var pre = el("pre", {cls: "src"});
      frames.forEach(function (f) {
        pre.appendChild(el("span", {cls: "ln", text: f.file + ":" + f.line}));
        pre.appendChild(document.createTextNode(" in " + f.function + "\n      " + (f.source || "") + "\n"));
      });
      var title = "Traceback, your code (" + frames.length + " frames, most recent call last)";
      box.appendChild(el("details", {}, [el("summary", {text: title}), pre]));
    }
    box.hidden = false;
  }

  // ---- history, and saving a try as a --check case ----------------------------------------------------------
  function addHistory(entry) {
    if (entry.request.body && entry.request.body.length > 262144) {  // too large to keep in localStorage
      entry.request = Object.assign({}, entry.request, {body: null, dropped: entry.request.body.length});
    }
    var list = load("history", []);
    list.unshift(entry);
    while (list.length > 50 || (!save("history", list) && list.length > 1)) { list.pop(); }
    drawHistory();
  }
  function drawHistory() {
    var ol = clear($("history"));
    load("history", []).forEach(function (h, i) {
      var r = h.request;
      var label = new Date(h.when).toLocaleTimeString() + "  " + r.method + " " + r.path +
        (r.file ? " [" + r.file.name + "]" : "") +
        "  -> " + h.status + "  " + (h.ms ? ms(h.ms) : "");
      var again = el("button", {type: "button", text: "re-send"});
      var edit = el("button", {type: "button", text: "edit"});
      var keep = el("button", {type: "button", text: "save as --check case", cls: "save-case"});
      if (r.file) { keep.disabled = true; keep.title = "A --check case holds a text body, not a file."; }
      if (r.dropped) {
        keep.disabled = again.disabled = edit.disabled = true;
        keep.title = again.title = edit.title = "The body (" + r.dropped + " characters) was too large to keep.";
      }
      again.addEventListener("click", function () { send(r); });
      edit.addEventListener("click", function () { fillEditor(r); });
      keep.addEventListener("click", function () { saveCase(h); });
      ol.appendChild(el("li", {"data-index": String(i)}, [el("code", {text: label}), edit, again, keep]));
    });
  }
  function toCase(h) {
    var r = h.request;
    var c = {name: r.method + " " + r.path + " -> " + h.status + " (" + h.when + ")", method: r.method, path: r.path};
    var headers = Object.assign({}, r.headers);
    if (r.ctype && r.method !== "GET" && r.method !== "HEAD") { headers["Content-Type"] = r.ctype; }
    if (Object.keys(headers).length) { c.headers = headers; }
    if (r.method !== "GET" && r.method !== "HEAD" && r.body) {
      var parsed;
      if (/json/i.test(r.ctype || "")) { try { parsed = JSON.parse(r.body); } catch (e) { parsed = undefined; } }
      if (parsed !== undefined) { c.json = parsed; } else { c.body = r.body; }
    }
    c.expect = {status: h.status};
    if (typeof h.text === "string" && h.text) {
      var value;
      if (/json/i.test(h.ctype || "")) { try { value = JSON.parse(h.text); } catch (e) { value = undefined; } }
      if (value !== undefined) { c.expect.json = value; }
      else { c.expect.contains = h.text.length <= 1000 ? h.text : h.text.slice(0, 200); }
    }
    return c;
  }
  function readCases() {
    var text = $("cases").value.trim();
    if (!text) { return []; }
    try { var v = JSON.parse(text); return Array.isArray(v) ? v : [v]; } catch (e) { return null; }
  }
  function saveCase(h) {
    var saved = readCases();
    if (saved === null) {
      $("cases-note").textContent = "The cases above are not valid JSON: fix them first.";
      return;
    }
    saved.push(toCase(h));
    setCases(saved);
    $("cases-note").textContent = saved.length + " case(s): download them, then run --check on the file.";
  }
  function setCases(list) {
    $("cases").value = list.length ? JSON.stringify(list, null, 2) : "";
    save("cases", $("cases").value);
  }
  $("cases").addEventListener("input", function () { save("cases", $("cases").value); });
  $("cases-download").addEventListener("click", function () {
    var saved = readCases();
    if (!saved || !saved.length) { $("cases-note").textContent = "No valid cases to download."; return; }
    var url = URL.createObjectURL(new Blob([JSON.stringify(saved, null, 2) + "\n"], {type: "application/json"}));
    var a = el("a", {href: url, download: "requests.json"});
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
    $("cases-note").textContent = "Downloaded requests.json: azmlinfsrv --entry_script ... --check requests.json";
  });
  $("cases-copy").addEventListener("click", function () {
    var text = $("cases").value;
    function done() { $("cases-note").textContent = "Copied."; }
    if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(text).then(done); }
    else { $("cases").select(); document.execCommand("copy"); done(); }
  });
  $("cases-clear").addEventListener("click", function () { setCases([]); $("cases-note").textContent = ""; });
  $("history-clear").addEventListener("click", function () { save("history", []); drawHistory(); });

  // ---- live metrics from /metrics (Prometheus text) -----------------------------------------------------------
  var snaps = [], rates = new Array(60).fill(0);  // the sparkline: the last 60 polls, right to left
  function parseMetrics(text) {
    var samples = [];
    text.split("\n").forEach(function (line) {
      var m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (!m || line[0] === "#") { return; }
      var labels = {}, re = /([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g, l;
      while ((l = re.exec(m[2] || "")) !== null) { labels[l[1]] = l[2]; }
      samples.push({name: m[1], labels: labels, value: parseFloat(m[3])});
    });
    return samples;
  }
  function snapshot(samples) {
    var s = {t: performance.now(), requests: 0, errors: 0, buckets: {}, gauges: {}};
    samples.forEach(function (x) {
      if (x.name === "azmlinfsrv_requests_total" && x.labels.route === "/score") {
        s.requests += x.value; if (+x.labels.status >= 500) { s.errors += x.value; }
      } else if (x.name === "azmlinfsrv_request_duration_seconds_bucket" && x.labels.route === "/score") {
        s.buckets[x.labels.le] = x.value;
      } else if (!x.labels || !Object.keys(x.labels).length) { s.gauges[x.name] = x.value; }
    });
    return s;
  }
  function percentile(buckets, q) {
    var les = Object.keys(buckets).sort(function (a, b) { return parseFloat(a) - parseFloat(b); });
    var total = les.length ? buckets[les[les.length - 1]] : 0;
    if (!total) { return null; }
    var rank = q * total, prevLe = 0, prevCount = 0;
    for (var i = 0; i < les.length; i++) {
      var le = parseFloat(les[i]), count = buckets[les[i]];
      if (count >= rank) {
        if (!isFinite(le)) { return {value: prevLe * 1000, over: true}; }
        var within = count - prevCount;
        return {value: (prevLe + (le - prevLe) * (within ? (rank - prevCount) / within : 1)) * 1000, over: false};
      }
      prevLe = le; prevCount = count;
    }
    return null;
  }
  function drawSpark() {
    var svg = clear($("m-spark")), top = Math.max.apply(null, rates.concat([1]));
    var points = rates.map(function (r, i) {
      return (i * 120 / 59).toFixed(1) + "," + (23 - r / top * 22).toFixed(1);
    }).join(" ");
    var line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points);
    svg.appendChild(line);
  }
  function pollMetrics() {
    if (state && !state.metrics) { $("metrics-note").textContent = "(off: /metrics is disabled)"; return; }
    fetch("/metrics", {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error("/metrics answered " + r.status); }
      return r.text();
    }).then(function (text) {
      var s = snapshot(parseMetrics(text)), prev = snaps[snaps.length - 1];
      snaps.push(s);
      while (snaps.length > 1 && s.t - snaps[0].t > 60000) { snaps.shift(); }
      var rate = prev ? Math.max(0, (s.requests - prev.requests) / ((s.t - prev.t) / 1000)) : 0;
      rates.push(rate); if (rates.length > 60) { rates.shift(); }
      // Latency over the last minute when it saw requests, else since start.
      var old = snaps[0], win = {}, windowed = old !== s && s.requests > old.requests;
      Object.keys(s.buckets).forEach(function (le) {
        win[le] = s.buckets[le] - (windowed ? old.buckets[le] || 0 : 0);
      });
      ["p50", "p90", "p99"].forEach(function (name) {
        var p = percentile(win, parseInt(name.slice(1), 10) / 100);
        $("m-" + name).textContent = p ? (p.over ? "> " : "") + ms(p.value) : "-";
      });
      $("metrics-note").textContent = "(every 2 s; latency of /score " +
        (windowed ? "over the last minute" : "since start") +
        ", from the histogram buckets)";
      $("m-rps").textContent = rate.toFixed(rate < 10 ? 2 : 1);
      $("m-errors").textContent = String(s.errors);
      $("m-queue").textContent = String(s.gauges.azmlinfsrv_queue_depth || 0);
      $("m-busy").textContent = (s.gauges.azmlinfsrv_workers_busy || 0) + " / " + (s.gauges.azmlinfsrv_workers || 0);
      drawSpark();
    }).catch(function (err) { $("metrics-note").textContent = "(" + err.message + ")"; })
      .then(function () { setTimeout(pollMetrics, 2000); });
  }

  // ---- start ----------------------------------------------------------------------------------------------------
  $("example").addEventListener("change", function () { useExample(parseInt($("example").value, 10)); });
  $("send").addEventListener("click", function () { send(currentRequest()); });
  $("file-clear").addEventListener("click", function () { $("file").value = ""; });
  $("body").addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); send(currentRequest()); }
  });
  fetch("/try/state?cases", {cache: "no-store"}).then(function (r) { return r.json(); }).then(function (s) {
    state = s; cases = s.cases || []; showInfo(s); showReload(s, null);
    store += s.entry_script + ".";  // one history per script, when several are tried on the same port
    $("cases").value = load("cases", "");
    drawHistory();
    return loadSwagger(true);
  }).then(function () {
    document.body.setAttribute("data-ready", "true");
    setTimeout(poll, 1000);
    pollMetrics();
  });
})();
"""


###############################################################################
# III.12  MLflow no-code models (hook: _resolve_entry_script and load_script, when there is no entry script
#        and the model folder holds an MLmodel file; swagger through _script_schemas)
###############################################################################

# Azure ML's no-code deployment of an MLflow model: no scoring script, the model under AZUREML_MODEL_DIR in
# a folder keeping its name (MLFLOW_MODEL_FOLDER), and a script Azure generates (mlflow_score_script.py in
# Azure/azureml-assets).  _MlflowScript answers as that script does under the reference: run(input_data,
# params=None) behind inference-schema's rules (application/json or 415, a JSON object or 400, input_data
# required), input_data read as the model's signature says, every failure inside MLflow or the model the
# usual 500.  mlflow, pandas and numpy are imported only here, from the model's own environment.
# azureml.ai.monitoring.Collector is provided when the real package is absent; a deployment's data_collector
# section enables its collections, written as JSON Lines under --data_collector_dir.

_MLMODEL = "MLmodel"


def _mlflow_model_folder(config):
    """The MLflow model folder to serve when no entry script is configured, else None.

    AZUREML_MODEL_DIR itself, or AZUREML_MODEL_DIR/$MLFLOW_MODEL_FOLDER (the cloud's layout), or the one
    folder under it holding an MLmodel file.
    """
    if config.entry_script or (config.config_file and os.path.isfile(os.path.join(config.app_root, "main.py"))):
        return None  # a script to run: the user's (main.py is the reference's default with a config file)
    model_dir = config.model_dir or os.environ.get("AZUREML_MODEL_DIR")
    if not model_dir or not os.path.isdir(model_dir):
        return None
    deployment = getattr(config, "deployment_info", None)
    named = (deployment.environ if deployment else {}).get("MLFLOW_MODEL_FOLDER") \
        or os.environ.get("MLFLOW_MODEL_FOLDER")
    candidates = [model_dir]
    if named:
        candidates.insert(0, os.path.join(model_dir, named))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, _MLMODEL)):
            return os.path.realpath(candidate)
    found = []
    for folder, dirs, names in os.walk(model_dir, followlinks=True):
        if _MLMODEL in names:
            found.append(folder)
            dirs[:] = []
        if folder.count(os.sep) - model_dir.count(os.sep) >= 3:
            dirs[:] = []
    return os.path.realpath(found[0]) if len(found) == 1 else None


def _is_mlflow_folder(path):
    return bool(path) and os.path.isfile(os.path.join(path, _MLMODEL))


def _mlflow_deployment_model(doc, folder, served=True):
    """A deployment without a scoring script whose model is a local MLflow folder: that folder, else None.

    ``served`` (no --entry_script): a model of type mlflow_model that is no MLflow folder is an error.
    """
    if (doc.get("code_configuration") or {}).get("scoring_script"):
        return None
    model = doc.get("model")
    path = model.get("path") if isinstance(model, dict) else None
    if not isinstance(path, str) or path.startswith("azureml:") or "://" in path:
        return None
    source = os.path.normpath(os.path.join(folder, path))
    if _is_mlflow_folder(source):
        return source
    if served and str(model.get("type") or "").lower() == "mlflow_model":
        raise StartupError("The deployment's model has type mlflow_model and no code_configuration, but %s %s: "
                           "point model.path at the MLflow model folder (the one holding the MLmodel file)." % (
                               source, "has no MLmodel file" if os.path.exists(source) else "does not exist"))
    return None


def _script_for(script_path, config):
    """load_script's Script: the built-in MLflow one for an MLmodel file, else the user's script."""
    if os.path.basename(script_path) == _MLMODEL and not config.entry_script:
        return _MlflowScript(os.path.dirname(script_path), config)
    return Script(script_path, config.app_root, config.source_dir)


def _import_mlflow_stack(folder):
    """(mlflow, pandas, numpy) or a StartupError naming what to install."""
    missing, modules = [], []
    for name, dist in (("mlflow", "mlflow (mlflow-skinny is enough)"), ("pandas", "pandas"), ("numpy", "numpy")):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(dist)
    if not missing:
        for submodule in ("mlflow.models", "mlflow.pyfunc"):  # used as mlflow.models, mlflow.pyfunc below
            importlib.import_module(submodule)
        return modules
    how = []
    for name, text in (("requirements.txt", "`%s -m pip install -r %s`"),
                       ("conda.yaml", "a conda environment from %s (`conda env update -f %s`)")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            how.append(text % ((os.path.basename(sys.executable) or "python", path) if "pip" in text
                               else (path, path)))
    raise StartupError(
        "Serving the MLflow model %s without a scoring script needs mlflow, pandas and numpy in this Python "
        "(%s), which lacks: %s. Install the model's own environment: %s, then start again. (Every other "
        "script runs without them.)" % (folder, sys.executable, ", ".join(missing),
                                        " or ".join(how) or "pip install mlflow-skinny pandas numpy"),
        EXIT_SCRIPT)


class _MlflowScript(Script):
    """The script Azure generates for a no-code MLflow deployment, built in: run(input_data, params=None).

    ``kind`` says how input_data is read: ``"table"`` (split-orientation JSON to a DataFrame with the
    signature's column types), ``"tensor"`` (a list of rows to an array), ``"named"`` ({name: rows} to
    arrays) or ``"passthrough"`` (no signature or example: the JSON value as Azure's script parses it).
    """

    def __init__(self, folder, config):
        super().__init__(os.path.join(folder, _MLMODEL), config.app_root)
        self.folder = folder
        self.config = config
        self.roots = sorted({config.app_root, folder}, key=len, reverse=True)
        self.kind = "passthrough"
        self.sample = None  # the DataFrame / array / {name: array} input_data is read against
        self.param_sample = None  # {name: default or sample} from the parameter schema, else None
        self.model = None
        self.collectors = None
        self.banner_text = ("none: the MLflow model %s, served as Azure's no-code deployment serves it "
                            "(its generated scoring script, built in)" % folder)

    def load(self):
        mlflow, pd, np = _import_mlflow_stack(self.folder)
        self._np, self._pd = np, pd
        try:
            meta = mlflow.models.Model.load(self.folder)
            self.signature = meta.signature
            self.example = self._read_example(meta)
            self._choose_kind(meta)
            _user_logger.info("Loading the MLflow model from %s (mlflow %s, input read as %s)",
                              self.folder, mlflow.__version__, self.kind)
            self.model = mlflow.pyfunc.load_model(self.folder)
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, StartupError)):
                raise
            raise StartupError("Failed to load the MLflow model %s: %s: %s" % (self.folder, type(exc).__name__, exc),
                               EXIT_SCRIPT, describe_exception(exc, self.roots), _traceback_text(exc, skip_imports=True))
        predict = self.model.predict
        try:
            self._predict_takes_params = "params" in inspect.signature(predict).parameters
        except (TypeError, ValueError):
            self._predict_takes_params = False
        self.init, self.run = self._init, self._run
        self.mode, self.data_param = "schema", "input_data"
        self.schema_params = [inspect.Parameter("input_data", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                              inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
        if self.config.deployment_info is None:  # with a deployment, _finish_endpoint did it
            _mlflow_drift_warning(self.folder, self.config.strict_environment)
        return self

    def _read_example(self, meta):
        """The input example as Azure's script reads it (the JSON file), or None."""
        info = getattr(meta, "saved_input_example_info", None) or {}
        if not info.get("artifact_path"):
            return None
        try:
            with open(os.path.join(self.folder, info["artifact_path"]), encoding="utf-8") as handle:
                loaded = json.load(handle)
            if info.get("type") == "dataframe":
                if int(self._pd.__version__.split(".")[0]) >= 3:
                    # Azure's script hands pandas.read_json the example as JSON text, which pandas 3 takes for
                    # a file name: there the example is skipped and the signature used, so here too.
                    _user_logger.info("The table input example is not used with pandas %s (as in Azure's "
                                      "generated script); the signature describes the input.", self._pd.__version__)
                    return None
                orient = "split" if isinstance(loaded, dict) and "columns" in loaded else "values"
                return self._pd.read_json(io.StringIO(json.dumps(loaded)), orient=orient, dtype=False)
            if info.get("type") == "ndarray":
                inputs = loaded["inputs"]
                if isinstance(inputs, dict):
                    return {k: self._np.asarray(v) for k, v in inputs.items()}
                return self._np.asarray(inputs)
        except Exception as exc:
            _user_logger.warning("The model's input example could not be read (%s: %s); the signature is used "
                                 "instead.", type(exc).__name__, exc)
        return None

    def _choose_kind(self, meta):
        np, pd = self._np, self._pd
        sig = self.signature
        sample = self.example
        if sig is not None and sig.inputs is not None and sample is None:
            if sig.inputs.is_tensor_spec():
                def zeros(spec):
                    shape = list(spec.shape or ())
                    if shape and shape[0] == -1:
                        shape[0] = 1
                    return np.zeros(tuple(shape), dtype=spec.type)
                if sig.inputs.has_input_names():
                    sample = {spec.name: zeros(spec) for spec in sig.inputs.inputs}
                else:
                    sample = zeros(sig.inputs.inputs[0])
            else:
                try:
                    columns = sig.inputs.input_names()
                    sample = pd.DataFrame(columns=columns).astype(dict(zip(columns, sig.inputs.pandas_types())))
                except Exception:
                    sample = None
        if sig is not None and getattr(sig, "params", None) is not None:
            self.param_sample = {}
            for spec in sig.params.params:
                if spec.default is not None:
                    self.param_sample[spec.name] = spec.default
                else:
                    self.param_sample[spec.name] = {"boolean": True, "string": "sample string", "integer": 42,
                                                    "long": 42, "float": 0.15, "double": 0.15}.get(
                                                        getattr(spec.dtype, "name", str(spec.dtype)))
        self.sample = sample
        if isinstance(sample, pd.DataFrame):
            self.kind = "table"
        elif isinstance(sample, np.ndarray):
            self.kind = "tensor"
        elif isinstance(sample, dict):
            self.kind = "named"

    # -- what the server calls --------------------------------------------------------------------------------

    def _init(self):
        """As Azure's script: create the model_inputs / model_outputs collectors; a failure is only logged."""
        try:
            from azureml.ai.monitoring import Collector
            self.collectors = (Collector(name="model_inputs"), Collector(name="model_outputs"))
            _user_logger.info("Input and output collector initialized")
        except Exception as exc:
            _user_logger.error("Error initializing model_inputs collector and model_outputs collector. %s", exc)

    def _run(self, input_data, params=None):
        data = self._read_input(input_data)
        if self.param_sample is not None and not isinstance(params, dict) and params is not None:
            raise ValueError("Invalid input data type to parse. Expected: <class 'dict'> but got %s"
                             % type(params))
        context = self._collect(0, data)
        if self._predict_takes_params:
            result = self.model.predict(data, params=params)
        else:
            result = self.model.predict(data)
        try:
            self._collect(1, self._pd.DataFrame(result), context)
        except Exception as exc:
            _user_logger.error("Error collecting model_outputs collection request. %s", exc)
        return self._jsonable(result)

    def _collect(self, which, data, context=None):
        if self.collectors is None:
            return None
        try:
            return self.collectors[which].collect(data, context) if which else self.collectors[0].collect(data)
        except Exception as exc:
            _user_logger.error("Error collecting %s collection request. %s",
                               ("model_inputs", "model_outputs")[which], exc)
            return None

    def _read_input(self, value):
        """input_data as the model's signature (or example) asks, the way Azure's script reads it."""
        np, pd = self._np, self._pd
        if self.kind == "table":
            if not isinstance(value, (list, dict)):
                raise TypeError("Error, unable to convert input of type %s into Pandas Dataframe" % type(value))
            frame = pd.read_json(io.StringIO(json.dumps(value)), orient="split", dtype=False)
            types = self.sample.dtypes.to_dict()
            converted = {c: types.get(c, object) for c in frame.columns}
            for column, kind in converted.items():
                if str(kind).startswith("timedelta"):
                    frame[column] = pd.to_timedelta(frame[column])
            return frame.astype(dtype=converted)
        if self.kind == "tensor":
            if not isinstance(value, list):
                raise ValueError("Invalid input format: expected an array of items.")
            return np.array(value, dtype=self.sample.dtype)
        if self.kind == "named":
            if not isinstance(value, dict):
                raise ValueError("Invalid input data type to parse. Expected: <class 'dict'> but got %s"
                                 % type(value))
            arrays = {}
            for name, rows in value.items():
                spec = self.sample.get(name)
                if spec is None:
                    arrays[name] = rows
                elif not isinstance(rows, list):
                    raise ValueError("Invalid input format: expected an array of items.")
                else:
                    arrays[name] = np.array(rows, dtype=spec.dtype)
            return arrays
        # No signature and no example: Azure's script takes the JSON value as it comes.
        if isinstance(value, str):
            value = json.loads(value)
        if isinstance(value, dict) and "input_data" in value:
            value = value["input_data"]
        if isinstance(value, list):
            return np.asarray(value)
        if isinstance(value, dict) and "columns" in value and "index" in value and "data" in value:
            return pd.read_json(io.StringIO(json.dumps(value)), orient="split", dtype=False)
        return {name: np.asarray(rows) for name, rows in value.items()}

    def _jsonable(self, result):
        """Arrays as lists, tables in records orientation, anything else as it is."""
        np, pd = self._np, self._pd
        if isinstance(result, np.ndarray):
            return result.tolist()
        if isinstance(result, pd.DataFrame):
            return result.to_dict(orient="records")
        if isinstance(result, pd.Series):
            return pd.DataFrame(result).to_dict(orient="records")
        return result

    def locate(self, message):
        loc = {"file": self.path, "line": None, "function": None, "source": ""}
        return {"type": "ScriptError", "text": message, "location": loc, "frames": [loc]}

    def watched_files(self):
        return {self.path}

    # -- swagger ------------------------------------------------------------------------------------------------

    def swagger_schemas(self):
        """(ServiceInput, ServiceOutput, versions) from the signature and input example."""
        data = self._swagger_for(self.sample, "split")
        params = {"type": "object"} if self.param_sample is None else _swagger_for_value(self.param_sample)
        properties = collections.OrderedDict([("input_data", data), ("params", params)])
        example = collections.OrderedDict([("input_data", data.pop("example", {})),
                                           ("params", self.param_sample or {})])
        service_input = {"type": "object", "properties": properties, "example": example}
        output = None
        sig = self.signature
        if sig is not None and sig.outputs is not None:
            try:
                if sig.outputs.is_tensor_spec():
                    spec = sig.outputs.inputs[0]
                    shape = [1 if d == -1 else d for d in (spec.shape or ())]
                    output = self._swagger_for(self._np.zeros(tuple(shape), dtype=spec.type), None)
                else:
                    columns = sig.outputs.input_names()
                    frame = self._pd.DataFrame(columns=columns).astype(
                        dict(zip(columns, sig.outputs.pandas_types())))
                    output = self._swagger_for(frame, "records")
            except Exception:
                output = None
        return service_input, output or {"type": "object", "example": {}}, ("2.0", "3.0", "3.1")

    def _swagger_for(self, sample, orient):
        np, pd = self._np, self._pd
        if isinstance(sample, pd.DataFrame):
            value = json.loads(sample.to_json(orient=orient, date_format="iso"))
            schema = _swagger_for_value(value)
            schema["format"] = "pandas.DataFrame:" + orient
            schema["example"] = value
            return schema
        if isinstance(sample, np.ndarray):
            schema = _swagger_for_value(sample.tolist())
            schema["format"] = "numpy.ndarray"
            schema["example"] = sample.tolist()
            return schema
        if isinstance(sample, dict):
            properties = {k: self._swagger_for(v, orient) for k, v in sample.items()}
            example = {k: v.pop("example", None) for k, v in properties.items()}  # one example, at the top
            return {"type": "object", "required": list(properties), "properties": properties, "example": example}
        return {"type": "object", "example": {}}


def _swagger_for_value(value):
    """A JSON schema for a JSON value (used for examples built from a signature)."""
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer", "format": "int64"}
    if isinstance(value, float):
        return {"type": "number", "format": "double"}
    if isinstance(value, str):
        return {"type": "string"}
    if isinstance(value, list):
        return {"type": "array", "items": _swagger_for_value(value[0]) if value else {"type": "object"}}
    if isinstance(value, dict):
        return {"type": "object", "required": list(value),
                "properties": {k: _swagger_for_value(v) for k, v in value.items()}}
    return {"type": "object"}


# -- the model's own environment: what the drift check compares -----------------------------------------------

def _read_conda(path):
    """A conda file as data; in an MLflow model folder, merged with its requirements.txt and python_env.yaml.

    Returned in the conda file's shape ({"dependencies": [..., {"pip": [...]}]}) for _environment_drift.
    An ``mlflow`` pin is compared with mlflow-skinny when only that is installed (it serves the model).
    """
    folder = os.path.dirname(path)
    if not _is_mlflow_folder(folder):
        return _read_structured(path, "conda file")
    conda_deps, pip_specs = [], []
    if os.path.isfile(os.path.join(folder, "conda.yaml")):
        conda = _read_structured(os.path.join(folder, "conda.yaml"), "conda file")
        for item in (conda.get("dependencies") if isinstance(conda, dict) else None) or []:
            if isinstance(item, dict):
                pip_specs += [str(p) for p in item.get("pip") or []]
            elif item is not None:
                conda_deps.append(str(item))
    requirements = os.path.join(folder, "requirements.txt")
    if os.path.isfile(requirements):
        with open(requirements, encoding="utf-8-sig") as handle:
            pip_specs += [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    python_env = os.path.join(folder, "python_env.yaml")
    if os.path.isfile(python_env) and not any(d.split("=")[0].strip() == "python" for d in conda_deps):
        try:
            env = _read_structured(python_env, "python_env.yaml")
        except StartupError:
            env = None
        if isinstance(env, dict) and env.get("python"):
            conda_deps.append("python=%s" % env["python"])
    import importlib.metadata
    seen, pips = set(), []
    for spec in pip_specs:
        key = _normalise_dist(_PIP_SPEC_RE.match(spec).group(1)) if _PIP_SPEC_RE.match(spec) else spec
        if key in seen:
            continue
        seen.add(key)
        if key == "mlflow":
            try:
                importlib.metadata.version("mlflow")
            except importlib.metadata.PackageNotFoundError:
                try:
                    importlib.metadata.version("mlflow-skinny")
                    spec = "mlflow-skinny" + spec[len("mlflow"):]
                except importlib.metadata.PackageNotFoundError:
                    pass
        pips.append(spec)
    return {"dependencies": conda_deps + [{"pip": pips}]}


def _mlflow_environment_file(folder):
    for name in ("conda.yaml", "requirements.txt", "python_env.yaml"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _mlflow_drift_warning(folder, strict):
    """--model_dir on an MLflow folder: the model's environment against this Python (a warning, or fatal)."""
    path = _mlflow_environment_file(folder)
    if path is None:
        return
    try:
        mismatches, matched, unchecked, _ = _environment_drift(_read_conda(path))
    except StartupError as exc:
        logger.warning("Environment drift check skipped: %s", exc.message)
        return
    if not mismatches:
        logger.info("Environment: the MLflow model's %d pin(s) match this Python", matched)
        return
    lines = ["Environment drift: the MLflow model %s pins %d package(s) that this Python (%s) does not have as "
             "pinned (%d other pin(s) match):" % (folder, len(mismatches), sys.executable, matched)]
    lines += ["  %s  %s  this Python has %s" % (name, pin, have or "none (MISSING)") for name, pin, have in mismatches]
    if unchecked:
        lines.append("  Unchecked (not pinned with == or conda's =): %s" % ", ".join(unchecked))
    if strict:
        raise StartupError("\n".join(lines) + "\n--strict_environment: install the pinned versions, or change "
                           "the pins.")
    logger.warning("\n".join(lines))


# -- azureml.ai.monitoring, when the real package is not installed -------------------------------------------

_MONITORING_VERSION = "1.0.0"  # the azureml-ai-monitoring release whose records the shim writes


class _Collections:
    """What the deployment's data_collector section enables, and where collected records go (one owner)."""

    def __init__(self):
        self.enabled = {}  # collection name -> sampling percentage
        self.folder = None
        self.source = ""
        self.lock = threading.Lock()

    def configure(self, config):
        deployment = getattr(config, "deployment_info", None)
        section = (deployment.doc.get("data_collector") if deployment else None) or {}
        self.enabled = {}
        if not isinstance(section, dict):
            return
        rate = section.get("sampling_rate", 1.0)
        for name, spec in (section.get("collections") or {}).items():
            spec = spec if isinstance(spec, dict) else {}
            if str(spec.get("enabled", "false")).strip().lower() == "true":
                self.enabled[str(name)] = 100.0 * float(spec.get("sampling_rate", rate) or 1.0)
        self.folder = os.path.abspath(config.data_collector_dir or "model-data")
        if deployment is not None:
            self.source = "/local/onlineEndpoints/%s/deployments/%s" % (deployment.endpoint_name or "local",
                                                                         deployment.name)
        if self.enabled:
            logger.info("Model data collection: %s, written as JSON Lines under %s",
                        ", ".join(sorted(self.enabled)), self.folder)

    def write(self, name, record):
        stamp = time.gmtime()
        folder = os.path.join(self.folder, name, time.strftime("%Y/%m/%d/%H", stamp))
        with self.lock:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "data.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


_collections = _Collections()


class _CorrelationContext:
    """What Collector.collect() returns: pass it to the next collect() to correlate records."""

    def __init__(self, id=None, timestamp=None, headers=None, success=True, message=None):
        self.id = id or str(uuid.uuid4())
        self.timestamp = timestamp or int(time.time())
        self.headers = headers or {}
        self._success, self._message = success, message

    def get_id(self):
        return self.id

    def get_timestamp(self):
        return self.timestamp

    def get_headers(self):
        return self.headers

    def is_success(self):
        return self._success

    def get_message(self):
        return self._message

    def __str__(self):
        return self.id


def _raise(exc):
    raise exc


class _Collector:
    """azureml.ai.monitoring.Collector: pandas DataFrames to JSON Lines, one folder per collection."""

    def __init__(self, *, name, on_error=None):
        self.name = name
        self.on_error = on_error or _raise
        self._check()

    def _check(self):
        if not self.name:
            message = "collection name is not provided"
        elif self.name not in _collections.enabled:
            message = ("collection %s is not enabled, drop the data (locally: enable it in the deployment file's "
                       "data_collector.collections and start with --deployment)" % self.name)
        else:
            return None
        self.on_error(Exception(message))
        return message

    def collect(self, data, correlation_context=None):
        context = correlation_context or _CorrelationContext()
        message = self._check()
        if message:
            return _CorrelationContext(context.get_id(), context.get_timestamp(), context.get_headers(), False,
                                       message)
        import random
        percentage = _collections.enabled[self.name]
        if percentage < 100 and percentage <= random.random() * 100.0:
            return _CorrelationContext(context.get_id(), context.get_timestamp(), context.get_headers(), False,
                                       "dropped_sampling")
        pandas = sys.modules.get("pandas")
        if pandas is None or not isinstance(data, pandas.DataFrame):
            exc = TypeError("data type (%s) not supported, supported types: pandas.DataFrame" % type(data).__name__)
            self.on_error(exc)
            return _CorrelationContext(context.get_id(), context.get_timestamp(), context.get_headers(), False,
                                       exc.args[0])
        request_id = getattr(_context, "request_id", None) or ""
        record = collections.OrderedDict([
            ("specversion", "1.0"), ("id", str(uuid.uuid4())), ("source", _collections.source),
            ("type", "azureml.inference.%s" % self.name), ("datacontenttype", "application/json"),
            ("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(context.get_timestamp()))),
            ("data", json.loads(data.to_json(orient="records", date_format="iso"))),
            ("correlationid", context.get_id()), ("xrequestid", request_id), ("modelversion", "default"),
            ("collectdatatype", "pandas.core.frame.DataFrame"),  # as the cloud names it (pandas 3 says pandas)
            ("agent", "azureml-ai-monitoring/%s (azmlinfsrv %s)" % (_MONITORING_VERSION, __version__))])
        try:
            _collections.write(self.name, record)
        except OSError as exc:
            self.on_error(exc)
            return _CorrelationContext(context.get_id(), context.get_timestamp(), context.get_headers(), False,
                                       str(exc))
        return _CorrelationContext(context.get_id(), context.get_timestamp(), context.get_headers(), True, None)


def _install_monitoring_shim(config):
    """azureml.ai.monitoring for scripts that import it: the real package when installed, else _Collector."""
    _collections.configure(config)
    try:
        if importlib.util.find_spec("azureml.ai.monitoring") is not None:
            return
    except (ImportError, ValueError):
        pass
    for name in ("azureml", "azureml.ai"):
        _package_or_shim(name)
    module = types.ModuleType("azureml.ai.monitoring", "azmlinfsrv shim for azureml-ai-monitoring")
    module.__dict__.update(Collector=_Collector, CorrelationContext=_CorrelationContext,
                           BasicCorrelationContext=_CorrelationContext)
    module.__file__ = _HERE
    sys.modules[module.__name__] = module
    sys.modules["azureml.ai"].monitoring = module


###############################################################################
# III.13  Clients that left: no run() and no answer for them (hooks: _RunPool._run_one, App.score)
###############################################################################

_PEEK_FLAGS = socket.MSG_PEEK | _MSG_DONTWAIT

if hasattr(select, "poll"):
    def _readable_now(sock):
        """One poll(2) that does not wait: has the client sent something (bytes, its FIN or a reset)?"""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
else:  # Windows: select() takes sockets of any number there
    def _readable_now(sock):
        """One select() that does not wait: has the client sent something (bytes, its FIN or a reset)?"""
        return bool(select.select((sock,), (), (), 0)[0])


def _client_left(req):
    """True if the client of ``req`` has closed the connection: its socket is readable and holds
    nothing more (a FIN), or it was reset.

    One poll(2) that does not wait; a look at the bytes (MSG_PEEK, nothing is consumed) only when
    the socket is readable. A client with bytes still to read (a pipelined request, the rest of
    something it sends) or with a next request already read into the buffer is there: it expects
    its answers in order. A client that only shut down its sending side (``shutdown(SHUT_WR)``)
    cannot be told from one that closed, and counts as gone, as nginx counts it (499)."""
    if req.reader.buf:
        return False
    sock = req.socket
    try:
        if not _readable_now(sock) or sock.recv(1, _PEEK_FLAGS):
            return False
    except (BlockingIOError, InterruptedError, socket.timeout):
        return False
    except (OSError, ValueError):  # reset, or the socket closed under us
        return True
    req.reader.eof = True  # nothing to linger for: the close goes out at once
    return True


def _wait_watching_client(app, job, req, timeout):
    """``job.wait(timeout)``; a wait that lasts longer than _CLIENT_WATCH_SECONDS looks at the
    client between slices of it. Gone while the job is queued: the job is withdrawn and the wait is
    over (True). Gone while run() executes: logged and counted now, once; run() goes on (nothing
    can stop it safely) and its answer is not written (``_drop_answer``)."""
    if timeout <= _CLIENT_WATCH_SECONDS:
        return job.wait(timeout)
    deadline = time.perf_counter() + timeout
    while not job.wait(min(_CLIENT_WATCH_SECONDS, deadline - time.perf_counter())):
        now = time.perf_counter()
        if now >= deadline:
            return False
        if job.left or not _client_left(req):
            continue
        job.left = now
        if app.pool.withdraw(job):
            return True
        if job.started:  # it runs (or has just returned): logged and counted now; dropped by a worker: later
            app.metrics.count("client_gone_running")
            logger.warning("Request %s: its client left while run() was executing (%.0f ms after the request "
                           "arrived, %.0f ms in run()); the answer will not be sent.", req.request_id,
                           (now - req.start) * 1000.0, (now - job.started) * 1000.0)
    return True


def _drop_answer(app, req, job):
    """The request's client has left: no answer is written (_ClientGone closes the connection).
    A request dropped before its run() started is logged and counted here, once."""
    if not job.started:
        app.metrics.count("client_gone_queued")
        logger.warning("Request %s dropped: its client left while it waited %.0f ms for a worker; run() was "
                       "not called.", req.request_id, (job.left - req.start) * 1000.0)
    raise _ClientGone()


def _dropped_metric_lines(counters):
    """/metrics: the requests dropped because their client left, by the stage it was found gone in."""
    lines = ["# HELP azmlinfsrv_requests_dropped_total Requests whose client left before the answer: "
             "stage=\"queued\" never ran run(), stage=\"running\" ran it and its answer was not sent.",
             "# TYPE azmlinfsrv_requests_dropped_total counter"]
    for stage in ("queued", "running"):
        lines.append('azmlinfsrv_requests_dropped_total{reason="client_gone",stage="%s"} %d'
                     % (stage, counters.get("client_gone_" + stage, 0)))
    return lines


###############################################################################
# III.14  A listening socket per process: --processes on Linux (hook: _prefork)
###############################################################################

#: Linux spreads the connections of a port over the sockets listening on it with SO_REUSEPORT (3.9+);
#: BSD and macOS accept the option but give every connection to one socket, Windows has no such option.


class _PortShare:
    """--processes on Linux: every process accepts on a socket of its own, and the kernel spreads
    new connections over them (by a hash of the client's address and port). On one shared socket
    the processes race for each connection, and one could hold more than its share of keep-alive
    connections for as long as they last.

    The parent holds a socket bound to the port that never listens: it gets no connection, and it
    keeps the port while processes come and go (any bind without SO_REUSEPORT, such as a second
    azmlinfsrv's, still fails with "already in use"). The first processes listen before their
    script loads, so that connections made during start-up wait for them, as on a shared socket. A
    process that replaces one that died (or was stuck) listens only once its script is loaded: until
    then the others take every connection, where the dead one's socket would have held some of them
    through a whole init(). The health port, which probes alone use, stays one shared socket.
    """

    def __init__(self, host, port, reserve, sockets):
        self.host = host
        self.port = port
        self.reserve = reserve
        self.sockets = sockets  # the first processes' sockets, by index; None once handed to its process

    @classmethod
    def open(cls, config, shared):
        """Sockets of their own for config.processes processes, in place of ``shared`` (which is
        closed); None where the platform cannot (then ``shared`` serves them all, as before)."""
        if not _REUSEPORT:
            return None
        host, port = shared.getsockname()[:2]
        try:
            reserve = _reuseport_socket(host, port, listen=False, bind=False)
        except OSError as exc:  # a kernel without it (before 3.9, some sandboxes)
            logger.info("SO_REUSEPORT is not available (%s): the processes share one socket.", exc)
            return None
        shared.close()  # it could not join the sockets below (it has no SO_REUSEPORT): they replace it
        try:
            reserve.bind((host, port))
            sockets = [_reuseport_socket(host, port) for _ in range(config.processes)]
        except OSError as exc:
            reserve.close()
            raise StartupError("Cannot listen on %s:%s: %s" % (host, port, exc), EXIT_USAGE)
        return cls(host, port, reserve, sockets)

    def forked(self, index):
        """The parent, after forking the process ``index``: its socket is that process's alone now."""
        sock = self.sockets[index]
        if sock is not None:
            sock.close()
            self.sockets[index] = None

    def child(self, index):
        """In the process ``index``: (its socket, what to call once its script is loaded, or None)."""
        own = self.sockets[index]  # None in a process that replaces one: the first one's went with it
        for sock in self.sockets + [self.reserve]:
            if sock is not None and sock is not own:
                sock.close()
        if own is not None:
            return own, None
        try:
            own = _reuseport_socket(self.host, self.port, listen=False)
        except OSError as exc:
            raise StartupError("Cannot listen on %s:%s: %s" % (self.host, self.port, exc), EXIT_USAGE)
        return own, lambda: own.listen(Server.request_queue_size)

    def close(self):
        for sock in self.sockets + [self.reserve]:
            if sock is not None:
                sock.close()


def _reuseport_socket(host, port, listen=True, bind=True):
    """A TCP socket with SO_REUSEPORT (and SO_REUSEADDR, as _bind's), bound to (host, port) and
    listening, non-blocking as _bind's."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if bind:
            sock.bind((host, port))
        if listen:
            sock.listen(Server.request_queue_size)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


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
    for setting in _SETTINGS:
        if setting.kind == "env":
            continue
        text = "%s Env: %s. Default: %s." % (setting.help, setting.env, setting.default)
        if setting.kind == "switch":
            parser.add_argument(setting.flag, dest=setting.name, action="store_const", const=True, default=None,
                                help=text)
        elif _is_bool_setting(setting.parse):
            parser.add_argument(setting.flag, dest=setting.name, default=None, metavar="true|false", help=text)
        else:
            parser.add_argument(setting.flag, dest=setting.name, default=None, help=text)
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
