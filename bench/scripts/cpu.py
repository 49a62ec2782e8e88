"""Benchmark workload `cpu-5ms`: run() burns about 5 ms of CPU in pure Python, holding the GIL.

bench.py calibrates the loop once and passes the same count to every server in
BENCH_CPU_ITERS, so all servers do identical work per request.
"""

import os

_ITERS = int(os.environ.get("BENCH_CPU_ITERS", "50000"))


def init():
    pass


def _burn(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def run(data):
    return {"iterations": _ITERS, "checksum": _burn(_ITERS)}
