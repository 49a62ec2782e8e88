"""Benchmark workloads `echo-1KB` / `echo-1MB`: parse the JSON body and return it."""

import json


def init():
    pass


def run(data):
    return json.loads(data)
