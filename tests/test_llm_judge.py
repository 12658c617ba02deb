"""The LLM judge through the real openai client against a local chat-completions server."""

import pytest

from chat_server import ChatServer
from psomerge.judges.llm import JudgeError, LLMJudge, parse_score
from psomerge.judges.protocol import Example


def ex(i, ref):
    return Example(str(i), f"What is {i}?", ref)


@pytest.fixture
def server():
    with ChatServer(sleep=1.5) as s:
        yield s


def judge(server, tmp_path=None, **kw):
    kw.setdefault("max_retries", 3)
    kw.setdefault("timeout", 5.0)
    return LLMJudge(model="judge", base_url=server.url, api_key_env="PSOMERGE_TEST_KEY",
                    cache_path=(tmp_path / "judge.sqlite") if tmp_path else None, **kw)


def test_parse_score():
    assert parse_score("Score: 7", 1, 10) == pytest.approx(6 / 9)
    assert parse_score("I'd say 10.", 1, 10) == 1.0
    assert parse_score("Score: 11", 1, 10) is None
    assert parse_score("no idea", 1, 10) is None


def test_scores_dedupes_caches_and_accounts(server, tmp_path):
    j = judge(server, tmp_path, price_per_mtok_prompt=1.0, price_per_mtok_completion=2.0)
    examples = [ex(1, "a"), ex(2, "b"), ex(1, "a"), ex(3, "c")]
    scores = j.score(examples, ["a", "x", "a", "c"])
    assert [s.value for s in scores] == pytest.approx([8 / 9, 1 / 9, 8 / 9, 8 / 9])
    assert len(server.requests) == 3 and j.stats.deduplicated == 1
    assert server.requests[0]["temperature"] == 0 and server.requests[0]["model"] == "judge"
    assert (j.stats.prompt_tokens, j.stats.completion_tokens) == (30, 9)
    assert j.stats.cost == pytest.approx((30 * 1.0 + 9 * 2.0) / 1e6)
    # identical pairs from another particle, or another run, are never judged again
    again = judge(server, tmp_path).score([ex(2, "b"), ex(3, "c")], ["x", "c"])
    assert [s.value for s in again] == pytest.approx([1 / 9, 8 / 9]) and len(server.requests) == 3


def test_retries_429_500_and_timeouts(server):
    server.faults = ["429", "500", "sleep"]
    j = judge(server, timeout=0.5, max_retries=3)
    [s] = j.score([ex(1, "a")], ["a"])
    assert s.value == pytest.approx(8 / 9)
    assert len(server.requests) == 4  # three failures retried by the client, then success


def test_unparseable_reply_policies(server):
    server.faults = ["garbage"]
    [s] = judge(server, on_unparseable="retry").score([ex(1, "a")], ["a"])
    assert s.value == pytest.approx(8 / 9)
    server.faults = ["garbage"]
    zj = judge(server, on_unparseable="zero")
    [z] = zj.score([ex(2, "a")], ["a"])
    assert z.value == 0.0 and "lovely" in z.meta["unparseable"] and zj.stats.unparseable == 1
    server.faults = ["garbage"]
    with pytest.raises(JudgeError, match="no score"):
        judge(server, on_unparseable="fail").score([ex(3, "a")], ["a"])


def test_garbage_body_and_persistent_errors_score_zero_uncached(server, tmp_path):
    server.always = "500"
    j = judge(server, tmp_path, max_retries=1, on_unparseable="zero")
    [s] = j.score([ex(1, "a")], ["a"])
    assert s.value == 0.0 and "error" in s.meta and j.stats.errors == 1
    assert len(server.requests) == 2
    server.always = "badjson"
    [b] = j.score([ex(1, "a")], ["a"])
    assert b.value == 0.0 and "error" in b.meta
    server.always = None
    [ok] = j.score([ex(1, "a")], ["a"])  # errors were not cached: now it is judged
    assert ok.value == pytest.approx(8 / 9)
