"""The static-merge demo: build the demo experts, merge them with every static method,
and evaluate base, experts and merges on the held-out split of every eval suite."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from psomerge.demo.build import DemoAssets, DemoSpec, build_demo
from psomerge.evalsuite import EvalSuite, Split
from psomerge.evaluation import EvalResult, evaluate
from psomerge.judges import ExactMatch
from psomerge.judges.generation import TransformersGenerator
from psomerge.merging.engine import run_merge
from psomerge.merging.baselines import STATIC_BASELINES, baseline_recipe

OPTIMISATION_SIZE = 60
MAX_NEW_TOKENS = 10

def demo_suites(assets: DemoAssets) -> list[EvalSuite]:
    return [
        EvalSuite.from_file(
            name,
            path,
            prompt_template="{question}",
            answer_field="answer",
            id_field="id",
            scorer=ExactMatch("none"),
            optimisation_size=OPTIMISATION_SIZE,
        )
        for name, path in assets.datasets.items()
    ]


@dataclass
class DemoReport:
    assets: DemoAssets
    suites: list[EvalSuite]
    rows: list[tuple[str, EvalResult]]


def evaluate_folder(path: Path, suites: list[EvalSuite], split: Split) -> EvalResult:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    return evaluate(TransformersGenerator(model, tokenizer, batch_size=256, max_new_tokens=MAX_NEW_TOKENS), suites, split)


def run_static_demo(
    data_dir: Path,
    spec: DemoSpec = DemoSpec(),
    split: Split = "heldout",
    on_build_progress=None,
    on_stage=None,
) -> DemoReport:
    assets = build_demo(data_dir, spec, on_build_progress)
    suites = demo_suites(assets)
    stage = on_stage or (lambda msg: None)
    rows: list[tuple[str, EvalResult]] = []
    stage("evaluating base and experts")
    rows.append(("base", evaluate_folder(assets.base, suites, split)))
    for name, path in assets.experts.items():
        rows.append((f"expert:{name}", evaluate_folder(path, suites, split)))
    experts = list(assets.experts.values())
    for name in STATIC_BASELINES:
        stage(f"merging and evaluating {name}")
        out = assets.root / "merged" / name
        run_merge(baseline_recipe(name, assets.base, experts, spec.seed), out)
        rows.append((name, evaluate_folder(out, suites, split)))
    return DemoReport(assets, suites, rows)


def demo_run_config(assets: DemoAssets, optimizer: str = "pso", steps: int = 5, name: str | None = None,
                    baselines: list[str] | None = None):
    """The swarm run config for the demo experts (what configs/demo.yaml spells out)."""
    return preset_run_config(
        assets, name=name or f"demo-{optimizer}", model_name="psomerge-demo",
        suite={"prompt_template": "{question}", "judge": {"type": "exact_match", "normalizer": "none"},
               "optimisation_size": OPTIMISATION_SIZE},
        generation={"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 256},
        optimizer=optimizer, steps=steps, baselines=baselines, source="<demo>")


def preset_run_config(assets: DemoAssets, *, name: str, model_name: str, suite: dict, generation: dict,
                      optimizer: str, steps: int, baselines: list[str] | None, source: str):
    """A run config over a built preset: one suite per expert's dataset, with ``suite``'s
    settings (prompt, judge, split size) shared by all."""
    from psomerge.config import RunConfig

    registry: dict = {"model_name": model_name}
    if baselines is not None:
        registry["baselines"] = baselines
    return RunConfig.from_dict({
        "name": name,
        "base": str(assets.base),
        "experts": [str(p) for p in assets.experts.values()],
        "suites": [{"name": n, "dataset": str(p), "answer_field": "answer", "id_field": "id", **suite}
                   for n, p in assets.datasets.items()],
        "generation": generation,
        "optimizer": {"type": optimizer, "steps": steps},
        "registry": registry,
    }, source=source)
