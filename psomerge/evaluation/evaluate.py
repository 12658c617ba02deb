"""Evaluate one resident model on eval suites: generate, score, aggregate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from psomerge.evaluation.suite import EvalSuite, Split


@dataclass
class EvalResult:
    scores: dict[str, float]  # suite name -> mean score in [0, 1]
    fitness: float  # weighted mean over suites
    num_examples: int
    scored: dict[str, list[float]] = field(default_factory=dict, repr=False)


def weighted_mean(scores: dict[str, float], suites: Sequence[EvalSuite]) -> float:
    total = sum(s.weight for s in suites)
    return sum(scores[s.name] * s.weight for s in suites) / total


def evaluate(generator, suites: Sequence[EvalSuite], split: Split) -> EvalResult:
    """Generate answers to every prompt of ``split`` in one batched pass, then score per suite."""
    per_suite = [(s, s.split(split)) for s in suites]
    prompts = [ex.prompt for _, examples in per_suite for ex in examples]
    answers = generator.generate(prompts)
    scores: dict[str, float] = {}
    scored: dict[str, list[float]] = {}
    pos = 0
    for suite, examples in per_suite:
        chunk = answers[pos : pos + len(examples)]
        pos += len(examples)
        values = [sc.value for sc in suite.scorer.score(examples, chunk)]
        scored[suite.name] = values
        scores[suite.name] = sum(values) / len(values)
    return EvalResult(scores, weighted_mean(scores, suites), len(prompts), scored)
