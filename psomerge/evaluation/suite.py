"""Eval suites: a dataset, its prompt template, answer field, scorer, weight and splits.

("Task" is reserved for Prefect tasks.) Each suite is split once, deterministically, into an
optimisation split, read by the search, and a held-out split, read only by the final
evaluation: both come from one seeded permutation, so they are disjoint by construction.
Prompts are a template filled from each record, optionally rendered through a chat template
(``chat``); or a suite is an lm-evaluation-harness task (``lm_eval``), whose documents,
prompts and metric come from lm-eval (``lm_eval_suite.py``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_core import to_jsonable_python

from psomerge.errors import ConfigError
from psomerge.evaluation.chat import ChatSettings, ChatTemplate, chat_messages, draw_shots
from psomerge.evaluation.lm_eval_suite import LMEvalSettings
from psomerge.evaluation.splits import Split, optimisation_positions, split_order, split_positions
from psomerge.hashing import digest
from psomerge.judges.factory import JudgeSettings, make_scorer
from psomerge.judges.exact_match import ExactMatchSettings
from psomerge.judges.protocol import Example, Scorer
from psomerge.templates import field_validator_for, fill
from psomerge.yamlconfig import StrictModel


class FitnessTerm(StrictModel):
    """One term of a suite's search objective: the suite's judge, or another scorer (e.g. a
    smooth ``answer_likelihood``), with a weight."""

    scorer: Literal["judge"] | JudgeSettings = "judge"
    weight: float = Field(1.0, gt=0)


# keys of a suite over a data file; an lm_eval suite takes them from its task
_FILE_KEYS = ("dataset", "dataset_split", "prompt_template", "answer_field", "id_field", "judge")


class SuiteSettings(StrictModel):
    """One eval suite in a run config (``suites:``): a data file, or an lm-eval task."""

    name: str
    dataset: Path | None = None  # .jsonl, .csv, .parquet, or a folder written by datasets' save_to_disk
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
    chat: ChatSettings | None = None  # render prompts through a tokenizer's chat template
    lm_eval: LMEvalSettings | None = None  # an lm-evaluation-harness task instead of a data file

    check_templates = field_validator_for("prompt_template")

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        """A data file or an lm-eval task; the keys of one do not apply to the other (a key at its
        default is no choice: a dumped config holds every key, and must load again)."""
        if not isinstance(data, dict):
            return data
        name = data.get("name", "?")
        if data.get("lm_eval") is None:
            if data.get("dataset") is None:
                raise ValueError(f"suite {name!r}: set 'dataset' (a data file) or 'lm_eval' (an lm-evaluation-harness "
                                 "task)")
            return data
        for key in _FILE_KEYS:
            if _chosen(data, key, cls.model_fields[key].default):
                raise ValueError(f"suite {name!r} is an lm_eval suite: {key!r} does not apply (its task gives "
                                 "documents, prompts and metric); remove it")
        chat = data.get("chat")
        chat = chat.model_dump() if isinstance(chat, ChatSettings) else chat
        for key in ("shots", "shot_answer_template"):
            if isinstance(chat, dict) and _chosen(chat, key, ChatSettings.model_fields[key].default):
                raise ValueError(f"suite {name!r} is an lm_eval suite: 'chat.{key}' does not apply (its task's "
                                 "few-shot examples are set by lm_eval.num_fewshot); remove it")
        return data


def _chosen(data: dict[str, Any], key: str, default: Any) -> bool:
    """Whether ``data`` sets ``key`` to something other than its default."""
    return key in data and to_jsonable_python(data[key]) != to_jsonable_python(default)


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
        self._order = split_order(self.name, len(self.examples), self.optimisation_size, self.validation_size,
                                  self.heldout_size, self.split_seed)
        if not self.data_fingerprint:
            self.data_fingerprint = examples_fingerprint(self.examples)

    @property
    def fitness_terms(self) -> list[tuple[Scorer, float]]:
        return self.fitness or [(self.scorer, 1.0)]

    def split(self, which: Split) -> list[Example]:
        """The examples of one split: one seeded permutation cut into optimisation,
        validation and held-out parts, disjoint by construction."""
        idx = split_positions(self._order, which, self.optimisation_size, self.validation_size, self.heldout_size)
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
        chat: ChatSettings | None = None,
        base_model: str | Path | None = None,
        **splits: Any,
    ) -> "EvalSuite":
        """``chat`` renders the prompts through a chat template (the tokenizer of
        ``chat.tokenizer``, else of ``base_model``)."""
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
        if chat is not None:
            prompts = _chat_prompts(name, examples, chat, ChatTemplate.for_suite(name, chat, base_model),
                                    {k: splits.get(k, _default(k)) for k in _SPLIT_KEYS})
            examples = [Example(ex.id, p, ex.answer, ex.fields) for ex, p in zip(examples, prompts)]
        return cls(name, examples, scorer, **splits)

    @classmethod
    def from_file(cls, name: str, path: str | Path, hf_split: str | None = None, **kwargs: Any) -> "EvalSuite":
        return cls.from_records(name, read_records(path, hf_split), source=str(path), **kwargs)

    @classmethod
    def from_settings(cls, s: SuiteSettings, *, judge_cache: str | Path | None = None,
                      base_model: str | Path | None = None) -> "EvalSuite":
        """The suite ``s`` describes; ``base_model`` (the run's base folder) is where a chat
        template is read from unless ``chat.tokenizer`` names another folder."""
        splits = {k: getattr(s, k) for k in _SPLIT_KEYS}
        if s.lm_eval is not None:
            from psomerge.evaluation.lm_eval_suite import load_lm_eval_task

            chat = ChatTemplate.for_suite(s.name, s.chat, base_model) if s.chat is not None else None
            examples, judge, task_config = load_lm_eval_task(s.name, s.lm_eval, chat=chat,
                                                             system=s.chat.system if s.chat else None, **splits)
        else:
            judge = make_scorer(s.judge, judge_cache=judge_cache)
        fitness = None
        if [(t.scorer, t.weight) for t in s.fitness] != [("judge", 1.0)]:
            fitness = [(judge if t.scorer == "judge" else make_scorer(t.scorer, judge_cache=judge_cache), t.weight)
                       for t in s.fitness]
        if s.lm_eval is not None:  # the task's config is part of its data: documents, prompts and metric
            return cls(s.name, examples, judge, weight=s.weight, fitness=fitness,
                       data_fingerprint=digest([examples_fingerprint(examples), task_config]), **splits)
        return cls.from_file(s.name, s.dataset, s.dataset_split, prompt_template=s.prompt_template,
                             answer_field=s.answer_field, id_field=s.id_field, scorer=judge, weight=s.weight,
                             fitness=fitness, chat=s.chat, base_model=base_model, **splits)


_SPLIT_KEYS = ("optimisation_size", "validation_size", "heldout_size", "split_seed")


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """Every field of every example: scorers read them (code_exec's tests, judge rubrics)."""
    h = hashlib.blake2b(digest_size=16)
    for ex in examples:
        h.update(json.dumps([ex.id, ex.prompt, ex.answer, ex.fields], sort_keys=True, default=repr).encode())
    return h.hexdigest()


def _chat_prompts(suite: str, examples: Sequence[Example], chat: ChatSettings, template: ChatTemplate,
                  splits: dict[str, Any]) -> list[str]:
    """Each example's prompt as a chat: the system prompt, ``chat.shots`` examples of the
    optimisation split as user/assistant turns, then the example's own prompt."""
    pool = optimisation_positions(suite, len(examples), **splits)
    if chat.shots > len(pool) - 1:
        raise ConfigError(f"eval suite {suite!r}: key 'chat.shots': {chat.shots} shots need {chat.shots + 1} "
                          f"examples in the optimisation split, which has {len(pool)} (optimisation_size)")
    what = f"eval suite {suite!r}: chat.shot_answer_template"
    replies = ([fill(chat.shot_answer_template, {**ex.fields, "answer": ex.answer}, what=what,
                     record=f"example {ex.id!r}") for ex in examples] if chat.shots else [])
    prompts = []
    for i, ex in enumerate(examples):
        shots = [(examples[j].prompt, replies[j]) for j in draw_shots(i, pool, chat.shots, splits["split_seed"])]
        prompts.append(template.render(chat_messages(ex.prompt, chat.system, shots)))
    return prompts


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
    raise ConfigError(f"dataset file {path}: unsupported format {path.suffix!r} "
                      "(use .jsonl, .csv, .parquet or a datasets folder)")
