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

from psomerge.errors import ConfigError
from psomerge.judges.protocol import Example, Scorer

Split = Literal["optimisation", "heldout"]


@dataclass
class EvalSuite:
    name: str
    examples: list[Example]
    scorer: Scorer
    weight: float = 1.0
    optimisation_size: int = 64
    heldout_size: int | None = None  # None: every example not in the optimisation split
    split_seed: int = 0
    data_fingerprint: str = ""
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        n = len(self.examples)
        wanted = self.optimisation_size + (self.heldout_size or 0)
        if self.optimisation_size <= 0 or wanted > n or (self.heldout_size is None and self.optimisation_size >= n):
            raise ConfigError(
                f"eval suite {self.name!r}: optimisation_size={self.optimisation_size} and "
                f"heldout_size={self.heldout_size} do not fit its {n} examples"
            )
        self._order = list(range(n))
        random.Random(self.split_seed).shuffle(self._order)
        if not self.data_fingerprint:
            h = hashlib.blake2b(digest_size=16)
            for ex in self.examples:
                h.update(json.dumps([ex.id, ex.prompt, ex.answer]).encode())
            self.data_fingerprint = h.hexdigest()

    def split(self, which: Split) -> list[Example]:
        k = self.optimisation_size
        if which == "optimisation":
            idx = self._order[:k]
        elif which == "heldout":
            idx = self._order[k : k + self.heldout_size] if self.heldout_size else self._order[k:]
        else:
            raise ValueError(f"unknown split {which!r}")
        return [self.examples[i] for i in idx]

    def fingerprint(self) -> str:
        """Changes whenever data, split or scorer change: part of the fitness cache key."""
        payload = [
            self.name,
            self.data_fingerprint,
            self.optimisation_size,
            self.heldout_size,
            self.split_seed,
            self.scorer.config(),
        ]
        return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()

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
        **kwargs: Any,
    ) -> "EvalSuite":
        examples = []
        for i, rec in enumerate(records):
            try:
                prompt = prompt_template.format(**rec)
            except KeyError as exc:
                raise ConfigError(
                    f"eval suite {name!r}: prompt_template names field {exc.args[0]!r}, missing in "
                    f"record {i} of {source}"
                ) from None
            if answer_field not in rec:
                raise ConfigError(
                    f"eval suite {name!r}: answer_field {answer_field!r} missing in record {i} of {source}"
                )
            ex_id = str(rec[id_field]) if id_field else str(i)
            examples.append(Example(ex_id, prompt, str(rec[answer_field]), dict(rec)))
        return cls(name, examples, scorer, **kwargs)

    @classmethod
    def from_file(cls, name: str, path: str | Path, hf_split: str | None = None, **kwargs: Any) -> "EvalSuite":
        return cls.from_records(name, read_records(path, hf_split), source=str(path), **kwargs)


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
        return records
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    raise ConfigError(f"dataset file {path}: unsupported format {path.suffix!r} (use .jsonl, .csv, .parquet or a datasets folder)")
