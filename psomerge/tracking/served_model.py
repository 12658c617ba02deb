"""The code of a registered merged model (MLflow "models from code"): MLflow copies this file
into the model and runs it when the model loads. Only loading runs it; nothing imports it."""

from mlflow.models import set_model

from psomerge.tracking.pyfunc import MergedModel

set_model(MergedModel())
