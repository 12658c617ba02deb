"""lm-evaluation-harness tasks as eval suites (``lm_eval:`` in a suite).

The task supplies documents, prompt formatting (``doc_to_text``, its few-shot context), filters
and metric; psomerge supplies the splits, the resident model and the caches:

- documents are the task's evaluation documents (its ``test_split``, else ``validation_split``),
  cut by psomerge's own seeded split into optimisation / validation / held-out parts;
- few-shot examples come from the task's own few-shot source when none of its documents is an
  evaluation document; otherwise (one data file serving both) from the optimisation split
  only, never the document itself, so no held-out document reaches a prompt the search reads;
- each document's prompt is rendered once, as lm-eval renders it, and is part of the suite's
  data fingerprint, with the documents and the task's config: a change of either changes every
  cache key;
- scores are per document, of a metric lm-eval aggregates by a plain mean (others are refused
  by name: a corpus-level F1 or perplexity is no mean of per-example scores).

lm-eval is an optional extra: it is imported only here, when such a suite loads.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from psomerge.errors import ConfigError
from psomerge.evaluation.chat import ChatTemplate
from psomerge.evaluation.splits import optimisation_positions
from psomerge.hashing import digest
from psomerge.judges.protocol import Example, Scorer
from psomerge.yamlconfig import StrictModel

INSTALL_HINT = "pip install 'psomerge[lm-eval]' (`make venv` installs it)"
DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's own default (lm_eval.defaults.DEFAULT_OTHER_SEED)
SCORED_OUTPUT_TYPES = ("generate_until", "multiple_choice", "loglikelihood")
# where a task's data comes from: its documents are hashed instead, so a moved file keeps its keys
_DATA_LOCATION_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "task_alias", "tag")


class LMEvalSettings(StrictModel):
    """A suite's ``lm_eval:`` section: one lm-eval task, its metric and filter."""

    task: str  # a task name (not a group)
    include_path: Path | None = None  # a folder of task YAMLs
    # also index lm-eval's built-in tasks (about 6 s); default: only when include_path is unset
    include_defaults: bool | None = None
    metric: str | None = None  # default: the task's first metric
    filter: str | None = None  # a filter pipeline's name (filter_list); default: the task's first
    num_fewshot: int | None = Field(None, ge=0)  # default: the task's own (none: 0)
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED

    @model_validator(mode="after")
    def _somewhere_to_look(self) -> "LMEvalSettings":
        if self.include_defaults is False and self.include_path is None:
            raise ValueError("include_defaults: false and no include_path: there is no task to find")
        return self


def load_lm_eval_task(suite: str, s: LMEvalSettings, *, chat: ChatTemplate | None, system: str | None,
                      optimisation_size: int, validation_size: int, heldout_size: int | None,
                      split_seed: int) -> tuple[list[Example], Scorer, str]:
    """The suite's examples (documents with rendered prompts), its scorer, and the digest of
    the task's config and lm-eval's version (part of the suite's data fingerprint)."""
    task = _load_task(suite, s)
    where = f"eval suite {suite!r}: lm-eval task {s.task!r}"
    metric, filter_name = _check_task(task, s, where)
    if s.num_fewshot is not None:
        task.set_config(key="num_fewshot", value=s.num_fewshot)
    num_fewshot = task.get_config("num_fewshot") or 0
    task.set_fewshot_seed(seed=s.fewshot_seed)
    docs = [dict(doc) for doc in task.eval_docs]
    optimisation = optimisation_positions(suite, len(docs), optimisation_size=optimisation_size,
                                          validation_size=validation_size, heldout_size=heldout_size,
                                          split_seed=split_seed)
    shots_from_optimisation = num_fewshot > 0 and _fewshot_overlaps(task, docs)
    if shots_from_optimisation and num_fewshot > len(optimisation) - 1:
        raise ConfigError(f"{where}: num_fewshot {num_fewshot} draws shots from the optimisation split (the task's "
                          f"few-shot source holds its evaluation documents), which has {len(optimisation)} documents: "
                          "lower num_fewshot or raise optimisation_size")
    examples = []
    for i, doc in enumerate(docs):
        if shots_from_optimisation:  # lm-eval's sampler over the optimisation documents but this one
            task.sampler.replace_df([docs[j] for j in optimisation if j != i])
        prompt = task.fewshot_context(doc=doc, num_fewshot=num_fewshot, system_instruction=system,
                                      apply_chat_template=chat is not None, fewshot_as_multiturn=True,
                                      chat_template=chat.render if chat else None, gen_prefix=task.doc_to_prefix(doc))
        examples.append(Example(str(i), prompt, _reference(task, doc), doc))
    config = json.dumps({k: v for k, v in task.dump_config().items() if k not in _DATA_LOCATION_KEYS},
                        sort_keys=True, default=_stable)
    # lm-eval's version too: its filters and metrics are code that may change between releases
    task_digest = digest([digest(config), importlib.metadata.version("lm_eval"), shots_from_optimisation])
    from psomerge.judges.lm_eval_scorer import LMEvalScorer

    scorer = LMEvalScorer(task, metric=metric, filter_name=filter_name, chat=chat is not None, suite=suite,
                          task_config=task_digest)
    return examples, scorer, task_digest


def _load_task(suite: str, s: LMEvalSettings):
    try:
        from lm_eval.api.task import Task
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(f"eval suite {suite!r}: key 'lm_eval' needs the lm-eval package ({exc}): {INSTALL_HINT}") \
            from None
    defaults = s.include_path is None if s.include_defaults is None else s.include_defaults
    manager = TaskManager(include_path=str(s.include_path) if s.include_path else None, include_defaults=defaults)
    if s.task not in manager.all_tasks:
        searched = " and ".join(([f"{s.include_path}"] if s.include_path else [])
                                + (["lm-eval's built-in tasks"] if defaults else []))
        raise ConfigError(f"eval suite {suite!r}: key 'lm_eval.task': no task {s.task!r} in {searched} (lm-eval "
                          "skips task YAML files it cannot parse)")
    try:
        loaded = manager.load([s.task])["tasks"]
    except Exception as exc:  # noqa: BLE001 - dataset loading, YAML or template errors inside lm-eval
        raise ConfigError(f"eval suite {suite!r}: lm-eval cannot load task {s.task!r} ({type(exc).__name__}: "
                          f"{exc})") from None
    if len(loaded) != 1 or not isinstance(next(iter(loaded.values())), Task):
        raise ConfigError(f"eval suite {suite!r}: key 'lm_eval.task': {s.task!r} is a group or tag of "
                          f"{len(loaded)} tasks ({', '.join(sorted(loaded))}): name one task per suite")
    return next(iter(loaded.values()))


def _check_task(task, s: LMEvalSettings, where: str) -> tuple[str, str]:
    """The metric and filter to score with, after refusing what psomerge cannot score faithfully."""
    from lm_eval.api.registry import AGGREGATION_REGISTRY

    from psomerge.judges.lm_eval_scorer import greedy_decoding

    output_type = task.OUTPUT_TYPE
    if output_type not in SCORED_OUTPUT_TYPES:
        raise ConfigError(f"{where}: output_type {output_type!r} is not scored by psomerge (it scores "
                          f"{', '.join(SCORED_OUTPUT_TYPES)}): rolling log-likelihoods give perplexities, corpus-level "
                          "aggregates rather than per-document scores")
    if task.multiple_input:
        raise ConfigError(f"{where}: a task with one context per choice (doc_to_text giving a choice index, as "
                          "winogrande does) is not supported")
    if (task.get_config("repeats") or 1) != 1:
        raise ConfigError(f"{where}: repeats {task.get_config('repeats')}: psomerge decodes greedily, so every "
                          "repeat would be the same answer; set repeats: 1")
    if output_type == "generate_until":
        try:
            greedy_decoding(task.get_config("generation_kwargs") or {})
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    aggregations = task.aggregation()
    metrics = list(aggregations)
    metric = s.metric if s.metric is not None else (metrics[0] if metrics else None)
    if metric not in aggregations:
        raise ConfigError(f"{where}: key 'lm_eval.metric': {metric!r} is not one of the task's metrics "
                          f"({', '.join(metrics) or 'none'})")
    names = {fn: name for name, fn in AGGREGATION_REGISTRY.items()}
    aggregation = names.get(aggregations[metric], getattr(aggregations[metric], "__name__", "a custom function"))
    if aggregation != "mean":
        raise ConfigError(f"{where}: metric {metric!r} aggregates with {aggregation!r}, not a mean of per-document "
                          "values: psomerge's reports and promotion gate need per-example scores (choose a metric "
                          "aggregated by mean, such as acc or exact_match)")
    if task.higher_is_better().get(metric) is False:
        raise ConfigError(f"{where}: metric {metric!r} is better when lower; psomerge maximises its scores")
    filters = [f.name for f in task._filters]
    filter_name = s.filter if s.filter is not None else filters[0]
    if filter_name not in filters:
        raise ConfigError(f"{where}: key 'lm_eval.filter': {filter_name!r} is not one of the task's filters "
                          f"({', '.join(filters)})")
    return metric, filter_name


def _fewshot_overlaps(task, docs: list[dict]) -> bool:
    """Whether the task's few-shot source holds any of its evaluation documents (e.g. a task
    over one data file, whose few-shot examples default to its test split)."""
    key = lambda doc: json.dumps(doc, sort_keys=True, default=repr)  # noqa: E731
    sampler = getattr(task, "sampler", None)
    if sampler is None:  # no few-shot source at all: lm-eval itself refuses shots
        return False
    evaluated = {key(doc) for doc in docs}
    return any(key(dict(doc)) in evaluated for doc in sampler.fewshot_docs())


def _reference(task, doc: dict) -> str:
    """The reference answer as text: a choice index becomes the choice, a list its first item."""
    target = task.doc_to_target(doc)
    if isinstance(target, int) and task.get_config("doc_to_choice") is not None:
        target = task.doc_to_choice(doc)[target]
    if isinstance(target, list):
        target = target[0] if target else ""
    return str(target)


def _stable(value: Any) -> Any:
    """A JSON stand-in for what a task config holds besides data (functions by their source,
    not by their address, which changes every process)."""
    if isinstance(value, Callable):
        try:
            return inspect.getsource(value)
        except (OSError, TypeError):
            return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)
