"""Each formula pinned on small hand-computed tensors, with edge cases."""

import pytest
import torch

from psomerge.merging.consensus import agreement_mask, elect_sign
from psomerge.merging.methods import METHODS, MergeOptions, ModelParams, get_method
from psomerge.merging.sparsify import dare, della, magnitude_topk
from psomerge.merging.task_vectors import seeded_rng, tensor_seed
from psomerge.errors import ConfigError

T = torch.tensor


def merge(name, base, tensors, params, **opts):
    method = get_method(name)
    options = MergeOptions(**{"normalize": method.default_normalize, **opts})
    gens = [seeded_rng(0, i, "t") for i in range(len(tensors))]
    return method.merge(base, tensors, params, options, gens)


def test_linear_is_normalised_weighted_mean():
    out = merge("linear", None, [T([1.0, 2.0]), T([3.0, 4.0])], [ModelParams(1), ModelParams(3)])
    assert torch.allclose(out, T([2.5, 3.5]))
    raw = merge("linear", None, [T([1.0, 2.0]), T([3.0, 4.0])], [ModelParams(1), ModelParams(3)], normalize=False)
    assert torch.allclose(raw, T([10.0, 14.0]))
    with pytest.raises(ConfigError, match="sum to 0"):
        merge("linear", None, [T([1.0]), T([2.0])], [ModelParams(1), ModelParams(-1)])


def test_task_arithmetic():
    base = T([1.0, 1.0])
    # deltas [1, 2] and [3, -1]; 1 + 2 * (0.5 * [1, 2] + 0.5 * [3, -1]) = [5, 2]
    out = merge("task_arithmetic", base, [T([2.0, 3.0]), T([4.0, 0.0])], [ModelParams(0.5), ModelParams(0.5)], lam=2.0)
    assert torch.allclose(out, T([5.0, 2.0]))


def test_task_arithmetic_all_zero_deltas_returns_base():
    base = T([1.0, -2.0, 3.0])
    for name in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "della"):
        p = ModelParams(1.0, density=0.5, epsilon=0.1)
        out = merge(name, base, [base.clone(), base.clone()], [p, p])
        assert torch.equal(out, base), name


def test_magnitude_topk_keeps_exactly_k_on_ties():
    # up to 16 entries torch's argsort is an insertion sort: ties are kept in index order
    d = T([-1.0, -2.0, 1.0, -2.0])
    assert torch.equal(magnitude_topk(d, 0.5), T([0.0, -2.0, 0.0, -2.0]))
    assert torch.equal(magnitude_topk(T([3.0, -1.0, 0.5, 2.0]), 0.5), T([3.0, 0.0, 0.0, 2.0]))
    assert torch.equal(magnitude_topk(T([1.0, 1.0, 1.0]), 0.34), T([1.0, 0.0, 0.0]))  # k = int(1.02) = 1
    assert torch.equal(magnitude_topk(d, 1.0), d)  # density 1: untouched
    assert torch.equal(magnitude_topk(d, 0.01), T([0.0, -2.0, 0.0, 0.0]))  # at least one kept


def test_sign_election_and_tie_goes_positive():
    weighted = T([[3.0, 0.0, 0.0, 2.0], [0.0, -2.0, 0.0, -2.0]])
    sign = elect_sign(weighted)
    assert torch.equal(sign, T([1.0, -1.0, 1.0, 1.0]))  # entries 2 and 3: equal mass -> +1
    assert torch.equal(agreement_mask(weighted, sign), T([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]))


def test_ties_hand_computed():
    base = torch.zeros(4)
    e1, e2 = T([3.0, -1.0, 0.5, 2.0]), T([-1.0, -2.0, 1.0, -2.0])
    p = ModelParams(1.0, density=0.5)
    # trimmed: [3, 0, 0, 2], [0, -2, 0, -2]; signs [+, -, +, +]; disjoint mean
    assert torch.allclose(merge("ties", base, [e1, e2], [p, p]), T([3.0, -2.0, 0.0, 2.0]))
    # density 1: no trim; signs of sums [2, -3, 1.5, 0] -> [+, -, +, +]
    full = ModelParams(1.0, density=1.0)
    assert torch.allclose(merge("ties", base, [e1, e2], [full, full]), T([3.0, -1.5, 0.75, 2.0]))
    # weights enter the election and the divisor
    w = [ModelParams(1.0, 1.0), ModelParams(3.0, 1.0)]
    # weighted: [3,-1,.5,2], [-3,-6,3,-6]; sums [0,-7,3.5,-4] -> [+,-,+,-]
    # entry0: only e1 agrees -> 3/1; entry1: (-1-6)/4; entry2: (.5+3)/4; entry3: -6/3
    assert torch.allclose(merge("ties", base, [e1, e2], w), T([3.0, -1.75, 0.875, -2.0]))
    # without normalize: plain sum of agreeing weighted deltas
    assert torch.allclose(merge("ties", base, [e1, e2], w, normalize=False), T([3.0, -7.0, 3.5, -6.0]))


def test_int8_mask_changes_memory_not_results():
    torch.manual_seed(0)
    base, experts = torch.randn(64, 32), [torch.randn(64, 32) for _ in range(3)]
    params = [ModelParams(w, density=0.5) for w in (1.0, 0.5, 2.0)]
    for name in ("ties", "dare_ties", "della"):
        method = get_method(name)
        outs = [method.merge(base, experts, params, MergeOptions(normalize=True, int8_mask=flag),
                             [torch.Generator().manual_seed(i) for i in range(3)]) for flag in (False, True)]
        assert torch.equal(outs[0], outs[1]), name
    from psomerge.merging.recipe import MergeRecipe

    recipe = MergeRecipe.from_dict({"merge_method": "ties", "base_model": "b", "parameters": {"int8_mask": True},
                                    "models": [{"model": "x", "parameters": {"weight": 1, "density": 0.5}}]})
    assert recipe.options("any.weight").int8_mask  # read, not ignored


def test_dare_drop_and_inverse_rescale():
    delta = torch.arange(1.0, 1001.0)
    assert torch.equal(dare(delta, 0.0, seeded_rng(0, "x")), delta)  # p = 0: identity
    out = dare(delta, 0.8, seeded_rng(0, "x"))
    kept = out != 0
    assert torch.allclose(out[kept], delta[kept] * 5.0)  # 1 / (1 - 0.8)
    assert 0.15 < kept.float().mean() < 0.25
    again = dare(delta, 0.8, seeded_rng(0, "x"))
    assert torch.equal(out, again)  # seeded: reproducible
    assert not torch.equal(out, dare(delta, 0.8, seeded_rng(0, "y")))
    l1 = dare(delta, 0.8, seeded_rng(0, "x"), rescale="l1")
    assert torch.isclose(l1.abs().sum(), delta.abs().sum())
    with pytest.raises(ValueError):
        dare(delta, 1.0, seeded_rng(0, "x"))


def test_dare_is_unbiased():
    delta = torch.full((200_000,), 0.5)
    assert abs(dare(delta, 0.8, seeded_rng(1, "u")).mean().item() - 0.5) < 0.01


def test_tensor_seed_is_order_independent_and_stable():
    assert tensor_seed(0, "m", "w") == tensor_seed(0, "m", "w")
    assert tensor_seed(0, "m", "w") != tensor_seed(1, "m", "w")
    assert tensor_seed(7, "expert", "layer.0") == 1070500513032822971  # pinned: masks reproducible across releases


def test_dare_methods_merge_rescaled_survivors():
    base = torch.zeros(1000)
    e = torch.ones(1000)
    out = merge("dare_linear", base, [e], [ModelParams(1.0, density=0.2)])
    assert set(out.unique().tolist()) <= {0.0, 5.0}
    out2 = merge("dare_ties", base, [e, e], [ModelParams(1.0, density=1.0)] * 2)
    assert torch.allclose(out2, torch.full((1000,), 2.0))  # p = 0, same sign: plain sum (normalize off)


def test_della_rescales_by_keep_probability_and_favours_large_entries():
    torch.manual_seed(0)
    delta = torch.linspace(0.01, 1.0, 10_000).reshape(10, 1000)
    out = della(delta, density=0.5, epsilon=0.4, generator=seeded_rng(0, "d"))
    kept = out != 0
    ranks = torch.arange(1000).float() / 999
    probs = (0.1 + 0.8 * ranks).expand(10, 1000)
    assert torch.allclose(out[kept], (delta / probs)[kept])
    low, high = kept[:, :200].float().mean(), kept[:, -200:].float().mean()
    assert low < 0.3 and high > 0.7
    assert torch.equal(della(delta, 1.0, 0.1, seeded_rng(0, "d")), delta)
    with pytest.raises(ValueError, match="epsilon"):
        della(delta, 0.5, 0.6, seeded_rng(0, "d"))


def test_registry_is_explicit_and_errors_name_known_methods():
    assert set(METHODS) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear"}
    with pytest.raises(ConfigError, match="slerp.*ties"):
        get_method("slerp")
