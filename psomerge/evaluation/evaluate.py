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


def evaluate(generator, suites: Sequence[EvalSuite], split: Split, objective: Objective = "judge",
             select: Mapping[str, Sequence[int]] | None = None) -> EvalResult:
    """Score ``split`` (or the positions ``select[suite]`` of it) of every suite. Prompts of
    all suites are generated in one batched pass; likelihood scorers read the model."""
    per_suite = []
    for s in suites:
        examples = s.split(split)
        if select is not None:
            examples = [examples[i] for i in select.get(s.name, ())]
        terms = [(s.scorer, 1.0)] if objective == "judge" else s.fitness_terms
        per_suite.append((s, examples, terms))
    prompts = [ex.prompt for s, examples, terms in per_suite if any(not _reads_model(t) for t, _ in terms)
               for ex in examples]
    answers = iter(generator.generate(prompts) if prompts else [])
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
    n = sum(len(examples) for _, examples, _ in per_suite)
    return EvalResult(scores, weighted_mean(scores, suites), n, scored)


def _reads_model(scorer) -> bool:
    return getattr(scorer, "reads_model", False)
