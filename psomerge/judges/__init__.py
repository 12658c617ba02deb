"""Scorers behind one small protocol, and generation backends."""

from psomerge.judges.exact_match import ExactMatch
from psomerge.judges.protocol import Example, Score, Scorer

__all__ = ["Example", "ExactMatch", "Score", "Scorer"]
