"""LLM judge: a rubric prompt to any OpenAI-compatible chat endpoint (a hosted API, or a
vLLM server psomerge starts), a numeric score parsed from the reply and scaled to [0, 1].

Identical (prompt, answer) pairs are judged once: within a batch they are de-duplicated, and
across particles and runs a persistent judge cache keyed by (judge config, prompt, answer)
answers them.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from psomerge.errors import PsomergeError
from psomerge.hashing import digest
from psomerge.judges.protocol import Example, Score, ScorerUsage
from psomerge.kvstore import SqliteKV
from psomerge.templates import field_validator_for, fill
from psomerge.yamlconfig import StrictModel, validate

DEFAULT_TEMPLATE = (
    "You are grading an answer to a task.\n\nTask:\n{prompt}\n\nReference answer:\n{reference}\n\n"
    "Candidate answer:\n{answer}\n\nRate the candidate from {low} (wrong) to {high} (fully correct). "
    "Reply with the number only, as 'Score: N'."
)
_SCORE = re.compile(r"score\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class JudgeError(PsomergeError):
    """The judge could not produce a score and its config says to fail."""


def parse_score(text: str, low: float, high: float) -> float | None:
    """The judge's number, scaled to [0, 1]; None when the reply holds no number in range."""
    m = _SCORE.search(text) or _NUMBER.search(text)
    if not m:
        return None
    value = float(m.group(1) if m.re is _SCORE else m.group(0))
    if not low <= value <= high:
        return None
    return (value - low) / (high - low)


@dataclass
class JudgeStats:
    requests: int = 0  # API calls, retries made by the client not included
    cache_hits: int = 0
    deduplicated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    unparseable: int = 0
    errors: int = 0


class LLMJudgeSettings(StrictModel):
    type: Literal["llm"] = "llm"
    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    template: str = DEFAULT_TEMPLATE
    scale: tuple[float, float] = (1.0, 10.0)
    temperature: float = 0.0
    max_tokens: int = Field(16, gt=0)
    concurrency: int = Field(8, gt=0)
    max_retries: int = Field(3, ge=0)  # the client's retries with backoff on 408/409/429/5xx and timeouts
    timeout: float = Field(30.0, gt=0)
    on_unparseable: Literal["retry", "zero", "fail"] = "retry"
    parse_retries: int = Field(2, ge=0)
    price_per_mtok_prompt: float = Field(0.0, ge=0)
    price_per_mtok_completion: float = Field(0.0, ge=0)
    serve: dict[str, Any] | None = None  # start a vLLM server: {model_path, python, ...} (VLLMServer's keys)

    check_templates = field_validator_for("template")

    @field_validator("scale")
    @classmethod
    def _low_below_high(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not scale[0] < scale[1]:
            raise ValueError(f"scale {list(scale)} needs low < high")
        return scale


class LLMJudge:
    """Scores answers with an LLM behind an OpenAI-compatible endpoint; ``cache_path`` is
    the persistent judge cache shared across particles and runs."""

    name = "llm"

    def __init__(self, settings: LLMJudgeSettings | None = None, *, cache_path: str | Path | None = None,
                 **fields: Any):
        self.settings = settings or validate(LLMJudgeSettings, fields, "llm judge")
        self.base_url = self.settings.base_url  # a served judge replaces it with its own address
        self.stats = JudgeStats()
        self._lock = threading.Lock()
        self._cache = SqliteKV(cache_path, "judge_cache") if cache_path else None
        self._client = None
        self._server = None

    def client(self):
        """The openai client; starts the vLLM server first when the config asks for one."""
        with self._lock:
            if self._client is None:
                from openai import OpenAI  # optional dependency: psomerge[judges]

                s = self.settings
                if s.serve is not None:
                    from psomerge.judges.vllm_server import VLLMServer

                    self._server = VLLMServer(**{"served_name": s.model, **s.serve}).start()
                    self.base_url = self._server.url
                self._client = OpenAI(base_url=self.base_url, api_key=os.environ.get(s.api_key_env) or "none",
                                      max_retries=s.max_retries, timeout=s.timeout)
            return self._client

    def close(self) -> None:
        """Stop the vLLM server this judge started, if any."""
        if self._server is not None:
            self._server.stop()
            self._server = None
            self._client = None

    def usage(self) -> ScorerUsage:
        st = self.stats
        return ScorerUsage(st.requests, st.cache_hits + st.deduplicated, st.prompt_tokens + st.completion_tokens,
                           st.cost)

    def config(self) -> dict[str, Any]:
        """What changes a verdict (the endpoint does not: equal models behind two URLs agree)."""
        s = self.settings
        return {"type": self.name, "model": s.model, "template": s.template, "scale": list(s.scale),
                "temperature": s.temperature, "max_tokens": s.max_tokens}

    def key(self, prompt: str, answer: str) -> str:
        return digest([self.config(), prompt, answer], 20)

    def render(self, example: Example, answer: str) -> str:
        low, high = self.settings.scale
        fields = {**example.fields, "prompt": example.prompt, "reference": example.answer, "answer": answer,
                  "low": f"{low:g}", "high": f"{high:g}"}
        return fill(self.settings.template, fields, what="llm judge: template", record=f"example {example.id!r}")

    def score(self, examples: Sequence[Example], answers: Sequence[str]) -> list[Score]:
        prompts = [self.render(ex, a) for ex, a in zip(examples, answers)]
        keys = [self.key(ex.prompt, a) for ex, a in zip(examples, answers)]
        results: dict[str, Score] = {}
        todo: dict[str, str] = {}
        for k, p in zip(keys, prompts):
            if k in results or k in todo:
                self.stats.deduplicated += 1
                continue
            cached = self._cache.get(k) if self._cache else None
            if cached is not None:
                self.stats.cache_hits += 1
                results[k] = Score(cached["score"], {**cached["meta"], "cached": True})
            else:
                todo[k] = p
        if todo:
            with ThreadPoolExecutor(max_workers=self.settings.concurrency) as pool:
                for k, score in zip(todo, pool.map(self._judge, todo.values())):
                    results[k] = score
                    if self._cache is not None and "error" not in score.meta:
                        self._cache.put(k, {"score": score.value, "meta": score.meta})
        return [results[k] for k in keys]

    def _judge(self, prompt: str) -> Score:
        import openai

        s = self.settings
        attempts = 1 + (s.parse_retries if s.on_unparseable == "retry" else 0)
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        reply = ""
        for _ in range(attempts):
            try:
                resp = self.client().chat.completions.create(
                    model=s.model, messages=[{"role": "user", "content": prompt}],
                    temperature=s.temperature, max_tokens=s.max_tokens)
            except (openai.OpenAIError, ValueError) as exc:  # retries exhausted, non-retryable, or a non-JSON body
                with self._lock:
                    self.stats.requests += 1
                    self.stats.errors += 1
                if s.on_unparseable == "fail":
                    raise JudgeError(f"llm judge {s.model} at {self.base_url}: {exc}") from exc
                return Score(0.0, {"error": f"{type(exc).__name__}: {exc}"[:300], **usage})
            self._account(resp, usage)
            reply = (resp.choices[0].message.content or "") if resp.choices else ""
            value = parse_score(reply, *s.scale)
            if value is not None:
                return Score(value, {"reply": reply[:200], **usage, "cost": self._cost(usage)})
            with self._lock:
                self.stats.unparseable += 1
        if s.on_unparseable == "fail":
            raise JudgeError(f"llm judge {s.model}: no score in reply {reply[:200]!r}")
        return Score(0.0, {"unparseable": reply[:200], **usage, "cost": self._cost(usage)})

    def _account(self, resp, usage: dict[str, int]) -> None:
        u = getattr(resp, "usage", None)
        p, c = (u.prompt_tokens or 0, u.completion_tokens or 0) if u else (0, 0)
        usage["prompt_tokens"] += p
        usage["completion_tokens"] += c
        with self._lock:
            self.stats.requests += 1
            self.stats.prompt_tokens += p
            self.stats.completion_tokens += c
            self.stats.cost += self._cost({"prompt_tokens": p, "completion_tokens": c})

    def _cost(self, usage: dict[str, int]) -> float:
        return (usage["prompt_tokens"] * self.settings.price_per_mtok_prompt
                + usage["completion_tokens"] * self.settings.price_per_mtok_completion) / 1e6
