"""Benchmark workload `hello`: the smallest possible scoring request."""


def init():
    pass


def run(data):
    return {"message": "Hello, World!"}
