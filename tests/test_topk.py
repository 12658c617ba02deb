"""The top-k selection replays torch's CPU argsort exactly, ties included."""

import random

import pytest
import torch

from mergekit_runner import have_mergekit
from psomerge.merging.sparsify import della_keep_prob, magnitude_topk
from psomerge.merging.topk import argsort_topk_mask


def argsort_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.argsort(values.reshape(-1), descending=True)[:k]] = True
    return mask.reshape(values.shape)


@pytest.mark.parametrize("n", [1, 2, 16, 17, 18, 33, 100, 257, 4096, 65_537, 1_000_003])
@pytest.mark.parametrize("distinct", [1, 2, 5, 1000])
def test_equals_argsort_on_tie_heavy_values(n, distinct):
    gen = torch.Generator().manual_seed(n * 7 + distinct)
    values = torch.randint(0, distinct, (n,), generator=gen).float() / 64
    rng = random.Random(n + distinct)
    for k in {1, n // 3, n // 2, n - 1, rng.randint(1, n)} - {0}:
        got = argsort_topk_mask(values, k)
        assert torch.equal(got, argsort_mask(values, k)), (n, distinct, k)
        assert int(got.sum()) == k


def test_equals_argsort_on_bf16_rounded_deltas():
    """The case TIES meets in bf16 checkpoints: deltas of bf16 weights, computed in fp32."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(300, 257, generator=gen).to(torch.bfloat16)
    expert = (base.float() + 0.01 * torch.randn(300, 257, generator=gen)).to(torch.bfloat16)
    mag = (expert.float() - base.float()).abs()
    for density in (0.1, 0.3, 0.5, 0.7, 0.9):
        k = max(1, int(density * mag.numel()))
        assert torch.equal(argsort_topk_mask(mag, k), argsort_mask(mag, k)), density


def test_nan_and_inf_sort_as_torch_does():
    values = torch.tensor([1.0, float("nan"), float("inf"), 1.0, 0.0] * 9)
    for k in range(1, values.numel()):
        assert torch.equal(argsort_topk_mask(values, k), argsort_mask(values, k)), k


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_depth_limit_falls_back_to_the_sort_itself(depth):
    """Where std::sort would switch to heapsort, the full argsort decides (still exact)."""
    values = torch.randint(0, 3, (5000,), generator=torch.Generator().manual_seed(depth)).float()
    for k in (10, 2500, 4990):
        assert torch.equal(argsort_topk_mask(values, k, depth=depth), argsort_mask(values, k))


def test_shape_and_edge_k():
    values = torch.rand(7, 5)
    assert argsort_topk_mask(values, 0).shape == (7, 5) and not argsort_topk_mask(values, 0).any()
    assert argsort_topk_mask(values, 35).all() and argsort_topk_mask(values, 99).all()


def test_magnitude_topk_differs_from_index_order_where_argsort_does():
    """Above 16 entries std::sort is not stable: a tie straddling the k-th magnitude is
    resolved as the argsort resolves it, not by index (the old rule kept indices 0..k-1)."""
    delta = torch.ones(40)
    kept = magnitude_topk(delta, 0.25) != 0
    assert torch.equal(kept, argsort_mask(delta, 10))
    assert not torch.equal(kept, torch.arange(40) < 10)


@pytest.mark.skipif(not have_mergekit(), reason="mergekit 0.1.5 not installed")
@pytest.mark.parametrize("shape", [(300,), (40, 96), (7, 1000)])
def test_della_keep_probabilities_equal_mergekits_on_ties(shape):
    """DELLA ranks magnitudes with a non-stable argsort; psomerge ranks with the same call,
    so tied magnitudes get the same ranks and keep probabilities. mergekit draws its mask
    with torch.bernoulli(probs) from the global generator: the same draw on psomerge's
    probabilities gives mergekit's output exactly."""
    from mergekit.sparsify import della_magprune

    delta = torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(1)).float() / 64
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    probs = della_keep_prob(rows, 0.4, 0.1).reshape(shape)
    for seed in range(5):
        torch.manual_seed(seed)
        theirs = della_magprune(delta, density=0.4, epsilon=0.1, rescale_norm=None)
        torch.manual_seed(seed)
        assert torch.equal(theirs, delta * torch.bernoulli(probs)), seed
