"""Benchmark workload `rawhttp`: @rawhttp run() reading the body and answering raw bytes."""

from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

_BODY = b'{"message": "Hello, World!"}'


def init():
    pass


@rawhttp
def run(request):
    request.get_data()
    return AMLResponse(_BODY, 200, {"Content-Type": "application/json"})
