import torch
import pytest
from transformers import LlamaForCausalLM

from psomerge.presets.charlm import char_tokenizer, tiny_llama_config
from psomerge.presets.tiny_tasks import ALPHABET
from psomerge.errors import ConfigError
from psomerge.evaluation.suite import EvalSuite
from psomerge.evaluation import evaluate
from psomerge.judges import ExactMatch, Example
from psomerge.judges.exact_match import extract_choice, extract_number, normalize_text
from psomerge.generation.transformers_backend import TransformersGenerator


def test_normalisers():
    assert normalize_text("  The  Answer.\n") == "the answer"
    assert extract_number("so 40 + 2 = 42\n#### 42") == "42"
    assert extract_number("The answer is 1,234.50 dollars, not 7") == "1234.5"
    assert extract_number("we get 3 then 5") == "5"
    assert extract_number("no digits") == ""
    assert extract_choice("(B) because") == "B"
    assert extract_choice("Answer: c") == "C"


def test_exact_match_scores():
    exs = [Example("0", "q", "42"), Example("1", "q", "42"), Example("2", "q", "")]
    assert [s.value for s in ExactMatch(normalizer="number").score(exs, ["it is 42", "41", ""])] == [1.0, 0.0, 0.0]
    assert [s.value for s in ExactMatch(normalizer="none").score(exs[:2], ["42", " 42 "])] == [1.0, 1.0]
    with pytest.raises(ConfigError, match="normalizer"):
        ExactMatch(normalizer="fuzzy")


def _suite(n=50, **kw):
    recs = [{"id": i, "q": f"q{i}", "a": str(i)} for i in range(n)]
    return EvalSuite.from_records("s", recs, prompt_template="Q: {q}", answer_field="a", scorer=ExactMatch(),
                                  id_field="id", **kw)


def test_splits_are_disjoint_deterministic_and_sized():
    s = _suite(optimisation_size=10, heldout_size=30, split_seed=5)
    opt, held = s.split("optimisation"), s.split("heldout")
    assert len(opt) == 10 and len(held) == 30
    assert not {e.id for e in opt} & {e.id for e in held}
    again = _suite(optimisation_size=10, heldout_size=30, split_seed=5).split("optimisation")
    assert [e.id for e in opt] == [e.id for e in again]
    assert s.fingerprint() != _suite(optimisation_size=10, heldout_size=30, split_seed=6).fingerprint()
    rest = _suite(optimisation_size=10).split("heldout")
    assert len(rest) == 40


def test_suite_errors_name_suite_and_field():
    with pytest.raises(ConfigError, match="'s'.*do not fit"):
        _suite(n=5, optimisation_size=10)
    with pytest.raises(ConfigError, match="'nope'"):
        EvalSuite.from_records("s", [{"q": 1, "a": 1}], prompt_template="{nope}", answer_field="a", scorer=ExactMatch())


@pytest.fixture(scope="module")
def tiny_lm():
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(len(tok), hidden=32, layers=2, heads=2)), tok


def test_batched_generation_equals_one_by_one(tiny_lm):
    model, tok = tiny_lm
    prompts = ["add 1+2=", "rev abcdef=", "sort 93=", "copy a="]
    batched = TransformersGenerator(model, tok, batch_size=4, max_new_tokens=6, stop=()).generate(prompts)
    one_at_a_time = TransformersGenerator(model, tok, batch_size=1, max_new_tokens=6, stop=())
    single = [one_at_a_time.generate([p])[0] for p in prompts]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_evaluate_weighted_fitness_and_counts():
    class Echo:  # a generator that answers every prompt with its own last character
        def generate(self, prompts):
            return [p[-1] for p in prompts]

    recs = [{"q": f"x{i % 3}", "a": str(i % 3)} for i in range(12)]
    right = EvalSuite.from_records("right", recs, prompt_template="{q}", answer_field="a", scorer=ExactMatch(),
                                   optimisation_size=4, weight=3.0)
    wrong = EvalSuite.from_records("wrong", recs, prompt_template="{q}?", answer_field="a", scorer=ExactMatch(),
                                   optimisation_size=4, weight=1.0)
    result = evaluate(Echo(), [right, wrong], "optimisation")
    assert result.scores == {"right": 1.0, "wrong": 0.0}
    assert result.fitness == pytest.approx(0.75)
    assert result.num_examples == 8
