"""PREPARE: validate and combine one dataset's files, QC, seeded train/test split, HVG flags.

Rules (also in docs/usage.md):
- Every file is read on its own, kept sparse, and checked: counts must be finite non-negative integers, gene
  names unique, every condition key present in `obs`.
- Files are combined on the **intersection** of their genes (default, with a warning that counts the genes
  dropped) or on the union (`gene_join="outer"`, missing genes are zero counts).
- QC: cells with zero counts are always removed; then cells with fewer than `min_genes` expressed genes or
  fewer than `min_counts` total counts; then genes expressed in fewer than `min_cells` cells. Every filter's
  before/after numbers go to prepare.json.
- Split: rows with `split` = train/test keep it; cells of `all` files are split at random (seeded), stratified
  by the joint combination of the condition keys, with `test_fraction` of each stratum in test (a stratum of
  one cell stays in train).
- HVGs: scanpy `highly_variable_genes(flavor="seurat_v3")` on the training counts; `var["highly_variable"]`.
- Training cells are written in a seeded random order (so contiguous token shards are random samples);
  test cells keep their input order.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .counts import counts_matrix
from .io import (
    InputError,
    SampleRow,
    atomic_outputs,
    check_unique_genes,
    dump_json,
    provenance,
    read_h5ad,
)

log = logging.getLogger(__name__)


@dataclass
class PrepareConfig:
    dataset: str
    counts_layer: str = "X"
    condition_keys: list[str] = field(default_factory=list)
    n_hvg: int = 2000
    test_fraction: float = 0.2
    seed: int = 0
    min_genes: int = 0
    min_cells: int = 0
    min_counts: int = 0
    gene_join: str = "inner"

    def validate(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise InputError(f"--test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.n_hvg < 1:
            raise InputError(f"--n_hvg must be >= 1, got {self.n_hvg}")
        for name in ("min_genes", "min_cells", "min_counts"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.gene_join not in ("inner", "outer"):
            raise InputError(f"--gene_join must be 'inner' or 'outer', got '{self.gene_join}'")
        if len(set(self.condition_keys)) != len(self.condition_keys):
            raise InputError(f"--condition_keys lists a key twice: {','.join(self.condition_keys)}")
        reserved = {"split", "dataset", "source_file"}
        for key in self.condition_keys:
            if key in reserved:
                raise InputError(f"--condition_keys: '{key}' is a column sclatent writes itself; rename it in your obs")


def _load_one(row: SampleRow, cfg: PrepareConfig) -> ad.AnnData:
    """Read one file into a minimal AnnData: CSR counts in X, the needed obs columns, var index only."""
    src = row.h5ad
    adata = read_h5ad(row.local or src, name=src)
    check_unique_genes(adata.var_names, source=src)
    if adata.n_obs == 0:
        raise InputError(f"{src}: the file has no cells")
    X = counts_matrix(adata, cfg.counts_layer, source=src)
    obs = pd.DataFrame(index=adata.obs_names.astype(str))
    for key in cfg.condition_keys:
        if key == "batch" and row.batch is not None:
            continue  # written from the samplesheet below
        if key not in adata.obs.columns:
            avail = ", ".join(map(str, adata.obs.columns[:20])) or "(none)"
            raise InputError(f"{src}: condition key '{key}' is not an obs column (obs columns: {avail})")
        col = adata.obs[key]
        if col.isna().any():
            bad = adata.obs_names[col.isna().to_numpy()][0]
            raise InputError(
                f"{src}: condition key '{key}' is missing (NaN) for cell '{bad}' ({int(col.isna().sum())} cells)"
            )
        obs[key] = col.astype(str).to_numpy()
    if row.batch is not None:
        if "batch" in adata.obs.columns:
            log.warning("%s: obs['batch'] exists and is replaced by the samplesheet's batch '%s'", src, row.batch)
        obs["batch"] = row.batch
    elif "batch" in adata.obs.columns and "batch" not in obs.columns:
        obs["batch"] = adata.obs["batch"].astype(str).to_numpy()
    obs["source_file"] = Path(src).name
    obs["split"] = row.split
    out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=adata.var_names.astype(str)))
    del adata
    return out


def _combine(parts: list[ad.AnnData], rows: list[SampleRow], cfg: PrepareConfig, report: dict[str, Any]) -> ad.AnnData:
    if len(parts) == 1:
        combined = parts[0]
        report["genes"]["union"] = report["genes"]["intersection"] = combined.n_vars
    else:
        sets = [set(p.var_names) for p in parts]
        inter = set.intersection(*sets)
        union = set.union(*sets)
        report["genes"]["union"] = len(union)
        report["genes"]["intersection"] = len(inter)
        if cfg.gene_join == "inner":
            if not inter:
                raise InputError(f"dataset '{cfg.dataset}': the files share no gene names (gene_join=inner)")
            if len(union) > len(inter):
                log.warning(
                    "dataset '%s': combining %d files on their %d shared genes drops %d genes present in only some "
                    "files "
                    "(use --gene_join outer to keep them as zeros)",
                    cfg.dataset,
                    len(parts),
                    len(inter),
                    len(union) - len(inter),
                )
        obs_names = pd.Index(np.concatenate([p.obs_names.to_numpy() for p in parts]))
        unique = obs_names.is_unique
        combined = ad.concat(
            parts,
            join=cfg.gene_join,
            index_unique=None if unique else ":",
            keys=None if unique else [f"{i}" for i in range(len(parts))],
            fill_value=0,
        )
        if not unique:
            log.warning(
                "dataset '%s': cell names repeat across files; prefixed them with the file's row index", cfg.dataset
            )
        report["cell_names_prefixed"] = not unique
        # a gene order that does not depend on set iteration order: first file's order, then new genes
        if cfg.gene_join == "outer":
            order = list(dict.fromkeys(g for p in parts for g in p.var_names))
            combined = combined[:, order].copy()
        X = combined.X
        combined.X = (X.tocsr() if sp.issparse(X) else sp.csr_matrix(X)).astype(np.float32)
    report["genes"]["after_join"] = combined.n_vars
    return combined


def _qc(adata: ad.AnnData, cfg: PrepareConfig, report: dict[str, Any]) -> ad.AnnData:
    X = adata.X
    n_counts = np.asarray(X.sum(axis=1)).ravel()
    n_genes = np.diff(X.indptr)
    steps = []
    keep = n_counts > 0
    steps.append({"filter": "zero_count_cells", "cells_before": adata.n_obs, "cells_removed": int((~keep).sum())})
    if cfg.min_genes > 0:
        k = n_genes >= cfg.min_genes
        steps.append(
            {
                "filter": f"min_genes>={cfg.min_genes}",
                "cells_before": int(keep.sum()),
                "cells_removed": int((keep & ~k).sum()),
            }
        )
        keep &= k
    if cfg.min_counts > 0:
        k = n_counts >= cfg.min_counts
        steps.append(
            {
                "filter": f"min_counts>={cfg.min_counts}",
                "cells_before": int(keep.sum()),
                "cells_removed": int((keep & ~k).sum()),
            }
        )
        keep &= k
    adata = adata[keep].copy()
    genes_before = adata.n_vars
    cells_per_gene = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    gkeep = cells_per_gene >= max(cfg.min_cells, 1)
    steps.append(
        {
            "filter": f"genes_min_cells>={max(cfg.min_cells, 1)}",
            "genes_before": genes_before,
            "genes_removed": int((~gkeep).sum()),
        }
    )
    adata = adata[:, gkeep].copy()
    report["qc"] = steps
    if adata.n_obs == 0:
        raise InputError(
            f"dataset '{cfg.dataset}': no cells left after QC (see the QC thresholds --min_genes/--min_counts)"
        )
    if adata.n_vars == 0:
        raise InputError(f"dataset '{cfg.dataset}': no genes left after QC (--min_cells {cfg.min_cells})")
    return adata


def stratified_split(strata: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean test mask: in each stratum round(test_fraction * n) random cells, keeping >= 1 cell in train."""
    is_test = np.zeros(len(strata), dtype=bool)
    if test_fraction <= 0:
        return is_test
    for value in sorted(set(strata.tolist())):
        idx = np.flatnonzero(strata == value)
        n_test = min(int(np.floor(test_fraction * len(idx) + 0.5)), len(idx) - 1)
        if n_test > 0:
            is_test[rng.permutation(idx)[:n_test]] = True
    return is_test


def _split(adata: ad.AnnData, cfg: PrepareConfig, rng: np.random.Generator) -> np.ndarray:
    given = adata.obs["split"].to_numpy()
    is_test = given == "test"
    free = given == "all"
    if free.any():
        if cfg.condition_keys:
            strata = adata.obs.loc[free, cfg.condition_keys].astype(str).agg("|".join, axis=1).to_numpy()
        else:
            strata = np.zeros(int(free.sum()), dtype=object)
        is_test[np.flatnonzero(free)] = stratified_split(strata, cfg.test_fraction, rng)
    return is_test


def _class_counts(obs: pd.DataFrame, keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: dict(sorted(Counter(obs[k]).items())) for k in keys}
    if len(keys) > 1:
        joint = obs[keys].astype(str).agg("|".join, axis=1)
        out["|".join(keys)] = dict(sorted(Counter(joint).items()))
    return out


def prepare(rows: list[SampleRow], cfg: PrepareConfig, outdir: str | Path) -> dict[str, Any]:
    """Run PREPARE for one dataset: returns the prepare.json content and writes train/test h5ad + json."""
    t0 = time.time()
    cfg.validate()
    rows = [r for r in rows if r.dataset == cfg.dataset]
    if not rows:
        raise InputError(f"samplesheet has no rows for dataset '{cfg.dataset}'")
    outdir = Path(outdir)
    report: dict[str, Any] = {"dataset": cfg.dataset, "files": [], "genes": {}}

    parts = []
    for row in rows:
        log.info("reading %s", row.h5ad)
        part = _load_one(row, cfg)
        report["files"].append(
            {"h5ad": row.h5ad, "split": row.split, "batch": row.batch, "cells": part.n_obs, "genes": part.n_vars}
        )
        parts.append(part)
    adata = _combine(parts, rows, cfg, report)
    del parts
    report["cells_in"] = int(adata.n_obs)
    adata = _qc(adata, cfg, report)
    report["cells_after_qc"] = int(adata.n_obs)
    report["genes_after_qc"] = int(adata.n_vars)

    rng = np.random.default_rng(cfg.seed)
    is_test = _split(adata, cfg, rng)
    train = adata[~is_test].copy()
    test = adata[is_test].copy()
    if train.n_obs == 0:
        raise InputError(
            f"dataset '{cfg.dataset}': the training split is empty (every row has split=test, or QC removed the "
            "training cells)"
        )
    # seeded random order of training cells: contiguous token shards become random samples
    train = train[rng.permutation(train.n_obs)].copy()

    n_top = min(cfg.n_hvg, train.n_vars)
    hvg = _highly_variable(train, n_top)
    for part in (train, test):
        part.var["highly_variable"] = hvg
        part.obs["split"] = "train" if part is train else "test"
        part.obs["dataset"] = cfg.dataset
        for key in [*cfg.condition_keys, "batch", "source_file", "split", "dataset"]:
            if key in part.obs.columns:
                part.obs[key] = pd.Categorical(part.obs[key].astype(str))
    report["hvg"] = {
        "flavor": "seurat_v3",
        "n_top_genes": int(n_top),
        "n_flagged": int(hvg.sum()),
        "computed_on": "train",
    }
    report["split"] = {
        "train": int(train.n_obs),
        "test": int(test.n_obs),
        "test_fraction": cfg.test_fraction,
        "stratified_by": cfg.condition_keys,
        "from_samplesheet": {s: int(sum(1 for v in adata.obs["split"] if v == s)) for s in ("train", "test")},
    }
    report["classes"] = {
        "train": _class_counts(train.obs, cfg.condition_keys),
        "test": _class_counts(test.obs, cfg.condition_keys),
    }
    report["elapsed_s"] = round(time.time() - t0, 3)
    report["provenance"] = provenance("prepare", asdict(cfg))
    uns = {"dataset": cfg.dataset, "condition_keys": list(cfg.condition_keys), "counts_layer_in": cfg.counts_layer}
    for part in (train, test):
        part.uns["sclatent"] = uns

    outdir.mkdir(parents=True, exist_ok=True)
    # the three outputs appear together or not at all
    with atomic_outputs(outdir / "train.h5ad", outdir / "test.h5ad", outdir / "prepare.json") as (
        t_train,
        t_test,
        t_json,
    ):
        train.write_h5ad(t_train)
        test.write_h5ad(t_test)
        dump_json(report, t_json)
    log.info(
        "dataset '%s': %d train + %d test cells, %d genes (%d HVG) in %.1fs",
        cfg.dataset,
        train.n_obs,
        test.n_obs,
        train.n_vars,
        int(hvg.sum()),
        report["elapsed_s"],
    )
    return report


def _highly_variable(train: ad.AnnData, n_top: int) -> np.ndarray:
    """seurat_v3 HVG flags on raw training counts (scanpy); all genes when n_top covers them."""
    import scanpy as sc

    if n_top >= train.n_vars:
        return np.ones(train.n_vars, dtype=bool)
    tmp = ad.AnnData(X=train.X, var=pd.DataFrame(index=train.var_names))
    try:
        sc.pp.highly_variable_genes(tmp, flavor="seurat_v3", n_top_genes=n_top, inplace=True)
    except ValueError as exc:
        raise InputError(f"HVG selection (seurat_v3) failed on {train.n_obs} training cells: {exc}") from None
    return tmp.var["highly_variable"].to_numpy(dtype=bool)
