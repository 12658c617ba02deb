"""Orchestration overhead and warm-cache reruns on the demo experts.

In one command, each in its own process with its own fresh data directory (cold caches):
  library: psomerge.pipeline.run_swarm (search + held-out rows + merged model written)
  flow:    the Prefect flow pso_merge (the same work, plus MLflow tracking, registration and
           the promotion gate), timed after the temporary Prefect server is up and the MLflow
           store exists; those one-time costs are reported apart
  rerun:   the flow again on the same data directory (warm fitness and Prefect caches)
PSO over K = 7 (7 particles a step), no static baselines.

Usage: .venv/bin/python benchmarks/orchestration.py [--steps 5]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import json, sys, time
mode, config_path = sys.argv[1], sys.argv[2]
if mode == "library":
    from psomerge.pipeline import run_swarm
    from psomerge.config import RunConfig
    t = time.perf_counter()
    run = run_swarm(RunConfig.load(config_path))
    print("RESULT" + json.dumps({"seconds": time.perf_counter() - t, "scorings": run.counts.scorings}))
else:
    from psomerge.orchestration.settings import apply_defaults
    apply_defaults()  # before Prefect is imported
    from prefect import flow
    from psomerge.orchestration.flows import run_flow
    @flow
    def warm_up():
        return 1
    from psomerge.tracking import registry as tracking
    t = time.perf_counter()
    warm_up()  # starts the temporary Prefect server
    out = {"startup": time.perf_counter() - t}
    t = time.perf_counter()
    tracking.configure("psomerge")  # creates the MLflow store (schema migrations), once per store
    out["mlflow_init"] = time.perf_counter() - t
    for i in range(int(sys.argv[3])):
        t = time.perf_counter()
        s = run_flow(config_path)
        out[f"run{i}"] = time.perf_counter() - t
        out[f"scorings{i}"] = s.counts.scorings
    print("RESULT" + json.dumps(out))
"""


def child(mode: str, config: Path, home: Path, runs: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PSOMERGE_HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(config), str(runs)], env=env,
                         capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(f"{mode} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT"))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    steps = ap.parse_args().steps
    from psomerge.paths import data_dir
    from psomerge.presets.tiny import build_tiny, tiny_run_config

    assets = build_tiny(data_dir())
    cfg = tiny_run_config(assets, "pso", steps, name="bench", baselines=[]).model_dump(mode="json")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "bench.yaml"
        path.write_text(yaml.safe_dump(cfg))
        lib = child("library", path, tmp / "lib-home")
        flow = child("flow", path, tmp / "flow-home", runs=2)
    overhead = flow["run0"] / lib["seconds"] - 1
    print(f"PSO-Merging on the demo experts, {steps} steps, {7 * (steps + 1)} particles, cold caches "
          f"({lib['scorings']} scorings)")
    print(f"  library run_swarm            : {lib['seconds']:6.1f} s")
    print(f"  Prefect flow pso_merge       : {flow['run0']:6.1f} s  ({overhead:+.1%} vs library; "
          f"{flow['scorings0']} scorings)")
    print(f"  one-time costs, not in the row above: temporary Prefect server start {flow['startup']:.1f} s, "
          f"MLflow store creation {flow['mlflow_init']:.1f} s")
    print(f"  flow rerun, warm caches      : {flow['run1']:6.1f} s  ({flow['run1'] / flow['run0']:.1%} of the first; "
          f"{flow['scorings1']} scorings)")


if __name__ == "__main__":
    main()
