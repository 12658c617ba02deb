"""Optimisers over basis coefficients: PSO-Merging, Model Swarms, CMA-ES."""

from psomerge.swarm.basis import Basis, BasisSpec, build_basis
from psomerge.swarm.cache import FitnessCache, particle_key
from psomerge.swarm.optimizers import CMAES, CMAESConfig, ModelSwarms, ModelSwarmsConfig, Optimizer, PSOMerging
from psomerge.swarm.pso import PSOConfig
from psomerge.swarm.run import SwarmResult, run_optimizer

__all__ = [
    "Basis", "BasisSpec", "build_basis", "FitnessCache", "particle_key", "CMAES", "CMAESConfig", "ModelSwarms",
    "ModelSwarmsConfig", "Optimizer", "PSOMerging", "PSOConfig", "SwarmResult", "run_optimizer",
]
