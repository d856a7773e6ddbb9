"""The report's section on attribute combinations never seen in training (EVALUATE's "held_out")."""

from __future__ import annotations

from typing import Any

from .html import METRIC_NAMES, Html, Section, esc, fmt, table
from .inputs import ReportInputs

COLUMNS = ("w2", "mmd2_rbf", "fd", "one_nn_accuracy", "precision", "recall", "coverage")


def _row(name: str, n: Any, metrics: dict[str, Any] | None) -> list[Any]:
    if not metrics or "error" in metrics:
        return [name, fmt(n), *["—"] * len(COLUMNS)]
    return [name, fmt(n), *[fmt(metrics.get(c)) for c in COLUMNS]]


def section_held_out(inputs: ReportInputs) -> Section:
    """One table per never-seen combination: the model, the real-vs-real floor, the nearest seen combinations."""
    sec = Section("held-out", "Combinations never seen in training", "Held out")
    m = inputs.metrics
    if m is None:
        sec.add_missing("No metrics.json given (--metrics): nothing to say about held-out combinations.")
        return sec
    held = m.get("held_out") or {}
    if not held.get("combinations"):
        sec.add(Html("<p>Every attribute combination of the test cells was seen in training.</p>"))
        return sec
    names = ", ".join(held["combinations"])
    sec.add(
        Html(
            f"<p><strong>Never seen in training: {esc(names)}.</strong> The model generated these combinations "
            "from what it learnt about each attribute. Each is scored against half B of its real cells, at "
            "matched numbers of cells: the real-vs-real floor (half A) is the best any model can do; the real "
            "cells of the nearest seen combination (differing in one attribute) are what a model that only "
            "copies a neighbour would score. The other sections are about the seen combinations only.</p>"
        )
    )
    header = ["cells compared with real half B", "n", *[METRIC_NAMES.get(c, c) for c in COLUMNS]]
    for combo, entry in held.get("per_combination", {}).items():
        rows = [
            _row("generated (model)", entry["n_half"], entry.get("model")),
            _row("real half A (floor)", entry["n_half"], entry.get("floor")),
        ]
        for key, near in (entry.get("nearest") or {}).items():
            if not near or "real" not in near:
                rows.append([f"nearest seen, other {key}", "—", *["—"] * len(COLUMNS)])
                continue
            rows.append(_row(f"real {near['combination']} (seen, other {key})", near["n"], near["real"]))
            rows.append(_row(f"generated (model) at n = {near['n']}", near["n"], near["model"]))
        sec.add(Html(f"<h3>{esc(combo)} ({fmt(entry['n_real'])} real test cells)</h3>"))
        sec.add(table(header, rows, table_id=f"table-held-out-{len(sec.body)}"))
    for skip in held.get("skipped", []):
        sec.add_missing(f"{skip['combination']}: not scored ({skip['reason']}, {skip['n_real']} real cells).")
    return sec
