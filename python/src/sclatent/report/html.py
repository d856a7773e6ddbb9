"""HTML building blocks of the report: escaping, number formats, tables, figures, sections, the style sheet."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


DEFAULT_MAX_CELLS = 3_000  # per side, for the UMAP and the dot plot (UMAP time grows ~linearly with cells)
DEFAULT_N_PCS = 30  # EVALUATE's default, used when metrics.json does not record its own
UMAP_NEIGHBORS = 15  # scanpy's default n_neighbors
N_MARKERS = 3  # top marker genes per class in the dot plot
MAX_MARKER_GENES = 40  # at most this many genes (columns) in the dot plot
MAX_MARKER_CLASSES = 30  # at most this many classes (the largest ones) in the dot plot
MIN_MARKER_CELLS = 3  # a class needs this many real cells to enter rank_genes_groups
GENE_SYMBOL_COLUMNS = (
    "gene_symbols",
    "gene_symbol",
    "feature_name",
    "symbol",
    "gene_name",
)  # var columns shown instead of ids
BAR_METRICS: tuple[str, ...] = ("w2", "mmd2_rbf")  # per-class bar charts
COLLAPSE_FRACTION = 0.5  # recall, coverage or kNN-F1 below this fraction of the floor's is flagged at the top
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
.alert{background:#fdecea;border-left:5px solid #c0392b;padding:.5em 1em;margin:1em 0} .alert ul{margin:.3em 0}
.note{font-size:.88em;color:#555}
details{margin:.4em 0} summary{cursor:pointer;color:#4C72B0}
pre{background:#f4f4f4;padding:.6em;font-size:.8em;overflow-x:auto;max-height:30em}
footer{margin-top:3em;font-size:.8em;color:#777}
"""


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
        "<tr>" + "".join(f"<td{' class=num' if _NUMBER.fullmatch(str(c)) else ''}>{esc(c)}</td>" for c in r) + "</tr>"
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
