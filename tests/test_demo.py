"""The real demo experts: built once (cached under $PSOMERGE_HOME, default ./.psomerge)."""

import time

import pytest

from psomerge.paths import data_dir
from psomerge.merging.baselines import STATIC_BASELINES
from psomerge.pipeline import RunContext
from psomerge.presets.tiny import TinySpec, build_tiny, tiny_run_config
from psomerge.swarm import member_coefficients


@pytest.mark.slow
def test_demo_experts_beat_base_and_merging_is_meaningful():
    spec = TinySpec()
    assets = build_tiny(data_dir(), spec)
    ctx = RunContext(tiny_run_config(assets))
    try:
        b = ctx.basis
        rows = {label: ctx.evaluate(label, member_coefficients(b.k, b.num_groups, j)).heldout
                for j, label in enumerate(b.labels[: 1 + len(spec.tasks)])}
        rows.update({name: ctx.baseline(name).heldout for name in STATIC_BASELINES})
    finally:
        ctx.close()
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
    again = build_tiny(data_dir(), spec)
    assert time.perf_counter() - start < 1.0
    assert again.root == assets.root

    # held-out and optimisation examples never overlap
    for suite in ctx.suites:
        opt = {e.prompt for e in suite.split("optimisation")}
        held = {e.prompt for e in suite.split("heldout")}
        assert opt and held and not opt & held
