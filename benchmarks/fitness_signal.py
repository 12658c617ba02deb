"""Does a smooth fitness predict held-out exact match better than exact match on the search
split? Over the particles one search visits, rank correlation (Spearman) between each search
signal (measured on the optimisation split only) and the particles' held-out exact match.

Signals: ``judge`` (exact match, the paper's fitness), ``likelihood`` (answer_likelihood,
mean token probability of the reference), ``mixed`` (judge + likelihood, weight 1 each), and
``judge+validation`` (exact match on optimisation + validation splits: the same kind of
signal from twice the examples, for scale). The held-out split is read only to measure.

Usage: .venv/bin/python benchmarks/fitness_signal.py --preset tiny [--budget 40] [--method paper]
       [--spec JSON] [--set KEY=JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import Recorder, _run_until, base_config, method_config, with_settings  # noqa: E402

from psomerge.config import RunConfig  # noqa: E402
from psomerge.evaluation.statistics import rank_correlation  # noqa: E402
from psomerge.pipeline import RunContext  # noqa: E402

LIKELIHOOD = {"type": "answer_likelihood"}
SIGNALS = {"judge": [{"scorer": "judge", "weight": 1}],
           "likelihood": [{"scorer": LIKELIHOOD, "weight": 1}],
           "mixed": [{"scorer": "judge", "weight": 1}, {"scorer": LIKELIHOOD, "weight": 1}]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--method", default="paper")
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spec", default="{}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    args = ap.parse_args()
    base = with_settings(base_config(args.preset, args.spec), args.set)
    cfg = RunConfig.from_dict(method_config(base, args.method, args.budget, args.seed), source="<signal study>")
    search = RunContext(cfg)
    recorder = Recorder(cfg, search)
    _run_until(cfg, recorder, args.budget)
    particles = [e.position for e in recorder.log if not e.raced][: args.budget]

    signals: dict[str, list[float]] = {}
    for name, terms in SIGNALS.items():
        data = json.loads(json.dumps(base))
        data.update(name=f"signal-{name}", preset="psomerge", warm_start=None, racing=None, selection=None)
        for s in data["suites"]:
            s["fitness"] = terms
        ctx = RunContext(RunConfig.from_dict(data, source=f"<signal {name}>"))
        signals[name] = [ctx.evaluator(x).fitness for x in particles]
        ctx.close()
    if search.has_validation:
        weights = {s.name: s.weight for s in search.suites}
        both = []
        for x in particles:
            opt, val = search.evaluator.evaluate(x, "optimisation"), search.evaluator.evaluate(x, "validation")
            n = {s: len(opt.scored[s]) + len(val.scored[s]) for s in weights}
            both.append(sum(weights[s] * (sum(opt.scored[s]) + sum(val.scored[s])) / n[s] for s in weights)
                        / sum(weights.values()))
        signals["judge+validation"] = both
    heldout = [search.evaluator.evaluate(x, "heldout").fitness for x in particles]
    search.close()

    print(f"\n{args.preset} preset, {len(particles)} particles of one {args.method} search (seed {args.seed}); "
          f"held-out exact match {min(heldout):.3f}-{max(heldout):.3f}")
    print(f"{'search signal':18s} {'Spearman vs held-out EM':>24s} {'distinct values':>16s}")
    for name, values in signals.items():
        print(f"{name:18s} {rank_correlation(values, heldout):24.3f} {len(set(np.round(values, 9))):16d}")


if __name__ == "__main__":
    main()
