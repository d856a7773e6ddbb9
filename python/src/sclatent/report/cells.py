"""The report's cell-level views: UMAP of real and generated cells, and a dot plot of marker genes."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..counts import TARGET_SUM, log1p_cp10k, subsample
from ..io import InputError
from ..metrics import align_genes, feature_space
from .html import (
    DEFAULT_N_PCS,
    GENE_SYMBOL_COLUMNS,
    GENERATED_COLOUR,
    MAX_MARKER_CLASSES,
    MAX_MARKER_GENES,
    MIN_MARKER_CELLS,
    PALETTE,
    REAL_COLOUR,
    UMAP_NEIGHBORS,
    Html,
    Section,
    _new_figure,
    esc,
    slug,
)
from .inputs import ReportInputs

log = logging.getLogger(__name__)


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


def _condition_keys(inputs: ReportInputs) -> list[str]:
    for source in (
        (inputs.metrics or {}).get("condition_keys"),
        (inputs.manifest or {}).get("condition_keys"),
        ((inputs.prepare or {}).get("provenance") or {}).get("config", {}).get("condition_keys"),
    ):
        if source is not None:
            return list(source)
    if inputs.real is not None:
        return [str(k) for k in inputs.real.uns.get("sclatent", {}).get("condition_keys", [])]
    return []


def cell_sample(inputs: ReportInputs, max_cells: int, seed: int) -> CellSample:
    """Seeded subsample (<= max_cells per side) of the real cells and of the first generated replicate."""
    real, gen = inputs.real, inputs.generated
    replicate = None
    rows_g = np.arange(gen.n_obs)
    if "replicate" in gen.obs.columns:
        replicate = sorted(gen.obs["replicate"].unique().tolist())[0]
        rows_g = np.flatnonzero((gen.obs["replicate"] == replicate).to_numpy())
    real_names = set(map(str, real.var_names))
    if not all(str(g) in real_names for g in gen.var_names):  # a model run on another panel: the shared genes
        gen = gen[:, [g for g in gen.var_names if str(g) in real_names]]
    try:
        genes = align_genes(real, gen)
    except ValueError as exc:
        raise InputError(
            f"--real {inputs.paths.get('real')} vs --generated {inputs.paths.get('generated')}: {exc}"
        ) from None
    rng = np.random.default_rng(seed)
    idx_r = subsample(real.n_obs, max_cells, rng)
    idx_g = rows_g[subsample(len(rows_g), max_cells, rng)]
    real_s = _cells(real, idx_r, inputs.paths.get("real"))[:, genes].copy()
    gen_s = _cells(gen, idx_g, inputs.paths.get("generated"))[:, genes].copy()
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
    return CellSample(real_s, gen_s, real.n_obs, len(rows_g), replicate, keys, hvg, note)


def _cells(adata: Any, rows: np.ndarray, path: str | None) -> Any:
    """The cells `rows` (ascending) of an AnnData with their counts: sliced in memory, or read from `path` for those
    rows only when the AnnData holds no X."""
    import anndata as ad

    from ..ondisk import H5adCounts

    if adata.X is not None:
        return adata[rows]
    with H5adCounts(path) as counts:
        X = counts.take(rows)
        if counts.n_vars != adata.n_vars:  # `adata` holds a subset of the file's genes
            X = X[:, counts.var_names.get_indexer(adata.var_names)]
    out = ad.AnnData(X=X, obs=adata.obs.iloc[rows].copy(), var=adata.var.copy())
    out.uns = adata.uns
    return out


def _csr(adata: Any) -> sp.csr_matrix:
    return sp.csr_matrix(adata.X, dtype=np.float64)


def umap_embedding(cells: CellSample, n_pcs: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """UMAP (n_real + n_gen, 2) of both sides in EVALUATE's feature space; info for the caption."""
    import anndata as ad
    import scanpy as sc

    n_real = cells.real.n_obs
    n_pcs = max(1, min(n_pcs, int(cells.hvg_mask.sum()), n_real - 1))
    real_pcs, gen_pcs, info = feature_space(
        _csr(cells.real), _csr(cells.generated), cells.hvg_mask, n_pcs
    )  # (n, p), (n', p)
    union = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n_real + cells.generated.n_obs)]))
    union.obsm["X_pca"] = np.vstack([real_pcs, gen_pcs]).astype(np.float32)  # (n + n', p)
    n_neighbors = max(2, min(UMAP_NEIGHBORS, union.n_obs - 1))
    sc.pp.neighbors(union, n_neighbors=n_neighbors, use_rep="X_pca", random_state=seed)
    sc.tl.umap(union, random_state=seed)
    return np.asarray(union.obsm["X_umap"]), {"n_pcs": n_pcs, "n_neighbors": n_neighbors, **info}


LEGEND_DOT_AREA = 25.0  # points², whatever the size of the dots in the plot


def _scatter_legend(ax: Any, n: int, dot_area: float) -> None:
    ax.legend(
        fontsize=7,
        markerscale=math.sqrt(LEGEND_DOT_AREA / dot_area),
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
        ncol=1 if n <= 16 else 2,
    )


def umap_source_figure(xy: np.ndarray, n_real: int) -> Any:
    """All cells, coloured real vs generated (generated drawn on top, half transparent)."""
    fig = _new_figure(6.5, 5.0)
    ax = fig.subplots()
    size = max(2.0, min(18.0, 6000.0 / len(xy)))
    ax.scatter(xy[:n_real, 0], xy[:n_real, 1], s=size, c=REAL_COLOUR, alpha=0.7, linewidths=0, label=f"real ({n_real})")
    ax.scatter(
        xy[n_real:, 0],
        xy[n_real:, 1],
        s=size,
        c=GENERATED_COLOUR,
        alpha=0.5,
        linewidths=0,
        label=f"generated ({len(xy) - n_real})",
    )
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
    for ax, part, labels, title in (
        (axes[0], xy[:n_real], real_labels, "real"),
        (axes[1], xy[n_real:], gen_labels, "generated"),
    ):
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
    base = (
        f"{n_real} of {cells.n_real_total} real cells and {cells.generated.n_obs} of {cells.n_generated_total} "
        f"generated cells{rep} (seeded subsample, seed {seed}, at most {max_cells} per side). "
        f"EVALUATE's feature space: normalize_total({TARGET_SUM:g}) over {info['n_genes_shared']} shared genes, log1p, "
        f"{cells.hvg_note}, PCA with {info['n_pcs']} components fitted on the real cells shown (generated cells "
        f"projected with the real mean); scanpy neighbours (k={info['n_neighbors']}) and UMAP on the union."
    )
    # what every UMAP below shows, said once
    sec.add(Html(f'<p class="note">{esc(base)}</p>'))
    sec.add_figure(
        "fig-umap-source",
        umap_source_figure(xy, n_real),
        "Real and generated cells.",
        "UMAP of real and generated cells",
    )
    if not cells.keys:
        sec.add_missing("No condition keys (or none present in both files): no UMAP coloured by class.")
    for key in cells.keys:
        real_l = cells.real.obs[key].astype(str).to_numpy()
        gen_l = cells.generated.obs[key].astype(str).to_numpy()
        sec.add_figure(
            f"fig-umap-{slug(key)}",
            umap_key_figure(xy, real_l, gen_l, key),
            f"Coloured by {key}: real cells (left) and generated cells (right) on the same embedding, the others "
            "in grey.",
            f"UMAP coloured by {key}",
        )
    return sec


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
    data = ad.AnnData(X=log1p_cp10k(_csr(real[keep])), obs=obs, var=pd.DataFrame(index=real.var_names))  # (n, G)
    sc.tl.rank_genes_groups(
        data, key, groups=classes, reference="rest", method="t-test", n_genes=max(n_per_class * 4, 10)
    )
    names = data.uns["rank_genes_groups"]["names"]
    per_class = max(1, min(n_per_class, MAX_MARKER_GENES // len(classes)))
    genes: list[str] = []
    for cls in classes:
        top = [g for g in names[cls] if g not in genes][:per_class]
        genes.extend(top)
    return classes, genes


def dot_stats(
    adata: Any, labels: np.ndarray, classes: Sequence[str], genes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of cells expressing (count > 0) and mean log-normalised expression: (C, g) each."""
    col = pd.Index(adata.var_names).get_indexer(list(genes))
    counts = _csr(adata)
    logn = log1p_cp10k(counts)[:, col].toarray()  # (n, g)
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


def dot_plot_figure(
    classes: Sequence[str],
    genes: Sequence[str],
    real_stats: tuple[np.ndarray, np.ndarray],
    gen_stats: tuple[np.ndarray, np.ndarray],
    key: str,
) -> Any:
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
    points = ax.scatter(
        gx[ok],
        gy[ok],
        s=np.clip(frac[ok], 0, 1) * 120 + 1,
        c=scaled[ok],
        cmap="Reds",
        vmin=0,
        vmax=1,
        edgecolors="#666666",
        linewidths=0.3,
    )
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
    ax.legend(
        title="expressing",
        fontsize=7,
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.12, 1.0),
        frameon=False,
        labelspacing=1.2,
    )
    return fig


def section_markers(cells: CellSample | None, why: str, marker_key: str | None, n_markers: int, seed: int) -> Section:
    """Dot plot of the top marker genes per class (from the real cells), real vs generated."""
    sec = Section("markers", "Marker genes: real vs generated", "Markers")
    if cells is None:
        sec.add_missing(why)
        return sec
    if marker_key is not None and marker_key not in cells.keys:
        raise InputError(
            f"--marker-key {marker_key!r} is not a condition key present in both files (have: "
            f"{', '.join(cells.keys) or 'none'})"
        )
    candidates = [marker_key] if marker_key else cells.keys
    key = next(
        (k for k in candidates if (cells.real.obs[k].astype(str).value_counts() >= MIN_MARKER_CELLS).sum() >= 2), None
    )
    if key is None:
        sec.add_missing(
            "Marker genes need a condition key with at least 2 classes of "
            f"≥ {MIN_MARKER_CELLS} real cells; {'no condition keys' if not cells.keys else 'none has'}."
        )
        return sec
    t0 = time.time()
    classes, genes = marker_genes(cells.real, key, n_markers, seed)
    real_l = cells.real.obs[key].astype(str).to_numpy()
    gen_l = cells.generated.obs[key].astype(str).to_numpy()
    fig = dot_plot_figure(
        classes,
        gene_labels(cells.real.var, genes),
        dot_stats(cells.real, real_l, classes, genes),
        dot_stats(cells.generated, gen_l, classes, genes),
        key,
    )
    log.info("marker genes of %d classes of %s in %.1fs", len(classes), key, time.time() - t0)
    absent = [c for c in classes if not (gen_l == c).any()]
    caption = (
        f"Top {min(n_markers, MAX_MARKER_GENES // len(classes)) or 1} marker genes of each class of {key} "
        f"(scanpy rank_genes_groups, t-test vs the rest, on the {cells.real.n_obs} real cells shown in the UMAP; "
        f"log1p(normalize_total({TARGET_SUM:g})) over the shared genes), and the same statistics on the "
        f"{cells.generated.n_obs} generated cells. Classes with fewer than {MIN_MARKER_CELLS} real cells are left out."
        + (f" No generated cells for: {', '.join(absent)}." if absent else "")
    )
    sec.add_figure("fig-markers", fig, caption, f"dot plot of marker genes per class of {key}")
    return sec
