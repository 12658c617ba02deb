"""lm-evaluation-harness tasks as suites: real lm-eval (TaskManager over task YAMLs in a temp
folder, local JSONL data), scored on a tiny char-level Llama through psomerge's transformers
backend, checked against lm-eval's own evaluator on the same model."""

import copy
import json
import re
import subprocess
import sys
import textwrap

import pytest

from psomerge.config import RunConfig
from psomerge.errors import ConfigError
from psomerge.evaluation import evaluate
from psomerge.evaluation.suite import EvalSuite, SuiteSettings
from psomerge.generation import TransformersSettings, open_generator
from psomerge.generation.transformers_backend import TransformersGenerator
from psomerge.pipeline import run_swarm
from psomerge.yamlconfig import validate

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from psomerge.judges.lm_eval_scorer import GeneratorLM  # noqa: E402

ARITH = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(5)]  # 20 documents
MC = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b)], "label": 0}
      for a in range(3) for b in range(6)]  # 18 documents


def task_yaml(name, data, body, **data_files):
    files = data_files or {"train": str(data)}
    return textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files: {json.dumps(files)}
          cache_dir: {data.parent / "hf-cache"}
        """) + textwrap.dedent(body)


GENERATE = textwrap.dedent("""\
    test_split: train
    output_type: generate_until
    doc_to_text: "{{question}}"
    doc_to_target: "{{answer}}"
    generation_kwargs: {until: ["\\n", "="], max_gen_toks: 3}
    filter_list:
      - name: digits
        filter: [{function: regex, regex_pattern: "(\\\\d+)"}, {function: take_first}]
      - name: raw
        filter: [{function: take_first}]
    metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
    """)
CHOICE = textwrap.dedent("""\
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: label
    num_fewshot: 2
    metric_list: [{metric: acc}, {metric: acc_norm}]
    """)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tasks(tmp_path):
    """A task folder: generate_until with a regex filter; multiple_choice with shots from its own
    training split; the same over one file (shots would come from the evaluated documents)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    arith = write_jsonl(tmp_path / "arith.jsonl", ARITH)
    mc_train = write_jsonl(tmp_path / "mc_train.jsonl", MC[:6])
    mc_test = write_jsonl(tmp_path / "mc_test.jsonl", MC[6:])
    (folder / "arith.yaml").write_text(task_yaml("t_arith", arith, GENERATE))
    (folder / "mc.yaml").write_text(task_yaml("t_mc", mc_test, "training_split: train\ntest_split: test\n" + CHOICE,
                                              train=str(mc_train), test=str(mc_test)))
    with_f1 = CHOICE.replace("acc_norm}", "acc_norm}, {metric: f1}")
    (folder / "mc_one.yaml").write_text(task_yaml("t_mc_one", write_jsonl(tmp_path / "mc.jsonl", MC),
                                                  "test_split: train\n" + with_f1))
    return folder


@pytest.fixture(scope="module")
def generator(char_family):
    return open_generator(TransformersSettings(max_new_tokens=4, batch_size=32), char_family[0] / "base")


def suite_settings(tasks, task, **options):
    splits = {k: options.pop(k) for k in ("optimisation_size", "validation_size", "heldout_size") if k in options}
    return validate(SuiteSettings, {"name": task, "lm_eval": {"task": task, "include_path": str(tasks), **options},
                                    "optimisation_size": 6, "validation_size": 2, **splits}, "x.yaml")


def lm_suite(tasks, task, **options):
    return EvalSuite.from_settings(suite_settings(tasks, task, **options))


def test_scores_and_prompts_are_lm_evals_own(tasks, generator):
    """Every document's prompt and metric value equal what lm-eval's evaluator gives for the
    same model, behind the same adapter."""
    # some references are the (random) model's own answers, raw or their digits, so neither filter scores 0 everywhere
    answers = generator.generate([d["question"] for d in ARITH], stop=["\n", "="], max_new_tokens=3)
    digits = [re.search(r"\d+", a) for a in answers]
    references = [a if i % 3 == 1 else d.group() if i % 3 == 2 and d else doc["answer"]
                  for i, (doc, a, d) in enumerate(zip(ARITH, answers, digits))]
    write_jsonl(tasks.parent / "arith.jsonl", [{**doc, "answer": r} for doc, r in zip(ARITH, references)])
    suites = [(lm_suite(tasks, "t_arith", filter="digits"), "exact_match", "digits"),
              (lm_suite(tasks, "t_arith", filter="raw"), "exact_match", "raw"),
              (lm_suite(tasks, "t_mc", metric="acc_norm"), "acc_norm", "none")]
    results = lm_eval.simple_evaluate(model=GeneratorLM(generator), tasks=["t_arith", "t_mc"], bootstrap_iters=0,
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    for suite, metric, filter_name in suites:
        samples = {s["doc_id"]: s for s in results["samples"][suite.scorer.task.task_name]
                   if s["filter"] == filter_name}
        values = [v.value for v in suite.scorer.score_model(generator, suite.examples)]
        assert len(values) == len(samples) == len(suite.examples)
        for ex, value in zip(suite.examples, values):
            sample = samples[int(ex.id)]
            assert ex.prompt == sample["arguments"][0][0]  # rendering, few-shot context included
            assert value == sample[metric]
        assert 0 < sum(values) < len(values), (filter_name, values)  # not vacuous
    mc = suites[2][0]
    training = {f"{d['question']} {d['choices'][0]}" for d in MC[:6]}
    for ex in mc.examples:  # two shots of its training split, then the question
        *shots, question = ex.prompt.split("\n\n")
        assert len(shots) == 2 and set(shots) <= training and question == ex.fields["question"]
    assert mc.examples[0].answer == MC[6]["choices"][0]
    generated = [s.meta["answer"] for s in suites[1][0].scorer.score_model(generator, suites[1][0].examples)]
    assert generated == answers  # cut at the task's `until`, not at the backend's own stop


def test_adapter_answers_as_lm_evals_hf_model(generator):
    """Log-likelihoods (an empty context too) and generations through psomerge's backend equal
    lm-eval's own transformers model on the same weights and tokenizer."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    reference = HFLM(pretrained=generator.model, tokenizer=generator.tokenizer, batch_size=4, add_bos_token=True,
                     max_length=64)
    pairs = [("1+2=", " 3"), ("abc", "d"), ("", "12"), ("a b ", "c")]
    likelihood = [Instance("loglikelihood", {}, pair, 0) for pair in pairs]
    ours, theirs = GeneratorLM(generator).loglikelihood(likelihood), reference.loglikelihood(likelihood)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [lp for lp, _ in ours] == pytest.approx([lp for lp, _ in theirs], abs=1e-5)
    until = [Instance("generate_until", {}, (c, {"until": ["="], "max_gen_toks": 5}), 0)
             for c in ("1+2=", "abc", "9 9")]
    assert GeneratorLM(generator).generate_until(until) == reference.generate_until(until)
    # a tokenizer adding no BOS: an empty context becomes BOS, as lm-eval makes it
    no_bos = copy.deepcopy(generator.tokenizer)
    no_bos.add_bos_token = False
    unconditional = [Instance("loglikelihood", {}, ("", "12"), 0)]
    ours = GeneratorLM(TransformersGenerator(generator.model, no_bos)).loglikelihood(unconditional)
    reference = HFLM(pretrained=generator.model, tokenizer=no_bos, batch_size=1, max_length=64)
    theirs = reference.loglikelihood(unconditional)
    assert ours[0][0] == pytest.approx(theirs[0][0], abs=1e-5)


def test_search_reads_only_its_split_and_shots_come_from_it(tasks, generator):
    suite = lm_suite(tasks, "t_mc_one", optimisation_size=8, validation_size=2)
    splits = {w: suite.split(w) for w in ("optimisation", "validation", "heldout")}
    ids = {w: {ex.id for ex in exs} for w, exs in splits.items()}
    assert not ids["optimisation"] & ids["heldout"] and not ids["validation"] & (ids["optimisation"] | ids["heldout"])
    assert sum(map(len, ids.values())) == len(MC)
    questions = {f"{d['question']} {d['choices'][0]}": str(i) for i, d in enumerate(MC)}
    for ex in suite.examples:  # one file: the shots are optimisation documents, never the document itself
        shots = [questions[turn] for turn in ex.prompt.split("\n\n")[:-1]]
        assert len(shots) == 2 and set(shots) <= ids["optimisation"] - {ex.id}
    seen = []

    class Recording:  # the real generator, recording what it is asked
        def __getattr__(self, name):
            return getattr(generator, name)

        def loglikelihood(self, requests, append_eos=False):
            seen.extend(context for context, _ in requests)
            return generator.loglikelihood(requests, append_eos)

    result = evaluate(Recording(), [suite], "optimisation")
    assert len(result.scored[suite.name]) == 8 and result.num_examples == 8
    assert set(seen) == {ex.prompt for ex in splits["optimisation"]}
    assert result.scores[suite.name] == sum(result.scored[suite.name]) / 8


def test_chat_template_renders_lm_eval_prompts(tasks, tmp_path):
    """With ``chat``, lm-eval's messages (system prompt, shots as turns) go through the chat template."""
    from test_chat_prompts import save_tokenizer

    tok = save_tokenizer(tmp_path / "tok")
    chat = {"chat": {"tokenizer": str(tmp_path / "tok"), "system": "Add."}}
    settings = suite_settings(tasks, "t_mc").model_dump(mode="json")  # a dumped suite loads again
    suite = EvalSuite.from_settings(validate(SuiteSettings, {**settings, **chat}, "x.yaml"))
    plain = lm_suite(tasks, "t_mc")
    for ex, before in zip(suite.examples, plain.examples):
        *shots, question = before.prompt.split("\n\n")
        messages = [{"role": "system", "content": "Add."}]
        for shot in shots:
            q, a = shot.split(" ")
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": question})
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.bos_token + ex.prompt == rendered
    assert suite.fingerprint() != plain.fingerprint()
    assert suite.scorer.config()["chat"] and not plain.scorer.config()["chat"]  # choices follow the turn directly


def test_fingerprint_covers_documents_and_task_config(tasks, generator):
    first = lm_suite(tasks, "t_arith")
    assert lm_suite(tasks, "t_arith").fingerprint() == first.fingerprint()  # stable: cached scores are found again
    assert lm_suite(tasks, "t_arith", filter="raw").fingerprint() != first.fingerprint()
    data = tasks.parent / "arith.jsonl"
    write_jsonl(data, [*ARITH[:-1], {"question": "9+9=", "answer": "18"}])
    changed_doc = lm_suite(tasks, "t_arith")
    assert changed_doc.data_fingerprint != first.data_fingerprint
    write_jsonl(data, ARITH)
    yaml = tasks / "arith.yaml"
    yaml.write_text(yaml.read_text().replace("max_gen_toks: 3", "max_gen_toks: 2"))
    changed_config = lm_suite(tasks, "t_arith")
    assert changed_config.examples == first.examples  # same documents and prompts ...
    assert changed_config.data_fingerprint != first.data_fingerprint  # ... another task config
    acc, acc_norm = lm_suite(tasks, "t_mc", metric="acc"), lm_suite(tasks, "t_mc", metric="acc_norm")
    assert acc.fingerprint() != acc_norm.fingerprint()
    assert lm_suite(tasks, "t_mc", num_fewshot=1).data_fingerprint != lm_suite(tasks, "t_mc").data_fingerprint


def test_what_psomerge_cannot_score_faithfully_is_refused_by_name(tasks, generator):
    with pytest.raises(ConfigError, match=r"eval suite 't_mc_one': lm-eval task 't_mc_one': metric 'f1' aggregates "
                                          r"with 'f1', not a mean of per-document values"):
        lm_suite(tasks, "t_mc_one", metric="f1")  # a corpus-level F1
    with pytest.raises(ConfigError, match=r"key 'lm_eval.metric': 'bleu' is not one of the task's metrics "
                                          r"\(acc, acc_norm\)"):
        lm_suite(tasks, "t_mc", metric="bleu")
    with pytest.raises(ConfigError, match=r"key 'lm_eval.filter': 'strict' is not one of the task's filters "
                                          r"\(digits, raw\)"):
        lm_suite(tasks, "t_arith", filter="strict")
    with pytest.raises(ConfigError, match=r"key 'lm_eval.task': no task 't_nothing' in .*tasks \(lm-eval skips"):
        lm_suite(tasks, "t_nothing")
    data = tasks.parent / "arith.jsonl"
    (tasks / "rolling.yaml").write_text(task_yaml("t_rolling", data, """\
        test_split: train
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{question}}"
        """))
    with pytest.raises(ConfigError, match=r"output_type 'loglikelihood_rolling' is not scored by psomerge"):
        lm_suite(tasks, "t_rolling")
    (tasks / "sampled.yaml").write_text(task_yaml("t_sampled", data, """\
        test_split: train
        doc_to_text: "{{question}}"
        doc_to_target: "{{answer}}"
        generation_kwargs: {until: ["="], do_sample: true, temperature: 0.7}
        """))
    with pytest.raises(ConfigError, match=r"ask for sampling .*psomerge decodes greedily"):
        lm_suite(tasks, "t_sampled")
    with pytest.raises(NotImplementedError, match="rolling log-likelihoods"):
        GeneratorLM(generator).loglikelihood_rolling([])
    with pytest.raises(ConfigError, match=r"x.yaml: key 'suites.0': suite 'a' is an lm_eval suite: 'judge' does not "
                                          r"apply"):
        RunConfig.from_dict({"base": "b", "experts": ["e"], "suites": [
            {"name": "a", "lm_eval": {"task": "t"}, "judge": {"type": "exact_match"}}]}, "x.yaml", check_paths=False)
    with pytest.raises(ConfigError, match=r"key 'suites.0': suite 'a' is an lm_eval suite: 'chat.shots' does not"):
        RunConfig.from_dict({"base": "b", "experts": ["e"], "suites": [
            {"name": "a", "lm_eval": {"task": "t"}, "chat": {"shots": 2}}]}, "x.yaml", check_paths=False)
    with pytest.raises(ConfigError, match=r"num_fewshot 2 draws shots from the optimisation split .* which has 2 "
                                          r"documents"):
        lm_suite(tasks, "t_mc_one", optimisation_size=2)


def test_core_runs_without_lm_eval(tmp_path):
    """The core imports without lm-eval; an lm_eval suite then fails when its config loads, naming the key."""
    config = tmp_path / "run.yaml"
    (tmp_path / "b").mkdir()
    (tmp_path / "e").mkdir()
    config.write_text(f"base: {tmp_path / 'b'}\nexperts: [{tmp_path / 'e'}]\n"
                      "suites: [{name: a, lm_eval: {task: t}}]\n")
    script = textwrap.dedent(f"""\
        import sys
        sys.modules["lm_eval"] = None  # as if not installed
        import psomerge.cli, psomerge.pipeline, psomerge.evaluation.suite
        from psomerge.config import RunConfig
        from psomerge.errors import ConfigError
        try:
            RunConfig.load({str(config)!r})
        except ConfigError as exc:
            print(exc)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "run.yaml: key 'suites[0].lm_eval' needs the lm-eval package: pip install 'psomerge[lm-eval]'" in out.stdout


def test_a_swarm_run_over_lm_eval_suites(char_family, tasks, tmp_path, monkeypatch):
    """Particles scored on the optimisation documents only, held-out rows after the search,
    and a second run answered entirely by the fitness cache."""
    root, experts, _ = char_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path / "home"))
    suites = [{"name": "arith", "lm_eval": {"task": "t_arith", "include_path": str(tasks)}, "optimisation_size": 6},
              {"name": "mc", "lm_eval": {"task": "t_mc", "include_path": str(tasks), "metric": "acc"},
               "optimisation_size": 6, "weight": 2}]
    config = RunConfig.from_dict({
        "name": "lm", "preset": "paper", "base": str(root / "base"), "experts": [str(e) for e in experts],
        "suites": suites, "generation": {"max_new_tokens": 4}, "optimizer": {"type": "pso", "steps": 1},
        "baselines": [], "output_dir": str(tmp_path / "run"), "cache_path": str(tmp_path / "fitness.sqlite")})
    assert RunConfig.model_validate_json(config.model_dump_json()) == config  # as Prefect workers receive it
    reads = []
    original = EvalSuite.split
    monkeypatch.setattr(EvalSuite, "split", lambda self, which: reads.append(which) or original(self, which))
    first = run_swarm(config, evaluate_heldout=False)
    assert set(reads) == {"optimisation"} and first.counts.scorings > 0
    second = run_swarm(config)
    assert second.counts.scorings == 0 and "heldout" in reads
    assert [label for label, _ in second.heldout] == ["base", "expert:e0", "expert:e1", "psomerge:paper"]
    assert all(0 <= r.heldout.scores["mc"] <= 1 for r in second.rows)
