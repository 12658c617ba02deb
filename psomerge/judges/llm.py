"""LLM judge: a rubric prompt to any OpenAI-compatible chat endpoint (a hosted API, or a
vLLM server psomerge starts), a numeric score parsed from the reply and scaled to [0, 1].

Identical (prompt, answer) pairs are judged once: within a batch they are de-duplicated, and
across particles and runs a persistent judge cache keyed by (judge config, prompt, answer)
answers them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from psomerge.errors import ConfigError, PsomergeError
from psomerge.judges.protocol import Example, Score
from psomerge.kvstore import SqliteKV

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


@dataclass
class LLMJudge:
    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    template: str = DEFAULT_TEMPLATE
    scale: tuple[float, float] = (1.0, 10.0)
    temperature: float = 0.0
    max_tokens: int = 16
    concurrency: int = 8
    max_retries: int = 3  # the client's retries with backoff on 408/409/429/5xx and timeouts
    timeout: float = 30.0
    on_unparseable: Literal["retry", "zero", "fail"] = "retry"
    parse_retries: int = 2
    price_per_mtok_prompt: float = 0.0
    price_per_mtok_completion: float = 0.0
    cache_path: Path | None = None
    serve: dict[str, Any] | None = None  # start a vLLM server: {model_path, python, ...} (VLLMServer's keys)
    name: str = "llm"
    stats: JudgeStats = field(default_factory=JudgeStats)

    def __post_init__(self) -> None:
        self.scale = (float(self.scale[0]), float(self.scale[1]))  # YAML gives a list
        if self.cache_path is not None:
            self.cache_path = Path(self.cache_path)
        if self.on_unparseable not in ("retry", "zero", "fail"):
            raise ConfigError(f"llm judge: on_unparseable {self.on_unparseable!r} is not retry, zero or fail")
        low, high = self.scale
        if not low < high:
            raise ConfigError(f"llm judge: scale {self.scale} needs low < high")
        self._lock = threading.Lock()
        self._cache = SqliteKV(self.cache_path, "judge_cache") if self.cache_path else None
        self._client = None
        self._server = None

    def client(self):
        """The openai client; starts the vLLM server first when the config asks for one."""
        with self._lock:
            if self._client is None:
                from openai import OpenAI  # optional dependency: psomerge[judges]

                if self.serve is not None:
                    from psomerge.judges.vllm_server import VLLMServer

                    self._server = VLLMServer(**{"served_name": self.model, **self.serve}).start()
                    self.base_url = self._server.url
                self._client = OpenAI(base_url=self.base_url, api_key=os.environ.get(self.api_key_env) or "none",
                                      max_retries=self.max_retries, timeout=self.timeout)
            return self._client

    def close(self) -> None:
        """Stop the vLLM server this judge started, if any."""
        if self._server is not None:
            self._server.stop()
            self._server = None
            self._client = None

    def config(self) -> dict[str, Any]:
        """What changes a verdict (the endpoint does not: equal models behind two URLs agree)."""
        return {"type": self.name, "model": self.model, "template": self.template, "scale": list(self.scale),
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def key(self, prompt: str, answer: str) -> str:
        payload = json.dumps([self.config(), prompt, answer], sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=20).hexdigest()

    def render(self, example: Example, answer: str) -> str:
        low, high = self.scale
        fields = {**example.fields, "prompt": example.prompt, "reference": example.answer, "answer": answer,
                  "low": f"{low:g}", "high": f"{high:g}"}
        try:
            return self.template.format(**fields)
        except KeyError as exc:
            raise ConfigError(f"llm judge: template names field {exc.args[0]!r}, missing in example {example.id!r}") from None

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
            with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
                for k, score in zip(todo, pool.map(self._judge, todo.values())):
                    results[k] = score
                    if self._cache is not None and "error" not in score.meta:
                        self._cache.put(k, {"score": score.value, "meta": score.meta})
        return [results[k] for k in keys]

    def _judge(self, prompt: str) -> Score:
        import openai

        attempts = 1 + (self.parse_retries if self.on_unparseable == "retry" else 0)
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        reply = ""
        for _ in range(attempts):
            try:
                resp = self.client().chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}],
                    temperature=self.temperature, max_tokens=self.max_tokens)
            except (openai.OpenAIError, ValueError) as exc:  # retries exhausted, non-retryable, or a non-JSON body
                with self._lock:
                    self.stats.requests += 1
                    self.stats.errors += 1
                if self.on_unparseable == "fail":
                    raise JudgeError(f"llm judge {self.model} at {self.base_url}: {exc}") from exc
                return Score(0.0, {"error": f"{type(exc).__name__}: {exc}"[:300], **usage})
            self._account(resp, usage)
            reply = (resp.choices[0].message.content or "") if resp.choices else ""
            value = parse_score(reply, *self.scale)
            if value is not None:
                return Score(value, {"reply": reply[:200], **usage, "cost": self._cost(usage)})
            with self._lock:
                self.stats.unparseable += 1
        if self.on_unparseable == "fail":
            raise JudgeError(f"llm judge {self.model}: no score in reply {reply[:200]!r}")
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
        return (usage["prompt_tokens"] * self.price_per_mtok_prompt
                + usage["completion_tokens"] * self.price_per_mtok_completion) / 1e6
