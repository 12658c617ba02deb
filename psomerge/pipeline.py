"""One run end to end: validate, build the basis, search, evaluate the rows of the report,
write the merged model, track. The library API (``run_swarm``) and the Prefect flow both
run ``run_pipeline``; they differ only in two seams:

- ``Scoring``: how particles, final rows and baselines are scored: ``InProcessScoring``
  here (one ``RunContext`` in this process), or Prefect tasks on a task runner
  (``psomerge.orchestration``), whose workers each hold their own ``RunContext``;
- ``Tracker``: what is tracked: nothing (``NullTracker``), or MLflow (``psomerge.tracking``).

Only configs, coefficient arrays, paths and fingerprints cross a seam; never tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from psomerge.config import RunConfig
from psomerge.paths import data_dir
from psomerge.evaluation import EvalResult, EvalSuite
from psomerge.generation import open_generator
from psomerge.hashing import digest
from psomerge.io import check_compatible, check_weights, model_labels, open_model
from psomerge.io.vocab import align_vocabularies
from psomerge.merging.baselines import baseline_checkpoint
from psomerge.progress import SILENT, Progress, ProgressTask
from psomerge.swarm import build_basis, make_optimizer, member_coefficients
from psomerge.swarm.basis import Basis
from psomerge.swarm.cache import FitnessCache
from psomerge.swarm.fitness import ParticleEvaluator, Race
from psomerge.swarm.run import (
    RunLock, StepReport, check_optimizer, check_provenance, load_checkpoint, run_optimizer,
)
from psomerge.swarm.selection import choose, selection_candidates
from psomerge.swarm.warm_start import warm_starts

log = logging.getLogger(__name__)


# -- what a run counts -------------------------------------------------------------------

@dataclass
class Usage:
    """What scoring consumed: generated tokens and LLM-judge use."""

    generated_tokens: int = 0
    judge_calls: int = 0
    judge_cache_hits: int = 0
    judge_tokens: int = 0
    judge_cost: float = 0.0

    def minus(self, before: "Usage") -> "Usage":
        return Usage(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})


@dataclass
class Counts(Usage):
    """Everything a run counts, reported per step and at the end, and kept across a resume."""

    fitness_calls: int = 0  # particles asked for, cached or not
    scorings: int = 0  # particles materialised and scored
    cache_hits: int = 0  # answered by a cache (psomerge's fitness cache or Prefect's task cache)
    task_cache_hits: int = 0  # of which Prefect's result cache answered
    examples_scored: int = 0  # by fitness evaluations (raced ones count what they scored)
    selection_examples: int = 0  # scored on the validation split to choose the merged model

    def add(self, usage: Usage) -> None:
        for f in fields(Usage):
            setattr(self, f.name, getattr(self, f.name) + getattr(usage, f.name))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Counts":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class ParticleScore:
    """One particle's fitness, and what scoring it cost."""

    fitness: float
    scores: dict[str, float]
    scored: bool  # False: answered by a cache
    examples: int = 0  # examples scored for it (0 on a cache hit)
    usage: Usage = field(default_factory=Usage)
    task_cached: bool = False  # answered by Prefect's task cache
    raced: bool = False  # stopped early by racing: its fitness is an estimate below its target


@dataclass
class Row:
    """One row of a report: a model's judge scores on each split."""

    label: str
    heldout: EvalResult
    optimisation: EvalResult
    usage: Usage = field(default_factory=Usage)
    validation: EvalResult | None = None  # where suites have a validation split


@dataclass
class BasisInfo:
    """What the driver of a run needs to know of the basis (workers hold the basis itself)."""

    fingerprint: str
    k: int
    groups: int
    labels: list[str]
    group_labels: list[str]
    fingerprints: dict[str, str]  # content hash of base and each expert, by path
    n_experts: int
    # what scores are measured on: {"fingerprint": judge, "fitness": search objective,
    # "suites": {name: {"data": ..., "suite": ...}}}
    evaluation: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)  # suite weights

    @property
    def eval_fingerprint(self) -> str:
        """What report rows are measured on: suites, splits, judges, generation settings."""
        return self.evaluation.get("fingerprint", "")


@dataclass
class Registration:
    run_id: str
    version: str
    promotion: dict[str, Any]
    reused: bool = False  # the same model was registered before: its version was reused, not duplicated


@dataclass
class Candidate:
    """A particle that competed on the validation split."""

    position: np.ndarray
    search_fitness: float
    validation_fitness: float
    origin: str  # "search", "soup" or "warm start"


@dataclass
class RunResult:
    """What one run produced. ``best_position`` is the merged model: the search's global best,
    or, with a validation split, the candidate that scored best there."""

    config: RunConfig
    basis: BasisInfo
    best_position: np.ndarray
    best_fitness: float  # its fitness on the optimisation split (a soup: the lowest of its ingredients')
    best_scores: dict[str, float]
    history: list[dict]
    counts: Counts
    rows: list[Row] = field(default_factory=list)  # base, experts, baselines, the merge
    output_dir: Path | None = None
    model_dir: Path | None = None
    registration: Registration | None = None
    candidates: list[Candidate] = field(default_factory=list)  # model selection, where it ran

    @property
    def merged_label(self) -> str:
        """``psomerge:paper`` for PSO-Merging as published, else ``psomerge:<optimizer>``."""
        return "psomerge:paper" if self.config.preset == "paper" else f"psomerge:{self.config.optimizer.type}"

    @property
    def heldout(self) -> list[tuple[str, EvalResult]]:
        return [(r.label, r.heldout) for r in self.rows]


# -- what scoring needs, in one process ------------------------------------------------------

class RunContext:
    """The basis, suites, fitness cache and resident models of one run config, in one
    process: what scoring a particle, a report row or a baseline needs."""

    def __init__(self, config: RunConfig, progress: Progress = SILENT):
        self.config = config
        self.progress = progress
        cache_root = data_dir() / "cache"
        # scorers first: an unusable one (a code sandbox that cannot work here) fails before the basis is built;
        # identical judge rubrics are judged once, across runs
        self.suites = [EvalSuite.from_settings(s, judge_cache=cache_root / "judge.sqlite", base_model=config.base)
                       for s in config.suites]
        members = config.warm_start.members if config.warm_start is not None else []
        extra = [(f"merge:{name}", self.static_merge(name)) for name in members]
        self.basis: Basis = build_basis(config.base, config.experts, cache_root / "basis", config.basis, extra,
                                        progress)
        device = config.basis.resident_device
        self.evaluator = ParticleEvaluator(self.basis, self.suites, FitnessCache(config.fitness_cache_path()),
                                           lambda: open_generator(config.generation, self.basis.model_dir, device),
                                           # GPU and CPU numerics differ: scores are keyed by device
                                           {**config.generation.cache_config(), "device": device},
                                           config.racing, progress)

    def static_merge(self, name: str) -> Path:
        """A static merge of the experts (a baseline, or a warm-start member), merged once
        and shared by every run that asks for the same recipe."""
        cfg = self.config
        return baseline_checkpoint(name, cfg.base, list(cfg.experts), cfg.basis.seed, data_dir() / "cache" / "merges",
                                   cfg.basis.tokenizer_source, self.progress)

    def info(self) -> BasisInfo:
        b = self.basis
        fingerprints = {m.name: m.fingerprint() for m in b.members[: 1 + b.n_experts]}
        evaluation = {"fingerprint": self.evaluator.fingerprint, "fitness": self.evaluator.fitness_fingerprint,
                      "suites": {s.name: {"data": s.data_fingerprint, "suite": digest([s.fingerprint(), s.fingerprint(
                          "fitness")])} for s in self.suites}}
        return BasisInfo(b.fingerprint, b.k, b.num_groups, b.labels, b.group_labels, fingerprints, b.n_experts,
                         evaluation, {s.name: s.weight for s in self.suites})

    def usage(self) -> Usage:
        """Usage so far (exact with one scoring thread per process)."""
        u = Usage(generated_tokens=self.evaluator.generated_tokens())
        for suite in self.suites:
            s = suite.scorer.usage()
            u.judge_calls += s.calls
            u.judge_cache_hits += s.cache_hits
            u.judge_tokens += s.tokens
            u.judge_cost += s.cost
        return u

    def score(self, coeffs: np.ndarray, target: tuple[float, np.ndarray] | None = None) -> ParticleScore:
        """One particle's fitness, raced against ``target`` (fitness, holder) when racing is on."""
        before, counts = self.usage(), self.evaluator.counts
        scorings, examples = counts.scorings, counts.examples_scored
        race = Race(target[0], np.asarray(target[1])) if target is not None else None
        result = self.evaluator(np.asarray(coeffs), race)
        return ParticleScore(result.fitness, result.scores, counts.scorings > scorings,
                             counts.examples_scored - examples, self.usage().minus(before),
                             raced=bool(result.meta.get("raced")))

    @property
    def has_validation(self) -> bool:
        return any(s.validation_size for s in self.suites)

    def evaluate(self, label: str, coeffs: np.ndarray) -> Row:
        """A report row for a particle (base, an expert, the merge): every split."""
        return self._row(label, lambda split: self.evaluator.evaluate(np.asarray(coeffs), split))

    def validate(self, coeffs: np.ndarray) -> tuple[EvalResult, Usage]:
        """A candidate's judge scores on the validation split (model selection reads only this)."""
        before = self.usage()
        result = self.evaluator.evaluate(np.asarray(coeffs), "validation")
        return result, self.usage().minus(before)

    def score_checkpoint(self, folder: Path, split: str) -> EvalResult:
        """A checkpoint folder's judge scores on a split (the promotion gate re-scores a
        champion measured on other examples)."""
        return self.evaluator.evaluate_checkpoint(folder, split)

    def baseline(self, name: str) -> Row:
        """A report row for a static merge of the experts (merged once, cached by recipe)."""
        folder = self.static_merge(name)
        return self._row(name, lambda split: self.evaluator.evaluate_checkpoint(folder, split))

    def _row(self, label: str, score: Callable[[str], EvalResult]) -> Row:
        before = self.usage()
        held, opt = score("heldout"), score("optimisation")
        val = score("validation") if self.has_validation else None
        return Row(label, held, opt, self.usage().minus(before), val)

    def write_model(self, coeffs: np.ndarray, out_dir: Path) -> Path:
        return self.basis.write_particle(np.asarray(coeffs), out_dir)

    def close(self) -> None:
        for suite in self.suites:  # stop judge servers this run started
            suite.scorer.close()
        self.evaluator.close()  # and generation engines


def validate_models(config: RunConfig) -> None:
    """Architecture, tensor names, shapes and vocabularies of base and experts, and finite
    weights in every one of them, before any work (errors name the model and tensor); a
    warning for an expert whose weights equal the base's."""
    base = open_model(config.base, name=str(config.base))
    experts = [open_model(e, name=str(e), base=base) for e in config.experts]
    check_compatible(*align_vocabularies(base, experts, config.basis.tokenizer_source))
    check_weights(base, experts)


def run_provenance(config: RunConfig, info: BasisInfo) -> dict[str, Any]:
    """What a run searches over, recorded in its checkpoint and compared on resume
    (``swarm.run.check_provenance``): the search settings (not ``steps`` or a CMA-ES
    ``budget``: a finished run may be resumed to go further; not paths: content is compared),
    the content of base and experts, each suite's data and settings, the basis and the
    evaluation fingerprints. Model selection runs after the search: not compared."""
    # a suite's scorer is compared by its fingerprint (what changes scores, not e.g. concurrency); its chat
    # template and lm-eval task by what they give, the rendered prompts and task config in its data fingerprint
    suites = {s.name: s.model_dump(mode="json", exclude={"name", "dataset", "judge", "chat", "lm_eval"})
              for s in config.suites}
    settings = _flatten({"suites": suites, "generation": config.generation.cache_config(),
                         "basis": config.basis.model_dump(mode="json", exclude={"storage"}),
                         "optimizer": config.optimizer.model_dump(mode="json", exclude={"steps", "budget"}),
                         "warm_start": config.warm_start and config.warm_start.model_dump(mode="json"),
                         "racing": config.racing and config.racing.model_dump(mode="json")})
    labels = ["base", *model_labels(config.experts)]
    models = [[label, info.fingerprints[str(p)]] for label, p in zip(labels, [config.base, *config.experts])]
    return {"settings": settings, "models": models, "suites": info.evaluation.get("suites", {}),
            "basis": info.fingerprint,
            "evaluation": [info.evaluation.get("fingerprint"), info.evaluation.get("fitness")]}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# -- the seams ---------------------------------------------------------------------------

class Scoring(Protocol):
    """How particles and report rows are scored."""

    def prepare(self) -> BasisInfo: ...
    def score(self, positions: list[np.ndarray], targets: list,
              progress: ProgressTask | None = None) -> list[ParticleScore]: ...
    def evaluate(self, particles: dict[str, np.ndarray]) -> list[Row]: ...
    def validate(self, particles: list[np.ndarray]) -> list[tuple[EvalResult, Usage]]: ...
    def baseline(self, name: str) -> Row: ...
    def score_checkpoint(self, folder: Path, split: str) -> EvalResult: ...
    def write_model(self, coeffs: np.ndarray, out_dir: Path) -> Path: ...
    def close(self) -> None: ...


class InProcessScoring:
    """Scoring in this process, one particle after another."""

    def __init__(self, config: RunConfig, context: RunContext | None = None, progress: Progress = SILENT):
        self.config = config
        self.context = context
        self.progress = progress
        self._own = context is None

    def prepare(self) -> BasisInfo:
        validate_models(self.config)
        if self.context is None:
            self.context = RunContext(self.config, self.progress)
        return self.context.info()

    def score(self, positions: list[np.ndarray], targets: list,
              progress: ProgressTask | None = None) -> list[ParticleScore]:
        out = []
        for x, t in zip(positions, targets):
            out.append(self.context.score(x, t))
            if progress is not None:
                progress.advance()
        return out

    def evaluate(self, particles: dict[str, np.ndarray]) -> list[Row]:
        return [self.context.evaluate(label, x) for label, x in particles.items()]

    def validate(self, particles: list[np.ndarray]) -> list[tuple[EvalResult, Usage]]:
        return [self.context.validate(x) for x in particles]

    def baseline(self, name: str) -> Row:
        return self.context.baseline(name)

    def score_checkpoint(self, folder: Path, split: str) -> EvalResult:
        return self.context.score_checkpoint(folder, split)

    def write_model(self, coeffs: np.ndarray, out_dir: Path) -> Path:
        return self.context.write_model(coeffs, out_dir)

    def close(self) -> None:
        if self._own and self.context is not None:
            self.context.close()


class Tracker(Protocol):
    """What is tracked. ``start`` returns state kept in the swarm checkpoint and given back
    on resume (e.g. the tracking run to continue)."""

    def start(self, config: RunConfig, info: BasisInfo, resumed: dict[str, Any] | None) -> dict[str, Any]: ...
    def log_step(self, report: StepReport) -> None: ...
    def log_baseline(self, row: Row) -> None: ...
    def finish(self, result: RunResult, checkpoint: Path,
               rescore: Callable[[Path, str], EvalResult]) -> Registration | None: ...
    def close(self, failed: bool) -> None: ...


class NullTracker:
    def start(self, config, info, resumed):
        return {}

    def log_step(self, report):
        pass

    def log_baseline(self, row):
        pass

    def finish(self, result, checkpoint, rescore):
        return None

    def close(self, failed):
        pass


# -- the run ---------------------------------------------------------------------------------

def run_pipeline(
    config: RunConfig,
    *,
    scoring: Scoring | None = None,
    tracker: Tracker | None = None,
    resume: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    evaluate_heldout: bool = True,
    progress: Progress = SILENT,
) -> RunResult:
    """Search, then (``evaluate_heldout``) score the report's rows and write the merged model.

    Rows: base, each expert, each static baseline (``config.baselines``), then the merge.
    A resumed run continues from the last step's checkpoint; particles scored after it
    come from the fitness cache.
    """
    scoring = scoring or InProcessScoring(config)
    tracker = tracker or NullTracker()
    out = config.run_dir()
    lock = RunLock(out).acquire()  # one run at a time in a run folder
    checkpoint = out / "checkpoint.json"
    failed = True
    try:
        previous = load_checkpoint(checkpoint) if resume else {}
        if previous:
            check_optimizer(previous, config.optimizer.type, checkpoint)
        info = scoring.prepare()
        provenance = run_provenance(config, info)
        if previous:
            check_provenance(previous, provenance, checkpoint)
        counts = Counts.from_dict(previous.get("counts", {}))
        tracker_state = tracker.start(config, info, previous.get("tracker"))

        # complete (not raced) fitnesses of this run, for model selection; kept across a resume
        evaluated = [(np.asarray(x), f) for x, f in previous.get("evaluated", [])]

        def score_batch(positions: list[np.ndarray], targets: list) -> list[ParticleScore]:
            task = progress.start(f"step {optimizer.step}: particles", len(positions))
            try:
                results = scoring.score(positions, targets if config.racing is not None else [None] * len(positions),
                                        task)
            finally:
                task.close()
            evaluated.extend((x, r.fitness) for x, r in zip(positions, results) if not r.raced)
            for r in results:
                counts.fitness_calls += 1
                counts.scorings += r.scored
                counts.cache_hits += not r.scored
                counts.task_cache_hits += r.task_cached
                counts.examples_scored += r.examples
                counts.add(r.usage)
            return results

        def step(report: StepReport) -> None:
            tracker.log_step(report)
            if on_step:
                on_step(report)

        starts = warm_starts(config.warm_start, info.k, info.groups, info.n_experts)
        optimizer = make_optimizer(config.optimizer, info.k, info.groups, n_experts=info.n_experts, starts=starts)
        search = run_optimizer(optimizer, None, evaluate_batch=score_batch, checkpoint=checkpoint, resume=resume,
                               on_step=step, counts=counts.as_dict,
                               checkpoint_extra=lambda: {"tracker": tracker_state, "provenance": provenance,
                                                         "evaluated": [[x.tolist(), f] for x, f in evaluated]})
        result = RunResult(config, info, search.best_position, search.best_fitness, search.best_scores,
                           search.history, counts, output_dir=out)
        if evaluate_heldout and config.selection is not None and any(s.validation_size for s in config.suites):
            _select(result, scoring, evaluated, starts, counts)
        if evaluate_heldout:
            members = {label: member_coefficients(info.k, info.groups, j)
                       for j, label in enumerate(info.labels[: 1 + len(config.experts)])}
            rows = scoring.evaluate(members)
            for name in config.baselines:
                rows.append(scoring.baseline(name))
                tracker.log_baseline(rows[-1])
            rows += scoring.evaluate({result.merged_label: result.best_position})
            for row in rows:
                counts.add(row.usage)
            result.rows = rows
            result.model_dir = scoring.write_model(result.best_position, out / "model")
            result.registration = tracker.finish(result, checkpoint, scoring.score_checkpoint)
        failed = False
        return result
    finally:
        try:
            tracker.close(failed)
            scoring.close()
        finally:
            lock.release()


def _select(result: RunResult, scoring: Scoring, evaluated: list[tuple[np.ndarray, float]],
            starts: list[np.ndarray], counts: Counts) -> None:
    """Model selection on the validation split: the search's best distinct particles, their
    soup and the best warm start compete; the winner becomes the merged model."""
    picked = selection_candidates(evaluated, starts, result.config.selection)
    validations = scoring.validate([p[0] for p in picked])
    for validation, usage in validations:
        counts.add(usage)
        counts.selection_examples += validation.num_examples
    result.candidates = [Candidate(x, f, v.fitness, origin) for (x, f, origin), (v, _) in zip(picked, validations)]
    best = result.candidates[choose([c.search_fitness for c in result.candidates],
                                    [c.validation_fitness for c in result.candidates])]
    result.best_position, result.best_fitness = best.position, best.search_fitness


def run_swarm(config: RunConfig, *, resume: bool = False, on_step: Callable[[StepReport], None] | None = None,
              evaluate_heldout: bool = True, context: RunContext | None = None,
              progress: Progress = SILENT) -> RunResult:
    """The library API: one run in this process, nothing tracked."""
    return run_pipeline(config, scoring=InProcessScoring(config, context, progress), resume=resume, on_step=on_step,
                        evaluate_heldout=evaluate_heldout, progress=progress)


def with_seed(config: RunConfig, offset: int) -> RunConfig:
    """The same run with the optimiser's seed moved by ``offset`` (its own run folder)."""
    if offset == 0:
        return config
    optimizer = config.optimizer.model_copy(update={"seed": config.optimizer.seed + offset})
    update: dict[str, Any] = {"name": f"{config.name}-seed{optimizer.seed}", "optimizer": optimizer}
    if config.output_dir is not None:
        update["output_dir"] = config.output_dir / f"seed{optimizer.seed}"
    return config.model_copy(update=update)


def run_seeds(config: RunConfig, seeds: int, **kwargs: Any) -> list[RunResult]:
    """The search repeated with ``seeds`` optimiser seeds (the basis, baselines and caches are
    shared, so only the searches cost): how much of a result is the seed's luck."""
    return [run_swarm(with_seed(config, i), **kwargs) for i in range(seeds)]
