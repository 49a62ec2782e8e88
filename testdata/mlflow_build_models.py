"""Build the small MLflow models the MLflow tests and bench/compare_mlflow.py serve (no downloads).

Run with a Python that has mlflow-skinny, scikit-learn, pandas and numpy (the venv .ci/run makes):
    python testdata/mlflow_build_models.py OUT_FOLDER
Writes OUT_FOLDER/<name>/ for each model: table (a scikit-learn classifier on a table, with a signature and
an input example), tensor (a regressor on a float array, signature and example), params (a PythonModel with
a parameter schema that answers a table, or a dict when asked), nosig (a classifier without signature or
example).
"""

import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("MLFLOW_TRACKING_URI", "file:///nonexistent-no-tracking")

import mlflow.pyfunc  # noqa: E402
import mlflow.sklearn  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.models import infer_signature  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression  # noqa: E402


class Scaler(mlflow.pyfunc.PythonModel):
    """Multiplies every column by params["multiplier"]; params["as_dict"] answers {column: [values]}."""

    def predict(self, context, model_input, params=None):
        params = params or {}
        out = model_input * float(params.get("multiplier", 1.0))
        if params.get("as_dict"):
            return {c: out[c].tolist() for c in out.columns}
        return out


class RowSum(mlflow.pyfunc.PythonModel):
    """Named tensors: x (rows of 2) and y (one per row); answers x's row sums plus y."""

    def predict(self, context, model_input, params=None):
        return model_input["x"].sum(axis=1) + model_input["y"]


def main(out):
    rng = np.random.RandomState(0)
    table = pd.DataFrame(rng.rand(40, 3), columns=["a", "b", "c"])
    labels = (table["a"] + table["b"] > 1.0).astype("int64")
    classifier = LogisticRegression().fit(table, labels)
    mlflow.sklearn.save_model(classifier, os.path.join(out, "table"),
                              signature=infer_signature(table, classifier.predict(table)),
                              input_example=table.head(2), serialization_format="cloudpickle")

    x = rng.rand(30, 3)
    y = x @ np.array([1.0, 2.0, 3.0]) + 0.5
    regressor = LinearRegression().fit(x, y)
    mlflow.sklearn.save_model(regressor, os.path.join(out, "tensor"),
                              signature=infer_signature(x, regressor.predict(x)), input_example=x[:2], serialization_format="cloudpickle")

    sample = pd.DataFrame({"x": [1.0, 2.0], "y": [3.0, 4.0]})
    params = {"multiplier": 1.0, "as_dict": False}
    mlflow.pyfunc.save_model(os.path.join(out, "params"), python_model=Scaler(),
                             signature=infer_signature(sample, sample, params=params), input_example=sample)

    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    named = ModelSignature(inputs=Schema([TensorSpec(np.dtype("float64"), (-1, 2), "x"),
                                          TensorSpec(np.dtype("float64"), (-1,), "y")]),
                           outputs=Schema([TensorSpec(np.dtype("float64"), (-1,))]))
    mlflow.pyfunc.save_model(os.path.join(out, "named"), python_model=RowSum(), signature=named)

    mlflow.sklearn.save_model(classifier, os.path.join(out, "nosig"), serialization_format="cloudpickle")


if __name__ == "__main__":
    main(sys.argv[1])
