"""Count matrices: validation, library-size normalisation and seeded subsampling, shared by every step.

`log1p_cp10k` is the one place of the paper's log-normalisation log1p(1e4 x / L) (metrics, report, the Gaussian
likelihood); `check_counts` the one check that counts are finite non-negative integers; `subsample` the one
seeded choice of at most `cap` cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import InputError

TARGET_SUM = 1e4  # counts per cell after normalisation (CFGen, scLDM)
_BLOCK_BYTES = 64 * 2**20  # dense matrices are checked in row blocks of this size


def bad_counts(matrix: Any) -> tuple[tuple[int, int, float] | None, int]:
    """The first entry of `matrix` (n, G) that is not a finite non-negative integer, as (row, column, value) in
    row-major order (None if there is none), and the number of such entries. Sparse matrices are checked on their
    stored values, dense ones in row blocks."""
    first, n_bad = None, 0
    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
        data = csr.data
        bad = (data < 0) if data.dtype.kind in "iu" else ~np.isfinite(data) | (data < 0) | (np.floor(data) != data)
        n_bad = int(bad.sum())
        if n_bad:
            k = int(np.flatnonzero(bad)[0])
            first = (int(np.searchsorted(csr.indptr, k, side="right") - 1), int(csr.indices[k]), data[k].item())
        return first, n_bad
    n, n_genes = matrix.shape
    step = max(1, _BLOCK_BYTES // (8 * max(n_genes, 1)))
    for start in range(0, n, step):
        block = np.asarray(matrix[start : start + step], dtype=np.float64)
        bad = ~np.isfinite(block) | (block < 0) | (np.floor(block) != block)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            first = first or (start + int(r), int(c), float(block[r, c]))
            n_bad += int(bad.sum())
    return first, n_bad


def counts_error(
    first: tuple[int, int, float], n_bad: int, obs_names: Sequence[str], var_names: Sequence[str], *, source: str
) -> InputError:
    """The one-line error for bad counts: the first bad entry (row, column, value) named, and how many there are."""
    row, col, value = first
    what = (
        "NaN"
        if np.isnan(value)
        else "infinite"
        if not np.isfinite(value)
        else "negative"
        if value < 0
        else "non-integer"
    )
    return InputError(
        f"{source}: counts must be finite non-negative integers, found {what} value {value!r} at cell "
        f"'{obs_names[row]}', gene '{var_names[col]}' ({n_bad} bad entries in total; are these "
        f"normalised values? point --counts_layer at the raw counts)"
    )


def check_counts(matrix: Any, obs_names: Sequence[str], var_names: Sequence[str], *, source: str) -> None:
    """Raise InputError naming the first cell, gene and value of `matrix` (n, G) that is not a finite non-negative
    integer (row-major order); sparse matrices are checked on their stored values, dense ones in row blocks."""
    n, n_genes = matrix.shape
    if len(obs_names) != n or len(var_names) != n_genes:
        raise InputError(
            f"{source}: counts have shape {matrix.shape} but {len(obs_names)} cell names and "
            f"{len(var_names)} gene names"
        )
    first, n_bad = bad_counts(matrix)
    if first is not None:
        raise counts_error(first, n_bad, obs_names, var_names, source=source)


def counts_matrix(adata: Any, layer: str, *, source: str) -> sp.csr_matrix:
    """The raw counts of `adata` (`X` or `layers[layer]`) as float32 CSR without stored zeros, validated."""
    if layer == "X":
        mat = adata.X
    elif layer in adata.layers:
        mat = adata.layers[layer]
    else:
        avail = ", ".join(["X", *adata.layers.keys()])
        raise InputError(f"{source}: counts layer '{layer}' not found (available: {avail})")
    if mat is None:
        raise InputError(f"{source}: matrix '{layer}' is empty (None)")
    mat = sp.csr_matrix(mat) if not sp.issparse(mat) else mat.tocsr()
    mat.eliminate_zeros()
    check_counts(mat, adata.obs_names, adata.var_names, source=f"{source} [{layer}]")
    return mat.astype(np.float32, copy=False)


def log1p_cp10k(x: Any, library_size: Any = None) -> Any:
    """y = log1p(1e4 x / L) per cell (row) of x; L defaults to the row sums; cells with L = 0 give y = 0.

    x: a torch tensor (B, G) with library_size (B,), a numpy array (float64 out) or a scipy sparse matrix (CSR out,
    zeros stay implicit).
    """
    if sp.issparse(x):
        csr = sp.csr_matrix(x, dtype=np.float64)
        L = np.asarray(csr.sum(axis=1)).ravel() if library_size is None else np.asarray(library_size, np.float64)
        out = sp.csr_matrix(sp.diags(TARGET_SUM / np.where(L > 0, L, 1.0)) @ csr)
        out.data = np.log1p(out.data)
        return out
    if isinstance(x, np.ndarray):
        x = x.astype(np.float64, copy=False)
        L = x.sum(axis=1) if library_size is None else np.asarray(library_size, np.float64)
        return np.log1p(x * (TARGET_SUM / np.where(L > 0, L, 1.0))[:, None])
    import torch

    L = (x.sum(dim=-1) if library_size is None else library_size)[:, None]  # (B, 1)
    safe = torch.where(L > 0, L, torch.ones_like(L))
    return torch.where(L > 0, torch.log1p(TARGET_SUM * x / safe), torch.zeros_like(x))


def subsample(n: int, cap: int | None, seed: int | np.random.SeedSequence | np.random.Generator) -> np.ndarray:
    """Sorted indices of at most `cap` of `n` rows, drawn uniformly without replacement (all rows when n <= cap)."""
    if cap is None or n <= cap:
        return np.arange(n)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=cap, replace=False))
