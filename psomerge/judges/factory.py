"""Scorers by name: the settings model and class of each built-in judge, in an explicit
table (nothing registers itself on import), plus third-party scorers installed under the
``psomerge.scorers`` entry-point group (a callable taking the YAML keys)."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, field_validator

from psomerge.errors import ConfigError
from psomerge.judges.code_exec import CodeExec, CodeExecSettings
from psomerge.judges.exact_match import ExactMatch, ExactMatchSettings
from psomerge.judges.likelihood import (
    AnswerLikelihood, AnswerLikelihoodSettings, MultipleChoice, MultipleChoiceSettings,
)
from psomerge.judges.llm import LLMJudge, LLMJudgeSettings
from psomerge.judges.protocol import Scorer, ScorerBase, ScorerUsage
from psomerge.yamlconfig import StrictModel, tagged_union

ENTRY_POINT_GROUP = "psomerge.scorers"


def plugin_scorers() -> dict[str, Any]:
    """Installed scorer plugins by name (they may not shadow a built-in)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}


class PluginJudgeSettings(StrictModel):
    """A scorer from an installed plugin: its keys go to the plugin as they are."""

    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _installed(cls, kind: str) -> str:
        known = sorted(BUILTIN) + sorted(plugin_scorers())
        if kind not in known:
            raise ValueError(f"{kind!r} is not a scorer; known: {', '.join(known)}")
        return kind


BUILTIN: dict[str, tuple[type[StrictModel], Callable[..., Scorer]]] = {
    "exact_match": (ExactMatchSettings, ExactMatch),
    "code_exec": (CodeExecSettings, CodeExec),
    "llm": (LLMJudgeSettings, LLMJudge),
    "answer_likelihood": (AnswerLikelihoodSettings, AnswerLikelihood),
    "multiple_choice": (MultipleChoiceSettings, MultipleChoice),
}

# A judge section: a built-in by its type; any other type is a plugin's, checked to be installed.
JudgeSettings = tagged_union({**{k: v[0] for k, v in BUILTIN.items()}, "<plugin>": PluginJudgeSettings},
                             default="exact_match", fallback="<plugin>")


class _Plugin(ScorerBase):
    """A plugin scorer with the protocol's optional methods filled in where it lacks them."""

    def __init__(self, scorer: Any):
        self._scorer = scorer
        self.name = scorer.name

    def config(self) -> dict[str, Any]:
        return self._scorer.config()

    def score(self, examples, answers):
        return self._scorer.score(examples, answers)

    def usage(self) -> ScorerUsage:
        return self._scorer.usage() if hasattr(self._scorer, "usage") else ScorerUsage()

    def close(self) -> None:
        if hasattr(self._scorer, "close"):
            self._scorer.close()


def make_scorer(settings: Any, *, judge_cache: str | Path | None = None) -> Scorer:
    """The scorer for validated ``settings``. ``judge_cache`` is the persistent cache file of
    LLM judges (identical (prompt, answer) pairs are judged once, across runs)."""
    if isinstance(settings, PluginJudgeSettings):
        options = settings.model_dump(exclude={"type"})
        try:
            return _Plugin(plugin_scorers()[settings.type].load()(**options))
        except TypeError as exc:
            raise ConfigError(f"scorer {settings.type!r}: {exc}") from None
    if isinstance(settings, LLMJudgeSettings):
        return LLMJudge(settings, cache_path=judge_cache)
    return BUILTIN[settings.type][1](settings)
