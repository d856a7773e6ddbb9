"""The report's comparison of generated with real cells: what to read first, the metrics tables and the
per-class bars.

Distances shrink with the number of cells compared, so the numbers put side by side are the comparable ones:
the model at the floor's sample size (|A| generated cells of replicate 0 vs half B of the real cells) next to
the real-vs-real floor (half A vs half B); the model on all test cells (mean ± SEM over replicates) comes after.
Per class, every column is a mean over the same classes: those evaluated at the floor's size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..metrics import DISTRIBUTION_METRICS, mean_sem
from .html import (
    BAR_METRICS,
    CLASS_TABLE_METRICS,
    COLLAPSE_FRACTION,
    METRIC_NAMES,
    PALETTE,
    Html,
    Section,
    _new_figure,
    details,
    esc,
    fmt,
    fmt_stat,
    slug,
    table,
)
from .inputs import ReportInputs

log = logging.getLogger(__name__)


def _get(obj: Any, *path: str) -> Any:
    """obj[p0][p1]... or None where any level is missing (or not a mapping)."""
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _floor(metrics: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The real-vs-real floor: half A vs half B of the real cells (None if not computed)."""
    return _get(metrics, "real_vs_real")


def _half(metrics: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The model at the floor's sizes: |A| generated cells (replicate 0) vs half B (None if not computed)."""
    return _get(metrics, "generated_vs_real_half")


def _sizes(part: Mapping[str, Any]) -> str:
    return f"{fmt(part.get('n_generated'))} vs {fmt(part.get('n_real'))} cells"


def class_values(doc: Mapping[str, Any], group: str) -> dict[str, dict[str, Any]]:
    """Per-class metrics of one group, mean ± SEM over replicates (from `generation_per_replicate`)."""
    reps = doc.get("generation_per_replicate") or []
    classes: dict[str, dict[str, list[float | None]]] = {}
    for rep in reps:
        for cls, values in (_get(rep, "per_class", group, "classes") or {}).items():
            entry = classes.setdefault(cls, {})
            for m, v in values.items():
                entry.setdefault(m, []).append(v)
    return {cls: {m: mean_sem(v) for m, v in ms.items()} for cls, ms in classes.items()}


# ----------------------------------------------------------------------------------------------------------
# Read first: a test-size model, and generated cells far below the floor (mode collapse)
# ----------------------------------------------------------------------------------------------------------
def model_presets(inputs: ReportInputs) -> dict[str, tuple[str, Any]]:
    """{'VAE' | 'prior': (preset, optimiser steps)} of the training runs whose config.json was given."""
    out = {}
    for stage, run in (("VAE", inputs.vae), ("prior", inputs.prior)):
        meta = ((run.config or {}).get("metadata") or {}) if run is not None else {}
        preset = (meta.get("run") or {}).get("preset")
        if preset:
            steps = int(run.history["step"].iloc[-1]) if len(run.history) else None
            out[stage] = (preset, steps)
    return out


def collapse_findings(m: Mapping[str, Any] | None) -> list[tuple[str, float, float]]:
    """(metric, model at the floor's size, floor) for recall, coverage and each key's kNN-F1 that fall below
    COLLAPSE_FRACTION of the floor: the generated cells miss much of where real cells lie, or of their classes."""
    half, floor = _half(m), _floor(m)
    if not half or not floor:
        return []
    checks = [(metric, ("overall", metric)) for metric in ("recall", "coverage")]
    checks += [(f"kNN-F1 of {key}", ("labels", key, "knn_f1")) for key in (floor.get("labels") or {})]
    found = []
    for name, path in checks:
        model, real = _get(half, *path), _get(floor, *path)
        if model is not None and real is not None and real > 0 and model < COLLAPSE_FRACTION * real:
            found.append((name, float(model), float(real)))
    return found


def read_first(inputs: ReportInputs) -> Html:
    """The warnings a reader needs before any number: a test-size model; generated cells far below the floor."""
    items = []
    tiny = {stage: v for stage, v in model_presets(inputs).items() if v[0] == "tiny"}
    if tiny:
        which = " and ".join(f"the {stage} ({fmt(steps)} steps)" for stage, (_, steps) in tiny.items())
        items.append(
            f"<b>Test-size model.</b> {which} use the <code>tiny</code> preset, which exists to check that the "
            "pipeline runs (the test profile, <code>make demo</code>). Its generated cells are not a model of this "
            "dataset: train with the default presets before reading anything biological into them."
        )
    found = collapse_findings(inputs.metrics)
    if found:
        listed = "; ".join(f"{esc(name)} {fmt(model)} against {fmt(real)}" for name, model, real in found)
        items.append(
            "<b>Generated cells far below the real-vs-real floor (possible mode collapse).</b> At the same number "
            f"of cells, {listed} between two halves of the real cells. The generated cells cover only part of "
            "where real cells lie"
            + (", and do not sit among the real cells of their own class" if any("kNN" in f[0] for f in found) else "")
            + ": they may be concentrated in a few states (look at the UMAP). Read the other metrics with this in "
            "mind; a longer training or a larger model usually helps."
        )
    if not items:
        return Html("")
    body = "".join(f"<li>{item}</li>" for item in items)
    return Html(f'<div class="alert" id="read-first"><b>Read this first</b><ul>{body}</ul></div>')


# ----------------------------------------------------------------------------------------------------------
# Metrics tables
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Column:
    """One column of the metrics tables: a metrics.json part and how its values are stored.

    aggregated: the part is `metrics.aggregate_replicates` output ({"mean", "sem"} per metric) and `reps` holds
    the replicates' own `metrics.evaluate` outputs; otherwise `doc` is one `metrics.evaluate` output (numbers,
    per-class "classes" and "summary" = mean ± SEM over classes). comparable: at the floor's sample sizes.
    """

    header: str
    doc: Mapping[str, Any]
    aggregated: bool
    comparable: bool = False
    reps: list[Mapping[str, Any]] = field(default_factory=list)

    def value(self, kind: str, name: str | None, metric: str) -> Any:
        """The cell of one table: kind 'overall' or 'labels' (name = key)."""
        if kind == "overall":
            return _get(self.doc, "overall", metric)
        return _get(self.doc, "labels", name, metric)

    def classes(self, group: str) -> set[str]:
        """The classes of `group` evaluated in this column (in every replicate)."""
        parts = self.reps if self.aggregated else [self.doc]
        sets = [set(_get(p, "per_class", group, "classes") or {}) for p in parts]
        return set.intersection(*sets) if sets else set()

    def class_mean(self, group: str, metric: str, classes: Sequence[str]) -> dict[str, Any]:
        """Mean over `classes` of a per-class metric: ± SEM over replicates (aggregated), else over classes."""

        def over(part: Mapping[str, Any]) -> list[float | None]:
            return [_get(part, "per_class", group, "classes", c, metric) for c in classes]

        if self.aggregated:
            per_rep = [mean_sem(over(r))["mean"] for r in self.reps]
            return mean_sem(per_rep)
        return mean_sem(over(self.doc))


def _model_column(header: str, doc: Mapping[str, Any]) -> Column:
    """A model's (or baseline's) column on all test cells: over replicates; with one, over classes."""
    reps = list(doc.get("generation_per_replicate") or [])
    n_rep = doc["generation"].get("n_replicates", len(reps) or 1)
    if n_rep == 1 and len(reps) == 1:
        # one replicate: per-class summaries are ± SEM over classes rather than a SEM over one replicate (None)
        return Column(
            f"{header} (1 replicate)", {**doc["generation"], "per_class": reps[0].get("per_class", {})}, False
        )
    return Column(f"{header} (mean ± SEM of {n_rep} replicates)", doc["generation"], True, reps=reps)


def metric_columns(inputs: ReportInputs) -> list[Column]:
    """The comparable columns first (the model and each baseline at the floor's sample sizes, next to the
    floor), then the model and each baseline on all test cells."""
    m = inputs.metrics
    cols: list[Column] = []
    if _floor(m) and _half(m):
        cols.append(Column(f"sclatent at the floor's size ({_sizes(_half(m))})", _half(m), False, True))
        cols.append(Column(f"real vs real: the floor ({_sizes(_floor(m))})", _floor(m), False, True))
        for name, b in inputs.baselines.items():
            if _half(b):
                cols.append(Column(f"baseline: {name} at the floor's size", _half(b), False, True))
    cols.append(_model_column("sclatent, all test cells", m))
    for name, b in inputs.baselines.items():
        cols.append(_model_column(f"baseline: {name}, all test cells", b))
    return cols


def _metrics_table(
    cols: Sequence[Column], kind: str, rows_spec: Sequence[tuple[str, str | None, str]], table_id: str
) -> Html:
    """rows_spec: (row label, key or None, metric)."""
    rows = [[label, *[fmt_stat(c.value(kind, name, metric)) for c in cols]] for label, name, metric in rows_spec]
    return table(["metric", *[c.header for c in cols]], rows, table_id=table_id)


def per_class_plan(cols: Sequence[Column], group: str) -> tuple[list[Column], list[str], str]:
    """The per-class rule: every column of a group's table is a mean over the same classes.

    With a floor that covers at least 2 classes, those classes (evaluated in every column); otherwise the
    all-cells columns alone, over the classes evaluated in all of them. Returns (columns, classes, note).
    """
    comparable = [c for c in cols if c.comparable]
    others = [c for c in cols if not c.comparable]
    every = sorted(set.intersection(*(c.classes(group) for c in others))) if others else []
    if comparable:
        common = sorted(set.intersection(*(c.classes(group) for c in cols)))
        if len(common) >= 2:
            note = f"mean over the {len(common)} classes evaluated at the floor's size, in every column"
            if len(common) < len(every):
                note += f" (of {len(every)} evaluated on all test cells: see every class below)"
            return list(cols), common, note
        floor_n = len(comparable[1].classes(group)) if len(comparable) > 1 else 0
        note = (
            f"mean over the {len(every)} classes evaluated on all test cells; no floor column: the halves of the "
            f"real cells have enough cells in {floor_n} class{'' if floor_n == 1 else 'es'}, and a mean over fewer "
            "than 2 classes is no per-class summary"
        )
        return others, every, note
    return others, every, f"mean over the {len(every)} classes evaluated"


def section_metrics(inputs: ReportInputs) -> Section:
    """Overall, label and per-class tables: the comparable numbers side by side, then all test cells."""
    sec = Section("metrics", "Generation metrics (generated vs held-out real cells)", "Metrics")
    m = inputs.metrics
    if m is None:
        sec.add_missing("No metrics.json given (--metrics): no generation metrics.")
        return sec
    gen = m["generation"]
    n_rep = gen.get("n_replicates", 1)
    fs = gen.get("feature_space") or {}
    settings = gen.get("settings") or {}
    sec.add(
        Html(
            f'<p class="note">{fmt(m.get("n_real"))} real test cells vs {fmt(m.get("n_generated"))} generated cells '
            f"({n_rep} replicate{'s' if n_rep != 1 else ''}). Feature space: {esc(fs.get('variant', '?'))}; "
            f"{esc(fs.get('normalization', ''))}; {fmt(fs.get('n_hvg'))} HVGs, {fmt(fs.get('n_pcs'))} PCs. "
            f"Seeded subsampling (seed {esc(settings.get('seed'))}): at most {fmt(settings.get('max_cells'))} cells "
            f"per side for MMD², 1-NN and PRDC, {fmt(settings.get('w2_max_cells'))} for W2. A class is evaluated "
            f"where it has at least {fmt(settings.get('min_cells_per_class'))} cells on each side.</p>"
        )
    )
    if _floor(m) is None:
        sec.add_missing(
            "The real-vs-real floor was not computed (EVALUATE --no-floor, or too few cells): no floor column."
        )
    else:
        sec.add(
            Html(
                '<p class="note"><b>How to read the columns.</b> The floor compares two halves of the real test '
                "cells: what this data allows. Distances shrink with the number of cells compared, so the model "
                "is first shown at the floor's sample size (as many generated cells as in one half, against the "
                "same other half): compare these two columns. The all-test-cells columns use more cells and are "
                "not comparable with the floor.</p>"
            )
        )
    cols = metric_columns(inputs)
    sec.add(Html("<h3>Overall</h3>"))
    sec.add(
        _metrics_table(
            cols, "overall", [(METRIC_NAMES.get(x, x), None, x) for x in DISTRIBUTION_METRICS], "table-overall"
        )
    )

    sec.add(Html("<h3>Labels: do conditioned cells look like their class?</h3>"))
    labels = gen.get("labels") or {}
    if not labels:
        sec.add_missing("No condition keys: no label metrics.")
    else:
        spec = [(f"{key}: {METRIC_NAMES.get(x, x)}", key, x) for key, entry in labels.items() for x in entry]
        sec.add(_metrics_table(cols, "labels", spec, "table-labels"))

    sec.add(Html("<h3>Per class</h3>"))
    per_class = gen.get("per_class") or {}
    if not per_class:
        sec.add_missing("No condition keys: no per-class metrics.")
        return sec
    sec.add(
        Html(
            '<p class="note">For each condition key (and the joint combination of keys), every column is a mean '
            "over the same classes; ± SEM over replicates for the columns over replicates, over classes for the "
            "others.</p>"
        )
    )
    for group in per_class:
        group_cols, classes, note = per_class_plan(cols, group)
        if not classes:
            skipped = _get((m.get("generation_per_replicate") or [None])[0], "per_class", group, "skipped") or []
            sec.add_missing(f"{group}: no class has enough cells on both sides ({len(skipped)} skipped).")
            continue
        sec.add(Html(f"<p><b>{esc(group)}</b>: {esc(note)}.</p>"))
        rows = [
            [METRIC_NAMES.get(x, x), *[fmt_stat(c.class_mean(group, x, classes)) for c in group_cols]]
            for x in DISTRIBUTION_METRICS
        ]
        sec.add(table(["metric", *[c.header for c in group_cols]], rows, table_id=f"table-per-class-{slug(group)}"))
        sec.add(details(f"{group}: every class", _class_table(m, group)))
    return sec


def _class_table(m: Mapping[str, Any], group: str) -> Html:
    """Each class of a group: cell counts, then per metric the model at the floor's size, the floor, and the
    model on all test cells (mean ± SEM over replicates)."""
    values = class_values(m, group)
    half = _get(_half(m), "per_class", group, "classes") or {}
    floor = _get(_floor(m), "per_class", group, "classes") or {}
    header = ["class", "real cells", "generated cells"]
    for metric in CLASS_TABLE_METRICS:
        header += [f"{metric} at the floor's size", f"{metric} floor", f"{metric} all cells"]
    rows = []
    for cls in sorted(set(values) | set(floor)):
        v = values.get(cls, {})
        row = [cls, fmt(_get(v, "n_real", "mean")), fmt(_get(v, "n_generated", "mean"))]
        for metric in CLASS_TABLE_METRICS:
            row += [fmt(_get(half, cls, metric)), fmt(_get(floor, cls, metric)), fmt_stat(v.get(metric))]
        rows.append(row)
    reps = m.get("generation_per_replicate") or []
    skipped = _get(reps[0] if reps else None, "per_class", group, "skipped") or []
    note = ""
    if skipped:
        listed = ", ".join(f"{s['class']} ({s['n_real']}/{s['n_generated']})" for s in skipped)
        note = f"<p class=note>Too few cells to evaluate (real/generated): {esc(listed)}</p>"
    return Html(table(header, rows, table_id=f"table-classes-metrics-{slug(group)}") + note)


# ----------------------------------------------------------------------------------------------------------
# Per-class bar charts
# ----------------------------------------------------------------------------------------------------------
def per_class_figure(
    m: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]], group: str
) -> tuple[Any, list[str], bool]:
    """Bars per class of W2 and MMD². With a floor: the classes evaluated at the floor's size, bars = the model
    (and baselines) at that size, a black tick = the floor on every bar. Without: bars = all test cells (mean ±
    SEM over replicates). Returns (figure, classes, with_floor)."""
    floor_classes = _get(_floor(m), "per_class", group, "classes") or {}
    docs = [("sclatent", m), *baselines.items()]
    halves = [(name, _get(_half(doc), "per_class", group, "classes") or {}) for name, doc in docs]
    classes = sorted(set(floor_classes) & set(halves[0][1]))
    with_floor = bool(classes)
    if with_floor:
        series = [(f"{name} at the floor's size", {c: h.get(c, {}) for c in classes}) for name, h in halves if h]
        values = [{c: {k: {"mean": v} for k, v in part[c].items()} for c in part} for _, part in series]
    else:
        series = [(f"{name}, all test cells", class_values(doc, group)) for name, doc in docs]
        classes = sorted(series[0][1])
        values = [part for _, part in series]
    width_in = min(18.0, max(6.0, 0.45 * len(classes) * len(series) + 2.0))
    fig = _new_figure(width_in, 3.2 * len(BAR_METRICS))
    axes = fig.subplots(len(BAR_METRICS), 1, squeeze=False)[:, 0]
    x = np.arange(len(classes))
    bar_w = 0.8 / len(series)
    for ax, metric in zip(axes, BAR_METRICS):
        for i, ((name, _), part) in enumerate(zip(series, values)):
            means = [_get(part, c, metric, "mean") for c in classes]
            sems = [_get(part, c, metric, "sem") for c in classes]
            ax.bar(
                x - 0.4 + bar_w * (i + 0.5),
                [np.nan if v is None else v for v in means],
                bar_w,
                yerr=[0.0 if s is None else s for s in sems],
                color=PALETTE[i % len(PALETTE)],
                label=name,
                capsize=2,
            )
        if with_floor:
            ax.scatter(
                x,
                [_get(floor_classes, c, metric) for c in classes],
                marker="_",
                s=700,
                color="black",
                linewidths=2.2,
                zorder=3,
                label="real vs real: the floor",
            )
        ax.set_ylabel(METRIC_NAMES.get(metric, metric), fontsize=8)
        ax.set_xticks(x)
        rotate = len(classes) > 4
        ax.set_xticklabels(classes, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(f"per class of {group}", fontsize=11)
    return fig, classes, with_floor


def section_per_class(inputs: ReportInputs) -> Section:
    """One bar-chart figure per condition key (and the joint combination)."""
    sec = Section("per-class", "Per-class metrics", "Per class")
    m = inputs.metrics
    if m is None:
        sec.add_missing("No metrics.json given (--metrics): no per-class charts.")
        return sec
    groups = list(m["generation"].get("per_class") or {})
    if not groups:
        sec.add_missing("No condition keys: no per-class charts.")
        return sec
    if _floor(m) is None:
        sec.add_missing("No real-vs-real floor in metrics.json: the charts have no floor reference.")
    min_cells = _get(m, "generation", "settings", "min_cells_per_class")
    for group in groups:
        all_cells = class_values(m, group)
        if not all_cells:
            reps = m.get("generation_per_replicate") or []
            skipped = (reps[0]["per_class"].get(group, {}).get("skipped") if reps else None) or []
            sec.add_missing(
                f"{group}: no class has enough cells on both sides "
                f"({', '.join(s['class'] for s in skipped) or 'none'} skipped)."
            )
            continue
        fig, classes, with_floor = per_class_figure(m, inputs.baselines, group)
        if with_floor:
            left_out = sorted(set(all_cells) - set(classes))
            caption = (
                f"{group}: the {len(classes)} classes with a floor. Bars: the model at the floor's sample size; "
                "black tick: the floor (two halves of the real cells of the class). A bar near its tick is as "
                "close to the real cells as the real cells are to themselves."
            )
            if left_out:
                caption += (
                    f" Not drawn ({len(left_out)}: {', '.join(left_out)}): fewer than {fmt(min_cells)} real cells in "
                    "a half, so no floor; their all-cells values are in the table of every class above."
                )
        else:
            caption = (
                f"{group}: {len(classes)} classes, mean over replicates ± SEM on all test cells. No floor: no class "
                f"has {fmt(min_cells)} real cells in each half of the test cells."
            )
        sec.add_figure(f"fig-per-class-{slug(group)}", fig, caption, f"per-class W2 and MMD² of {group}")
    return sec
