"""Eval suites, their splits, evaluation of one resident model, and score reports."""

from psomerge.evaluation.evaluate import EvalResult, evaluate, weighted_mean
from psomerge.evaluation.suite import EvalSuite, Split, SuiteSettings, read_records

__all__ = ["EvalResult", "EvalSuite", "Split", "SuiteSettings", "evaluate", "read_records", "weighted_mean"]
