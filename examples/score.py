"""A minimal score script: init() loads the model once, run() answers each request."""
import json
import os

model = None


def init():
    global model
    # AZUREML_MODEL_DIR points at the model folder (--model_dir); this example needs no files.
    model_dir = os.getenv("AZUREML_MODEL_DIR", ".")
    model = {"bias": 1.0, "source": model_dir}
    print("model loaded from", model_dir)


def run(data):
    payload = json.loads(data) if data else {}
    x = payload.get("x", 0)
    return {"input": x, "prediction": x * 2 + model["bias"]}
