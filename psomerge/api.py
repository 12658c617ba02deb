"""The Python API of a swarm run: config in, merged model and per-task report out.

Everything here is plain library code; the Prefect flows wrap the same steps as tasks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from psomerge.config import OptimizerConfig, RunConfig, SuiteConfig
from psomerge.errors import ConfigError
from psomerge.evalsuite import EvalSuite
from psomerge.evaluation import EvalResult, evaluate
from psomerge.io import Checkpoint, StreamingSafetensorsWriter, check_compatible, copy_model_files
from psomerge.judges.registry import make_scorer
from psomerge.judges.generation import TransformersGenerator
from psomerge.paths import data_dir
from psomerge.swarm import (
    CMAES, CMAESConfig, FitnessCache, ModelSwarms, ModelSwarmsConfig, Optimizer, PSOConfig, PSOMerging, BasisSpec,
    build_basis, run_optimizer,
)
from psomerge.swarm.basis import Basis, member_coefficients
from psomerge.swarm.fitness import ParticleEvaluator, Resident
from psomerge.swarm.cache import CachedFitness, particle_key
from psomerge.swarm.run import StepReport, load_checkpoint

log = logging.getLogger(__name__)
COEFFICIENTS_FILE = "psomerge_coefficients.json"  # beside a merged model: basis, groups, coefficients


def load_suites(configs: list[SuiteConfig], source: str = "<config>") -> list[EvalSuite]:
    suites = []
    for i, s in enumerate(configs):
        judge = dict(s.judge)
        if judge.get("type") == "llm":  # identical (prompt, answer) pairs are judged once, across runs
            judge.setdefault("cache_path", str(data_dir() / "cache" / "judge.sqlite"))
        suites.append(EvalSuite.from_file(
            s.name,
            s.dataset,
            hf_split=s.dataset_split,
            prompt_template=s.prompt_template,
            answer_field=s.answer_field,
            id_field=s.id_field,
            scorer=make_scorer(judge, where=f"{source}: suites[{i}].judge"),
            weight=s.weight,
            optimisation_size=s.optimisation_size,
            heldout_size=s.heldout_size,
            split_seed=s.split_seed,
        ))
    return suites


def make_optimizer(cfg: OptimizerConfig, k: int, groups: int) -> Optimizer:
    particles = k + cfg.extra_particles
    if cfg.type == "pso":
        return PSOMerging(k, groups, PSOConfig(
            steps=cfg.steps, inertia=cfg.inertia, cognitive=cfg.cognitive, social=cfg.social,
            velocity_clamp=cfg.velocity_clamp, bounds=cfg.bounds, extra_particles=cfg.extra_particles, seed=cfg.seed))
    if cfg.type == "model_swarms":
        return ModelSwarms(k, groups, ModelSwarmsConfig(
            steps=cfg.steps, step_length=cfg.step_length, decay=cfg.decay, min_step_length=cfg.min_step_length,
            patience=cfg.patience, early_stop=cfg.early_stop, extra_particles=cfg.extra_particles, seed=cfg.seed))
    budget = cfg.budget or particles * (cfg.steps + 1)  # PSO's budget at the same settings
    return CMAES(k, groups, CMAESConfig(budget=budget, popsize=cfg.popsize or particles, sigma0=cfg.sigma0,
                                        seed=cfg.seed))


@dataclass
class SwarmRun:
    """What one run produced. ``heldout`` rows: base, experts, the merge."""

    config: RunConfig
    basis: Basis
    best_position: np.ndarray
    best_fitness: float
    best_scores: dict[str, float]
    history: list[dict]
    counts: dict[str, int]
    suites: list[EvalSuite]
    heldout: list[tuple[str, EvalResult]] = field(default_factory=list)
    output_dir: Path | None = None


class Workspace:
    """What a worker needs to score particles: the basis, suites and caches, and a pool of
    resident models with their generators (one per particle scored at the same time)."""

    def __init__(self, config: RunConfig):
        self.config = config
        self._previous_tokens = 0  # generated before a resume
        if config.generation.backend == "vllm":  # fail before the basis is built, not at the first particle
            from psomerge.judges.vllm_server import vllm_python

            try:
                vllm_python(config.generation.vllm.python)
            except ConfigError as exc:
                raise ConfigError(f"{config.source}: generation.vllm.python: {exc}") from None
        cache_root = data_dir() / "cache"
        b = config.basis
        self.basis = build_basis(config.base, config.experts, cache_root / "basis",
                                 BasisSpec(b.drop_rate, b.seed, b.granularity), storage=b.storage)
        self.suites = load_suites(config.suites, config.source)
        self.cache = FitnessCache(config.cache_path or cache_root / "fitness.sqlite")
        self.evaluator = ParticleEvaluator(self.basis, self.suites, self.cache, self._new_resident,
                                           config.generation.cache_config())

    def _new_resident(self) -> Resident:
        g = self.config.generation
        if g.backend == "vllm":  # an engine in its own process; particles go in through a shared file
            from psomerge.judges.vllm_generation import VLLMGenerator

            v = g.vllm
            generator = VLLMGenerator(self.config.base, max_new_tokens=g.max_new_tokens, stop=g.stop,
                                      python=v.python, dtype=v.dtype, memory_fraction=v.memory_fraction,
                                      max_model_len=v.max_model_len, enforce_eager=v.enforce_eager,
                                      engine_args=v.engine_args, startup_timeout=v.startup_timeout)
            return Resident(generator.weights, generator)
        model = AutoModelForCausalLM.from_pretrained(self.config.base, dtype=torch.float32)
        if self.config.basis.storage == "cuda":
            model.to("cuda")
        generator = TransformersGenerator(model, AutoTokenizer.from_pretrained(self.config.base),
                                          batch_size=g.batch_size, max_new_tokens=g.max_new_tokens, stop=g.stop)
        return Resident(model, generator)

    def counts(self) -> dict[str, float]:
        c = self.evaluator.counts
        tokens = sum(r.generator.stats.new_tokens for r in self.evaluator.residents) + self._previous_tokens
        out: dict[str, float] = {"fitness_calls": c.calls, "scorings": c.scorings, "cache_hits": c.cache_hits,
                                 "generated_tokens": tokens,
                                 "judge_calls": 0, "judge_cache_hits": 0, "judge_tokens": 0, "judge_cost": 0.0}
        for suite in self.suites:
            stats = getattr(suite.scorer, "stats", None)  # LLM judges account for their API use
            if stats is not None:
                out["judge_calls"] += stats.requests
                out["judge_cache_hits"] += stats.cache_hits + stats.deduplicated
                out["judge_tokens"] += stats.prompt_tokens + stats.completion_tokens
                out["judge_cost"] += stats.cost
        return out

    def _cached(self, key: str, compute) -> EvalResult:
        """Final evaluations are cached like fitness (a rerun recomputes nothing)."""
        hit = self.cache.get(key)
        if hit is not None:
            return EvalResult(hit.scores, hit.fitness, int(hit.meta.get("examples", 0)))
        result = compute()
        self.cache.put(key, CachedFitness(result.fitness, result.scores, {"examples": result.num_examples}))
        return result

    def heldout(self, coeffs: np.ndarray) -> EvalResult:
        """Held-out scores of a particle: only the final evaluation calls this."""
        def compute() -> EvalResult:
            with self.evaluator.resident() as r:
                r.load_particle(self.basis, coeffs)
                return evaluate(r.generator, self.suites, "heldout")

        key = particle_key(self.basis.fingerprint, coeffs, self.evaluator.fingerprint + ":heldout")
        return self._cached(key, compute)

    @torch.no_grad()
    def evaluate_folder(self, model_dir: Path, split: str) -> EvalResult:
        """Scores of a merged checkpoint folder, loaded into a resident model (no second model)."""
        ckpt = Checkpoint(model_dir)
        check_compatible(self.basis.members[0], [ckpt])

        def compute() -> EvalResult:
            with self.evaluator.resident() as r, ckpt:
                r.load_tensors((name, ckpt.get(name)) for name in self.basis.names)
                return evaluate(r.generator, self.suites, split)  # type: ignore[arg-type]

        key = f"folder:{ckpt.fingerprint()}:{self.evaluator.fingerprint}:{split}"
        return self._cached(key, compute)

    def close(self) -> None:
        for suite in self.suites:  # stop judge servers this run started
            close = getattr(suite.scorer, "close", None)
            if close:
                close()
        self.evaluator.close()  # and generation engines

    def write_model(self, coeffs: np.ndarray, out_dir: Path) -> Path:
        """Stream the particle to sharded safetensors with the base's config and tokenizer."""
        ref = self.basis.members[0]
        plan = [(n, ref.info(n).shape, ref.info(n).dtype) for n in ref.tensor_names]
        with StreamingSafetensorsWriter(out_dir, plan) as writer:
            for name in ref.tensor_names:
                if name not in self.basis.group_of:
                    writer.write(name, ref.get(name))
                    continue
                out = torch.empty(ref.info(name).shape, dtype=torch.float32)
                self.basis.combine_into(out, name, coeffs[self.basis.group_of[name]].tolist())
                writer.write(name, out.to(ref.info(name).dtype))
        copy_model_files(ref.path, out_dir, ref.dtype)
        (out_dir / COEFFICIENTS_FILE).write_text(json.dumps({
            "basis": self.basis.labels, "groups": self.basis.group_labels, "coefficients": coeffs.tolist(),
            "basis_fingerprint": self.basis.fingerprint}, indent=2))
        return out_dir


def run_swarm(
    config: RunConfig,
    *,
    resume: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    evaluate_heldout: bool = True,
    workspace: Workspace | None = None,
) -> SwarmRun:
    own = workspace is None
    ws = workspace or Workspace(config)
    try:
        return _run_swarm(ws, config, resume, on_step, evaluate_heldout)
    finally:
        if own:
            ws.close()


def _run_swarm(ws: Workspace, config: RunConfig, resume: bool, on_step, evaluate_heldout: bool) -> SwarmRun:
    out = config.run_dir()
    out.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(config.optimizer, ws.basis.k, ws.basis.num_groups)
    checkpoint = out / "checkpoint.json"
    if resume and checkpoint.exists():  # counts continue across a crash and resume
        previous = load_checkpoint(checkpoint).get("counts", {})
        c = ws.evaluator.counts
        c.calls, c.scorings = previous.get("fitness_calls", 0), previous.get("scorings", 0)
        c.cache_hits = previous.get("cache_hits", 0)
        ws._previous_tokens = previous.get("generated_tokens", 0)
    result = run_optimizer(optimizer, ws.evaluator, checkpoint=checkpoint, resume=resume,
                           on_step=on_step, counts=ws.counts)
    run = SwarmRun(config, ws.basis, result.best_position, result.best_fitness, result.best_scores,
                   result.history, ws.counts(), ws.suites, output_dir=out)
    if evaluate_heldout:
        for j, label in enumerate(ws.basis.labels[: 1 + len(config.experts)]):
            run.heldout.append((label, ws.heldout(member_coefficients(ws.basis.k, ws.basis.num_groups, j))))
        run.heldout.append((f"psomerge:{config.optimizer.type}", ws.heldout(result.best_position)))
        ws.write_model(result.best_position, out / "model")
    return run
