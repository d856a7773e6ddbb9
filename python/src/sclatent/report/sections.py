"""The report's tables and curves: run summary, data, training, reconstruction, metrics, per-class bars."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..io import joint_labels
from ..metrics import DISTRIBUTION_METRICS, JOINT_SEPARATOR, mean_sem
from .html import (
    BAR_METRICS,
    CLASS_TABLE_METRICS,
    METRIC_NAMES,
    PALETTE,
    RECONSTRUCTION_NAMES,
    TRACE_COLUMNS,
    Html,
    Section,
    _new_figure,
    details,
    esc,
    fmt,
    fmt_seconds,
    fmt_stat,
    json_block,
    missing,
    slug,
    table,
)
from .inputs import ReportInputs, TrainingRun

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Run summary
# ----------------------------------------------------------------------------------------------------------
def _sample_record(inputs: ReportInputs) -> tuple[dict[str, Any] | None, float | None]:
    """SAMPLE's provenance and wall time, from the generated h5ad (else from metrics.json's copy)."""
    if inputs.generated is not None:
        uns = dict(inputs.generated.uns.get("sclatent", {}))
        prov = json.loads(uns["provenance_json"]) if "provenance_json" in uns else None
        seconds = uns.get("seconds")
        return prov, None if seconds is None else float(seconds)
    if inputs.metrics is not None and inputs.metrics.get("sampler"):
        seconds = inputs.metrics["sampler"].get("seconds")
        return {"config": inputs.metrics["sampler"]}, None if seconds is None else float(seconds)
    return None, None


def _training_record(run: TrainingRun | None) -> tuple[dict[str, Any] | None, float | None]:
    if run is None:
        return None, None
    elapsed = float(run.history["elapsed_s"].iloc[-1]) if "elapsed_s" in run.history and len(run.history) else None
    if run.config is None:
        return {"config": {}}, elapsed
    cfg = run.config
    record = {
        "sclatent_version": cfg.get("sclatent_version"),
        "config": {
            "run": cfg.get("metadata", {}).get("run"),
            "model_config": cfg.get("model_config"),
            "train_config": cfg.get("train_config"),
            "n_parameters": cfg.get("metadata", {}).get("n_parameters"),
        },
    }
    return record, elapsed


def step_records(inputs: ReportInputs) -> list[dict[str, Any]]:
    """One record per pipeline step: name, artefact, provenance (or None), wall time in s (or None)."""

    def from_json(doc: Mapping[str, Any] | None) -> tuple[Any, Any]:
        return (None, None) if doc is None else (doc.get("provenance"), doc.get("elapsed_s"))

    sample = _sample_record(inputs)
    steps = [
        ("PREPARE", "prepare.json", inputs.prepare is not None, from_json(inputs.prepare)),
        ("TOKENIZE", "manifest.json", inputs.manifest is not None, from_json(inputs.manifest)),
        ("TRAIN_VAE", "history.csv + config.json", inputs.vae is not None, _training_record(inputs.vae)),
        ("ENCODE", "reconstruction.json", inputs.reconstruction is not None, from_json(inputs.reconstruction)),
        ("TRAIN_PRIOR", "history.csv + config.json", inputs.prior is not None, _training_record(inputs.prior)),
        ("SAMPLE", "generated h5ad", sample[0] is not None, sample),
        ("EVALUATE", "metrics.json", inputs.metrics is not None, from_json(inputs.metrics)),
    ]
    return [
        {"step": step, "artefact": artefact, "given": given, "provenance": record[0], "seconds": record[1]}
        for step, artefact, given, record in steps
    ]


def _scalar_settings(config: Any, limit: int = 10) -> str:
    """The scalar entries of a (nested) config as 'k=v, ...' (first `limit`)."""
    items: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{prefix}{k}." if isinstance(v, Mapping) else f"{prefix}{k}")
        elif obj is not None and not isinstance(obj, (list, tuple)):
            items.append(f"{prefix}={obj}")

    walk(config or {}, "")
    more = f", … ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _trace_rows(trace: pd.DataFrame, dataset: str) -> tuple[pd.DataFrame, bool]:
    """The trace rows of this dataset's tasks (by tag, or by the tag in the task name); all rows if none match."""
    match = pd.Series(False, index=trace.index)
    if "tag" in trace.columns:  # tags are the dataset id, or 'id:...' (SAMPLE's shards)
        match |= (trace["tag"] == dataset) | trace["tag"].str.startswith(f"{dataset}:")
    if "name" in trace.columns:  # names end with ' (tag)'
        match |= trace["name"].str.contains(rf"\({re.escape(dataset)}[:)]", regex=True)
    return (trace[match], True) if match.any() else (trace, False)


def section_run_summary(inputs: ReportInputs) -> Section:
    """Version, settings and wall time of every step; the full configurations in collapsed blocks."""
    import platform
    import sys

    sec = Section("run-summary", "Run summary", "Run")
    records = step_records(inputs)
    rows, versions = [], set()
    for r in records:
        p = r["provenance"] or {}
        version = p.get("sclatent_version")
        if version:
            versions.add(version)
        rows.append(
            [
                r["step"],
                r["artefact"] if r["given"] else "not given",
                version or "—",
                fmt_seconds(r["seconds"]) if r["given"] else "—",
                _scalar_settings(p.get("config")) if r["given"] else "",
            ]
        )
    known = [r["seconds"] for r in records if r["seconds"] is not None]
    sec.add(table(["step", "artefact", "sclatent", "wall time", "settings"], rows, table_id="table-steps"))
    sec.add(
        Html(
            f'<p class="note">Total recorded wall time: {esc(fmt_seconds(sum(known)) if known else "none recorded")} '
            f"(each step's own record: prepare.json / manifest.json <code>elapsed_s</code>, the last "
            f"<code>elapsed_s</code> of each history.csv, the generated h5ad's <code>uns['sclatent']['seconds']</code> "
            f"summed over shards, metrics.json <code>elapsed_s</code>; ENCODE records none).</p>"
        )
    )
    if len(versions) > 1:
        sec.add(missing(f"The steps ran with different sclatent versions: {', '.join(sorted(versions))}"))
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    env = [
        ["sclatent (this report)", __version__],
        ["python", sys.version.split()[0]],
        ["platform", platform.platform()],
    ]
    env += [[name, pkg(name)] for name in ("numpy", "pandas", "anndata", "scanpy", "umap-learn", "matplotlib", "torch")]
    step_env = [
        [r["step"], r["provenance"]["python"], r["provenance"].get("platform", "?")]
        for r in records
        if (r["provenance"] or {}).get("python")
    ]
    sec.add(Html("<h3>Versions</h3>"))
    sec.add(table(["component", "version"], env, table_id="table-versions"))
    if step_env:
        sec.add(details("Python and platform of each step", table(["step", "python", "platform"], step_env)))
    sec.add(Html("<h3>Configuration of each step</h3>"))
    for r in records:
        if r["provenance"]:
            sec.add(
                details(f"{r['step']}: full configuration", json_block(r["provenance"].get("config", r["provenance"])))
            )
    if inputs.trace is not None:
        rows_t, matched = _trace_rows(inputs.trace, inputs.dataset)
        cols = [c for c in TRACE_COLUMNS if c in rows_t.columns]
        sec.add(Html("<h3>Execution trace</h3>"))
        if not matched:
            sec.add(
                Html(
                    f'<p class="note">No trace row is tagged with dataset {esc(inputs.dataset)!s}: all {len(rows_t)} '
                    "rows shown.</p>"
                )
            )
        sec.add(table(cols, rows_t[cols].to_numpy().tolist(), table_id="table-trace"))
    else:
        sec.add(
            Html(
                '<p class="note">No Nextflow execution trace given (--trace): wall times above are the steps\' own '
                "records.</p>"
            )
        )
    given = "".join(f"<li><code>{esc(k)}</code>: {esc(v)}</li>" for k, v in inputs.paths.items())
    sec.add(details("Input files of this report", Html(f"<ul>{given}</ul>")))
    return sec


# ----------------------------------------------------------------------------------------------------------
# Data summary
# ----------------------------------------------------------------------------------------------------------
def _removed(n: int, what: str) -> str:
    return f"−{fmt(n)} {what}" if n else f"no {what} removed"


def _filter_rows(prep: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> list[list[Any]]:
    """[step, cells, genes, note] through PREPARE's filters and TOKENIZE."""
    genes = prep.get("genes", {})
    cells, n_genes = prep.get("cells_in"), genes.get("after_join")
    rows: list[list[Any]] = [
        [
            f"input ({len(prep.get('files', []))} file(s))",
            fmt(cells),
            fmt(n_genes),
            f"genes: union {fmt(genes.get('union'))}, intersection {fmt(genes.get('intersection'))}",
        ]
    ]
    for step in prep.get("qc", []):
        name = step.get("filter", "?")
        if "cells_before" in step:
            cells = step["cells_before"] - step.get("cells_removed", 0)
            rows.append([f"QC {name}", fmt(cells), fmt(n_genes), _removed(step.get("cells_removed", 0), "cells")])
        elif "genes_before" in step:
            n_genes = step["genes_before"] - step.get("genes_removed", 0)
            rows.append([f"QC {name}", fmt(cells), fmt(n_genes), _removed(step.get("genes_removed", 0), "genes")])
    rows.append(["after QC", fmt(prep.get("cells_after_qc")), fmt(prep.get("genes_after_qc")), ""])
    hvg = prep.get("hvg")
    if hvg:
        rows.append(["HVGs flagged", "", fmt(hvg.get("n_flagged")), f"{hvg.get('flavor')} on {hvg.get('computed_on')}"])
    split = prep.get("split", {})
    for name in ("train", "test"):
        if name in split:
            strata = ", ".join(split.get("stratified_by", [])) or "nothing"
            rows.append(
                [
                    f"split: {name}",
                    fmt(split[name]),
                    "",
                    f"test fraction {fmt(split.get('test_fraction'))}, stratified by {strata}",
                ]
            )
    if manifest is not None:
        rows.extend(_manifest_rows(manifest))
    return rows


def _manifest_rows(manifest: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for name, s in manifest.get("splits", {}).items():
        q = s.get("len_quantiles", {})
        rows.append(
            [
                f"tokenized: {name}",
                fmt(s.get("n_cells")),
                fmt(manifest.get("n_genes")),
                f"vocabulary: {manifest.get('gene_selection', '?')}; expressed genes per cell median "
                f"{fmt(q.get('50'))}, "
                f"max {fmt(s.get('max_len'))}; {fmt(s.get('n_empty_cells', 0))} empty cells, "
                f"{fmt(s.get('n_cells_over_max_tokens', 0))} over max_tokens={fmt(manifest.get('max_tokens'))}",
            ]
        )
    return rows


def _generated_class_counts(gen: Any, groups: Sequence[str]) -> dict[str, dict[str, int]]:
    """Generated cells per class of each group ('k' or 'k1|k2') over all replicates."""
    out: dict[str, dict[str, int]] = {}
    for group in groups:
        keys = group.split(JOINT_SEPARATOR)
        if not all(k in gen.obs.columns for k in keys):
            continue
        labels = pd.Series(joint_labels(gen.obs, keys, JOINT_SEPARATOR))
        out[group] = {str(k): int(v) for k, v in labels.value_counts().items()}
    return out


def section_data_summary(inputs: ReportInputs) -> Section:
    """Cells and genes through each filter; class sizes per split (and generated)."""
    sec = Section("data-summary", "Data summary", "Data")
    if inputs.prepare is None and inputs.manifest is None:
        sec.add_missing("No prepare.json (--prepare) or manifest.json (--manifest) given: no data summary.")
        return sec
    if inputs.prepare is not None:
        sec.add(Html("<h3>Cells and genes through each step</h3>"))
        sec.add(
            table(
                ["step", "cells", "genes", "note"],
                _filter_rows(inputs.prepare, inputs.manifest),
                table_id="table-filters",
            )
        )
    else:
        sec.add_missing("No prepare.json given (--prepare): QC filters and the split are not shown.")
        sec.add(table(["step", "cells", "genes", "note"], _manifest_rows(inputs.manifest), table_id="table-filters"))
    classes = (inputs.prepare or {}).get("classes", {})
    groups = list(dict.fromkeys(g for split in classes.values() for g in split))
    if not groups:
        sec.add_missing("No condition keys: the cells are one class.")
        return sec
    gen_counts = _generated_class_counts(inputs.generated, groups) if inputs.generated is not None else {}
    n_reps = (
        inputs.generated.obs["replicate"].nunique()
        if inputs.generated is not None and "replicate" in inputs.generated.obs
        else 1
    )
    sec.add(Html("<h3>Class sizes</h3>"))
    splits = list(classes)
    for group in groups:
        names = sorted({c for s in splits for c in classes[s].get(group, {})} | set(gen_counts.get(group, {})))
        with_gen = group in gen_counts
        header = ["class", *splits] + (
            [f"generated ({n_reps} replicate{'s' if n_reps > 1 else ''})"] if with_gen else []
        )
        rows = [
            [
                c,
                *[fmt(classes[s].get(group, {}).get(c, 0)) for s in splits],
                *([fmt(gen_counts[group].get(c, 0))] if with_gen else []),
            ]
            for c in names
        ]
        body = table(header, rows, table_id=f"table-classes-{slug(group)}")
        if JOINT_SEPARATOR in group:
            sec.add(details(f"{group} (joint): {len(names)} classes", body))
        else:
            sec.add(Html(f"<p><b>{esc(group)}</b>: {len(names)} classes</p>"))
            sec.add(body)
    return sec


# ----------------------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------------------
HISTORY_NOT_TERMS = ("step", "epoch", "lr", "grad_norm", "cells_per_s", "elapsed_s")


def training_figure(history: pd.DataFrame, title: str) -> Any:
    """Panels: the loss and each named loss term vs step, then the learning rate and the gradient norm."""
    terms = [c for c in history.columns if c not in HISTORY_NOT_TERMS]
    panels = terms + [c for c in ("lr", "grad_norm") if c in history.columns]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(3.2 * ncols, 2.5 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    step = history["step"].to_numpy()
    for ax, name in zip(axes, panels):
        y = history[name].to_numpy(dtype=float)
        colour = "#555555" if name in ("lr", "grad_norm") else PALETTE[terms.index(name) % len(PALETTE)]
        ax.plot(step, y, color=colour, lw=1.4)
        finite = y[np.isfinite(y)]
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 30:
            ax.set_yscale("log")  # loss terms spanning orders of magnitude
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    return fig


def section_training(inputs: ReportInputs) -> Section:
    """Training curves of the VAE and of the prior."""
    sec = Section("training", "Training curves", "Training")
    for run, stage, option, fig_id in (
        (inputs.vae, "TRAIN_VAE (stage 1: VAE)", "--vae-history", "fig-training-vae"),
        (inputs.prior, "TRAIN_PRIOR (stage 2: DiT flow-matching prior)", "--prior-history", "fig-training-prior"),
    ):
        sec.add(Html(f"<h3>{esc(stage)}</h3>"))
        if run is None:
            sec.add_missing(f"{stage}: no history given ({option}).")
            continue
        h = run.history
        if len(h) == 0:
            sec.add_missing(f"{stage}: {run.path} has no rows (the run logged no step).")
            continue
        last = h.iloc[-1]
        terms = [c for c in h.columns if c not in HISTORY_NOT_TERMS]
        caption = (
            f"{len(h)} logged steps from {run.path.name}; final step {int(last['step'])}"
            + (f" (epoch {int(last['epoch'])})" if "epoch" in h else "")
            + "; final "
            + ", ".join(f"{t} {fmt(float(last[t]))}" for t in terms)
            + (f"; wall time {fmt_seconds(float(last['elapsed_s']))}" if "elapsed_s" in h else "")
            + ". Loss terms on a log axis where they span more than 30x."
        )
        sec.add_figure(fig_id, training_figure(h, stage), caption, f"training curves of {stage}")
    return sec


# ----------------------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------------------
def section_reconstruction(inputs: ReportInputs) -> Section:
    """ENCODE's reconstruction metrics with readable names and their definitions."""
    sec = Section("reconstruction", "Reconstruction (VAE, held-out test cells)", "Reconstruction")
    rec = inputs.reconstruction
    source = "reconstruction.json"
    if rec is None and inputs.metrics is not None and inputs.metrics.get("reconstruction"):
        rec, source = {"metrics": inputs.metrics["reconstruction"]}, "metrics.json"
    if rec is None:
        sec.add_missing("No reconstruction.json given (--reconstruction) and none carried in metrics.json.")
        return sec
    metrics = rec.get("metrics", {})
    order = [k for k in RECONSTRUCTION_NAMES if k in metrics] + [k for k in metrics if k not in RECONSTRUCTION_NAMES]
    rows = [[RECONSTRUCTION_NAMES.get(k, k), k, fmt(metrics[k])] for k in order]
    sec.add(table(["metric", "key", "value"], rows, table_id="table-reconstruction"))
    notes = []
    if rec.get("likelihood"):
        notes.append(f"likelihood {rec['likelihood']}")
    if rec.get("split"):
        notes.append(f"split {rec['split']}")
    notes.append(f"from {source}")
    sec.add(Html(f'<p class="note">{esc("; ".join(notes))}.</p>'))
    if rec.get("definitions"):
        sec.add(details("Definitions", table(["key", "definition"], [[k, v] for k, v in rec["definitions"].items()])))
    return sec


# ----------------------------------------------------------------------------------------------------------
# Metrics tables
# ----------------------------------------------------------------------------------------------------------
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


@dataclass
class Column:
    """One column of the metrics tables: a metrics.json part and how its values are stored.

    aggregated: the part is `metrics.aggregate_replicates` output ({"mean", "sem"} per metric, per-class
    entries are class means over replicates); otherwise it is one `metrics.evaluate` output (numbers, per-class
    "summary" = mean ± SEM over classes).
    """

    header: str
    doc: Mapping[str, Any]
    aggregated: bool

    def value(self, kind: str, name: str | None, metric: str) -> Any:
        """The cell of one table: kind 'overall', 'labels' (name = key) or 'per_class' (name = group)."""
        if kind == "overall":
            return _get(self.doc, "overall", metric)
        if kind == "labels":
            return _get(self.doc, "labels", name, metric)
        if self.aggregated:
            return _get(self.doc, "per_class", name, metric)
        return _get(self.doc, "per_class", name, "summary", metric)


def _model_column(header: str, doc: Mapping[str, Any]) -> Column:
    """A model's (or baseline's) column: over replicates; with one replicate, its own per-class summary."""
    reps = doc.get("generation_per_replicate") or []
    n_rep = doc["generation"].get("n_replicates", len(reps) or 1)
    if n_rep == 1 and len(reps) == 1:
        # one replicate: report mean ± SEM over classes rather than a SEM over one replicate (None)
        return Column(
            f"{header} (1 replicate)", {**doc["generation"], "per_class": reps[0].get("per_class", {})}, False
        )
    return Column(f"{header} (n={n_rep})", doc["generation"], True)


def metric_columns(inputs: ReportInputs) -> list[Column]:
    """sclatent, sclatent at the floor's size, the floor, then each baseline (and its matched-size run)."""
    m = inputs.metrics
    cols = [_model_column("sclatent", m)]
    if _half(m):
        cols.append(Column("sclatent, half size", _half(m), False))
    if _floor(m):
        cols.append(Column("real vs real (floor)", _floor(m), False))
    for name, b in inputs.baselines.items():
        cols.append(_model_column(f"baseline: {name}", b))
        if _half(b):
            cols.append(Column(f"baseline: {name}, half size", _half(b), False))
    return cols


def _metrics_table(
    cols: Sequence[Column], kind: str, rows_spec: Sequence[tuple[str, str | None, str]], table_id: str
) -> Html:
    """rows_spec: (row label, key/group or None, metric)."""
    rows = [[label, *[fmt_stat(c.value(kind, name, metric)) for c in cols]] for label, name, metric in rows_spec]
    return table(["metric", *[c.header for c in cols]], rows, table_id=table_id)


def section_metrics(inputs: ReportInputs) -> Section:
    """Overall, label and per-class tables: mean ± SEM, the real-vs-real floor and baselines side by side."""
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
            f"Subsampling caps (seeded, seed {esc(settings.get('seed'))}): {fmt(settings.get('max_cells'))} cells per "
            "side "
            f"for MMD²/1-NN/PRDC, {fmt(settings.get('w2_max_cells'))} for W2; classes need ≥ "
            f"{fmt(settings.get('min_cells_per_class'))} cells on both sides. Model columns: mean ± SEM over "
            "replicates. "
            "The floor (real vs real) compares two stratified halves of the real cells, what this data allows; "
            "distances "
            f"shrink with the number of cells compared, so read it against the model at the same sizes (half size: "
            f"generated cells of one replicate, as many as in a half, vs the same real half).</p>"
        )
    )
    if _floor(m) is None:
        sec.add_missing(
            "The real-vs-real floor was not computed (EVALUATE --no-floor, or too few cells): no floor column."
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
            '<p class="note">For each condition key (and the joint combination of keys): the mean over classes; '
            "± SEM over replicates of that mean for the model columns over replicates, ± SEM over classes for the "
            "others.</p>"
        )
    )
    reps = m.get("generation_per_replicate") or []
    for group, entry in per_class.items():
        n_classes = entry.get("n_classes")
        counts = n_classes if isinstance(n_classes, list) else [n_classes or 0]
        sec.add(
            Html(f"<p><b>{esc(group)}</b>: {esc(', '.join(str(x) for x in sorted(set(counts))))} classes evaluated</p>")
        )
        if max(counts) == 0:
            skipped = _get(reps[0] if reps else None, "per_class", group, "skipped") or []
            sec.add_missing(f"{group}: no class has enough cells on both sides ({len(skipped)} skipped).")
            continue
        spec = [(METRIC_NAMES.get(x, x), group, x) for x in DISTRIBUTION_METRICS]
        sec.add(_metrics_table(cols, "per_class", spec, f"table-per-class-{slug(group)}"))
        sec.add(details(f"{group}: every class", _class_table(m, group)))
    return sec


def _class_table(m: Mapping[str, Any], group: str) -> Html:
    """Each class of a group: cell counts and the main metrics (mean ± SEM over replicates), at half size, floor."""
    values = class_values(m, group)
    half = _get(_half(m), "per_class", group, "classes") or {}
    floor = _get(_floor(m), "per_class", group, "classes") or {}
    extra = [(label, part) for label, part in (("half size", half), ("floor", floor)) if part]
    header = ["class", "real cells", "generated cells"]
    for metric in CLASS_TABLE_METRICS:
        header += [metric, *[f"{metric} {label}" for label, _ in extra]]
    rows = []
    for cls in sorted(values):
        v = values[cls]
        row = [cls, fmt(_get(v, "n_real", "mean")), fmt(_get(v, "n_generated", "mean"))]
        for metric in CLASS_TABLE_METRICS:
            row += [fmt_stat(v.get(metric)), *[fmt(_get(part, cls, metric)) for _, part in extra]]
        rows.append(row)
    reps = m.get("generation_per_replicate") or []
    skipped = _get(reps[0] if reps else None, "per_class", group, "skipped") or []
    note = ""
    if skipped:
        listed = ", ".join(f"{s['class']} ({s['n_real']}/{s['n_generated']})" for s in skipped)
        note = f"<p class=note>Skipped (too few cells; real/generated): {esc(listed)}</p>"
    return Html(table(header, rows, table_id=f"table-classes-metrics-{slug(group)}") + note)


# ----------------------------------------------------------------------------------------------------------
# Per-class bar charts
# ----------------------------------------------------------------------------------------------------------
def per_class_figure(
    m: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]], group: str
) -> tuple[Any, list[str]]:
    """Bars per class of W2 and MMD² (model and baselines, ± SEM over replicates); hollow dots: the same at the
    floor's sizes; black tick: the real-vs-real floor."""
    docs = [("sclatent", m), *baselines.items()]
    series = [
        (name, class_values(doc, group), _get(_half(doc), "per_class", group, "classes") or {}) for name, doc in docs
    ]
    classes = sorted(series[0][1])
    floor_classes = _get(_floor(m), "per_class", group, "classes") or {}
    width_in = min(18.0, max(6.0, 0.45 * len(classes) * len(series) + 2.0))
    fig = _new_figure(width_in, 3.2 * len(BAR_METRICS))
    axes = fig.subplots(len(BAR_METRICS), 1, squeeze=False)[:, 0]
    x = np.arange(len(classes))
    bar_w = 0.8 / len(series)
    for ax, metric in zip(axes, BAR_METRICS):
        for i, (name, values, half) in enumerate(series):
            xi = x - 0.4 + bar_w * (i + 0.5)
            means = [_get(values, c, metric, "mean") for c in classes]
            sems = [_get(values, c, metric, "sem") for c in classes]
            ax.bar(
                xi,
                [np.nan if v is None else v for v in means],
                bar_w,
                yerr=[0.0 if s is None else s for s in sems],
                color=PALETTE[i % len(PALETTE)],
                label=name,
                capsize=2,
            )
            half_y = [_get(half, c, metric) for c in classes]
            if any(v is not None for v in half_y):
                ax.scatter(
                    xi,
                    [np.nan if v is None else v for v in half_y],
                    marker="o",
                    s=28,
                    facecolors="white",
                    edgecolors=PALETTE[i % len(PALETTE)],
                    linewidths=1.5,
                    zorder=4,
                    label=f"{name}, half size",
                )
        floor_y = [_get(floor_classes, c, metric) for c in classes]
        if any(v is not None for v in floor_y):
            ax.scatter(
                x,
                [np.nan if v is None else v for v in floor_y],
                marker="_",
                s=600,
                color="black",
                linewidths=2,
                zorder=3,
                label="real vs real (floor)",
            )
        ax.set_ylabel(METRIC_NAMES.get(metric, metric), fontsize=8)
        ax.set_xticks(x)
        rotate = len(classes) > 4
        ax.set_xticklabels(classes, rotation=45 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(f"per class of {group}", fontsize=11)
    return fig, classes


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
    for group in groups:
        if not class_values(m, group):
            reps = m.get("generation_per_replicate") or []
            skipped = (reps[0]["per_class"].get(group, {}).get("skipped") if reps else None) or []
            sec.add_missing(
                f"{group}: no class has enough cells on both sides "
                f"({', '.join(s['class'] for s in skipped) or 'none'} skipped)."
            )
            continue
        fig, classes = per_class_figure(m, inputs.baselines, group)
        caption = (
            f"{group}: {len(classes)} classes. Bars: mean over replicates ± SEM. Black tick: the same metric "
            f"between two halves of the real cells of the class (the floor; absent where a half has too few "
            f"cells). Hollow dots: the model at the floor's sizes (generated cells of one replicate vs the same "
            f"real half), the number to compare with the tick."
        )
        sec.add_figure(f"fig-per-class-{slug(group)}", fig, caption, f"per-class W2 and MMD² of {group}")
    return sec
