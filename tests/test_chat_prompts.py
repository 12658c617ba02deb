"""Prompts rendered through a real transformers chat template (a tokenizer built here with a
chat_template set), few-shot turns from the optimisation split only, and the regex answer
extractor of exact match."""

import json
import re

import pytest

from psomerge.config import RunConfig
from psomerge.errors import ConfigError
from psomerge.evaluation.suite import EvalSuite, SuiteSettings
from psomerge.judges.exact_match import ExactMatch, ExactMatchSettings, extract_match
from psomerge.judges.protocol import Example
from psomerge.pipeline import RunContext
from psomerge.presets.charlm import char_tokenizer
from psomerge.presets.tiny_tasks import ALPHABET
from psomerge.yamlconfig import validate

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
RECORDS = [{"id": f"q{i}", "question": f"{i}+{i}=", "answer": str(2 * i)} for i in range(24)]


def save_tokenizer(folder, template=TEMPLATE):
    tok = char_tokenizer(ALPHABET + "<|>_\n")
    tok.chat_template = template
    tok.save_pretrained(folder)
    return tok


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def suite(data, tokenizer=None, base=None, **chat):
    s = validate(SuiteSettings, {"name": "arith", "dataset": str(data), "prompt_template": "{question}",
                                 "id_field": "id", "optimisation_size": 8, "validation_size": 4, "heldout_size": 8,
                                 "chat": {**({"tokenizer": str(tokenizer)} if tokenizer else {}), **chat}}, "x.yaml")
    return EvalSuite.from_settings(s, base_model=base)


def turns(prompt):
    """(role, content) of each turn of a prompt rendered by TEMPLATE, up to the generation prompt."""
    assert prompt.endswith("<|assistant|>\n")
    return re.findall(r"<\|(\w+)\|>\n(.*?)\n(?=<\|)", prompt, re.S)


def test_prompts_are_the_chat_template_with_system_and_shots_from_the_optimisation_split(tmp_path, data):
    tok = save_tokenizer(tmp_path / "tok")
    s = suite(data, tmp_path / "tok", system="Add the numbers.", shots=2, shot_answer_template="{answer}.")
    optimisation = {ex.id for ex in s.split("optimisation")}
    questions = {r["question"]: r for r in RECORDS}
    for ex in s.examples:
        # the template's BOS is dropped: the tokenizer adds it itself when the backend encodes the prompt
        assert not ex.prompt.startswith(tok.bos_token)
        roles = turns(ex.prompt)
        assert [r for r, _ in roles] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert roles[0][1] == "Add the numbers." and roles[-1][1] == ex.fields["question"]
        shots = [questions[roles[k][1]] for k in (1, 3)]
        assert [roles[k][1] for k in (2, 4)] == [f"{r['answer']}." for r in shots]
        # never validation or held-out examples, never the example itself
        assert all(r["id"] in optimisation and r["id"] != ex.id for r in shots)
        messages = [{"role": "system", "content": "Add the numbers."}]
        for r in shots:
            messages += [{"role": "user", "content": r["question"]},
                         {"role": "assistant", "content": f"{r['answer']}."}]
        messages.append({"role": "user", "content": ex.fields["question"]})
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.bos_token + ex.prompt == expected  # exactly what transformers renders
    again = suite(data, tmp_path / "tok", system="Add the numbers.", shots=2, shot_answer_template="{answer}.")
    assert [ex.prompt for ex in again.examples] == [ex.prompt for ex in s.examples]  # deterministic
    assert again.fingerprint() == s.fingerprint()


def test_template_system_prompt_and_shots_change_every_cache_key(tmp_path, data):
    save_tokenizer(tmp_path / "tok")
    save_tokenizer(tmp_path / "other", TEMPLATE.replace("<|assistant|>\n{% endif %}", "<|assistant|>\n\n{% endif %}"))
    plain = EvalSuite.from_settings(validate(SuiteSettings, {
        "name": "arith", "dataset": str(data), "prompt_template": "{question}", "id_field": "id",
        "optimisation_size": 8, "validation_size": 4, "heldout_size": 8}, "x.yaml"))
    variants = [suite(data, tmp_path / "tok"), suite(data, tmp_path / "other"),
                suite(data, tmp_path / "tok", system="Be brief."), suite(data, tmp_path / "tok", shots=1),
                suite(data, tmp_path / "tok", shots=2),
                suite(data, tmp_path / "tok", shots=1, shot_answer_template="={answer}")]
    fingerprints = [plain.fingerprint()] + [v.fingerprint() for v in variants]
    assert len(set(fingerprints)) == len(fingerprints)
    assert plain.examples[0].prompt == RECORDS[0]["question"]  # no chat: prompts as before
    # without chat.tokenizer the base model's tokenizer renders
    assert suite(data, base=tmp_path / "tok").fingerprint() == variants[0].fingerprint()


def test_chat_errors_name_the_suite_and_key(tmp_path, data):
    tok = char_tokenizer(ALPHABET)
    tok.save_pretrained(tmp_path / "plain")  # no chat template
    with pytest.raises(ConfigError, match=r"eval suite 'arith': key 'chat': the tokenizer in .*plain has no chat "
                                          r"template"):
        suite(data, tmp_path / "plain")
    with pytest.raises(ConfigError, match=r"eval suite 'arith': key 'chat.tokenizer': no tokenizer folder"):
        suite(data)
    save_tokenizer(tmp_path / "tok")
    with pytest.raises(ConfigError, match=r"eval suite 'arith': key 'chat.shots': 8 shots need 9 examples in the "
                                          r"optimisation split, which has 8"):
        suite(data, tmp_path / "tok", shots=8)
    with pytest.raises(ConfigError, match=r"x.yaml: key 'chat.shots': Input should be greater than or equal to 0"):
        suite(data, tmp_path / "tok", shots=-1)
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + TEMPLATE
    save_tokenizer(tmp_path / "nosys", refusing)
    with pytest.raises(ConfigError, match=r"eval suite 'arith': key 'chat': the chat template of .*nosys cannot "
                                          r"render .*no system role"):
        suite(data, tmp_path / "nosys", system="hi")


def test_the_run_base_model_is_the_default_tokenizer(char_family, tmp_path):
    root, experts, data = char_family
    config = {"base": str(root / "base"), "experts": [str(e) for e in experts], "output_dir": str(tmp_path / "run"),
              "cache_path": str(tmp_path / "fitness.sqlite"),
              "suites": [{"name": "add", "dataset": str(data["addition"]), "optimisation_size": 10, "chat": {}}]}
    loaded = RunConfig.from_dict(config)
    assert RunConfig.model_validate_json(loaded.model_dump_json()) == loaded  # as Prefect workers receive it
    with pytest.raises(ConfigError, match=r"eval suite 'add': key 'chat': the tokenizer in .*base has no chat"):
        RunContext(loaded)  # refused before the basis is built
    with pytest.raises(ConfigError, match=r"key 'suites\[0\].chat.tokenizer': folder .*nowhere does not exist"):
        RunConfig.from_dict({**config, "suites": [{**config["suites"][0], "chat": {"tokenizer": "nowhere"}}]})


def test_regex_extraction_then_normalisation():
    pattern = re.compile(r"answer is \(?([A-D])")
    assert extract_match(pattern, "the answer is (B), not the answer is C") == "B"
    assert extract_match(pattern, "the answer is (B), not the answer is C", "last") == "C"
    assert extract_match(pattern, "no idea") == ""
    assert extract_match(re.compile(r"\d+"), "x 12 y 7", "last") == "7"  # no group: the whole match
    assert extract_match(re.compile(r"(a)|(b)"), "b") == "b"  # the first non-empty group
    examples = [Example("0", "", "positive"), Example("1", "", "NEGATIVE"), Example("2", "", "neutral")]
    judge = ExactMatch(extract=r"(?i)sentiment:\s*(\w+)", normalizer="text")  # flags inline
    answers = ["Sentiment: Positive.", "sentiment: negative", "I think neutral"]
    assert [s.value for s in judge.score(examples, answers)] == [1.0, 1.0, 0.0]
    last = ExactMatch(extract=r"(\w+)\.", extract_match="last", normalizer="none")
    assert [s.value for s in last.score(examples[:1], ["maybe negative. Finally positive."])] == [1.0]


def test_regex_options_checked_and_cache_keys_kept():
    assert ExactMatch(normalizer="number").config() == {"type": "exact_match", "normalizer": "number"}  # as before
    assert ExactMatch(extract="(x)").config() != ExactMatch(extract="(x)", extract_match="last").config()
    with pytest.raises(ConfigError, match=r"exact_match: key 'extract': not a valid regular expression \(missing \)"):
        ExactMatch(extract="(unclosed")
    with pytest.raises(ConfigError, match=r"'extract_match' applies only with 'extract'"):
        validate(ExactMatchSettings, {"extract_match": "last"}, "exact_match")
