"""Exact match after answer normalisation."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

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


class ExactMatchSettings(StrictModel):
    type: Literal["exact_match"] = "exact_match"
    normalizer: Literal["none", "text", "number", "choice"] = "text"


class ExactMatch(ScorerBase):
    """1.0 when the normalised answer equals the normalised reference."""

    name = "exact_match"

    def __init__(self, settings: ExactMatchSettings | None = None, **fields: Any):
        self.settings = settings or validate(ExactMatchSettings, fields, "exact_match")

    def config(self) -> dict[str, Any]:
        return {"type": self.name, "normalizer": self.settings.normalizer}

    def score(self, examples: Sequence[Example], answers: Sequence[str]) -> list[Score]:
        norm = NORMALIZERS[self.settings.normalizer]
        return [Score(float(norm(a) == norm(ex.answer) and norm(ex.answer) != "")) for ex, a in zip(examples, answers)]
