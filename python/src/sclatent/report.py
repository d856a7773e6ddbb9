"""REPORT: one self-contained HTML page per dataset, from the artefacts the other steps wrote.

Inputs (every one optional; a section whose inputs are missing says so instead of failing):
PREPARE's `prepare.json`, TOKENIZE's `manifest.json`, the two training runs' `history.csv` (with the
`config.json` beside each), ENCODE's `reconstruction.json`, EVALUATE's `metrics.json` (plus any number of
baseline `metrics.json` files of the same structure), the real test cells (`test.h5ad`) and the generated
cells (gathered SAMPLE output), and optionally a Nextflow execution trace.

Sections (HTML ids): `run-summary` (version, configuration and wall time of every step), `data-summary`
(cells and genes through each filter, class sizes per split), `training` (loss terms and learning rate vs
step, both stages), `reconstruction`, `metrics` (overall, label and per-class tables, mean ± SEM, with the
real-vs-real floor, the model at the floor's sample sizes and baselines beside them), `per-class` (bar charts
of W2 and MMD² per class),
`umap` (real vs generated, and coloured by each condition key) and `markers` (dot plot of the top marker
genes of each class, real vs generated).

The UMAP and the dot plot use EVALUATE's feature space (`metrics.feature_space`: counts normalised to 1e4
over the shared genes, log1p, HVGs, PCA fitted on the real cells, generated cells projected with the real
mean) on a seeded subsample of at most `max_cells` cells per side (generated cells: the first replicate);
scanpy computes the neighbour graph and the UMAP of the union of both sides.

Figures are PNGs drawn with matplotlib's Agg canvas and inlined as base64 data URIs; the style sheet is
inline, and there is no script, font or any other external resource, so the page opens offline.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import __version__
from .io import InputError, atomic_path, read_h5ad, read_json
from .metrics import DISTRIBUTION_METRICS, JOINT_SEPARATOR, TARGET_SUM, align_genes, feature_space, mean_sem

log = logging.getLogger(__name__)

DEFAULT_MAX_CELLS = 3_000  # per side, for the UMAP and the dot plot (UMAP time grows ~linearly with cells)
DEFAULT_N_PCS = 30  # EVALUATE's default, used when metrics.json does not record its own
UMAP_NEIGHBORS = 15  # scanpy's default n_neighbors
N_MARKERS = 3  # top marker genes per class in the dot plot
MAX_MARKER_GENES = 40  # at most this many genes (columns) in the dot plot
MAX_MARKER_CLASSES = 30  # at most this many classes (the largest ones) in the dot plot
MIN_MARKER_CELLS = 3  # a class needs this many real cells to enter rank_genes_groups
GENE_SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "feature_name", "symbol", "gene_name")  # var columns shown instead of ids
BAR_METRICS: tuple[str, ...] = ("w2", "mmd2_rbf")  # per-class bar charts
CLASS_TABLE_METRICS: tuple[str, ...] = ("w2", "mmd2_rbf", "fd", "one_nn_accuracy")
TRACE_COLUMNS: tuple[str, ...] = ("name", "status", "exit", "cpus", "duration", "realtime", "%cpu", "peak_rss")
PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")
REAL_COLOUR, GENERATED_COLOUR = "#4C72B0", "#DD8452"

METRIC_NAMES: dict[str, str] = {
    "w2": "W2 (Wasserstein-2, exact OT) ↓",
    "mmd2_rbf": "MMD² (multi-bandwidth RBF) ↓",
    "fd": "Fréchet distance ↓",
    "one_nn_accuracy": "1-NN two-sample accuracy (0.5 ideal)",
    "precision": "precision (k-NN manifold) ↑",
    "recall": "recall (k-NN manifold) ↑",
    "density": "density (1 ideal)",
    "coverage": "coverage ↑",
    "knn_f1": "kNN label F1 (real → generated) ↑",
    "tstr_accuracy": "train-on-synthetic / test-on-real accuracy ↑",
    "tstr_macro_f1": "train-on-synthetic / test-on-real macro F1 ↑",
}
RECONSTRUCTION_NAMES: dict[str, str] = {
    "re_nll_gene_sum_cell_mean": "RE: NB negative log-likelihood (sum over genes, mean over cells) ↓",
    "pcc_gene_batch256_sample": "PCC per gene, 256-cell batches (scLDM's PCC), NB sample ↑",
    "pcc_gene_all_sample": "PCC per gene, all cells, NB sample ↑",
    "pcc_cell_sample": "PCC per cell, NB sample ↑",
    "mse_sample": "MSE on log1p(1e4·x/Σx), NB sample ↓",
    "pcc_gene_batch256_mean": "PCC per gene, 256-cell batches, NB mean ↑",
    "pcc_gene_all_mean": "PCC per gene, all cells, NB mean ↑",
    "pcc_cell_mean": "PCC per cell, NB mean ↑",
    "mse_mean": "MSE on log1p(1e4·x/Σx), NB mean ↓",
    "n_cells": "test cells evaluated",
    "n_cells_total": "test cells available",
    "n_genes": "model genes",
    "batch_size": "batch size",
    "subsampled": "subsampled",
}

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:1em 2em 4em;background:#fff}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:2px solid #4C72B0;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.4em;color:#333}
nav{font-size:.92em;margin:.5em 0 1em} nav a{margin-right:1em;color:#4C72B0;text-decoration:none}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef2f8} tr:nth-child(even) td{background:#f7f7f7}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:1em 0;text-align:center} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;max-width:900px;margin:.3em auto 0;text-align:left}
.missing{background:#fff4e5;border-left:4px solid #f0a030;padding:.4em .8em;font-size:.9em}
.note{font-size:.88em;color:#555}
details{margin:.4em 0} summary{cursor:pointer;color:#4C72B0}
pre{background:#f4f4f4;padding:.6em;font-size:.8em;overflow-x:auto;max-height:30em}
footer{margin-top:3em;font-size:.8em;color:#777}
"""


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrainingRun:
    """One training stage: its history (one row per log step) and the config.json beside it (if present)."""

    path: Path
    history: pd.DataFrame
    config: dict[str, Any] | None


@dataclass
class ReportInputs:
    """Everything the report is built from; None marks an input that was not given."""

    dataset: str
    prepare: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    vae: TrainingRun | None = None
    prior: TrainingRun | None = None
    reconstruction: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    real: Any = None  # AnnData
    generated: Any = None  # AnnData
    trace: pd.DataFrame | None = None
    paths: dict[str, str] = field(default_factory=dict)


def _load_json(path: str | Path, what: str, needs: Sequence[str]) -> dict[str, Any]:
    """Read a JSON object and check that it has the top-level keys `needs` (else a one-line InputError)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a valid {what} (expected a JSON object, got {type(data).__name__})")
    absent = [k for k in needs if k not in data]
    if absent:
        raise InputError(f"{path}: not a valid {what} (no {', '.join(repr(k) for k in absent)} entry)")
    return data


def load_metrics_json(path: str | Path, what: str = "EVALUATE metrics.json") -> dict[str, Any]:
    """Read an EVALUATE metrics.json (or a baseline's), checking the entries the report reads."""
    doc = _load_json(path, what, ("generation",))
    gen = doc["generation"]
    if not isinstance(gen, dict) or not isinstance(gen.get("overall"), dict):
        raise InputError(f"{path}: not a valid {what} ('generation' has no 'overall' metrics)")
    for part in ("labels", "per_class"):
        if not isinstance(gen.get(part, {}), dict):
            raise InputError(f"{path}: not a valid {what} ('generation.{part}' is not an object)")
    if not isinstance(doc.get("generation_per_replicate", []), list):
        raise InputError(f"{path}: not a valid {what} ('generation_per_replicate' is not a list)")
    for part in ("real_vs_real", "generated_vs_real_half"):
        entry = doc.get(part)
        if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("overall"), dict)):
            raise InputError(f"{path}: not a valid {what} ('{part}' has no 'overall' metrics)")
    return doc


def load_history(path: str | Path) -> TrainingRun:
    """Read a training run's history.csv (or a run folder holding one) and the config.json beside it."""
    path = Path(path)
    if path.is_dir():
        path = path / "history.csv"
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    try:
        history = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a training history CSV ({str(exc).splitlines()[0]})") from None
    if "step" not in history.columns or "loss" not in history.columns:
        raise InputError(f"{path}: not a training history CSV (needs columns 'step' and 'loss'; has {list(history.columns)[:8]})")
    for column in history.columns:
        converted = pd.to_numeric(history[column], errors="coerce")
        bad = converted.isna() & history[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{path}: column {column!r} row {row + 1} is not a number ({history[column].iloc[row]!r})")
        history[column] = converted
    config_path = path.parent / "config.json"
    config = _load_json(config_path, "training config.json", ()) if config_path.exists() else None
    return TrainingRun(path=path, history=history, config=config)


def load_trace(path: str | Path) -> pd.DataFrame:
    """Read a Nextflow execution trace (tab-separated, header row) as strings."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    try:
        trace = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a Nextflow execution trace ({str(exc).splitlines()[0]})") from None
    if "name" not in trace.columns and "process" not in trace.columns:
        raise InputError(f"{path}: not a Nextflow execution trace (no 'name' or 'process' column; has {list(trace.columns)[:8]})")
    return trace


def parse_baselines(items: Sequence[str]) -> dict[str, Path]:
    """Parse repeated `NAME=metrics.json` options into {name: path}, in the order given."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise InputError(f"--baseline {item!r}: expected NAME=metrics.json")
        if name in out:
            raise InputError(f"--baseline {item!r}: the name {name!r} is given twice")
        out[name] = Path(path)
    return out


def load_inputs(
    *,
    dataset: str | None = None,
    prepare: str | Path | None = None,
    manifest: str | Path | None = None,
    vae_history: str | Path | None = None,
    prior_history: str | Path | None = None,
    reconstruction: str | Path | None = None,
    metrics: str | Path | None = None,
    real: str | Path | None = None,
    generated: str | Path | None = None,
    baselines: Mapping[str, str | Path] | None = None,
    trace: str | Path | None = None,
) -> ReportInputs:
    """Read and check every given input (InputError with one line on a missing or malformed file)."""
    paths = {k: str(v) for k, v in dict(prepare=prepare, manifest=manifest, vae_history=vae_history,
             prior_history=prior_history, reconstruction=reconstruction, metrics=metrics, real=real,
             generated=generated, trace=trace).items() if v is not None}
    if manifest is not None and Path(manifest).is_dir():
        manifest = Path(manifest) / "manifest.json"
    inputs = ReportInputs(
        dataset="",
        prepare=_load_json(prepare, "PREPARE prepare.json", ("qc",)) if prepare is not None else None,
        manifest=_load_json(manifest, "TOKENIZE manifest.json", ("genes", "splits")) if manifest is not None else None,
        vae=load_history(vae_history) if vae_history is not None else None,
        prior=load_history(prior_history) if prior_history is not None else None,
        reconstruction=_load_json(reconstruction, "ENCODE reconstruction.json", ("metrics",)) if reconstruction is not None else None,
        metrics=load_metrics_json(metrics) if metrics is not None else None,
        baselines={name: load_metrics_json(p, f"EVALUATE metrics.json (baseline {name!r})") for name, p in (baselines or {}).items()},
        real=read_h5ad(real) if real is not None else None,
        generated=read_h5ad(generated) if generated is not None else None,
        trace=load_trace(trace) if trace is not None else None,
        paths=paths,
    )
    for name, p in (baselines or {}).items():
        inputs.paths[f"baseline {name}"] = str(p)
    inputs.dataset = (
        dataset
        or (inputs.metrics or {}).get("dataset")
        or (inputs.prepare or {}).get("dataset")
        or (None if inputs.real is None else inputs.real.uns.get("sclatent", {}).get("dataset"))
        or "dataset"
    )
    return inputs


# ----------------------------------------------------------------------------------------------------------
# HTML helpers
# ----------------------------------------------------------------------------------------------------------
class Html(str):
    """A string of trusted HTML (not escaped again by the table helpers)."""


def esc(value: Any) -> str:
    """HTML-escape anything except `Html`."""
    return value if isinstance(value, Html) else html.escape(str(value))


def slug(text: str) -> str:
    """A lowercase id fragment: runs of non-alphanumerics become '-' ('cell_line|protocol' -> 'cell-line-protocol')."""
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


def fmt(value: Any) -> str:
    """A number with 4 significant digits (ints as they are); None/NaN as an em dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def fmt_stat(entry: Any) -> str:
    """'mean ± SEM' of a {"mean", "sem"} entry, or a plain number."""
    if isinstance(entry, Mapping):
        mean, sem = entry.get("mean"), entry.get("sem")
        return fmt(mean) if sem is None else f"{fmt(mean)} ± {float(sem):.2g}"
    return fmt(entry)


def fmt_seconds(seconds: float | None) -> str:
    """Wall time as '12.3 s', '4 min 05 s' or '2 h 03 min' (non-breaking spaces between number and unit)."""
    if seconds is None:
        return "not recorded"
    s, nbsp = float(seconds), "\u00a0"  # no line break inside a duration
    if s < 60:
        return f"{s:.1f}{nbsp}s"
    if s < 3600:
        return f"{int(s // 60)}{nbsp}min {int(s % 60):02d}{nbsp}s"
    return f"{int(s // 3600)}{nbsp}h {int(s % 3600 // 60):02d}{nbsp}min"


_NUMBER = re.compile(r"[-−+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?( ± [\d.e+-]+)?|—")  # '1,024', '0.5 ± 0.01', not '0.1.0'


def table(header: Sequence[Any], rows: Sequence[Sequence[Any]], *, table_id: str | None = None) -> Html:
    """An HTML table; cells holding a number (or 'mean ± SEM') are right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td{" class=num" if _NUMBER.fullmatch(str(c)) else ""}>{esc(c)}</td>' for c in r) + "</tr>"
        for r in rows
    )
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return Html(f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def missing(text: str) -> Html:
    """The box a section shows in place of what it cannot draw."""
    return Html(f'<p class="missing">{esc(text)}</p>')


def details(summary: str, body: str) -> Html:
    """A collapsed block."""
    return Html(f"<details><summary>{esc(summary)}</summary>{body}</details>")


def json_block(obj: Any) -> Html:
    """Pretty-printed JSON in a <pre>, with long gene lists shortened."""
    return Html(f"<pre>{esc(json.dumps(_shorten(obj), indent=2, default=str))}</pre>")


def _shorten(obj: Any, limit: int = 20) -> Any:
    if isinstance(obj, Mapping):
        return {k: _shorten(v, limit) for k, v in obj.items()}
    if isinstance(obj, list) and len(obj) > limit:
        return [*obj[:5], f"... ({len(obj)} entries)"]
    if isinstance(obj, list):
        return [_shorten(v, limit) for v in obj]
    return obj


def figure_html(fig_id: str, fig: Any, caption: str, alt: str) -> Html:
    """Render a matplotlib Figure to an inline PNG <figure> (base64 data URI)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attach the Agg canvas: no pyplot, no global backend state
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return Html(
        f'<figure id="{esc(fig_id)}"><img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


@dataclass
class Section:
    """One report section: its id, title, body HTML, and the figure ids it holds."""

    id: str
    title: str
    nav: str  # short name in the page's navigation bar
    body: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def add(self, part: str) -> None:
        self.body.append(part)

    def add_missing(self, text: str) -> None:
        self.missing.append(text)
        self.body.append(missing(text))

    def add_figure(self, fig_id: str, fig: Any, caption: str, alt: str) -> None:
        self.body.append(figure_html(fig_id, fig, caption, alt))
        self.figures.append(fig_id)

    def html(self) -> str:
        return f'<section id="{esc(self.id)}"><h2>{esc(self.title)}</h2>{"".join(self.body)}</section>'


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
    return [{"step": step, "artefact": artefact, "given": given, "provenance": record[0], "seconds": record[1]}
            for step, artefact, given, record in steps]


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
        rows.append([
            r["step"], r["artefact"] if r["given"] else "not given",
            version or "—", fmt_seconds(r["seconds"]) if r["given"] else "—",
            _scalar_settings(p.get("config")) if r["given"] else "",
        ])
    known = [r["seconds"] for r in records if r["seconds"] is not None]
    sec.add(table(["step", "artefact", "sclatent", "wall time", "settings"], rows, table_id="table-steps"))
    sec.add(Html(f'<p class="note">Total recorded wall time: {esc(fmt_seconds(sum(known)) if known else "none recorded")} '
                 f"(each step's own record: prepare.json / manifest.json <code>elapsed_s</code>, the last "
                 f"<code>elapsed_s</code> of each history.csv, the generated h5ad's <code>uns['sclatent']['seconds']</code> "
                 f"summed over shards, metrics.json <code>elapsed_s</code>; ENCODE records none).</p>"))
    if len(versions) > 1:
        sec.add(missing(f"The steps ran with different sclatent versions: {', '.join(sorted(versions))}"))
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    env = [["sclatent (this report)", __version__], ["python", sys.version.split()[0]], ["platform", platform.platform()]]
    env += [[name, pkg(name)] for name in ("numpy", "pandas", "anndata", "scanpy", "umap-learn", "matplotlib", "torch")]
    step_env = [[r["step"], r["provenance"]["python"], r["provenance"].get("platform", "?")]
                for r in records if (r["provenance"] or {}).get("python")]
    sec.add(Html("<h3>Versions</h3>"))
    sec.add(table(["component", "version"], env, table_id="table-versions"))
    if step_env:
        sec.add(details("Python and platform of each step", table(["step", "python", "platform"], step_env)))
    sec.add(Html("<h3>Configuration of each step</h3>"))
    for r in records:
        if r["provenance"]:
            sec.add(details(f"{r['step']}: full configuration", json_block(r["provenance"].get("config", r["provenance"]))))
    if inputs.trace is not None:
        rows_t, matched = _trace_rows(inputs.trace, inputs.dataset)
        cols = [c for c in TRACE_COLUMNS if c in rows_t.columns]
        sec.add(Html("<h3>Execution trace</h3>"))
        if not matched:
            sec.add(Html(f'<p class="note">No trace row is tagged with dataset {esc(inputs.dataset)!s}: all {len(rows_t)} rows shown.</p>'))
        sec.add(table(cols, rows_t[cols].to_numpy().tolist(), table_id="table-trace"))
    else:
        sec.add(Html('<p class="note">No Nextflow execution trace given (--trace): wall times above are the steps\' own records.</p>'))
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
    rows: list[list[Any]] = [[
        f"input ({len(prep.get('files', []))} file(s))", fmt(cells), fmt(n_genes),
        f"genes: union {fmt(genes.get('union'))}, intersection {fmt(genes.get('intersection'))}",
    ]]
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
            rows.append([f"split: {name}", fmt(split[name]), "", f"test fraction {fmt(split.get('test_fraction'))}, stratified by {strata}"])
    if manifest is not None:
        rows.extend(_manifest_rows(manifest))
    return rows


def _manifest_rows(manifest: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for name, s in manifest.get("splits", {}).items():
        q = s.get("len_quantiles", {})
        rows.append([
            f"tokenized: {name}", fmt(s.get("n_cells")), fmt(manifest.get("n_genes")),
            f"vocabulary: {manifest.get('gene_selection', '?')}; expressed genes per cell median {fmt(q.get('50'))}, "
            f"max {fmt(s.get('max_len'))}; {fmt(s.get('n_empty_cells', 0))} empty cells, "
            f"{fmt(s.get('n_cells_over_max_tokens', 0))} over max_tokens={fmt(manifest.get('max_tokens'))}",
        ])
    return rows


def _generated_class_counts(gen: Any, groups: Sequence[str]) -> dict[str, dict[str, int]]:
    """Generated cells per class of each group ('k' or 'k1|k2') over all replicates."""
    out: dict[str, dict[str, int]] = {}
    for group in groups:
        keys = group.split(JOINT_SEPARATOR)
        if not all(k in gen.obs.columns for k in keys):
            continue
        labels = gen.obs[keys].astype(str).agg(JOINT_SEPARATOR.join, axis=1)
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
        sec.add(table(["step", "cells", "genes", "note"], _filter_rows(inputs.prepare, inputs.manifest), table_id="table-filters"))
    else:
        sec.add_missing("No prepare.json given (--prepare): QC filters and the split are not shown.")
        sec.add(table(["step", "cells", "genes", "note"], _manifest_rows(inputs.manifest), table_id="table-filters"))
    classes = (inputs.prepare or {}).get("classes", {})
    groups = list(dict.fromkeys(g for split in classes.values() for g in split))
    if not groups:
        sec.add_missing("No condition keys: the cells are one class.")
        return sec
    gen_counts = _generated_class_counts(inputs.generated, groups) if inputs.generated is not None else {}
    n_reps = inputs.generated.obs["replicate"].nunique() if inputs.generated is not None and "replicate" in inputs.generated.obs else 1
    sec.add(Html("<h3>Class sizes</h3>"))
    splits = list(classes)
    for group in groups:
        names = sorted({c for s in splits for c in classes[s].get(group, {})} | set(gen_counts.get(group, {})))
        with_gen = group in gen_counts
        header = ["class", *splits] + ([f"generated ({n_reps} replicate{'s' if n_reps > 1 else ''})"] if with_gen else [])
        rows = [[c, *[fmt(classes[s].get(group, {}).get(c, 0)) for s in splits], *([fmt(gen_counts[group].get(c, 0))] if with_gen else [])]
                for c in names]
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
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    return fig


def section_training(inputs: ReportInputs) -> Section:
    """Training curves of the VAE and of the prior."""
    sec = Section("training", "Training curves", "Training")
    for run, stage, option, fig_id in ((inputs.vae, "TRAIN_VAE (stage 1: VAE)", "--vae-history", "fig-training-vae"),
                                       (inputs.prior, "TRAIN_PRIOR (stage 2: DiT flow-matching prior)", "--prior-history", "fig-training-prior")):
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
        caption = (f"{len(h)} logged steps from {run.path.name}; final step {int(last['step'])}"
                   + (f" (epoch {int(last['epoch'])})" if "epoch" in h else "")
                   + "; final " + ", ".join(f"{t} {fmt(float(last[t]))}" for t in terms)
                   + (f"; wall time {fmt_seconds(float(last['elapsed_s']))}" if "elapsed_s" in h else "")
                   + ". Loss terms on a log axis where they span more than 30x.")
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
        return Column(f"{header} (1 replicate)", {**doc["generation"], "per_class": reps[0].get("per_class", {})}, False)
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


def _metrics_table(cols: Sequence[Column], kind: str, rows_spec: Sequence[tuple[str, str | None, str]], table_id: str) -> Html:
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
    sec.add(Html(
        f'<p class="note">{fmt(m.get("n_real"))} real test cells vs {fmt(m.get("n_generated"))} generated cells '
        f"({n_rep} replicate{'s' if n_rep != 1 else ''}). Feature space: {esc(fs.get('variant', '?'))}; "
        f"{esc(fs.get('normalization', ''))}; {fmt(fs.get('n_hvg'))} HVGs, {fmt(fs.get('n_pcs'))} PCs. "
        f"Subsampling caps (seeded, seed {esc(settings.get('seed'))}): {fmt(settings.get('max_cells'))} cells per side "
        f"for MMD²/1-NN/PRDC, {fmt(settings.get('w2_max_cells'))} for W2; classes need ≥ "
        f"{fmt(settings.get('min_cells_per_class'))} cells on both sides. Model columns: mean ± SEM over replicates. "
        f"The floor (real vs real) compares two stratified halves of the real cells, what this data allows; distances "
        f"shrink with the number of cells compared, so read it against the model at the same sizes (half size: "
        f"generated cells of one replicate, as many as in a half, vs the same real half).</p>"))
    if _floor(m) is None:
        sec.add_missing("The real-vs-real floor was not computed (EVALUATE --no-floor, or too few cells): no floor column.")
    cols = metric_columns(inputs)
    sec.add(Html("<h3>Overall</h3>"))
    sec.add(_metrics_table(cols, "overall", [(METRIC_NAMES.get(x, x), None, x) for x in DISTRIBUTION_METRICS], "table-overall"))

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
    sec.add(Html('<p class="note">For each condition key (and the joint combination of keys): the mean over classes; '
                 "± SEM over replicates of that mean for the model columns over replicates, ± SEM over classes for the "
                 "others.</p>"))
    reps = m.get("generation_per_replicate") or []
    for group, entry in per_class.items():
        n_classes = entry.get("n_classes")
        counts = n_classes if isinstance(n_classes, list) else [n_classes or 0]
        sec.add(Html(f"<p><b>{esc(group)}</b>: {esc(', '.join(str(x) for x in sorted(set(counts))))} classes evaluated</p>"))
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
def per_class_figure(m: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]], group: str) -> tuple[Any, list[str]]:
    """Bars per class of W2 and MMD² (model and baselines, ± SEM over replicates); hollow dots: the same at the
    floor's sizes; black tick: the real-vs-real floor."""
    docs = [("sclatent", m), *baselines.items()]
    series = [(name, class_values(doc, group), _get(_half(doc), "per_class", group, "classes") or {}) for name, doc in docs]
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
            ax.bar(xi, [np.nan if v is None else v for v in means], bar_w, yerr=[0.0 if s is None else s for s in sems],
                   color=PALETTE[i % len(PALETTE)], label=name, capsize=2)
            half_y = [_get(half, c, metric) for c in classes]
            if any(v is not None for v in half_y):
                ax.scatter(xi, [np.nan if v is None else v for v in half_y], marker="o", s=28, facecolors="white",
                           edgecolors=PALETTE[i % len(PALETTE)], linewidths=1.5, zorder=4, label=f"{name}, half size")
        floor_y = [_get(floor_classes, c, metric) for c in classes]
        if any(v is not None for v in floor_y):
            ax.scatter(x, [np.nan if v is None else v for v in floor_y], marker="_", s=600, color="black",
                       linewidths=2, zorder=3, label="real vs real (floor)")
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
            sec.add_missing(f"{group}: no class has enough cells on both sides "
                            f"({', '.join(s['class'] for s in skipped) or 'none'} skipped).")
            continue
        fig, classes = per_class_figure(m, inputs.baselines, group)
        caption = (f"{group}: {len(classes)} classes. Bars: mean over replicates ± SEM. Black tick: the same metric "
                   f"between two halves of the real cells of the class (the floor; absent where a half has too few "
                   f"cells). Hollow dots: the model at the floor's sizes (generated cells of one replicate vs the same "
                   f"real half), the number to compare with the tick.")
        sec.add_figure(f"fig-per-class-{slug(group)}", fig, caption, f"per-class W2 and MMD² of {group}")
    return sec


# ----------------------------------------------------------------------------------------------------------
# Embedding (UMAP) and marker genes
# ----------------------------------------------------------------------------------------------------------
@dataclass
class CellSample:
    """The real and generated cells the UMAP and dot plot use (seeded subsample, shared genes)."""

    real: Any  # AnnData (counts, shared genes)
    generated: Any  # AnnData
    n_real_total: int
    n_generated_total: int
    replicate: Any
    keys: list[str]
    hvg_mask: np.ndarray  # (G,) bool over the shared genes
    hvg_note: str


def _subsample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a seeded subsample of at most `cap` of n rows."""
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))


def _condition_keys(inputs: ReportInputs) -> list[str]:
    for source in ((inputs.metrics or {}).get("condition_keys"), (inputs.manifest or {}).get("condition_keys"),
                   ((inputs.prepare or {}).get("provenance") or {}).get("config", {}).get("condition_keys")):
        if source is not None:
            return list(source)
    if inputs.real is not None:
        return [str(k) for k in inputs.real.uns.get("sclatent", {}).get("condition_keys", [])]
    return []


def cell_sample(inputs: ReportInputs, max_cells: int, seed: int) -> CellSample:
    """Seeded subsample (<= max_cells per side) of the real cells and of the first generated replicate."""
    real, gen = inputs.real, inputs.generated
    replicate = None
    if "replicate" in gen.obs.columns:
        replicate = sorted(gen.obs["replicate"].unique().tolist())[0]
        gen = gen[(gen.obs["replicate"] == replicate).to_numpy()]
    try:
        genes = align_genes(real, gen)
    except ValueError as exc:
        raise InputError(f"--real {inputs.paths.get('real')} vs --generated {inputs.paths.get('generated')}: {exc}") from None
    rng = np.random.default_rng(seed)
    idx_r = _subsample(real.n_obs, max_cells, rng)
    idx_g = _subsample(gen.n_obs, max_cells, rng)
    real_s = real[idx_r, genes].copy()
    gen_s = gen[idx_g, genes].copy()
    if "highly_variable" in real.var.columns:
        hvg = real.var.loc[genes, "highly_variable"].to_numpy(dtype=bool)
        note = f"{int(hvg.sum())} HVGs (PREPARE's flags) of {len(genes)} shared genes"
    else:
        hvg = np.ones(len(genes), dtype=bool)
        note = f"no var['highly_variable'] in the real data: all {len(genes)} shared genes"
    if not hvg.any():
        hvg = np.ones(len(genes), dtype=bool)
        note = f"no flagged HVG among the shared genes: all {len(genes)} shared genes"
    keys = [k for k in _condition_keys(inputs) if k in real_s.obs.columns and k in gen_s.obs.columns]
    return CellSample(real_s, gen_s, real.n_obs, gen.n_obs, replicate, keys, hvg, note)


def _csr(adata: Any) -> sp.csr_matrix:
    return sp.csr_matrix(adata.X, dtype=np.float64)


def umap_embedding(cells: CellSample, n_pcs: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """UMAP (n_real + n_gen, 2) of both sides in EVALUATE's feature space; info for the caption."""
    import anndata as ad
    import scanpy as sc

    n_real = cells.real.n_obs
    n_pcs = max(1, min(n_pcs, int(cells.hvg_mask.sum()), n_real - 1))
    real_pcs, gen_pcs, info = feature_space(_csr(cells.real), _csr(cells.generated), cells.hvg_mask, n_pcs)  # (n, p), (n', p)
    union = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n_real + cells.generated.n_obs)]))
    union.obsm["X_pca"] = np.vstack([real_pcs, gen_pcs]).astype(np.float32)  # (n + n', p)
    n_neighbors = max(2, min(UMAP_NEIGHBORS, union.n_obs - 1))
    sc.pp.neighbors(union, n_neighbors=n_neighbors, use_rep="X_pca", random_state=seed)
    sc.tl.umap(union, random_state=seed)
    return np.asarray(union.obsm["X_umap"]), {"n_pcs": n_pcs, "n_neighbors": n_neighbors, **info}


LEGEND_DOT_AREA = 25.0  # points², whatever the size of the dots in the plot


def _scatter_legend(ax: Any, n: int, dot_area: float) -> None:
    ax.legend(fontsize=7, markerscale=math.sqrt(LEGEND_DOT_AREA / dot_area), loc="center left", bbox_to_anchor=(1.0, 0.5),
              frameon=False, ncol=1 if n <= 16 else 2)


def umap_source_figure(xy: np.ndarray, n_real: int) -> Any:
    """All cells, coloured real vs generated (generated drawn on top, half transparent)."""
    fig = _new_figure(6.5, 5.0)
    ax = fig.subplots()
    size = max(2.0, min(18.0, 6000.0 / len(xy)))
    ax.scatter(xy[:n_real, 0], xy[:n_real, 1], s=size, c=REAL_COLOUR, alpha=0.7, linewidths=0, label=f"real ({n_real})")
    ax.scatter(xy[n_real:, 0], xy[n_real:, 1], s=size, c=GENERATED_COLOUR, alpha=0.5, linewidths=0, label=f"generated ({len(xy) - n_real})")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_xlabel("UMAP 1"), ax.set_ylabel("UMAP 2")
    _scatter_legend(ax, 2, size)
    return fig


def umap_key_figure(xy: np.ndarray, real_labels: np.ndarray, gen_labels: np.ndarray, key: str) -> Any:
    """Two panels on the same embedding: real cells and generated cells, coloured by the classes of `key`."""
    n_real = len(real_labels)
    classes = sorted(set(real_labels.tolist()) | set(gen_labels.tolist()))
    cmap = _class_colours(classes)
    fig = _new_figure(11.5, 4.8)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    size = max(2.0, min(18.0, 6000.0 / len(xy)))
    for ax, part, labels, title in ((axes[0], xy[:n_real], real_labels, "real"), (axes[1], xy[n_real:], gen_labels, "generated")):
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="#e6e6e6", linewidths=0)  # all cells as a grey backdrop
        for cls in classes:
            sel = labels == cls
            if sel.any():
                ax.scatter(part[sel, 0], part[sel, 1], s=size, color=cmap[cls], linewidths=0, alpha=0.8)
        ax.set_title(f"{title}: {key}", fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
    axes[0].set_ylabel("UMAP 2")
    for cls in classes:  # legend entries for every class, whichever panel has its cells
        axes[1].scatter([], [], s=size, color=cmap[cls], label=cls)
    _scatter_legend(axes[1], len(classes), size)
    return fig


def _class_colours(classes: Sequence[str]) -> dict[str, Any]:
    if len(classes) <= len(PALETTE):
        return {c: PALETTE[i] for i, c in enumerate(classes)}
    from matplotlib import colormaps

    cmap = colormaps["tab20" if len(classes) <= 20 else "gist_ncar"]
    return {c: cmap(i / max(1, len(classes) - 1) if len(classes) > 20 else i) for i, c in enumerate(classes)}


def section_umap(inputs: ReportInputs, cells: CellSample | None, why: str, max_cells: int, seed: int) -> Section:
    """UMAP of real vs generated cells, overall and coloured by each condition key."""
    sec = Section("umap", "UMAP: real vs generated cells", "UMAP")
    if cells is None:
        sec.add_missing(why)
        return sec
    if cells.real.n_obs < 3 or cells.generated.n_obs < 1:
        sec.add_missing(f"Too few cells for a UMAP ({cells.real.n_obs} real, {cells.generated.n_obs} generated).")
        return sec
    t0 = time.time()
    n_pcs = ((inputs.metrics or {}).get("generation", {}).get("feature_space") or {}).get("n_pcs") or DEFAULT_N_PCS
    xy, info = umap_embedding(cells, int(n_pcs), seed)
    log.info("UMAP of %d + %d cells in %.1fs", cells.real.n_obs, cells.generated.n_obs, time.time() - t0)
    n_real = cells.real.n_obs
    rep = "" if cells.replicate is None else f" of replicate {cells.replicate}"
    base = (f"{n_real} of {cells.n_real_total} real cells and {cells.generated.n_obs} of {cells.n_generated_total} "
            f"generated cells{rep} (seeded subsample, seed {seed}, at most {max_cells} per side). "
            f"EVALUATE's feature space: normalize_total({TARGET_SUM:g}) over {info['n_genes_shared']} shared genes, log1p, "
            f"{cells.hvg_note}, PCA with {info['n_pcs']} components fitted on the real cells shown (generated cells "
            f"projected with the real mean); scanpy neighbours (k={info['n_neighbors']}) and UMAP on the union.")
    sec.add_figure("fig-umap-source", umap_source_figure(xy, n_real), base, "UMAP of real and generated cells")
    if not cells.keys:
        sec.add_missing("No condition keys (or none present in both files): no UMAP coloured by class.")
    for key in cells.keys:
        real_l = cells.real.obs[key].astype(str).to_numpy()
        gen_l = cells.generated.obs[key].astype(str).to_numpy()
        sec.add_figure(f"fig-umap-{slug(key)}", umap_key_figure(xy, real_l, gen_l, key),
                       f"Coloured by {key} (same embedding; other cells in grey). " + base, f"UMAP coloured by {key}")
    return sec


def _log_normalize_sparse(counts: sp.csr_matrix) -> sp.csr_matrix:
    """log1p(normalize_total(counts, 1e4)) over all columns, kept sparse: (n, G) -> (n, G)."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = TARGET_SUM / np.where(totals > 0, totals, 1.0)
    out = sp.csr_matrix(sp.diags(scale) @ counts)
    out.data = np.log1p(out.data)
    return out


def marker_genes(real: Any, key: str, n_per_class: int, seed: int) -> tuple[list[str], list[str]]:
    """Top markers of each class of `key` (scanpy rank_genes_groups, t-test, on log-normalised real cells).

    Returns (classes, genes): the classes with >= MIN_MARKER_CELLS cells (the MAX_MARKER_CLASSES largest),
    and the union of their top `n_per_class` genes in class order (at most MAX_MARKER_GENES).
    """
    import anndata as ad
    import scanpy as sc

    labels = real.obs[key].astype(str)
    sizes = labels.value_counts()
    classes = sorted(sizes[sizes >= MIN_MARKER_CELLS].index[:MAX_MARKER_CLASSES].tolist())
    if len(classes) < 2:
        return classes, []
    keep = labels.isin(classes).to_numpy()
    obs = pd.DataFrame({key: pd.Categorical(labels[keep].to_numpy())}, index=real.obs_names[keep])
    data = ad.AnnData(X=_log_normalize_sparse(_csr(real[keep])), obs=obs, var=pd.DataFrame(index=real.var_names))  # (n, G)
    sc.tl.rank_genes_groups(data, key, groups=classes, reference="rest", method="t-test", n_genes=max(n_per_class * 4, 10))
    names = data.uns["rank_genes_groups"]["names"]
    per_class = max(1, min(n_per_class, MAX_MARKER_GENES // len(classes)))
    genes: list[str] = []
    for cls in classes:
        top = [g for g in names[cls] if g not in genes][:per_class]
        genes.extend(top)
    return classes, genes


def dot_stats(adata: Any, labels: np.ndarray, classes: Sequence[str], genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of cells expressing (count > 0) and mean log-normalised expression: (C, g) each."""
    col = pd.Index(adata.var_names).get_indexer(list(genes))
    counts = _csr(adata)
    logn = _log_normalize_sparse(counts)[:, col].toarray()  # (n, g)
    expressed = counts[:, col].toarray() > 0  # (n, g)
    frac = np.full((len(classes), len(genes)), np.nan)
    mean = np.full((len(classes), len(genes)), np.nan)
    for i, cls in enumerate(classes):
        sel = labels == cls
        if sel.any():
            frac[i] = expressed[sel].mean(axis=0)
            mean[i] = logn[sel].mean(axis=0)
    return frac, mean


def gene_labels(var: pd.DataFrame, genes: Sequence[str]) -> list[str]:
    """Gene symbols from the first of GENE_SYMBOL_COLUMNS that `var` has, else the gene names themselves."""
    for column in GENE_SYMBOL_COLUMNS:
        if column in var.columns:
            return [str(var.at[g, column]) for g in genes]
    return [str(g) for g in genes]


def dot_plot_figure(classes: Sequence[str], genes: Sequence[str], real_stats: tuple[np.ndarray, np.ndarray],
                    gen_stats: tuple[np.ndarray, np.ndarray], key: str) -> Any:
    """Rows: each class twice (real, then generated); columns: marker genes.

    Drawn with matplotlib rather than `sc.pl.dotplot` so that the real and the generated row of a class sit
    next to each other on one shared size and colour scale, without pyplot's global figure state.
    Dot area: fraction of cells expressing; colour: mean log-normalised expression divided by the gene's
    maximum over all rows (so real and generated of one gene are on the same scale).
    """
    n_c, n_g = len(classes), len(genes)
    frac = np.empty((2 * n_c, n_g))
    mean = np.empty((2 * n_c, n_g))
    frac[0::2], frac[1::2] = real_stats[0], gen_stats[0]
    mean[0::2], mean[1::2] = real_stats[1], gen_stats[1]
    top = np.nanmax(np.where(np.isfinite(mean), mean, -np.inf), axis=0)
    scaled = mean / np.where(top > 0, top, 1.0)
    y = np.arange(2 * n_c) + np.repeat(np.arange(n_c), 2) * 0.6  # a gap between classes
    fig = _new_figure(max(5.0, 0.32 * n_g + 3.5), max(3.0, 0.3 * 2 * n_c + 1.8))
    ax = fig.subplots()
    gx, gy = np.meshgrid(np.arange(n_g), y)
    ok = np.isfinite(frac)
    points = ax.scatter(gx[ok], gy[ok], s=np.clip(frac[ok], 0, 1) * 120 + 1, c=scaled[ok], cmap="Reds", vmin=0, vmax=1,
                        edgecolors="#666666", linewidths=0.3)
    ax.set_xticks(np.arange(n_g))
    ax.set_xticklabels(genes, rotation=90, fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{c} · {side}" for c in classes for side in ("real", "generated")], fontsize=7)
    for label in ax.get_yticklabels()[1::2]:
        label.set_color(GENERATED_COLOUR)
    ax.invert_yaxis()
    ax.set_xlim(-0.7, n_g - 0.3)
    ax.set_title(f"top marker genes per class of {key}", fontsize=10)
    cbar = fig.colorbar(points, ax=ax, shrink=0.5, pad=0.01)
    cbar.set_label("mean expression / gene max", fontsize=7)
    for f in (0.25, 0.5, 1.0):
        ax.scatter([], [], s=f * 120 + 1, c="#bbbbbb", edgecolors="#666666", linewidths=0.3, label=f"{int(f * 100)}%")
    ax.legend(title="expressing", fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(1.12, 1.0), frameon=False, labelspacing=1.2)
    return fig


def section_markers(cells: CellSample | None, why: str, marker_key: str | None, n_markers: int, seed: int) -> Section:
    """Dot plot of the top marker genes per class (from the real cells), real vs generated."""
    sec = Section("markers", "Marker genes: real vs generated", "Markers")
    if cells is None:
        sec.add_missing(why)
        return sec
    if marker_key is not None and marker_key not in cells.keys:
        raise InputError(f"--marker-key {marker_key!r} is not a condition key present in both files (have: {', '.join(cells.keys) or 'none'})")
    candidates = [marker_key] if marker_key else cells.keys
    key = next((k for k in candidates if (cells.real.obs[k].astype(str).value_counts() >= MIN_MARKER_CELLS).sum() >= 2), None)
    if key is None:
        sec.add_missing("Marker genes need a condition key with at least 2 classes of "
                        f"≥ {MIN_MARKER_CELLS} real cells; {'no condition keys' if not cells.keys else 'none has'}.")
        return sec
    t0 = time.time()
    classes, genes = marker_genes(cells.real, key, n_markers, seed)
    real_l = cells.real.obs[key].astype(str).to_numpy()
    gen_l = cells.generated.obs[key].astype(str).to_numpy()
    fig = dot_plot_figure(classes, gene_labels(cells.real.var, genes), dot_stats(cells.real, real_l, classes, genes),
                          dot_stats(cells.generated, gen_l, classes, genes), key)
    log.info("marker genes of %d classes of %s in %.1fs", len(classes), key, time.time() - t0)
    absent = [c for c in classes if not (gen_l == c).any()]
    caption = (f"Top {min(n_markers, MAX_MARKER_GENES // len(classes)) or 1} marker genes of each class of {key} "
               f"(scanpy rank_genes_groups, t-test vs the rest, on the {cells.real.n_obs} real cells shown in the UMAP; "
               f"log1p(normalize_total({TARGET_SUM:g})) over the shared genes), and the same statistics on the "
               f"{cells.generated.n_obs} generated cells. Classes with fewer than {MIN_MARKER_CELLS} real cells are left out."
               + (f" No generated cells for: {', '.join(absent)}." if absent else ""))
    sec.add_figure("fig-markers", fig, caption, f"dot plot of marker genes per class of {key}")
    return sec


# ----------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------
def render(sections: Sequence[Section], inputs: ReportInputs, elapsed_s: float) -> str:
    """The whole HTML document."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.nav)}</a>' for s in sections)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"sclatent report: {inputs.dataset}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head><body><main>"
        f"<h1>{esc(title)}</h1><p class=\"note\">scLDM (latent diffusion for single-cell expression): "
        f"sclatent {esc(__version__)}, built {esc(now)}.</p><nav>{nav}</nav>"
        + "".join(s.html() for s in sections)
        + f"<footer>Self-contained page: every figure is an inline PNG; nothing is loaded from elsewhere. "
        f"Built in {elapsed_s:.1f} s.</footer></main></body></html>\n"
    )


def build_report(inputs: ReportInputs, *, max_cells: int = DEFAULT_MAX_CELLS, seed: int = 0,
                 marker_key: str | None = None, n_markers: int = N_MARKERS) -> tuple[str, dict[str, Any]]:
    """Build every section; returns (html, summary) where summary lists sections, figures and what is missing."""
    if max_cells < 10:
        raise InputError(f"--max-cells must be at least 10, got {max_cells}")
    if n_markers < 1:
        raise InputError(f"--n-markers must be at least 1, got {n_markers}")
    t0 = time.time()
    if inputs.real is None or inputs.generated is None:
        cells, why = None, "Needs both the real test cells (--real) and the generated cells (--generated)."
    else:
        cells, why = cell_sample(inputs, max_cells, seed), ""
    sections = [
        section_run_summary(inputs),
        section_data_summary(inputs),
        section_training(inputs),
        section_reconstruction(inputs),
        section_metrics(inputs),
        section_per_class(inputs),
        section_umap(inputs, cells, why, max_cells, seed),
        section_markers(cells, why, marker_key, n_markers, seed),
    ]
    elapsed = time.time() - t0
    summary = {
        "dataset": inputs.dataset,
        "sections": [s.id for s in sections],
        "figures": [f for s in sections for f in s.figures],
        "missing": {s.id: s.missing for s in sections if s.missing},
        "cells": None if cells is None else {"real": cells.real.n_obs, "generated": cells.generated.n_obs},
        "elapsed_s": round(elapsed, 3),
    }
    return render(sections, inputs, elapsed), summary


def make_report(
    out: str | Path,
    *,
    max_cells: int = DEFAULT_MAX_CELLS,
    seed: int = 0,
    marker_key: str | None = None,
    n_markers: int = N_MARKERS,
    **sources: Any,
) -> dict[str, Any]:
    """`sclatent report`: read the inputs (`sources`: the keyword arguments of `load_inputs`), build the page and
    write it atomically to `out`; returns the summary."""
    inputs = load_inputs(**sources)
    page, summary = build_report(inputs, max_cells=max_cells, seed=seed, marker_key=marker_key, n_markers=n_markers)
    with atomic_path(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    missing_txt = "; ".join(f"{k}: {len(v)} missing part(s)" for k, v in summary["missing"].items()) or "nothing missing"
    log.info("REPORT %s: %d sections, %d figures, %.0f kB in %.1fs (%s)", out, len(summary["sections"]),
             len(summary["figures"]), len(page) / 1024, summary["elapsed_s"], missing_txt)
    return summary
