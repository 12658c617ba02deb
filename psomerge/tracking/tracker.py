"""The pipeline's tracking seam in MLflow: one run per pipeline run (resumed with it),
params from the config, per-step metrics, nested runs for the static baselines, per-split
score tables, a convergence plot and a coefficient heatmap, the swarm checkpoint and final
coefficients, then the registered version and the promotion gate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow

from psomerge.config import RunConfig
from psomerge.credentials import redact
from psomerge.evaluation import EvalResult
from psomerge.evaluation.gate import GateScores
from psomerge.hashing import digest
from psomerge.io import model_labels
from psomerge.pipeline import BasisInfo, Registration, Row, RunResult
from psomerge.swarm.basis import COEFFICIENTS_FILE
from psomerge.swarm.run import StepReport
from psomerge.tracking import registry


def _metrics(prefix: str, result: EvalResult) -> dict[str, float]:
    return {f"{prefix}_fitness": result.fitness, **{f"{prefix}_{t}": v for t, v in result.scores.items()}}


class MLflowTracker:
    def __init__(self) -> None:
        self.run = None

    def start(self, config: RunConfig, info: BasisInfo, resumed: dict[str, Any] | None) -> dict[str, Any]:
        self.config = config
        registry.configure(config.registry.experiment)
        run_id = (resumed or {}).get("mlflow_run_id")
        run_name = None if run_id else f"{config.name}-{config.optimizer.type}"
        self.run = mlflow.start_run(run_id=run_id, run_name=run_name)
        if run_id is None:
            # free-form values (a served judge's command line, a cluster's address) may hold credentials
            mlflow.log_params(registry.flatten(redact(config.model_dump(mode="json"))))
            labels = model_labels(list(info.fingerprints))  # distinct where folders share a name
            mlflow.set_tags({f"fingerprint.{label}": v for label, v in zip(labels, info.fingerprints.values())})
        self.info = info
        return {"mlflow_run_id": self.run.info.run_id}

    def log_step(self, report: StepReport) -> None:
        metrics = {"best_fitness": report.best_fitness, "mean_fitness": report.mean_fitness,
                   "std_fitness": report.std_fitness, "evaluations": report.evaluations}
        metrics.update({f"best_{s.name}": report.best_scores.get(s.name, 0.0) for s in self.config.suites})
        metrics.update({k: float(v) for k, v in report.counts.items()})
        mlflow.log_metrics(metrics, step=report.step)

    def log_baseline(self, row: Row) -> None:
        with mlflow.start_run(run_name=f"baseline:{row.label}", nested=True):
            mlflow.log_metrics(_metrics("heldout", row.heldout))

    def finish(self, result: RunResult, checkpoint: Path, rescore: Callable[[Path, str], EvalResult]) -> Registration:
        cfg = result.config
        log_score_table([(r.label, r.heldout) for r in result.rows], "heldout", "tables/heldout.json")
        log_score_table([(r.label, r.optimisation) for r in result.rows], "optimisation", "tables/optimisation.json")
        log_plots(result.history, result.best_position, self.info.labels, self.info.group_labels)
        mlflow.log_artifact(str(checkpoint), artifact_path="swarm")
        mlflow.log_artifact(str(result.model_dir / COEFFICIENTS_FILE), artifact_path="swarm")
        merged = next(r for r in result.rows if r.label == result.merged_label)
        mlflow.log_metrics({**_metrics("heldout", merged.heldout),
                            **{f"total_{k}": float(v) for k, v in result.counts.as_dict().items()}})
        lineage = {"base": str(cfg.base), "experts": [str(e) for e in cfg.experts],
                   "fingerprints": self.info.fingerprints, "config_hash": digest(cfg.model_dump_json(), 12),
                   "coefficients": result.best_position.round(6).tolist(), "optimizer": cfg.optimizer.type}
        # the gate reads the validation split where suites have one: the held-out split stays for the report
        split = "validation" if merged.validation is not None else "heldout"
        gate_fingerprint = digest([self.info.eval_fingerprint, split])

        def gate(result_on_split: EvalResult) -> GateScores:
            return GateScores(split, gate_fingerprint, result_on_split.scored, self.info.weights)

        measured = merged.validation if split == "validation" else merged.heldout
        registered = registry.register_version(
            result.model_dir, cfg.registry.model_name, merged.heldout.fitness, lineage,
            key=registry.model_key(self.info.fingerprint, result.best_position, cfg.generation),
            generation=cfg.generation, gate=gate(measured))
        decision = registry.promote(cfg.registry.model_name, cfg.registry.promotion_margin,
                                    cfg.registry.promotion_confidence, lambda folder: gate(rescore(folder, split)))
        mlflow.set_tags({"registered_version": registered.version, "reused_version": str(registered.reused),
                         "promoted": str(decision["promoted"])})
        return Registration(self.run.info.run_id, registered.version, decision, reused=registered.reused)

    def close(self, failed: bool) -> None:
        if self.run is not None:
            mlflow.end_run(status="FAILED" if failed else "FINISHED")
            self.run = None


def table_records(rows: Sequence[tuple[str, EvalResult]], split: str) -> dict[str, list]:
    names = list(rows[0][1].scores) if rows else []
    table: dict[str, list] = {"model": [], "split": [], **{n: [] for n in names}, "weighted_mean": []}
    for label, result in rows:
        table["model"].append(label)
        table["split"].append(split)
        for n in names:
            table[n].append(result.scores[n])
        table["weighted_mean"].append(result.fitness)
    return table


def log_score_table(rows: Sequence[tuple[str, EvalResult]], split: str, artifact_file: str) -> None:
    mlflow.log_table(data=table_records(rows, split), artifact_file=artifact_file)


def log_plots(history: Sequence[dict], coefficients, basis_labels: Sequence[str], group_labels: Sequence[str]) -> None:
    """Convergence plot and coefficient heatmap, as PNG artifacts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["best"] for h in history], marker="o", label="global best")
    ax.plot(steps, [h["mean"] for h in history], marker=".", label="particle mean")
    ax.set_xlabel("step")
    ax.set_ylabel("fitness (optimisation split)")
    ax.legend()
    fig.tight_layout()
    mlflow.log_figure(fig, "convergence.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(basis_labels), 1.2 + 0.35 * len(group_labels)))
    im = ax.imshow(coefficients, cmap="coolwarm", aspect="auto")
    ax.set_xticks(range(len(basis_labels)), basis_labels, rotation=45, ha="right")
    ax.set_yticks(range(len(group_labels)), group_labels)
    fig.colorbar(im, ax=ax, label="coefficient")
    fig.tight_layout()
    mlflow.log_figure(fig, "coefficients.png")
    plt.close(fig)
