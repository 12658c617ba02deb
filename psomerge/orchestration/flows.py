"""Prefect flows: ``pso-merge`` (one pipeline run, tracked in MLflow, registered and
promotion-gated) and ``promote`` (the gate alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from psomerge.config import DaskRunner, RayRunner, RunConfig, ThreadsRunner
from psomerge.orchestration.server import ensure_api
from psomerge.orchestration.tasks import PrefectScoring
from psomerge.orchestration.watching import current_progress, watched_by
from psomerge.pipeline import RunResult, run_pipeline
from psomerge.progress import SILENT, Progress


def task_runner(settings: ThreadsRunner | DaskRunner | RayRunner) -> TaskRunner:
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


@flow(name="pso-merge", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=1))  # idle: see below
def pso_merge(config_path: str, resume: bool = False) -> RunResult:
    """validate experts -> sparsify (DARE basis) -> per step: score particles (one task each,
    concurrent, cached, retried) -> PSO update -> checkpoint -> report rows (base, experts,
    static baselines, the merge) -> merged model -> MLflow run, registered version, gate.

    Particles go to the task runner the config asks for (``runner:``), started here: however
    the flow is started (called, ``run_flow``, a deployment), its config decides."""
    from psomerge.tracking import MLflowTracker

    cfg = RunConfig.load(config_path)
    with task_runner(cfg.runner) as runner:
        return run_pipeline(cfg, scoring=PrefectScoring(cfg, runner), tracker=MLflowTracker(), resume=resume,
                            progress=current_progress())


@flow(name="promote")
def promote(model_name: str, margin: float = 0.0, experiment: str = "psomerge", confidence: float = 0.95,
            config_path: str | None = None) -> dict[str, Any]:
    """Move alias ``champion`` to ``candidate`` only if it beats the champion on the same
    examples by more than ``margin``, beyond noise. With a run config, a champion measured on
    other examples is re-scored on the candidate's gate split first."""
    from psomerge.evaluation.gate import GateScores
    from psomerge.tracking import registry

    registry.configure(experiment)
    if config_path is None:
        return registry.promote(model_name, margin, confidence)
    from psomerge.pipeline import RunContext

    ctx = RunContext(RunConfig.load(config_path))
    info = ctx.info()

    def rescore(folder: Path) -> GateScores:
        from psomerge.hashing import digest

        split = "validation" if ctx.has_validation else "heldout"
        return GateScores(split, digest([info.eval_fingerprint, split]), ctx.score_checkpoint(folder, split).scored,
                          info.weights)

    try:
        return registry.promote(model_name, margin, confidence, rescore)
    finally:
        ctx.close()


def run_flow(config_path: str | Path, resume: bool = False, progress: Progress = SILENT) -> RunResult:
    """Run pso_merge against the configured Prefect server, or a temporary one that dies with
    this process; ``progress`` shows its particles and evaluations."""
    ensure_api()
    with watched_by(progress):
        return pso_merge(str(config_path), resume=resume)


def run_promote(model_name: str, margin: float = 0.0, experiment: str = "psomerge", confidence: float = 0.95,
                config_path: str | None = None) -> dict[str, Any]:
    """Run the promote flow, against the configured Prefect server or a temporary one."""
    ensure_api()
    return promote(model_name, margin, experiment, confidence, config_path)
