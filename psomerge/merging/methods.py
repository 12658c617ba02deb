"""Static merge methods, each a pure function of one tensor name's inputs.

Like mergekit's generalized task arithmetic, six methods come from two orthogonal
switches over task vectors (how each delta is sparsified; whether signs are elected),
plus the plain weighted average. The registry below is an explicit table: nothing
registers itself on import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from psomerge.errors import ConfigError
from psomerge.merging.consensus import agreement_mask, elect_sign
from psomerge.merging.sparsify import Rescale, check_della, dare, della, magnitude_topk
from psomerge.merging.task_vectors import task_vector

Sparsification = Literal["magnitude", "random", "magnitude_sampling"]


@dataclass(frozen=True)
class ModelParams:
    """Per-model parameters (mergekit's ``models[i].parameters``)."""

    weight: float = 1.0
    density: float = 1.0
    epsilon: float = 0.15


@dataclass(frozen=True)
class MergeOptions:
    """Parameters shared by all models (mergekit's top-level ``parameters``)."""

    normalize: bool = False
    lam: float = 1.0
    rescale: Rescale = "inverse"
    int8_mask: bool = False  # hold sign-agreement masks as int8 (mergekit's memory saving; same result)


class MergeMethod(ABC):
    name: str
    requires_base: bool
    default_normalize: bool
    model_keys: frozenset[str]
    shared_keys: frozenset[str]

    @abstractmethod
    def merge(
        self,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        params: Sequence[ModelParams],
        options: MergeOptions,
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """Merged fp32 tensor. ``tensors`` and ``params`` exclude the base model."""

    def check_params(self, params: ModelParams, options: MergeOptions) -> None:
        """Raise ValueError for one model's parameters that ``merge`` cannot use; called for
        every tensor before any is merged, so a bad value fails before work, not midway."""


class Linear(MergeMethod):
    """sum_i w_i theta_i, divided by sum_i w_i when normalize (the default)."""

    name = "linear"
    requires_base = False
    default_normalize = True
    model_keys = frozenset({"weight"})
    shared_keys = frozenset({"normalize"})

    def merge(self, base, tensors, params, options, generators):
        # mergekit 0.1.5's arithmetic, so results are bit-identical: fp32 weights, one
        # addcmul per model into zeros, then division by the fp32 sum of the weights
        weights = torch.tensor([p.weight for p in params], dtype=torch.float32)
        out = torch.zeros(tensors[0].shape, dtype=torch.float32)
        for t, w in zip(tensors, weights):
            out.addcmul_(t.float(), w)
        if options.normalize:
            total = weights.sum()
            if abs(float(total)) < 1e-12:
                raise ConfigError("linear merge with normalize: the model weights sum to 0")
            out.div_(total)
        return out


@dataclass(frozen=True)
class TaskArithmeticFamily(MergeMethod):
    """theta_0 + lambda * merge_i(w_i * sparsify(delta_i)).

    Without consensus the merge is a sum (divided by sum w_i when normalize); with
    consensus (TIES) each entry keeps only deltas agreeing with the elected sign, divided
    by the weights of the agreeing models when normalize.
    """

    name: str
    sparsification: Sparsification | None
    consensus: bool
    default_normalize: bool
    requires_base: bool = True

    @property
    def model_keys(self) -> frozenset[str]:  # type: ignore[override]
        keys = {"weight"}
        if self.sparsification:
            keys.add("density")
        if self.sparsification == "magnitude_sampling":
            keys.add("epsilon")
        return frozenset(keys)

    @property
    def shared_keys(self) -> frozenset[str]:  # type: ignore[override]
        keys = {"normalize", "lambda", "int8_mask"}
        if self.sparsification in ("random", "magnitude_sampling"):
            keys.add("rescale")
        return frozenset(keys)

    def check_params(self, params: ModelParams, options: MergeOptions) -> None:
        if self.sparsification == "random" and params.density <= 0:
            raise ValueError(f"density {params.density}: DARE keeps each entry with probability density, "
                             "so it must be above 0")
        if self.sparsification == "magnitude_sampling":
            check_della(params.density, params.epsilon)

    def sparsify(self, delta: torch.Tensor, p: ModelParams, options: MergeOptions, gen) -> torch.Tensor:
        if self.sparsification is None:
            return delta
        if self.sparsification == "magnitude":
            return magnitude_topk(delta, p.density)
        if self.sparsification == "random":
            return dare(delta, 1.0 - p.density, gen, options.rescale) if p.density < 1 else delta
        return della(delta, p.density, p.epsilon, gen, options.rescale)

    def merge(self, base, tensors, params, options, generators):
        assert base is not None
        base = base.float()
        if not tensors:
            return base.clone()
        deltas = torch.stack(
            [self.sparsify(task_vector(t, base), p, options, g) for t, p, g in zip(tensors, params, generators)]
        )
        weights = torch.tensor([p.weight for p in params], dtype=torch.float32)
        weights = weights.reshape(-1, *([1] * base.dim()))
        weighted = deltas.mul_(weights)
        if self.consensus:
            mask = agreement_mask(weighted, elect_sign(weighted), torch.int8 if options.int8_mask else None)
            mixed = (weighted * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(dim=0)
            divisor = weights.sum(dim=0).expand_as(mixed).clone()
            divisor[divisor.abs() < 1e-8] = 1
        if options.normalize:
            mixed /= divisor
        return base + options.lam * mixed


LINEAR = Linear()
TASK_ARITHMETIC = TaskArithmeticFamily("task_arithmetic", None, consensus=False, default_normalize=False)
TIES = TaskArithmeticFamily("ties", "magnitude", consensus=True, default_normalize=True)
DARE_LINEAR = TaskArithmeticFamily("dare_linear", "random", consensus=False, default_normalize=False)
DARE_TIES = TaskArithmeticFamily("dare_ties", "random", consensus=True, default_normalize=False)
DELLA = TaskArithmeticFamily("della", "magnitude_sampling", consensus=True, default_normalize=True)
DELLA_LINEAR = TaskArithmeticFamily(
    "della_linear", "magnitude_sampling", consensus=False, default_normalize=False
)

METHODS: dict[str, MergeMethod] = {
    m.name: m for m in (LINEAR, TASK_ARITHMETIC, TIES, DARE_LINEAR, DARE_TIES, DELLA, DELLA_LINEAR)
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method {name!r}; psomerge knows {', '.join(sorted(METHODS))}"
        ) from None
