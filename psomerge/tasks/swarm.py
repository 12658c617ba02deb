"""Tasks of a PSO-Merging run."""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE


from psomerge.api import Workspace
from psomerge.config import RunConfig
from psomerge.errors import PsomergeError
from psomerge.io import Checkpoint, check_compatible
from psomerge.judges.llm import JudgeError
from psomerge.swarm.cache import particle_key

_WORKSPACES: dict[str, Workspace] = {}
MERGE_CODE_VERSION = "2"  # bump when static merge outputs change for the same recipe
USAGE_KEYS = ("generated_tokens", "judge_calls", "judge_cache_hits", "judge_tokens", "judge_cost")
_LOCK = threading.Lock()


def workspace(config_json: str) -> Workspace:
    """This process's Workspace for a config, built once."""
    key = hashlib.blake2b(config_json.encode(), digest_size=16).hexdigest()
    with _LOCK:
        if key not in _WORKSPACES:
            _WORKSPACES[key] = Workspace(RunConfig.model_validate_json(config_json))
        return _WORKSPACES[key]


@contextmanager
def measured_usage(ws: Workspace):
    """Generation and judge usage of the block (exact with one scoring thread per worker)."""
    usage: dict[str, float] = {}
    before = ws.counts()
    yield usage
    after = ws.counts()
    usage.update({k: after[k] - before[k] for k in USAGE_KEYS})


def _particle_cache_key(context, parameters: dict[str, Any]) -> str:
    """Keyed like the fitness cache: basis fingerprint, rounded coefficients, eval fingerprint."""
    return "particle-" + particle_key(parameters["basis_fingerprint"], np.asarray(parameters["coeffs"]),
                                      parameters["eval_fingerprint"])


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


@task(name="validate-experts", cache_policy=NO_CACHE)
def validate_experts(config_json: str) -> dict[str, str]:
    """Architecture, names, shapes and vocabularies of base and experts; their content hashes."""
    cfg = RunConfig.model_validate_json(config_json)
    base = Checkpoint(cfg.base, name=str(cfg.base))
    experts = [Checkpoint(e, name=str(e)) for e in cfg.experts]
    check_compatible(base, experts)
    return {c.name: c.fingerprint() for c in [base, *experts]}


@task(name="sparsify-and-build-basis", cache_policy=NO_CACHE)
def prepare_basis(config_json: str) -> dict[str, Any]:
    """Writes the DARE experts (once) and opens the basis; returns its fingerprints."""
    ws = workspace(config_json)
    return {"basis_fingerprint": ws.basis.fingerprint, "eval_fingerprint": ws.evaluator.fingerprint,
            "k": ws.basis.k, "groups": ws.basis.num_groups, "labels": ws.basis.labels,
            "group_labels": ws.basis.group_labels}


@task(name="score-particle", cache_key_fn=_particle_cache_key, persist_result=True, retries=2,
      retry_delay_seconds=2, retry_condition_fn=_transient)
def score_particle(config_json: str, coeffs: list[list[float]], basis_fingerprint: str,
                   eval_fingerprint: str) -> dict[str, Any]:
    ws = workspace(config_json)
    with measured_usage(ws) as usage:
        scorings = ws.evaluator.counts.scorings
        result = ws.evaluator(np.asarray(coeffs))
        scored = ws.evaluator.counts.scorings > scorings
    return {"fitness": result.fitness, "scores": result.scores, "scored": scored, "usage": usage}


@task(name="heldout-evaluation", cache_policy=NO_CACHE)
def heldout_evaluation(config_json: str, particles: dict[str, list[list[float]]]) -> dict[str, dict[str, Any]]:
    """Held-out (and optimisation-split) scores of named particles: base, experts, the merge."""
    ws = workspace(config_json)
    out = {}
    for label, coeffs in particles.items():
        with measured_usage(ws) as usage:
            held = ws.heldout(np.asarray(coeffs))
            opt = ws.evaluator(np.asarray(coeffs))
        out[label] = {"heldout": held.scores, "heldout_fitness": held.fitness,
                      "optimisation": opt.scores, "optimisation_fitness": opt.fitness, "usage": usage}
    return out


@task(name="write-merged-model", cache_policy=NO_CACHE)
def write_merged_model(config_json: str, coeffs: list[list[float]], out_dir: str) -> str:
    return str(workspace(config_json).write_model(np.asarray(coeffs), Path(out_dir)))


@task(name="static-baseline", cache_policy=NO_CACHE)
def static_baseline(config_json: str, name: str, out_dir: str) -> dict[str, Any]:
    """Merge the experts with one static method, then score it on both splits."""
    from psomerge.merging.baselines import baseline_recipe
    from psomerge.merging.engine import run_merge

    ws = workspace(config_json)
    cfg = ws.config
    recipe = baseline_recipe(name, cfg.base, list(cfg.experts), cfg.basis.seed)
    # the folder is named by the recipe and the merge code's version: a stale merge is never reused
    tag = hashlib.blake2b((recipe.model_dump_json() + MERGE_CODE_VERSION).encode(), digest_size=6).hexdigest()
    out = Path(out_dir) / tag
    if not (out / "config.json").exists():
        run_merge(recipe, out)
    with measured_usage(ws) as usage:
        held = ws.evaluate_folder(out, "heldout")
        opt = ws.evaluate_folder(out, "optimisation")
    return {"heldout": held.scores, "heldout_fitness": held.fitness, "optimisation": opt.scores,
            "optimisation_fitness": opt.fitness, "path": str(out), "usage": usage}
