"""TIES sign election and disjoint merge."""

from __future__ import annotations

import torch


def elect_sign(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign carrying more weighted mass across models (dim 0); +1 on a tie."""
    return torch.where(weighted_deltas.sum(dim=0) >= 0, 1.0, -1.0)


def agreement_mask(deltas: torch.Tensor, sign: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """1 where a model's (non-zero) delta agrees with the elected sign, else 0 (in ``dtype``,
    default the deltas' own)."""
    return (deltas.sign() == sign).to(dtype or deltas.dtype)
