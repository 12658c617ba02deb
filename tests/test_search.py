"""The search that wins: smooth fitness, warm starts, baselines at equal budget, racing,
model selection, confidence intervals."""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from psomerge.evaluation import EvalSuite, evaluate
from psomerge.evaluation.statistics import bootstrap, paired_bootstrap
from psomerge.generation.protocol import encode_continuations
from psomerge.generation.transformers_backend import TransformersGenerator
from psomerge.judges import ExactMatch
from psomerge.judges.likelihood import AnswerLikelihood, MultipleChoice
from psomerge.judges.protocol import Example
from psomerge.presets.charlm import char_tokenizer, tiny_llama_config
from psomerge.presets.tiny_tasks import ALPHABET
from psomerge.swarm import PSOMerging, PSOSettings, run_optimizer
from psomerge.swarm.cache import CachedFitness
from psomerge.swarm.racing import RacingSettings, should_stop, sure_upper_bound
from psomerge.swarm.random_search import RandomSearch, RandomSearchSettings
from psomerge.swarm.scale_grid import ScaleGrid, ScaleGridSettings
from psomerge.swarm.selection import choose, distinct_best
from psomerge.swarm.warm_start import WarmStartSettings, linear_starts


@pytest.fixture(scope="module")
def lm():
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden=32, layers=2, heads=2)).eval()
    return model, tok


def hand_logprob(model, tok, context, continuation, eos=False):
    """log p(continuation | context), one token at a time, each from its own forward pass."""
    ids = tok(context, add_special_tokens=True)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    total, greedy = 0.0, 0
    with torch.no_grad():
        for t in cont:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            logp = torch.log_softmax(logits.double(), -1)
            total += float(logp[t])
            greedy += int(logits.argmax()) == t
            ids = ids + [t]
    return total, len(cont), greedy


def test_answer_likelihood_equals_a_hand_computation(lm):
    model, tok = lm
    gen = TransformersGenerator(model, tok, batch_size=2)  # batches of two: padding is exercised
    examples = [Example(str(i), q, a) for i, (q, a) in enumerate([("add 1+2=", "3"), ("rev abcde=", "edcba"),
                                                                  ("sort 931=", "139")])]
    for measure in ("mean_probability", "token_accuracy", "probability"):
        scores = AnswerLikelihood(measure=measure, append_eos=True).score_model(gen, examples)
        for ex, s in zip(examples, scores):
            lp, n, greedy = hand_logprob(model, tok, ex.prompt, ex.answer, eos=True)
            expected = {"mean_probability": math.exp(lp / n), "token_accuracy": greedy / n,
                        "probability": math.exp(lp)}[measure]
            assert s.value == pytest.approx(expected, rel=1e-4), (measure, ex)
    # a context's trailing space moves to the continuation, as a tokenizer would see it
    [(ctx, cont)] = encode_continuations(tok, [("Answer: ", "ab")])
    assert tok.decode(cont) == " ab" and not tok.decode(ctx).endswith(" ")


def test_multiple_choice_picks_the_most_likely_choice(lm):
    model, tok = lm
    gen = TransformersGenerator(model, tok, batch_size=4)
    ex = Example("0", "rev ab=", "1", {"choices": ["ab", "ba", "aa"]})
    lls = [hand_logprob(model, tok, ex.prompt, c)[0] for c in ex.fields["choices"]]
    [acc] = MultipleChoice().score_model(gen, [ex])
    assert acc.value == float(int(np.argmax(lls)) == 1) and acc.meta["chosen"] == int(np.argmax(lls))
    [prob] = MultipleChoice(measure="probability").score_model(gen, [ex])
    assert prob.value == pytest.approx(math.exp(lls[1]) / sum(math.exp(v) for v in lls), rel=1e-4)
    # the answer may also be the text of the correct choice
    [by_text] = MultipleChoice(measure="probability").score_model(gen, [Example("0", "rev ab=", "ba", ex.fields)])
    assert by_text.value == pytest.approx(prob.value)


def test_fitness_mixes_the_judge_with_a_smooth_term(lm):
    model, tok = lm
    gen = TransformersGenerator(model, tok, batch_size=8, max_new_tokens=4)
    recs = [{"q": f"add {i}+{i}=", "a": str(2 * i)} for i in range(10)]
    judge = ExactMatch(normalizer="none")
    smooth = AnswerLikelihood()
    mixed = EvalSuite.from_records("s", recs, prompt_template="{q}", answer_field="a", scorer=judge,
                                   optimisation_size=6, fitness=[(judge, 1.0), (smooth, 3.0)])
    plain = EvalSuite.from_records("s", recs, prompt_template="{q}", answer_field="a", scorer=judge,
                                   optimisation_size=6)
    j = evaluate(gen, [plain], "optimisation").scored["s"]
    f = evaluate(gen, [mixed], "optimisation", "fitness").scored["s"]
    lik = [x.value for x in smooth.score_model(gen, mixed.split("optimisation"))]
    assert f == pytest.approx([(a + 3 * b) / 4 for a, b in zip(j, lik)])
    assert evaluate(gen, [mixed], "optimisation").scored["s"] == j  # reports stay on the judge
    assert mixed.fingerprint("fitness") != mixed.fingerprint() == plain.fingerprint()


def test_warm_starts_are_the_linear_merges():
    starts = linear_starts(WarmStartSettings(task_arithmetic=[0.7, 1.0]), k=7, groups=2, n_experts=3)
    average, ta07, ta1 = starts
    assert np.allclose(average[0], [0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0])  # the plain mean of the experts
    assert np.allclose(ta07[0], [1 - 2.1, 0.7, 0.7, 0.7, 0, 0, 0]) and np.allclose(ta07.sum(axis=1), 1.0)
    assert np.allclose(ta1[1], [-2, 1, 1, 1, 0, 0, 0])
    # duplicates collapse: task arithmetic at 1/N is the average
    assert len(linear_starts(WarmStartSettings(task_arithmetic=[1 / 3]), 7, 1, 3)) == 1
    # PSO with warm starts: the paper's one-hot particles, then the starts
    opt = PSOMerging(7, 2, PSOSettings(), starts)
    first = opt.ask()
    assert len(first) == 7 + 3 and all(np.array_equal(a, b) for a, b in zip(first[7:], starts))


def sphere(target):
    return lambda x: CachedFitness(-float(((x - target) ** 2).sum()), {}, {})


def test_random_search_and_scale_grid_spend_their_budget():
    target = np.array([[0.1, 0.3, 0.3, 0.3]])
    seen = []
    result = run_optimizer(RandomSearch(4, 1, RandomSearchSettings(budget=23)),
                           lambda x: seen.append(x) or sphere(target)(x))
    assert result.evaluations == len(seen) == 23 and all(np.all(x >= 0) and np.allclose(x.sum(), 1) for x in seen)
    grid = ScaleGrid(4, 1, ScaleGridSettings(budget=15, low=0.1, high=1.5), n_experts=3)
    seen.clear()
    result = run_optimizer(grid, lambda x: seen.append(x) or sphere(target)(x))
    assert result.evaluations == 15
    assert all(np.allclose(x[0, 1:], x[0, 1]) for x in seen)  # equal expert weights: one scale each
    assert result.best_position[0, 1] == pytest.approx(0.3, abs=0.05)


def test_swarms_stop_before_a_step_that_would_exceed_their_budget():
    from psomerge.swarm.model_swarms import ModelSwarms, ModelSwarmsSettings
    from psomerge.swarm.pso import PSOMerging, PSOSettings

    target = np.array([[0.1, 0.3, 0.3, 0.3]])
    for optimizer in (PSOMerging(4, 1, PSOSettings(steps=100, budget=14)),
                      ModelSwarms(4, 1, ModelSwarmsSettings(steps=100, budget=14, early_stop=100))):
        result = run_optimizer(optimizer, sphere(target))
        assert result.evaluations == 12  # three whole swarms of 4; a fourth would spend 16
    # steps still bound a run with budget to spare
    assert run_optimizer(PSOMerging(4, 1, PSOSettings(steps=1, budget=100)), sphere(target)).evaluations == 8


def test_sure_racing_never_stops_a_particle_that_would_be_a_new_best():
    rng = np.random.default_rng(0)
    sizes, weights = {"a": 40, "b": 24}, {"a": 1.0, "b": 2.0}
    sure_only = RacingSettings(confidence=None, chunk=4)
    for _ in range(2000):
        values = {s: (rng.random(n) < rng.random()).astype(float).tolist() for s, n in sizes.items()}
        full = sum(weights[s] * np.mean(values[s]) for s in sizes) / 3.0
        target = full - rng.random() * 0.1 - 1e-9  # the full split would make it a new best
        for seen_n in range(0, 41, 4):
            seen = {s: values[s][: min(seen_n, sizes[s])] for s in sizes}
            assert not should_stop(seen, sizes, weights, target, None, sure_only)
            assert sure_upper_bound(seen, sizes, weights) >= full - 1e-12
    # and it does stop one that cannot catch up: all failures so far, target near the top
    seen = {"a": [0.0] * 20, "b": [0.0] * 12}
    assert should_stop(seen, sizes, weights, 0.55, None, sure_only)


def test_statistical_racing_false_stops_within_its_confidence():
    rng = np.random.default_rng(1)
    sizes, weights = {"a": 60}, {"a": 1.0}
    settings = RacingSettings(confidence=0.95, chunk=8, min_examples=16)
    false_stops, trials = 0, 400
    for _ in range(trials):
        base = (rng.random(60) < 0.5).astype(float)
        better = np.where(rng.random(60) < 0.15, 1.0, base)  # a truly better particle, paired with the target
        target_values = {"a": base.tolist()}
        for n in range(16, 60, 8):
            if should_stop({"a": better[:n].tolist()}, sizes, weights, base.mean(), target_values, settings):
                false_stops += better.mean() > base.mean()
                break
    assert false_stops / trials <= 0.05
    # a clearly worse particle is stopped early, saving most of its examples
    worse = [0.0] * 16
    assert should_stop({"a": worse}, sizes, weights, 0.5, {"a": [1.0, 0.0] * 8 + [1.0, 0.0] * 22}, settings)


def test_model_selection_prefers_validation_then_search_fitness():
    positions = [np.eye(3)[[i]] for i in range(3)] + [np.eye(3)[[0]] + 1e-9]
    evaluated = list(zip(positions, [0.5, 0.9, 0.7, 0.5]))
    assert distinct_best(evaluated, 3) == [1, 2, 0]  # the near-duplicate of particle 0 is not a candidate
    assert choose([0.9, 0.7], [0.60, 0.65]) == 1
    assert choose([0.9, 0.7], [0.65, 0.65]) == 0


def test_selection_candidates_are_the_best_their_soup_and_the_best_start():
    from psomerge.swarm.selection import SelectionSettings, selection_candidates

    x = [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), np.array([[0.5, 0.5]]), np.array([[0.2, 0.8]])]
    evaluated = [(x[0], 0.9), (x[1], 0.7), (x[2], 0.6), (x[3], 0.5)]
    picked = selection_candidates(evaluated, [x[3]], SelectionSettings(candidates=2))
    assert [(p[1], p[2]) for p in picked] == [(0.9, "search"), (0.7, "search"), (0.7, "soup"), (0.5, "warm start")]
    assert np.allclose(picked[2][0], [[0.5, 0.5]])  # the mean of the two best: exact in coefficient space
    picked = selection_candidates(evaluated, [x[0]], SelectionSettings(candidates=2, soup=False))
    assert [p[2] for p in picked] == ["search", "search"]  # the best start is already a candidate


def test_bootstrap_against_a_hand_computed_distribution():
    # two examples, 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4
    ci = bootstrap({"s": [0.0, 1.0]}, {"s": 1.0}, level=0.4, resamples=40000, seed=3)
    assert (ci.mean, ci.low, ci.high) == (0.5, 0.5, 0.5)  # the 30% and 70% quantiles fall in the 0.5 mass
    ci = bootstrap({"s": [0.0, 1.0]}, {"s": 1.0}, level=0.95, resamples=40000, seed=3)
    assert (ci.low, ci.high) == (0.0, 1.0)
    # weighted, stratified: suite b counts three times as much as suite a
    ci = bootstrap({"a": [1.0] * 5, "b": [0.0] * 7}, {"a": 1.0, "b": 3.0})
    assert (ci.mean, ci.low, ci.high) == (0.25, 0.25, 0.25)
    # 0/1 data: the interval matches the normal approximation
    rng = np.random.default_rng(2)
    x = (rng.random(600) < 0.3).astype(float)
    ci = bootstrap({"s": x}, {"s": 1.0}, resamples=8000)
    half = 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert ci.low == pytest.approx(x.mean() - half, abs=0.006) and ci.high == pytest.approx(x.mean() + half, abs=0.006)
    # paired: identical rows differ by exactly 0; a row better on every example is better in every resample
    same = paired_bootstrap({"s": x}, {"s": x}, {"s": 1.0})
    assert (same.difference.low, same.difference.high, same.p_not_better) == (0.0, 0.0, 1.0)
    up = paired_bootstrap({"s": np.minimum(x + 1, 1)}, {"s": x}, {"s": 1.0})
    assert up.p_not_better == 0.0 and up.difference.mean == pytest.approx(1 - x.mean())


def test_rank_correlation_against_a_hand_computation():
    from psomerge.evaluation.statistics import rank_correlation

    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = 1, 2, 3, 4; b = 1.5, 1.5, 4, 3 (a tie): centred a = -1.5, -.5, .5, 1.5, b = -1, -1, 1.5, .5;
    # sum ab = 1.5 + .5 + .75 + .75 = 3.5; |a|^2 = 5, |b|^2 = 4.5: rho = 3.5 / sqrt(22.5)
    assert rank_correlation([0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.7]) == pytest.approx(3.5 / math.sqrt(22.5))
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        rank_correlation([1, 2], [1])


def test_warm_start_particles_materialise_to_the_static_merges(tmp_path, family):
    from safetensors.torch import load_file

    from psomerge.merging.baselines import baseline_checkpoint
    from psomerge.swarm import BasisSettings, build_basis, member_coefficients

    base, experts = family
    merges = {name: baseline_checkpoint(name, base, experts, 0, tmp_path / "merges")
              for name in ("average", "task_arithmetic", "ties", "della")}
    basis = build_basis(base, experts, tmp_path / "basis", BasisSettings(granularity="layer"),
                        [("merge:ties", merges["ties"]), ("merge:della", merges["della"])])
    assert basis.labels[-2:] == ["merge:ties", "merge:della"] and basis.k == 2 * 3 + 1 + 2
    average, ta = linear_starts(WarmStartSettings(task_arithmetic=[0.7]), basis.k, basis.num_groups, 3)
    targets = {"average": average, "task_arithmetic": ta,
               "ties": member_coefficients(basis.k, basis.num_groups, basis.k - 2),
               "della": member_coefficients(basis.k, basis.num_groups, basis.k - 1)}
    for name, coeffs in targets.items():
        written = load_file(basis.write_particle(coeffs, tmp_path / f"p-{name}") / "model.safetensors")
        merged = load_file(merges[name] / "model.safetensors")
        for tensor, value in merged.items():
            assert torch.allclose(written[tensor], value, atol=1e-6), (name, tensor)


def test_psomerge_preset_defaults_to_cmaes_from_every_warm_start(char_family):
    from psomerge.config import RunConfig
    from psomerge.errors import ConfigError
    from psomerge.swarm import make_optimizer

    root, experts, data = char_family
    base = {"base": str(root / "base"), "experts": [str(e) for e in experts],
            "suites": [{"name": "addition", "dataset": str(data["addition"]), "optimisation_size": 8}]}
    cfg = RunConfig.from_dict(base)
    assert cfg.optimizer.type == "cmaes" and cfg.racing is not None and cfg.warm_start is not None
    assert RunConfig.from_dict({**base, "optimizer": {"budget": 30}}).optimizer.type == "cmaes"
    assert RunConfig.from_dict({**base, "preset": "paper"}).optimizer.type == "pso"
    pso = RunConfig.from_dict({**base, "optimizer": {"type": "pso"}})
    assert pso.racing is not None  # PSO races particles against their personal bests
    grid = {**base, "optimizer": {"type": "ta_grid"}}
    assert RunConfig.from_dict(grid).racing is None  # the grid uses every point's full fitness
    with pytest.raises(ConfigError, match="racing does not apply to optimizer 'ta_grid'"):
        RunConfig.from_dict({**grid, "racing": {}})
    # CMA-ES starts at the linear merges and, one-hot, at each expert and each static merge
    # joined to the basis; a swarm, which has a particle at every member, takes only the linear ones
    from psomerge.swarm.warm_start import warm_starts

    k, n = 7, 2  # base, 2 experts, 2 DARE members, 2 static merges
    starts = warm_starts(cfg.warm_start, k, 1, n)
    first = make_optimizer(cfg.optimizer, k, 1, n_experts=n, starts=starts).ask()
    linear = len(cfg.warm_start.task_arithmetic) + 1  # and the average
    assert len(first) == linear + 4 and [int(np.argmax(x)) for x in first[linear:]] == [1, 2, 5, 6]
    assert all(np.allclose(x.sum(axis=1), 1) for x in first)
    swarm = make_optimizer(pso.optimizer, k, 1, n_experts=n, starts=starts).ask()
    assert len(swarm) == k + linear
    without = warm_starts(cfg.warm_start.model_copy(update={"experts": False}), k, 1, n)
    assert [int(np.argmax(x)) for x in without[linear:]] == [5, 6]


def char_run(char_family, tmp_path, *, name: str, sizes: tuple[int, int, int], fitness: list, **settings) -> dict:
    """A run config over the character-level test family: one exact-match suite per task with
    (optimisation, validation, held-out) ``sizes`` and ``fitness`` terms, plus ``settings``."""
    root, experts, data = char_family
    opt, val, held = sizes
    return {"name": name, "base": str(root / "base"), "experts": [str(e) for e in experts],
            "suites": [{"name": n, "dataset": str(p), "optimisation_size": opt, "validation_size": val,
                        "heldout_size": held, "judge": {"type": "exact_match", "normalizer": "none"},
                        "fitness": fitness} for n, p in data.items()],
            "generation": {"max_new_tokens": 6, "batch_size": 64}, "output_dir": str(tmp_path / "run"), **settings}


def test_psomerge_preset_warm_starts_races_and_selects_on_validation(char_family, tmp_path, monkeypatch):
    from psomerge.config import RunConfig
    from psomerge.pipeline import run_swarm

    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    likelihood = {"scorer": {"type": "answer_likelihood", "append_eos": True}, "weight": 1.0}
    cfg = RunConfig.from_dict(char_run(
        char_family, tmp_path, name="default", sizes=(12, 8, 16),
        fitness=[{"scorer": "judge", "weight": 1.0}, likelihood],
        optimizer={"type": "pso", "steps": 2}, warm_start={"members": ["ties"], "task_arithmetic": [0.8]},
        racing={"chunk": 4, "min_examples": 4}, baselines=["ties"]))
    run = run_swarm(cfg)
    assert run.basis.labels[-1] == "merge:ties" and run.basis.k == 2 * 2 + 1 + 1
    # the paper's one-hot particles, plus the average and task arithmetic at 0.8: 8 a step
    assert run.counts.fitness_calls == 8 * 3
    assert run.candidates and any(np.array_equal(run.best_position, c.position) for c in run.candidates)
    searched = [c for c in run.candidates if c.origin == "search"]
    assert any(c.origin == "warm start" for c in run.candidates) or len(searched) == 4
    soup = [c for c in run.candidates if c.origin == "soup"]  # the searched candidates' mean competes too
    assert len(soup) == 1 and np.allclose(soup[0].position, np.mean([c.position for c in searched], axis=0))
    chosen = max(run.candidates, key=lambda c: (c.validation_fitness, c.search_fitness))
    assert np.array_equal(run.best_position, chosen.position)
    assert run.counts.selection_examples == len(run.candidates) * 16  # 8 validation examples x 2 suites
    assert [r.label for r in run.rows] == ["base", "expert:e0", "expert:e1", "ties", "psomerge:pso"]
    assert all(r.validation is not None for r in run.rows)
    # racing: examples scored are fewer than full evaluations would have been (12 x 2 per scoring)
    assert run.counts.examples_scored <= run.counts.scorings * 24


def test_cmaes_races_proposals_against_the_best_so_far_after_the_warm_starts():
    from psomerge.swarm.cmaes import CMAES, CMAESSettings

    starts = [np.array([[0.5, 0.5, 0.0]]), np.array([[0.0, 1.0, 0.0]])]
    es = CMAES(3, 1, CMAESSettings(budget=20, popsize=4), starts=starts)
    first = es.ask()
    assert es.targets() == [None, None]  # the warm starts are scored in full: the best seeds the search
    es.tell(first, [0.4, 0.7])
    proposals = es.ask()
    targets = es.targets()
    assert len(targets) == len(proposals) == 4
    assert all(t[0] == 0.7 and np.array_equal(t[1], starts[1]) for t in targets)
    # without warm starts, the first population has nothing to beat yet
    cold = CMAES(3, 1, CMAESSettings(budget=20, popsize=4))
    cold.ask()
    assert cold.targets() == [None] * 4


def test_cmaes_spends_its_whole_budget():
    from psomerge.swarm.cmaes import CMAES, CMAESSettings

    # 2 warm starts + 3 whole generations of 4 + a last one cut to the 2 evaluations left
    es = CMAES(3, 1, CMAESSettings(budget=16, popsize=4), starts=[np.eye(3)[[0]], np.eye(3)[[1]]])
    sizes = []
    result = run_optimizer(es, lambda x: sizes.append(1) or CachedFitness(-float(((x - 0.3) ** 2).sum()), {}, {}))
    assert result.evaluations == len(sizes) == 16
    assert [h["evaluations"] for h in es.history] == [2, 6, 10, 14, 16]


def test_default_search_races_cmaes_proposals_and_keeps_the_best_complete(char_family, tmp_path, monkeypatch):
    from psomerge.config import RunConfig
    from psomerge.pipeline import run_swarm

    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    cfg = RunConfig.from_dict(char_run(
        char_family, tmp_path, name="cmaes-racing", sizes=(24, 8, 8),
        fitness=[{"scorer": {"type": "answer_likelihood", "append_eos": True}, "weight": 1.0}],
        optimizer={"budget": 30, "sigma0": 1.0}, warm_start={"members": [], "task_arithmetic": [1.0]},
        racing={"chunk": 4, "min_examples": 4, "confidence": 0.8}, baselines=[]))
    assert cfg.optimizer.type == "cmaes"
    run = run_swarm(cfg)
    full = 24 * 2  # examples of one complete scoring
    assert run.counts.examples_scored < run.counts.scorings * full  # proposals were stopped early
    # the same run again scores nothing: a raced particle asked again stops where its kept
    # partial result stopped, a cache hit like a complete one
    again = run_swarm(cfg.model_copy(update={"output_dir": tmp_path / "again"}))
    assert again.counts.scorings == 0 and again.counts.examples_scored == 0
    assert again.counts.cache_hits == again.counts.fitness_calls == run.counts.fitness_calls
    assert np.array_equal(again.best_position, run.best_position)
    # model selection's candidates carry complete search fitnesses, never a raced estimate
    from psomerge.pipeline import RunContext

    context = RunContext(cfg)
    try:
        for c in run.candidates:
            if c.origin != "soup":
                complete = context.score(c.position)  # no target: the whole split (from the cache)
                assert not complete.raced and c.search_fitness == pytest.approx(complete.fitness)
    finally:
        context.close()
