"""Reconstruction metrics of a VAE on test cells (paper Table 1, eval_protocol §3): RE, PCC and MSE."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray

from ..counts import log1p_cp10k
from .generation import _json_safe


def _dense_rows(matrix: Any, start: int, stop: int) -> NDArray[np.float64]:
    block = matrix[start:stop]
    return block.toarray().astype(np.float64) if sp.issparse(block) else np.asarray(block, dtype=np.float64)


def _pearson_columns(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """Pearson r of each column of a and b (n, G) across the n rows: (G,); NaN where a column is constant.

    Hand-written (not scipy.stats.pearsonr) to get all G columns at once with an exact constancy test.
    """
    constant = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)
    ac, bc = a - a.mean(axis=0), b - b.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ac * bc).sum(axis=0) / np.sqrt((ac * ac).sum(axis=0) * (bc * bc).sum(axis=0))
    r[constant] = np.nan
    return r


def _nanmean_or_nan(x: NDArray[np.float64]) -> float:
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if len(finite) else float("nan")


def reconstruction_metrics(
    true_counts: Any, sampled_counts: Any, mean_counts: Any, nll_per_cell: ArrayLike, *, batch_size: int = 256
) -> dict[str, float | int | None]:
    """Table 1 metrics of a reconstruction of n test cells over G genes.

    Inputs: `true_counts` (n, G) observed counts, `sampled_counts` (n, G) one NB sample of the
    reconstruction, `mean_counts` (n, G) the NB mean, `nll_per_cell` (n,) the NB negative log-likelihood of
    each cell summed over its G genes (computed by the caller). Dense or scipy sparse; cells in file order.

    Every matrix is mapped to log1p(1e4 * x / sum(x)) with each cell normalised by its own total (as the
    scLDM code; all-zero cells stay 0). Keys ("sample" = the NB sample, "mean" = the NB mean):
    - re_nll_gene_sum_cell_mean: mean over cells of nll_per_cell (RE).
    - pcc_gene_batch{B}_{sample,mean}: per gene, Pearson r across the cells of each batch of B consecutive
      cells (file order), nanmean over genes (constant genes -> NaN -> dropped), then the mean over batches
      weighted by batch size (as Lightning's epoch mean of the scLDM code). Batches without any defined r
      are left out.
    - pcc_gene_all_{sample,mean}: per gene Pearson r across all n cells, nanmean over genes.
    - pcc_cell_{sample,mean}: per cell Pearson r across the G genes, nanmean over cells.
    - mse_{sample,mean}: mean squared error over all cells x genes.
    """
    n, n_genes = true_counts.shape
    for name, matrix in (("sampled_counts", sampled_counts), ("mean_counts", mean_counts)):
        if matrix.shape != (n, n_genes):
            raise ValueError(f"{name} has shape {matrix.shape}, expected {(n, n_genes)} like true_counts")
    nll = np.asarray(nll_per_cell, dtype=np.float64)
    if nll.shape != (n,):
        raise ValueError(f"nll_per_cell has shape {nll.shape}, expected ({n},)")
    if not np.isfinite(nll).all():
        i = int(np.flatnonzero(~np.isfinite(nll))[0])
        raise ValueError(f"nll_per_cell has a non-finite value {nll[i]!r} at cell {i}")
    if batch_size < 1 or n < 1:
        raise ValueError(f"need batch_size >= 1 and at least one cell, got batch_size={batch_size}, n={n}")

    preds = ("sample", "mean")
    batch_pcc: dict[str, list[tuple[float, int]]] = {p: [] for p in preds}
    cell_pcc: dict[str, list[NDArray[np.float64]]] = {p: [] for p in preds}
    sq_err = {p: 0.0 for p in preds}
    # Whole-set per-gene Pearson r from running sums, shifted by the first batch's mean for numerical
    # stability (one pass over the data instead of holding (n, G) matrices in memory).
    shift: dict[str, NDArray[np.float64]] = {}
    sums = {p: {s: np.zeros(n_genes) for s in ("x", "y", "xx", "yy", "xy")} for p in preds}
    lo = {p: np.full(n_genes, np.inf) for p in (*preds, "true")}
    hi = {p: np.full(n_genes, -np.inf) for p in (*preds, "true")}
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        truth = log1p_cp10k(_dense_rows(true_counts, start, stop))  # (b, G)
        blocks = {
            "sample": log1p_cp10k(_dense_rows(sampled_counts, start, stop)),
            "mean": log1p_cp10k(_dense_rows(mean_counts, start, stop)),
        }
        if not shift:
            shift["true"] = truth.mean(axis=0)
            for p in preds:
                shift[p] = blocks[p].mean(axis=0)
        lo["true"] = np.minimum(lo["true"], truth.min(axis=0))
        hi["true"] = np.maximum(hi["true"], truth.max(axis=0))
        t_shift = truth - shift["true"]
        for p in preds:
            pred = blocks[p]
            value = _nanmean_or_nan(_pearson_columns(pred, truth))
            if not math.isnan(value):
                batch_pcc[p].append((value, stop - start))
            cell_pcc[p].append(_pearson_columns(pred.T, truth.T))
            sq_err[p] += float(((pred - truth) ** 2).sum())
            lo[p], hi[p] = np.minimum(lo[p], pred.min(axis=0)), np.maximum(hi[p], pred.max(axis=0))
            p_shift = pred - shift[p]
            acc = sums[p]
            acc["x"] += p_shift.sum(axis=0)
            acc["y"] += t_shift.sum(axis=0)
            acc["xx"] += (p_shift * p_shift).sum(axis=0)
            acc["yy"] += (t_shift * t_shift).sum(axis=0)
            acc["xy"] += (p_shift * t_shift).sum(axis=0)

    out: dict[str, float | int | None] = {
        "n_cells": int(n),
        "n_genes": int(n_genes),
        "batch_size": int(batch_size),
        "re_nll_gene_sum_cell_mean": float(nll.mean()),
    }
    for p in preds:
        if batch_pcc[p]:
            values, weights = zip(*batch_pcc[p])
            out[f"pcc_gene_batch{batch_size}_{p}"] = float(np.average(values, weights=weights))
        else:
            out[f"pcc_gene_batch{batch_size}_{p}"] = None
        acc = sums[p]
        cov = acc["xy"] - acc["x"] * acc["y"] / n
        var_x = acc["xx"] - acc["x"] ** 2 / n
        var_y = acc["yy"] - acc["y"] ** 2 / n
        with np.errstate(invalid="ignore", divide="ignore"):
            r_all = cov / np.sqrt(var_x * var_y)
        r_all[(hi[p] == lo[p]) | (hi["true"] == lo["true"])] = np.nan
        out[f"pcc_gene_all_{p}"] = _nanmean_or_nan(r_all)
        out[f"pcc_cell_{p}"] = _nanmean_or_nan(np.concatenate(cell_pcc[p]))
        out[f"mse_{p}"] = sq_err[p] / (n * n_genes)
    return _json_safe(out)
