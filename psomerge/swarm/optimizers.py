"""The optimisers a run can choose (``optimizer.type``), in one explicit table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from psomerge.swarm.cmaes import CMAES, CMAESSettings
from psomerge.swarm.model_swarms import ModelSwarms, ModelSwarmsSettings
from psomerge.swarm.optimizer import Optimizer, SwarmOptimizer
from psomerge.swarm.pso import PSOMerging, PSOSettings
from psomerge.swarm.random_search import RandomSearch, RandomSearchSettings
from psomerge.swarm.scale_grid import ScaleGrid, ScaleGridSettings
from psomerge.swarm.warm_start import is_one_hot
from psomerge.yamlconfig import tagged_union

OPTIMIZERS = {
    "pso": (PSOSettings, PSOMerging),
    "model_swarms": (ModelSwarmsSettings, ModelSwarms),
    "cmaes": (CMAESSettings, CMAES),
    "random": (RandomSearchSettings, RandomSearch),
    "ta_grid": (ScaleGridSettings, ScaleGrid),
}

# optimisers that give a particle a fitness to beat (they override Optimizer.targets): racing applies to them
RACING_OPTIMIZERS = tuple(name for name, (_, cls) in OPTIMIZERS.items() if cls.targets is not Optimizer.targets)

OptimizerChoice = tagged_union({name: settings for name, (settings, _) in OPTIMIZERS.items()}, default="pso")


def make_optimizer(settings, k: int, groups: int, *, n_experts: int,
                   starts: Sequence[np.ndarray] = ()) -> Optimizer:
    """The optimiser ``settings`` name, over K basis members in G coefficient groups, with
    extra starting positions (``warm_start.warm_starts``: linear merges, experts, static merges
    joined to the basis). Swarms start one-hot at every member already, so they take only the
    starts that are not; either way a warm-started search begins at least at the best of them."""
    cls = OPTIMIZERS[settings.type][1]
    if cls is ScaleGrid:  # searches one scale of task arithmetic: warm starts do not apply
        return ScaleGrid(k, groups, settings, n_experts=n_experts)
    if issubclass(cls, SwarmOptimizer):  # a swarm has a particle at every member already
        starts = [x for x in starts if not is_one_hot(x)]
    return cls(k, groups, settings, starts)
