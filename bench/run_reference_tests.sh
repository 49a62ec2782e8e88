#!/usr/bin/env bash
# Run the reference repository's own black-box tests (tests/azmlinfsrv of microsoft/azureml-inference-server)
# against a server command, outside this repository.
#
# Usage:
#   bench/run_reference_tests.sh REF_CHECKOUT [ours|reference] [pytest args...]
#
#   REF_CHECKOUT  a checkout of microsoft/azureml-inference-server: a work tree with tests/azmlinfsrv, or a
#                 git directory (bare or .git; HEAD's tests/azmlinfsrv is exported with git archive).
#   ours          (default) their `azmlinfsrv` command runs `python3 $OURS "$@"`
#                 (OURS defaults to this repository's azmlinfsrv.py).
#   reference     their `azmlinfsrv` command is $REF_AZMLINFSRV
#                 (default ~/.cache/azmlinfsrv-bench/ref-venv/bin/azmlinfsrv), to get the baseline.
#
# Environment: OURS and REF_AZMLINFSRV (see above), WORK (scratch folder, default a new temp dir), VENV
# (the tests' venv, default $WORK/venv; reused when it exists). The venv gets what the tests import
# (pytest requests psutil) and what their score scripts import (inference-schema numpy); never the
# reference package.
#
# Two things in the copied tests are neutralised by a conftest.py this script adds next to them:
# - their autouse `free_port` fixture SIGTERMs *any* process on the machine holding port 5001; here it stops
#   only servers this pytest started, and the run happens in a private network namespace (unshare -rn) when
#   the machine allows it, so their fixed ports (5000, 5001, 5002, 8346, 8347) meet no one else's server;
# - `from azureml_inference_server_http import __version__` (the reference package itself, used only for
#   the expected x-ms-server-version) is answered by a stub module with the reference's version, 1.5.1.
set -euo pipefail

if [ $# -lt 1 ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
ref="$(cd "$1" && pwd)"
shift
target="ours"
if [ $# -gt 0 ] && { [ "$1" = "ours" ] || [ "$1" = "reference" ]; }; then
    target="$1"
    shift
fi
here="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-$(mktemp -d /tmp/refbb.XXXXXX)}"
VENV="${VENV:-$WORK/venv}"
mkdir -p "$WORK"

# The tests, fresh each run.
rm -rf "$WORK/tests"
mkdir -p "$WORK/tests"
if [ -d "$ref/tests/azmlinfsrv" ]; then
    cp -r "$ref/tests/azmlinfsrv" "$WORK/tests/"
else
    git --git-dir="$ref" archive HEAD tests/azmlinfsrv | tar -x -C "$WORK"
fi
suite="$WORK/tests/azmlinfsrv"
cat > "$suite/scenarios/conftest.py" <<'EOF'
# Added by run_reference_tests.sh (not part of the reference's tests).
import sys
import types

import pytest

try:
    import azureml_inference_server_http  # noqa: F401  (the real package, if someone installed it)
except ImportError:
    stub = types.ModuleType("azureml_inference_server_http")
    stub.__version__ = "1.5.1"  # the reference version these tests were written for
    sys.modules["azureml_inference_server_http"] = stub


@pytest.fixture(autouse=True)
def free_port():
    """Overrides the suite's fixture, which SIGTERMs whatever process on the machine holds port 5001.

    Its purpose stays (a test that failed before its cleanup() leaves a server on 5001 that the next test
    would meet), limited to the servers this pytest started: its own descendants, stopped and waited for.
    """
    import psutil

    holders = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(c.laddr and c.laddr.port == 5001 for c in proc.connections(kind="inet")):
                holders.append(proc)
        except psutil.Error:
            pass
    for proc in holders:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    gone, alive = psutil.wait_procs(holders, timeout=10)
    for proc in alive:
        proc.kill()
EOF

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check pytest requests psutil inference-schema numpy
fi

# Their SERVER_COMMAND is "azmlinfsrv", found on PATH.
mkdir -p "$WORK/bin"
if [ "$target" = "ours" ]; then
    ours="$(cd "$(dirname "${OURS:-$here/azmlinfsrv.py}")" && pwd)/$(basename "${OURS:-azmlinfsrv.py}")"
    printf '#!/bin/sh\nexec python3 %q "$@"\n' "$ours" > "$WORK/bin/azmlinfsrv"
else
    refcmd="${REF_AZMLINFSRV:-$HOME/.cache/azmlinfsrv-bench/ref-venv/bin/azmlinfsrv}"
    [ -x "$refcmd" ] || { echo "reference command not found: $refcmd (set REF_AZMLINFSRV)" >&2; exit 2; }
    # Their swagger score script imports numpy; an installed reference venv may not have it. Lend it the
    # tests' numpy (same interpreter version assumed), and nothing else.
    extra=""
    refpy="$(dirname "$refcmd")/python"
    if ! "$refpy" -c "import numpy" 2>/dev/null; then
        extra="$WORK/ref-extra"
        rm -rf "$extra"
        mkdir -p "$extra"
        site="$("$VENV/bin/python" -c 'import numpy, os; print(os.path.dirname(os.path.dirname(numpy.__file__)))')"
        for name in numpy numpy.libs; do
            [ -e "$site/$name" ] && ln -s "$site/$name" "$extra/$name"
        done
    fi
    printf '#!/bin/sh\n%sexec %q "$@"\n' "${extra:+PYTHONPATH=$extra${PYTHONPATH:+:$PYTHONPATH} }" "$refcmd" \
        > "$WORK/bin/azmlinfsrv"
fi
chmod +x "$WORK/bin/azmlinfsrv"
export PATH="$WORK/bin:$VENV/bin:$PATH"
unset AZUREML_ENTRY_SCRIPT AZUREML_MODEL_DIR AML_APP_ROOT AZUREML_DEBUG_PORT

echo "target: $target ($(cat "$WORK/bin/azmlinfsrv" | tail -1)); tests: $suite; venv: $VENV" >&2
cd "$suite"
run=(python -m pytest scenarios -p no:cacheprovider -rA -q "$@")
if unshare -rn true 2>/dev/null; then
    exec unshare -rn sh -c 'ip link set lo up 2>/dev/null || true; exec "$@"' sh "${run[@]}"
fi
echo "unshare -rn is not available: running on the shared network (ports 5000-5002, 8346, 8347)" >&2
exec "${run[@]}"
