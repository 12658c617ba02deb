"""The scorer protocol: batches of (example, model answer) in, scores in [0, 1] out.

A scorer is built from its settings (a config section, ``judge:`` in YAML); ``config()`` is
what changes a score and goes into every cache key; ``usage()`` reports API use (LLM
judges) and ``close()`` releases what the scorer started (a judge server). ``ScorerBase``
gives the last two to scorers that use nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Example:
    """One evaluation example: the rendered prompt, the reference answer, its source fields."""

    id: str
    prompt: str
    answer: str
    fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Score:
    value: float  # in [0, 1]
    meta: dict[str, Any] = field(default_factory=dict)  # tokens, cost, error, ...


@dataclass
class ScorerUsage:
    """What a scorer consumed from an API: judge requests, cache hits, tokens, cost."""

    calls: int = 0
    cache_hits: int = 0
    tokens: int = 0
    cost: float = 0.0


@runtime_checkable
class Scorer(Protocol):
    name: str

    def config(self) -> dict[str, Any]:
        """Everything that changes a score: part of every cache key."""

    def score(self, examples: Sequence[Example], answers: Sequence[str]) -> list[Score]:
        """One score per (example, answer) pair, in order."""

    def usage(self) -> ScorerUsage:
        """API use so far (zeros for scorers that call no API)."""

    def close(self) -> None:
        """Release what the scorer started."""


class ScorerBase:
    """Defaults for scorers that call no API and start nothing."""

    def usage(self) -> ScorerUsage:
        return ScorerUsage()

    def close(self) -> None:
        pass
