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
        {"cell_type": pd.Categorical([f"type_{t}" for t in types])},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    if n_batches:
        obs["batch"] = pd.Categorical([f"batch_{b}" for b in rng.integers(0, n_batches, size=n_cells)])
    var = pd.DataFrame(index=[f"{gene_prefix}{j:05d}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)


def synthetic_sparse_counts(
    n_cells: int,
    n_genes: int,
    nnz_per_cell: int,
    *,
    seed: int = 0,
    n_types: int = 8,
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


class CompositionalTruth:
    """A seeded generative truth with known compositional structure: cell types x perturbations.

    Log NB mean of gene g in a cell of type t under perturbation p, with a continuous within-type state s:

        log mu_g = base_g + type_{t,g} + s * program_{t,g} + shared_{p,g} + sensitivity_t * specific_{p,g}
                   + log library,

    with perturbation 0 the control (no response). `shared_p` is the response every type shows to p;
    `sensitivity_t * specific_p` is the type-specific part (a rank-1 interaction: how strongly type t responds,
    seen under other perturbations, times the genes p moves in responsive types, seen in other types), so a
    combination never observed is still determined by what the others show. Every parameter comes from `seed`;
    `sample` draws cells of any (type, perturbation) pairs, so the true distribution of a held-out pair can be
    sampled as often as needed.
    """

    def __init__(
        self,
        n_types: int = 4,
        n_perturbations: int = 4,
        n_genes: int = 400,
        *,
        seed: int = 0,
        n_markers: int = 20,
        marker_lfc: float = 1.5,
        n_response: int = 30,
        response_lfc: float = 1.2,
        program_lfc: float = 0.6,
        mean_library: float = 3000.0,
        library_sd: float = 0.3,
        theta: float = 4.0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.n_types, self.n_perturbations, self.n_genes, self.theta = n_types, n_perturbations, n_genes, theta
        self.mean_library, self.library_sd = mean_library, library_sd
        self.base = rng.normal(-1.0, 1.3, size=n_genes)  # (G,) log expression of a gene on a log1p scale
        self.type_effect = np.zeros((n_types, n_genes))
        self.program = np.zeros((n_types, n_genes))
        for t in range(n_types):
            markers = rng.choice(n_genes, size=n_markers, replace=False)
            self.type_effect[t, markers] = rng.normal(marker_lfc, 0.3, size=n_markers) * rng.choice([-1, 1], n_markers)
            genes = rng.choice(n_genes, size=n_markers, replace=False)
            self.program[t, genes] = rng.normal(0.0, program_lfc, size=n_markers)
        self.shared = np.zeros((n_perturbations, n_genes))  # row 0: the control
        self.specific = np.zeros((n_perturbations, n_genes))
        for p in range(1, n_perturbations):
            genes = rng.choice(n_genes, size=n_response, replace=False)
            self.shared[p, genes] = rng.normal(0.0, response_lfc, size=n_response)
            genes = rng.choice(n_genes, size=n_response, replace=False)
            self.specific[p, genes] = rng.normal(0.0, response_lfc, size=n_response)
        self.sensitivity = rng.uniform(0.0, 1.5, size=n_types)  # (T,)

    def type_name(self, t: int) -> str:
        return f"type_{t}"

    def perturbation_name(self, p: int) -> str:
        return "control" if p == 0 else f"pert_{p}"

    def log_profile(self, t: int, p: int, state: np.ndarray) -> np.ndarray:
        """Log relative expression (n, G) of type t under perturbation p for within-type states (n,)."""
        eta = self.base + self.type_effect[t] + self.shared[p] + self.sensitivity[t] * self.specific[p]  # (G,)
        return eta[None, :] + state[:, None] * self.program[t][None, :]

    def sample(self, pairs: list[tuple[int, int]] | None, n_per_pair: int, seed: int) -> ad.AnnData:
        """n_per_pair cells of each (type, perturbation) pair (None = every pair): counts and obs labels."""
        if pairs is None:
            pairs = [(t, p) for t in range(self.n_types) for p in range(self.n_perturbations)]
        rng = np.random.default_rng(seed)
        blocks, types, perts = [], [], []
        for t, p in pairs:
            state = rng.normal(0.0, 1.0, size=n_per_pair)
            logits = self.log_profile(t, p, state)  # (n, G)
            profile = np.exp(logits - logits.max(axis=1, keepdims=True))
            profile /= profile.sum(axis=1, keepdims=True)
            lib = rng.lognormal(np.log(self.mean_library), self.library_sd, size=n_per_pair)
            mu = profile * lib[:, None]
            blocks.append(rng.poisson(rng.gamma(shape=self.theta, scale=mu / self.theta)).astype(np.float32))
            types += [self.type_name(t)] * n_per_pair
            perts += [self.perturbation_name(p)] * n_per_pair
        X = np.concatenate(blocks) if blocks else np.zeros((0, self.n_genes), dtype=np.float32)
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical(types), "perturbation": pd.Categorical(perts)},
            index=[f"s{seed}_cell_{i}" for i in range(len(X))],
        )
        var = pd.DataFrame(index=[f"GENE{j:05d}" for j in range(self.n_genes)])
        return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)
