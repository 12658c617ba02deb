"""Drive an optimiser against a fitness function, checkpointing after every step; the
checkpoint's provenance (what the run searched over) checked on resume; the run folder's lock."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psomerge.errors import CheckpointError, ConfigError, RunLockedError
from psomerge.swarm.cache import CachedFitness
from psomerge.swarm.optimizer import Optimizer

CHECKPOINT_VERSION = 2  # 2: provenance recorded and checked on resume
_MAX_LISTED = 5


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
    """Atomic write: a crash or a full disk mid-write leaves the previous checkpoint intact."""
    state = {"version": CHECKPOINT_VERSION, "optimizer_state": optimizer.state_dict(), **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = "the previous step's checkpoint is intact" if path.exists() else "no checkpoint was written"
        raise CheckpointError(f"cannot write swarm checkpoint {path} ({exc.strerror or exc}); {kept}: free space "
                              "and resume (--resume; particles scored since come from the fitness cache)") from exc


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A swarm checkpoint, or a CheckpointError naming the file (missing, truncated, corrupt,
    or written by another version)."""
    path = Path(path)
    fix = "start the run again without --resume (scored particles come back from the fitness cache)"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"--resume: there is no swarm checkpoint {path}; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable swarm checkpoint, truncated or corrupt ({exc}); {fix}") from None
    if not isinstance(state, dict) or not isinstance(state.get("optimizer_state"), dict):
        raise CheckpointError(f"{path}: not a swarm checkpoint (no optimizer state); {fix}")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION} "
                              f"(written by another psomerge version); {fix}")
    return state


def check_optimizer(state: dict[str, Any], optimizer: str, path: Path) -> None:
    """Refuse to resume a checkpoint of another optimiser."""
    written = state["optimizer_state"].get("optimizer")
    if written != optimizer:
        raise ConfigError(f"{path} is the checkpoint of a {written} run; this run's optimizer is {optimizer}: "
                          f"resume with optimizer {written}, or start the {optimizer} run without --resume")


def check_provenance(state: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint whose search was over other models, data, scoring or
    settings than this run's: its best particle and scores would be mixed with new ones.

    A provenance is ``{"settings": {dotted key: value}, "models": [[label, fingerprint], ...],
    "suites": {name: {"data": fingerprint, "suite": fingerprint}}, "basis": fingerprint,
    "evaluation": fingerprint}``."""
    saved = state.get("provenance")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} does not record what its run searched over, so resuming cannot be "
                              f"checked; start the run again without --resume")
    changes = _setting_changes(saved.get("settings", {}), current["settings"])
    changes += _model_changes(saved.get("models", []), current["models"])
    changes += _suite_changes(saved.get("suites", {}), current["suites"])
    if not changes:
        for what, name in (("basis", "the basis (DARE drop rate, seed or models)"),
                           ("evaluation", "the evaluation (generation settings, device, scorers or data)")):
            if saved.get(what) != current[what]:
                changes.append(f"{name} changed")
    if changes:
        listed = "; ".join(changes[:_MAX_LISTED]) + (f"; and {len(changes) - _MAX_LISTED} more"
                                                     if len(changes) > _MAX_LISTED else "")
        raise ConfigError(f"cannot resume from {path}: {listed} since the checkpoint. Resuming would mix its "
                          f"best particle and scores with new ones: start the run again without --resume "
                          f"(or give it another name)")


def _setting_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"config key {key!r} changed ({saved.get(key, '<unset>')!r} -> {current.get(key, '<unset>')!r})"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def _model_changes(saved: list[list[str]], current: list[list[str]]) -> list[str]:
    """By position (base, then each expert: the basis order) and content, not by path."""
    if len(saved) != len(current):
        return [f"the number of experts changed ({len(saved) - 1} -> {len(current) - 1})"]
    return [f"model {label!r} changed (weights, config or tokenizer)"
            for (_, before), (label, now) in zip(saved, current) if before != now]


def _suite_changes(saved: dict[str, dict[str, str]], current: dict[str, dict[str, str]]) -> list[str]:
    if sorted(saved) != sorted(current):
        return [f"the suites changed (were {sorted(saved)}, now {sorted(current)})"]
    changes = []
    for name in sorted(current):
        if saved[name].get("data") != current[name]["data"]:
            changes.append(f"suite {name!r} data changed")
        elif saved[name].get("suite") != current[name]["suite"]:
            changes.append(f"suite {name!r} settings changed (split, scorer or weight)")
    return changes


class RunLock:
    """An exclusive OS lock (flock) on a run folder, held while a run writes there: a second
    run in the same folder fails at once, naming the holder's process. The OS drops the lock
    when its holder exits, however it exits, so a killed run never blocks the next one."""

    FILE = ".lock"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        path = self.folder / self.FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunLockedError(f"cannot lock run folder {self.folder} ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process not yet named"
            os.close(fd)
            raise RunLockedError(f"run folder {self.folder} is in use by {holder}: wait for that run to end, "
                                 f"or give this run another name (name: or output_dir: in its config)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


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
        check_optimizer(state, optimizer.name, checkpoint)
        try:
            optimizer.load_state_dict(state["optimizer_state"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{checkpoint}: not a usable {optimizer.name} checkpoint ({exc!r}); start the "
                                  f"run again without --resume") from None
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


__all__ = ["SwarmResult", "StepReport", "RunLock", "run_optimizer", "save_checkpoint", "load_checkpoint",
           "check_optimizer", "check_provenance"]
