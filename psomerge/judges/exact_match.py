"""Exact match after answer extraction (an optional regex, on the model's answer) and
normalisation (of both answer and reference)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import field_validator, model_validator

from psomerge.judges.protocol import Example, Score, ScorerBase
from psomerge.yamlconfig import StrictModel, validate

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_text(s: str) -> str:
    """Case-folded, whitespace collapsed, surrounding punctuation stripped."""
    return " ".join(s.strip().casefold().split()).strip(" .")


def extract_number(s: str) -> str:
    """The answer number of free text: after GSM8K's '####', else after 'the answer is',
    else the last number. Commas and trailing '.0' are dropped; '' when there is none."""
    for marker in ("####", "the answer is"):
        pos = s.casefold().rfind(marker)
        if pos >= 0:
            found = _NUMBER.search(s[pos + len(marker):])
            if found:
                return _canonical_number(found.group())
    found = _NUMBER.findall(s)
    return _canonical_number(found[-1]) if found else ""


def _canonical_number(n: str) -> str:
    n = n.replace(",", "")
    if "." in n:
        n = n.rstrip("0").rstrip(".")
    return n


def extract_choice(s: str) -> str:
    """A multiple-choice letter: '(B)', 'B.', 'Answer: b', 'B' -> 'B'."""
    m = re.search(r"(?:answer\s*(?:is)?\s*:?\s*)?\(?\b([A-Ja-j])\b\)?", s.strip())
    return m.group(1).upper() if m else ""


NORMALIZERS: dict[str, Callable[[str], str]] = {
    "none": lambda s: s.strip(),
    "text": normalize_text,
    "number": extract_number,
    "choice": extract_choice,
}


def extract_match(pattern: re.Pattern[str], text: str, which: Literal["first", "last"] = "first") -> str:
    """The answer a regex finds in free text: of the first (or last) match, its first non-empty
    group, or the whole match where the pattern has no groups (as lm-eval's ``regex`` filter
    picks); '' when nothing matches."""
    if which == "first":
        m = pattern.search(text)
    else:
        found = list(pattern.finditer(text))
        m = found[-1] if found else None
    if m is None:
        return ""
    return next((g for g in m.groups() if g), "") if pattern.groups else m.group()


class ExactMatchSettings(StrictModel):
    type: Literal["exact_match"] = "exact_match"
    normalizer: Literal["none", "text", "number", "choice"] = "text"
    # a regex finding the answer in the model's output, before normalisation (the reference is
    # only normalised); e.g. 'answer is \(?([A-D])' in YAML single quotes
    extract: str | None = None
    extract_match: Literal["first", "last"] | None = None  # which match counts (default: first)

    @field_validator("extract")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return pattern

    @model_validator(mode="after")
    def _match_needs_pattern(self) -> "ExactMatchSettings":
        if self.extract_match is not None and self.extract is None:
            raise ValueError("'extract_match' applies only with 'extract' (a regex): set extract or remove it")
        return self


class ExactMatch(ScorerBase):
    """1.0 when the normalised answer equals the normalised reference."""

    name = "exact_match"

    def __init__(self, settings: ExactMatchSettings | None = None, **fields: Any):
        self.settings = settings or validate(ExactMatchSettings, fields, "exact_match")

    def config(self) -> dict[str, Any]:
        config = {"type": self.name, "normalizer": self.settings.normalizer}
        if self.settings.extract is not None:  # absent otherwise: keys of scores cached before it existed stay valid
            config["extract"] = [self.settings.extract, self.settings.extract_match or "first"]
        return config

    def score(self, examples: Sequence[Example], answers: Sequence[str]) -> list[Score]:
        s = self.settings
        norm = NORMALIZERS[s.normalizer]
        if s.extract is not None:
            pattern = re.compile(s.extract)
            answers = [extract_match(pattern, a, s.extract_match or "first") for a in answers]
        return [Score(float(norm(a) == norm(ex.answer) and norm(ex.answer) != "")) for ex, a in zip(examples, answers)]
