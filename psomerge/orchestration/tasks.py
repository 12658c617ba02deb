"""Prefect tasks of a run, and ``PrefectScoring``: the pipeline's scoring seam as tasks.

Only small things cross task boundaries: the run config as JSON, coefficient lists, paths
and fingerprints. Each worker process builds its own ``RunContext`` (basis, suites,
resident models) on first use and keeps it for later tasks of the same config.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner

from psomerge.config import RunConfig
from psomerge.errors import PsomergeError
from psomerge.evaluation import EvalResult
from psomerge.hashing import digest
from psomerge.judges.llm import JudgeError
from psomerge.pipeline import BasisInfo, ParticleScore, Row, RunContext, Usage, validate_models
from psomerge.swarm.cache import particle_key

_CONTEXTS: dict[str, RunContext] = {}
_LOCK = threading.Lock()


def context(config_json: str) -> RunContext:
    """This process's RunContext for a config, built once."""
    key = digest(config_json)
    with _LOCK:
        if key not in _CONTEXTS:
            _CONTEXTS[key] = RunContext(RunConfig.model_validate_json(config_json))
        return _CONTEXTS[key]


def close_context(config_json: str) -> None:
    """Release this process's context for a config (resident models, judge servers)."""
    with _LOCK:
        ctx = _CONTEXTS.pop(digest(config_json), None)
    if ctx is not None:
        ctx.close()


def _particle_cache_key(task_context, parameters: dict[str, Any]) -> str:
    """Keyed like the fitness cache (basis fingerprint, rounded coefficients, eval fingerprint),
    plus the racing target: a raced result holds only against the target it was raced to."""
    key = particle_key(parameters["basis_fingerprint"], np.asarray(parameters["coeffs"]),
                       parameters["eval_fingerprint"])
    target = parameters.get("target")
    return "particle-" + (key if target is None else digest([key, target[0], np.round(target[1], 6).tolist()]))


def _transient(task, task_run, state) -> bool:
    """Retry judge and transport failures; a bad config or model fails at once."""
    try:
        state.result()
    except JudgeError:
        return True
    except PsomergeError:
        return False
    except Exception:  # noqa: BLE001 - network, timeouts, worker loss
        return True
    return False


def _row(row: Row) -> dict[str, Any]:
    return asdict(row)


def _unrow(data: dict[str, Any]) -> Row:
    val = data.get("validation")
    return Row(data["label"], EvalResult(**data["heldout"]), EvalResult(**data["optimisation"]), Usage(**data["usage"]),
               EvalResult(**val) if val else None)


@task(name="validate-and-build-basis", cache_policy=NO_CACHE)
def prepare_basis(config_json: str) -> dict[str, Any]:
    """Checks base and experts, writes the DARE experts (once), opens the basis."""
    validate_models(RunConfig.model_validate_json(config_json))
    info = context(config_json).info()
    return {**asdict(info), "eval_fingerprint": context(config_json).evaluator.fitness_fingerprint}


@task(name="score-particle", cache_key_fn=_particle_cache_key, persist_result=True, retries=2,
      retry_delay_seconds=2, retry_condition_fn=_transient)
def score_particle(config_json: str, coeffs: list[list[float]], basis_fingerprint: str,
                   eval_fingerprint: str, target: tuple[float, list[list[float]]] | None = None) -> dict[str, Any]:
    return asdict(context(config_json).score(np.asarray(coeffs), target))


@task(name="evaluate-rows", cache_policy=NO_CACHE)
def evaluate_rows(config_json: str, particles: dict[str, list[list[float]]]) -> list[dict[str, Any]]:
    """Report rows of named particles (base, experts, the merge): held-out and optimisation split."""
    ctx = context(config_json)
    return [_row(ctx.evaluate(label, np.asarray(x))) for label, x in particles.items()]


@task(name="validate-candidates", cache_policy=NO_CACHE)
def validate_candidates(config_json: str, particles: list[list[list[float]]]) -> list[dict[str, Any]]:
    """Candidates' judge scores on the validation split (model selection)."""
    ctx = context(config_json)
    return [{"result": asdict(r), "usage": asdict(u)} for r, u in (ctx.validate(np.asarray(x)) for x in particles)]


@task(name="score-checkpoint", cache_policy=NO_CACHE)
def score_checkpoint(config_json: str, folder: str, split: str) -> dict[str, Any]:
    """A checkpoint folder's judge scores on a split (the gate re-scoring a champion)."""
    return asdict(context(config_json).score_checkpoint(Path(folder), split))


@task(name="static-baseline", cache_policy=NO_CACHE)
def static_baseline(config_json: str, name: str) -> dict[str, Any]:
    """Merge the experts with one static method (once), then score it on both splits."""
    return _row(context(config_json).baseline(name))


@task(name="write-merged-model", cache_policy=NO_CACHE)
def write_merged_model(config_json: str, coeffs: list[list[float]], out_dir: str) -> str:
    return str(context(config_json).write_model(np.asarray(coeffs), Path(out_dir)))


class PrefectScoring:
    """The pipeline's scoring seam as Prefect tasks: one task per particle on ``runner`` (a
    started task runner: threads, Dask or Ray workers; concurrent, cached by the particle key,
    retried on transient judge errors). Report rows, baselines and the merged model are scored
    and written in the flow's own process."""

    def __init__(self, config: RunConfig, runner: TaskRunner):
        self.config_json = config.model_dump_json()
        self.runner = runner

    def prepare(self) -> BasisInfo:
        info = prepare_basis(self.config_json)
        self.eval_fingerprint = info.pop("eval_fingerprint")
        self.info = BasisInfo(**info)
        return self.info

    def score(self, positions: list[np.ndarray], targets: list, progress=None) -> list[ParticleScore]:
        futures = []
        for x, t in zip(positions, targets):
            parameters = {"config_json": self.config_json, "coeffs": x.tolist(),
                          "basis_fingerprint": self.info.fingerprint, "eval_fingerprint": self.eval_fingerprint}
            if t is not None:  # racing: what the particle must beat
                parameters["target"] = (t[0], np.asarray(t[1]).tolist())
            futures.append(self.runner.submit(score_particle, parameters))
        results = []
        for f in futures:
            r = f.result()
            if progress is not None:
                progress.advance()
            if f.state.name == "Cached":  # Prefect's own result cache answered: nothing was used
                # a raced estimate stays flagged: it must never become a best or a selection candidate
                results.append(ParticleScore(r["fitness"], r["scores"], scored=False, task_cached=True,
                                             raced=r.get("raced", False)))
            else:
                results.append(ParticleScore(**{**r, "usage": Usage(**r["usage"])}))
        return results

    def evaluate(self, particles: dict[str, np.ndarray]) -> list[Row]:
        return [_unrow(r) for r in evaluate_rows(self.config_json, {k: v.tolist() for k, v in particles.items()})]

    def validate(self, particles: list[np.ndarray]) -> list[tuple[EvalResult, Usage]]:
        return [(EvalResult(**r["result"]), Usage(**r["usage"]))
                for r in validate_candidates(self.config_json, [x.tolist() for x in particles])]

    def baseline(self, name: str) -> Row:
        return _unrow(static_baseline(self.config_json, name))

    def score_checkpoint(self, folder: Path, split: str) -> EvalResult:
        return EvalResult(**score_checkpoint(self.config_json, str(folder), split))

    def write_model(self, coeffs: np.ndarray, out_dir: Path) -> Path:
        return Path(write_merged_model(self.config_json, coeffs.tolist(), str(out_dir)))

    def close(self) -> None:
        # threads ran in this process: release what they built (Dask and Ray workers end with their cluster)
        close_context(self.config_json)
