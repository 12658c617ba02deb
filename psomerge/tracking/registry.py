"""The MLflow model registry: where tracking points, registered versions with lineage tags,
aliases ``candidate`` and ``champion``, and the promotion gate.

Embedded default: a SQLite store and an artifact folder under the data directory. Set
``MLFLOW_TRACKING_URI`` to use a tracking server instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from psomerge.paths import data_dir

CANDIDATE, CHAMPION = "candidate", "champion"
HELDOUT_TAG = "heldout_score"


def configure(experiment: str = "psomerge") -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI or the embedded store; return the experiment id."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        root = data_dir()
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        artifact_location = None if os.environ.get("MLFLOW_TRACKING_URI") else (data_dir() / "mlartifacts").resolve().as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=artifact_location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def register_version(model_dir: Path, name: str, heldout_score: float, lineage: dict[str, Any]) -> str:
    """Log the model folder to the active run, register it as a new version of ``name``,
    tag it with its lineage and held-out score, and point alias ``candidate`` at it."""
    run = mlflow.active_run()
    mlflow.log_artifacts(str(model_dir), artifact_path="model")
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already registered
    tags = {**flatten(lineage), HELDOUT_TAG: repr(float(heldout_score))}
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                          tags=tags)
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return str(version.version)


def alias_score(name: str, alias: str) -> tuple[str, float | None] | None:
    """(version, held-out score) behind an alias; None when the alias is unset."""
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    raw = mv.tags.get(HELDOUT_TAG)
    try:
        score = float(raw) if raw is not None else None
    except ValueError:
        score = None
    return str(mv.version), score


def promote(name: str, margin: float = 0.0) -> dict[str, Any]:
    """Move ``champion`` to the candidate only if its held-out score beats the champion's by
    more than ``margin``. Ties and missing scores never promote."""
    candidate = alias_score(name, CANDIDATE)
    champion = alias_score(name, CHAMPION)
    decision: dict[str, Any] = {"candidate": candidate, "champion": champion, "promoted": False}
    if candidate is None or candidate[1] is None:
        decision["reason"] = "no candidate with a held-out score"
        return decision
    if champion is not None and champion[0] == candidate[0]:
        decision["reason"] = "the candidate is already the champion"
        return decision
    if champion is not None:
        if champion[1] is None:
            decision["reason"] = "the champion has no held-out score to compare with"
            return decision
        if not candidate[1] > champion[1] + margin:
            decision["reason"] = f"held-out {candidate[1]:.4f} does not beat champion {champion[1]:.4f} + margin {margin}"
            return decision
    MlflowClient().set_registered_model_alias(name, CHAMPION, candidate[0])
    decision["promoted"] = True
    decision["reason"] = "first champion" if champion is None else f"held-out {candidate[1]:.4f} > {champion[1]:.4f} + {margin}"
    return decision


def download(uri: str, dst: Path | None = None) -> Path:
    """A registered model as a local folder (``models:/NAME@champion``)."""
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))
