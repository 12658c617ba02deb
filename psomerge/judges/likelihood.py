"""Scorers that read the model's likelihoods instead of its generated answers (one forward
pass per example, no decoding): a smooth signal for the search, and lm-eval-style multiple
choice.

- ``answer_likelihood``: how likely the model finds the reference answer after the prompt:
  ``mean_probability`` (the geometric mean of its tokens' probabilities, exp(mean log-prob)),
  ``token_accuracy`` (share of its tokens that are the model's argmax), or ``probability``
  (of the whole answer). Unlike exact match on a few dozen examples, these move smoothly as
  weights move.
- ``multiple_choice``: the choice with the highest (optionally length-normalised) log-likelihood
  is the model's answer (lm-eval's ``acc`` / ``acc_norm``); ``measure: probability`` gives the
  softmax share of the correct choice instead, a smooth version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from psomerge.errors import ConfigError
from psomerge.judges.protocol import Example, Score, ScorerBase
from psomerge.templates import field_validator_for, fill
from psomerge.yamlconfig import StrictModel, validate


class AnswerLikelihoodSettings(StrictModel):
    type: Literal["answer_likelihood"] = "answer_likelihood"
    measure: Literal["mean_probability", "token_accuracy", "probability"] = "mean_probability"
    # the reference as the model would write it after the prompt (e.g. " {answer}" after "Answer:")
    continuation_template: str = "{answer}"
    append_eos: bool = False  # score the end of the answer too (exact match needs the model to stop)

    check_templates = field_validator_for("continuation_template")


class MultipleChoiceSettings(StrictModel):
    type: Literal["multiple_choice"] = "multiple_choice"
    choices_field: str = "choices"  # a list of choice texts in each record
    continuation_template: str = "{choice}"  # e.g. " {choice}"
    normalize: Literal["none", "tokens", "chars"] = "none"  # lm-eval acc (none) and acc_norm (chars)
    measure: Literal["accuracy", "probability"] = "accuracy"

    check_templates = field_validator_for("continuation_template")


class LikelihoodScorer(ScorerBase):
    """A scorer that reads the model (``score_model``), not answers: evaluation runs it on the
    resident generator instead of passing it generated text."""

    reads_model = True

    def score(self, examples: Sequence[Example], answers: Sequence[str]) -> list[Score]:
        raise TypeError(f"scorer {self.name!r} scores a model's likelihoods, not answers: use score_model")


class AnswerLikelihood(LikelihoodScorer):
    name = "answer_likelihood"

    def __init__(self, settings: AnswerLikelihoodSettings | None = None, **fields: Any):
        self.settings = settings or validate(AnswerLikelihoodSettings, fields, "answer_likelihood")

    def config(self) -> dict[str, Any]:
        return self.settings.model_dump()

    def score_model(self, generator, examples: Sequence[Example]) -> list[Score]:
        s = self.settings
        requests = [(ex.prompt, fill(s.continuation_template, {**ex.fields, "answer": ex.answer},
                                     what="answer_likelihood: continuation_template", record=f"example {ex.id!r}"))
                    for ex in examples]
        out = []
        for c in generator.loglikelihood(requests, append_eos=s.append_eos):
            if c.tokens == 0:
                out.append(Score(0.0, {"tokens": 0}))
                continue
            value = {"mean_probability": math.exp(c.logprob / c.tokens),
                     "token_accuracy": c.greedy_tokens / c.tokens,
                     "probability": math.exp(c.logprob)}[s.measure]
            out.append(Score(value, {"logprob": c.logprob, "tokens": c.tokens, "greedy_tokens": c.greedy_tokens}))
        return out


class MultipleChoice(LikelihoodScorer):
    name = "multiple_choice"

    def __init__(self, settings: MultipleChoiceSettings | None = None, **fields: Any):
        self.settings = settings or validate(MultipleChoiceSettings, fields, "multiple_choice")

    def config(self) -> dict[str, Any]:
        return self.settings.model_dump()

    def choices(self, example: Example) -> tuple[list[str], int]:
        """The example's choice texts and the index of the correct one (its reference answer
        is the index, or the text of the correct choice)."""
        choices = example.fields.get(self.settings.choices_field)
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise ConfigError(f"multiple_choice: example {example.id!r} has no list of choices in field "
                              f"{self.settings.choices_field!r}")
        choices = [str(c) for c in choices]
        answer = example.answer.strip()
        if answer in choices:
            return choices, choices.index(answer)
        if answer.lstrip("-").isdigit() and 0 <= int(answer) < len(choices):
            return choices, int(answer)
        raise ConfigError(f"multiple_choice: example {example.id!r}: answer {example.answer!r} is neither a choice "
                          f"nor a choice index")

    def score_model(self, generator, examples: Sequence[Example]) -> list[Score]:
        s = self.settings
        per_example = [self.choices(ex) for ex in examples]
        requests, texts = [], []
        for ex, (choices, _) in zip(examples, per_example):
            for choice in choices:
                text = fill(s.continuation_template, {**ex.fields, "choice": choice},
                            what="multiple_choice: continuation_template", record=f"example {ex.id!r}")
                requests.append((ex.prompt, text))
                texts.append(text)
        results = iter(zip(generator.loglikelihood(requests), texts))
        out = []
        for choices, correct in per_example:
            lls = []
            for c, text in (next(results) for _ in choices):
                length = {"none": 1, "tokens": max(c.tokens, 1), "chars": max(len(text), 1)}[s.normalize]
                lls.append(c.logprob / length)
            best = max(range(len(lls)), key=lls.__getitem__)
            top = max(lls)
            share = math.exp(lls[correct] - top) / sum(math.exp(v - top) for v in lls)
            value = float(best == correct) if s.measure == "accuracy" else share
            out.append(Score(value, {"chosen": best, "correct": correct}))
        return out
