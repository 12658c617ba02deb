"""Per-task score tables: one row per model (base, experts, baselines, merges)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from psomerge.evalsuite import EvalSuite
from psomerge.evaluation import EvalResult


def score_table(title: str, rows: Sequence[tuple[str, EvalResult]], suites: Sequence[EvalSuite]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("model", style="bold")
    for s in suites:
        table.add_column(f"{s.name} (w={s.weight:g})", justify="right")
    table.add_column("weighted mean", justify="right", style="bold")
    best = {s.name: max(r.scores[s.name] for _, r in rows) for s in suites}
    for label, result in rows:
        cells = []
        for s in suites:
            v = result.scores[s.name]
            cells.append(f"[green]{v:.3f}[/green]" if v == best[s.name] else f"{v:.3f}")
        table.add_row(label, *cells, f"{result.fitness:.3f}")
    return table


def rows_as_records(rows: Sequence[tuple[str, EvalResult]]) -> list[dict]:
    return [{"model": label, **r.scores, "weighted_mean": r.fitness} for label, r in rows]
