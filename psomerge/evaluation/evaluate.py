"""Evaluate one resident model on eval suites: generate (or read likelihoods), score, aggregate.

Two objectives: ``judge``, each suite's own scorer (what reports show), and ``fitness``, each
suite's fitness terms (what the search optimises on its split: the judge by default, or a
weighted mix with smooth likelihood scorers). Per-example values are kept, so scores can be
resumed from a subset (racing) and compared example by example (paired statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from psomerge.evaluation.suite import EvalSuite, Split
from psomerge.progress import ProgressTask

Objective = Literal["judge", "fitness"]


@dataclass
class EvalResult:
    scores: dict[str, float]  # suite name -> mean score in [0, 1]
    fitness: float  # weighted mean over suites
    num_examples: int
    scored: dict[str, list[float]] = field(default_factory=dict, repr=False)  # per-example values


def weighted_mean(scores: Mapping[str, float], suites: Sequence[EvalSuite]) -> float:
    total = sum(s.weight for s in suites)
    return sum(scores[s.name] * s.weight for s in suites) / total


GENERATION_CHUNK = 256  # prompts per generate call: progress is reported between chunks


def evaluate(generator, suites: Sequence[EvalSuite], split: Split, objective: Objective = "judge",
             select: Mapping[str, Sequence[int]] | None = None, progress: ProgressTask | None = None) -> EvalResult:
    """Score ``split`` (or the positions ``select[suite]`` of it) of every suite. Prompts of
    all suites are generated in batched passes; likelihood scorers read the model.
    ``progress`` advances by examples."""
    per_suite = []
    for s in suites:
        examples = s.split(split)
        if select is not None:
            examples = [examples[i] for i in select.get(s.name, ())]
        terms = [(s.scorer, 1.0)] if objective == "judge" else s.fitness_terms
        per_suite.append((s, examples, terms))
    prompts = [ex.prompt for s, examples, terms in per_suite if any(not _reads_model(t) for t, _ in terms)
               for ex in examples]
    generated: list[str] = []
    for start in range(0, len(prompts), GENERATION_CHUNK):
        chunk = prompts[start: start + GENERATION_CHUNK]
        generated += generator.generate(chunk)
        if progress is not None:
            progress.advance(len(chunk))
    answers = iter(generated)
    scores: dict[str, float] = {}
    scored: dict[str, list[float]] = {}
    for suite, examples, terms in per_suite:
        suite_answers = ([next(answers) for _ in examples] if any(not _reads_model(t) for t, _ in terms) else None)
        combined = [0.0] * len(examples)
        total = sum(w for _, w in terms)
        for scorer, w in terms:
            if not examples:
                break
            values = (scorer.score_model(generator, examples) if _reads_model(scorer)
                      else scorer.score(examples, suite_answers))
            for i, v in enumerate(values):
                combined[i] += w * v.value / total
        scored[suite.name] = combined
        scores[suite.name] = sum(combined) / len(combined) if combined else 0.0
        if progress is not None and suite_answers is None:
            progress.advance(len(examples))  # scored by likelihood alone: no generation advanced it
    n = sum(len(examples) for _, examples, _ in per_suite)
    return EvalResult(scores, weighted_mean(scores, suites), n, scored)


def _reads_model(scorer) -> bool:
    return getattr(scorer, "reads_model", False)
