"""Eval suites: a dataset, its prompt template, answer field, scorer, weight and splits.

("Task" is reserved for Prefect tasks.) Each suite is split once, deterministically, into an
optimisation split, read by the search, and a held-out split, read only by the final
evaluation: both come from one seeded permutation, so they are disjoint by construction.
Prompts are a template filled from each record, optionally rendered through a chat template
(``chat``); or a suite is an lm-evaluation-harness task (``lm_eval``), whose documents,
prompts and metric come from lm-eval (``lm_eval_suite.py``).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
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

log = logging.getLogger(__name__)


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
        where: Sequence[str] | None = None,
        **splits: Any,
    ) -> "EvalSuite":
        """``chat`` renders the prompts through a chat template (the tokenizer of
        ``chat.tokenizer``, else of ``base_model``). ``where`` names where each record was read
        (``file:line``); by default ``record i of source``."""
        if not records:
            raise ConfigError(f"eval suite {name!r}: {source} holds no records")
        examples = []
        what = f"eval suite {name!r}: prompt_template"
        seen_ids: dict[str, str] = {}
        labels = [where[i] if where else f"record {i} of {source}" for i in range(len(records))]
        for i, rec in enumerate(records):
            label = labels[i]
            if not isinstance(rec, dict):
                raise ConfigError(f"eval suite {name!r}: {label} is not an object (got {type(rec).__name__})")
            prompt = fill(prompt_template, rec, what=what, record=label)
            if answer_field not in rec:
                raise ConfigError(f"eval suite {name!r}: answer_field {answer_field!r} missing in {label}")
            answer = rec[answer_field]
            if answer is None or isinstance(answer, (list, dict)) or (isinstance(answer, float)
                                                                       and not math.isfinite(answer)):
                raise ConfigError(f"eval suite {name!r}: answer_field {answer_field!r} in {label} is {answer!r}; "
                                  "an answer must be a string or a number")
            if id_field:
                if rec.get(id_field) is None:
                    raise ConfigError(f"eval suite {name!r}: id_field {id_field!r} missing in {label}")
                ex_id = str(rec[id_field])
                if ex_id in seen_ids:
                    raise ConfigError(f"eval suite {name!r}: id_field {id_field!r}: {label} repeats id {ex_id!r} "
                                      f"of {seen_ids[ex_id]}")
                seen_ids[ex_id] = label
            else:
                ex_id = str(i)
            examples.append(Example(ex_id, prompt, str(answer), dict(rec)))
        if chat is not None:
            prompts = _chat_prompts(name, examples, chat, ChatTemplate.for_suite(name, chat, base_model),
                                    {k: splits.get(k, _default(k)) for k in _SPLIT_KEYS})
            prompts_before_chat = [ex.prompt for ex in examples]
            examples = [Example(ex.id, p, ex.answer, ex.fields) for ex, p in zip(examples, prompts)]
        else:
            prompts_before_chat = [ex.prompt for ex in examples]
        suite = cls(name, examples, scorer, **splits)
        _warn_of_leaks(suite, prompts_before_chat, labels)
        return suite

    @classmethod
    def from_file(cls, name: str, path: str | Path, hf_split: str | None = None, **kwargs: Any) -> "EvalSuite":
        records, where = _read_records(path, hf_split)
        return cls.from_records(name, records, source=str(path), where=where, **kwargs)

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


def _warn_of_leaks(suite: EvalSuite, prompts: Sequence[str], labels: Sequence[str]) -> None:
    """Warn where records with the same prompt fall in the optimisation split and in another:
    the search then sees examples that validation or the held-out evaluation score again."""
    split_of = {}
    for which in ("optimisation", "validation", "heldout"):
        for i in split_positions(suite._order, which, suite.optimisation_size, suite.validation_size,
                                 suite.heldout_size):
            split_of[i] = which
    first: dict[str, int] = {}
    leaks = []
    for i, prompt in enumerate(prompts):
        if prompt in first:
            j = first[prompt]
            if "optimisation" in (split_of.get(i), split_of.get(j)) and split_of.get(i) != split_of.get(j):
                leaks.append((j, i))
        else:
            first[prompt] = i
    if leaks:
        j, i = leaks[0]
        log.warning("eval suite %r: %d record(s) repeat a prompt of another split, e.g. %s and %s (%s and %s "
                    "splits): scores outside the optimisation split are not independent of the search; remove "
                    "duplicate records", suite.name, len(leaks), labels[j], labels[i],
                    split_of.get(j), split_of.get(i))


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
    return _read_records(path, hf_split)[0]


class _Refused(ValueError):
    """JSON that parses but that psomerge refuses (NaN, a repeated key)."""


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _decode(path: Path, raw: bytes, line: int = 1) -> str:
    """``raw`` as UTF-8 (a leading byte-order mark dropped), or an error naming the line."""
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        line += raw[:exc.start].count(b"\n")
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None


def _read_records(path: str | Path, hf_split: str | None = None) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Records, and for a JSONL or CSV file where each was read (``file:line``)."""
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
        return [dict(r) for r in data], None
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist(), None
    if suffix in (".jsonl", ".json"):
        records, where = [], []
        # only \n ends a record: str.splitlines() would also cut at U+2028, U+0085 and form feeds,
        # which JSON strings may hold unescaped
        for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
            line = _decode(path, raw[len(codecs.BOM_UTF8):] if lineno == 1 and raw.startswith(codecs.BOM_UTF8)
                           else raw, lineno)
            if line.strip():
                try:
                    records.append(json.loads(line, parse_constant=_no_constant, object_pairs_hook=_no_repeated_keys))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                except _Refused as exc:
                    raise ConfigError(f"{path}:{lineno}: {exc}") from None
                if not isinstance(records[-1], dict):
                    raise ConfigError(f"{path}:{lineno}: a record must be a JSON object, got "
                                      f"{type(records[-1]).__name__}")
                where.append(f"{path}:{lineno}")
        return records, where
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(_decode(path, path.read_bytes()), newline=""))
        records, where = [], []
        for row in reader:
            if None in row or None in row.values():
                count = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                raise ConfigError(f"{path}:{reader.line_num}: {count} values where the header names "
                                  f"{len(reader.fieldnames or [])} columns")
            records.append(row)
            where.append(f"{path}:{reader.line_num}")
        return records, where
    raise ConfigError(f"dataset file {path}: unsupported format {path.suffix!r} "
                      "(use .jsonl, .csv, .parquet or a datasets folder)")
