"""Budget study: held-out quality of each search at about 40, 100 and 200 fitness
evaluations, beside every static merge and every expert, on a preset's experts.

Each (method, seed) runs once to the largest budget; its result at a smaller budget is what
it had found within that many evaluations (every search here is anytime: PSO, Model Swarms,
CMA-ES and random search by construction, the task-arithmetic grid because it visits its
points coarse to fine). An evaluation is a distinct particle this run asked for, whether the
shared cache had it or not, so seeds and methods are charged alike. Methods:

  paper         PSO-Merging as published (2N+1 one-hot particles, w=0.2, c1=c2=2, the judge)
  paper_racing  the same search with racing (each particle against its personal best): what
                racing saves at equal quality
  psomerge      psomerge's default search (preset psomerge: CMA-ES from warm starts at the
                static merges, racing against the best so far, model selection on the
                validation split); psomerge_no_racing  the same without racing
  psomerge_local  the same with CMA-ES's initial step 0.1 (0.3 by default): a local search
                around the best warm start
  psomerge_mixed  the same with exact match + answer likelihood (weights 1, 1) as fitness
  psomerge_pso  the same with PSO as its optimiser, and racing; psomerge_pso_no_racing without racing
  model_swarms  Model Swarms, cmaes  CMA-ES, random  random search, ta_grid  task-arithmetic
                scale grid (these four with the same fitness as paper, no warm start)

Usage: .venv/bin/python benchmarks/search_quality.py --preset tiny [--methods paper,psomerge]
       [--budgets 40,100,200] [--seeds 3] [--json out.json]
       .venv/bin/python benchmarks/search_quality.py --combine a.json b.json   (one table of several)
The held-out split is read only by the final evaluation of each result; nothing is tuned on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psomerge.orchestration.settings import apply_defaults  # noqa: E402

apply_defaults()

from psomerge.evaluation.statistics import bootstrap, paired_bootstrap  # noqa: E402
from psomerge.paths import data_dir  # noqa: E402
from psomerge.pipeline import InProcessScoring, RunContext, run_pipeline  # noqa: E402
from psomerge.swarm import member_coefficients  # noqa: E402
from psomerge.swarm.selection import choose, selection_candidates  # noqa: E402
from psomerge.swarm.warm_start import warm_starts  # noqa: E402

METHODS = ("paper", "paper_racing", "psomerge", "psomerge_no_racing", "psomerge_local", "psomerge_mixed",
           "psomerge_pso", "psomerge_pso_no_racing", "model_swarms", "cmaes", "random",
           "ta_grid")


@dataclass
class Evaluation:
    position: np.ndarray
    fitness: float
    examples: int
    raced: bool


@dataclass
class Recorder(InProcessScoring):
    """InProcessScoring that records every distinct particle a run asks for, in order."""

    log: list[Evaluation] = field(default_factory=list)

    def __init__(self, config, context):
        super().__init__(config, context)
        self.log = []
        self._seen: set[str] = set()

    def score(self, positions, targets, progress=None):
        results = super().score(positions, targets, progress)
        for x, r in zip(positions, results):
            key = self.context.evaluator.fitness_key(x)
            if key in self._seen:
                continue  # a particle asked for again (PSO's global best standing still) costs nothing
            self._seen.add(key)
            # a cache hit costs what the first scoring cost (a raced one's kept partial result)
            cached = self.context.evaluator.cache.get(key) or self.context.evaluator.cache.get(key + ":partial")
            examples = r.examples if r.scored else int(cached.meta.get("examples", 0)) if cached else 0
            self.log.append(Evaluation(np.asarray(x), r.fitness, examples, r.raced))
        return results

    def close(self):
        pass  # the context is shared by every run of the study


def method_config(base: dict, method: str, budget: int, seed: int) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["name"] = f"study-{cfg['name']}-{method}-s{seed}"
    k_steps = 1000  # budgets stop the searches, not steps
    if method == "paper":
        cfg.update(preset="paper", optimizer={"type": "pso", "steps": k_steps, "seed": seed},
                   warm_start=None, racing=None, selection=None)
        for s in cfg["suites"]:
            s.pop("fitness", None)
    elif method == "paper_racing":  # the paper's search and fitness, raced (preset psomerge allows racing)
        cfg.update(preset="psomerge", optimizer={"type": "pso", "steps": k_steps, "seed": seed},
                   warm_start=None, racing={}, selection=None)
        for s in cfg["suites"]:
            s.pop("fitness", None)
    elif method in ("psomerge", "psomerge_no_racing"):  # the preset's default: CMA-ES from the warm starts
        cfg["optimizer"] = {"type": "cmaes", "budget": budget, "seed": seed}
        cfg["racing"] = {} if method == "psomerge" else None
    elif method == "psomerge_local":  # the same, searching closer to the best warm start (CMA-ES step 0.1)
        cfg["optimizer"] = {"type": "cmaes", "budget": budget, "seed": seed, "sigma0": 0.1}
    elif method == "psomerge_mixed":  # the same, with the smooth fitness: exact match + answer likelihood
        cfg["optimizer"] = {"type": "cmaes", "budget": budget, "seed": seed}
        for s in cfg["suites"]:
            s["fitness"] = [{"scorer": "judge", "weight": 1.0},
                            {"scorer": {"type": "answer_likelihood"}, "weight": 1.0}]
    elif method in ("psomerge_pso", "psomerge_pso_no_racing"):  # PSO from the warm starts; the racing ablation
        cfg["optimizer"] = {"type": "pso", "steps": k_steps, "seed": seed}
        cfg["racing"] = {} if method == "psomerge_pso" else None
    else:
        optimizer = {"model_swarms": {"type": "model_swarms", "steps": k_steps, "early_stop": 10**6},
                     "cmaes": {"type": "cmaes", "budget": budget}, "random": {"type": "random", "budget": budget},
                     "ta_grid": {"type": "ta_grid", "budget": budget}}[method]
        cfg.update(preset="psomerge", optimizer={**optimizer, "seed": seed}, warm_start=None, racing=None,
                   selection=None)
        for s in cfg["suites"]:
            s.pop("fitness", None)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--budgets", default="40,100,200")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                    help="print one table from the --json files of several studies, and exit")
    ap.add_argument("--spec", default="{}", help="preset build settings as JSON (TinySpec / SmolSpec fields)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a run-config key for every method, e.g. basis.granularity='\"layer\"'; "
                         "suites.*.KEY sets KEY in every suite")
    args = ap.parse_args()
    if args.combine:
        print_table(combine(args.combine))
        return
    budgets = [int(b) for b in args.budgets.split(",")]
    from psomerge.config import RunConfig

    base = base_config(args.preset, args.spec)
    base = with_settings(base, args.set)
    max_budget = max(budgets)
    results: dict = {"preset": args.preset, "budgets": budgets, "seeds": args.seeds, "methods": {}, "rows": {}}
    contexts: dict[str, RunContext] = {}
    reference = None
    for method in args.methods.split(","):
        for seed in range(args.seeds):
            if method == "ta_grid" and seed > 0:
                continue  # deterministic: one run
            cfg = RunConfig.from_dict(method_config(base, method, max_budget, seed), source=f"<study {method}>")
            key = cfg.model_dump_json(include={"base", "experts", "suites", "basis", "generation", "warm_start",
                                               "racing"})
            if key not in contexts:
                contexts[key] = RunContext(cfg)
            ctx = contexts[key]
            reference = reference or ctx
            recorder = Recorder(cfg, ctx)
            started = time.perf_counter()
            _run_until(cfg, recorder, max_budget)
            seconds = time.perf_counter() - started
            for b in budgets:
                within = recorder.log[:b]
                chosen = _choose(cfg, ctx, within)
                held = ctx.evaluator.evaluate(chosen, "heldout")
                validation = ctx.evaluator.evaluate(chosen, "validation").fitness if ctx.has_validation else None
                entry = results["methods"].setdefault(method, {}).setdefault(str(b), [])
                entry.append({"seed": seed, "heldout": held.fitness, "validation": validation, "scores": held.scores,
                              "scored": held.scored,
                              "evaluations": len(within), "examples": sum(e.examples for e in within),
                              "search_fitness": max((e.fitness for e in within if not e.raced), default=None),
                              "coefficients": chosen.tolist(), "seconds": seconds})
            print(f"{method:13s} seed {seed}: " + "  ".join(
                f"@{b}: {results['methods'][method][str(b)][-1]['heldout']:.3f}" for b in budgets)
                + f"  ({seconds:.0f}s, {len(recorder.log)} evaluations)", flush=True)
            if args.json:  # after every run: an interrupted study keeps the runs it finished
                _write(args.json, results, reference, base)
    if not results["rows"]:
        _reference_rows(results, reference, base)
        results["weights"] = {s.name: s.weight for s in reference.suites}
    print_table(results)
    if args.json:
        _write(args.json, results, reference, base)


def _write(path: Path, results: dict, reference: RunContext, base: dict) -> None:
    """The study so far as JSON (the reference rows scored once, on the first write)."""
    if not results["rows"]:
        _reference_rows(results, reference, base)
        results["weights"] = {s.name: s.weight for s in reference.suites}
    path.write_text(json.dumps(results))


def base_config(preset: str, spec: str = "{}") -> dict:
    """The preset's run config (its experts built first, cached), as a dict."""
    if preset == "tiny":
        from psomerge.presets.tiny import TinySpec, build_tiny, tiny_run_config

        return tiny_run_config(build_tiny(data_dir(), TinySpec(**json.loads(spec)))).model_dump(mode="json")
    from psomerge.presets.smollm2 import SmolSpec, build_smollm2, smollm2_run_config

    smol = SmolSpec(**json.loads(spec))
    return smollm2_run_config(build_smollm2(data_dir(), smol), smol).model_dump(mode="json")


def with_settings(config: dict, settings: list[str]) -> dict:
    """``config`` with KEY=JSON overrides applied (``suites.*.KEY`` in every suite)."""
    from psomerge.config import apply_overrides

    for item in settings:
        key, _, value = item.partition("=")
        parsed = json.loads(value)
        if key.startswith("suites.*."):
            config = {**config, "suites": [apply_overrides(s, {key[len("suites.*."):]: parsed})
                                           for s in config["suites"]]}
        else:
            config = apply_overrides(config, {key: parsed})
    return config


def _run_until(cfg, recorder: Recorder, budget: int) -> None:
    """Run the search until it has asked for ``budget`` distinct particles."""
    class Enough(Exception):
        pass

    original = recorder.score

    def score(positions, targets, progress=None):
        results = original(positions, targets, progress)
        if len(recorder.log) >= budget:
            raise Enough
        return results

    recorder.score = score
    try:
        run_pipeline(cfg, scoring=recorder, evaluate_heldout=False)
    except Enough:
        pass
    finally:
        recorder.score = original


def _choose(cfg, ctx: RunContext, within: list[Evaluation]) -> np.ndarray:
    """What the method returns at this budget: its best particle by search fitness, or, with
    model selection, the best on the validation split among the candidates a run would have."""
    complete = [(e.position, e.fitness) for e in within if not e.raced]
    if cfg.selection is None or not ctx.has_validation:
        return max(complete, key=lambda e: e[1])[0]
    info = ctx.info()
    starts = warm_starts(cfg.warm_start, info.k, info.groups, info.n_experts)
    picked = selection_candidates(complete, starts, cfg.selection)
    validation = [ctx.evaluator.evaluate(x, "validation").fitness for x, _, _ in picked]
    return picked[choose([f for _, f, _ in picked], validation)][0]


def _reference_rows(results: dict, ctx: RunContext, base: dict) -> None:
    """Base, experts and every static merge, held out."""
    info = ctx.info()
    for j, label in enumerate(info.labels[: 1 + info.n_experts]):
        r = ctx.evaluator.evaluate(member_coefficients(info.k, info.groups, j), "heldout")
        results["rows"][label] = {"heldout": r.fitness, "scores": r.scores, "scored": r.scored}
    for name in base.get("baselines", []):
        r = ctx.baseline(name).heldout
        results["rows"][name] = {"heldout": r.fitness, "scores": r.scores, "scored": r.scored}


def combine(paths: list[Path]) -> dict:
    """One study from several (e.g. methods run in separate processes over the same preset):
    the reference rows of the first, every (method, budget) of each; where two files have the
    same (method, budget) the later one's runs are kept, so a run to a larger budget adds its
    rows without dropping a smaller budget that only an earlier file measured."""
    parts = [json.loads(p.read_text()) for p in paths]
    out = parts[0]
    for part in parts[1:]:
        if part["rows"].keys() != out["rows"].keys() or part["preset"] != out["preset"]:
            raise SystemExit(f"cannot combine studies of other presets or rows: {paths}")
        for method, by_budget in part["methods"].items():
            out["methods"].setdefault(method, {}).update(by_budget)
    for method, by_budget in out["methods"].items():
        out["methods"][method] = dict(sorted(by_budget.items(), key=lambda item: int(item[0])))
    return out


def print_table(results: dict) -> None:
    weights = results["weights"]
    suites = list(weights)
    print(f"\nheld-out weighted mean, {results['preset']} preset; searches: mean over seeds (sd), 95% bootstrap "
          "CI over examples of the seed-averaged scores; evaluations and examples scored (mean over seeds)")
    print(f"{'row':22s} {'budget':>6s} " + " ".join(f"{s:>10s}" for s in suites)
          + f" {'mean':>7s} {'sd':>6s} {'95% CI':>15s} {'evals':>6s} {'examples':>9s}")
    for label, r in results["rows"].items():
        ci = bootstrap(r["scored"], weights)
        print(f"{label:22s} {'':>6s} " + " ".join(f"{r['scores'][s]:10.3f}" for s in suites)
              + f" {r['heldout']:7.3f} {'':>6s} [{ci.low:.3f}, {ci.high:.3f}]")
    best_static = max((lbl for lbl in results["rows"] if not lbl.startswith(("expert:", "base"))),
                      key=lambda lbl: results["rows"][lbl]["heldout"], default=None)
    best_expert = max((lbl for lbl in results["rows"] if lbl.startswith("expert:")),
                      key=lambda lbl: results["rows"][lbl]["heldout"])
    for method, by_budget in results["methods"].items():
        for b, runs in by_budget.items():
            avg = {s: np.mean([r["scored"][s] for r in runs], axis=0).tolist() for s in suites}
            ci = bootstrap(avg, weights)
            values = [r["heldout"] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{method:22s} {b:>6s} " + " ".join(f"{np.mean(avg[s]):10.3f}" for s in suites)
                  + f" {statistics.mean(values):7.3f} {sd:6.3f} [{ci.low:.3f}, {ci.high:.3f}]"
                  + f" {statistics.mean(r['evaluations'] for r in runs):6.0f}"
                  + f" {statistics.mean(r['examples'] for r in runs):9.0f}"
                  + (f"  validation {statistics.mean(r['validation'] for r in runs):.3f}"
                     if all(r.get("validation") is not None for r in runs) else ""))
            for rival in (best_static, best_expert):
                if rival is None:
                    continue
                c = paired_bootstrap(avg, results["rows"][rival]["scored"], weights)
                d = c.difference
                print(f"{'':22s} {'':>6s}   vs {rival}: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}], "
                      f"P(not better) {c.p_not_better:.3f}")


if __name__ == "__main__":
    main()
