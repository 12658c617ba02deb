"""Progress a person can watch: what long work reports, and how the command line shows it."""

import io
import re

from rich.console import Console

from psomerge.cli import ConsoleProgress


class Recording:
    """A Progress that records every task started, its total and how far it advanced."""

    def __init__(self):
        self.tasks = []

    def start(self, what, total):
        task = {"what": what, "total": total, "done": 0, "closed": False}
        self.tasks.append(task)

        class Task:
            def advance(self, n=1):
                task["done"] += n

            def close(self):
                task["closed"] = True

        return Task()


def test_a_run_reports_particles_examples_masks_and_merges(tmp_path, char_family, monkeypatch):
    from psomerge.config import RunConfig
    from psomerge.pipeline import run_swarm

    root, experts, data = char_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    cfg = RunConfig.from_dict({
        "name": "watched", "preset": "paper", "base": str(root / "base"), "experts": [str(e) for e in experts],
        "suites": [{"name": n, "dataset": str(p), "optimisation_size": 10, "heldout_size": 12,
                    "judge": {"type": "exact_match", "normalizer": "none"}} for n, p in data.items()],
        "generation": {"max_new_tokens": 6, "batch_size": 64},
        "optimizer": {"type": "pso", "steps": 1}, "baselines": ["ties"], "output_dir": str(tmp_path / "run")})
    progress = Recording()
    run_swarm(cfg, progress=progress)
    by_name = {t["what"]: t for t in progress.tasks}
    particles = [t for t in progress.tasks if t["what"].startswith("step ")]
    assert [t["what"] for t in particles] == ["step 0: particles", "step 1: particles"]
    assert all(t["total"] == t["done"] == 2 * len(experts) + 1 and t["closed"] for t in particles)
    masks = [t for t in progress.tasks if t["what"].startswith("DARE masks of ")]
    assert len(masks) == len(experts) and all(t["done"] == t["total"] > 0 for t in masks)
    assert by_name["merging ties"]["done"] == by_name["merging ties"]["total"] > 0
    heldout = [t for t in progress.tasks if t["what"] == "scoring the heldout split"]
    assert heldout and all(t["total"] == t["done"] == 12 * len(data) for t in heldout)


def test_console_progress_shows_counts_and_eta():
    """Not on a terminal (CI logs, output to a file): timed lines with done/total, rate and
    ETA, and a last line when the task ends. On a terminal: rich bars carrying their totals."""
    out = io.StringIO()
    with ConsoleProgress(Console(file=out, force_terminal=False, width=200), every=0) as progress:
        task = progress.start("step 0: particles", 7)
        for _ in range(3):
            task.advance()
        task.close()
    lines = [line for line in out.getvalue().splitlines() if "step 0: particles" in line]
    assert len(lines) >= 3
    assert re.search(r"1/7\b.*ETA", lines[0]) and re.search(r"3/7\b", lines[-1])

    terminal = io.StringIO()
    with ConsoleProgress(Console(file=terminal, force_terminal=True, width=200)) as progress:
        task = progress.start("scoring the heldout split", 40)
        task.advance(10)
        bar = progress.bars.tasks[0]
        assert (bar.description, bar.total, bar.completed) == ("scoring the heldout split", 40, 10)
        task.close()
