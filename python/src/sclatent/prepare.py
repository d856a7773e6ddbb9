"""PREPARE: validate and combine one dataset's files, QC, seeded train/test split, HVG flags; streamed.

Rules (also in docs/usage.md):
- Every file is checked: counts must be finite non-negative integers, gene names unique, every condition key
  present in `obs`.
- Files are combined on the **intersection** of their genes (default, with a warning that counts the genes
  dropped) or on the union (`gene_join="outer"`, missing genes are zero counts).
- QC: cells with zero counts are always removed; then cells with fewer than `min_genes` expressed genes or
  fewer than `min_counts` total counts; then genes expressed in fewer than `min_cells` cells. Every filter's
  before/after numbers go to prepare.json.
- Split (`split_cells`): rows with `split` = train/test keep it; cells of `all` files are split at random (seeded),
  stratified by the joint combination of the condition keys, with `test_fraction` of each stratum in test (a
  stratum of one cell stays in train). Cells of a `holdout` combination go to test whatever their row says
  (`holdout.holdout_mask`); both splits record the combinations training saw (`uns["sclatent"]`).
- HVGs: Seurat v3's variance-stabilised selection (scanpy's `highly_variable_genes(flavor="seurat_v3")`) on the
  training counts, from per-gene sums streamed over the cells (`SeuratV3`); `var["highly_variable"]`.
- Training cells are written in a seeded random order (so contiguous token shards are random samples);
  test cells keep their input order.

Memory follows the chunk, not the data: the files are read in row chunks (`ondisk.H5adCounts`) and never held
whole. A first pass validates the counts and computes the per-cell totals and the per-gene detection counts that
QC needs; QC, the split and the training order are then decided on per-cell vectors; a second pass writes the test
cells in order and scatters the training cells into on-disk buckets of consecutive output positions, each of
which is then sorted in memory and appended to train.h5ad; a last read of train.h5ad gives the clipped variances
of the HVG selection.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .counts import bad_counts, counts_error
from .holdout import combinations_of, combo_name, holdout_mask
from .io import InputError, SampleRow, atomic_outputs, check_unique_genes, dump_json, joint_labels, provenance
from .ondisk import H5adCounts, H5adWriter, row_chunks

log = logging.getLogger(__name__)

BUCKET_NNZ = 32_000_000  # stored counts per bucket of training cells sorted in memory (~256 MB as float32 + int32)
SEURAT_V3_SPAN = 0.3  # loess span of the mean-variance trend (Seurat v3 and scanpy's default)


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
    gene_key: str | None = None  # a var column to use as the gene names instead of var_names (e.g. Ensembl ids)
    holdout: list[dict[str, str]] = field(default_factory=list)  # combinations sent to test only (never trained on)

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


# --------------------------------------------------------------------------------------------------------
# input files
# --------------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One input file opened for streaming: its counts, the obs columns PREPARE keeps, and its place in the join."""

    row: SampleRow
    counts: H5adCounts
    obs: pd.DataFrame  # (n, columns) condition keys, batch, source_file, split; index = the file's cell names
    to_joined: np.ndarray | None = None  # (n_vars,) column of each file gene in the joined genes, -1 = dropped
    to_output: np.ndarray | None = None  # (n_vars,) column in the output genes (after gene QC), -1 = dropped


def _open_source(row: SampleRow, cfg: PrepareConfig) -> Source:
    """Open one file and read its obs columns (the counts stay on disk)."""
    src = row.h5ad
    counts = H5adCounts(row.local or src, cfg.counts_layer, name=src)
    try:
        if cfg.gene_key is not None:
            counts.var_names = counts.var_column(cfg.gene_key)
        check_unique_genes(counts.var_names, source=src)
        if counts.n_obs == 0:
            raise InputError(f"{src}: the file has no cells")
        obs = pd.DataFrame(index=pd.Index(counts.obs_names))
        for key in cfg.condition_keys:
            if key == "batch" and row.batch is not None:
                continue  # written from the samplesheet below
            if key not in counts.obs_columns:
                avail = ", ".join(counts.obs_columns[:20]) or "(none)"
                raise InputError(f"{src}: condition key '{key}' is not an obs column (obs columns: {avail})")
            col = counts.obs_column(key)
            missing = col.isna().to_numpy()
            if missing.any():
                raise InputError(
                    f"{src}: condition key '{key}' is missing (NaN) for cell '{counts.obs_names[missing][0]}' "
                    f"({int(missing.sum())} cells)"
                )
            obs[key] = col.astype(str).to_numpy()
        if row.batch is not None:
            if "batch" in counts.obs_columns:
                log.warning("%s: obs['batch'] exists and is replaced by the samplesheet's batch '%s'", src, row.batch)
            obs["batch"] = row.batch
        elif "batch" in counts.obs_columns and "batch" not in obs.columns:
            obs["batch"] = counts.obs_column("batch").astype(str).to_numpy()
        obs["source_file"] = Path(src).name
        obs["split"] = row.split
    except BaseException:
        counts.close()
        raise
    return Source(row=row, counts=counts, obs=obs)


def _join_genes(sources: list[Source], cfg: PrepareConfig, report: dict[str, Any]) -> pd.Index:
    """The genes of the combined data (inner: the first file's order; outer: first file's, then new genes in file
    order), and each file's column map into them."""
    names = [s.counts.var_names for s in sources]
    if len(sources) == 1:
        genes = names[0]
        report["genes"]["union"] = report["genes"]["intersection"] = len(genes)
    else:
        sets = [set(n) for n in names]
        inter, union = set.intersection(*sets), set.union(*sets)
        report["genes"]["union"] = len(union)
        report["genes"]["intersection"] = len(inter)
        if cfg.gene_join == "inner":
            if not inter:
                raise InputError(f"dataset '{cfg.dataset}': the files share no gene names (gene_join=inner)")
            if len(union) > len(inter):
                log.warning(
                    "dataset '%s': combining %d files on their %d shared genes drops %d genes present in only some "
                    "files (use --gene_join outer to keep them as zeros)",
                    cfg.dataset,
                    len(sources),
                    len(inter),
                    len(union) - len(inter),
                )
            genes = names[0][names[0].isin(list(inter))]
        else:
            genes = pd.Index(list(dict.fromkeys(g for n in names for g in n)))
    for s in sources:
        s.to_joined = genes.get_indexer(s.counts.var_names).astype(np.int64)
    report["genes"]["after_join"] = len(genes)
    return genes


def remap_columns(X: sp.csr_matrix, column_map: np.ndarray, n_out: int) -> sp.csr_matrix:
    """X (n, G_in) with column j moved to `column_map[j]` (n, n_out); columns mapped to -1 are dropped.

    The result has sorted indices and keeps X's values untouched."""
    if len(column_map) == n_out and np.array_equal(column_map, np.arange(n_out)):
        out = X.copy()
    else:
        target = column_map[X.indices]
        dropped = np.flatnonzero(target < 0)
        indptr = X.indptr.astype(np.int64)
        if len(dropped):
            row = np.searchsorted(indptr, dropped, side="right") - 1  # row of each dropped value
            indptr = indptr - np.concatenate([[0], np.cumsum(np.bincount(row, minlength=X.shape[0]))])
            keep = np.ones(len(target), dtype=bool)
            keep[dropped] = False
            data, target = X.data[keep], target[keep]
        else:
            data = X.data.copy()
        out = sp.csr_matrix((data, target.astype(np.int32), indptr), shape=(X.shape[0], n_out))
        kept = column_map[column_map >= 0]
        if X.has_sorted_indices and np.all(np.diff(kept) > 0):
            out.has_sorted_indices = True  # an increasing map keeps each row's order
    out.sort_indices()
    return out


# --------------------------------------------------------------------------------------------------------
# pass 1: validation and the per-cell / per-gene numbers of QC
# --------------------------------------------------------------------------------------------------------


@dataclass
class CellStats:
    """Per-cell numbers over the joined genes, for every input cell in file order."""

    n_counts: np.ndarray  # (n,) float64 total counts
    n_genes: np.ndarray  # (n,) int64 expressed genes
    keep: np.ndarray  # (n,) bool: passes the cell QC
    cells_per_gene: np.ndarray  # (G_joined,) int64 kept cells expressing each gene


def _cell_keep(n_counts: np.ndarray, n_genes: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    keep = n_counts > 0
    if cfg.min_genes > 0:
        keep &= n_genes >= cfg.min_genes
    if cfg.min_counts > 0:
        keep &= n_counts >= cfg.min_counts
    return keep


def _first_pass(sources: list[Source], n_genes_joined: int, cfg: PrepareConfig) -> CellStats:
    """Read every file once: check the counts, and compute the QC numbers over the joined genes."""
    n_counts, n_genes, keep = [], [], []
    cells_per_gene = np.zeros(n_genes_joined, dtype=np.int64)
    for s in sources:
        c = s.counts
        first, n_bad = None, 0
        for a, b in c.chunks():
            X = c.rows(a, b)
            f, n = bad_counts(X)  # on the stored values, before any conversion
            if f is not None and first is None:
                first = (a + f[0], f[1], f[2])
            n_bad += n
            if n_bad:
                continue  # the file is refused: count the rest of its bad entries only
            X = X.astype(np.float32, copy=False)
            X.eliminate_zeros()
            Xj = remap_columns(X, s.to_joined, n_genes_joined)
            counts_j = np.asarray(Xj.sum(axis=1, dtype=np.float64)).ravel()
            genes_j = np.diff(Xj.indptr)
            keep_j = _cell_keep(counts_j, genes_j, cfg)
            kept_rows = np.repeat(keep_j, genes_j)
            np.add.at(cells_per_gene, Xj.indices[kept_rows], 1)
            n_counts.append(counts_j)
            n_genes.append(genes_j)
            keep.append(keep_j)
        if first is not None:
            raise counts_error(first, n_bad, c.obs_names, c.var_names, source=f"{c.path} [{c.layer}]")
    return CellStats(
        n_counts=np.concatenate(n_counts),
        n_genes=np.concatenate(n_genes).astype(np.int64),
        keep=np.concatenate(keep),
        cells_per_gene=cells_per_gene,
    )


def _qc_report(stats: CellStats, cfg: PrepareConfig) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The QC steps of prepare.json and the gene mask (over the joined genes)."""
    steps = []
    keep = stats.n_counts > 0
    steps.append({"filter": "zero_count_cells", "cells_before": len(keep), "cells_removed": int((~keep).sum())})
    for name, value, threshold in (
        ("min_genes", stats.n_genes, cfg.min_genes),
        ("min_counts", stats.n_counts, cfg.min_counts),
    ):
        if threshold > 0:
            k = value >= threshold
            steps.append(
                {
                    "filter": f"{name}>={threshold}",
                    "cells_before": int(keep.sum()),
                    "cells_removed": int((keep & ~k).sum()),
                }
            )
            keep &= k
    min_cells = max(cfg.min_cells, 1)
    gkeep = stats.cells_per_gene >= min_cells
    steps.append(
        {"filter": f"genes_min_cells>={min_cells}", "genes_before": len(gkeep), "genes_removed": int((~gkeep).sum())}
    )
    if not keep.any():
        raise InputError(
            f"dataset '{cfg.dataset}': no cells left after QC (see the QC thresholds --min_genes/--min_counts)"
        )
    if not gkeep.any():
        raise InputError(f"dataset '{cfg.dataset}': no genes left after QC (--min_cells {cfg.min_cells})")
    return steps, gkeep


# --------------------------------------------------------------------------------------------------------
# the split: a function of the per-cell obs table
# --------------------------------------------------------------------------------------------------------


def stratified_split(strata: np.ndarray, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean test mask: in each stratum round(test_fraction * n) random cells, keeping >= 1 cell in train."""
    is_test = np.zeros(len(strata), dtype=bool)
    if test_fraction <= 0:
        return is_test
    values, codes = np.unique(strata.astype(str), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(values) + 1))
    for v in range(len(values)):
        idx = order[bounds[v] : bounds[v + 1]]  # the stratum's cells in input order
        n_test = min(int(np.floor(test_fraction * len(idx) + 0.5)), len(idx) - 1)
        if n_test > 0:
            is_test[rng.permutation(idx)[:n_test]] = True
    return is_test


def split_cells(obs: pd.DataFrame, cfg: PrepareConfig, rng: np.random.Generator) -> np.ndarray:
    """Test mask (n,) of the cells of `obs` (after QC, in input order): cells of a held-out combination go to test;
    the samplesheet's train/test rows keep their split; the cells of `all` rows are split by `stratified_split` over
    the joint condition-key labels."""
    given = obs["split"].to_numpy()
    held = holdout_mask(obs, cfg.holdout, cfg.condition_keys)  # (n,) held-out combinations: test only
    is_test = (given == "test") | held
    free = (given == "all") & ~held
    if free.any():
        if cfg.condition_keys:
            strata = joint_labels(obs.loc[free], cfg.condition_keys)
        else:
            strata = np.zeros(int(free.sum()), dtype=object)
        is_test[np.flatnonzero(free)] = stratified_split(strata, cfg.test_fraction, rng)
    return is_test


def _class_counts(obs: pd.DataFrame, keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: dict(sorted(Counter(obs[k]).items())) for k in keys}
    if len(keys) > 1:
        out["|".join(keys)] = dict(sorted(Counter(joint_labels(obs, keys)).items()))
    return out


# --------------------------------------------------------------------------------------------------------
# HVGs: Seurat v3 from streamed per-gene sums
# --------------------------------------------------------------------------------------------------------


class SeuratV3:
    """Seurat v3's highly variable genes (scanpy's `flavor="seurat_v3"`, one batch) from two passes over the cells.

    Pass 1 (`add_moments`) sums x and x² per gene; for integer counts these sums are exact in any order, so the
    means and variances equal scanpy's. `fit_trend` regresses log10 variance on log10 mean (loess, span 0.3,
    degree 2, scikit-misc as scanpy) and sets each gene's clip value sqrt(N) sd_g + mean_g. Pass 2 (`add_clipped`)
    sums the clipped values and their squares in cell order, as scanpy does. The normalised variance is
    (N mean² + sum clip(x)² - 2 mean sum clip(x)) / ((N - 1) sd²), and the `n_top` largest are flagged.
    """

    def __init__(self, n_genes: int) -> None:
        self.n_cells = 0
        self.sum = np.zeros(n_genes)
        self.sum_sq = np.zeros(n_genes)
        self.clip_sum = np.zeros(n_genes)
        self.clip_sum_sq = np.zeros(n_genes)
        self.mean = self.reg_std = self.clip_val = None

    def add_moments(self, X: sp.csr_matrix) -> None:
        data = X.data.astype(np.float32, copy=False)
        np.add.at(self.sum, X.indices, data.astype(np.float64))
        np.add.at(self.sum_sq, X.indices, (data * data).astype(np.float64))  # the square in float32, as scanpy
        self.n_cells += X.shape[0]

    def fit_trend(self) -> None:
        from skmisc.loess import loess

        n = self.n_cells
        mean = self.sum / n
        var = self.sum_sq / n - (self.sum / n) ** 2
        if n != 1:
            var *= n / (n - 1)
        not_const = var > 0
        fitted = np.zeros(len(mean))
        model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=SEURAT_V3_SPAN, degree=2)
        model.fit()
        fitted[not_const] = model.outputs.fitted_values
        self.mean = mean
        self.reg_std = np.sqrt(10**fitted)
        self.clip_val = self.reg_std * np.sqrt(n) + mean

    def add_clipped(self, X: sp.csr_matrix) -> None:
        clipped = np.minimum(X.data.astype(np.float64), self.clip_val[X.indices])
        np.add.at(self.clip_sum_sq, X.indices, clipped**2)
        np.add.at(self.clip_sum, X.indices, clipped)

    def flags(self, n_top: int) -> np.ndarray:
        n, mean = self.n_cells, self.mean
        norm_var = (1 / ((n - 1) * np.square(self.reg_std))) * (
            (n * np.square(mean)) + self.clip_sum_sq - 2 * self.clip_sum * mean
        )
        rank = np.argsort(np.argsort(-norm_var))  # 0 = most variable (scanpy's ranking, ties as np.argsort)
        return rank < n_top


# --------------------------------------------------------------------------------------------------------
# pass 2: writing test cells in order and training cells in their seeded order
# --------------------------------------------------------------------------------------------------------


class _Buckets:
    """Training cells scattered to on-disk buckets of consecutive output positions (raw CSR arrays per bucket)."""

    def __init__(self, folder: Path, bucket_of_position: np.ndarray, n_buckets: int) -> None:
        self.folder = folder
        self.bucket_of_position = bucket_of_position  # (n_train,)
        self.files = [
            (open(folder / f"b{b}.data", "wb"), open(folder / f"b{b}.indices", "wb")) for b in range(n_buckets)
        ]
        self.positions: list[list[np.ndarray]] = [[] for _ in range(n_buckets)]
        self.lengths: list[list[np.ndarray]] = [[] for _ in range(n_buckets)]

    def add(self, X: sp.csr_matrix, positions: np.ndarray) -> None:
        """Rows of X (already on the output genes) go to the buckets of their output `positions`."""
        buckets = self.bucket_of_position[positions]
        order = np.argsort(buckets, kind="stable")
        bounds = np.searchsorted(buckets[order], np.arange(len(self.files) + 1))
        for b in np.unique(buckets):
            rows = order[bounds[b] : bounds[b + 1]]
            part = X[rows]
            self.files[b][0].write(part.data.astype(np.float32, copy=False).tobytes())
            self.files[b][1].write(part.indices.astype(np.int32, copy=False).tobytes())
            self.positions[b].append(positions[rows])
            self.lengths[b].append(np.diff(part.indptr))

    def sorted_bucket(self, b: int, n_genes: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """Bucket b's cells in output order (CSR) and their positions; the bucket's files are removed."""
        for fh in self.files[b]:
            fh.close()
        data = np.fromfile(self.folder / f"b{b}.data", dtype=np.float32)
        indices = np.fromfile(self.folder / f"b{b}.indices", dtype=np.int32)
        (self.folder / f"b{b}.data").unlink()
        (self.folder / f"b{b}.indices").unlink()
        positions = np.concatenate(self.positions[b]) if self.positions[b] else np.zeros(0, np.int64)
        lengths = np.concatenate(self.lengths[b]) if self.lengths[b] else np.zeros(0, np.int64)
        indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        X = sp.csr_matrix((data, indices, indptr), shape=(len(lengths), n_genes))
        order = np.argsort(positions, kind="stable")
        return X[order], positions[order]

    def close(self) -> None:
        for pair in self.files:
            for fh in pair:
                fh.close()


def _bucket_plan(train_nnz: np.ndarray) -> tuple[np.ndarray, int]:
    """Bucket of each output position of the training cells (by stored counts, at most BUCKET_NNZ per bucket)."""
    if len(train_nnz) == 0:
        return np.zeros(0, dtype=np.int64), 0
    starts = list(row_chunks(np.concatenate([[0], np.cumsum(train_nnz)]), len(train_nnz), 1, BUCKET_NNZ))
    bucket = np.zeros(len(train_nnz), dtype=np.int64)
    for b, (a, z) in enumerate(starts):
        bucket[a:z] = b
    return bucket, len(starts)


def _write_outputs(
    sources: list[Source],
    stats: CellStats,
    is_test: np.ndarray,
    train_order: np.ndarray,
    n_out: int,
    train_path: str,
    test_path: str,
    workdir: Path,
) -> tuple[H5adWriter, H5adWriter, SeuratV3]:
    """Second pass: test cells appended in input order; training cells bucketed, then appended in `train_order`
    (kept-cell indices) while the HVG moments are summed. Returns the open writers and the HVG state."""
    n_kept = len(is_test)
    train_idx = train_order
    position = np.full(n_kept, -1, dtype=np.int64)
    position[train_idx] = np.arange(len(train_idx))
    bucket_of_position, n_buckets = _bucket_plan(stats.n_genes[stats.keep][train_idx])
    kept_nnz = stats.n_genes[stats.keep]  # (n_kept,) an upper bound of each cell's stored counts
    test_writer = H5adWriter(test_path, n_out, max_nnz=int(kept_nnz[is_test].sum()))
    train_writer = H5adWriter(train_path, n_out, max_nnz=int(kept_nnz[train_idx].sum()))
    buckets = _Buckets(workdir, bucket_of_position, n_buckets)
    try:
        kept_before = 0  # kept cells of earlier files and chunks
        offset = 0  # input cells of earlier files
        for s in sources:
            c = s.counts
            for a, b in c.chunks():
                keep = stats.keep[offset + a : offset + b]
                if not keep.any():
                    continue
                X = c.rows(a, b)
                X = (X if keep.all() else X[np.flatnonzero(keep)]).astype(np.float32, copy=False)
                X.eliminate_zeros()
                X = remap_columns(X, s.to_output, n_out)
                k = np.arange(kept_before, kept_before + X.shape[0])
                kept_before += X.shape[0]
                t = is_test[k]
                if t.any():
                    test_writer.append(X if t.all() else X[np.flatnonzero(t)])
                if not t.all():
                    buckets.add(X if not t.any() else X[np.flatnonzero(~t)], position[k[~t]])
            offset += c.n_obs
        hvg = SeuratV3(n_out)
        for bkt in range(n_buckets):
            X, pos = buckets.sorted_bucket(bkt, n_out)
            if len(pos) and not np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):
                raise RuntimeError("training-cell bucket does not hold consecutive positions")  # a bug, not input
            hvg.add_moments(X)
            train_writer.append(X)
    except BaseException:
        buckets.close()
        test_writer.abort()
        train_writer.abort()
        raise
    buckets.close()
    return train_writer, test_writer, hvg


def _kept_obs(sources: list[Source], stats: CellStats, cfg: PrepareConfig, report: dict[str, Any]) -> pd.DataFrame:
    """The obs rows of the kept cells in input order (names prefixed by the file's row when they repeat)."""
    names = np.concatenate([s.counts.obs_names for s in sources])
    unique = pd.Index(names).is_unique
    frames = []
    for i, s in enumerate(sources):
        obs = s.obs
        if not unique:
            obs = obs.set_axis(pd.Index([f"{n}:{i}" for n in obs.index]), axis=0)
        frames.append(obs)
    if len(sources) > 1:
        if not unique:
            log.warning(
                "dataset '%s': cell names repeat across files; prefixed them with the file's row index", cfg.dataset
            )
        report["cell_names_prefixed"] = not unique
        obs = pd.concat(frames, axis=0, join=cfg.gene_join, sort=False)
    else:
        obs = frames[0]
    return obs.iloc[np.flatnonzero(stats.keep)]


def _final_obs(obs: pd.DataFrame, split: str, cfg: PrepareConfig) -> pd.DataFrame:
    obs = obs.copy()
    obs["split"] = split
    obs["dataset"] = cfg.dataset
    for key in [*cfg.condition_keys, "batch", "source_file", "split", "dataset"]:
        if key in obs.columns:
            obs[key] = pd.Categorical(obs[key].astype(str))
    return obs


def prepare(rows: list[SampleRow], cfg: PrepareConfig, outdir: str | Path) -> dict[str, Any]:
    """Run PREPARE for one dataset: returns the prepare.json content and writes train/test h5ad + json."""
    t0 = time.time()
    cfg.validate()
    rows = [r for r in rows if r.dataset == cfg.dataset]
    if not rows:
        raise InputError(f"samplesheet has no rows for dataset '{cfg.dataset}'")
    outdir = Path(outdir)
    report: dict[str, Any] = {"dataset": cfg.dataset, "files": [], "genes": {}}
    sources: list[Source] = []
    try:
        for row in rows:
            log.info("opening %s", row.h5ad)
            s = _open_source(row, cfg)
            sources.append(s)
            report["files"].append(
                {
                    "h5ad": row.h5ad,
                    "split": row.split,
                    "batch": row.batch,
                    "cells": s.counts.n_obs,
                    "genes": s.counts.n_vars,
                }
            )
        genes = _join_genes(sources, cfg, report)
        log.info("pass 1: checking counts and QC numbers of %d cells", sum(s.counts.n_obs for s in sources))
        stats = _first_pass(sources, len(genes), cfg)
        report["cells_in"] = int(len(stats.keep))
        report["qc"], gkeep = _qc_report(stats, cfg)
        out_genes = genes[gkeep]
        joined_to_out = np.full(len(genes), -1, dtype=np.int64)
        joined_to_out[gkeep] = np.arange(int(gkeep.sum()))
        for s in sources:
            s.to_output = np.where(s.to_joined >= 0, joined_to_out[s.to_joined], -1)
        obs = _kept_obs(sources, stats, cfg, report)
        report["cells_after_qc"] = int(len(obs))
        report["genes_after_qc"] = int(len(out_genes))

        rng = np.random.default_rng(cfg.seed)
        is_test = split_cells(obs, cfg, rng)
        train_idx = np.flatnonzero(~is_test)
        if len(train_idx) == 0:
            raise InputError(
                f"dataset '{cfg.dataset}': the training split is empty (every row has split=test, or QC removed the "
                "training cells)"
            )
        # seeded random order of training cells: contiguous token shards become random samples
        train_order = train_idx[rng.permutation(len(train_idx))]
        train_obs = _final_obs(obs.iloc[train_order], "train", cfg)
        test_obs = _final_obs(obs.iloc[np.flatnonzero(is_test)], "test", cfg)
        n_top = min(cfg.n_hvg, len(out_genes))
        report["hvg"] = {"flavor": "seurat_v3", "n_top_genes": int(n_top), "n_flagged": 0, "computed_on": "train"}
        report["split"] = {
            "train": int(len(train_obs)),
            "test": int(len(test_obs)),
            "test_fraction": cfg.test_fraction,
            "stratified_by": cfg.condition_keys,
            "from_samplesheet": {s: int((obs["split"] == s).sum()) for s in ("train", "test")},
        }
        report["classes"] = {
            "train": _class_counts(train_obs, cfg.condition_keys),
            "test": _class_counts(test_obs, cfg.condition_keys),
        }
        if cfg.holdout:
            report["holdout"] = {
                "combinations": [combo_name(c) for c in cfg.holdout],
                "test_cells": int(holdout_mask(test_obs, cfg.holdout, cfg.condition_keys).sum()),
            }
        uns = {
            "dataset": cfg.dataset,
            "condition_keys": list(cfg.condition_keys),
            "counts_layer_in": cfg.counts_layer,
            "holdout": [combo_name(c) for c in cfg.holdout],
            "train_combinations": combinations_of(train_obs, cfg.condition_keys),
        }

        outdir.mkdir(parents=True, exist_ok=True)
        # the three outputs appear together or not at all
        with (
            atomic_outputs(outdir / "train.h5ad", outdir / "test.h5ad", outdir / "prepare.json") as (
                t_train,
                t_test,
                t_json,
            ),
            tempfile.TemporaryDirectory(prefix=".prepare-buckets.", dir=outdir) as work,
        ):
            log.info("pass 2: writing %d test cells and %d training cells", len(test_obs), len(train_obs))
            train_w, test_w, hvg_state = _write_outputs(
                sources, stats, is_test, train_order, len(out_genes), t_train, t_test, Path(work)
            )
            try:
                hvg = _highly_variable(hvg_state, train_w, n_top)
                var = pd.DataFrame({"highly_variable": hvg}, index=pd.Index(out_genes.astype(str)))
                train_w.close(train_obs, var, {"sclatent": uns})
                test_w.close(test_obs, var, {"sclatent": uns})
            except BaseException:
                train_w.abort()
                test_w.abort()
                raise
            report["hvg"]["n_flagged"] = int(hvg.sum())
            report["elapsed_s"] = round(time.time() - t0, 3)
            report["provenance"] = provenance("prepare", asdict(cfg))
            dump_json(report, t_json)
    finally:
        for s in sources:
            s.counts.close()
    log.info(
        "dataset '%s': %d train + %d test cells, %d genes (%d HVG) in %.1fs",
        cfg.dataset,
        report["split"]["train"],
        report["split"]["test"],
        len(out_genes),
        report["hvg"]["n_flagged"],
        report["elapsed_s"],
    )
    return report


def _highly_variable(state: SeuratV3, train: H5adWriter, n_top: int) -> np.ndarray:
    """seurat_v3 HVG flags of the training counts written to `train` (all genes when n_top covers them)."""
    if n_top >= train.n_vars:
        return np.ones(train.n_vars, dtype=bool)
    try:
        state.fit_trend()
    except ValueError as exc:
        raise InputError(f"HVG selection (seurat_v3) failed on {state.n_cells} training cells: {exc}") from None
    for a, b in row_chunks(train.indptr(), train.n_obs, train.n_vars):
        state.add_clipped(train.rows(a, b))
    return state.flags(n_top)
