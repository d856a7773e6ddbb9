"""Distances between real X (n, d) and generated Y (n', d) cells in a feature space, and label metrics.

W2 (exact OT), MMD² with CFGen's multi-bandwidth RBF kernel, Fréchet distance, 1-NN two-sample accuracy, PRDC,
kNN label F1 and train-on-synthetic/test-on-real accuracy. Every function sorts its rows lexicographically
before any seeded subsampling, so a permuted input gives bit-identical results. No torch here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

# POT's array backends import torch when it is installed (a large import); the metrics hand it numpy
# arrays only. A user's own setting wins.
os.environ.setdefault("POT_BACKEND_DISABLE_PYTORCH", "1")
import ot  # noqa: E402
import scipy.linalg
from numpy.typing import ArrayLike, NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..counts import subsample
from ..io import JOINT_SEPARATOR  # noqa: F401  (the metrics' per-class names; re-exported)

MMD_SIGMAS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # CFGen's mix_rbf_mmd2 bandwidths
# W2 uses exact OT, whose cost grows ~n^3: at most this many cells per side (seeded subsample; the cost per size is
# in BENCHMARKS.md, from benchmarks/bench_metrics.py); 3,000 is also CFGen's per-class cap.
DEFAULT_W2_MAX_CELLS = 3_000
# MMD², 1-NN and PRDC are O(n^2) but cheap per pair: at most this many cells per side.
DEFAULT_MAX_CELLS = 10_000
# Per-class metrics are computed for every class (~1,600 joint classes on Parse 1M): at most this many cells per side
# of one class, so that a few large classes do not each cost a full-size W2 (see docs/decisions).
DEFAULT_CLASS_MAX_CELLS = 1_000
DEFAULT_MIN_CELLS_PER_CLASS = 20  # CFGen paper-era rule; also > k for PRDC and >= 2 for a covariance
DEFAULT_K = 10  # k of PRDC and of the kNN label classifier (CFGen: nn = 10)
DISTRIBUTION_METRICS: tuple[str, ...] = (
    "w2",
    "mmd2_rbf",
    "fd",
    "one_nn_accuracy",
    "precision",
    "recall",
    "density",
    "coverage",
)
# exp(-a) is exactly 0.0 in float64 for a > 745.14, so kernel terms beyond this argument contribute nothing.
_EXP_UNDERFLOW_ARG = 746.0
# Memory of one block of pairwise squared distances (float64) in the blockwise loops.
_BLOCK_BYTES = 64 * 2**20
_OT_NUM_ITER_MAX = 1_000_000_000


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
    return order[subsample(len(order), n_keep, seed)]


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


def one_nn_accuracy(X: ArrayLike, Y: ArrayLike, *, max_cells: int | None = DEFAULT_MAX_CELLS, seed: int = 0) -> float:
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


def _labels_array(labels: ArrayLike, n: int, name: str) -> tuple[NDArray[np.str_], NDArray[np.intp]]:
    arr = np.asarray(labels).astype(str)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    _, codes = np.unique(arr, return_inverse=True)
    return arr, codes


def knn_label_f1(
    X_real: ArrayLike,
    labels_real: ArrayLike,
    Y_gen: ArrayLike,
    labels_gen: ArrayLike,
    *,
    k: int = DEFAULT_K,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    seed: int = 0,
) -> float:
    """Macro F1 of a k-NN classifier fitted on the real cells predicting the generated cells' labels.

    The truth is the label each generated cell was generated with. kNN: scikit-learn, Euclidean, uniform
    votes (ties go to the first label in sorted order); macro F1 over the labels present in the truth or
    the predictions (scikit-learn's default), 0 for a label without predictions. Each side is reduced to at
    most `max_cells` cells (seeded subsample; None = all).
    """
    X = _as_features(X_real, "real features")
    Y = _as_features(Y_gen, "generated features")
    _check_dims(X, Y)
    lab_x, codes_x = _labels_array(labels_real, len(X), "labels_real")
    lab_y, codes_y = _labels_array(labels_gen, len(Y), "labels_gen")
    seed_x, seed_y = _two_seeds(seed)
    ox, oy = _subsample(X, max_cells, seed_x, codes_x), _subsample(Y, max_cells, seed_y, codes_y)
    clf = KNeighborsClassifier(n_neighbors=min(k, len(X)), algorithm="brute").fit(X[ox], lab_x[ox])
    pred = clf.predict(Y[oy])
    return float(f1_score(lab_y[oy], pred, average="macro", zero_division=0))


def tstr_accuracy(
    Y_gen: ArrayLike,
    labels_gen: ArrayLike,
    X_real: ArrayLike,
    labels_real: ArrayLike,
    *,
    seed: int = 0,
    max_cells: int | None = DEFAULT_MAX_CELLS,
) -> dict[str, float]:
    """Train on synthetic, test on real: a classifier fitted on the generated cells and their labels,
    scored on the real cells. Returns {"accuracy", "macro_f1"}.

    Classifier: standardisation + multinomial logistic regression (L2, C=1, lbfgs, deterministic) on the
    PC features; a linear model asks whether the generated classes sit where the real ones are. Each side is
    reduced to at most `max_cells` cells (seeded subsample; None = all).
    """
    Y = _as_features(Y_gen, "generated features")
    X = _as_features(X_real, "real features")
    _check_dims(X, Y)
    lab_y, codes_y = _labels_array(labels_gen, len(Y), "labels_gen")
    lab_x, codes_x = _labels_array(labels_real, len(X), "labels_real")
    seed_y, seed_x = _two_seeds(seed)
    oy = _subsample(Y, max_cells, seed_y, codes_y)
    if len(np.unique(lab_y[oy])) < 2:
        raise ValueError(f"tstr_accuracy needs at least 2 generated classes, got {np.unique(lab_y[oy]).tolist()}")
    ox = np.arange(len(X)) if max_cells is None or len(X) <= max_cells else _subsample(X, max_cells, seed_x, codes_x)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    model.fit(Y[oy], lab_y[oy])
    pred = model.predict(X[ox])
    return {
        "accuracy": float(accuracy_score(lab_x[ox], pred)),
        "macro_f1": float(f1_score(lab_x[ox], pred, average="macro", zero_division=0)),
    }
