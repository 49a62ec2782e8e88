"""Benchmark workload `stuck-run`: run() that never returns, two ways.

The body ``block`` waits on an Event nobody sets (blocked in C, like a deadlock);
``spin`` loops forever in Python (like an infinite loop); anything else is
answered at once.
"""

import threading


def init():
    pass


def run(data):
    command = data.strip() if isinstance(data, str) else ""
    if command == "block":
        threading.Event().wait()
    elif command == "spin":
        while True:
            pass
    return {"ok": True}
