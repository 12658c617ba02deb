"""Hostile eval-suite data files: each is refused with the file, line and key at fault, or read
as the user meant."""

import json
import logging

import pytest
import yaml

from psomerge.config import RunConfig
from psomerge.errors import ConfigError
from psomerge.evaluation.suite import EvalSuite
from psomerge.judges import ExactMatch


def _records(n, **extra):
    return [{"question": f"q{i}", "answer": str(i), **extra} for i in range(n)]


def _lines(records):
    return "\n".join(json.dumps(r) for r in records)


def _suite(tmp_path, content, name="d.jsonl", **suite):
    """The suite a run config over a data file holding ``content`` builds."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / name
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "b").mkdir(exist_ok=True)
    (tmp_path / "e").mkdir(exist_ok=True)
    cfg = {"base": str(tmp_path / "b"), "experts": [str(tmp_path / "e")],
           "suites": [{"name": "s", "dataset": str(data), "optimisation_size": 2, **suite}]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    [s] = [EvalSuite.from_settings(x) for x in RunConfig.load(path).suites]
    return s


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path / "home"))


def test_empty_dataset_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"d\.jsonl holds no records"):
        _suite(tmp_path, "\n\n")


def test_byte_order_mark_crlf_and_blank_lines_read_the_same_records(tmp_path):
    plain = _suite(tmp_path / "a", _lines(_records(5)))
    bom = _suite(tmp_path / "b", "\ufeff" + _lines(_records(5)).replace("\n", "\r\n\r\n") + "\r\n")
    assert [(e.prompt, e.answer) for e in bom.examples] == [(e.prompt, e.answer) for e in plain.examples]
    csv = _suite(tmp_path / "c", "\ufeffquestion,answer\r\n" + "".join(f"q{i},{i}\r\n" for i in range(5)),
                 name="d.CSV")
    assert [(e.prompt, e.answer) for e in csv.examples] == [(e.prompt, e.answer) for e in plain.examples]


def test_line_separators_inside_json_strings_do_not_cut_a_record(tmp_path):
    text = _lines(_records(4)) + "\n" + json.dumps({"question": "a\u2028b\x85c", "answer": "x"}, ensure_ascii=False)
    s = _suite(tmp_path, text)
    assert s.examples[-1].prompt == "a\u2028b\x85c"


def test_not_utf8_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"d\.jsonl:4: not UTF-8 \(byte 0xe9\)"):
        _suite(tmp_path, _lines(_records(3)).encode() + b'\n{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ConfigError, match=r"d\.csv:3: not UTF-8"):
        _suite(tmp_path, b"question,answer\nq0,0\nq\xe91,1\n", name="d.csv")


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "a record must be a JSON object, got list"),
    ("42", "a record must be a JSON object, got int"),
    ('{"question": "a", "answer": NaN}', "NaN is not JSON"),
    ('{"question": "a", "answer": "1", "answer": "2"}', "key 'answer' appears twice"),
])
def test_bad_record_names_file_and_line(tmp_path, line, message):
    with pytest.raises(ConfigError, match=rf"d\.jsonl:5: {message}"):
        _suite(tmp_path, _lines(_records(3)) + "\n\n" + line + "\n")


@pytest.mark.parametrize("answer", [None, [1, "x"], {"a": 1}])
def test_answer_that_is_no_string_or_number_is_refused(tmp_path, answer):
    records = _records(4) + [{"question": "q", "answer": answer}]
    with pytest.raises(ConfigError, match=r"answer_field 'answer' in .*d\.jsonl:5 is .*string or a number"):
        _suite(tmp_path, _lines(records))


def test_numeric_answers_are_read_as_text(tmp_path):
    s = _suite(tmp_path, _lines([{"question": f"q{i}", "answer": i} for i in range(5)]))
    assert [e.answer for e in s.examples] == ["0", "1", "2", "3", "4"]


def test_missing_fields_name_file_line_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"prompt_template names field 'question', missing in .*d\.jsonl:2"):
        _suite(tmp_path, _lines(_records(1) + [{"answer": "1"}]))
    with pytest.raises(ConfigError, match=r"answer_field 'answer' missing in .*d\.jsonl:3"):
        _suite(tmp_path, _lines(_records(2) + [{"question": "q"}]))
    with pytest.raises(ConfigError, match=r"names field 'context', missing in .*d\.jsonl:1"):
        _suite(tmp_path, _lines(_records(5)), prompt_template="{question} {context}")


def test_id_field_missing_or_repeated_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"id_field 'id' missing in .*d\.jsonl:1"):
        _suite(tmp_path, _lines(_records(5)), id_field="id")
    with pytest.raises(ConfigError, match=r"id_field 'id': .*d\.jsonl:2 repeats id '7' of .*d\.jsonl:1"):
        _suite(tmp_path, _lines(_records(5, id=7)), id_field="id")


def test_ragged_csv_row_names_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"d\.csv:3: 1 values where the header names 2 columns"):
        _suite(tmp_path, "question,answer\nq1,1\nq2\nq3,3\nq4,4\n", name="d.csv")
    with pytest.raises(ConfigError, match=r"d\.csv:2: 3 values where the header names 2 columns"):
        _suite(tmp_path, "question,answer\nq1,1,x\nq3,3\nq4,4\n", name="d.csv")


@pytest.mark.parametrize("sizes", [{"optimisation_size": 10}, {"optimisation_size": 3, "validation_size": 2},
                                   {"optimisation_size": 2, "heldout_size": 4}])
def test_split_sizes_that_do_not_fit_are_refused(tmp_path, sizes):
    with pytest.raises(ConfigError, match=r"eval suite 's': optimisation_size=.* do not fit its 5 examples"):
        _suite(tmp_path, _lines(_records(5)), **sizes)


@pytest.mark.parametrize("key, value", [("optimisation_size", 0), ("optimisation_size", -1),
                                        ("validation_size", -1), ("heldout_size", 0)])
def test_split_sizes_out_of_range_name_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"run\.yaml: key 'suites\.0\.{key}'"):
        _suite(tmp_path, _lines(_records(5)), **{key: value})


def test_dataset_folder_that_is_no_datasets_folder(tmp_path):
    (tmp_path / "data.jsonl").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "e").mkdir()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"base": str(tmp_path / "b"), "experts": [str(tmp_path / "e")],
                                    "suites": [{"name": "s", "dataset": str(tmp_path / "data.jsonl")}]}))
    with pytest.raises(ConfigError, match=r"dataset folder .*data\.jsonl: not a saved datasets folder"):
        EvalSuite.from_settings(RunConfig.load(path).suites[0])


def test_duplicate_prompts_across_search_and_heldout_are_reported(caplog):
    records = [{"q": "same", "a": "1"}] * 2 + [{"q": f"q{i}", "a": str(i)} for i in range(8)]
    leaks = []
    for seed in range(20):
        with caplog.at_level(logging.WARNING, logger="psomerge.evaluation.suite"):
            caplog.clear()
            s = EvalSuite.from_records("s", records, prompt_template="{q}", answer_field="a", scorer=ExactMatch(),
                                       source="d.jsonl", optimisation_size=3, split_seed=seed)
        opt = {e.id for e in s.split("optimisation")}
        crosses = len(opt & {"0", "1"}) == 1
        assert bool(caplog.records) == crosses
        if crosses:
            leaks.append(caplog.records[0].getMessage())
    assert leaks and "record 0 of d.jsonl and record 1 of d.jsonl" in leaks[0]
    assert "remove duplicate records" in leaks[0]
