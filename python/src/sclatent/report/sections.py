"""The report's tables and curves: run summary, data, training, reconstruction."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..io import joint_labels
from ..metrics import JOINT_SEPARATOR
from .html import (
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


def trace_span_s(trace: pd.DataFrame) -> float | None:
    """Seconds from the first submission to the last completion in a Nextflow trace (None if it has neither)."""
    if "submit" not in trace.columns or "complete" not in trace.columns:
        return None
    submit = pd.to_datetime(trace["submit"], errors="coerce")
    complete = pd.to_datetime(trace["complete"], errors="coerce")
    if submit.isna().all() or complete.isna().all():
        return None
    return max(0.0, (complete.max() - submit.min()).total_seconds())


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
    unrecorded = [r["step"] for r in records if r["given"] and r["seconds"] is None]
    steps_note = (
        "Wall time of each step: its own record (the <code>elapsed_s</code> of its JSON or of the last history.csv "
        "row; SAMPLE's summed over its shards)"
        + (f"; none recorded by {esc(', '.join(unrecorded))}" if unrecorded else "")
        + ". Queueing, staging and the time between steps are not in these records."
    )
    span = trace_span_s(inputs.trace) if inputs.trace is not None else None
    if span is not None:
        total = (
            f"<b>Run wall time: {esc(fmt_seconds(span))}</b> (the Nextflow trace, from the first task's submission to "
            "the last completion before this report, every dataset of the run)"
        )
    else:
        total = (
            f"Sum of the steps' records: {esc(fmt_seconds(sum(known)) if known else 'none recorded')}, less than "
            "the run's wall time (no Nextflow trace given: --trace)"
        )
    sec.add(Html(f'<p class="note">{total}. {steps_note}</p>'))
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
    # every step, with what it recorded (the training runs' config.json has no Python or platform)
    step_env = [
        [r["step"], *(((r["provenance"] or {}).get(k) or "not recorded") for k in ("python", "platform"))]
        if r["given"]
        else [r["step"], "not given", ""]
        for r in records
    ]
    step_env.append(["REPORT (this page)", sys.version.split()[0], platform.platform()])
    sec.add(Html("<h3>Versions</h3>"))
    sec.add(table(["component", "version"], env, table_id="table-versions"))
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


def flat_zero_terms(history: pd.DataFrame) -> list[str]:
    """Loss terms that are 0 at every logged step (e.g. the KL of a deterministic encoder): nothing to plot."""
    terms = [c for c in history.columns if c not in HISTORY_NOT_TERMS]
    return [c for c in terms if len(history) and (history[c].fillna(0) == 0).all()]


def training_figure(history: pd.DataFrame, title: str) -> Any:
    """Panels: the loss and each named loss term vs step (but those 0 throughout), then the learning rate and
    the gradient norm."""
    zero = flat_zero_terms(history)
    terms = [c for c in history.columns if c not in HISTORY_NOT_TERMS and c not in zero]
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
        zero = flat_zero_terms(h)
        terms = [c for c in h.columns if c not in HISTORY_NOT_TERMS and c not in zero]
        caption = (
            f"{len(h)} logged steps from {run.path.name}; final step {int(last['step'])}"
            + (f" (epoch {int(last['epoch'])})" if "epoch" in h else "")
            + "; final "
            + ", ".join(f"{t} {fmt(float(last[t]))}" for t in terms)
            + (f"; wall time {fmt_seconds(float(last['elapsed_s']))}" if "elapsed_s" in h else "")
            + ". Loss terms on a log axis where they span more than 30x."
            + (
                f" Not drawn: {', '.join(zero)}, 0 at every step"
                + (" (a deterministic encoder, β = 0, has no KL term)" if "kl" in zero else "")
                + "."
                if zero
                else ""
            )
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
