"""PREPARE: combining files, QC, split, HVGs, and the bad-input contract (one line, exit 2, no output)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from sclatent.cli import main
from sclatent.synthetic import synthetic_counts


def run_cli(*args):
    result = CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)
    return result


def prepare_args(sheet, outdir, *extra):
    return ["prepare", "--samplesheet", sheet, "--outdir", outdir, "--n-hvg", "50", *extra]


def test_prepare_two_files_inner_join_and_split(tmp_path, write_sheet, assert_integer_counts):
    a = synthetic_counts(n_cells=300, n_genes=120, seed=1)
    b = synthetic_counts(n_cells=200, n_genes=120, seed=2)
    b = b[:, 10:].copy()  # b lacks the first 10 genes
    b.obs_names = [f"b_{i}" for i in range(b.n_obs)]
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    sheet = write_sheet([["ds", "a.h5ad", "", "A"], ["ds", "b.h5ad", "", "B"]])
    out = tmp_path / "out"
    r = run_cli(*prepare_args(sheet, out, "--condition-keys", "cell_type", "--seed", "3"))
    assert r.exit_code == 0, r.output
    train, test = ad.read_h5ad(out / "train.h5ad"), ad.read_h5ad(out / "test.h5ad")
    report = json.loads((out / "prepare.json").read_text())
    assert report["genes"] == {"union": 120, "intersection": 110, "after_join": 110}
    assert train.n_obs + test.n_obs == 500 == report["cells_after_qc"]
    assert report["split"]["train"] == train.n_obs and report["split"]["test"] == test.n_obs
    assert train.n_vars == test.n_vars == report["genes_after_qc"]
    # stratified: every class has ~20% in test
    for ct, n_test in report["classes"]["test"]["cell_type"].items():
        n_all = n_test + report["classes"]["train"]["cell_type"][ct]
        assert abs(n_test - 0.2 * n_all) <= 1
    assert int(train.var["highly_variable"].sum()) == 50 == report["hvg"]["n_flagged"]
    assert set(train.obs["batch"]) == {"A", "B"}
    assert_integer_counts(train.X)
    # valid data is never altered: a cell's counts equal the input's on the kept genes
    name = train.obs_names[0]
    src = a if name in a.obs_names else b
    genes = list(train.var_names)
    np.testing.assert_array_equal(train[name, genes].X.toarray(), src[name, genes].X.toarray())


def test_prepare_is_seeded(tmp_path, make_h5ad, write_sheet):
    make_h5ad("a", n_cells=200, n_genes=80)
    sheet = write_sheet([["ds", "a.h5ad", "", ""]])
    names = []
    for i, seed in enumerate([0, 0, 1]):
        out = tmp_path / f"o{i}"
        assert run_cli(*prepare_args(sheet, out, "--seed", seed)).exit_code == 0
        names.append(list(ad.read_h5ad(out / "test.h5ad").obs_names))
    assert names[0] == names[1] and names[0] != names[2]


def test_outer_join_fills_zeros(tmp_path, write_sheet):
    a = synthetic_counts(n_cells=50, n_genes=40, seed=1)
    b = synthetic_counts(n_cells=50, n_genes=40, seed=2)[:, 5:].copy()
    b.obs_names = [f"b{i}" for i in range(50)]
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    sheet = write_sheet([["ds", "a.h5ad", "train", ""], ["ds", "b.h5ad", "test", ""]])
    out = tmp_path / "out"
    assert run_cli(*prepare_args(sheet, out, "--gene-join", "outer")).exit_code == 0
    test = ad.read_h5ad(out / "test.h5ad")
    assert test.n_obs == 50 and set(a.var_names) <= set(test.var_names)
    missing = [g for g in a.var_names[:5] if g in test.var_names]
    assert missing and test[:, missing].X.sum() == 0


def test_split_column_is_respected(tmp_path, make_h5ad, write_sheet):
    make_h5ad("a", n_cells=60, seed=1)
    b = synthetic_counts(n_cells=40, seed=2)
    b.obs_names = [f"t{i}" for i in range(40)]
    b.write_h5ad(tmp_path / "b.h5ad")
    sheet = write_sheet([["ds", "a.h5ad", "train", ""], ["ds", "b.h5ad", "test", ""]])
    out = tmp_path / "out"
    assert run_cli(*prepare_args(sheet, out)).exit_code == 0
    assert all(n.startswith("t") for n in ad.read_h5ad(out / "test.h5ad").obs_names)
    assert ad.read_h5ad(out / "train.h5ad").n_obs == 60


def test_zero_count_cells_are_dropped_and_counted(tmp_path, write_sheet):
    a = synthetic_counts(n_cells=100, n_genes=60, seed=1)
    X = a.X.toarray()
    X[[3, 7]] = 0
    a.X = sp.csr_matrix(X)
    a.write_h5ad(tmp_path / "a.h5ad")
    out = tmp_path / "out"
    assert run_cli(*prepare_args(write_sheet([["ds", "a.h5ad", "", ""]]), out)).exit_code == 0
    report = json.loads((out / "prepare.json").read_text())
    assert report["qc"][0] == {"filter": "zero_count_cells", "cells_before": 100, "cells_removed": 2}
    assert report["cells_after_qc"] == 98


def test_counts_layer(tmp_path, write_sheet):
    a = synthetic_counts(n_cells=80, n_genes=50, seed=1)
    a.layers["counts"] = a.X.copy()
    a.X = a.X.multiply(0.5).tocsr()  # X holds non-counts
    a.write_h5ad(tmp_path / "a.h5ad")
    sheet = write_sheet([["ds", "a.h5ad", "", ""]])
    r = run_cli(*prepare_args(sheet, tmp_path / "bad"))
    assert r.exit_code == 2 and "non-integer value" in r.output
    assert run_cli(*prepare_args(sheet, tmp_path / "ok", "--counts-layer", "counts")).exit_code == 0


def _bad_case(tmp_path, write_sheet, case):
    good = synthetic_counts(n_cells=60, n_genes=40, seed=1)
    args = []
    if case == "not_h5ad":
        (tmp_path / "a.h5ad").write_text("this is not hdf5")
        return write_sheet([["ds", "a.h5ad", "", ""]]), args, r"a.h5ad: not a readable .h5ad file"
    if case == "negative":
        X = good.X.toarray()
        X[5, 3] = -1
        good.X = sp.csr_matrix(X)
        match = (
            r"a.h5ad \[X\]: counts must be finite non-negative integers, found negative value -1.0 at cell "
            r"'cell_5', gene 'GENE00003'"
        )
    elif case == "nan":
        X = good.X.toarray()
        X[2, 1] = np.nan
        good.X = sp.csr_matrix(X)
        match = r"found NaN value nan at cell 'cell_2', gene 'GENE00001'"
    elif case == "noninteger":
        good.X = good.X.multiply(1.5).tocsr()
        match = r"found non-integer value"
    elif case == "layer":
        args = ["--counts-layer", "raw"]
        match = r"a.h5ad: counts layer 'raw' not found \(available: X\)"
    elif case == "key":
        args = ["--condition-keys", "cell_type,donor"]
        match = r"a.h5ad: condition key 'donor' is not an obs column"
    elif case == "dupgenes":
        good.var_names = ["G0"] + list(good.var_names[:-1])
        good.var_names = [*good.var_names[:3], "G0", *good.var_names[4:]]
        match = r"a.h5ad: duplicate gene name 'G0'"
    elif case == "empty_train":
        good.write_h5ad(tmp_path / "a.h5ad")
        return write_sheet([["ds", "a.h5ad", "test", ""]]), args, r"dataset 'ds': the training split is empty"
    good.write_h5ad(tmp_path / "a.h5ad")
    return write_sheet([["ds", "a.h5ad", "", ""]]), args, match


@pytest.mark.parametrize(
    "case", ["not_h5ad", "negative", "nan", "noninteger", "layer", "key", "dupgenes", "empty_train"]
)
def test_bad_inputs_exit_2_one_line_no_output(tmp_path, write_sheet, case):
    sheet, args, match = _bad_case(tmp_path, write_sheet, case)
    out = tmp_path / "out"
    r = run_cli(*prepare_args(sheet, out, *args))
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sclatent prepare: error: "), r.output
    import re

    assert re.search(match, lines[0]), lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_condition_key_missing_in_one_file(tmp_path, write_sheet):
    a = synthetic_counts(n_cells=50, seed=1)
    b = synthetic_counts(n_cells=50, seed=2)
    b.obs_names = [f"b{i}" for i in range(50)]
    b.obs = b.obs.drop(columns=["cell_type"])
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    sheet = write_sheet([["ds", "a.h5ad", "", ""], ["ds", "b.h5ad", "", ""]])
    r = run_cli(*prepare_args(sheet, tmp_path / "out", "--condition-keys", "cell_type"))
    assert r.exit_code == 2 and "b.h5ad: condition key 'cell_type' is not an obs column" in r.output


def test_gene_key_names_the_genes_by_a_var_column(tmp_path, write_sheet):
    """--gene-key: another var column (e.g. Ensembl ids, to match a model's vocabulary) becomes the gene names."""
    a = synthetic_counts(n_cells=60, n_genes=40, seed=1)
    a.var["ensembl"] = [f"ENSG{i:05d}" for i in range(a.n_vars)]
    a.write_h5ad(tmp_path / "a.h5ad")
    sheet = write_sheet([["ds", "a.h5ad", "", ""]])
    out = tmp_path / "out"
    assert run_cli(*prepare_args(sheet, out, "--n-hvg", "10", "--gene-key", "ensembl")).exit_code == 0
    train = ad.read_h5ad(out / "train.h5ad")
    assert list(train.var_names) == list(a.var["ensembl"])
    r = run_cli(*prepare_args(sheet, tmp_path / "out2", "--gene-key", "symbol"))
    assert r.exit_code == 2 and "a.h5ad: --gene_key 'symbol' is not a var column (var has: ensembl)" in r.output
    assert not (tmp_path / "out2" / "train.h5ad").exists()


def test_samplesheet_condition_keys_override(tmp_path, make_h5ad, write_sheet):
    make_h5ad("a", n_cells=80, n_batches=2)
    sheet = write_sheet([["ds", "a.h5ad", "", "", "cell_type;batch"]], header="dataset,h5ad,split,batch,condition_keys")
    out = tmp_path / "out"
    assert run_cli(*prepare_args(sheet, out, "--condition-keys", "cell_type")).exit_code == 0
    report = json.loads((out / "prepare.json").read_text())
    assert report["split"]["stratified_by"] == ["cell_type", "batch"]
    assert "cell_type|batch" in report["classes"]["train"]


def test_real_pbmc(tmp_path, shared_datasets, write_sheet):
    sheet = write_sheet([["pbmc", str(shared_datasets / "pbmc3k_counts_celltype.h5ad"), "", ""]])
    out = tmp_path / "out"
    r = run_cli("prepare", "--samplesheet", sheet, "--outdir", out, "--condition-keys", "cell_type", "--min-cells", "3")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "prepare.json").read_text())
    assert report["cells_after_qc"] == 2700 and report["split"]["test"] == 540
    assert report["classes"]["test"]["cell_type"]["Megakaryocytes"] == 3  # round(0.2 * 13)
    assert report["hvg"]["n_flagged"] == 2000


def test_staged_copies_are_named_by_the_users_path(tmp_path, write_sheet):
    """The pipeline stages inputs as input/<i>/<name>: messages and prepare.json name the samplesheet's path."""
    staged = tmp_path / "input" / "1"
    staged.mkdir(parents=True)
    synthetic_counts(n_cells=60, seed=1).write_h5ad(staged / "a.h5ad")
    sheet = write_sheet([["ds", "input/1/a.h5ad", "", ""]])
    source = "--source", "input/1/a.h5ad=/data/lab/a.h5ad"
    r = run_cli(*prepare_args(sheet, tmp_path / "bad", "--condition-keys", "donor", *source))
    assert r.exit_code == 2 and r.output.strip() == (
        "sclatent prepare: error: /data/lab/a.h5ad: condition key 'donor' is not an obs column (obs columns: cell_type)"
    ), r.output
    out = tmp_path / "out"
    assert run_cli(*prepare_args(sheet, out, "--condition-keys", "cell_type", *source)).exit_code == 0
    assert [f["h5ad"] for f in json.loads((out / "prepare.json").read_text())["files"]] == ["/data/lab/a.h5ad"]
    r = run_cli(*prepare_args(sheet, tmp_path / "none", "--source", "input/2/b.h5ad=/data/lab/b.h5ad"))
    assert r.exit_code == 2 and "has no file input/2/b.h5ad" in r.output
    r = run_cli(*prepare_args(sheet, tmp_path / "none", "--source", "input/1/a.h5ad"))
    assert r.exit_code == 2 and "expected STAGED=ORIGINAL" in r.output


def test_prepare_help_describes_the_samplesheet_columns():
    text = " ".join(CliRunner().invoke(main, ["prepare", "--help"]).output.split())
    assert "condition_keys (obs columns separated by ';'" in text
    assert "dataset,h5ad[,split][,batch][,condition_keys]" in text
