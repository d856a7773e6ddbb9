"""A seeded synthetic single-cell generator: negative-binomial counts with cell types (for tests and benchmarks).

Each cell type has its own gene-expression profile (log-normal gene means with a few type-specific marker
genes up-regulated); each cell draws a library size from a log-normal and counts from
NB(mean = profile * library size, theta). The same seed gives the same AnnData.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def synthetic_counts(
    n_cells: int = 500,
    n_genes: int = 300,
    n_types: int = 4,
    *,
    seed: int = 0,
    mean_library: float = 2000.0,
    library_sd: float = 0.4,
    theta: float = 2.0,
    n_markers: int = 10,
    marker_fold: float = 8.0,
    n_batches: int = 0,
    gene_prefix: str = "GENE",
) -> ad.AnnData:
    """Return an AnnData with integer counts (CSR float32) in X and `obs["cell_type"]` (+ `obs["batch"]`)."""
    rng = np.random.default_rng(seed)
    base = rng.lognormal(mean=0.0, sigma=1.5, size=n_genes)
    profiles = np.tile(base, (n_types, 1))
    for t in range(n_types):
        markers = rng.choice(n_genes, size=min(n_markers, n_genes), replace=False)
        profiles[t, markers] *= marker_fold
    profiles /= profiles.sum(axis=1, keepdims=True)
    types = rng.integers(0, n_types, size=n_cells)
    lib = rng.lognormal(mean=np.log(mean_library), sigma=library_sd, size=n_cells)
    mu = profiles[types] * lib[:, None]
    # NB as a Gamma-Poisson mixture
    lam = rng.gamma(shape=theta, scale=mu / theta)
    X = rng.poisson(lam).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type_{t}" for t in types])}, index=[f"cell_{i}" for i in range(n_cells)]
    )
    if n_batches:
        obs["batch"] = pd.Categorical([f"batch_{b}" for b in rng.integers(0, n_batches, size=n_cells)])
    var = pd.DataFrame(index=[f"{gene_prefix}{j:05d}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)


def synthetic_sparse_counts(
    n_cells: int, n_genes: int, nnz_per_cell: int, *, seed: int = 0, n_types: int = 8
) -> ad.AnnData:
    """A large sparse dataset built directly in CSR (for throughput benchmarks; ~`nnz_per_cell` genes per cell).

    Each cell draws about `nnz_per_cell` genes (duplicates removed), half of them from a type-specific half of
    the gene axis; counts are 1 + Poisson(1.5). Vectorised in chunks of 10,000 cells.
    """
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, size=n_cells)
    k = np.minimum(rng.poisson(nnz_per_cell, size=n_cells), n_genes).clip(1)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    chunks = []
    chunk = 10_000
    for a in range(0, n_cells, chunk):
        b = min(a + chunk, n_cells)
        rows = np.repeat(np.arange(b - a, dtype=np.int64), k[a:b])
        # uniform genes with a type-specific half of the axis favoured; duplicates removed per cell
        shift = (types[a:b][rows] * (n_genes // n_types)).astype(np.int64)
        cols = (shift + rng.integers(0, n_genes, size=len(rows)) // (1 + (rng.random(len(rows)) < 0.5))) % n_genes
        keys = np.unique(rows * n_genes + cols)
        r, c = keys // n_genes, (keys % n_genes).astype(np.int32)
        np.cumsum(np.bincount(r, minlength=b - a), out=indptr[a + 1 : b + 1])
        indptr[a + 1 : b + 1] += indptr[a]
        chunks.append(c)
    cols = np.concatenate(chunks)
    data = (1 + rng.poisson(1.5, size=len(cols))).astype(np.float32)
    X = sp.csr_matrix((data, cols, indptr), shape=(n_cells, n_genes))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type_{t}" for t in types])}, index=[f"cell_{i}" for i in range(n_cells)]
    )
    var = pd.DataFrame(index=[f"GENE{j:05d}" for j in range(n_genes)])
    return ad.AnnData(X=X, obs=obs, var=var)
