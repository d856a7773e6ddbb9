"""Reconstruction metrics (Table 1) and generation metrics (Tables 2-3) of scLDM, exactly defined.

Two families live here:

* **Reconstruction** (`reconstruction_metrics`): RE, PCC and MSE of a VAE's reconstruction of test cells,
  following the scLDM code (eval_protocol §3): RE = NB negative log-likelihood summed over genes, averaged
  over cells; PCC / MSE on ``log1p(1e4 * x / sum(x))`` of one NB sample (and, separately, of the NB mean).
* **Generation** (`evaluate`): real vs generated cells compared in a 30-PC feature space (eval_protocol §7,
  *corrected* variant, plus §8: both sides restricted to the shared genes, PCA fitted on the real cells and
  the generated cells projected after subtracting the **real** mean). Distribution metrics: W2 (exact OT),
  MMD² with CFGen's multi-bandwidth RBF kernel, Fréchet distance, 1-NN two-sample accuracy, PRDC; label
  metrics: kNN label F1 (real -> generated) and train-on-synthetic/test-on-real accuracy. Metrics are
  reported overall, per class of every condition key and of the joint combination of keys (mean ± SEM over
  classes), and can be aggregated over generated replicates (mean ± SEM over replicates).

Cell order never matters: `evaluate` puts the cells of both sides in a canonical order (sorted by a hash of
each cell's counts and labels) before anything is computed, and every feature-space metric sorts its rows
lexicographically before any seeded subsampling, so a permuted input gives bit-identical results.

No torch here: numpy, scipy, POT, scikit-learn (and anndata objects as inputs).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ot
import pandas as pd
import scipy.linalg
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# Constants (each one is a definition of the metric, not a tuning knob; see the docstrings that use them)
# ----------------------------------------------------------------------------------------------------------
TARGET_SUM = 1e4  # normalize_total target (CFGen, scLDM)
MMD_SIGMAS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # CFGen's mix_rbf_mmd2 bandwidths
FEATURE_SPACE_VARIANT = "corrected: shared genes, real-mean centred"
# W2 uses exact OT, whose cost grows ~n^3: at most this many cells per side (seeded subsample), chosen by
# measurement (benchmarks/bench_metrics.py): 3,000 cells take ~7 s on one core, 5,000 ~20 s, 10,000 ~3 min.
# 3,000 is also the per-class cap of CFGen's paper-era evaluation script.
DEFAULT_W2_MAX_CELLS = 3_000
# MMD², 1-NN and PRDC are O(n^2) but cheap per pair: at most this many cells per side.
DEFAULT_MAX_CELLS = 10_000
DEFAULT_MIN_CELLS_PER_CLASS = 20  # CFGen paper-era rule; also > k for PRDC and >= 2 for a covariance
DEFAULT_K = 10  # k of PRDC and of the kNN label classifier (CFGen: nn = 10)
DISTRIBUTION_METRICS: tuple[str, ...] = (
    "w2", "mmd2_rbf", "fd", "one_nn_accuracy", "precision", "recall", "density", "coverage",
)
JOINT_SEPARATOR = "|"  # joint class name: labels of the keys joined by this, in condition_keys order
# exp(-a) is exactly 0.0 in float64 for a > 745.14, so kernel terms beyond this argument contribute nothing.
_EXP_UNDERFLOW_ARG = 746.0
# Memory of one block of pairwise squared distances (float64) in the blockwise loops.
_BLOCK_BYTES = 64 * 2**20
_OT_NUM_ITER_MAX = 1_000_000_000


# ----------------------------------------------------------------------------------------------------------
# Input validation and gene alignment
# ----------------------------------------------------------------------------------------------------------
def check_counts(counts: Any, cell_names: Sequence[str], gene_names: Sequence[str], what: str) -> None:
    """Raise ValueError unless every value of `counts` (n, G) is a finite non-negative integer.

    The message names the first offending cell and gene (row-major order) and the value.
    """
    n, n_genes = counts.shape
    if len(cell_names) != n or len(gene_names) != n_genes:
        raise ValueError(
            f"{what} counts have shape {counts.shape} but {len(cell_names)} cell names and "
            f"{len(gene_names)} gene names"
        )
    first: tuple[int, int, float] | None = None
    if sp.issparse(counts):
        coo = sp.coo_matrix(counts)
        data = np.asarray(coo.data, dtype=np.float64)
        bad = ~np.isfinite(data) | (data < 0) | (data != np.round(data))
        if bad.any():
            rows, cols = coo.row[bad], coo.col[bad]
            pick = np.lexsort((cols, rows))[0]
            first = (int(rows[pick]), int(cols[pick]), float(data[bad][pick]))
    else:
        step = max(1, _BLOCK_BYTES // (8 * max(n_genes, 1)))
        for start in range(0, n, step):
            block = np.asarray(counts[start : start + step], dtype=np.float64)
            bad = ~np.isfinite(block) | (block < 0) | (block != np.round(block))
            if bad.any():
                r, c = np.argwhere(bad)[0]
                first = (start + int(r), int(c), float(block[r, c]))
                break
    if first is not None:
        r, c, v = first
        raise ValueError(
            f"{what} counts must be finite non-negative integers: cell {cell_names[r]!r} (row {r}), "
            f"gene {gene_names[c]!r} has value {v!r}"
        )


def _first_names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(x) for x in list(names)[:limit])
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return shown + more


def align_genes(real_adata: Any, gen_adata: Any, model_genes: Sequence[str] | None = None) -> list[str]:
    """Return the genes shared by real and generated AnnData objects, in the real data's order.

    Every generated gene must exist in the real data; every gene of `model_genes` (the genes the model
    generates, e.g. the manifest vocabulary; None = no requirement) must exist in both. Violations and
    duplicated gene names are a ValueError naming the first few offending genes.
    """
    real_genes = pd.Index(real_adata.var_names.astype(str))
    gen_genes = pd.Index(gen_adata.var_names.astype(str))
    for what, genes in (("real", real_genes), ("generated", gen_genes)):
        if genes.has_duplicates:
            dup = genes[genes.duplicated()].unique()
            raise ValueError(f"{what} data has duplicated gene names: {_first_names(list(dup))}")
    missing_in_real = gen_genes[~gen_genes.isin(real_genes)]
    if len(missing_in_real):
        raise ValueError(
            f"{len(missing_in_real)} generated genes are missing from the real data: "
            f"{_first_names(list(missing_in_real))}"
        )
    if model_genes is not None:
        model = pd.Index([str(g) for g in model_genes])
        for what, genes in (("real", real_genes), ("generated", gen_genes)):
            missing = model[~model.isin(genes)]
            if len(missing):
                raise ValueError(
                    f"{len(missing)} model genes are missing from the {what} data: {_first_names(list(missing))}"
                )
    shared = real_genes[real_genes.isin(gen_genes)]
    if len(shared) == 0:
        raise ValueError("real and generated data share no genes")
    return list(shared)


def _counts_of(adata: Any, layer: str | None, genes: Sequence[str], what: str) -> Any:
    """(n, G) counts of `adata` restricted to `genes` (in that order), validated; sparse stays sparse."""
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"{what} data has no layer {layer!r} (layers: {list(adata.layers.keys())})")
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise ValueError(f"{what} data has no .X matrix")
    col = pd.Index(adata.var_names.astype(str)).get_indexer(list(genes))
    matrix = sp.csr_matrix(matrix)[:, col] if sp.issparse(matrix) else np.asarray(matrix)[:, col]
    check_counts(matrix, list(adata.obs_names.astype(str)), list(genes), what)
    return matrix


def _labels_of(adata: Any, keys: Sequence[str], what: str) -> pd.DataFrame:
    """String labels (n, K) of the condition keys; missing columns or missing values are a ValueError."""
    missing = [k for k in keys if k not in adata.obs.columns]
    if missing:
        raise ValueError(f"{what} data lacks condition column(s) {missing} (obs has {list(adata.obs.columns)})")
    out = {}
    for key in keys:
        column = adata.obs[key]
        na = np.flatnonzero(column.isna().to_numpy())
        if len(na):
            raise ValueError(f"{what} cell {adata.obs_names[na[0]]!r} has no value for condition {key!r}")
        out[key] = column.astype(str).to_numpy()
    return pd.DataFrame(out, index=np.arange(adata.n_obs))


# ----------------------------------------------------------------------------------------------------------
# Feature space
# ----------------------------------------------------------------------------------------------------------
def log_normalize(counts: Any, hvg_mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """log1p(normalize_total(counts, 1e4)) over all G columns, then the HVG columns: (n, G) -> (n, H).

    Library sizes are the totals over all G columns (the caller passes the shared genes). Cells with zero
    total stay zero (as scanpy's normalize_total does).
    """
    hvg_idx = np.flatnonzero(hvg_mask)
    if sp.issparse(counts):
        csr = sp.csr_matrix(counts, dtype=np.float64)
        totals = np.asarray(csr.sum(axis=1)).ravel()  # (n,)
        scale = TARGET_SUM / np.where(totals > 0, totals, 1.0)
        out = (sp.diags(scale) @ csr)[:, hvg_idx].toarray()  # (n, H)
        return np.log1p(out, out=out)
    dense = np.asarray(counts)
    n, n_genes = dense.shape
    out = np.empty((n, len(hvg_idx)), dtype=np.float64)
    step = max(1, _BLOCK_BYTES // (8 * max(n_genes, 1)))
    for start in range(0, n, step):
        block = np.asarray(dense[start : start + step], dtype=np.float64)  # (b, G)
        totals = block.sum(axis=1)
        scale = TARGET_SUM / np.where(totals > 0, totals, 1.0)
        out[start : start + step] = np.log1p(block[:, hvg_idx] * scale[:, None])
    return out


def pca_fit(
    X: NDArray[np.float64], n_pcs: int
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Exact PCA of X (n, H): returns (mean (H,), components (n_pcs, H), explained variance ratio (n_pcs,)).

    Components are the top eigenvectors of the covariance, computed with `scipy.linalg.eigh(...,
    subset_by_index=...)`; each is signed so that its largest-magnitude loading is positive (as
    scikit-learn's svd_flip). Hand-written rather than sklearn `PCA(svd_solver="covariance_eigh")`, which
    computes all H eigenpairs (8 s for H = 2,000 on the 2-core build machine, vs ~1 s for the top 30).
    Same subspace as scanpy's `sc.tl.pca` (ARPACK) up to solver tolerance and signs.
    """
    n, n_feat = X.shape
    mean = X.mean(axis=0)  # (H,)
    cov = np.zeros((n_feat, n_feat))
    step = _block_rows(n_feat)
    for start in range(0, n, step):  # centred blocks: no (n, H) centred copy in memory
        centred = X[start : start + step] - mean
        cov += centred.T @ centred
    cov /= max(n - 1, 1)
    # One BLAS thread: the tridiagonal reduction is level-2 BLAS, and with threads on a busy 2-core machine
    # it took 3-20 s instead of ~1 s (measured).
    with threadpool_limits(limits=1, user_api="blas"):
        values, vectors = scipy.linalg.eigh(cov, subset_by_index=[n_feat - n_pcs, n_feat - 1])  # ascending
    values, components = values[::-1], vectors[:, ::-1].T  # (n_pcs,), (n_pcs, H)
    largest = components[np.arange(n_pcs), np.argmax(np.abs(components), axis=1)]
    components = components * np.where(largest < 0, -1.0, 1.0)[:, None]
    total = float(np.trace(cov))
    explained = values / total if total > 0 else np.zeros_like(values)
    return mean, components, explained


def feature_space(
    real_counts: Any, gen_counts: Any, hvg_mask: ArrayLike, n_pcs: int = 30
) -> tuple[NDArray[np.float64], NDArray[np.float64], dict[str, Any]]:
    """Project real and generated cells onto the real cells' principal components.

    Both count matrices (n, G) and (n', G) must already be restricted to the same shared genes (see
    `align_genes`). Steps (eval_protocol §7 corrected variant + §8): normalize_total to 1e4 over those G
    genes -> log1p -> HVG subset (`hvg_mask`, (G,) bool) -> PCA with `n_pcs` components fitted on the real
    cells; the generated cells are projected after subtracting the **real** per-gene mean.

    PCA: exact top-`n_pcs` eigenvectors of the real cells' covariance (see `pca_fit`; deterministic, no
    random state). Returns
    (real_pcs (n, n_pcs), gen_pcs (n', n_pcs), info) where info describes the variant for metrics.json.
    """
    mask = np.asarray(hvg_mask)
    if mask.dtype != np.bool_ or mask.ndim != 1:
        raise ValueError(f"hvg_mask must be a 1-D bool array, got dtype {mask.dtype} and shape {mask.shape}")
    if real_counts.shape[1] != mask.shape[0] or gen_counts.shape[1] != mask.shape[0]:
        raise ValueError(
            f"gene dimensions differ: real {real_counts.shape}, generated {gen_counts.shape}, hvg_mask {mask.shape}"
        )
    n_hvg = int(mask.sum())
    if not 1 <= n_pcs <= min(n_hvg, real_counts.shape[0]):
        raise ValueError(
            f"n_pcs={n_pcs} must be between 1 and min(#HVG={n_hvg}, #real cells={real_counts.shape[0]})"
        )
    real_log = log_normalize(real_counts, mask)  # (n, H)
    gen_log = log_normalize(gen_counts, mask)  # (n', H)
    mean, components, explained = pca_fit(real_log, n_pcs)  # (H,), (n_pcs, H), (n_pcs,)
    real_pcs = (real_log - mean) @ components.T  # (n, n_pcs), centred on the real mean
    gen_pcs = (gen_log - mean) @ components.T  # (n', n_pcs): the real mean is subtracted
    info = {
        "variant": FEATURE_SPACE_VARIANT,
        "normalization": f"normalize_total({TARGET_SUM:g}) over the {real_counts.shape[1]} shared genes, log1p",
        "pca": "exact top eigenvectors of the real cells' covariance (scipy.linalg.eigh), deterministic signs",
        "projection": "generated: (log-normalised HVG expression - real mean) @ real PCs",
        "n_genes_shared": int(real_counts.shape[1]),
        "n_hvg": n_hvg,
        "n_pcs": int(n_pcs),
        "explained_variance_ratio_sum": float(explained.sum()),
    }
    return real_pcs, gen_pcs, info


# ----------------------------------------------------------------------------------------------------------
# Canonical order and seeded subsampling
# ----------------------------------------------------------------------------------------------------------
def _cell_hash_order(counts: Any, labels: pd.DataFrame) -> NDArray[np.intp]:
    """Permutation putting cells in a canonical order: sorted by a hash of (counts row, labels).

    Cells with equal hashes have identical counts and labels, so they are interchangeable.
    """
    n = counts.shape[0]
    if labels.shape[1] == 0:  # no condition keys: only the counts decide the order
        label_rows = [""] * n
    else:
        label_rows = ["\x1f".join(row) for row in labels.itertuples(index=False, name=None)]
    keys = np.empty(n, dtype=np.uint64)
    if sp.issparse(counts):
        csr = sp.csr_matrix(counts, dtype=np.float64, copy=True)
        csr.sum_duplicates()
        csr.eliminate_zeros()
        csr.sort_indices()
        indices = csr.indices.astype(np.int64)
        for i in range(n):
            lo, hi = csr.indptr[i], csr.indptr[i + 1]
            h = hashlib.blake2b(indices[lo:hi].tobytes(), digest_size=8)
            h.update(csr.data[lo:hi].tobytes())
            h.update(label_rows[i].encode())
            keys[i] = int.from_bytes(h.digest(), "little")
    else:
        dense = np.asarray(counts)
        step = max(1, _BLOCK_BYTES // (8 * max(dense.shape[1], 1)))
        for start in range(0, n, step):
            block = np.ascontiguousarray(dense[start : start + step], dtype=np.float64)
            for j, row in enumerate(block):
                h = hashlib.blake2b(row.tobytes(), digest_size=8)
                h.update(label_rows[start + j].encode())
                keys[start + j] = int.from_bytes(h.digest(), "little")
    return np.argsort(keys, kind="stable")


def _row_order(X: NDArray[np.float64], codes: NDArray[np.intp] | None = None) -> NDArray[np.intp]:
    """Lexicographic order of the rows of X (column 0 first), ties broken by `codes`: a canonical order."""
    keys = [X[:, j] for j in range(X.shape[1] - 1, -1, -1)]  # np.lexsort's primary key is the last one
    if codes is not None:
        keys.insert(0, codes)
    return np.lexsort(keys)


def _subsample(
    X: NDArray[np.float64],
    n_keep: int | None,
    seed: int | np.random.SeedSequence,
    codes: NDArray[np.intp] | None = None,
) -> NDArray[np.intp]:
    """Row indices of at most `n_keep` rows of X, chosen uniformly without replacement (seeded) from the
    canonical row order, so the choice does not depend on the input order."""
    order = _row_order(X, codes)
    if n_keep is None or n_keep >= len(order):
        return order
    rng = np.random.default_rng(seed)
    return order[np.sort(rng.choice(len(order), size=n_keep, replace=False))]


def _two_seeds(seed: int) -> list[np.random.SeedSequence]:
    """Independent seed streams for the real and the generated side."""
    return np.random.SeedSequence(seed).spawn(2)


def _as_features(X: ArrayLike, name: str, min_rows: int = 1) -> NDArray[np.float64]:
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (cells, features) array, got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} has {arr.shape[0]} cells; at least {min_rows} are needed")
    if not np.isfinite(arr).all():
        r, c = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} has a non-finite value {arr[r, c]!r} at cell {r}, feature {c}")
    return arr


def _check_dims(X: NDArray[np.float64], Y: NDArray[np.float64]) -> None:
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"feature dimensions differ: real {X.shape}, generated {Y.shape}")


def _sq_dists(A: NDArray[np.float64], B: NDArray[np.float64], b_sq: NDArray[np.float64]) -> NDArray[np.float64]:
    """Squared Euclidean distances (a, d) x (b, d) -> (a, b) via |a|^2 + |b|^2 - 2 a.b, clipped at 0.

    Hand-written (rather than sklearn's pairwise_distances) because the blockwise loops below need the
    squared values in place, with the column norms `b_sq` computed once.
    """
    d2 = A @ B.T  # (a, b)
    d2 *= -2.0
    d2 += np.einsum("ij,ij->i", A, A)[:, None]
    d2 += b_sq[None, :]
    np.maximum(d2, 0.0, out=d2)
    return d2


def _block_rows(n_cols: int) -> int:
    return max(1, _BLOCK_BYTES // (8 * max(n_cols, 1)))


# ----------------------------------------------------------------------------------------------------------
# Distribution metrics on features X (n, d) real and Y (n', d) generated
# ----------------------------------------------------------------------------------------------------------
def w2(X: ArrayLike, Y: ArrayLike, *, max_cells: int | None = DEFAULT_W2_MAX_CELLS, seed: int = 0) -> float:
    """2-Wasserstein distance between the empirical distributions of X (n, d) and Y (n', d).

    Exact optimal transport (POT `ot.emd2`, network simplex) with uniform weights and the squared
    Euclidean cost; returns sqrt of the optimal cost. Exact OT does not scale (50k x 50k is 2.5e9 costs), so
    each side is first reduced to at most `max_cells` cells by a seeded uniform subsample without
    replacement (None = all cells). Note that the empirical W2 is biased upwards at small n in 30-D, so
    values are comparable only at equal cell counts (same `max_cells`).
    """
    X = _as_features(X, "real features")
    Y = _as_features(Y, "generated features")
    _check_dims(X, Y)
    seed_x, seed_y = _two_seeds(seed)
    Xs = X[_subsample(X, max_cells, seed_x)]  # (n, d)
    Ys = Y[_subsample(Y, max_cells, seed_y)]  # (m, d)
    a = np.full(len(Xs), 1.0 / len(Xs))
    b = np.full(len(Ys), 1.0 / len(Ys))
    cost = ot.dist(Xs, Ys, metric="sqeuclidean")  # (n, m)
    value, log = ot.emd2(a, b, cost, numItermax=_OT_NUM_ITER_MAX, log=True)
    if log.get("warning") is not None:
        raise RuntimeError(f"exact OT did not converge ({log['warning']}) on {len(Xs)} x {len(Ys)} cells")
    return float(np.sqrt(max(float(value), 0.0)))


def _rbf_block_sum(d2: NDArray[np.float64], sigmas: Sequence[float], buf: NDArray[np.float64]) -> float:
    """sum over sigma and over the block of exp(-d2 / (2 sigma^2))."""
    total = 0.0
    d2_max = float(d2.max()) if d2.size else 0.0
    for sigma in sigmas:
        scale = 1.0 / (2.0 * sigma * sigma)
        cutoff = _EXP_UNDERFLOW_ARG / scale
        if d2_max <= cutoff:
            out = buf[: d2.shape[0]]
            np.multiply(d2, -scale, out=out)
            total += float(np.exp(out, out=out).sum())
        else:
            # Terms beyond the cutoff are exactly 0.0 in float64, so skipping them changes nothing (but the
            # summation order) and saves most of the exp() work for the small bandwidths.
            inside = d2[d2 < cutoff]
            total += float(np.exp(inside * -scale).sum())
    return total


def _rbf_kernel_sum(A: NDArray[np.float64], B: NDArray[np.float64] | None, sigmas: Sequence[float]) -> float:
    """sum_{i,j} k(a_i, b_j) for the multi-bandwidth RBF kernel, blockwise; B=None means B=A (symmetric:
    only the upper block triangle is computed)."""
    symmetric = B is None
    other = A if B is None else B
    b_sq = np.einsum("ij,ij->i", other, other)
    rows = _block_rows(len(other))
    buf = np.empty((rows, len(other)), dtype=np.float64)
    total = 0.0
    for start in range(0, len(A), rows):
        stop = min(start + rows, len(A))
        if symmetric:
            d2 = _sq_dists(A[start:stop], other[start:], b_sq[start:])  # (b, n - start)
            width = stop - start
            total += _rbf_block_sum(d2[:, :width], sigmas, buf[:, :width])  # diagonal block, counted once
            total += 2.0 * _rbf_block_sum(d2[:, width:], sigmas, buf[:, : len(other) - stop])
        else:
            d2 = _sq_dists(A[start:stop], other, b_sq)  # (b, m)
            total += _rbf_block_sum(d2, sigmas, buf)
    return total


def mmd2_rbf(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    seed: int = 0,
    sigmas: Sequence[float] = MMD_SIGMAS,
) -> float:
    """Squared MMD with CFGen's multi-bandwidth RBF kernel, biased V-statistic (diagonals included).

    k(x, y) = sum_{sigma in sigmas} exp(-||x - y||^2 / (2 sigma^2)) (a sum, not a mean; k(x, x) = 5), and
    MMD² = mean K_XX + mean K_YY - 2 mean K_XY over m x m blocks. m = min(n, n', max_cells) rows of each
    side. CFGen takes the *first* m rows; here each side is a seeded random subsample of m rows instead
    (independent of cell order). Kernel sums are computed in blocks to bound memory.
    Because the diagonals are included, two samples of one distribution give about
    2 (5 - E k(x, x')) / m > 0, so values are comparable only at equal m.
    """
    X = _as_features(X, "real features")
    Y = _as_features(Y, "generated features")
    _check_dims(X, Y)
    m = min(len(X), len(Y)) if max_cells is None else min(len(X), len(Y), max_cells)
    seed_x, seed_y = _two_seeds(seed)
    Xs = X[_subsample(X, m, seed_x)]  # (m, d)
    Ys = Y[_subsample(Y, m, seed_y)]  # (m, d)
    k_xx = _rbf_kernel_sum(Xs, None, sigmas)
    k_yy = _rbf_kernel_sum(Ys, None, sigmas)
    k_xy = _rbf_kernel_sum(Xs, Ys, sigmas)
    return float((k_xx + k_yy - 2.0 * k_xy) / (m * m))


def frechet_distance(X: ArrayLike, Y: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to X (n, d) and Y (n', d).

    FD = ||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 sqrtm(S_x S_y)), with unbiased covariances (ddof=1) and
    `scipy.linalg.sqrtm`, whose imaginary part (numerical noise) is dropped. This is the squared distance
    (as FID); it is **not** square-rooted.
    """
    X = _as_features(X, "real features", min_rows=2)
    Y = _as_features(Y, "generated features", min_rows=2)
    _check_dims(X, Y)
    X = X[_row_order(X)]  # canonical order: floating-point sums then do not depend on cell order
    Y = Y[_row_order(Y)]
    mu_x, mu_y = X.mean(axis=0), Y.mean(axis=0)  # (d,)
    cov_x = np.atleast_2d(np.cov(X, rowvar=False))  # (d, d)
    cov_y = np.atleast_2d(np.cov(Y, rowvar=False))
    cov_mean = np.real(scipy.linalg.sqrtm(cov_x @ cov_y))
    diff = mu_x - mu_y
    return float(diff @ diff + np.trace(cov_x) + np.trace(cov_y) - 2.0 * np.trace(cov_mean))


def one_nn_accuracy(
    X: ArrayLike, Y: ArrayLike, *, max_cells: int | None = DEFAULT_MAX_CELLS, seed: int = 0
) -> float:
    """Leave-one-out 1-nearest-neighbour two-sample accuracy on a balanced union of X and Y.

    Both sides are reduced to n = min(n, n', max_cells) cells (seeded subsample); each of the 2n cells is
    classified real/generated by the label of its nearest *other* cell (Euclidean). 0.5 = indistinguishable,
    1.0 = separable; well below 0.5 means generated cells sit on top of real ones (copies).
    """
    X = _as_features(X, "real features")
    Y = _as_features(Y, "generated features")
    _check_dims(X, Y)
    n = min(len(X), len(Y)) if max_cells is None else min(len(X), len(Y), max_cells)
    if n < 1:
        raise ValueError("one_nn_accuracy needs at least one cell on each side")
    seed_x, seed_y = _two_seeds(seed)
    Z = np.concatenate([X[_subsample(X, n, seed_x)], Y[_subsample(Y, n, seed_y)]])  # (2n, d)
    is_gen = np.repeat([False, True], n)  # (2n,)
    nn = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(Z)
    _, idx = nn.kneighbors(Z)  # (2n, 2): includes the query itself (or an exact duplicate of it)
    own = np.arange(2 * n)
    nearest = np.where(idx[:, 0] == own, idx[:, 1], idx[:, 0])  # first neighbour that is not the cell itself
    return float(np.mean(is_gen[nearest] == is_gen))


def _kth_neighbour_sq_dist(A: NDArray[np.float64], k: int) -> NDArray[np.float64]:
    """Squared distance of each row of A (n, d) to its k-th nearest *other* row: (n,)."""
    a_sq = np.einsum("ij,ij->i", A, A)
    out = np.empty(len(A))
    rows = _block_rows(len(A))
    for start in range(0, len(A), rows):
        stop = min(start + rows, len(A))
        d2 = _sq_dists(A[start:stop], A, a_sq)  # (b, n)
        d2[np.arange(stop - start), np.arange(start, stop)] = np.inf  # exclude the cell itself
        out[start:stop] = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return out


def prdc(
    X: ArrayLike, Y: ArrayLike, *, k: int = DEFAULT_K, max_cells: int | None = DEFAULT_MAX_CELLS, seed: int = 0
) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) of generated Y (M, d) against real X (N, d).

    Euclidean distances; the k-NN radius of a cell is its distance to the k-th nearest *other* cell of its
    own set; "inside a ball" is strict (d < radius, as the authors' reference code). With B(x) the real
    balls and B(y) the generated balls:
    precision = frac. of generated cells inside some B(x); recall = frac. of real cells inside some B(y);
    density = (1 / kM) sum_j #{i : y_j in B(x_i)}; coverage = frac. of real cells whose nearest generated
    cell lies in B(x_i). Each side is reduced to at most `max_cells` cells (seeded subsample); distances
    are computed in blocks, never as a full (N, M) matrix.
    """
    X = _as_features(X, "real features", min_rows=k + 1)
    Y = _as_features(Y, "generated features", min_rows=k + 1)
    _check_dims(X, Y)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    seed_x, seed_y = _two_seeds(seed)
    Xs = X[_subsample(X, max_cells, seed_x)]  # (N, d)
    Ys = Y[_subsample(Y, max_cells, seed_y)]  # (M, d)
    if len(Xs) <= k or len(Ys) <= k:
        raise ValueError(f"prdc needs more than k={k} cells per side after subsampling")
    r2_real = _kth_neighbour_sq_dist(Xs, k)  # (N,)
    r2_gen = _kth_neighbour_sq_dist(Ys, k)  # (M,)
    x_sq = np.einsum("ij,ij->i", Xs, Xs)
    y_sq = np.einsum("ij,ij->i", Ys, Ys)

    balls_containing = np.empty(len(Ys), dtype=np.int64)  # per generated cell: #real balls containing it
    rows = _block_rows(len(Xs))
    for start in range(0, len(Ys), rows):
        d2 = _sq_dists(Ys[start : start + rows], Xs, x_sq)  # (b, N)
        balls_containing[start : start + rows] = (d2 < r2_real[None, :]).sum(axis=1)

    in_gen_ball = np.empty(len(Xs), dtype=bool)  # per real cell: inside some generated ball
    nearest_gen_in_ball = np.empty(len(Xs), dtype=bool)  # per real cell: nearest generated cell in B(x)
    rows = _block_rows(len(Ys))
    for start in range(0, len(Xs), rows):
        stop = min(start + rows, len(Xs))
        d2 = _sq_dists(Xs[start:stop], Ys, y_sq)  # (b, M)
        in_gen_ball[start:stop] = (d2 < r2_gen[None, :]).any(axis=1)
        nearest_gen_in_ball[start:stop] = d2.min(axis=1) < r2_real[start:stop]

    return {
        "precision": float(np.mean(balls_containing > 0)),
        "recall": float(np.mean(in_gen_ball)),
        "density": float(balls_containing.sum() / (k * len(Ys))),
        "coverage": float(np.mean(nearest_gen_in_ball)),
    }


# ----------------------------------------------------------------------------------------------------------
# Label metrics
# ----------------------------------------------------------------------------------------------------------
def _labels_array(labels: ArrayLike, n: int, name: str) -> tuple[NDArray[np.str_], NDArray[np.intp]]:
    arr = np.asarray(labels).astype(str)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    _, codes = np.unique(arr, return_inverse=True)
    return arr, codes


def knn_label_f1(
    X_real: ArrayLike, labels_real: ArrayLike, Y_gen: ArrayLike, labels_gen: ArrayLike, *, k: int = DEFAULT_K
) -> float:
    """Macro F1 of a k-NN classifier fitted on the real cells predicting the generated cells' labels.

    The truth is the label each generated cell was generated with. kNN: scikit-learn, Euclidean, uniform
    votes (ties go to the first label in sorted order); macro F1 over the labels present in the truth or
    the predictions (scikit-learn's default), 0 for a label without predictions.
    """
    X = _as_features(X_real, "real features")
    Y = _as_features(Y_gen, "generated features")
    _check_dims(X, Y)
    lab_x, codes_x = _labels_array(labels_real, len(X), "labels_real")
    lab_y, codes_y = _labels_array(labels_gen, len(Y), "labels_gen")
    ox, oy = _row_order(X, codes_x), _row_order(Y, codes_y)
    clf = KNeighborsClassifier(n_neighbors=min(k, len(X)), algorithm="brute").fit(X[ox], lab_x[ox])
    pred = clf.predict(Y[oy])
    return float(f1_score(lab_y[oy], pred, average="macro", zero_division=0))


def tstr_accuracy(
    Y_gen: ArrayLike, labels_gen: ArrayLike, X_real: ArrayLike, labels_real: ArrayLike, *, seed: int = 0
) -> dict[str, float]:
    """Train on synthetic, test on real: a classifier fitted on the generated cells and their labels,
    scored on the real cells. Returns {"accuracy", "macro_f1"}.

    Classifier: standardisation + multinomial logistic regression (L2, C=1, lbfgs, deterministic) on the
    PC features; a linear model asks whether the generated classes sit where the real ones are.
    """
    Y = _as_features(Y_gen, "generated features")
    X = _as_features(X_real, "real features")
    _check_dims(X, Y)
    lab_y, codes_y = _labels_array(labels_gen, len(Y), "labels_gen")
    lab_x, _ = _labels_array(labels_real, len(X), "labels_real")
    if len(np.unique(lab_y)) < 2:
        raise ValueError(f"tstr_accuracy needs at least 2 generated classes, got {np.unique(lab_y).tolist()}")
    oy = _row_order(Y, codes_y)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    model.fit(Y[oy], lab_y[oy])
    pred = model.predict(X)
    return {
        "accuracy": float(accuracy_score(lab_x, pred)),
        "macro_f1": float(f1_score(lab_x, pred, average="macro", zero_division=0)),
    }


# ----------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------
def distribution_metrics(
    X: NDArray[np.float64],
    Y: NDArray[np.float64],
    *,
    k: int = DEFAULT_K,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    w2_max_cells: int | None = DEFAULT_W2_MAX_CELLS,
    seed: int = 0,
) -> dict[str, float]:
    """All distribution metrics of real X (n, d) vs generated Y (n', d): w2, mmd2_rbf, fd,
    one_nn_accuracy, precision, recall, density, coverage, plus n_real / n_generated."""
    out = {
        "n_real": len(X),
        "n_generated": len(Y),
        "w2": w2(X, Y, max_cells=w2_max_cells, seed=seed),
        "mmd2_rbf": mmd2_rbf(X, Y, max_cells=max_cells, seed=seed),
        "fd": frechet_distance(X, Y),
        "one_nn_accuracy": one_nn_accuracy(X, Y, max_cells=max_cells, seed=seed),
    }
    out.update(prdc(X, Y, k=k, max_cells=max_cells, seed=seed))
    return out


def mean_sem(values: Sequence[float | None]) -> dict[str, Any]:
    """{"mean", "sem", "n"} of the non-missing values; SEM = sample std (ddof=1) / sqrt(n), None if n < 2."""
    vals = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(vals) == 0:
        return {"mean": None, "sem": None, "n": 0}
    sem = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) >= 2 else None
    return {"mean": float(vals.mean()), "sem": sem, "n": int(len(vals))}


def _per_class(
    X: NDArray[np.float64],
    classes_x: NDArray[np.str_],
    Y: NDArray[np.float64],
    classes_y: NDArray[np.str_],
    group: str,
    min_cells: int,
    metric_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Metrics of each class with >= min_cells cells on both sides; summary = mean ± SEM over classes.

    The k-NN metrics need k + 1 cells on a side, so that is the least `min_cells` can be.
    """
    min_cells = max(min_cells, int(metric_kwargs.get("k", DEFAULT_K)) + 1)
    per_class: dict[str, dict[str, float]] = {}
    skipped = []
    for cls in sorted(set(classes_x.tolist()) | set(classes_y.tolist())):
        in_x, in_y = classes_x == cls, classes_y == cls
        n_x, n_y = int(in_x.sum()), int(in_y.sum())
        if n_x < min_cells or n_y < min_cells:
            skipped.append({"class": cls, "n_real": n_x, "n_generated": n_y})
            continue
        per_class[cls] = distribution_metrics(X[in_x], Y[in_y], **metric_kwargs)
    if skipped:
        logger.warning(
            "%s: skipped %d classes with fewer than %d cells on a side: %s",
            group,
            len(skipped),
            min_cells,
            ", ".join(f"{s['class']} ({s['n_real']}/{s['n_generated']})" for s in skipped),
        )
    summary = {m: mean_sem([v[m] for v in per_class.values()]) for m in DISTRIBUTION_METRICS}
    return {"classes": per_class, "summary": summary, "n_classes": len(per_class), "skipped": skipped}


def _json_safe(obj: Any) -> Any:
    """Plain Python types only; NaN / inf become None (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(key): _json_safe(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def evaluate(
    real_adata: Any,
    gen_adata: Any,
    condition_keys: Sequence[str] = (),
    hvg: str | ArrayLike = "highly_variable",
    *,
    n_pcs: int = 30,
    seed: int = 0,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    w2_max_cells: int | None = DEFAULT_W2_MAX_CELLS,
    min_cells_per_class: int = DEFAULT_MIN_CELLS_PER_CLASS,
    k: int = DEFAULT_K,
    real_layer: str | None = None,
    gen_layer: str | None = None,
    model_genes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Compare generated cells with real cells; returns a JSON-able dict (metrics.json).

    Inputs: two AnnData objects holding raw integer counts (`.X` or the given layers) and the condition
    columns `condition_keys` in `.obs`. `hvg` is a bool column of `real_adata.var` or a bool array aligned
    with `real_adata.var_names`; every HVG must be among the shared genes (see `align_genes`).

    Output keys: "feature_space" (variant description), "settings", "overall" (distribution metrics on all
    cells), "labels" (per key: kNN label F1 and TSTR), "per_class" (per key, and for >= 2 keys per joint
    combination named "k1|k2": "classes" -> metrics of each class, "summary" -> mean ± SEM over classes,
    "skipped" -> classes with fewer than `min_cells_per_class` cells on either side, with their counts).
    Cell order does not matter: both sides are put in a canonical order first.
    """
    keys = list(condition_keys)
    genes = align_genes(real_adata, gen_adata, model_genes)
    real_genes = pd.Index(real_adata.var_names.astype(str))
    if isinstance(hvg, str):
        if hvg not in real_adata.var.columns:
            raise ValueError(f"real data has no var column {hvg!r} for the HVG mask")
        hvg_full = real_adata.var[hvg].to_numpy()
    else:
        hvg_full = np.asarray(hvg)
    if hvg_full.dtype != np.bool_ or hvg_full.shape != (len(real_genes),):
        raise ValueError(
            f"HVG mask must be bool with one entry per real gene ({len(real_genes)}), "
            f"got {hvg_full.dtype} {hvg_full.shape}"
        )
    hvg_genes = real_genes[hvg_full]
    not_shared = hvg_genes[~hvg_genes.isin(genes)]
    if len(not_shared):
        raise ValueError(
            f"{len(not_shared)} HVGs are missing from the generated data: {_first_names(list(not_shared))}"
        )
    hvg_mask = pd.Index(genes).isin(hvg_genes)  # (G,) over the shared genes

    real_counts = _counts_of(real_adata, real_layer, genes, "real")  # (n, G)
    gen_counts = _counts_of(gen_adata, gen_layer, genes, "generated")  # (n', G)
    real_labels = _labels_of(real_adata, keys, "real")
    gen_labels = _labels_of(gen_adata, keys, "generated")

    order_r = _cell_hash_order(real_counts, real_labels)
    order_g = _cell_hash_order(gen_counts, gen_labels)
    real_counts, real_labels = real_counts[order_r], real_labels.iloc[order_r].reset_index(drop=True)
    gen_counts, gen_labels = gen_counts[order_g], gen_labels.iloc[order_g].reset_index(drop=True)

    real_pcs, gen_pcs, info = feature_space(real_counts, gen_counts, hvg_mask, n_pcs)
    metric_kwargs = {"k": k, "max_cells": max_cells, "w2_max_cells": w2_max_cells, "seed": seed}
    result: dict[str, Any] = {
        "feature_space": info,
        "settings": {
            "condition_keys": keys,
            "seed": seed,
            "max_cells": max_cells,
            "w2_max_cells": w2_max_cells,
            "min_cells_per_class": min_cells_per_class,
            "k": k,
            "mmd_sigmas": list(MMD_SIGMAS),
            "joint_separator": JOINT_SEPARATOR,
        },
        "n_real": int(real_counts.shape[0]),
        "n_generated": int(gen_counts.shape[0]),
        "overall": distribution_metrics(real_pcs, gen_pcs, **metric_kwargs),
        "labels": {},
        "per_class": {},
    }
    for key in keys:
        lab_r, lab_g = real_labels[key].to_numpy(), gen_labels[key].to_numpy()
        entry: dict[str, Any] = {"knn_f1": knn_label_f1(real_pcs, lab_r, gen_pcs, lab_g, k=k)}
        if len(np.unique(lab_g)) >= 2:
            tstr = tstr_accuracy(gen_pcs, lab_g, real_pcs, lab_r, seed=seed)
            entry.update({"tstr_accuracy": tstr["accuracy"], "tstr_macro_f1": tstr["macro_f1"]})
        else:
            logger.warning("condition %r: one generated class only, TSTR not computed", key)
            entry.update({"tstr_accuracy": None, "tstr_macro_f1": None})
        result["labels"][key] = entry
    groups = [[key] for key in keys] + ([keys] if len(keys) >= 2 else [])
    for group in groups:
        name = JOINT_SEPARATOR.join(group)
        cls_r = real_labels[group].agg(JOINT_SEPARATOR.join, axis=1).to_numpy()
        cls_g = gen_labels[group].agg(JOINT_SEPARATOR.join, axis=1).to_numpy()
        result["per_class"][name] = _per_class(
            real_pcs, cls_r, gen_pcs, cls_g, name, min_cells_per_class, metric_kwargs
        )
    return _json_safe(result)


def aggregate_replicates(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± SEM over generated replicates of the per-replicate summaries returned by `evaluate`.

    For "overall" and "labels" the replicate values are averaged; for "per_class" the per-replicate mean
    over classes (its "summary" mean) is averaged. Each entry is {"mean", "sem", "n", "values"}; SEM over
    replicates (ddof=1). Replicates must have the same groups and metrics.
    """
    if len(results) == 0:
        raise ValueError("aggregate_replicates needs at least one result")
    first = results[0]

    def stat(values: list[Any]) -> dict[str, Any]:
        return {**mean_sem(values), "values": values}

    for i, res in enumerate(results[1:], start=1):
        for part in ("overall", "labels", "per_class"):
            if set(res[part]) != set(first[part]):
                raise ValueError(
                    f"replicate {i} has {part} entries {sorted(res[part])}, replicate 0 has {sorted(first[part])}"
                )
    out: dict[str, Any] = {
        "n_replicates": len(results),
        "feature_space": first.get("feature_space"),
        "settings": first.get("settings"),
        "overall": {m: stat([r["overall"][m] for r in results]) for m in DISTRIBUTION_METRICS},
        "labels": {
            key: {m: stat([r["labels"][key][m] for r in results]) for m in first["labels"][key]}
            for key in first["labels"]
        },
        "per_class": {},
    }
    for group, entry in first["per_class"].items():
        metrics = list(entry["summary"])
        out["per_class"][group] = {
            m: stat([r["per_class"][group]["summary"].get(m, {}).get("mean") for r in results]) for m in metrics
        }
        out["per_class"][group]["n_classes"] = [r["per_class"][group]["n_classes"] for r in results]
    return _json_safe(out)


# ----------------------------------------------------------------------------------------------------------
# Reconstruction metrics (Table 1)
# ----------------------------------------------------------------------------------------------------------
def _dense_rows(matrix: Any, start: int, stop: int) -> NDArray[np.float64]:
    block = matrix[start:stop]
    return block.toarray().astype(np.float64) if sp.issparse(block) else np.asarray(block, dtype=np.float64)


def _log_norm_rows(block: NDArray[np.float64]) -> NDArray[np.float64]:
    """log1p(1e4 * x / sum(x)) per row (each row by its own total; all-zero rows stay 0): (b, G) -> (b, G)."""
    totals = block.sum(axis=1, keepdims=True)
    return np.log1p(block * (TARGET_SUM / np.where(totals > 0, totals, 1.0)))


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
    true_counts: Any,
    sampled_counts: Any,
    mean_counts: Any,
    nll_per_cell: ArrayLike,
    *,
    batch_size: int = 256,
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
        truth = _log_norm_rows(_dense_rows(true_counts, start, stop))  # (b, G)
        blocks = {
            "sample": _log_norm_rows(_dense_rows(sampled_counts, start, stop)),
            "mean": _log_norm_rows(_dense_rows(mean_counts, start, stop)),
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


# ----------------------------------------------------------------------------------------------------------
# MultiQC custom content
# ----------------------------------------------------------------------------------------------------------
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
