"""@rawhttp: run() receives the request itself and returns an AMLResponse."""
from azureml_inference_server_http.api.aml_request import AMLRequest, rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse


def init():
    pass


@rawhttp
def run(request: AMLRequest):
    if request.method == "GET":
        return AMLResponse({"query": request.args.to_dict()}, 200, json_str=True)
    if request.method == "POST":
        body = request.get_data()
        return AMLResponse(body[::-1], 200, {"Content-Type": "application/octet-stream"})
    return AMLResponse("method not supported", 405)
