"""The promotion gate's decision: does a candidate beat the champion, beyond noise, on the
same examples?

A score is comparable with another only when both were measured on the same examples by the
same scorers: ``GateScores`` carries what it was measured on (a fingerprint of the suites,
their split and the generation settings) and the per-example values, so the gate can compare
example by example (paired bootstrap) and refuse to compare scores of different examples.
The gate reads the validation split where the suites have one (the held-out split stays for
the report), else the held-out split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from psomerge.evaluation.statistics import paired_bootstrap, weighted_score


@dataclass(frozen=True)
class GateScores:
    split: str
    fingerprint: str  # what the scores were measured on: suites, split, scorers, generation settings
    scored: dict[str, list[float]]  # per suite, per example
    weights: dict[str, float]

    @property
    def num_examples(self) -> int:
        return sum(len(v) for v in self.scored.values())

    @property
    def score(self) -> float:
        return weighted_score(self.scored, self.weights) if self.num_examples else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reason: str
    difference: float | None = None
    p_not_better: float | None = None


def decide(candidate: GateScores, champion: GateScores | None, margin: float, confidence: float) -> GateDecision:
    """Promote when there is no champion yet, or when the candidate beats it on the same
    examples by more than ``margin`` with the bootstrap's one-sided ``confidence``. A candidate
    scored on no example, or compared on other examples than the champion, is never promoted."""
    if candidate.num_examples == 0:
        return GateDecision(False, "the candidate was scored on no example")
    if champion is None:
        return GateDecision(True, f"first champion ({candidate.split} {candidate.score:.4f})")
    if champion.fingerprint != candidate.fingerprint or champion.scored.keys() != candidate.scored.keys() or any(
            len(champion.scored[s]) != len(candidate.scored[s]) for s in candidate.scored):
        return GateDecision(False, "champion and candidate were scored on different examples (re-score the champion "
                                   "on the candidate's suites to compare them)")
    c = paired_bootstrap(candidate.scored, champion.scored, candidate.weights, margin=margin)
    d = c.difference
    detail = (f"{candidate.split} {candidate.score:.4f} vs champion {champion.score:.4f}: {d.mean:+.4f}, "
              f"95% CI [{d.low:+.4f}, {d.high:+.4f}], P(gain <= margin {margin}) = {c.p_not_better:.3f}")
    if d.mean > margin and c.p_not_better < 1 - confidence:
        return GateDecision(True, detail, d.mean, c.p_not_better)
    return GateDecision(False, f"not beyond noise: {detail}", d.mean, c.p_not_better)
