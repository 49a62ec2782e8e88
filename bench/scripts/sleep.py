"""Benchmark workload `sleep-20ms`: run() blocks for 20 ms without using the CPU (I/O-bound model)."""

import time


def init():
    pass


def run(data):
    time.sleep(0.02)
    return {"slept_ms": 20}
