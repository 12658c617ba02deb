"""The scorer protocol: batches of (example, model answer) in, scores in [0, 1] out."""

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


@runtime_checkable
class Scorer(Protocol):
    name: str

    def config(self) -> dict[str, Any]:
        """Everything that changes a score: part of every cache key."""

    def score(self, examples: Sequence[Example], answers: Sequence[str]) -> list[Score]:
        """One score per (example, answer) pair, in order."""
