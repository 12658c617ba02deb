"""The MLflow model registry: where tracking points, registered versions with lineage tags,
aliases ``candidate`` and ``champion``, and the promotion gate.

Embedded default: a SQLite store and an artifact folder under the data directory. Set
``MLFLOW_TRACKING_URI`` to use a tracking server instead.

A registered version is an MLflow model (``psomerge.tracking.pyfunc``): the merged checkpoint
and a pyfunc answering prompts. A version is registered once per model: a run that produced
the same model (same basis, same coefficients, same served generation settings) reuses it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from psomerge.evaluation.gate import GateScores, decide
from psomerge.hashing import digest
from psomerge.paths import data_dir
from psomerge.swarm.cache import particle_key
from psomerge.tracking.pyfunc import CHECKPOINT, log_merged_model, served_settings

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
HELDOUT_TAG = "heldout_score"
GATE_ARTIFACT = "gate/scores.json"  # per-example scores of a registered model on its gate split
MODEL_KEY_TAG = "model_key"
SERVER_SCHEMES = ("http", "https", "databricks")  # tracking servers choose where artifacts go


def configure(experiment: str = "psomerge") -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI or the embedded store; return the experiment id.

    Unless a tracking server keeps them, a new experiment's artifacts go under
    ``$PSOMERGE_HOME/mlartifacts``: MLflow's own default for a database store is ``./mlruns``
    of the working directory. (The choice is made from the URI, not from whether
    ``MLFLOW_TRACKING_URI`` is set: ``mlflow.set_tracking_uri`` exports that variable.)
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        root = data_dir()
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    local_artifacts = None if uri.split(":", 1)[0] in SERVER_SCHEMES else (data_dir() / "mlartifacts").resolve()
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=local_artifacts and local_artifacts.as_uri())
    else:
        exp_id = exp.experiment_id
        if local_artifacts and not exp.artifact_location.removeprefix("file://").startswith(str(local_artifacts)):
            log.warning("MLflow experiment %r keeps its artifacts in %s (created so by an earlier version); new "
                        "experiments keep them in %s", experiment, exp.artifact_location, local_artifacts)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys for MLflow params and tags; a list of sections (suites) by position, so each
    value stays short (MLflow cuts params at 6000 characters)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def model_key(basis_fingerprint: str, coefficients: np.ndarray, generation) -> str:
    """What makes two registered models the same: the basis, the coefficients rounded as the
    fitness cache rounds them, and the decoding the served model applies."""
    decoding = {k: v for k, v in served_settings(generation).items() if k != "batch_size"}
    return particle_key(basis_fingerprint, coefficients, "served:" + digest(decoding))


@dataclass(frozen=True)
class RegisteredVersion:
    version: str
    reused: bool  # an existing version of the same model (same model key), not a new one


def find_version(name: str, key: str) -> str | None:
    """The version of ``name`` registered with model key ``key``, if any."""
    found = MlflowClient().search_model_versions(f"name = '{name}' and tags.{MODEL_KEY_TAG} = '{key}'")
    return str(min(int(v.version) for v in found)) if found else None


def register_version(model_dir: Path, name: str, heldout_score: float, lineage: dict[str, Any], key: str,
                     generation, gate: GateScores | None = None) -> RegisteredVersion:
    """Register the model folder as a version of ``name`` (an MLflow model logged to the
    active run, tagged with its lineage, held-out score and model key, with the per-example
    scores the promotion gate compares) and point alias ``candidate`` at it; a model
    registered before under the same key is reused instead."""
    client = MlflowClient()
    if gate is not None:
        mlflow.log_dict(gate.as_dict(), GATE_ARTIFACT)
    existing = find_version(name, key)
    if existing is not None:
        stored = stored_score(client.get_model_version(name, existing))
        if stored is not None and stored != float(heldout_score):
            log.warning("model %s version %s is this run's model; it keeps its held-out score %s (this run "
                        "measured %s)", name, existing, stored, heldout_score)
        client.set_registered_model_alias(name, CANDIDATE, existing)
        return RegisteredVersion(existing, reused=True)
    model_uri = log_merged_model(model_dir, generation)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {**flatten(lineage), HELDOUT_TAG: repr(float(heldout_score)), MODEL_KEY_TAG: key}
    if gate is not None:
        tags.update({"gate_split": gate.split, "gate_fingerprint": gate.fingerprint, "gate_score": repr(gate.score),
                     "gate_examples": str(gate.num_examples)})
    version = client.create_model_version(name, source=model_uri, run_id=mlflow.active_run().info.run_id, tags=tags,
                                          model_id=model_uri.removeprefix("models:/"))
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    return RegisteredVersion(str(version.version), reused=False)


def stored_score(mv) -> float | None:
    """A model version's held-out score; None when missing or unreadable."""
    raw = mv.tags.get(HELDOUT_TAG)
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def gate_scores(mv) -> GateScores | None:
    """The per-example scores a version was registered with (None for versions registered
    before psomerge kept them, or whose run lost them)."""
    if mv.run_id is None:
        return None
    try:
        data = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{GATE_ARTIFACT}")
    except (MlflowException, OSError):
        return None
    return GateScores(**data)


def promote(name: str, margin: float = 0.0, confidence: float = 0.95,
            rescore: Callable[[Path], GateScores] | None = None) -> dict[str, Any]:
    """Move ``champion`` to the candidate only if it beats the champion on the same examples
    by more than ``margin``, beyond noise (paired bootstrap, one-sided ``confidence``). Where
    the champion was measured on other examples, ``rescore`` (the candidate's run scoring a
    checkpoint folder on its own gate split) measures it again; without it they are not
    compared. Missing scores, ties and a candidate scored on no example never promote."""
    client = MlflowClient()
    candidate = _by_alias(client, name, CANDIDATE)
    champion = _by_alias(client, name, CHAMPION)
    decision: dict[str, Any] = {"candidate": candidate and str(candidate.version),
                                "champion": champion and str(champion.version), "promoted": False}
    if candidate is None:
        decision["reason"] = "no candidate"
        return decision
    if champion is not None and champion.version == candidate.version:
        decision["reason"] = "the candidate is already the champion"
        return decision
    ours = gate_scores(candidate)
    if ours is None:
        decision["reason"] = "the candidate has no per-example scores to compare"
        return decision
    theirs = gate_scores(champion) if champion is not None else None
    if champion is not None and (theirs is None or theirs.fingerprint != ours.fingerprint) and rescore is not None:
        folder = download(f"models:/{name}/{champion.version}")
        theirs = rescore(folder)
        decision["rescored_champion"] = True
    elif champion is not None and theirs is None:
        decision["reason"] = ("the champion has no per-example scores to compare with "
                              "(re-score it: promote with a config)")
        return decision
    outcome = decide(ours, theirs, margin, confidence)
    decision.update(promoted=outcome.promoted, reason=outcome.reason, difference=outcome.difference,
                    p_not_better=outcome.p_not_better)
    if outcome.promoted:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
    return decision


def _by_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download(uri: str, dst: Path | None = None) -> Path:
    """The checkpoint folder of a registered model (``models:/NAME@champion``), downloaded:
    loadable with ``AutoModelForCausalLM.from_pretrained``."""
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))
    if not (root / "MLmodel").exists():  # registered by psomerge before versions were MLflow models
        return root
    return root / Model.load(root / "MLmodel").flavors["python_function"]["artifacts"][CHECKPOINT]["path"]
