"""Filling ``str.format`` templates (prompts, judge rubrics, test programs) with record
fields, with errors naming the template, the field and the record at fault."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from psomerge.errors import ConfigError

_HINT = "name a field such as {question}, and write a literal brace as {{ or }}"


def problem(template: str) -> str | None:
    """Why ``template`` cannot be filled by field name (positional placeholders such as '{}'
    or '{0}', unbalanced braces), or None."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return f"not a valid template ({exc}); {_HINT}"
    for f in fields:
        if f == "" or f.split(".")[0].split("[")[0].isdigit():
            return f"positional placeholder {{{f}}} in the template; {_HINT}"
    return None


def check(template: str, *, what: str) -> None:
    """Refuse a template that cannot be filled by field name, before any data is read."""
    found = problem(template)
    if found:
        raise ConfigError(f"{what}: {found}")


def field_validator_for(*names: str):
    """A pydantic validator refusing unfillable templates in the fields ``names``."""
    from pydantic import field_validator

    def _check(cls, value: str) -> str:
        found = problem(value)
        if found:
            raise ValueError(found)
        return value

    return field_validator(*names)(_check)


def fill(template: str, fields: Mapping[str, Any], *, what: str, record: str) -> str:
    """``template.format(**fields)``; ``what`` names the template, ``record`` the record."""
    check(template, what=what)
    try:
        return template.format(**fields)
    except KeyError as exc:
        raise ConfigError(f"{what} names field {exc.args[0]!r}, missing in {record}") from None
    except (IndexError, ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{what}: cannot fill the template from {record} ({exc}); {_HINT}") from None
