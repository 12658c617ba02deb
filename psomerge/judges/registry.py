"""Scorers by name. Built-ins are listed here explicitly; third-party scorers register
through the ``psomerge.scorers`` entry-point group (a callable taking the YAML keys)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from psomerge.errors import ConfigError
from psomerge.judges.code_exec import CodeExec
from psomerge.judges.exact_match import ExactMatch
from psomerge.judges.llm import LLMJudge
from psomerge.judges.protocol import Scorer

BUILTIN: dict[str, Callable[..., Scorer]] = {
    "exact_match": ExactMatch,
    "code_exec": CodeExec,
    "llm": LLMJudge,
}
ENTRY_POINT_GROUP = "psomerge.scorers"
_INTERNAL_FIELDS = {"name", "stats"}


def scorer_factories() -> dict[str, Callable[..., Scorer]]:
    """Built-ins, then installed plugins (which may not shadow a built-in name)."""
    factories = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        factories.setdefault(ep.name, lambda ep=ep, **kw: ep.load()(**kw))
    return factories


def make_scorer(config: dict[str, Any], where: str = "judge") -> Scorer:
    """Build the scorer named by ``config['type']`` from the remaining keys."""
    config = dict(config)
    factories = scorer_factories()
    kind = config.pop("type", None)
    if kind not in factories:
        raise ConfigError(f"{where}.type: {kind!r} is not a scorer; known: {', '.join(sorted(factories))}")
    factory = factories[kind]
    if dataclasses.is_dataclass(factory):
        accepted = {f.name for f in dataclasses.fields(factory) if f.init and f.name not in _INTERNAL_FIELDS}
        unknown = sorted(set(config) - accepted)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} for scorer {kind!r} "
                              f"(accepted: {', '.join(sorted(accepted))})")
    try:
        return factory(**config)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
