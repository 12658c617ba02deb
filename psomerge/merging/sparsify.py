"""Sparsifiers of task vectors: magnitude top-k (TIES), random drop (DARE), magnitude
sampling (DELLA). Each takes a delta and returns a sparsified delta of the same shape.

Rescaling after a random drop: ``inverse`` divides each kept entry by its keep
probability (the DARE and DELLA papers, MergeLM); ``l1`` scales the masked delta back to
its original L1 norm (mergekit's choice); ``none`` keeps the masked values.
"""

from __future__ import annotations

from typing import Literal

import torch

from psomerge.merging.topk import argsort_topk_mask

Rescale = Literal["inverse", "l1", "none"]
RESCALES: tuple[str, ...] = ("inverse", "l1", "none")


def magnitude_topk(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) largest-magnitude entries (TIES trim).

    Exactly the entries mergekit 0.1.5 keeps, ``argsort(|delta|, descending=True)[:k]``,
    ties at the k-th magnitude included, in expected linear time (``topk.argsort_topk_mask``).
    """
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    return delta * argsort_topk_mask(delta.abs(), k)


def _rescaled(delta: torch.Tensor, mask: torch.Tensor, keep_prob: torch.Tensor | float, rescale: Rescale):
    masked = delta * mask
    if rescale == "inverse":
        return masked / keep_prob
    if rescale == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
        if before < 1e-7 or after < 1e-7:
            return masked
        return masked * (before / after)
    if rescale == "none":
        return masked
    raise ValueError(f"unknown rescale {rescale!r}: use inverse, l1 or none")


def dare(
    delta: torch.Tensor, drop_rate: float, generator: torch.Generator, rescale: Rescale = "inverse"
) -> torch.Tensor:
    """DARE: drop each entry with probability ``drop_rate``, rescale the survivors."""
    if not 0 <= drop_rate < 1:
        raise ValueError(f"DARE drop rate must be in [0, 1), got {drop_rate}")
    if drop_rate == 0:
        return delta
    return _rescaled(delta, dare_mask(delta.shape, drop_rate, generator), 1.0 - drop_rate, rescale)


def dare_mask(shape: torch.Size | tuple[int, ...], drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's keep-mask: True where an entry survives (probability 1 - ``drop_rate``). The one
    draw behind ``dare`` and the swarm's packed DARE masks, so both keep the same entries."""
    return torch.rand(shape, generator=generator) < 1.0 - drop_rate


def della(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: Rescale = "inverse",
) -> torch.Tensor:
    """DELLA MagPrune: keep probabilities rise linearly with magnitude rank within each row,
    from density - epsilon (smallest) to density + epsilon (largest); survivors rescaled."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della(density, epsilon)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    keep_prob = della_keep_prob(rows, density, epsilon)
    mask = torch.rand(rows.shape, generator=generator) < keep_prob
    out = _rescaled(rows, mask, keep_prob, rescale)
    return out.reshape(delta.shape)


def check_della(density: float, epsilon: float) -> None:
    """DELLA's keep probabilities, density -/+ epsilon, must lie in (0, 1] where it sparsifies."""
    if 0 < density < 1 and not (0 < density - epsilon and density + epsilon <= 1):
        raise ValueError(
            f"DELLA needs 0 < density - epsilon and density + epsilon <= 1 "
            f"(density={density}, epsilon={epsilon})"
        )


def della_keep_prob(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-entry keep probability of DELLA: density - epsilon for the smallest magnitude of
    its row up to density + epsilon for the largest. Ranks come from the same non-stable
    ``argsort`` mergekit 0.1.5 calls, so tied magnitudes get mergekit's ranks, and the
    probabilities equal mergekit's bit for bit."""
    width = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float()  # 0 = smallest magnitude
    rank_frac = ranks / max(width - 1, 1)
    return (density - epsilon) + 2 * epsilon * rank_frac
