"""Per-task score tables with confidence intervals, and paired comparisons of the merge
against the best static merge and the best single expert."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from psomerge.evaluation.evaluate import EvalResult
from psomerge.evaluation.statistics import Comparison, bootstrap, paired_bootstrap
from psomerge.evaluation.suite import EvalSuite


def _weights(suites: Sequence[EvalSuite] | None, result: EvalResult) -> dict[str, float]:
    return {s.name: s.weight for s in suites} if suites else {n: 1.0 for n in result.scores}


def interval_text(result: EvalResult, weights: dict[str, float]) -> str:
    if not result.scored or any(not v for v in result.scored.values()):
        return "n/a"
    ci = bootstrap(result.scored, weights)
    return f"[{ci.low:.3f}, {ci.high:.3f}]"


def score_table(title: str, rows: Sequence[tuple[str, EvalResult]], suites: Sequence[EvalSuite] | None = None) -> Table:
    """Rows of per-suite scores, the weighted mean and its 95% bootstrap interval; the best
    score of each column in green. Column headers carry the suite weights when ``suites``
    are given."""
    names = [s.name for s in suites] if suites else list(rows[0][1].scores)
    headers = [f"{s.name} (w={s.weight:g})" for s in suites] if suites else names
    table = Table(title=title, title_justify="left")
    table.add_column("model", style="bold")
    for h in headers:
        table.add_column(h, justify="right")
    table.add_column("weighted mean", justify="right", style="bold")
    table.add_column("95% CI", justify="right")
    table.add_column("n", justify="right")
    best = {n: max(r.scores[n] for _, r in rows) for n in names}
    for label, result in rows:
        cells = [f"[green]{result.scores[n]:.3f}[/green]" if result.scores[n] == best[n] else f"{result.scores[n]:.3f}"
                 for n in names]
        table.add_row(label, *cells, f"{result.fitness:.3f}", interval_text(result, _weights(suites, result)),
                      str(result.num_examples))
    return table


def comparisons(rows: Sequence[tuple[str, EvalResult]], merged: str, suites: Sequence[EvalSuite] | None = None,
                expert_prefix: str = "expert:", skip: Sequence[str] = ("base",)) -> dict[str, tuple[str, Comparison]]:
    """The merge against the best single expert and the best static merge (by mean score on
    these rows), paired on the same examples: {"best expert": (label, comparison), ...}."""
    by_label = dict(rows)
    target = by_label[merged]
    weights = _weights(suites, target)
    groups = {
        "best expert": [lbl for lbl in by_label if lbl.startswith(expert_prefix)],
        "best static merge": [lbl for lbl in by_label if not lbl.startswith(expert_prefix) and lbl not in skip
                              and not lbl.startswith("psomerge:")],
    }
    out = {}
    for what, labels in groups.items():
        usable = [lbl for lbl in labels if by_label[lbl].scored and by_label[lbl].scored.keys() == target.scored.keys()]
        if not usable or not target.scored:
            continue
        rival = max(usable, key=lambda lbl: by_label[lbl].fitness)
        out[what] = (rival, paired_bootstrap(target.scored, by_label[rival].scored, weights))
    return out


def comparison_lines(found: dict[str, tuple[str, Comparison]], merged: str) -> list[str]:
    lines = []
    for what, (rival, c) in found.items():
        d = c.difference
        lines.append(f"{merged} - {what} ({rival}): {d.mean:+.3f}, 95% CI [{d.low:+.3f}, {d.high:+.3f}], "
                     f"P(not better) = {c.p_not_better:.3f} (paired bootstrap over the same examples)")
    return lines
