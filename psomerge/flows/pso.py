"""The PSO-Merging pipeline as a Prefect flow, tracked in MLflow.

validate experts -> sparsify (DARE basis) -> build swarm -> per step: score particles (one
task each, concurrent, cached, retried) -> PSO update -> checkpoint -> held-out evaluation of
the global best, base, experts and static baselines -> register in MLflow -> promotion gate.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from psomerge.api import COEFFICIENTS_FILE, make_optimizer
from psomerge.config import RunConfig, RunnerConfig
from psomerge.evaluation import EvalResult
from psomerge.registry import tracking
from psomerge.swarm.basis import member_coefficients
from psomerge.swarm.cache import CachedFitness
from psomerge.swarm.run import StepReport, load_checkpoint, run_optimizer
from psomerge.tasks.swarm import (
    heldout_evaluation, prepare_basis, score_particle, static_baseline, validate_experts, write_merged_model,
)

log = logging.getLogger(__name__)


def task_runner(cfg: RunnerConfig):
    """Threads by default; Dask or Ray workers (each builds its own Workspace) when asked."""
    if cfg.type == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    if cfg.type == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.max_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect_ray import RayTaskRunner

    if cfg.address:
        return RayTaskRunner(address=cfg.address)
    return RayTaskRunner(init_kwargs={"num_cpus": cfg.max_workers, "include_dashboard": False})


@dataclass
class FlowCounts:
    fitness_calls: int = 0
    scorings: int = 0
    cache_hits: int = 0
    prefect_cache_hits: int = 0
    generated_tokens: int = 0
    judge_calls: int = 0
    judge_cache_hits: int = 0
    judge_tokens: int = 0
    judge_cost: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)

    def add_usage(self, usage: dict[str, float]) -> None:
        for key, value in usage.items():
            setattr(self, key, getattr(self, key) + value)


def _rows(results: dict[str, dict[str, Any]], split: str) -> list[tuple[str, EvalResult]]:
    return [(label, EvalResult(r[split], r[f"{split}_fitness"], 0)) for label, r in results.items()]


@flow(name="pso-merge", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=1))
def pso_merge(config_path: str, resume: bool = False) -> dict[str, Any]:
    cfg = RunConfig.load(config_path)
    config_json = cfg.model_dump_json()
    out = cfg.run_dir()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.json"

    fingerprints = validate_experts(config_json)
    basis = prepare_basis(config_json)
    optimizer = make_optimizer(cfg.optimizer, basis["k"], basis["groups"])
    counts = FlowCounts()
    mlflow_run_id = None
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        counts = FlowCounts(**{k: v for k, v in state.get("counts", {}).items() if k in FlowCounts.__annotations__})
        mlflow_run_id = state.get("mlflow_run_id")

    tracking.configure(cfg.registry.experiment)
    with mlflow.start_run(run_id=mlflow_run_id, run_name=None if mlflow_run_id else f"{cfg.name}-{cfg.optimizer.type}") as run:
        if mlflow_run_id is None:
            mlflow.log_params(tracking.flatten(json.loads(config_json)))
            mlflow.set_tags({f"fingerprint.{Path(k).name}": v for k, v in fingerprints.items()})

        def score_batch(positions: list[np.ndarray]) -> list[CachedFitness]:
            futures = [score_particle.submit(config_json, x.tolist(), basis["basis_fingerprint"],
                                             basis["eval_fingerprint"]) for x in positions]
            results = []
            for f in futures:
                r = f.result()
                counts.fitness_calls += 1
                if f.state.name == "Cached":
                    counts.prefect_cache_hits += 1
                    counts.cache_hits += 1
                else:
                    if r["scored"]:
                        counts.scorings += 1
                    else:
                        counts.cache_hits += 1
                    counts.add_usage(r["usage"])  # a Prefect cache hit used nothing
                results.append(CachedFitness(r["fitness"], r["scores"], {}))
            return results

        def on_step(report: StepReport) -> None:
            tracking.log_step(report, [s.name for s in cfg.suites])

        result = run_optimizer(optimizer, fitness=None, evaluate_batch=score_batch, checkpoint=checkpoint,  # type: ignore[arg-type]
                               resume=resume, on_step=on_step, counts=counts.as_dict,
                               checkpoint_extra=lambda: {"mlflow_run_id": run.info.run_id})

        # held-out evaluation: base, experts, the merge, then the static baselines
        k, g = basis["k"], basis["groups"]
        particles = {label: member_coefficients(k, g, j).tolist()
                     for j, label in enumerate(basis["labels"][: 1 + len(cfg.experts)])}
        merged_label = f"psomerge:{cfg.optimizer.type}"
        particles[merged_label] = result.best_position.tolist()
        evaluated = heldout_evaluation(config_json, particles)
        for row in evaluated.values():
            counts.add_usage(row["usage"])
        for name in cfg.registry.baselines:
            with mlflow.start_run(run_name=f"baseline:{name}", nested=True):
                b = static_baseline(config_json, name, str(out / "baselines" / name))
                mlflow.log_metrics({"heldout_fitness": b["heldout_fitness"],
                                    **{f"heldout_{t}": v for t, v in b["heldout"].items()}})
                evaluated[name] = b
                counts.add_usage(b["usage"])
        order = [lbl for lbl in evaluated if lbl != merged_label] + [merged_label]
        evaluated = {lbl: evaluated[lbl] for lbl in order}

        model_dir = write_merged_model(config_json, result.best_position.tolist(), str(out / "model"))
        tracking.log_score_table(_rows(evaluated, "heldout"), "heldout", "tables/heldout.json")
        tracking.log_score_table(_rows(evaluated, "optimisation"), "optimisation", "tables/optimisation.json")
        tracking.log_plots(result.history, result.best_position, basis["labels"], basis["group_labels"])
        mlflow.log_artifact(str(checkpoint), artifact_path="swarm")
        mlflow.log_artifact(str(Path(model_dir) / COEFFICIENTS_FILE), artifact_path="swarm")
        heldout_score = evaluated[merged_label]["heldout_fitness"]
        mlflow.log_metrics({"heldout_fitness": heldout_score, **{f"heldout_{t}": v for t, v in
                                                               evaluated[merged_label]["heldout"].items()},
                            **{f"total_{k}": float(v) for k, v in counts.as_dict().items()}})
        version = tracking.register_version(Path(model_dir), cfg.registry.model_name, heldout_score, {
            "base": str(cfg.base), "experts": [str(e) for e in cfg.experts], "fingerprints": fingerprints,
            "config_hash": _config_hash(config_json), "coefficients": result.best_position.round(6).tolist(),
            "optimizer": cfg.optimizer.type})
        decision = tracking.promote(cfg.registry.model_name, cfg.registry.promotion_margin)
        mlflow.set_tags({"registered_version": version, "promoted": str(decision["promoted"])})
        return {"run_id": run.info.run_id, "version": version, "promotion": decision, "counts": counts.as_dict(),
                "heldout": {lbl: r["heldout"] | {"weighted_mean": r["heldout_fitness"]} for lbl, r in evaluated.items()},
                "best_fitness": result.best_fitness, "output_dir": str(out)}


def run_pso_flow(config_path: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run pso_merge with the task runner its config asks for (threads, Dask or Ray)."""
    cfg = RunConfig.load(config_path)
    return pso_merge.with_options(task_runner=task_runner(cfg.runner))(str(config_path), resume=resume)


def _config_hash(config_json: str) -> str:
    return hashlib.blake2b(config_json.encode(), digest_size=12).hexdigest()
