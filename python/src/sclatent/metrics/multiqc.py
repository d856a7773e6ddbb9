"""MultiQC custom content: metrics as a `*_mqc.tsv` table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def _mqc_rows(metrics: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Table rows (name, {column: value}) from an `evaluate`, `aggregate_replicates` or flat metrics dict."""

    def value(v: Any) -> Any:
        return v.get("mean") if isinstance(v, Mapping) else v

    def sem_columns(entries: Mapping[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for m, v in entries.items():
            if isinstance(v, Mapping):
                row[m] = v.get("mean")
                row[f"{m}_sem"] = v.get("sem")
            elif m != "n_classes":
                row[m] = v
        return row

    if "overall" not in metrics:  # flat dict, e.g. reconstruction_metrics
        return [("metrics", {m: v for m, v in metrics.items() if not isinstance(v, (Mapping, list))})]
    replicated = "n_replicates" in metrics
    overall = {m: v for m, v in metrics["overall"].items()}
    rows = [("overall", sem_columns(overall) if replicated else overall)]
    for group, entry in metrics.get("per_class", {}).items():
        if replicated:
            row = sem_columns(entry)
        else:
            row = {m: value(v) for m, v in entry["summary"].items()}
            row.update({f"{m}_sem": v.get("sem") for m, v in entry["summary"].items()})
            row["n_classes"] = entry["n_classes"]
            row["n_skipped"] = len(entry["skipped"])
        for m, v in metrics.get("labels", {}).get(group, {}).items():
            row[m] = value(v)
            if replicated:
                row[f"{m}_sem"] = v.get("sem")
        rows.append((f"per-class mean: {group}", row))
    return rows


def to_mqc_tsv(
    metrics: Mapping[str, Any] | Sequence[tuple[str, Mapping[str, Any]]],
    *,
    section_id: str = "sclatent_metrics",
    section_name: str = "sclatent metrics",
    description: str = "Real vs generated cells in the PCA space of the real cells (details in metrics.json).",
) -> str:
    """Render metrics as a MultiQC custom-content table (the text of a `*_mqc.tsv` file).

    The file starts with the YAML header lines MultiQC reads (`# id:`, `# section_name:`, `# description:`,
    `# format: 'tsv'`, `# plot_type: 'table'`), then a tab-separated table: one row per line ("overall" and
    one "per-class mean" row per condition group for `evaluate` / `aggregate_replicates` output; a single
    row for a flat dict such as `reconstruction_metrics`). Missing values are empty cells. A list of
    (prefix, metrics) pairs puts several such parts in one table, each row name prefixed.
    """

    def quoted(text: str) -> str:
        return "'" + text.replace("'", "") + "'"

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v).replace("\t", " ")

    if isinstance(metrics, Mapping):
        rows = _mqc_rows(metrics)
    else:  # several (row-name prefix, metrics) parts in one table
        rows = [(f"{prefix}{name}", row) for prefix, part in metrics for name, row in _mqc_rows(part)]
    columns: list[str] = []
    for _, row in rows:
        columns += [c for c in row if c not in columns]
    lines = [
        f"# id: {quoted(section_id)}",
        f"# section_name: {quoted(section_name)}",
        f"# description: {quoted(description)}",
        "# format: 'tsv'",
        "# plot_type: 'table'",
        "\t".join(["Sample", *columns]),
    ]
    lines += ["\t".join([cell(name), *(cell(row.get(c)) for c in columns)]) for name, row in rows]
    return "\n".join(lines) + "\n"
