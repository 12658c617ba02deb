"""The optimisers a run can choose (``optimizer.type``), in one explicit table."""

from __future__ import annotations

from psomerge.swarm.cmaes import CMAES, CMAESSettings
from psomerge.swarm.model_swarms import ModelSwarms, ModelSwarmsSettings
from psomerge.swarm.optimizer import Optimizer
from psomerge.swarm.pso import PSOMerging, PSOSettings
from psomerge.yamlconfig import tagged_union

OPTIMIZERS = {
    "pso": (PSOSettings, PSOMerging),
    "model_swarms": (ModelSwarmsSettings, ModelSwarms),
    "cmaes": (CMAESSettings, CMAES),
}

OptimizerChoice = tagged_union({name: settings for name, (settings, _) in OPTIMIZERS.items()}, default="pso")


def make_optimizer(settings: PSOSettings | ModelSwarmsSettings | CMAESSettings, k: int, groups: int) -> Optimizer:
    """The optimiser ``settings`` name, over K basis members in G coefficient groups."""
    return OPTIMIZERS[settings.type][1](k, groups, settings)
