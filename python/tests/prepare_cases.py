"""PREPARE's reference cases: inputs, options and a digest of the outputs (train/test h5ad + prepare.json).

`python/tests/data/prepare_golden.json` holds the digests the in-memory PREPARE (commit fbfd061, before PREPARE
streamed) wrote for these cases; test_prepare_stream.py checks that the streaming PREPARE gives the same cells,
genes, HVGs, order and counts. Regenerate (only when a change of output is intended) with

    PYTHONPATH=python/src .venv/bin/python python/tests/prepare_cases.py python/tests/data/prepare_golden.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[2]
TEST_DATA = REPO / "assets" / "test_data"
SHARED_PBMC = REPO.parent / "shared" / "datasets" / "pbmc3k_counts_celltype.h5ad"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def _names_sha(names) -> str:
    return _sha("\n".join(map(str, names)).encode())


def matrix_digest(X) -> str:
    """A digest of a count matrix's values that does not depend on how its CSR arrays are stored."""
    csr = sp.csr_matrix(X, dtype=np.float32, copy=True)
    csr.eliminate_zeros()
    csr.sort_indices()
    h = hashlib.sha256()
    h.update(np.asarray(csr.shape, np.int64).tobytes())
    h.update(csr.indptr.astype(np.int64).tobytes())
    h.update(csr.indices.astype(np.int64).tobytes())
    h.update(csr.data.astype(np.float32).tobytes())
    return h.hexdigest()[:20]


def h5ad_digest(path: Path) -> dict[str, Any]:
    adata = ad.read_h5ad(path)
    out: dict[str, Any] = {
        "n_obs": int(adata.n_obs),
        "n_vars": int(adata.n_vars),
        "obs_names": _names_sha(adata.obs_names),
        "var_names": _names_sha(adata.var_names),
        "hvg": _names_sha(adata.var_names[adata.var["highly_variable"].to_numpy(bool)]),
        "X": matrix_digest(adata.X),
        "X_dtype": str(adata.X.dtype),
        "obs_columns": list(map(str, adata.obs.columns)),
        "obs": {str(c): _names_sha(adata.obs[c].astype(str)) for c in adata.obs.columns},
        "obs_categorical": [str(c) for c in adata.obs.columns if str(adata.obs[c].dtype) == "category"],
        "var_columns": list(map(str, adata.var.columns)),
        "uns": json.loads(json.dumps(adata.uns.get("sclatent", {}), default=lambda o: np.asarray(o).tolist())),
    }
    return out


def report_digest(path: Path) -> dict[str, Any]:
    report = json.loads(path.read_text())
    report.pop("elapsed_s", None)
    report.pop("provenance", None)
    for f in report.get("files", []):
        f["h5ad"] = Path(f["h5ad"]).name
    return report


def digest(outdir: Path) -> dict[str, Any]:
    return {
        "train": h5ad_digest(outdir / "train.h5ad"),
        "test": h5ad_digest(outdir / "test.h5ad"),
        "prepare": report_digest(outdir / "prepare.json"),
    }


# --------------------------------------------------------------------------------------------------------
# the cases


def _synthetic_inputs(folder: Path) -> dict[str, Path]:
    """Small synthetic files that exercise duplicate cell names, dense X, a counts layer and zero-count cells."""
    from sclatent.synthetic import synthetic_counts

    folder.mkdir(parents=True, exist_ok=True)
    a = synthetic_counts(n_cells=240, n_genes=150, n_types=3, seed=11, n_batches=2)
    X = a.X.toarray()
    X[[4, 17, 90]] = 0  # zero-count cells
    X[5, :] = np.where(X[5] > 0, 1, 0)  # a cell with few counts
    a.X = sp.csr_matrix(X)
    a.layers["counts"] = a.X.copy()
    b = synthetic_counts(n_cells=160, n_genes=150, n_types=3, seed=12)[:, 7:].copy()  # same names: duplicates
    b.X = b.X.toarray()  # dense input
    c = synthetic_counts(n_cells=90, n_genes=150, n_types=3, seed=13)[:, :140].copy()
    c.obs_names = [f"c{i}" for i in range(c.n_obs)]
    c.layers["counts"] = c.X.copy()
    c.X = c.X.multiply(0.5).tocsr()  # X is not counts: the layer is
    c.obs["cell_type"] = c.obs["cell_type"].astype(str)
    paths = {"a": folder / "a.h5ad", "b": folder / "b.h5ad", "c": folder / "c.h5ad"}
    a.write_h5ad(paths["a"])
    b.write_h5ad(paths["b"])
    c.write_h5ad(paths["c"])
    return paths


def cases(tmp: Path) -> dict[str, dict[str, Any]]:
    """name -> {"sheet": rows, "header": str, "args": CLI options}; inputs written under `tmp`."""
    syn = _synthetic_inputs(tmp / "synthetic")
    pa, pb, mx = (str(TEST_DATA / n) for n in ("pbmc3k_a.h5ad", "pbmc3k_b.h5ad", "mixology.h5ad"))
    out = {
        "pbmc_test_profile": {
            "rows": [["pbmc", pa, "all", "a", "cell_type"], ["pbmc", pb, "all", "b", "cell_type"]],
            "args": ["--n-hvg", "500", "--min-cells", "3", "--seed", "0"],
        },
        "mixology_test_profile": {
            "rows": [["mixology", mx, "all", "", "cell_line;protocol"]],
            "args": ["--n-hvg", "500", "--min-cells", "3", "--seed", "0"],
        },
        "pbmc_outer_qc": {
            "rows": [["pbmc", pa, "all", "", ""], ["pbmc", pb, "all", "", ""]],
            "args": [
                "--condition-keys",
                "cell_type",
                "--gene-join",
                "outer",
                "--n-hvg",
                "300",
                "--min-genes",
                "200",
                "--min-counts",
                "600",
                "--min-cells",
                "5",
                "--seed",
                "7",
                "--test-fraction",
                "0.3",
            ],
        },
        "synthetic_mixed": {
            "rows": [["syn", str(syn["a"]), "all", "", ""], ["syn", str(syn["b"]), "train", "B", ""]],
            "args": ["--condition-keys", "cell_type,batch", "--n-hvg", "40", "--min-genes", "3", "--seed", "3"],
        },
        "synthetic_layer_split": {
            "rows": [["syn", str(syn["c"]), "test", "", ""], ["syn", str(syn["a"]), "all", "", ""]],
            "args": ["--counts-layer", "counts", "--condition-keys", "cell_type", "--n-hvg", "500", "--seed", "1"],
        },
        "synthetic_no_keys_all_genes": {
            "rows": [["syn", str(syn["a"]), "all", "", ""]],
            "args": ["--n-hvg", "1000", "--test-fraction", "0", "--seed", "5"],
        },
    }
    if SHARED_PBMC.exists():  # the real PBMC 3k (../shared/datasets), 2,000 HVGs of 32,738 genes
        out["pbmc3k_shared"] = {
            "rows": [["pbmc", str(SHARED_PBMC), "all", "", "cell_type"]],
            "args": ["--min-cells", "3", "--seed", "0"],
        }
    return out


def run_case(case: dict[str, Any], outdir: Path, sheet: Path) -> dict[str, Any]:
    from click.testing import CliRunner

    from sclatent.cli import main

    lines = ["dataset,h5ad,split,batch,condition_keys"] + [",".join(r) for r in case["rows"]]
    sheet.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(
        main, ["-q", "prepare", "--samplesheet", str(sheet), "--outdir", str(outdir), *case["args"]]
    )
    if result.exit_code != 0:
        raise RuntimeError(f"prepare failed: {result.output}")
    return digest(outdir)


def main(out: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        golden = {name: run_case(case, tmp / name, tmp / f"{name}.csv") for name, case in cases(tmp / "inputs").items()}
    Path(out).write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
