"""Per-task score tables: one row per model (base, experts, baselines, merges)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from psomerge.evaluation.evaluate import EvalResult
from psomerge.evaluation.suite import EvalSuite


def score_table(title: str, rows: Sequence[tuple[str, EvalResult]], suites: Sequence[EvalSuite] | None = None) -> Table:
    """Rows of per-suite scores and the weighted mean; the best score of each column in green.
    Column headers carry the suite weights when ``suites`` are given."""
    names = [s.name for s in suites] if suites else list(rows[0][1].scores)
    headers = [f"{s.name} (w={s.weight:g})" for s in suites] if suites else names
    table = Table(title=title, title_justify="left")
    table.add_column("model", style="bold")
    for h in headers:
        table.add_column(h, justify="right")
    table.add_column("weighted mean", justify="right", style="bold")
    best = {n: max(r.scores[n] for _, r in rows) for n in names}
    for label, result in rows:
        cells = [f"[green]{result.scores[n]:.3f}[/green]" if result.scores[n] == best[n] else f"{result.scores[n]:.3f}"
                 for n in names]
        table.add_row(label, *cells, f"{result.fitness:.3f}")
    return table
