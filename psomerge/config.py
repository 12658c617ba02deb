"""Run configuration (YAML), validated with errors naming the file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from psomerge.errors import ConfigError
from psomerge.judges.generation import generation_config
from psomerge.paths import data_dir
from psomerge.yamlconfig import read_yaml, validate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SuiteConfig(_Strict):
    name: str
    dataset: Path  # .jsonl, .csv, .parquet, or a folder written by datasets' save_to_disk
    dataset_split: str | None = None  # for a saved DatasetDict
    prompt_template: str = "{question}"
    answer_field: str = "answer"
    id_field: str | None = None
    judge: dict[str, Any] = {"type": "exact_match"}  # {type: exact_match | code_exec | llm, ...}
    weight: float = Field(1.0, gt=0)
    optimisation_size: int = Field(60, gt=0)
    heldout_size: int | None = None
    split_seed: int = 0


class BasisConfig(_Strict):
    drop_rate: float = Field(0.8, ge=0, lt=1)
    seed: int = 0
    granularity: Literal["model", "layer", "tensor"] = "model"
    storage: Literal["ram", "compact", "mmap", "cuda"] = "ram"


class VLLMEngineConfig(_Strict):
    """The vLLM generation backend's engine (one per resident, kept alive across particles)."""

    python: str | None = None  # the vLLM environment; default $PSOMERGE_VLLM_PYTHON or .venv-vllm/bin/python
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    memory_fraction: float = Field(0.2, gt=0, le=1)  # gpu_memory_utilization (CPU backend: share of RAM)
    max_model_len: int | None = Field(None, gt=0)
    enforce_eager: bool = True
    startup_timeout: float = Field(900.0, gt=0)
    engine_args: dict[str, Any] = {}  # passed to vllm.LLM(...) as they are


class GenerationConfig(_Strict):
    backend: Literal["transformers", "vllm"] = "transformers"
    max_new_tokens: int = 16
    batch_size: int = 64  # transformers backend; vLLM schedules its own batches
    stop: list[str] = ["\n"]
    vllm: VLLMEngineConfig = VLLMEngineConfig()

    def cache_config(self) -> dict:
        """What changes answers: part of every fitness cache key."""
        if self.backend == "vllm":
            return generation_config(self.max_new_tokens, self.stop, backend="vllm", dtype=self.vllm.dtype)
        return generation_config(self.max_new_tokens, self.stop)


class OptimizerConfig(_Strict):
    type: Literal["pso", "model_swarms", "cmaes"] = "pso"
    steps: int = Field(5, ge=0)
    seed: int = 0
    # PSO-Merging
    inertia: float = 0.2
    cognitive: float = 2.0
    social: float = 2.0
    velocity_clamp: float | None = None
    bounds: tuple[float, float] | None = None
    extra_particles: int = 0
    # Model Swarms
    step_length: float = 1.0
    decay: float = 0.95
    min_step_length: float = 0.1
    patience: int = 3
    early_stop: int = 5
    # CMA-ES: budget defaults to PSO's (2N+1 + extra) * (steps + 1) evaluations
    budget: int | None = None
    popsize: int | None = None
    sigma0: float = 0.3


class RunnerConfig(_Strict):
    """Where particles are scored: threads in this process, or Dask / Ray workers."""

    type: Literal["threads", "dask", "ray"] = "threads"
    max_workers: int = Field(1, ge=1)  # threads, or local Dask workers / Ray CPUs
    address: str | None = None  # an existing Dask scheduler or Ray cluster


class RegistryConfig(_Strict):
    experiment: str = "psomerge"
    model_name: str = "psomerge-merged"
    promotion_margin: float = Field(0.0, ge=0)  # the candidate must beat the champion by more than this
    baselines: list[str] = ["average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della"]


class RunConfig(_Strict):
    name: str = "psomerge"
    base: Path
    experts: list[Path]
    suites: list[SuiteConfig]
    basis: BasisConfig = BasisConfig()
    generation: GenerationConfig = GenerationConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    runner: RunnerConfig = RunnerConfig()
    registry: RegistryConfig = RegistryConfig()
    output_dir: Path | None = None  # default: <data dir>/runs/<name>
    cache_path: Path | None = None  # default: <data dir>/cache/fitness.sqlite
    source: str = Field("<config>", exclude=True)

    def run_dir(self) -> Path:
        """Where the run's checkpoint, merged model and baselines go."""
        return self.output_dir or data_dir() / "runs" / self.name

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(read_yaml(path, "config"), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>") -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a run config is a mapping (base, experts, suites, ...)")
        cfg = validate(cls, data, source)
        if len({s.name for s in cfg.suites}) != len(cfg.suites):
            raise ConfigError(f"{source}: suites: names must be unique")
        if not cfg.experts:
            raise ConfigError(f"{source}: key 'experts': at least one expert is needed")
        if cfg.generation.backend == "vllm" and cfg.basis.storage == "cuda":
            # the particle is summed on the host into the file the engine reloads from
            raise ConfigError(f"{source}: basis.storage: 'cuda' does not combine with generation.backend "
                              "'vllm' (the vLLM engine owns the GPU); use ram, compact or mmap")
        return cfg
