"""Warm starts: begin the search where the static merges already are.

Linear merges are points of the coefficient space: the plain average of the experts, and
task arithmetic theta0 + lambda * sum_i (theta_i - theta0) at any lambda. Particles start
there, exactly. Non-linear merges (TIES, DARE-TIES, DELLA) are not combinations of the
basis: they join it as extra members (one more model copy each), and a particle starts
one-hot at each. So the first global best is at least the best of these static merges on
the search split, by construction.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from psomerge.swarm.basis import member_coefficients
from psomerge.yamlconfig import StrictModel

# static merges that are not points of the coefficient space, and so become basis members
MEMBER_MERGES = ("ties", "dare_ties", "della", "dare_linear")


class WarmStartSettings(StrictModel):
    average: bool = True  # a particle at the plain average of the experts
    # a particle at each expert itself (one-hot): the search then starts at least at the best
    # single expert too, and model selection can keep one where no merge beats it
    experts: bool = True
    task_arithmetic: list[float] = Field(default_factory=lambda: [0.7, 1.0])  # lambdas
    # every static baseline that is not a point of the space, so the search starts at least at
    # the best of all the static merges a report shows (one model copy each)
    members: list[str] = Field(default_factory=lambda: ["ties", "dare_ties", "della", "dare_linear"])

    @field_validator("members")
    @classmethod
    def _non_linear_merges(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in MEMBER_MERGES:
                raise ValueError(f"{name!r} cannot be a basis member; use one of {', '.join(MEMBER_MERGES)} "
                                 "(average and task_arithmetic are points of the space already)")
        return names


def task_arithmetic_position(k: int, groups: int, n_experts: int, scale: float) -> np.ndarray:
    """theta0 + scale * sum_i (theta_i - theta0) as coefficients over [base, experts, ...]:
    the base's coefficient is 1 - N * scale, each expert's is scale."""
    x = np.zeros((groups, k))
    x[:, 0] = 1.0 - n_experts * scale
    x[:, 1: 1 + n_experts] = scale
    return x


def linear_starts(settings: WarmStartSettings, k: int, groups: int, n_experts: int) -> list[np.ndarray]:
    """The linear merges' positions (the average is task arithmetic at 1 / N)."""
    scales = ([1.0 / n_experts] if settings.average else []) + list(settings.task_arithmetic)
    out: list[np.ndarray] = []
    for scale in scales:
        x = task_arithmetic_position(k, groups, n_experts, scale)
        if not any(np.allclose(x, y) for y in out):
            out.append(x)
    return out


def warm_starts(settings: "WarmStartSettings | None", k: int, groups: int, n_experts: int) -> list[np.ndarray]:
    """Every position a warm-started search starts from: the linear merges, each expert where
    asked (one-hot), and each static merge joined to the basis (one-hot on its member, after
    the base, the experts and their DARE members)."""
    if settings is None:
        return []
    out = linear_starts(settings, k, groups, n_experts)
    members = [*(range(1, 1 + n_experts) if settings.experts else ()), *range(1 + 2 * n_experts, k)]
    return out + [member_coefficients(k, groups, j) for j in members]


def is_one_hot(x: np.ndarray) -> bool:
    """Whether ``x`` is one basis member (in every group): swarms have a particle there already."""
    x = np.asarray(x)
    return bool(np.all((x == 0) | (x == 1)) and np.all(x.sum(axis=1) == 1) and np.all(x == x[0]))
