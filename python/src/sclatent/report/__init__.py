"""REPORT: one self-contained HTML page per dataset, from the artefacts the other steps wrote.

Inputs (every one optional; a section whose inputs are missing says so instead of failing):
PREPARE's `prepare.json`, TOKENIZE's `manifest.json`, the two training runs' `history.csv` (with the
`config.json` beside each), ENCODE's `reconstruction.json`, EVALUATE's `metrics.json` (plus any number of
baseline `metrics.json` files of the same structure), the real test cells (`test.h5ad`) and the generated
cells (gathered SAMPLE output), and optionally a Nextflow execution trace.

First, where it applies, a "read this first" box (`read-first`): a test-size (tiny) model, and generated cells
far below the real-vs-real floor in recall, coverage or kNN-F1 (possible mode collapse).

Sections (HTML ids): `run-summary` (version, configuration and wall time of every step), `data-summary`
(cells and genes through each filter, class sizes per split), `training` (loss terms and learning rate vs
step, both stages), `reconstruction`, `metrics` (overall, label and per-class tables, mean ± SEM, with the
model at the floor's sample size beside the real-vs-real floor, then all test cells and baselines), `per-class`
(bar charts of W2 and MMD² per class, with the floor),
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

import datetime as _dt
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..io import InputError, atomic_path
from .cells import cell_sample, section_markers, section_umap
from .comparison import read_first, section_metrics, section_per_class
from .heldout import section_held_out
from .html import CSS, DEFAULT_MAX_CELLS, N_MARKERS, Section, esc
from .inputs import ReportInputs, load_inputs, parse_baselines
from .sections import section_data_summary, section_reconstruction, section_run_summary, section_training

__all__ = ["build_report", "load_inputs", "make_report", "parse_baselines"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------
def render(sections: Sequence[Section], inputs: ReportInputs, elapsed_s: float) -> str:
    """The whole HTML document."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.nav)}</a>' for s in sections)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"sclatent report: {inputs.dataset}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><main>"
        f'<h1>{esc(title)}</h1><p class="note">scLDM (latent diffusion for single-cell expression): '
        f"sclatent {esc(__version__)}, built {esc(now)}.</p>{read_first(inputs)}<nav>{nav}</nav>"
        + "".join(s.html() for s in sections)
        + f"<footer>Self-contained page: every figure is an inline PNG; nothing is loaded from elsewhere. "
        f"Built in {elapsed_s:.1f} s.</footer></main></body></html>\n"
    )


def build_report(
    inputs: ReportInputs,
    *,
    max_cells: int = DEFAULT_MAX_CELLS,
    seed: int = 0,
    marker_key: str | None = None,
    n_markers: int = N_MARKERS,
) -> tuple[str, dict[str, Any]]:
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
        section_held_out(inputs),
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
    missing_txt = (
        "; ".join(f"{k}: {len(v)} missing part(s)" for k, v in summary["missing"].items()) or "nothing missing"
    )
    log.info(
        "REPORT %s: %d sections, %d figures, %.0f kB in %.1fs (%s)",
        out,
        len(summary["sections"]),
        len(summary["figures"]),
        len(page) / 1024,
        summary["elapsed_s"],
        missing_txt,
    )
    return summary
