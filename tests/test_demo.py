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
        # each expert beats the base on its own task, beyond the noise of 120 held-out examples
        assert expert.scores[task] >= base.scores[task] + 0.05, (task, expert.scores, base.scores)
    # merging is meaningful: every static merge keeps something of each expert (none collapses
    # on a task below the base), and the best static merge beats every single expert on the mean
    for name in STATIC_BASELINES:
        assert all(rows[name].scores[t] >= base.scores[t] - 0.1 for t in spec.tasks), (name, rows[name].scores)
    best_static = max(rows[name].fitness for name in STATIC_BASELINES)
    assert best_static > max(rows[f"expert:{t}"].fitness for t in spec.tasks) + 0.02
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
