"""Choosing scorers in YAML, dataset formats, and switching judges without code changes."""

import json

import pytest
import yaml

from chat_server import ChatServer
from psomerge.config import RunConfig
from psomerge.errors import ConfigError
from psomerge.evaluation.suite import EvalSuite, read_records
from psomerge.judges import ExactMatch
from psomerge.judges.code_exec import CodeExec
from psomerge.judges.llm import LLMJudge
from psomerge.judges.factory import JudgeSettings, make_scorer
from psomerge.yamlconfig import StrictModel, validate

RECORDS = [{"id": i, "question": f"{i}+{i}=", "answer": str(2 * i)} for i in range(20)]


class _Judged(StrictModel):
    judge: JudgeSettings


def judge(data: dict, source: str = "x.yaml"):
    return make_scorer(validate(_Judged, {"judge": data}, source).judge)


def test_make_scorer_by_name_with_clear_errors():
    assert isinstance(judge({"type": "exact_match", "normalizer": "number"}), ExactMatch)
    assert isinstance(judge({"type": "code_exec", "timeout": 2}), CodeExec)
    assert isinstance(judge({"type": "llm", "model": "m", "base_url": "http://127.0.0.1:9/v1"}), LLMJudge)
    with pytest.raises(ConfigError, match=r"x.yaml: key 'judge.type': .*'bleu'.*code_exec, exact_match, llm"):
        judge({"type": "bleu"})
    with pytest.raises(ConfigError, match=r"x.yaml: key 'judge.temprature': Extra inputs are not permitted"):
        judge({"type": "llm", "model": "m", "temprature": 0})


def test_dataset_formats_read_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    csv_rows = (f"{r['id']},{r['question']},{r['answer']}" for r in RECORDS)
    (tmp_path / "d.csv").write_text("id,question,answer\n" + "\n".join(csv_rows))
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    norm = lambda rs: [(str(r["id"]), r["question"], str(r["answer"])) for r in rs]  # noqa: E731
    expected = norm(RECORDS)
    for name in ("d.jsonl", "d.csv", "d.parquet", "ds"):
        assert norm(read_records(tmp_path / name)) == expected, name
    assert norm(read_records(tmp_path / "dd", "test")) == expected
    with pytest.raises(ConfigError, match="dataset_split"):
        read_records(tmp_path / "dd")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")


def test_switching_judges_is_a_yaml_change(tmp_path, monkeypatch):
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    suite = {"name": "double", "dataset": str(data), "optimisation_size": 5, "heldout_size": 10}
    (tmp_path / "b").mkdir()
    (tmp_path / "e").mkdir()
    base = {"base": str(tmp_path / "b"), "experts": [str(tmp_path / "e")], "suites": [suite]}
    with ChatServer() as server:
        for judge, cls in [({"type": "exact_match", "normalizer": "number"}, ExactMatch),
                           ({"type": "llm", "model": "judge", "base_url": server.url, "scale": [1, 10]}, LLMJudge)]:
            path = tmp_path / "run.yaml"
            path.write_text(yaml.safe_dump({**base, "suites": [{**suite, "judge": judge}]}))
            [s] = [EvalSuite.from_settings(x) for x in RunConfig.load(path).suites]
            assert isinstance(s.scorer, cls)
            examples = s.split("optimisation")
            answers = [e.answer for e in examples[:3]] + ["wrong", "wrong"]
            values = [x.value for x in s.scorer.score(examples, answers)]
            right = 1.0 if cls is ExactMatch else 8 / 9  # the server answers 'Score: 9' on a 1-10 scale
            wrong = 0.0 if cls is ExactMatch else 1 / 9
            assert values == pytest.approx([right] * 3 + [wrong] * 2)
        assert len(server.requests) == 5  # only the LLM judge called the server, once per pair
