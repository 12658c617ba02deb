"""A merged model as an MLflow model: the checkpoint folder as an artifact, and a pyfunc that
answers prompts with psomerge's own transformers generation (greedy, batched, cut at the stop
strings) under the run's generation settings, so ``models:/NAME@champion`` loads with
``mlflow.pyfunc.load_model`` and serves with ``mlflow models serve``.

Prompts go in as they are: the caller fills the suite's prompt template (``psomerge.templates``).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

from psomerge.generation.settings import TransformersSettings

CHECKPOINT = "checkpoint"  # the artifact holding the Hugging Face checkpoint folder
MODEL_CODE = Path(__file__).with_name("served_model.py")  # models from code: no pickled object in the model


def served_settings(generation) -> dict[str, Any]:
    """The decoding settings the served model applies (a vLLM run's model serves with
    transformers: same greedy decoding, same length and stop strings)."""
    return {"max_new_tokens": generation.max_new_tokens, "stop": list(generation.stop),
            "batch_size": getattr(generation, "batch_size", TransformersSettings().batch_size)}


def requirements() -> list[str]:
    """What loading needs, pinned as installed here (given, so MLflow does not infer them by
    loading the model in a subprocess). psomerge itself must be importable where it loads."""
    # without a local build tag (torch's +cpu): the same release serves on a GPU host
    packages = ("mlflow", "torch", "transformers", "tokenizers", "safetensors")
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


class MergedModel(PythonModel):
    """Prompts in (a list of strings), answers out; the type hints are the model's signature."""

    def load_context(self, context) -> None:
        import torch

        from psomerge.generation import open_generator

        settings = TransformersSettings(**context.model_config)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = open_generator(settings, context.artifacts[CHECKPOINT], device)

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        return self.generator.generate(model_input)


def log_merged_model(model_dir: Path, generation) -> str:
    """Log ``model_dir`` as a pyfunc model of the active run; its ``models:/<id>`` URI."""
    info = mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE), artifacts={CHECKPOINT: str(model_dir)},
                                   model_config=served_settings(generation), pip_requirements=requirements())
    return info.model_uri
