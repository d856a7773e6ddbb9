"""h5ad files read and written in row chunks, so that a step's memory follows the chunk, not the file.

`H5adCounts` opens one matrix of an h5ad file (`X` or a layer) with its cell and gene names and the obs columns
asked for, and hands out row ranges as float32 CSR: a CSR matrix is read by slicing its arrays on disk, a dense
one block by block. A matrix stored column by column (CSC) cannot be sliced by rows without reading all of it,
so it is read whole, with a warning. `H5adWriter` writes an h5ad file whose X is appended chunk by chunk
(anndata's `write_elem` and `sparse_dataset(...).append`); obs, var and uns are written when it closes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset, write_elem

from .errors import InputError

log = logging.getLogger(__name__)

CHUNK_NNZ = 16_000_000  # stored values per chunk when streaming a sparse matrix (~128 MB as float32 + int32)
CHUNK_BYTES = 64 * 2**20  # bytes per row block when streaming a dense matrix
_H5_CHUNK = 1 << 20  # HDF5 chunk (elements) of the arrays H5adWriter appends to


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _index_of(group: h5py.Group) -> np.ndarray:
    """The index (names) of a dataframe group of an h5ad file, as str."""
    return np.asarray(read_elem(group[group.attrs["_index"]])).astype(str)


def _csr(X: Any) -> sp.csr_matrix:
    """X as scipy CSR whose index arrays share one dtype (files with int32 indices and int64 row pointers exist,
    and scipy's kernels refuse the mix)."""
    X = sp.csr_matrix(X)
    if X.indices.dtype != X.indptr.dtype:
        X = sp.csr_matrix((X.data, X.indices, X.indptr), shape=X.shape)
    return X


class H5adCounts:
    """One count matrix of an h5ad file (X or `layers[layer]`), read in row ranges; see the module docstring."""

    def __init__(self, path: str | os.PathLike, layer: str = "X", *, name: str | None = None) -> None:
        self.path = str(name or path)  # what messages call the file (the user's path of a staged copy)
        if not os.path.exists(path):
            raise InputError(f"{self.path}: file does not exist")
        try:
            self.file = h5py.File(path, "r")
        except Exception as exc:  # h5py raises OSError and others for a non-HDF5 file
            raise InputError(f"{self.path}: not a readable .h5ad file ({_reason(exc)})") from None
        try:
            self._open(layer)
        except BaseException:
            self.file.close()
            raise

    def _open(self, layer: str) -> None:
        f = self.file
        for key in ("obs", "var"):
            if key not in f or not isinstance(f[key], h5py.Group) or "_index" not in f[key].attrs:
                raise InputError(f"{self.path}: not a readable .h5ad file (no '{key}' table of the current format)")
        self.obs_names = _index_of(f["obs"])  # (n,) str
        self.var_names = pd.Index(_index_of(f["var"]))  # (G,)
        self.obs_columns = [str(c) for c in f["obs"].attrs.get("column-order", [])]
        layers = list(f["layers"].keys()) if "layers" in f else []
        if layer == "X":
            if "X" not in f:
                raise InputError(f"{self.path}: matrix 'X' is empty (None)")
            node = f["X"]
        elif layer in layers:
            node = f["layers"][layer]
        else:
            raise InputError(f"{self.path}: counts layer '{layer}' not found (available: {', '.join(['X', *layers])})")
        self.layer = layer
        encoding = node.attrs.get("encoding-type", "array" if isinstance(node, h5py.Dataset) else "")
        self._memory: sp.csr_matrix | None = None
        self._dense: h5py.Dataset | None = None
        self._sparse = None
        if encoding == "csr_matrix":
            self._sparse = sparse_dataset(node)
            self.indptr = np.asarray(node["indptr"][...], dtype=np.int64)  # (n + 1,)
        elif encoding == "csc_matrix":
            log.warning(
                "%s [%s]: the matrix is stored by columns (CSC) and is read whole into memory; store it as CSR "
                "(adata.X = adata.X.tocsr()) to stream it",
                self.path,
                layer,
            )
            self._memory = sp.csr_matrix(read_elem(node))
            self.indptr = self._memory.indptr.astype(np.int64)
        elif isinstance(node, h5py.Dataset) and node.ndim == 2:
            self._dense = node
            self.indptr = None
        else:
            raise InputError(f"{self.path}: matrix '{layer}' has an unsupported encoding '{encoding}'")
        self.shape = (len(self.obs_names), len(self.var_names))
        stored = tuple(int(s) for s in (node.attrs["shape"] if self._dense is None else node.shape))
        if stored != self.shape:
            raise InputError(
                f"{self.path}: matrix '{layer}' has shape {stored} but {self.shape[0]} cell names and "
                f"{self.shape[1]} gene names"
            )

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        return self.shape[1]

    def obs_column(self, name: str, start: int = 0, stop: int | None = None) -> pd.Series:
        """One obs column (categorical stays categorical) for the cells start..stop-1, indexed by their names.

        Categorical and plain array columns are read for those rows only; other encodings whole, then cut."""
        stop = self.n_obs if stop is None else stop
        node = self.file["obs"][name]
        encoding = node.attrs.get("encoding-type", "")
        if encoding == "categorical":
            categories = read_elem(node["categories"])
            values = pd.Categorical.from_codes(
                node["codes"][start:stop], categories, ordered=bool(node.attrs.get("ordered"))
            )
        elif encoding == "string-array":
            values = np.asarray(node.asstr()[start:stop], dtype=object)
        elif encoding == "array":
            values = node[start:stop]
        else:
            values = np.asarray(read_elem(node))[start:stop]
        return pd.Series(values, index=self.obs_names[start:stop], name=name)

    def var_column(self, name: str) -> pd.Index:
        """One var column as strings (e.g. Ensembl ids to use as the gene names); an InputError names what exists."""
        columns = [str(c) for c in self.file["var"].attrs.get("column-order", [])]
        if name not in columns:
            avail = ", ".join(columns) or "no columns"
            raise InputError(f"{self.path}: --gene_key '{name}' is not a var column (var has: {avail})")
        return pd.Index(np.asarray(read_elem(self.file["var"][name])).astype(str))

    def take(self, rows: np.ndarray) -> sp.csr_matrix:
        """The rows `rows` (sorted, unique) as CSR in the stored dtype.

        A sparse uncompressed matrix is read by runs of consecutive rows when few are asked for (each run one read of
        its values and one of its column indices), otherwise chunk by chunk with the rows picked out of each chunk."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= self.n_obs):
            raise ValueError("take: rows must be sorted, unique and inside the matrix")
        node = self.file["X"] if self.layer == "X" else self.file["layers"][self.layer]
        compressed = self._sparse is not None and node["data"].compression is not None
        if self._sparse is not None and not compressed and len(rows) * 256 < self.n_obs:
            # each run of consecutive rows is one slice of `data` and of `indices`, read with h5py directly; every
            # slice has a fixed cost, so for more than a small share of the rows reading the matrix in order is
            # cheaper (decision 0011)
            new_run = np.concatenate([[True], np.diff(rows) > 1]) if len(rows) else np.zeros(0, bool)
            run_first = rows[new_run]  # (runs,)
            run_last = rows[np.concatenate([new_run[1:], [True]])] if len(rows) else rows
            starts, ends = self.indptr[run_first], self.indptr[run_last + 1]
            data = [node["data"][a:b] for a, b in zip(starts, ends)]
            indices = [node["indices"][a:b] for a, b in zip(starts, ends)]
            nnz = np.diff(self.indptr)[rows]  # (len(rows),)
            indptr = np.concatenate([[0], np.cumsum(nnz)])
            dtype = node["data"].dtype
            return sp.csr_matrix(
                (
                    np.concatenate(data) if data else np.zeros(0, dtype),
                    np.concatenate(indices) if indices else np.zeros(0, np.int32),
                    indptr,
                ),
                shape=(len(rows), self.n_vars),
            )
        parts = []
        for a, b in self.chunks():
            lo, hi = np.searchsorted(rows, [a, b])
            if hi > lo:
                parts.append(self.rows(a, b)[rows[lo:hi] - a])
        return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, self.n_vars), dtype=np.float32)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows start..stop-1 as CSR in the stored dtype (stored zeros kept; the caller validates and converts)."""
        if self._memory is not None:
            return self._memory[start:stop]
        if self._sparse is not None:
            return _csr(self._sparse[start:stop])
        return sp.csr_matrix(np.asarray(self._dense[start:stop]))

    def row_nnz(self) -> np.ndarray | None:
        """Stored values per row (n,), or None for a dense matrix."""
        return None if self.indptr is None else np.diff(self.indptr)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """Row ranges (start, stop) of at most CHUNK_NNZ stored values (sparse) or CHUNK_BYTES (dense), >= 1 row."""
        yield from row_chunks(self.indptr, self.n_obs, self.n_vars)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> H5adCounts:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_meta(path: str | os.PathLike) -> Any:
    """An AnnData with the obs, var and uns of an h5ad file and no X (the counts stay on disk)."""
    import anndata as ad

    path = str(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: file does not exist")
    try:
        with h5py.File(path, "r") as f:
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
            uns = read_elem(f["uns"]) if "uns" in f else {}
    except InputError:
        raise
    except Exception as exc:  # h5py / anndata raise many types for a non-h5ad file
        raise InputError(f"{path}: not a readable .h5ad file ({_reason(exc)})") from None
    return ad.AnnData(obs=obs, var=var, uns=uns)


def obsm_shape(path: str | os.PathLike, key: str) -> tuple[int, ...] | None:
    """The shape of obsm[key] in an h5ad file, None if absent."""
    with h5py.File(path, "r") as f:
        node = f.get("obsm", {}).get(key) if "obsm" in f else None
        return None if node is None or not isinstance(node, h5py.Dataset) else tuple(node.shape)


def row_chunks(
    indptr: np.ndarray | None, n_rows: int, n_cols: int, max_nnz: int | None = None, max_bytes: int | None = None
) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges covering n_rows: by stored values when `indptr` is given (at most `max_nnz`, default
    CHUNK_NNZ, but at least one row), else by dense bytes (`max_bytes`, default CHUNK_BYTES)."""
    max_nnz = CHUNK_NNZ if max_nnz is None else max_nnz
    max_bytes = CHUNK_BYTES if max_bytes is None else max_bytes
    if indptr is None:
        step = max(1, max_bytes // (4 * max(n_cols, 1)))
        for a in range(0, n_rows, step):
            yield a, min(a + step, n_rows)
        return
    a = 0
    while a < n_rows:
        b = int(np.searchsorted(indptr, indptr[a] + max_nnz, side="right")) - 1
        b = min(max(b, a + 1), n_rows)
        yield a, b
        a = b


class H5adWriter:
    """An h5ad file written row chunk by row chunk: `append(csr)` adds cells to X; `close(obs, var, uns)` writes the
    tables (obs must have one row per appended cell). Write to a temporary path and rename (io.atomic_path)."""

    def __init__(self, path: str | os.PathLike, n_vars: int, *, max_nnz: int | None = None) -> None:
        """`max_nnz`: an upper bound of the stored values to come. Below 2^31 the index arrays are int32 (as anndata
        writes them), else (or when unknown) int64; both arrays share one type, as scipy needs."""
        self.path = Path(path)
        self.n_vars = int(n_vars)
        self.n_obs = 0
        self.nnz = 0
        self.file = h5py.File(self.path, "w")
        self.file.attrs["encoding-type"] = "anndata"
        self.file.attrs["encoding-version"] = "0.1.0"
        index_dtype = np.int32 if max_nnz is not None and max_nnz < np.iinfo(np.int32).max else np.int64
        # an empty CSR matrix in anndata's on-disk format, its arrays resizable for sparse_dataset(...).append
        g = self.file.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (0, self.n_vars)})
        chunk = _H5_CHUNK if max_nnz is None else int(min(_H5_CHUNK, max(16_384, max_nnz)))  # small files stay small
        for name, dtype, init in (("data", np.float32, 0), ("indices", index_dtype, 0), ("indptr", index_dtype, 1)):
            g.create_dataset(name, data=np.zeros(init, dtype), maxshape=(None,), chunks=(chunk,))
        self._X = sparse_dataset(g)

    def append(self, X: sp.csr_matrix) -> None:
        """Add the cells of X (n, n_vars) after those written so far (float32, indices as stored)."""
        X = sp.csr_matrix(X)
        if X.shape[1] != self.n_vars:
            raise ValueError(f"appending {X.shape[1]} genes to a file of {self.n_vars}")
        if X.shape[0] == 0:
            return
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        self._X.append(X)
        self.n_obs += X.shape[0]
        self.nnz += X.nnz

    def append_obsm(self, key: str, values: np.ndarray) -> None:
        """Add rows (n, d) to obsm[key] (call it with the rows of each X chunk, in the same order)."""
        g = self.file.require_group("obsm")
        g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        values = np.asarray(values)
        if key not in g:
            width = values.shape[1:]
            g.create_dataset(key, shape=(0, *width), maxshape=(None, *width), dtype=values.dtype, chunks=True)
            g[key].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        ds = g[key]
        n = ds.shape[0]
        ds.resize((n + len(values), *ds.shape[1:]))
        ds[n:] = values

    def indptr(self) -> np.ndarray:
        """Row pointers (n_obs + 1,) of the cells written so far."""
        return np.asarray(self.file["X"]["indptr"][...], dtype=np.int64)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Read back rows start..stop-1 of X (CSR float32)."""
        return _csr(self._X[start:stop])

    def close(self, obs: pd.DataFrame, var: pd.DataFrame, uns: Mapping[str, Any] | None = None) -> None:
        """Write obs (n_obs rows), var (n_vars rows), uns and the empty slots of an AnnData, then close."""
        if len(obs) != self.n_obs or len(var) != self.n_vars:
            self.file.close()
            raise ValueError(f"obs has {len(obs)} rows for {self.n_obs} cells, var {len(var)} for {self.n_vars} genes")
        try:
            write_elem(self.file, "obs", obs)
            write_elem(self.file, "var", var)
            write_elem(self.file, "uns", dict(uns or {}))
            for key in ("obsm", "varm", "layers", "obsp", "varp"):
                if key not in self.file:
                    write_elem(self.file, key, {})
            for key, ds in self.file["obsm"].items():
                if ds.shape[0] != self.n_obs:
                    raise ValueError(f"obsm['{key}'] has {ds.shape[0]} rows for {self.n_obs} cells")
        finally:
            self.file.close()

    def abort(self) -> None:
        """Close without writing the tables (the caller removes the file)."""
        if self.file.id.valid:
            self.file.close()
