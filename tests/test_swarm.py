"""Optimisers over coefficients: analytic optima, exactness of coefficient space, cache, resume."""

import json
import multiprocessing as mp
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from psomerge.swarm import (
    CMAES, CMAESSettings, FitnessCache, ModelSwarms, ModelSwarmsSettings, PSOSettings, PSOMerging, BasisSettings,
    build_basis, particle_key, run_optimizer,
)
from psomerge.swarm.basis import tensor_groups
from psomerge.swarm.cache import CachedFitness
from psomerge.swarm.pso import project_bounds

K = 7
TARGET = np.array([[0.1, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1]])


def sphere(x):
    return CachedFitness(-float(((x - TARGET) ** 2).sum()), {}, {})


def start_best():
    return max(sphere(np.eye(K)[i][None]).fitness for i in range(K))


@pytest.mark.parametrize("make", [
    lambda: PSOMerging(K, 1, PSOSettings(steps=10)),
    lambda: ModelSwarms(K, 1, ModelSwarmsSettings(steps=10)),
    lambda: CMAES(K, 1, CMAESSettings(budget=77, popsize=7)),
])
def test_each_optimiser_improves_and_keeps_positions_affine(make):
    opt = make()
    seen = []
    result = run_optimizer(opt, lambda x: seen.append(x) or sphere(x))
    assert result.best_fitness > start_best() + 0.05
    assert all(np.allclose(x.sum(axis=1), 1.0) for x in seen)
    assert result.evaluations == len(seen) <= 77


def test_pso_reaches_the_optimum():
    cfg = PSOSettings(steps=100, inertia=0.7, cognitive=1.5, social=1.5, extra_particles=14)
    result = run_optimizer(PSOMerging(K, 1, cfg), sphere)
    assert np.abs(result.best_position - TARGET).max() < 1e-2


def test_pso_paper_defaults_and_particle_count():
    opt = PSOMerging(K, 1, PSOSettings(steps=5))
    assert (opt.settings.inertia, opt.settings.cognitive, opt.settings.social) == (0.2, 2.0, 2.0)
    first = opt.ask()
    assert len(first) == K and all(np.array_equal(x, np.eye(K)[i][None]) for i, x in enumerate(first))
    assert np.all(opt.v == 0)


def test_velocity_clamp_and_bounds_keep_affine():
    x = np.array([[1.5, -0.8, 0.3]])
    y = project_bounds(x, -0.2, 1.0)
    assert np.isclose(y.sum(), 1.0) and y.min() >= -0.2 - 1e-9 and y.max() <= 1.0 + 1e-9
    opt = PSOMerging(K, 2, PSOSettings(steps=3, velocity_clamp=0.1, bounds=(-0.5, 1.5)))
    result = run_optimizer(opt, lambda x: CachedFitness(-float(((x - TARGET) ** 2).sum()), {}, {}))
    assert np.abs(opt.v).max() <= 0.1 + 1e-9
    assert np.allclose(result.best_position.sum(axis=1), 1.0)


def test_tensor_groups():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.0.attn.w",
             "model.layers.1.mlp.w", "model.norm.weight", "lm_head.weight"]
    labels, idx = tensor_groups(names, "layer")
    assert labels == ["embed", "layer0", "layer1", "head"]
    assert [idx[n] for n in names] == [0, 1, 1, 2, 3, 3]
    assert tensor_groups(names, "model")[0] == ["all"]
    assert len(tensor_groups(names, "tensor")[0]) == 6


# -- exactness: coefficient space == dense PSO over flattened weights --------------------


def _flat(model):
    return torch.cat([p.detach().reshape(-1).double() for _, p in model.named_parameters()])


def test_coefficient_pso_equals_dense_pso_on_weights(tmp_path, family):
    base, experts = family
    basis = build_basis(base, experts, tmp_path / "basis", BasisSettings(drop_rate=0.8, seed=1))
    assert basis.k == 7 and basis.labels[0] == "base"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    dense_basis = []
    for j in range(basis.k):
        basis.materialise(np.eye(basis.k)[j][None], model)
        dense_basis.append(_flat(model))
    B = torch.stack(dense_basis)  # K x D
    target = torch.tensor([0.2, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64) @ B

    def weights_fitness(theta):
        return -float(((theta - target) ** 2).sum())

    def coeff_fitness(x):
        basis.materialise(x, model)
        return CachedFitness(weights_fitness(_flat(model)), {}, {})

    cfg = PSOSettings(steps=4, seed=3)
    opt = PSOMerging(basis.k, 1, cfg)
    run_optimizer(opt, coeff_fitness)

    # dense PSO: same update, same scalar draws (same seeded generator, same order)
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    X = B.clone()
    V = torch.zeros_like(X)
    fit = torch.tensor([weights_fitness(x) for x in X])
    P, pf = X.clone(), fit.clone()
    g = X[int(torch.argmax(fit))].clone()
    gf = float(fit.max())
    for _ in range(cfg.steps):
        r1 = torch.from_numpy(rng.random((len(X), 1, 1))).reshape(-1, 1)
        r2 = torch.from_numpy(rng.random((len(X), 1, 1))).reshape(-1, 1)
        V = cfg.inertia * V + cfg.cognitive * r1 * (P - X) + cfg.social * r2 * (g - X)
        X = X + V
        fit = torch.tensor([weights_fitness(x) for x in X])
        better = fit > pf
        P[better], pf[better] = X[better], fit[better]
        if float(fit.max()) > gf:
            gf, g = float(fit.max()), X[int(torch.argmax(fit))].clone()

    coeff_positions = torch.from_numpy(opt.x[:, 0, :]) @ B
    scale = B.abs().max()
    assert float((coeff_positions - X).abs().max() / scale) < 1e-5
    assert float((torch.from_numpy(opt.best_position[0]) @ B - g).abs().max() / scale) < 1e-5


def test_materialise_matches_weighted_sum_and_dare_members(tmp_path, family):
    base, experts = family
    basis = build_basis(base, experts, tmp_path / "b", BasisSettings(drop_rate=0.8, seed=0, storage="mmap"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    alpha = np.array([[0.4, 0.2, 0.2, 0.1, 0.05, 0.05, 0.0]])
    basis.materialise(alpha, model)
    name = "model.layers.0.mlp.up_proj.weight"
    expected = sum(a * m.get(name).double() for a, m in zip(alpha[0], basis.members))
    got = dict(model.named_parameters())[name].double()
    assert torch.allclose(got, expected, atol=1e-6)
    # DARE members: base + delta kept with p = 0.2, scaled by 5
    delta = basis.members[4].get(name) - basis.members[0].get(name)
    expert_delta = basis.members[1].get(name) - basis.members[0].get(name)
    kept = delta != 0
    assert 0.1 < kept.float().mean() < 0.3
    assert torch.allclose(delta[kept], 5 * expert_delta[kept], atol=1e-5)
    again = build_basis(base, experts, tmp_path / "b", BasisSettings(drop_rate=0.8, seed=0, storage="mmap"))
    assert again.fingerprint == basis.fingerprint  # reused, not rebuilt
    reseeded = build_basis(base, experts, tmp_path / "b", BasisSettings(drop_rate=0.8, seed=1))
    assert reseeded.fingerprint != basis.fingerprint


# -- fitness cache --------------------------------------------------------------------


def test_particle_key_rounds_and_separates():
    x = np.array([[0.5, 0.5]])
    assert particle_key("b", x, "e") == particle_key("b", x + 1e-9, "e")
    assert particle_key("b", x, "e") != particle_key("b", x + 1e-4, "e")
    assert particle_key("b", x, "e") != particle_key("b2", x, "e")
    assert particle_key("b", x, "e") != particle_key("b", x, "e2")
    assert particle_key("b", np.array([[-0.0, 1.0]]), "e") == particle_key("b", np.array([[0.0, 1.0]]), "e")


class CountingFitness:
    def __init__(self, cache):
        self.cache, self.scorings = cache, 0

    def __call__(self, x):
        key = particle_key("basis", x, "eval")
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        self.scorings += 1
        value = sphere(x)
        self.cache.put(key, value)
        return value


def test_identical_particles_are_never_scored_twice(tmp_path):
    cache = FitnessCache(tmp_path / "f.sqlite")
    first = CountingFitness(cache)
    r1 = run_optimizer(PSOMerging(K, 1, PSOSettings(steps=3)), first)
    # a particle sitting at the global best with zero velocity stays put: a hit within the run
    assert first.scorings == len(cache) and first.scorings + cache.hits == r1.evaluations
    assert cache.hits > 0
    again = CountingFitness(FitnessCache(tmp_path / "f.sqlite"))  # a later run, same file
    r2 = run_optimizer(PSOMerging(K, 1, PSOSettings(steps=3)), again)
    assert again.scorings == 0 and again.cache.hits == r2.evaluations
    assert r2.best_fitness == r1.best_fitness


def _writer(path, start, n):
    cache = FitnessCache(path)
    for i in range(start, start + n):
        cache.put(f"k{i % 50}", CachedFitness(float(i % 50), {"t": 1.0}, {}))


def test_cache_is_safe_under_concurrent_writers(tmp_path):
    path = tmp_path / "c.sqlite"
    FitnessCache(path)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, i * 30, 60)) for i in range(3)]
    threads = [threading.Thread(target=_writer, args=(path, 100 + i * 7, 40)) for i in range(3)]
    for w in procs + threads:
        w.start()
    for w in procs + threads:
        w.join()
    assert all(p.exitcode == 0 for p in procs)
    cache = FitnessCache(path)
    assert len(cache) == 50
    assert cache.get("k7").fitness == 7.0


# -- checkpoint and exact resume --------------------------------------------------------


class Killed(Exception):
    pass


@pytest.mark.parametrize("make, max_bytes", [
    (lambda: PSOMerging(K, 2, PSOSettings(steps=6, seed=4)), 12_000),
    (lambda: ModelSwarms(K, 2, ModelSwarmsSettings(steps=6, seed=4, early_stop=99)), 12_000),
    (lambda: CMAES(K, 2, CMAESSettings(budget=49, popsize=7, seed=4)), 64_000),  # pickled covariance state
])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, make, max_bytes):
    full = CountingFitness(FitnessCache(tmp_path / "full.sqlite"))
    reference = run_optimizer(make(), full, checkpoint=tmp_path / "full.json")

    cache = FitnessCache(tmp_path / "part.sqlite")
    partial = CountingFitness(cache)
    calls = {"n": 0}

    def dies_mid_step(x):
        calls["n"] += 1
        if calls["n"] == 17:  # in the middle of the third step
            raise Killed
        return partial(x)

    ckpt = tmp_path / "part.json"
    with pytest.raises(Killed):
        run_optimizer(make(), dies_mid_step, checkpoint=ckpt)
    state = json.loads(ckpt.read_text())
    assert state["optimizer_state"]["step"] == 2 and ckpt.stat().st_size < max_bytes
    resumed = run_optimizer(make(), partial, checkpoint=ckpt, resume=True)

    assert np.array_equal(resumed.best_position, reference.best_position)
    assert resumed.best_fitness == reference.best_fitness
    assert partial.scorings == full.scorings  # nothing scored twice, nothing lost
    assert resumed.evaluations == reference.evaluations


def test_storage_layouts_agree(tmp_path, family):
    base, experts = family
    spec = BasisSettings(drop_rate=0.8, seed=2, granularity="layer")
    ram = build_basis(base, experts, tmp_path / "b", spec.model_copy(update={"storage": "compact"}))
    mapped = build_basis(base, experts, tmp_path / "b", spec.model_copy(update={"storage": "mmap"}))
    dense = build_basis(base, experts, tmp_path / "b", spec.model_copy(update={"storage": "ram_dense"}))
    dense_bytes = sum(ram.members[0].info(n).numel * 4 for n in ram.names) * ram.k
    assert dense.nbytes() == dense_bytes
    assert ram.nbytes() < 0.8 * dense_bytes  # DARE members held sparse
    rng = np.random.default_rng(0)
    alpha = rng.normal(0.0, 0.5, size=(ram.num_groups, ram.k))
    alpha += (1.0 - alpha.sum(axis=1, keepdims=True)) / ram.k  # affine, negative entries included
    a = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    c = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ram.materialise(alpha, a)
    mapped.materialise(alpha, b)
    dense.materialise(alpha, c)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.allclose(p, q, atol=1e-6) and torch.allclose(q, r, atol=1e-6), name
    for j in range(ram.k):  # one-hot: each basis member itself
        ram.materialise(np.eye(ram.k)[j][None].repeat(ram.num_groups, 0), a)
        name = "model.layers.1.self_attn.v_proj.weight"
        assert torch.allclose(dict(a.named_parameters())[name], ram.members[j].get(name), atol=1e-7)
