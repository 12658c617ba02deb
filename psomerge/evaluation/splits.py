"""A suite's splits: one seeded permutation of its examples cut into optimisation, validation
and held-out parts, so they are disjoint by construction. Prompt rendering that takes shots
from the optimisation split needs the same cut before the suite exists: both use this."""

from __future__ import annotations

import random
from typing import Literal

from psomerge.errors import ConfigError

Split = Literal["optimisation", "validation", "heldout"]


def split_order(suite: str, n: int, optimisation_size: int, validation_size: int, heldout_size: int | None,
                seed: int) -> list[int]:
    """The seeded permutation of ``n`` example positions; the sizes are checked to fit."""
    taken = optimisation_size + validation_size
    wanted = taken + (heldout_size or 0)
    if optimisation_size <= 0 or wanted > n or (heldout_size is None and taken >= n):
        raise ConfigError(
            f"eval suite {suite!r}: optimisation_size={optimisation_size}, validation_size="
            f"{validation_size} and heldout_size={heldout_size} do not fit its {n} examples"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def split_positions(order: list[int], which: Split, optimisation_size: int, validation_size: int,
                    heldout_size: int | None) -> list[int]:
    """The positions of one split in ``order``."""
    k, v = optimisation_size, validation_size
    if which == "optimisation":
        return order[:k]
    if which == "validation":
        return order[k: k + v]
    if which == "heldout":
        return order[k + v: k + v + heldout_size] if heldout_size else order[k + v:]
    raise ValueError(f"unknown split {which!r}")


def optimisation_positions(suite: str, n: int, *, optimisation_size: int, validation_size: int,
                           heldout_size: int | None, split_seed: int) -> list[int]:
    """The positions of the optimisation split of ``n`` examples (where shots come from),
    before the suite exists; the sizes are checked to fit."""
    order = split_order(suite, n, optimisation_size, validation_size, heldout_size, split_seed)
    return split_positions(order, "optimisation", optimisation_size, validation_size, heldout_size)
