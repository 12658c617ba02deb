"""The real demo experts: built once (cached under $PSOMERGE_HOME, default ./.psomerge)."""

import time

import pytest

from psomerge.demo.build import DemoSpec, build_demo
from psomerge.demo.run import STATIC_BASELINES, run_static_demo
from psomerge.paths import data_dir


@pytest.mark.slow
def test_demo_experts_beat_base_and_merging_is_meaningful():
    spec = DemoSpec()
    report = run_static_demo(data_dir(), spec, split="heldout")
    rows = dict(report.rows)
    base = rows["base"]
    for task in spec.tasks:
        expert = rows[f"expert:{task}"]
        # each expert clearly beats the base on its own task
        assert expert.scores[task] >= base.scores[task] + 0.2, (task, expert.scores, base.scores)
    # a plain average of the experts does not collapse to ~0 on every task
    assert max(rows["average"].scores.values()) >= 0.2, rows["average"].scores
    assert set(STATIC_BASELINES) <= set(rows)

    # the second build is a cache hit
    start = time.perf_counter()
    again = build_demo(data_dir(), spec)
    assert time.perf_counter() - start < 1.0
    assert again.root == report.assets.root

    # held-out and optimisation examples never overlap
    for suite in report.suites:
        opt = {e.prompt for e in suite.split("optimisation")}
        held = {e.prompt for e in suite.split("heldout")}
        assert opt and held and not opt & held
