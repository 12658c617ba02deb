"""Wall time and peak memory of `psomerge merge` beside `mergekit-yaml` on the same recipes.

Builds (once, cached) a ~106M-parameter Llama base and three perturbed fp32 experts, then
runs each tool in its own process per recipe and reads that process's peak RSS from
wait4(). Usage:  .venv/bin/python benchmarks/static_merge.py [--methods linear,ties] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psomerge.presets.synthetic import llama_config, make_family  # noqa: E402
from psomerge.paths import data_dir  # noqa: E402

BIN = Path(sys.executable).parent
METHODS = {
    "linear": ({"weight": 1.0}, {}),
    "task_arithmetic": ({"weight": 0.5}, {}),
    "ties": ({"weight": 1.0, "density": 0.5}, {}),
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {}),
}


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024**2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    root = data_dir() / "bench" / "family-106m"
    if not (root / "expert2" / "config.json").exists():
        print("building a ~106M-parameter base and 3 experts (once) ...", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        make_family(root, 3, llama_config(hidden=768, layers=8, vocab=32000, intermediate=2048, heads=12), noise=0.002)
    base, experts = root / "base", [root / f"expert{i}" for i in range(3)]
    for f in root.rglob("*.safetensors"):  # warm the page cache for both tools alike
        f.read_bytes()

    have_mergekit = (BIN / "mergekit-yaml").exists()
    print(f"{'method':16} {'psomerge s':>10} {'GiB':>6} {'mergekit s':>10} {'GiB':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            params, top = METHODS[method]
            recipe = {"merge_method": method, "dtype": "float32",
                      "models": [{"model": str(e), "parameters": params} for e in experts]}
            if method != "linear":
                recipe["base_model"] = str(base)
            if top:
                recipe["parameters"] = top
            path = Path(tmp) / f"{method}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(run_measured([str(BIN / "psomerge"), "merge", str(path), "--out", f"{tmp}/ours-{method}"]))
                shutil.rmtree(f"{tmp}/ours-{method}")
                if have_mergekit:
                    theirs.append(run_measured([str(BIN / "mergekit-yaml"), str(path), f"{tmp}/mk-{method}",
                                                "--no-write-model-card"]))
                    shutil.rmtree(f"{tmp}/mk-{method}")
            o = min(ours)
            t = min(theirs) if theirs else (float("nan"), float("nan"))
            print(f"{method:16} {o[0]:10.1f} {o[1]:6.2f} {t[0]:10.1f} {t[1]:6.2f}", flush=True)
    if not have_mergekit:
        print("mergekit not installed: pip install '.[compare]' for the side-by-side column")


if __name__ == "__main__":
    main()
