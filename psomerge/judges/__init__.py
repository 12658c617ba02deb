"""Scorers behind one small protocol: exact match, code execution, LLM judges, plugins."""

from psomerge.judges.exact_match import ExactMatch, ExactMatchSettings
from psomerge.judges.factory import JudgeSettings, make_scorer
from psomerge.judges.protocol import Example, Score, Scorer, ScorerUsage

__all__ = ["Example", "ExactMatch", "ExactMatchSettings", "JudgeSettings", "Score", "Scorer", "ScorerUsage",
           "make_scorer"]
