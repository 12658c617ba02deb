"""The swarm: a basis of models, particles as coefficients over it, optimisers that move
them, and the cached fitness that scores them."""

from psomerge.swarm.basis import Basis, BasisSettings, build_basis, member_coefficients
from psomerge.swarm.cache import CachedFitness, FitnessCache, particle_key
from psomerge.swarm.cmaes import CMAES, CMAESSettings
from psomerge.swarm.model_swarms import ModelSwarms, ModelSwarmsSettings
from psomerge.swarm.optimizer import Optimizer
from psomerge.swarm.optimizers import OPTIMIZERS, OptimizerChoice, make_optimizer
from psomerge.swarm.pso import PSOMerging, PSOSettings
from psomerge.swarm.run import StepReport, SwarmResult, load_checkpoint, run_optimizer

__all__ = [
    "Basis", "BasisSettings", "build_basis", "member_coefficients", "CachedFitness", "FitnessCache", "particle_key",
    "CMAES", "CMAESSettings", "ModelSwarms", "ModelSwarmsSettings", "Optimizer", "OPTIMIZERS", "OptimizerChoice",
    "make_optimizer", "PSOMerging", "PSOSettings", "StepReport", "SwarmResult", "load_checkpoint", "run_optimizer",
]
