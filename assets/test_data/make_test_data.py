"""Rebuild the bundled test data from ../shared/datasets (run from the repository root).

    .venv/bin/python assets/test_data/make_test_data.py ../shared/datasets

- pbmc3k_a.h5ad, pbmc3k_b.h5ad: 1,000 PBMC 3k cells (seeded, every cell type kept; Megakaryocytes and
  Dendritic cells all kept) on the 2,500 genes detected in the most cells, split into two files of 500 cells
  (the test profile gives them batches "a" and "b"; file b keeps only 2,450 of the genes so that combining the
  files exercises the gene intersection).
- mixology.h5ad: 400 singlet cells (demuxlet SNG) of sc_mixology on the 2,500 most detected genes, labels
  `cell_line` x `protocol` (two attributes for multi-attribute conditioning).
Counts are the raw UMI integers of the source files, unchanged (CSR float32), written gzip-compressed.
"""

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp


def top_detected(adata, n):
    det = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    return np.sort(np.argsort(-det, kind="stable")[:n])


def main(src: str) -> None:
    src = Path(src)
    out = Path(__file__).resolve().parent
    rng = np.random.default_rng(0)

    pbmc = ad.read_h5ad(src / "pbmc3k_counts_celltype.h5ad")
    pbmc.X = sp.csr_matrix(pbmc.X)
    keep = []
    for ct, idx in pbmc.obs.groupby("cell_type", observed=True).indices.items():
        n = len(idx) if len(idx) <= 40 else int(round(len(idx) * 1000 / pbmc.n_obs))
        keep.extend(rng.choice(idx, size=n, replace=False).tolist())
    keep = np.sort(np.array(keep))[:1000]
    pbmc = pbmc[keep]
    pbmc = pbmc[:, top_detected(pbmc, 2500)].copy()
    pbmc.obs = pbmc.obs[["cell_type"]].copy()
    pbmc.var = pbmc.var[["gene_ids"]].copy()
    pbmc.uns = {"source": "10x Genomics PBMC 3k (see assets/test_data/README.md)"}
    order = rng.permutation(pbmc.n_obs)
    a, b = np.sort(order[:500]), np.sort(order[500:])
    pbmc[a].copy().write_h5ad(out / "pbmc3k_a.h5ad", compression="gzip")
    pbmc[b, :2450].copy().write_h5ad(out / "pbmc3k_b.h5ad", compression="gzip")

    mix = ad.read_h5ad(src / "sc_mixology_celllines_counts.h5ad")
    mix = mix[mix.obs["demuxlet_call"] == "SNG"]
    idx = np.sort(rng.choice(mix.n_obs, size=400, replace=False))
    mix = mix[idx]
    mix = mix[:, top_detected(mix, 2500)].copy()
    mix.X = sp.csr_matrix(mix.X)
    mix.obs = mix.obs[["cell_line", "protocol", "batch"]].copy()
    mix.uns = {"source": "sc_mixology / CellBench, GEO GSE118767 (see assets/test_data/README.md)"}
    mix.write_h5ad(out / "mixology.h5ad", compression="gzip")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets")
