"""The streaming PREPARE gives what the in-memory one gave (same cells, genes, HVGs, order, counts) and scanpy's
seurat_v3 HVGs, whatever its chunk and bucket sizes; CSC and dense inputs give what CSR gives."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner
from prepare_cases import REPO, cases, digest, run_case

from sclatent import ondisk, prepare
from sclatent.cli import main
from sclatent.synthetic import synthetic_counts

GOLDEN = json.loads((REPO / "python" / "tests" / "data" / "prepare_golden.json").read_text())


@pytest.fixture(scope="module")
def case_inputs(tmp_path_factory):
    return cases(tmp_path_factory.mktemp("prepare_inputs"))


def _tiny_chunks(monkeypatch, nnz: int = 700):
    """Chunks of a few cells and buckets of a few more: every streaming boundary is crossed many times."""
    monkeypatch.setattr(ondisk, "CHUNK_NNZ", nnz)
    monkeypatch.setattr(ondisk, "CHUNK_BYTES", 4 * 150 * 7)
    monkeypatch.setattr(prepare, "BUCKET_NNZ", int(1.3 * nnz))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_same_outputs_as_the_in_memory_prepare(name, case_inputs, tmp_path, monkeypatch):
    if name not in case_inputs:
        pytest.skip(f"case {name} needs ../shared/datasets")
    if name.startswith("synthetic"):
        _tiny_chunks(monkeypatch)
    elif name == "pbmc_outer_qc":
        _tiny_chunks(monkeypatch, 20_000)
    got = json.loads(json.dumps(run_case(case_inputs[name], tmp_path / "out", tmp_path / "sheet.csv")))
    train = ad.read_h5ad(tmp_path / "out" / "train.h5ad", backed="r")
    keys = list(train.uns["sclatent"]["condition_keys"])
    trained = sorted(set(train.obs[keys].astype(str).agg("|".join, axis=1))) if len(keys) > 1 else None
    for part in ("train", "test"):
        # written since the reference was made (issue 34): no held-out combination, and the ones training saw
        uns = got[part]["uns"]
        assert uns.pop("holdout") == []
        if trained is not None:
            assert sorted(uns.pop("train_combinations")) == trained
        else:
            assert uns.pop("train_combinations") == []
    for part in ("prepare", "train", "test"):
        assert got[part] == GOLDEN[name][part], f"{name}: {part} differs from the in-memory PREPARE"


def test_hvgs_equal_scanpy_seurat_v3(tmp_path, write_sheet, monkeypatch):
    import scanpy as sc

    _tiny_chunks(monkeypatch, 3_000)
    a = synthetic_counts(n_cells=600, n_genes=300, n_types=5, seed=4, theta=0.7, n_markers=25)
    a.write_h5ad(tmp_path / "a.h5ad")
    out = tmp_path / "out"
    sheet = write_sheet([["ds", "a.h5ad", "", ""]])
    r = CliRunner().invoke(main, ["-q", "prepare", "--samplesheet", sheet, "--outdir", out, "--n-hvg", "60"])
    assert r.exit_code == 0, r.output
    train = ad.read_h5ad(out / "train.h5ad")
    ref = ad.AnnData(X=train.X.copy())
    sc.pp.highly_variable_genes(ref, flavor="seurat_v3", n_top_genes=60)
    np.testing.assert_array_equal(train.var["highly_variable"].to_numpy(), ref.var["highly_variable"].to_numpy())
    assert train.var["highly_variable"].sum() == 60


@pytest.mark.parametrize("layout", ["csc", "dense"])
def test_csc_and_dense_inputs_give_the_csr_result(layout, tmp_path, write_sheet, monkeypatch):
    _tiny_chunks(monkeypatch)
    a = synthetic_counts(n_cells=150, n_genes=150, seed=9)
    b = a.copy()
    b.X = a.X.tocsc() if layout == "csc" else a.X.toarray()
    digests = []
    for name, adata in (("csr", a), ("other", b)):
        (tmp_path / name).mkdir()
        adata.write_h5ad(tmp_path / name / "a.h5ad")
        sheet = write_sheet([["ds", f"{name}/a.h5ad", "", ""]], name=f"{name}.csv")
        out = tmp_path / f"out_{name}"
        args = ["-q", "prepare", "--samplesheet", sheet, "--outdir", out, "--n-hvg", "30", "--condition-keys"]
        r = CliRunner().invoke(main, [*map(str, args), "cell_type"])
        assert r.exit_code == 0, r.output
        d = digest(out)
        for f in d["prepare"]["files"]:
            f["h5ad"] = "x"
        digests.append(d)
    assert digests[0] == digests[1]


def test_bad_counts_are_counted_over_every_chunk(tmp_path, write_sheet, monkeypatch):
    _tiny_chunks(monkeypatch)
    a = synthetic_counts(n_cells=200, n_genes=150, seed=1)
    X = a.X.toarray()
    X[3, 5], X[150, 7], X[199, 2] = -2, 0.5, np.inf  # in different chunks
    a.X = sp.csr_matrix(X)
    a.write_h5ad(tmp_path / "a.h5ad")
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main, ["-q", "prepare", "--samplesheet", str(write_sheet([["ds", "a.h5ad", "", ""]])), "--outdir", str(out)]
    )
    assert r.exit_code == 2
    assert re.search(r"negative value -2.0 at cell 'cell_3', gene 'GENE00005' \(3 bad entries in total", r.output)
    assert not out.exists() or not any(out.iterdir())


def test_remap_columns_moves_drops_and_sorts():
    X = sp.csr_matrix(np.array([[1, 0, 2, 3], [0, 0, 0, 0], [4, 5, 0, 6]], dtype=np.float32))
    out = prepare.remap_columns(X, np.array([2, -1, 0, 1]), 3)
    np.testing.assert_array_equal(out.toarray(), [[2, 3, 1], [0, 0, 0], [0, 6, 4]])
    assert out.has_sorted_indices
