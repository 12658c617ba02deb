"""Drive an optimiser against a fitness function, checkpointing after every step."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psomerge.swarm.cache import CachedFitness
from psomerge.swarm.optimizer import Optimizer

CHECKPOINT_VERSION = 1


@dataclass
class StepReport:
    step: int
    best_fitness: float
    best_scores: dict[str, float]
    mean_fitness: float
    std_fitness: float
    evaluations: int
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class SwarmResult:
    best_position: np.ndarray
    best_fitness: float
    best_scores: dict[str, float]
    steps: int
    evaluations: int
    history: list[dict[str, float]]


def save_checkpoint(path: Path, optimizer: Optimizer, extra: dict[str, Any]) -> None:
    """Atomic write: a crash mid-write leaves the previous checkpoint intact."""
    state = {"version": CHECKPOINT_VERSION, "optimizer_state": optimizer.state_dict(), **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = json.loads(Path(path).read_text())
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
    return state


def run_optimizer(
    optimizer: Optimizer,
    fitness: Callable[[np.ndarray], CachedFitness],
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    evaluate_batch: Callable[[list[np.ndarray], list], list[CachedFitness]] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    counts: Callable[[], dict[str, int]] | None = None,
    checkpoint_extra: Callable[[], dict[str, Any]] | None = None,
) -> SwarmResult:
    """Ask, score, tell until done. ``evaluate_batch(positions, targets)`` may score a step's
    particles concurrently and race them against the optimiser's ``targets()``; by default
    they are scored one after another with ``fitness``."""
    best_scores: dict[str, float] = {}
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        optimizer.load_state_dict(state["optimizer_state"])
        best_scores = state.get("best_scores", {})
    score_all = evaluate_batch or (lambda xs, _: [fitness(x) for x in xs])
    while not optimizer.done():
        positions = optimizer.ask()
        results = score_all(positions, optimizer.targets())
        previous_best = optimizer.best_fitness
        optimizer.tell(positions, [r.fitness for r in results])
        if optimizer.best_fitness > previous_best:
            best_scores = results[int(np.argmax([r.fitness for r in results]))].scores
        h = optimizer.history[-1]
        report = StepReport(h["step"], optimizer.best_fitness, best_scores, h["mean"], h["std"],
                            optimizer.evaluations, counts() if counts else {})
        if checkpoint is not None:
            extra = checkpoint_extra() if checkpoint_extra else {}
            save_checkpoint(checkpoint, optimizer, {"best_scores": best_scores, "counts": report.counts, **extra})
        if on_step:
            on_step(report)
    return SwarmResult(optimizer.best_position, optimizer.best_fitness, best_scores, optimizer.step,
                       optimizer.evaluations, optimizer.history)


__all__ = ["SwarmResult", "StepReport", "run_optimizer", "save_checkpoint", "load_checkpoint"]
