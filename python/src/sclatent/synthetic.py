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


# --------------------------------------------------------------------------------------------------------
# a large dataset, generated straight to disk
# --------------------------------------------------------------------------------------------------------


def _sorted_uniforms(n_per_row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row r, n_per_row[r] uniforms on [0, 1) in increasing order (flat, rows in order), without sorting:
    the normalised partial sums of n + 1 exponential spacings."""
    n_rows = len(n_per_row)
    spacings = rng.exponential(size=int(n_per_row.sum()) + n_rows)  # (total + n_rows,)
    ends = np.cumsum(n_per_row + 1)  # (n_rows,) end of each row's spacings
    csum = np.cumsum(spacings)
    before = np.concatenate([[0.0], csum[ends[:-1] - 1]])  # (n_rows,) sum before each row
    total = csum[ends - 1] - before  # (n_rows,)
    row = np.repeat(np.arange(n_rows), n_per_row)
    last = np.ones(len(spacings), dtype=bool)
    last[ends - 1] = False  # the (n + 1)-th partial sum of a row is its total, not a draw
    u = (csum[last] - before[row]) / total[row]
    return np.minimum(u, np.nextafter(1.0, 0.0))


def _draw_sorted(
    n_per_row: np.ndarray, group: np.ndarray, cdf_flat: np.ndarray, width: int, rng: np.random.Generator
) -> np.ndarray:
    """Per row r, n_per_row[r] categorical draws from group[r]'s distribution, ascending within the row.

    cdf_flat: (n_groups * width,) with entry g*width + j = g + cdf_g(j), so that a query g + u lands in group g."""
    u = _sorted_uniforms(n_per_row, rng)
    g = np.repeat(group, n_per_row)
    idx = np.searchsorted(cdf_flat, g + u, side="right")
    return np.minimum(idx - g * width, width - 1)


class ScaleDataset:
    """A seeded synthetic count matrix at the paper's scale: cell types x perturbations, negative-binomial counts.

    Each cell has a cell type (a log-normal gene profile with up-regulated markers) and a perturbation (a program of
    genes whose share of the cell's molecules it raises); 18 types x 90 perturbations by default, as Parse 1M. A cell
    draws a depth Lambda (log-normal), then for every gene a Poisson number of transcription bursts with mean
    Lambda p_g (p: its type's profile mixed with its perturbation's program) and a logarithmic-series size per burst:
    a compound Poisson-logarithmic count, i.e. negative binomial per gene given the depth (constant Fano factor).
    Only the genes hit are drawn, so the cost follows the counts, not cells x genes. The depth is set so that a
    median cell expresses about `genes_per_cell` genes.
    """

    def __init__(
        self,
        n_genes: int = 20_000,
        *,
        n_types: int = 18,
        n_perturbations: int = 90,
        genes_per_cell: int = 700,
        depth_sd: float = 0.45,
        burst_q: float = 0.6,
        program_share: float = 0.08,
        program_genes: int = 40,
        n_flagged: int = 2_000,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng([seed, 0])
        self.n_genes, self.n_types, self.n_perturbations = n_genes, n_types, n_perturbations
        self.depth_sd, self.burst_q, self.program_share, self.seed = depth_sd, burst_q, program_share, seed
        base = rng.lognormal(0.0, 1.6, size=n_genes)
        profiles = base * rng.lognormal(0.0, 0.3, size=(n_types, n_genes))
        for t in range(n_types):
            profiles[t, rng.choice(n_genes, size=min(30, n_genes), replace=False)] *= 6.0
        profiles /= profiles.sum(axis=1, keepdims=True)
        self.type_cdf = (np.arange(n_types)[:, None] + np.cumsum(profiles, axis=1)).ravel()  # (T * G,)
        self.programs = np.sort(
            np.stack(
                [rng.choice(n_genes, size=min(program_genes, n_genes), replace=False) for _ in range(n_perturbations)]
            ),
            axis=1,
        )  # (P, m) gene ids, ascending
        weights = rng.lognormal(0.0, 0.5, size=self.programs.shape)
        weights /= weights.sum(axis=1, keepdims=True)
        self.program_cdf = (np.arange(n_perturbations)[:, None] + np.cumsum(weights, axis=1)).ravel()  # (P * m,)
        self.depth = self._depth_for(genes_per_cell, profiles)
        # the genes that vary most between cell types (log profile) or belong to a program: var["highly_variable"]
        spread = np.log(profiles).std(axis=0)
        spread[np.unique(self.programs)] = np.inf
        self.flagged = np.zeros(n_genes, dtype=bool)
        self.flagged[np.argsort(-spread, kind="stable")[: min(n_flagged, n_genes)]] = True

    def _depth_for(self, genes_per_cell: int, profiles: np.ndarray) -> float:
        """The median burst count at which a median cell expresses ~genes_per_cell genes: E[#genes hit] =
        sum_g 1 - exp(-D p_g) averaged over types, solved by bisection in log D."""
        lo, hi = 1.0, 1e7
        for _ in range(60):
            mid = np.sqrt(lo * hi)
            hit = np.mean(np.sum(-np.expm1(-mid * (1 - self.program_share) * profiles), axis=1))
            lo, hi = (mid, hi) if hit < genes_per_cell else (lo, mid)
        return float(np.sqrt(lo * hi))

    def gene_names(self) -> list[str]:
        return [f"GENE{j:05d}" for j in range(self.n_genes)]

    def max_genes_per_cell(self) -> float:
        """A bound of the mean expressed genes per cell over many cells (for the index type of the written file): the
        mean bursts per cell (a cell expresses at most one gene per burst), with 5% to spare."""
        return 1.05 * self.depth * np.exp(self.depth_sd**2 / 2)

    def labels(self, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell type and perturbation codes (n,) of the first n cells (uniform over the combinations)."""
        types = np.random.default_rng([self.seed, 1]).integers(0, self.n_types, size=n_cells)
        perts = np.random.default_rng([self.seed, 3]).integers(0, self.n_perturbations, size=n_cells)
        return types, perts

    def chunk(self, start: int, types: np.ndarray, perts: np.ndarray) -> sp.csr_matrix:
        """Counts (n, G) float32 CSR of the cells start..start+n-1 with these labels (seeded by `start`)."""
        rng = np.random.default_rng([self.seed, 2, start])
        n = len(types)
        depth = self.depth * rng.lognormal(0.0, self.depth_sd, size=n)  # (n,) expected bursts
        n_type = rng.poisson(depth * (1 - self.program_share))  # (n,)
        n_prog = rng.poisson(depth * self.program_share)
        g_type = _draw_sorted(n_type, types, self.type_cdf, self.n_genes, rng)  # ascending per cell
        m = self.programs.shape[1]
        g_prog = self.programs[np.repeat(perts, n_prog), _draw_sorted(n_prog, perts, self.program_cdf, m, rng)]
        rows = np.concatenate([np.repeat(np.arange(n), n_type), np.repeat(np.arange(n), n_prog)])
        keys = rows.astype(np.int64) * self.n_genes + np.concatenate([g_type, g_prog])
        order = np.argsort(keys, kind="stable")  # two sorted runs: a linear merge
        keys = keys[order]
        sizes = rng.logseries(self.burst_q, size=len(keys))
        new = np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, bool)
        starts = np.flatnonzero(new)
        values = np.add.reduceat(sizes, starts).astype(np.float32) if len(starts) else np.zeros(0, np.float32)
        entry = keys[starts]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(entry // self.n_genes, minlength=n), out=indptr[1:])
        return sp.csr_matrix((values, (entry % self.n_genes).astype(np.int32), indptr), shape=(n, self.n_genes))

    def write(self, path, n_cells: int, *, chunk_cells: int = 20_000) -> dict:
        """Write n_cells cells to the h5ad `path` chunk by chunk (memory: one chunk); returns size facts.

        obs: `cell_type` (type_00, ...) and `perturbation` (pert_00, ...); var: gene names GENE00000, ... and
        `highly_variable` (the `n_flagged` genes that vary most between types, and the programs' genes).
        """
        import pandas as pd

        from .ondisk import H5adWriter

        types, perts = self.labels(n_cells)
        writer = H5adWriter(path, self.n_genes, max_nnz=int(n_cells * self.max_genes_per_cell()) + 100_000)
        try:
            for a in range(0, n_cells, chunk_cells):
                b = min(a + chunk_cells, n_cells)
                writer.append(self.chunk(a, types[a:b], perts[a:b]))
            obs = pd.DataFrame(
                {
                    "cell_type": pd.Categorical.from_codes(types, [f"type_{t:02d}" for t in range(self.n_types)]),
                    "perturbation": pd.Categorical.from_codes(
                        perts, [f"pert_{k:02d}" for k in range(self.n_perturbations)]
                    ),
                },
                index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
            )
            nnz = writer.nnz
            writer.close(obs, pd.DataFrame({"highly_variable": self.flagged}, index=pd.Index(self.gene_names())))
        except BaseException:
            writer.abort()
            raise
        return {"n_cells": n_cells, "n_genes": self.n_genes, "nnz": int(nnz), "genes_per_cell": nnz / max(n_cells, 1)}


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
