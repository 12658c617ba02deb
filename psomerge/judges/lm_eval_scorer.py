"""An lm-evaluation-harness task as a scorer: its requests, filters and metric, answered by
psomerge's resident model through lm-eval's ``LM`` interface.

Imported only when a suite names an lm-eval task (lm-eval is an optional extra). The task
turns each document and its rendered prompt into requests (``construct_requests``),
``GeneratorLM`` answers them with the generation backend (greedy generation, continuation
log-likelihoods), the task's filter pipeline post-processes the answers, and
``process_results`` gives each document its metric value: per-example scores, as every
psomerge scorer gives.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from psomerge.errors import PsomergeError
from psomerge.judges.likelihood import LikelihoodScorer
from psomerge.judges.protocol import Example, Score


def greedy_decoding(gen_kwargs: Mapping[str, Any]) -> tuple[list[str], int | None]:
    """(stop strings, token limit or None for the backend's own) of a ``generate_until``
    request's keyword arguments. psomerge decodes greedily: sampling is refused, other
    sampling options (top_p, top_k) have no effect on greedy decoding."""
    kwargs = dict(gen_kwargs)
    if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
        raise ValueError(f"generation_kwargs {kwargs} ask for sampling (do_sample / temperature > 0); psomerge "
                         "decodes greedily: set do_sample: false and temperature: 0")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    limit = kwargs.get("max_gen_toks")
    return until, None if limit is None else int(limit)


class GeneratorLM(LM):
    """lm-eval's model interface over a psomerge generation backend (``generation.protocol``):
    the resident model answers, whichever backend holds it. Greedy only; no rolling
    log-likelihoods (perplexity tasks' metrics are corpus aggregates psomerge does not score)."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = self.generator.loglikelihood([(r.args[0], r.args[1]) for r in requests])
        return [(c.logprob, c.is_greedy) for c in results]

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        raise NotImplementedError(
            "psomerge's lm-eval adapter does not compute rolling log-likelihoods (output_type "
            "loglikelihood_rolling): its backends score continuations after a context, and perplexity metrics "
            "are corpus-level aggregates, not means of per-document scores")

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Requests grouped by their decoding options, each group in one batched call."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        out: list[str] = [""] * len(requests)
        for positions in groups.values():
            until, limit = greedy_decoding(requests[positions[0]].args[1])
            answers = self.generator.generate([requests[i].args[0] for i in positions], stop=until,
                                              max_new_tokens=limit)
            for i, answer in zip(positions, answers, strict=True):
                out[i] = answer
        return out


class LMEvalScorer(LikelihoodScorer):
    """One metric of one lm-eval task, after one of its filter pipelines, per document.

    Examples are the task's documents (``fields``) with their rendered prompts; a score is the
    document's value of ``metric`` from the task's ``process_results``, which must be a mean
    of such values (checked where the suite is loaded) and lie in [0, 1]."""

    name = "lm_eval"

    def __init__(self, task, *, metric: str, filter_name: str, chat: bool, suite: str, task_config: str):
        self.task, self.metric, self.filter_name, self.chat, self.suite = task, metric, filter_name, chat, suite
        self._config = {"type": self.name, "task": task.task_name, "metric": metric, "filter": filter_name,
                        "chat": chat, "task_config": task_config}
        self._filter = next(f for f in task._filters if f.name == filter_name)

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def score_model(self, generator, examples: Sequence[Example]) -> list[Score]:
        lm = GeneratorLM(generator)
        per_doc: list[list[Instance]] = []
        for position, ex in enumerate(examples):
            made = self.task.construct_requests(doc=ex.fields, ctx=ex.prompt,
                                                metadata=(self.task.task_name, position, 1),
                                                apply_chat_template=self.chat)
            per_doc.append(made if isinstance(made, list) else [made])
        by_type: dict[str, list[Instance]] = defaultdict(list)
        for requests in per_doc:
            for r in requests:
                by_type[r.request_type].append(r)
        for request_type, requests in by_type.items():
            for r, response in zip(requests, getattr(lm, request_type)(requests), strict=True):
                r.resps.append(response)
        self._filter.apply([r for requests in per_doc for r in requests])
        scores = []
        for ex, requests in zip(examples, per_doc):
            requests.sort(key=lambda r: r.idx)
            metrics = self.task.process_results(ex.fields, [r.filtered_resps[self.filter_name] for r in requests])
            if self.metric not in metrics:
                raise PsomergeError(f"eval suite {self.suite!r}: lm-eval task {self.task.task_name!r} gave no "
                                    f"{self.metric!r} for document {ex.id} (it gave {sorted(metrics)})")
            value = float(metrics[self.metric])
            if not 0.0 <= value <= 1.0:
                raise PsomergeError(f"eval suite {self.suite!r}: lm-eval metric {self.metric!r} is {value} for "
                                    f"document {ex.id}, outside [0, 1]: psomerge scores lie in [0, 1]")
            meta: dict[str, Any] = {}
            if requests[0].request_type == "generate_until":
                meta = {"answer": requests[0].resps[0], "filtered": requests[0].filtered_resps[self.filter_name]}
            scores.append(Score(value, meta))
        return scores
