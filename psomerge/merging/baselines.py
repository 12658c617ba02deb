"""The static baselines every report compares against, as mergekit-style recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psomerge.errors import ConfigError
from psomerge.hashing import digest
from psomerge.merging.recipe import MergeRecipe
from psomerge.progress import SILENT, Progress

MERGE_CODE_VERSION = "2"  # bump when static merge outputs change for the same recipe

# One recipe per baseline, with settings common in the merging literature for a handful of
# experts: task-arithmetic scale 0.7, TIES keeping 50%, DARE keeping 30%, DELLA 40% +- 10%.
STATIC_BASELINES: dict[str, dict[str, Any]] = {
    "average": {"merge_method": "linear", "weight": 1.0},
    "task_arithmetic": {"merge_method": "task_arithmetic", "weight": 0.7},
    "ties": {"merge_method": "ties", "weight": 1.0, "density": 0.5, "lambda": 1.0},
    "dare_linear": {"merge_method": "dare_linear", "weight": 0.7, "density": 0.3},
    "dare_ties": {"merge_method": "dare_ties", "weight": 1.0, "density": 0.3},
    "della": {"merge_method": "della", "weight": 1.0, "density": 0.4, "epsilon": 0.1, "lambda": 1.0},
}


def baseline_recipe(name: str, base: Path, experts: list[Path], seed: int = 0,
                    tokenizer_source: str | None = None) -> MergeRecipe:
    if name not in STATIC_BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; known: {', '.join(STATIC_BASELINES)}")
    spec = dict(STATIC_BASELINES[name])
    method = spec.pop("merge_method")
    lam = spec.pop("lambda", None)
    data: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(p), "parameters": dict(spec)} for p in experts],
        "seed": seed,
    }
    if method != "linear":
        data["base_model"] = str(base)
    if lam is not None:
        data["parameters"] = {"lambda": lam}
    if tokenizer_source is not None:
        data["tokenizer_source"] = tokenizer_source
    return MergeRecipe.from_dict(data, source=f"<baseline {name}>")


def baseline_checkpoint(name: str, base: Path, experts: list[Path], seed: int, root: Path,
                        tokenizer_source: str | None = None, progress: Progress = SILENT) -> Path:
    """The baseline merged into ``root/<name>/<tag>`` (once). The tag covers the recipe, the
    content of base and experts (weights, config, tokenizer; an adapter's files) and the merge
    code's version, so a stale merge is never reused: an expert retrained in place gets a new
    merge. (Merges of earlier versions stay until removed: ``root`` may be shared by runs.)"""
    from psomerge.io import Checkpoint, open_model
    from psomerge.merging.engine import run_merge

    recipe = baseline_recipe(name, base, experts, seed, tokenizer_source)
    base_model = Checkpoint(base, name=str(base))
    contents = [base_model.fingerprint(), *(open_model(p, base=base_model).fingerprint() for p in experts)]
    out = Path(root) / name / digest([recipe.model_dump_json(), contents, MERGE_CODE_VERSION], 6)
    if not (out / "config.json").exists():
        task = progress.start(f"merging {name}", len(base_model.tensor_names))
        try:
            run_merge(recipe, out, on_tensor=lambda _: task.advance())
        finally:
            task.close()
    return out
