"""An example score script baked into a derived image: reads its model from AZUREML_MODEL_DIR."""
import json
import os

model = None


def init():
    global model
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.json")) as handle:
        model = json.load(handle)
    print("model loaded:", model)


def run(data):
    x = json.loads(data)["x"]
    return {"prediction": model["weight"] * x + model["bias"]}
