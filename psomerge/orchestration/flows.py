"""Prefect flows: ``pso-merge`` (one pipeline run, tracked in MLflow, registered and
promotion-gated) and ``promote`` (the gate alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from psomerge.config import DaskRunner, RayRunner, RunConfig, ThreadsRunner
from psomerge.orchestration.tasks import PrefectScoring
from psomerge.orchestration.watching import current_progress, watched_by
from psomerge.pipeline import RunResult, run_pipeline
from psomerge.progress import SILENT, Progress


def task_runner(settings: ThreadsRunner | DaskRunner | RayRunner):
    """Threads by default; Dask or Ray workers (each builds its own RunContext) when asked."""
    if isinstance(settings, ThreadsRunner):
        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    if isinstance(settings, DaskRunner):
        from prefect_dask import DaskTaskRunner

        if settings.address:
            return DaskTaskRunner(address=settings.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": settings.max_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect_ray import RayTaskRunner

    if settings.address:
        return RayTaskRunner(address=settings.address)
    return RayTaskRunner(init_kwargs={"num_cpus": settings.max_workers, "include_dashboard": False})


@flow(name="pso-merge", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=1))
def pso_merge(config_path: str, resume: bool = False) -> RunResult:
    """validate experts -> sparsify (DARE basis) -> per step: score particles (one task each,
    concurrent, cached, retried) -> PSO update -> checkpoint -> report rows (base, experts,
    static baselines, the merge) -> merged model -> MLflow run, registered version, gate."""
    from psomerge.tracking import MLflowTracker

    cfg = RunConfig.load(config_path)
    return run_pipeline(cfg, scoring=PrefectScoring(cfg), tracker=MLflowTracker(), resume=resume,
                        progress=current_progress())


@flow(name="promote")
def promote(model_name: str, margin: float = 0.0, experiment: str = "psomerge") -> dict[str, Any]:
    """Move alias ``champion`` to ``candidate`` only if its held-out score is higher by > margin."""
    from psomerge.tracking import registry

    registry.configure(experiment)
    return registry.promote(model_name, margin)


def run_flow(config_path: str | Path, resume: bool = False, progress: Progress = SILENT) -> RunResult:
    """Run pso_merge with the task runner its config asks for (threads, Dask or Ray)."""
    cfg = RunConfig.load(config_path)
    with watched_by(progress):
        return pso_merge.with_options(task_runner=task_runner(cfg.runner))(str(config_path), resume=resume)
