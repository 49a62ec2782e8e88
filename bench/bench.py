#!/usr/bin/env python3
"""Benchmark azmlinfsrv.py against the reference server it replaces.

    python bench/bench.py                  # full run, about 17 minutes on 2 cores
    python bench/bench.py --quick          # smoke run, about 3 minutes
    python bench/bench.py --workloads hello,echo-1MB --connections 1,64 --markdown out.md
    python bench/bench.py --workloads upload-50MB,idle-1000,stuck-run   # the scenarios alone, 1 minute

For every workload it starts ``azmlinfsrv.py`` ("ours") and the reference
``azmlinfsrv`` from ``azureml-inference-server-http==1.5.1`` ("ref", Flask under
gunicorn sync workers) side by side, then drives them in turn with ``wrk`` --
ours, ref, ours, ref... for ``--rounds`` rounds -- and reports the medians. The
``hello`` workload is also run against two do-nothing ceilings
(``ceiling_httpserver.py``, ``ceiling_asyncio.py``). Three scenarios are then
driven by Python clients instead of wrk, ours and ref started one at a time:
``upload-50MB`` (32 concurrent 50 MiB uploads to one worker: peak RSS),
``idle-1000`` (1000 idle connections, then a normal request: its latency and
the server's threads) and ``stuck-run`` (a run() that never returns: is the
next request served, does GET / turn 503). At the end it checks the project's
targets (see bench/README.md).

Needs: Linux or macOS, ``wrk`` on PATH, Python 3.8+. No third-party Python
packages. The reference is looked up (``--ref``, ``$AZMLINFSRV_REF``, then
~/.cache/azmlinfsrv-bench/ref-venv) and, when absent,
installed into a scratch venv outside the repository with pip.

Only 127.0.0.1 is ever targeted; only processes this script starts are stopped.
"""

import argparse
import http.client
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCRIPTS = os.path.join(HERE, "scripts")
LUA = os.path.join(HERE, "wrk_bench.lua")
DEFAULT_OURS = os.path.join(REPO, "azmlinfsrv.py")
REF_PACKAGE = "azureml-inference-server-http==1.5.1"
REF_VENV_CANDIDATES = [os.path.expanduser("~/.cache/azmlinfsrv-bench/ref-venv")]

KA, CLOSE = "keep-alive", "close"
OURS, REF = "ours", "ref"
CEIL_HTTP, CEIL_ASYNC = "ceiling-httpserver", "ceiling-asyncio"
CEILINGS = {CEIL_HTTP: "ceiling_httpserver.py", CEIL_ASYNC: "ceiling_asyncio.py"}

HELLO = {"message": "Hello, World!"}
WRK_TIMEOUT = "10s"       # per-request timeout inside wrk: far above any expected latency
MAX_WRK_THREADS = 256     # one wrk thread per connection up to this; beyond, wrk's own (sampled) latency
START_TIMEOUT = 90.0      # seconds a server gets to answer GET / with 200 Healthy
BUSY_WARN = 0.15          # CPUs' worth of other work between runs that means the machine is not quiet

# Targets (bench/README.md, issue 10) that take a number.
HELLO_KA_GOAL = 5.7       # hello keep-alive @64: ours/ref req/s at least
ECHO_RSS_GOAL = 1.5       # echo-1MB: ours/ref peak RSS at most
UPLOAD_RSS_GOAL = 2.0     # upload-50MB: ours/ref peak RSS at most
IDLE_PROBE_GOAL_MS = 50.0  # idle-1000: a normal request with 1000 idle connections open, under
IDLE_THREADS_GOAL = 64    # idle-1000: ours' threads with 1000 idle connections open, at most (not one each)


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------

def _json_body(size):
    """The request body wrk_bench.lua sends for BENCH_BODY_BYTES=size."""
    if size >= 12:
        return ('{"data": "' + "x" * (size - 12) + '"}').encode()
    return b"{}"


def _check_json(expected):
    def check(body, sent):
        try:
            got = json.loads(body)
        except ValueError:
            return "body is not JSON: %r" % body[:80]
        want = expected if expected is not None else json.loads(sent)
        return None if got == want else "unexpected body %r" % body[:80]
    return check


def _check_bytes(expected):
    def check(body, sent):
        return None if body == expected else "unexpected body %r" % body[:80]
    return check


def _check_keys(*keys):
    def check(body, sent):
        try:
            got = json.loads(body)
        except ValueError:
            return "body is not JSON: %r" % body[:80]
        return None if isinstance(got, dict) and all(k in got for k in keys) else "unexpected body %r" % body[:80]
    return check


class Workload:
    """One score script, how to start each server for it, and where to measure it.

    ``plan`` maps a connection mode to the connection counts measured by
    default; ``quick`` is the same for --quick. ``all_cpus`` leaves the server
    unpinned (multi-process CPU scaling cannot be measured on one CPU).
    """

    def __init__(self, name, script, body_bytes=0, ours_args=(), ref_args=(), check=None,
                 plan=None, quick=None, all_cpus=False, family=None, ceilings=False):
        self.name = name
        self.family = family or name
        self.script = script
        self.body_bytes = body_bytes
        self.ours_args = list(ours_args)
        self.ref_args = list(ref_args)
        self.check = check
        self.plan = plan or {KA: [1, 8, 64], CLOSE: [64]}
        self.quick = quick or {KA: [64]}
        self.all_cpus = all_cpus
        self.ceilings = ceilings


WORKLOADS = [
    Workload("hello", "hello.py", check=_check_json(HELLO), ceilings=True,
             plan={KA: [1, 8, 64], CLOSE: [1, 8, 64]}, quick={KA: [1, 64], CLOSE: [64]}),
    Workload("echo-1KB", "echo.py", body_bytes=1024, check=_check_json(None)),
    Workload("echo-1MB", "echo.py", body_bytes=1024 * 1024, check=_check_json(None),
             plan={KA: [1, 8, 64]}),
    Workload("rawhttp", "rawhttp.py", check=_check_bytes(b'{"message": "Hello, World!"}')),
    Workload("stream", "stream.py", check=_check_bytes((b"x" * 1023 + b"\n") * 16)),
    Workload("sleep-20ms wc1", "sleep.py", family="sleep-20ms", check=_check_keys("slept_ms"),
             ours_args=["--worker_count", "1"], ref_args=["--worker_count", "1"], plan={KA: [8, 64]}),
    Workload("sleep-20ms wc8", "sleep.py", family="sleep-20ms", check=_check_keys("slept_ms"),
             ours_args=["--worker_count", "8"], ref_args=["--worker_count", "8"], plan={KA: [8, 64]}),
    Workload("cpu-5ms p1", "cpu.py", family="cpu-5ms", check=_check_keys("checksum"), all_cpus=True,
             ours_args=["--worker_count", "1", "--processes", "1"], ref_args=["--worker_count", "1"],
             plan={KA: [8, 64]}),
    Workload("cpu-5ms p2", "cpu.py", family="cpu-5ms", check=_check_keys("checksum"), all_cpus=True,
             ours_args=["--worker_count", "1", "--processes", "2"], ref_args=["--worker_count", "2"],
             plan={KA: [8, 64]}),
]

# The ceilings only need the points the targets and the @1 overhead use.
CEILING_PLAN = {KA: [1, 64], CLOSE: [64]}


def calibrate_cpu_iters(target_s=0.005):
    """Loop count that makes cpu.py's run() take ``target_s`` on this machine."""
    spec = importlib.util.spec_from_file_location("_bench_cpu", os.path.join(SCRIPTS, "cpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = 20000
    best = min(_timed(mod._burn, n) for _ in range(7))
    return max(1000, int(n * target_s / best))


def _timed(fn, arg):
    t = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

class StartError(Exception):
    pass


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _log_tail(path, lines=15):
    try:
        with open(path, "rb") as f:
            text = f.read()[-6000:].decode("utf-8", "replace")
    except OSError:
        return ""
    if not text.strip():
        return "    | (the server printed nothing)"
    return "\n".join("    | " + line for line in text.splitlines()[-lines:])


class Server:
    """A server process this script started (pid, its session, its log)."""

    def __init__(self, name, argv, port, cpus, logdir, env, cwd):
        self.name, self.port = name, port
        self.log = os.path.join(logdir, "%s-%d.log" % (name, port))
        cmd = (["taskset", "-c", cpus] if cpus else []) + argv
        self.cmdline = " ".join(cmd)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise StartError("%s exited with code %s before it was healthy:\n%s"
                                 % (self.name, code, _log_tail(self.log)))
            try:
                status, body = http_request(self.port, "GET", "/", timeout=2)
                if status == 200 and body.strip().startswith(b"Healthy"):
                    return
                last = "GET / answered %s %r" % (status, body[:60])
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        self.stop()
        raise StartError("%s did not become healthy in %.0f s (%s):\n%s"
                         % (self.name, timeout, last, _log_tail(self.log)))

    def alive(self):
        return self.proc.poll() is None

    def peak_rss_kb(self):
        """Sum of VmHWM over the process and its descendants (gunicorn workers, pre-forked children)."""
        return sum(_vm_hwm_kb(pid) for pid in _process_tree(self.proc.pid))

    def stop(self):
        pgid = self.proc.pid  # start_new_session: the group is ours alone
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):  # orphaned children of our own session
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.5 if sig == signal.SIGTERM else 0)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _process_tree(root):
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo and len(tree) < 10000:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _busy_jiffies():
    """(busy, total) jiffies summed over all CPUs; iowait counts as idle."""
    try:
        with open("/proc/stat") as f:
            row = f.readline().split()
    except OSError:
        return None
    ticks = list(map(int, row[1:]))
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def _own_jiffies(roots):
    total = 0
    for root in roots:
        for pid in _process_tree(root):
            try:
                with open("/proc/%d/stat" % pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
            except (OSError, ValueError, IndexError):
                pass
    return total


def background_busy(own_pids, interval=0.3):
    """CPUs' worth of work done by processes other than ours over ``interval`` (between wrk runs).

    Our servers can still be finishing queued requests after wrk stops, so their
    CPU time (and this script's) is subtracted; what remains is someone else
    competing for the machine, and a reason to distrust the next run a little.
    """
    a, oa = _busy_jiffies(), _own_jiffies(own_pids)
    time.sleep(interval)
    b, ob = _busy_jiffies(), _own_jiffies(own_pids)
    if not a or not b or b[1] <= a[1]:
        return None
    ncpu = os.cpu_count() or 1
    return max(0.0, (b[0] - a[0]) - (ob - oa)) * ncpu / float(b[1] - a[1])


def _vm_hwm_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def http_request(port, method, path, body=None, timeout=30, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# wrk
# ---------------------------------------------------------------------------

_RESULT = re.compile(r"BENCH_RESULT (.*)")


def run_wrk(port, conns, mode, seconds, body_bytes, cpus):
    """One wrk run against POST /score; the numbers wrk_bench.lua's done() printed.

    wrk gets one thread per connection (up to MAX_WRK_THREADS) so that the Lua
    script can time every request exactly; see wrk_bench.lua for why.
    """
    threads = conns if conns <= MAX_WRK_THREADS else 1
    cmd = (["taskset", "-c", cpus] if cpus else []) + [
        "wrk", "-t", str(threads), "-c", str(conns), "-d", "%gs" % seconds, "--timeout", WRK_TIMEOUT,
        "-s", LUA]
    if mode == CLOSE:
        cmd += ["-H", "Connection: close"]
    cmd.append("http://127.0.0.1:%d/score" % port)
    env = dict(os.environ, BENCH_BODY_BYTES=str(body_bytes), BENCH_EXACT="1" if threads == conns else "0")
    try:
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=seconds + 60).stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        return {"error": "wrk did not finish"}
    m = _RESULT.search(out)
    if not m:
        return {"error": "wrk printed no result: %s" % out.strip()[-300:]}
    r = {}
    for kv in m.group(1).split():
        key, _, value = kv.partition("=")
        try:
            r[key] = float(value)
        except ValueError:
            r[key] = value
    secs = r["duration_us"] / 1e6 or seconds
    return {
        "rps": r["requests"] / secs,
        "p50_ms": r["p50_us"] / 1000.0,
        "p99_ms": r["p99_us"] / 1000.0,
        "requests": int(r["requests"]),
        "errors": int(r["non2xx"] + r["socket_errors"]),
        "non2xx": int(r["non2xx"]),
        "socket_errors": int(r["socket_errors"]),
        "latency": r.get("latency", "wrk"),
        "raw": r,
    }


# ---------------------------------------------------------------------------
# Reference and tools
# ---------------------------------------------------------------------------

def find_or_install_ref(args):
    if args.ref:
        if not os.access(args.ref, os.X_OK):
            sys.exit("--ref %s is not an executable" % args.ref)
        return os.path.abspath(args.ref)
    if os.environ.get("AZMLINFSRV_REF") and os.access(os.environ["AZMLINFSRV_REF"], os.X_OK):
        return os.environ["AZMLINFSRV_REF"]
    venvs = [args.ref_venv] if args.ref_venv else REF_VENV_CANDIDATES
    for venv in venvs:
        exe = os.path.join(venv, "bin", "azmlinfsrv")
        if os.access(exe, os.X_OK):
            return exe
    venv = args.ref_venv or next((v for v in REF_VENV_CANDIDATES if os.path.isdir(v)), REF_VENV_CANDIDATES[-1])
    venv = os.path.abspath(venv)
    if venv == REPO or venv.startswith(REPO + os.sep):
        sys.exit("refusing to create the reference venv inside the repository: %s" % venv)
    print("Reference server not found; installing %s into %s (one time) ..." % (REF_PACKAGE, venv), flush=True)
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        os.makedirs(os.path.dirname(venv), exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", REF_PACKAGE], check=True)
    exe = os.path.join(venv, "bin", "azmlinfsrv")
    if not os.access(exe, os.X_OK):
        sys.exit("pip install finished but %s is missing" % exe)
    return exe


def ours_version(python, path):
    """'azmlinfsrv X.Y.Z, sha256 0123456789ab' for the module under test."""
    import hashlib
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        out = subprocess.run([python, path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=60).stdout.decode("utf-8", "replace").strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return "%s, sha256 %s" % (out[-1] if out else "?", digest)


def ref_version(exe):
    py = os.path.join(os.path.dirname(exe), "python")
    try:
        out = subprocess.run([py, "-c", "import azureml_inference_server_http as m; print(m.__version__)"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60)
        return out.stdout.decode().strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def require_wrk():
    if shutil.which("wrk"):
        return subprocess.run(["wrk", "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                              ).stdout.decode("utf-8", "replace").splitlines()[0].strip()
    sys.stderr.write(
        "bench.py needs the wrk load generator (https://github.com/wg/wrk) on PATH.\n"
        "  Debian/Ubuntu:  sudo apt-get install wrk\n"
        "  Fedora:         sudo dnf install wrk\n"
        "  macOS:          brew install wrk\n")
    sys.exit(2)


def cpu_layout(no_pin):
    """(server cpus, wrk cpus, all cpus, cpu ids): taskset lists, or None for each when not pinning."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = list(range(os.cpu_count() or 1))
    if no_pin or not shutil.which("taskset") or len(cpus) < 2:
        return None, None, None, cpus
    return str(cpus[0]), str(cpus[1]), ",".join(map(str, cpus)), cpus


# ---------------------------------------------------------------------------
# Running the plan
# ---------------------------------------------------------------------------

def build_plan(workloads, args):
    """[(workload, [(conns, mode), ...]), ...] after --quick/--connections/--modes."""
    plan = []
    for w in workloads:
        base = w.quick if args.quick else w.plan
        modes = args.modes or list(base)
        points = []
        for mode in modes:
            conns = args.connections or base.get(mode) or base.get(KA) or [64]
            points += [(c, mode) for c in conns]
        plan.append((w, points))
    return plan


def ceiling_points(points, args):
    if args.connections or args.modes:
        return points
    return [p for p in points if p[0] in CEILING_PLAN.get(p[1], ())]


def _median(values):
    return statistics.median(values) if values else None


class Bench:
    def __init__(self, args, ref_exe, layout, logdir, cpu_iters):
        self.args = args
        self.ref_exe = ref_exe
        self.server_cpus, self.wrk_cpus, self.all_cpus, self.cpus = layout
        self.logdir = logdir
        self.env = dict(os.environ, BENCH_CPU_ITERS=str(cpu_iters), PYTHONDONTWRITEBYTECODE="1")
        self.results = {}   # (workload, conns, mode, server) -> [run dicts]
        self.skipped = {}   # (workload, server) -> reason
        self.rss_kb = {}    # (workload, server) -> peak kB
        self.started = {}   # (workload, server) -> command line
        self.scenarios = {}  # scenario -> {server: figures}
        self.done_runs = 0
        self.total_runs = 0

    def argv(self, name, w, port):
        if name == OURS:
            return [self.args.python, os.path.abspath(self.args.ours), "--entry_script", w.script,
                    "--port", str(port)] + w.ours_args
        if name == REF:
            return [self.ref_exe, "--entry_script", w.script, "--port", str(port)] + w.ref_args
        return [sys.executable, os.path.join(HERE, CEILINGS[name]), "--port", str(port)]

    def servers_for(self, w):
        names = []
        if self.args.ours:
            names.append(OURS)
        if self.ref_exe:
            names.append(REF)
        if w.ceilings and not self.args.no_ceilings:
            names += [CEIL_HTTP, CEIL_ASYNC]
        return names

    def schedule(self, w, points):
        """One round: [(conns, mode, server), ...], servers alternating within each point."""
        ceil_pts = set(ceiling_points(points, self.args))
        return [(conns, mode, name) for conns, mode in points for name in self.servers_for(w)
                if name not in CEILINGS or (conns, mode) in ceil_pts]

    def launch(self, name, w, env=None, all_cpus=False):
        """Start one server for ``w`` and wait until GET / says Healthy."""
        port = free_port()
        cpus = self.all_cpus if all_cpus else self.server_cpus
        try:
            srv = Server(name, self.argv(name, w, port), port, cpus, self.logdir,
                         dict(self.env, **(env or {})), SCRIPTS)
        except OSError as e:
            raise StartError("%s could not be started: %s" % (name, e))
        self.started[(w.name, name)] = ("%s " % " ".join("%s=%s" % kv for kv in sorted(env.items()))
                                        if env else "") + srv.cmdline
        srv.wait_healthy()
        return srv

    def start(self, name, w):
        srv = self.launch(name, w, all_cpus=w.all_cpus)
        port = srv.port
        sent = _json_body(w.body_bytes)
        try:
            status, body = http_request(port, "POST", "/score", body=sent,
                                        headers={"Content-Type": "application/json"})
        except OSError as e:
            srv.stop()
            raise StartError("%s: POST /score failed: %s" % (name, e))
        problem = ("status %d" % status) if status != 200 else w.check(body, sent)
        if problem:
            srv.stop()
            raise StartError("%s: POST /score for %s: %s" % (name, w.name, problem))
        # Warm up: let every worker boot and take the first-request costs off the record.
        multi = any(a in ("--worker_count", "--processes") for a in w.ours_args + w.ref_args)
        run_wrk(port, 8, KA, 2 if multi else 1, w.body_bytes, self.wrk_cpus)
        return srv

    def run(self, plan, scenarios=()):
        self.total_runs = sum(len(self.schedule(w, points)) for w, points in plan) * self.args.rounds
        est = self.total_runs * (self.args.duration + 0.7) + len(plan) * 6 + 60 * len(scenarios)
        print("Plan: %d wrk runs of %g s (%d rounds) across %d server configurations, and %d scenario(s): "
              "about %.0f min." % (self.total_runs, self.args.duration, self.args.rounds, len(plan),
                                   len(scenarios), est / 60), flush=True)
        for w, points in plan:
            self.run_workload(w, points)
        for sc in scenarios:
            for name in self.servers_for(sc):
                self.run_scenario(sc, name)

    def run_scenario(self, sc, name):
        """One scenario against one server, started alone; its client threads run on wrk's CPU."""
        print("[scenario] %-11s %-4s ..." % (sc.name, name), end=" ", flush=True)
        try:
            srv = self.launch(name, sc, env=sc.env)
        except StartError as e:
            self.skipped[(sc.name, name)] = " ".join(str(e).split())[:300]
            print("SKIP: %s" % e, flush=True)
            return
        affinity = None
        try:
            if self.wrk_cpus and hasattr(os, "sched_setaffinity"):
                affinity = os.sched_getaffinity(0)
                os.sched_setaffinity(0, {int(c) for c in self.wrk_cpus.split(",")})
            out = sc.func(self, srv, name)
            if not srv.alive():
                out["died"] = "exited with code %s" % srv.proc.poll()
                out["text"] += " (then the server died: code %s)" % srv.proc.poll()
        except Exception as e:  # a bug in a scenario must not lose the rest of the run
            out = {"error": "%s: %s" % (type(e).__name__, e), "text": "ERROR %s: %s" % (type(e).__name__, e),
                   "passed": False}
        finally:
            if affinity is not None:
                os.sched_setaffinity(0, affinity)
            srv.stop()
        self.scenarios.setdefault(sc.name, {})[name] = out
        print(out["text"], flush=True)

    def run_workload(self, w, points):
        servers = {}
        names = self.servers_for(w)
        try:
            for name in names:
                try:
                    servers[name] = self.start(name, w)
                except StartError as e:
                    self.skipped[(w.name, name)] = " ".join(str(e).split())[:300]
                    print("  SKIP %s on %s: %s" % (name, w.name, e), flush=True)
            for rnd in range(self.args.rounds):
                for conns, mode, name in self.schedule(w, points):
                    self.done_runs += 1
                    srv = servers.get(name)
                    if srv is None:
                        continue
                    if not srv.alive():
                        servers.pop(name)
                        self.skipped[(w.name, name)] = "died during the run (code %s)" % srv.proc.poll()
                        print("  %s died during %s:\n%s" % (name, w.name, _log_tail(srv.log)), flush=True)
                        continue
                    busy = background_busy([os.getpid()] + [x.proc.pid for x in servers.values()])
                    r = run_wrk(srv.port, conns, mode, self.args.duration, w.body_bytes, self.wrk_cpus)
                    r["background_busy"] = busy
                    if w.family == "echo-1MB":
                        self.rss_kb[(w.name, name)] = max(self.rss_kb.get((w.name, name), 0),
                                                          srv.peak_rss_kb())
                    self.results.setdefault((w.name, conns, mode, name), []).append(r)
                    self.progress(w, conns, mode, name, rnd, r)
        finally:
            for srv in servers.values():
                srv.stop()

    def latency_note(self):
        sources = {r.get("latency") for runs in self.results.values() for r in runs if "error" not in r}
        if sources <= {"exact"}:
            return "exact per-request percentiles (one wrk thread per connection, timed in wrk_bench.lua)"
        if sources == {"wrk"}:
            return "wrk's own sampled percentiles (no LuaJIT FFI, or more than %d connections)" % MAX_WRK_THREADS
        return ("exact per-request percentiles, except points with more than %d connections, "
                "which use wrk's own sampled percentiles" % MAX_WRK_THREADS)

    def noise_note(self):
        busy = [r.get("background_busy") for runs in self.results.values() for r in runs]
        busy = [b for b in busy if b is not None]
        noisy = [b for b in busy if b > BUSY_WARN]
        if not noisy:
            return ""
        return ("%d of %d runs started while other processes used more than %.0f%% of a CPU "
                "(worst %.0f%%): the machine was not quiet, so expect extra noise, mostly in p99."
                % (len(noisy), len(busy), 100 * BUSY_WARN, 100 * max(noisy)))

    def progress(self, w, conns, mode, name, rnd, r):
        head = "[%3d/%d] %-15s c=%-3d %-10s %-18s r%d" % (
            self.done_runs, self.total_runs, w.name, conns, mode, name, rnd + 1)
        if "error" in r:
            print(head + "  ERROR " + r["error"], flush=True)
        else:
            busy = r.get("background_busy")
            print(head + "  %9.0f req/s  p50 %8.2f ms  p99 %8.2f ms  errors %d%s"
                  % (r["rps"], r["p50_ms"], r["p99_ms"], r["errors"],
                     "  (others used %.0f%% CPU before)" % (100 * busy) if busy and busy > BUSY_WARN else ""),
                  flush=True)

    # -- summarising ---------------------------------------------------------

    def summary(self, workload, conns, mode, server):
        runs = [r for r in self.results.get((workload, conns, mode, server), []) if "error" not in r]
        if not runs:
            return None
        return {
            "rps": _median([r["rps"] for r in runs]),
            "p50_ms": _median([r["p50_ms"] for r in runs]),
            "p99_ms": _median([r["p99_ms"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
            "requests": sum(r["requests"] for r in runs),
            "runs": len(runs),
        }

    def rows(self, plan):
        out = []
        for w, points in plan:
            for conns, mode, name in self.schedule(w, points):
                s = self.summary(w.name, conns, mode, name)
                if s is None:
                    out.append((w.name, conns, mode, name, None, None))
                    continue
                ref = self.summary(w.name, conns, mode, REF)
                ratio = s["rps"] / ref["rps"] if ref and ref["rps"] and name != REF else None
                out.append((w.name, conns, mode, name, s, ratio))
        return out


# ---------------------------------------------------------------------------
# Scenarios: measured with Python clients, not wrk
# ---------------------------------------------------------------------------

UPLOAD_CLIENTS = 32
UPLOAD_BYTES = 50 * 1024 * 1024     # per client: "50 MB" is 50 MiB here
UPLOAD_CHUNK = 1024 * 1024          # sent in slices, so each send gets its own timeout
UPLOAD_TIMEOUT = 180.0              # seconds per socket operation of one upload
UPLOAD_DEADLINE = 420.0             # seconds for all 32 to finish
IDLE_TALKED = 500                   # connections that made one keep-alive request, then stay open
IDLE_SILENT = 500                   # connections opened and never written to
IDLE_PROBES = 5                     # normal POST /score requests timed with the 1000 idle
IDLE_PROBE_TIMEOUT = 10.0
IDLE_OURS_ARGS = ["--max_connections", "2000"]
STUCK_TIMEOUT_MS = 700              # SCORING_TIMEOUT_MS for stuck-run
STUCK_REQUEST_TIMEOUT = 15.0        # seconds any one step of stuck-run may take


class Scenario:
    """A workload with its own client (threads, raw sockets) instead of wrk, run once per server.

    ``func(bench, srv, name)`` drives the started server and returns a dict of figures; the
    servers are started one at a time, so neither competes with the other for memory or CPU.
    """

    def __init__(self, name, script, func, ours_args=(), ref_args=(), env=None, summary=""):
        self.name = self.family = name
        self.script = script
        self.func = func
        self.ours_args = list(ours_args)
        self.ref_args = list(ref_args)
        self.env = dict(env or {})
        self.summary = summary
        self.ceilings = False


def raise_nofile(wanted):
    """Raise this process's open-file limit (inherited by the servers) to ``wanted`` if allowed."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _proc_threads(pids):
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as f:
                for line in f:
                    if line.startswith("Threads:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass
    return total


def server_threads(srv):
    """Threads of the server's process tree now (0 where /proc is missing)."""
    return _proc_threads(_process_tree(srv.proc.pid))


def scrape_metrics(port, timeout=10):
    """{name: value} from GET /metrics, unlabelled samples only; {} when there is none."""
    try:
        status, body = http_request(port, "GET", "/metrics", timeout=timeout)
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200:
        return {}
    out = {}
    for line in body.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


class _ThreadSampler:
    """Samples the server's thread count every ``interval`` s in the background; ``peak`` is the most seen."""

    def __init__(self, srv, interval=0.02):
        self.srv, self.interval, self.peak = srv, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, server_threads(self.srv))
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        return self.peak


def _timed_request(port, method, path, body=None, timeout=30, headers=None):
    """(status or None, body or error text, seconds)."""
    t = time.perf_counter()
    try:
        status, data = http_request(port, method, path, body=body, timeout=timeout, headers=headers)
        return status, data, time.perf_counter() - t
    except socket.timeout:
        return None, "no answer in %g s" % timeout, time.perf_counter() - t
    except (OSError, http.client.HTTPException) as e:
        return None, "%s: %s" % (type(e).__name__, e), time.perf_counter() - t


def _upload_one(port, body, results, i):
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=UPLOAD_TIMEOUT)
    try:
        view = memoryview(body)
        chunks = (view[k:k + UPLOAD_CHUNK] for k in range(0, len(body), UPLOAD_CHUNK))
        conn.request("POST", "/score", body=chunks,
                     headers={"Content-Type": "application/json", "Content-Length": str(len(body))})
        resp = conn.getresponse()
        data = resp.read()
        results[i] = (resp.status, data[:200], time.perf_counter() - t)
    except (OSError, http.client.HTTPException) as e:
        results[i] = (None, "%s: %s" % (type(e).__name__, e), time.perf_counter() - t)
    finally:
        conn.close()


def scenario_upload(bench, srv, name):
    """32 clients POST a 50 MiB JSON body at once; every answer must be 200 with the length."""
    body = _json_body(UPLOAD_BYTES)
    want = len(body.decode("utf-8"))
    results = [None] * UPLOAD_CLIENTS
    threads = [threading.Thread(target=_upload_one, args=(srv.port, body, results, i), daemon=True)
               for i in range(UPLOAD_CLIENTS)]
    sampler = _ThreadSampler(srv, 0.1)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    deadline = time.monotonic() + UPLOAD_DEADLINE
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    total = time.perf_counter() - t0
    peak_threads = sampler.stop()
    ok, problems = 0, {}
    for r in results:
        if r is None:
            problem = "unfinished after %g s" % UPLOAD_DEADLINE
        elif r[0] == 200 and _length_of(r[1]) == want:
            ok += 1
            continue
        elif r[0] is None:
            problem = r[1][:120]
        else:
            problem = "status %s %r" % (r[0], r[1][:80])
        problems[problem] = problems.get(problem, 0) + 1
    out = {"clients": UPLOAD_CLIENTS, "body_bytes": len(body), "ok": ok, "total_s": total,
           "peak_rss_kb": srv.peak_rss_kb(), "peak_threads": peak_threads,
           "slowest_s": max((r[2] for r in results if r), default=None),
           "problems": problems}
    if name == OURS:
        m = scrape_metrics(srv.port)
        if "azmlinfsrv_buffered_body_bytes_peak" in m:
            out["buffered_peak_bytes"] = int(m["azmlinfsrv_buffered_body_bytes_peak"])
            out["buffered_limit_bytes"] = int(m.get("azmlinfsrv_buffered_body_bytes_limit", 0))
    out["passed"] = ok == UPLOAD_CLIENTS
    out["text"] = "%d/%d answered 200 in %.1f s (slowest %.1f s), peak RSS %.1f MiB%s%s" % (
        ok, UPLOAD_CLIENTS, total, out["slowest_s"] or 0, out["peak_rss_kb"] / 1024.0,
        ", bodies buffered at once at most %.1f MiB" % (out["buffered_peak_bytes"] / 2.0 ** 20)
        if "buffered_peak_bytes" in out else "",
        "; " + ", ".join("%d x %s" % (n, p) for p, n in problems.items()) if problems else "")
    return out


def _length_of(body):
    try:
        return json.loads(body).get("length")
    except (ValueError, AttributeError):
        return None


def scenario_idle(bench, srv, name):
    """1000 idle connections (500 after one keep-alive request, 500 silent), then normal requests."""
    port = srv.port
    before = server_threads(srv)
    sampler = _ThreadSampler(srv)
    talked, silent, kept, refused = [], [], 0, []
    t0 = time.perf_counter()
    try:
        for _ in range(IDLE_TALKED):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IDLE_PROBE_TIMEOUT)
            talked.append(conn)
            try:
                conn.request("POST", "/score", body=b"{}", headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    refused.append("status %d" % resp.status)
                elif not resp.will_close:
                    kept += 1
            except (OSError, http.client.HTTPException) as e:
                refused.append(type(e).__name__)
                if len(refused) >= 20:
                    break
        for _ in range(IDLE_SILENT):
            try:
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=IDLE_PROBE_TIMEOUT))
            except OSError as e:
                refused.append("connect: %s" % type(e).__name__)
                if len(refused) >= 40:
                    break
        opened_s = time.perf_counter() - t0
        probes = [_timed_request(port, "POST", "/score", body=b"{}", timeout=IDLE_PROBE_TIMEOUT,
                                 headers={"Content-Type": "application/json"})
                  for _ in range(IDLE_PROBES if name == OURS else 1)]
        with_idle = server_threads(srv)
        metrics = scrape_metrics(port, timeout=IDLE_PROBE_TIMEOUT) if name == OURS else {}
        # The kept-alive connections still work: one more request on a few of them.
        reused = 0
        for conn in [c for c in talked if c.sock is not None][:10]:
            try:
                conn.request("POST", "/score", body=b"{}", headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                reused += resp.status == 200
            except (OSError, http.client.HTTPException):
                pass
    finally:
        peak = sampler.stop()
        for conn in talked:
            conn.close()
        for sock in silent:
            sock.close()
    good = [p[2] * 1000.0 for p in probes if p[0] == 200]
    first = probes[0]
    out = {"talked": len(talked), "kept_alive": kept, "silent": len(silent), "problems": refused[:10],
           "open_s": opened_s, "threads_before": before, "threads_with_idle": with_idle, "threads_peak": peak,
           "probe_ms": [p[2] * 1000.0 for p in probes], "probe_status": [p[0] for p in probes],
           "probe_ok": len(good), "probe_median_ms": _median(good), "reused_ok": reused}
    if metrics:
        out["metrics"] = {k: metrics[k] for k in ("azmlinfsrv_connections_open", "azmlinfsrv_handler_threads",
                                                  "azmlinfsrv_evicted_connections_total",
                                                  "azmlinfsrv_rejected_connections_total") if k in metrics}
    text = "%d talked (%d kept alive by the server), %d silent; " % (len(talked), kept, len(silent))
    if first[0] == 200:
        text += "normal POST /score: %.1f ms" % (first[2] * 1000.0)
        if len(probes) > 1:
            text += " (median of %d: %.1f ms, %d ok)" % (len(probes), out["probe_median_ms"] or 0, len(good))
    else:
        text += "normal POST /score: %s after %.1f s" % (
            "status %s" % first[0] if first[0] else first[1], first[2])
    text += "; threads %d before, %d with the idle connections open (peak %d)" % (before, with_idle, peak)
    if "azmlinfsrv_connections_open" in out.get("metrics", {}):
        text += "; /metrics: %d connections open, %d handler threads" % (
            out["metrics"]["azmlinfsrv_connections_open"], out["metrics"].get("azmlinfsrv_handler_threads", -1))
    if kept:
        text += "; %d of %d kept-alive connections then answered a second request" % (
            reused, min(10, kept))
    if refused:
        text += "; problems: %s" % ", ".join(sorted(set(refused))[:5])
    out["text"] = text
    out["passed"] = bool(good) and out["probe_median_ms"] < IDLE_PROBE_GOAL_MS and not refused
    return out


STUCK_STEPS = [
    # (label, method, body, status ours must answer)
    ("spin", "POST", b"spin", 500),
    ("next", "POST", b"hello", 200),
    ("block", "POST", b"block", 500),
    ("next", "POST", b"hello", 200),
    ("GET /", "GET", None, 200),
    ("block", "POST", b"block", 500),
    ("GET /", "GET", None, 503),
    ("next", "POST", b"hello", None),  # reported, not judged
]


def scenario_stuck(bench, srv, name):
    """worker_count 1, SCORING_TIMEOUT_MS=700: run() spins, blocks, blocks again; what comes after."""
    steps, ok = [], True
    for label, method, body, want in STUCK_STEPS:
        path = "/" if method == "GET" else "/score"
        status, data, secs = _timed_request(srv.port, method, path, body=body, timeout=STUCK_REQUEST_TIMEOUT,
                                            headers={"Content-Type": "text/plain"} if body else None)
        steps.append({"step": label, "status": status, "seconds": round(secs, 3),
                      "error": None if status else data})
        if want is not None and status != want:
            ok = False
    out = {"steps": steps}
    if name == OURS:
        m = scrape_metrics(srv.port)
        if "azmlinfsrv_runs_stuck" in m:
            out["runs_stuck"] = int(m["azmlinfsrv_runs_stuck"])
    out["text"] = ", ".join(
        "%s %s" % (s["step"], ("%d (%.1f s)" % (s["status"], s["seconds"]) if s["seconds"] >= 0.3 else s["status"])
                   if s["status"] else "no answer (%.0f s)" % s["seconds"])
        for s in steps) + (
        "; /metrics azmlinfsrv_runs_stuck %d" % out["runs_stuck"] if "runs_stuck" in out else "")
    out["passed"] = ok
    return out


SCENARIOS = [
    Scenario("upload-50MB", "upload.py", scenario_upload,
             ours_args=["--worker_count", "1"], ref_args=["--worker_count", "1"],
             summary="%d clients at once each POST a %d MiB JSON body; run() returns its length"
                     % (UPLOAD_CLIENTS, UPLOAD_BYTES // 2 ** 20)),
    Scenario("idle-1000", "hello.py", scenario_idle, ours_args=IDLE_OURS_ARGS,
             summary="%d connections after one keep-alive request + %d silent ones, then POST /score"
                     % (IDLE_TALKED, IDLE_SILENT)),
    Scenario("stuck-run", "stuck.py", scenario_stuck,
             ours_args=["--worker_count", "1"], ref_args=["--worker_count", "1"],
             env={"SCORING_TIMEOUT_MS": str(STUCK_TIMEOUT_MS)},
             summary="worker_count 1, SCORING_TIMEOUT_MS=%d: run() spins, blocks, blocks again"
                     % STUCK_TIMEOUT_MS),
]


# ---------------------------------------------------------------------------
# Targets and report
# ---------------------------------------------------------------------------

def _fmt_ratio(x):
    return "%.2fx" % x if x is not None else "n/a"


def evaluate(bench, plan):
    """[(target, value text, verdict)] and [(figure, value text)]."""
    s = bench.summary
    targets, figures = [], []

    def verdict(ok):
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    def ratio(a, b, key="rps"):
        return a[key] / b[key] if a and b and b[key] else None

    for label, mode, goal in (("hello keep-alive @64: ours/ref req/s", KA, HELLO_KA_GOAL),
                              ("hello Connection: close @64: ours/ref req/s", CLOSE, 2.0)):
        x = ratio(s("hello", 64, mode, OURS), s("hello", 64, mode, REF))
        targets.append((label + " >= %gx" % goal, _fmt_ratio(x), verdict(None if x is None else x >= goal)))

    worse, compared = [], 0
    for w, points in plan:
        for conns, mode in points:
            if conns != 64:
                continue
            o, r = s(w.name, 64, mode, OURS), s(w.name, 64, mode, REF)
            if o and r:
                compared += 1
                if o["p99_ms"] > r["p99_ms"]:
                    worse.append("%s %s (%.1f > %.1f ms)" % (w.name, mode, o["p99_ms"], r["p99_ms"]))
    targets.append(("p99 @64 no higher than ref, every workload",
                    ("%d/%d points ok" % (compared - len(worse), compared))
                    + ("; worse: " + ", ".join(worse) if worse else ""),
                    verdict(None if not compared else not worse)))

    x = ratio(s("echo-1MB", 64, KA, OURS), s("echo-1MB", 64, KA, REF))
    targets.append(("echo-1MB keep-alive @64: ours/ref req/s >= 1x", _fmt_ratio(x),
                    verdict(None if x is None else x >= 1.0)))

    x = ratio(s("sleep-20ms wc8", 64, KA, OURS), s("sleep-20ms wc1", 64, KA, OURS))
    targets.append(("sleep-20ms @64: ours wc8/wc1 >= 6x", _fmt_ratio(x), verdict(None if x is None else x >= 6.0)))

    kb = {name: bench.rss_kb.get(("echo-1MB", name)) for name in (OURS, REF)}
    x = kb[OURS] / float(kb[REF]) if kb[OURS] and kb[REF] else None
    targets.append(("echo-1MB @64: ours/ref peak RSS <= %gx" % ECHO_RSS_GOAL,
                    _fmt_ratio(x) + (" (%.1f / %.1f MiB)" % (kb[OURS] / 1024.0, kb[REF] / 1024.0) if x else ""),
                    verdict(None if x is None else x <= ECHO_RSS_GOAL)))

    up = bench.scenarios.get("upload-50MB", {})
    uo, ur = up.get(OURS), up.get(REF)
    x = (uo["peak_rss_kb"] / float(ur["peak_rss_kb"])
         if uo and ur and uo.get("peak_rss_kb") and ur.get("peak_rss_kb") else None)
    text = _fmt_ratio(x)
    if x is not None:
        text += " (%.1f / %.1f MiB" % (uo["peak_rss_kb"] / 1024.0, ur["peak_rss_kb"] / 1024.0)
        text += "; 200s %d/%d and %d/%d)" % (uo["ok"], uo["clients"], ur["ok"], ur["clients"])
    elif uo and "peak_rss_kb" in uo:
        text += " (ours %.1f MiB, %d/%d answered 200; no reference)" % (uo["peak_rss_kb"] / 1024.0, uo["ok"],
                                                                       uo["clients"])
    targets.append(("upload-50MB x%d: ours/ref peak RSS <= %gx, all 200" % (UPLOAD_CLIENTS, UPLOAD_RSS_GOAL), text,
                    verdict(None if x is None else (x <= UPLOAD_RSS_GOAL and uo.get("passed", False)))))

    io = bench.scenarios.get("idle-1000", {}).get(OURS)
    if io and "probe_ms" in io:
        text = ("%.1f ms (median of %d; first %.1f ms)" % (io["probe_median_ms"], io["probe_ok"], io["probe_ms"][0])
                if io["probe_median_ms"] is not None else "no 200 answer (%s)" % io["probe_status"])
        targets.append(("idle-1000: then a normal POST /score < %g ms" % IDLE_PROBE_GOAL_MS, text,
                        verdict(io["passed"])))
        targets.append(("idle-1000: ours' threads with 1000 idle <= %d" % IDLE_THREADS_GOAL,
                        "%d (peak %d while opening; %d before)" % (io["threads_with_idle"], io["threads_peak"],
                                                                  io["threads_before"]),
                        verdict(None if not io["threads_with_idle"] else io["threads_with_idle"] <= IDLE_THREADS_GOAL)))
    else:
        targets.append(("idle-1000: then a normal POST /score < %g ms" % IDLE_PROBE_GOAL_MS,
                        io["text"] if io else "n/a", verdict(False if io else None)))
        targets.append(("idle-1000: ours' threads with 1000 idle <= %d" % IDLE_THREADS_GOAL, "n/a", "n/a"))

    so = bench.scenarios.get("stuck-run", {}).get(OURS)
    targets.append(("stuck-run: 200 after spin/block, GET / 503 past bound",
                    so["text"] if so else "n/a", verdict(so["passed"] if so else None)))

    o1 = s("hello", 1, KA, OURS)
    a1 = s("hello", 1, KA, CEIL_ASYNC)
    text = "%.3f ms" % o1["p50_ms"] if o1 else "n/a"
    if o1 and a1:
        text += " (asyncio ceiling %.3f ms; ours above it by %.3f ms)" % (a1["p50_ms"], o1["p50_ms"] - a1["p50_ms"])
    targets.append(("hello keep-alive @1: ours server p50 <= 0.3 ms", text,
                    verdict(None if not o1 else o1["p50_ms"] <= 0.3)))

    o64 = s("hello", 64, KA, OURS)
    x = ratio(o64, s("hello", 64, KA, CEIL_HTTP))
    targets.append(("hello keep-alive @64: ours/http.server ceiling >= 60%",
                    "%.0f%%" % (100 * x) if x is not None else "n/a", verdict(None if x is None else x >= 0.6)))

    # Figures without a target.
    x = ratio(o64, s("hello", 64, KA, CEIL_ASYNC))
    figures.append(("hello keep-alive @64: ours/asyncio ceiling", "%.0f%%" % (100 * x) if x is not None else "n/a"))
    r1 = s("hello", 1, KA, REF)
    figures.append(("hello keep-alive @1: ref p50", "%.3f ms" % r1["p50_ms"] if r1 else "n/a"))
    figures.append(("sleep-20ms @64: ref wc8/wc1",
                    _fmt_ratio(ratio(s("sleep-20ms wc8", 64, KA, REF), s("sleep-20ms wc1", 64, KA, REF)))))
    figures.append(("cpu-5ms @64: ours processes2/processes1",
                    _fmt_ratio(ratio(s("cpu-5ms p2", 64, KA, OURS), s("cpu-5ms p1", 64, KA, OURS)))))
    figures.append(("cpu-5ms @64: ref wc2/wc1",
                    _fmt_ratio(ratio(s("cpu-5ms p2", 64, KA, REF), s("cpu-5ms p1", 64, KA, REF)))))
    for name in (OURS, REF):
        kb = bench.rss_kb.get(("echo-1MB", name))
        figures.append(("echo-1MB: peak RSS of %s (VmHWM, process tree)" % name,
                        "%.1f MiB" % (kb / 1024.0) if kb else "n/a"))
    if uo and ur and uo.get("total_s") and ur.get("total_s"):
        figures.append(("upload-50MB: total time ours/ref",
                        "%s (%.1f / %.1f s)" % (_fmt_ratio(uo["total_s"] / ur["total_s"]), uo["total_s"],
                                                ur["total_s"])))
    return targets, figures


def scenario_rows(bench):
    """[(scenario, what it does, server, result text)] for the scenarios that ran."""
    rows = []
    for sc in SCENARIOS:
        for name in (OURS, REF):
            out = bench.scenarios.get(sc.name, {}).get(name)
            if out:
                rows.append((sc.name, sc.summary, name, out["text"]))
            elif (sc.name, name) in bench.skipped:
                rows.append((sc.name, sc.summary, name, "skipped: " + bench.skipped[(sc.name, name)]))
    return rows


def render(bench, plan, meta):
    rows = bench.rows(plan)
    header = ["workload", "conns", "mode", "server", "req/s", "p50 ms", "p99 ms", "errors", "vs ref"]
    table = []
    for wname, conns, mode, name, s, ratio in rows:
        if s is None:
            why = "skipped" if (wname, name) in bench.skipped else "failed"
            table.append([wname, str(conns), mode, name, why, "", "", "", ""])
            continue
        table.append([wname, str(conns), mode, name, "%.0f" % s["rps"], "%.2f" % s["p50_ms"],
                      "%.2f" % s["p99_ms"], "%d/%d" % (s["errors"], s["requests"]) if s["errors"] else "0",
                      _fmt_ratio(ratio) if name != REF else ""])
    targets, figures = evaluate(bench, plan)
    return header, table, targets, figures, scenario_rows(bench)


def print_report(header, table, targets, figures, meta, scenarios=()):
    widths = [max(len(header[i]), *(len(r[i]) for r in table)) if table else len(header[i])
              for i in range(len(header))]
    right = {1, 4, 5, 6, 7, 8}

    def line(cells):
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells))

    print()
    print("Medians of %d alternating round(s) of %g s; %s." % (meta["rounds"], meta["duration"], meta["pinning"]))
    print("Latency: %s." % meta["latency"])
    print(line(header))
    print("  ".join("-" * w for w in widths))
    prev = None
    for r in table:
        if prev is not None and (r[0], r[1], r[2]) != prev:
            print()
        prev = (r[0], r[1], r[2])
        print(line(r))
    if scenarios:
        print()
        print("Scenarios (one run each, servers started one at a time)")
        prev = None
        for sc, summary, name, text in scenarios:
            if sc != prev:
                print("  %s: %s" % (sc, summary))
                prev = sc
            print("    %-4s  %s" % (name, text))
    print()
    print("Targets")
    for label, value, verdict in targets:
        print("  %-4s  %-52s %s" % (verdict, label, value))
    print()
    print("Other figures")
    for label, value in figures:
        print("        %-52s %s" % (label, value))


def write_markdown(path, header, table, targets, figures, meta, scenarios=()):
    with open(path, "w") as f:
        f.write("# azmlinfsrv.py benchmark\n\n")
        f.write("%s. ours %s; wrk %s, reference %s (%s), Python %s, %d CPUs (%s). Medians of %d alternating "
                "round(s) of %g s per point; %s.\n\n" % (
                    meta["date"], meta["ours"], meta["wrk"], meta["ref_version"], REF_PACKAGE.split("==")[0],
                    meta["python"], meta["ncpu"], meta["cpu_model"], meta["rounds"], meta["duration"],
                    meta["pinning"]))
        f.write("Latency: %s.\n\n" % meta["latency"])
        if meta.get("noisy"):
            f.write("**Warning:** %s\n\n" % meta["noisy"])
        f.write("## Targets\n\n| verdict | target | measured |\n| --- | --- | --- |\n")
        for label, value, verdict in targets:
            f.write("| %s | %s | %s |\n" % (verdict, label, value.replace("|", "/")))
        f.write("\n## Other figures\n\n| figure | value |\n| --- | --- |\n")
        for label, value in figures:
            f.write("| %s | %s |\n" % (label, value))
        if scenarios:
            f.write("\n## Scenarios\n\nOne run each, the servers started one at a time.\n\n"
                    "| scenario | what it does | server | result |\n| --- | --- | --- | --- |\n")
            for sc, summary, name, text in scenarios:
                f.write("| %s | %s | %s | %s |\n" % (sc, summary, name, text.replace("|", "/")))
        if table:
            f.write("\n## All points\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        for r in table:
            f.write("| " + " | ".join(c.replace("|", "/") for c in r) + " |\n")
        if meta.get("skipped"):
            f.write("\n## Skipped\n\n")
            for (w, name), reason in sorted(meta["skipped"].items()):
                f.write("- %s on %s: %s\n" % (name, w, reason))


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _csv(kind):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        return [int(t) for t in items] if kind is int else items
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Benchmark azmlinfsrv.py against the reference azmlinfsrv and two ceilings with wrk.",
        epilog="Workloads (wrk): " + ", ".join(sorted({w.family for w in WORKLOADS}, key=str.lower))
        + ". Scenarios (Python clients): " + ", ".join(sc.name for sc in SCENARIOS)
        + ". See bench/README.md for the targets.")
    p.add_argument("--quick", action="store_true", help="fewer points, 1 round of 3 s (about 3 minutes)")
    p.add_argument("--duration", type=float, help="seconds per wrk run (default 4, --quick 3)")
    p.add_argument("--rounds", type=int, help="alternating rounds per point; medians are reported (default 3, --quick 1)")
    p.add_argument("--workloads", type=_csv(str), help="comma-separated workload and scenario names "
                   "(default: all)")
    p.add_argument("--connections", type=_csv(int), help="comma-separated connection counts for every workload "
                   "(default: a per-workload plan drawn from 1,8,64)")
    p.add_argument("--modes", type=_csv(str), help="comma-separated: keep-alive,close (default: per-workload plan)")
    p.add_argument("--ours", default=DEFAULT_OURS, help="path to azmlinfsrv.py (default: %(default)s)")
    p.add_argument("--python", default=sys.executable, help="interpreter for ours (default: this one)")
    p.add_argument("--no-ours", action="store_true", help="measure only the reference and the ceilings")
    p.add_argument("--ref", help="path to the reference azmlinfsrv executable")
    p.add_argument("--ref-venv", help="venv to find or create the reference in "
                   "(default: ~/.cache/azmlinfsrv-bench/ref-venv)")
    p.add_argument("--no-ref", action="store_true", help="do not run the reference (no ratios)")
    p.add_argument("--no-ceilings", action="store_true", help="do not run the two ceiling servers")
    p.add_argument("--no-pin", action="store_true", help="do not pin the server and wrk to different CPUs")
    p.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown")
    p.add_argument("--json", metavar="FILE", help="also write every run's raw numbers as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 4.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.modes:
        bad = [m for m in args.modes if m not in (KA, CLOSE)]
        if bad:
            p.error("unknown mode(s) %s; use keep-alive and/or close" % ",".join(bad))
    if args.workloads:
        known = ({w.name.lower() for w in WORKLOADS} | {w.family.lower() for w in WORKLOADS}
                 | {sc.name.lower() for sc in SCENARIOS})
        bad = [n for n in args.workloads if n.lower() not in known]
        if bad:
            p.error("unknown workload(s) %s; known: %s" % (",".join(bad), ", ".join(sorted(known))))
    if args.connections and any(c < 1 for c in args.connections):
        p.error("connection counts must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    workloads, scenarios = WORKLOADS, SCENARIOS
    if args.workloads:
        wanted = {n.lower() for n in args.workloads}
        workloads = [w for w in WORKLOADS if w.name.lower() in wanted or w.family.lower() in wanted]
        scenarios = [sc for sc in SCENARIOS if sc.name.lower() in wanted]
    wrk_version = require_wrk() if workloads else "not used"
    if scenarios:
        raise_nofile(4 * (IDLE_TALKED + IDLE_SILENT) + 1024)

    if args.no_ours:
        args.ours = None
    elif not os.path.isfile(args.ours):
        print("NOTE: %s not found; measuring only the reference and the ceilings." % args.ours)
        args.ours = None
    ref_exe = None if args.no_ref else find_or_install_ref(args)
    version = ref_version(ref_exe) if ref_exe else "not run"

    plan = build_plan(workloads, args)

    layout = cpu_layout(args.no_pin)
    if layout[0]:
        pinning = "server on CPU %s, wrk on CPU %s (cpu-5ms servers on CPUs %s)" % layout[:3]
    else:
        pinning = "no CPU pinning (%s)" % ("--no-pin" if args.no_pin else "needs taskset and 2 CPUs")
    cpu_iters = calibrate_cpu_iters() if any(w.family == "cpu-5ms" for w in workloads) else 0

    ours_id = ours_version(args.python, args.ours) if args.ours else "not run"
    print("ours: %s (%s)" % (args.ours or "not run", ours_id))
    print("ref:  %s (version %s)" % (ref_exe or "not run", version))
    print("wrk:  %s; %s" % (wrk_version, pinning))
    if cpu_iters:
        print("cpu-5ms: %d loop iterations per request (calibrated here to ~5 ms)" % cpu_iters)

    logdir = tempfile.mkdtemp(prefix="azmlinfsrv-bench-")
    print("server logs: %s" % logdir, flush=True)
    bench = Bench(args, ref_exe, layout, logdir, cpu_iters)
    t0 = time.monotonic()
    try:
        bench.run(plan, scenarios)
    except KeyboardInterrupt:
        print("\ninterrupted; reporting what was measured", flush=True)
    elapsed = time.monotonic() - t0

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wrk": wrk_version.split()[1] if workloads and len(wrk_version.split()) > 1 else wrk_version,
        "ref_version": version, "ours": ours_id, "python": platform.python_version(), "ncpu": len(layout[3]),
        "cpu_model": _cpu_model(), "rounds": args.rounds, "duration": args.duration,
        "pinning": pinning, "skipped": bench.skipped, "elapsed_s": round(elapsed),
        "noisy": bench.noise_note(),
        "latency": bench.latency_note(),
    }
    header, table, targets, figures, scen = render(bench, plan, meta)
    print_report(header, table, targets, figures, meta, scen)
    if bench.skipped:
        print()
        print("Skipped")
        for (w, name), reason in sorted(bench.skipped.items()):
            print("  %s on %s: %s" % (name, w, reason))
    if meta["noisy"]:
        print("\nWARNING: " + meta["noisy"])
    print("\nTook %.1f min. Server logs: %s" % (elapsed / 60, logdir))
    if args.markdown:
        write_markdown(args.markdown, header, table, targets, figures, meta, scen)
        print("Markdown report: %s" % args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {k: v for k, v in meta.items() if k != "skipped"},
                       "skipped": ["%s on %s: %s" % (n, w, r) for (w, n), r in bench.skipped.items()],
                       "servers": {"%s | %s" % k: v for k, v in bench.started.items()},
                       "runs": [{"workload": k[0], "conns": k[1], "mode": k[2], "server": k[3], "runs": v}
                                for k, v in bench.results.items()],
                       "scenarios": bench.scenarios,
                       "targets": targets, "figures": figures}, f, indent=1, default=str)
        print("JSON: %s" % args.json)
    if args.strict and any(v == "FAIL" for _, _, v in targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
