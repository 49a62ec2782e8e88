"""Benchmark workload `stream`: AMLResponse over a generator of 16 chunks of 1 KB."""

from azureml_inference_server_http.api.aml_response import AMLResponse

_CHUNK = b"x" * 1023 + b"\n"
_CHUNKS = 16


def init():
    pass


def run(data):
    def chunks():
        for _ in range(_CHUNKS):
            yield _CHUNK

    return AMLResponse(chunks(), 200, {"Content-Type": "application/octet-stream"})
