"""Benchmark workload `upload-50MB`: answer with the length of the body, not the body."""


def init():
    pass


def run(data):
    return {"length": len(data)}
