"""A run's configuration (YAML): the schema of the core, validated with errors naming the
file and key.

Each section's model lives beside the code it configures (suites in ``evaluation``, judges
in ``judges``, generation backends in ``generation``, the basis and optimisers in
``swarm``), so every setting has one default, defined once. Sections that come in kinds
(``optimizer.type``, ``judge.type``, ``generation.backend``, ``runner.type``) accept only
their kind's options: an option the chosen kind does not have is an error, never ignored.
Names and paths (models, data files, baselines, scorers, the vLLM environment) are checked
when the config loads, before any expensive work.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from psomerge.paths import data_dir
from psomerge.errors import ConfigError
from psomerge.evaluation.lm_eval_suite import INSTALL_HINT as LM_EVAL_HINT
from psomerge.evaluation.suite import SuiteSettings
from psomerge.generation.settings import GenerationSettings, TransformersSettings, VLLMSettings
from psomerge.merging.baselines import STATIC_BASELINES
from psomerge.swarm.basis import BasisSettings
from psomerge.swarm.optimizers import RACING_OPTIMIZERS, OptimizerChoice
from psomerge.swarm.pso import PSOSettings
from psomerge.swarm.racing import RacingSettings
from psomerge.swarm.selection import SelectionSettings
from psomerge.swarm.warm_start import WarmStartSettings
from psomerge.yamlconfig import StrictModel, read_yaml, tagged_union, validate


class _Workers(StrictModel):
    max_workers: int = Field(1, ge=1)  # threads, local Dask workers or Ray CPUs


class ThreadsRunner(_Workers):
    """Particles scored by threads of the flow's own process."""

    type: Literal["threads"] = "threads"


class DaskRunner(_Workers):
    type: Literal["dask"] = "dask"
    address: str | None = None  # an existing scheduler (tcp://host:8786); else a local cluster


class RayRunner(_Workers):
    type: Literal["ray"] = "ray"
    address: str | None = None  # an existing cluster (ray://head:10001); else a local one


RunnerSettings = tagged_union({"threads": ThreadsRunner, "dask": DaskRunner, "ray": RayRunner}, default="threads")


class RegistrySettings(StrictModel):
    experiment: str = "psomerge"
    model_name: str = "psomerge-merged"
    promotion_margin: float = Field(0.0, ge=0)  # the candidate must beat the champion by more than this
    promotion_confidence: float = Field(0.95, ge=0.5, lt=1)  # ... beyond noise: one-sided paired bootstrap


# preset psomerge's optimizer where a config names none: in the budget study (BENCHMARKS.md) CMA-ES
# from the warm starts chose merges that scored higher on the validation split than PSO from them
PSOMERGE_OPTIMIZER = "cmaes"


class RunConfig(StrictModel):
    name: str = "psomerge"
    base: Path
    experts: list[Path] = Field(min_length=1)
    suites: list[SuiteSettings] = Field(min_length=1)
    basis: BasisSettings = BasisSettings()
    generation: GenerationSettings = TransformersSettings()
    optimizer: OptimizerChoice = PSOSettings()
    runner: RunnerSettings = ThreadsRunner()
    registry: RegistrySettings = RegistrySettings()
    baselines: list[str] = list(STATIC_BASELINES)  # static merges reported (and scored) beside the search
    # psomerge: warm starts, racing and model selection on by default; paper: PSO-Merging as
    # published (2N+1 one-hot particles, w=0.2, c1=c2=2, the judge as fitness, the final global best)
    preset: Literal["psomerge", "paper"] = "psomerge"
    warm_start: WarmStartSettings | None = None  # start the search at the static merges
    racing: RacingSettings | None = None  # score particles on slices, stop those that cannot beat their target
    selection: SelectionSettings | None = None  # choose the merge on the validation split (where suites have one)
    output_dir: Path | None = None  # default: <data dir>/runs/<name>
    cache_path: Path | None = None  # default: <data dir>/cache/fitness.sqlite
    source: str = Field("<config>", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        """Fill the preset's defaults for the search options the config leaves out; refuse
        options that would make the paper preset something other than the paper's method."""
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "psomerge")
        options = ("warm_start", "racing", "selection")
        if preset == "paper":
            for key in options:
                if data.get(key) is not None:
                    raise ValueError(f"preset 'paper' runs PSO-Merging as published: remove {key!r} (or use "
                                     "preset 'psomerge')")
            return data
        if preset != "psomerge":
            return data  # the field's own validation names the bad value
        data = dict(data)
        optimizer = data.get("optimizer")
        if optimizer is None or (isinstance(optimizer, dict) and "type" not in optimizer):
            data["optimizer"] = {"type": PSOMERGE_OPTIMIZER, **(optimizer or {})}
        defaults = {key: {} for key in options}
        if _optimizer_type(data) not in RACING_OPTIMIZERS:
            defaults["racing"] = None  # the task-arithmetic grid uses every point's full fitness
        return {**defaults, **data}

    @model_validator(mode="after")
    def _paper_is_the_paper(self) -> "RunConfig":
        if self.preset != "paper":
            return self
        o = self.optimizer
        paper = PSOSettings()
        if o.type != "pso" or any(getattr(o, f) != getattr(paper, f)
                                  for f in ("inertia", "cognitive", "social", "extra_particles", "velocity_clamp",
                                            "bounds")):
            raise ValueError("preset 'paper' runs PSO-Merging as published: optimizer type pso with inertia 0.2, "
                             "cognitive 2, social 2 and no extra particles, clamp or bounds (only steps, budget "
                             "and seed may change)")
        for s in self.suites:
            if [(t.scorer, t.weight) for t in s.fitness] != [("judge", 1.0)]:
                raise ValueError(f"preset 'paper' scores particles with the judge alone: remove suite "
                                 f"{s.name!r}'s fitness terms")
        return self

    @model_validator(mode="after")
    def _racing_applies(self) -> "RunConfig":
        if self.racing is not None and self.optimizer.type not in RACING_OPTIMIZERS:
            raise ValueError(f"racing does not apply to optimizer {self.optimizer.type!r}, which uses every "
                             f"particle's full fitness (racing works with {', '.join(RACING_OPTIMIZERS)}): "
                             "set racing: null")
        return self

    @field_validator("baselines")
    @classmethod
    def _known_baselines(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in STATIC_BASELINES:
                raise ValueError(f"unknown baseline {name!r}; known: {', '.join(STATIC_BASELINES)}")
        return names

    @field_validator("experts")
    @classmethod
    def _distinct_experts(cls, experts: list[Path]) -> list[Path]:
        """The same folder twice would count one expert double and lose a report row."""
        seen: dict[Path, int] = {}
        for i, path in enumerate(experts):
            folder = Path(path).resolve()
            if folder in seen:
                raise ValueError(f"experts[{i}] ({path}) is the same folder as experts[{seen[folder]}] "
                                 f"({experts[seen[folder]]}): list each expert once")
            seen[folder] = i
        return experts

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        """The name is the run's folder under <data dir>/runs: one plain folder name."""
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"{name!r} is not a plain folder name (the run's folder is <data dir>/runs/<name>); "
                             "use letters, digits, '-', '_' or '.', or set output_dir for another place")
        return name

    @model_validator(mode="after")
    def _base_is_no_expert(self) -> "RunConfig":
        base = Path(self.base).resolve()
        for i, path in enumerate(self.experts):
            if Path(path).resolve() == base:
                raise ValueError(f"experts[{i}] ({path}) is the base folder ({self.base}): its task vector is zero; "
                                 "list only fine-tuned experts")
        return self

    @field_validator("suites")
    @classmethod
    def _unique_suites(cls, suites: list[SuiteSettings]) -> list[SuiteSettings]:
        if len({s.name for s in suites}) != len(suites):
            raise ValueError("suite names must be unique")
        return suites

    def run_dir(self) -> Path:
        """Where the run's checkpoint, merged model and baselines go."""
        return self.output_dir or data_dir() / "runs" / self.name

    def fitness_cache_path(self) -> Path:
        return self.cache_path or data_dir() / "cache" / "fitness.sqlite"

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None, check_paths: bool = True) -> "RunConfig":
        """Read, apply command-line ``overrides`` (dotted keys), validate, check names and paths.

        A run whose optimizer is overridden (``{"optimizer.type": "cmaes"}``) is another run:
        its name and output folder get the optimizer as a suffix, so it never overwrites the
        checkpoint and model of the run the file describes."""
        data = read_yaml(path, "config")
        if isinstance(data, dict) and overrides:
            written = _optimizer_type(data)
            data = apply_overrides(data, overrides)
            chosen = _optimizer_type(data)
            if chosen != written and isinstance(chosen, str):
                data["name"] = f"{data.get('name', cls.model_fields['name'].default)}-{chosen}"
                if data.get("output_dir"):
                    data["output_dir"] = f"{str(data['output_dir']).rstrip('/')}-{chosen}"
        return cls.from_dict(data, source=str(path), check_paths=check_paths)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<config>", check_paths: bool = True) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a run config is a mapping (base, experts, suites, ...)")
        cfg = validate(cls, data, source)
        cfg.source = source
        if isinstance(cfg.generation, VLLMSettings) and cfg.basis.resident_device == "cuda":
            # the engine owns the GPU: its process places the basis itself (in_engine), or the host sums (shared_file)
            raise ConfigError(f"{source}: basis.storage: {cfg.basis.storage!r} does not combine with "
                              "generation.backend 'vllm' (the vLLM engine owns the GPU); use ram, compact or mmap")
        if isinstance(cfg.generation, VLLMSettings) and cfg.generation.vllm.weight_update == "in_engine" \
                and not cfg.basis.sums_like_masks:
            # the engine holds the mask layout, whose bits these layouts do not reproduce
            raise ConfigError(f"{source}: generation.vllm.weight_update: in_engine needs basis.storage ram or mmap "
                              f"(the engine's process sums with the mask layout), not {cfg.basis.storage!r}")
        if check_paths:
            cfg.check_paths()
        return cfg

    def check_paths(self) -> None:
        """Every model folder, data file and environment the run will read exists."""
        where = self.source
        for key, path in [("base", self.base), *((f"experts[{i}]", p) for i, p in enumerate(self.experts))]:
            if not Path(path).is_dir():
                raise ConfigError(f"{where}: key {key!r}: model folder {path} does not exist")
        for i, s in enumerate(self.suites):
            folders = {"chat.tokenizer": s.chat.tokenizer if s.chat else None,
                       "lm_eval.include_path": s.lm_eval.include_path if s.lm_eval else None}
            for key, folder in folders.items():
                if folder is not None and not Path(folder).is_dir():
                    raise ConfigError(f"{where}: key 'suites[{i}].{key}': folder {folder} does not exist")
            if s.lm_eval is not None and importlib.util.find_spec("lm_eval") is None:
                raise ConfigError(f"{where}: key 'suites[{i}].lm_eval' needs the lm-eval package: {LM_EVAL_HINT}")
            if s.dataset is not None and not Path(s.dataset).exists():
                raise ConfigError(f"{where}: key 'suites[{i}].dataset': {s.dataset} does not exist")
            serve = getattr(s.judge, "serve", None)  # an LLM judge served by vLLM, started by psomerge
            if serve is not None:
                try:
                    serve.check_paths(f"suites[{i}].judge.serve")
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
        if isinstance(self.generation, VLLMSettings):
            from psomerge.generation.vllm_env import vllm_python

            try:
                vllm_python(self.generation.vllm.python)
            except ConfigError as exc:
                raise ConfigError(f"{where}: generation.vllm.python: {exc}") from None


def _optimizer_type(data: dict[str, Any]) -> Any:
    """The optimizer a config (before validation) asks for, its preset's default where it names none."""
    default = "pso" if data.get("preset") == "paper" else PSOMERGE_OPTIMIZER
    section = data.get("optimizer")
    return section.get("type", default) if isinstance(section, dict) else default


class _OptimizerSection(StrictModel):
    optimizer: OptimizerChoice = PSOSettings()


def check_optimizer_overrides(overrides: dict[str, Any], source: str = "command line") -> None:
    """Validate ``optimizer.*`` overrides on their own, before any expensive work (e.g. before
    building the demo models a default config needs)."""
    section = {k: v for k, v in overrides.items() if k.startswith("optimizer.")}
    validate(_OptimizerSection, apply_overrides({}, section), source)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with dotted keys replaced (``{"optimizer.steps": 3}``); a section named by a
    dotted key is created where absent. The result is validated like the file itself."""
    out = dict(data)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[leaf] = value
    return out
