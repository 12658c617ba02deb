"""Eval suites: a dataset, its prompt template, answer field, scorer, weight and splits.

("Task" is reserved for Prefect tasks.) Each suite is split once, deterministically, into an
optimisation split, read by the search, and a held-out split, read only by the final
evaluation: both come from one seeded permutation, so they are disjoint by construction.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from psomerge.errors import ConfigError
from psomerge.hashing import digest
from psomerge.judges.factory import JudgeSettings, make_scorer
from psomerge.judges.exact_match import ExactMatchSettings
from psomerge.judges.protocol import Example, Scorer
from psomerge.templates import field_validator_for, fill
from psomerge.yamlconfig import StrictModel

Split = Literal["optimisation", "validation", "heldout"]


class FitnessTerm(StrictModel):
    """One term of a suite's search objective: the suite's judge, or another scorer (e.g. a
    smooth ``answer_likelihood``), with a weight."""

    scorer: Literal["judge"] | JudgeSettings = "judge"
    weight: float = Field(1.0, gt=0)


class SuiteSettings(StrictModel):
    """One eval suite in a run config (``suites:``)."""

    name: str
    dataset: Path  # .jsonl, .csv, .parquet, or a folder written by datasets' save_to_disk
    dataset_split: str | None = None  # for a saved DatasetDict
    prompt_template: str = "{question}"
    answer_field: str = "answer"
    id_field: str | None = None
    judge: JudgeSettings = ExactMatchSettings()
    weight: float = Field(1.0, gt=0)
    optimisation_size: int = Field(60, gt=0)
    validation_size: int = Field(0, ge=0)  # model selection and the promotion gate read this split
    heldout_size: int | None = Field(None, gt=0)  # None: every example not in the other splits
    split_seed: int = 0
    # what the search optimises on the optimisation split (default: the judge alone); reports
    # always show the judge
    fitness: list[FitnessTerm] = Field(default_factory=lambda: [FitnessTerm()], min_length=1)

    check_templates = field_validator_for("prompt_template")


def _default(name: str) -> Any:
    return SuiteSettings.model_fields[name].default


@dataclass
class EvalSuite:
    """A loaded suite; its defaults are ``SuiteSettings``'."""

    name: str
    examples: list[Example]
    scorer: Scorer
    weight: float = _default("weight")
    optimisation_size: int = _default("optimisation_size")
    heldout_size: int | None = _default("heldout_size")  # None: every example not in the other splits
    split_seed: int = _default("split_seed")
    validation_size: int = _default("validation_size")
    fitness: list[tuple[Scorer, float]] | None = None  # search objective terms; None: the judge alone
    data_fingerprint: str = ""
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        n = len(self.examples)
        taken = self.optimisation_size + self.validation_size
        wanted = taken + (self.heldout_size or 0)
        if self.optimisation_size <= 0 or wanted > n or (self.heldout_size is None and taken >= n):
            raise ConfigError(
                f"eval suite {self.name!r}: optimisation_size={self.optimisation_size}, validation_size="
                f"{self.validation_size} and heldout_size={self.heldout_size} do not fit its {n} examples"
            )
        self._order = list(range(n))
        random.Random(self.split_seed).shuffle(self._order)
        if not self.data_fingerprint:
            h = hashlib.blake2b(digest_size=16)
            for ex in self.examples:  # every field: scorers read them (code_exec's tests, judge rubrics)
                h.update(json.dumps([ex.id, ex.prompt, ex.answer, ex.fields], sort_keys=True, default=repr).encode())
            self.data_fingerprint = h.hexdigest()

    @property
    def fitness_terms(self) -> list[tuple[Scorer, float]]:
        return self.fitness or [(self.scorer, 1.0)]

    def split(self, which: Split) -> list[Example]:
        """The examples of one split: one seeded permutation cut into optimisation,
        validation and held-out parts, disjoint by construction."""
        k, v = self.optimisation_size, self.validation_size
        if which == "optimisation":
            idx = self._order[:k]
        elif which == "validation":
            idx = self._order[k: k + v]
        elif which == "heldout":
            idx = self._order[k + v: k + v + self.heldout_size] if self.heldout_size else self._order[k + v:]
        else:
            raise ValueError(f"unknown split {which!r}")
        return [self.examples[i] for i in idx]

    def fingerprint(self, objective: str = "judge") -> str:
        """Changes whenever data, splits or scorer change: part of every cache key. The fitness
        objective's fingerprint differs from the judge's only where fitness terms are set."""
        payload = [self.name, self.data_fingerprint, self.optimisation_size, self.heldout_size, self.split_seed,
                   self.scorer.config()]
        if self.validation_size:
            payload.append({"validation_size": self.validation_size})
        if objective == "fitness" and self.fitness is not None:
            payload.append({"fitness": [[scorer.config(), w] for scorer, w in self.fitness]})
        return digest(payload)

    # -- loading -------------------------------------------------------------------
    @classmethod
    def from_records(
        cls,
        name: str,
        records: Sequence[dict[str, Any]],
        *,
        prompt_template: str,
        answer_field: str,
        scorer: Scorer,
        source: str = "<records>",
        id_field: str | None = None,
        **splits: Any,
    ) -> "EvalSuite":
        examples = []
        what = f"eval suite {name!r}: prompt_template"
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise ConfigError(f"eval suite {name!r}: record {i} of {source} is not an object "
                                  f"(got {type(rec).__name__})")
            prompt = fill(prompt_template, rec, what=what, record=f"record {i} of {source}")
            if answer_field not in rec:
                raise ConfigError(
                    f"eval suite {name!r}: answer_field {answer_field!r} missing in record {i} of {source}"
                )
            ex_id = str(rec[id_field]) if id_field else str(i)
            examples.append(Example(ex_id, prompt, str(rec[answer_field]), dict(rec)))
        return cls(name, examples, scorer, **splits)

    @classmethod
    def from_file(cls, name: str, path: str | Path, hf_split: str | None = None, **kwargs: Any) -> "EvalSuite":
        return cls.from_records(name, read_records(path, hf_split), source=str(path), **kwargs)

    @classmethod
    def from_settings(cls, s: SuiteSettings, *, judge_cache: str | Path | None = None) -> "EvalSuite":
        judge = make_scorer(s.judge, judge_cache=judge_cache)
        fitness = None
        if [(t.scorer, t.weight) for t in s.fitness] != [("judge", 1.0)]:
            fitness = [(judge if t.scorer == "judge" else make_scorer(t.scorer, judge_cache=judge_cache), t.weight)
                       for t in s.fitness]
        return cls.from_file(s.name, s.dataset, s.dataset_split, prompt_template=s.prompt_template,
                             answer_field=s.answer_field, id_field=s.id_field, scorer=judge, weight=s.weight,
                             optimisation_size=s.optimisation_size, validation_size=s.validation_size,
                             heldout_size=s.heldout_size, split_seed=s.split_seed, fitness=fitness)


def read_records(path: str | Path, hf_split: str | None = None) -> list[dict[str, Any]]:
    """Records of a local JSONL, CSV or parquet file, or of a ``datasets`` folder saved to disk."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"dataset file {path} does not exist")
    if path.is_dir():
        import datasets

        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise ConfigError(f"dataset folder {path}: not a saved datasets folder ({exc})") from None
        if isinstance(data, datasets.DatasetDict):
            if hf_split not in data:
                raise ConfigError(f"dataset folder {path} holds splits {sorted(data)}: set dataset_split to one")
            data = data[hf_split]
        return [dict(r) for r in data]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        records = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(records[-1], dict):
                    raise ConfigError(f"{path}:{lineno}: a record must be a JSON object, got "
                                      f"{type(records[-1]).__name__}")
        return records
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    raise ConfigError(f"dataset file {path}: unsupported format {path.suffix!r} (use .jsonl, .csv, .parquet or a datasets folder)")
