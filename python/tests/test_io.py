"""Samplesheet and AnnData validation: every bad input is a one-line error naming what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sclatent.counts import check_counts
from sclatent.io import InputError, atomic_outputs, read_samplesheet


def test_valid_samplesheet_resolves_relative_paths(tmp_path, make_h5ad, write_sheet):
    make_h5ad("a")
    sheet = write_sheet([["ds1", "a.h5ad", "", "b1"], ["ds2", str(tmp_path / "a.h5ad"), "test", ""]])
    rows = read_samplesheet(sheet)
    assert [r.dataset for r in rows] == ["ds1", "ds2"]
    assert rows[0].h5ad == str(tmp_path / "a.h5ad") and rows[0].split == "all" and rows[0].batch == "b1"
    assert rows[1].split == "test" and rows[1].batch is None


def test_uris_are_not_checked_locally(write_sheet):
    rows = read_samplesheet(write_sheet([["ds", "s3://bucket/x.h5ad", "", ""]]))
    assert rows[0].h5ad == "s3://bucket/x.h5ad"


@pytest.mark.parametrize(
    "header,rows,match",
    [
        ("dataset,h5ad,splt", [["d", "a.h5ad", "all"]], r"unknown column 'splt' \(did you mean 'split'\?\)"),
        ("dataset,h5ad,colour", [["d", "a.h5ad", "x"]], r"unknown column 'colour'"),
        ("dataset,split", [["d", "all"]], r"missing required column 'h5ad'"),
        ("h5ad", [["a.h5ad"]], r"missing required column 'dataset'"),
        ("dataset,h5ad,split", [["d", "a.h5ad", "trian"]], r"row 1, column 'split': invalid value 'trian'"),
        ("dataset,h5ad", [["bad name", "a.h5ad"]], r"row 1, column 'dataset': invalid value 'bad name'"),
        ("dataset,h5ad", [["d", "a.txt"]], r"row 1, column 'h5ad': invalid value 'a.txt'"),
        ("dataset,h5ad", [["d", "missing.h5ad"]], r"row 1, column 'h5ad': file does not exist: .*missing.h5ad"),
        ("dataset,h5ad", [["d", "a.h5ad"], ["d", "a.h5ad"]], r"row 2, column 'h5ad': .*listed twice"),
        ("dataset,h5ad", [["d", "a.h5ad", "extra"]], r"row 1: has 3 fields but the header has 2"),
        ("dataset,h5ad,dataset", [["d", "a.h5ad", "d"]], r"column 'dataset' appears more than once"),
        ("dataset,h5ad", [], r"no data rows below the header"),
    ],
)
def test_bad_samplesheets(make_h5ad, write_sheet, header, rows, match):
    make_h5ad("a")
    with pytest.raises(InputError, match=match) as exc:
        read_samplesheet(write_sheet(rows, header=header))
    assert "\n" not in str(exc.value)


def test_empty_samplesheet(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(InputError, match=r"empty.csv: the file is empty"):
        read_samplesheet(path)


def test_missing_samplesheet(tmp_path):
    with pytest.raises(InputError, match=r"nope.csv: file does not exist"):
        read_samplesheet(tmp_path / "nope.csv")


def test_condition_keys_must_agree_within_dataset(make_h5ad, write_sheet):
    make_h5ad("a")
    make_h5ad("b")
    sheet = write_sheet(
        [["d", "a.h5ad", "", "", "cell_type"], ["d", "b.h5ad", "", "", "cell_type;batch"]],
        header="dataset,h5ad,split,batch,condition_keys",
    )
    with pytest.raises(InputError, match=r"row 2, column 'condition_keys': 'cell_type;batch' differs from row 1"):
        read_samplesheet(sheet)


@pytest.mark.parametrize(
    "value,what",
    [
        (1.5, "non-integer value 1.5"),
        (-2.0, "negative value -2.0"),
        (np.nan, "NaN value nan"),
        (np.inf, "infinite value inf"),
    ],
)
def test_check_counts_names_cell_gene_value(value, what):
    X = sp.csr_matrix(np.array([[1.0, 0.0, 3.0], [0.0, value, 2.0]]))
    with pytest.raises(InputError, match=rf"found {what} at cell 'c1', gene 'g1'"):
        check_counts(X, ["c0", "c1"], ["g0", "g1", "g2"], source="f.h5ad")


def test_check_counts_accepts_integer_floats_and_ints():
    check_counts(sp.csr_matrix(np.array([[1.0, 0.0, 3.0]], dtype=np.float32)), ["c"], ["a", "b", "c"], source="x")
    check_counts(sp.csr_matrix(np.array([[1, 0, 3]], dtype=np.int32)), ["c"], ["a", "b", "c"], source="x")


def test_atomic_outputs_leave_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_outputs(tmp_path / "a.json", tmp_path / "b.json") as (ta, tb):
            open(ta, "w").write("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_outputs(tmp_path / "a.json", tmp_path / "b.json") as (ta, tb):
        open(ta, "w").write("1")
        open(tb, "w").write("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) != oct(0o600)


def test_version_command_reports_installed_packages() -> None:
    """`sclatent version [PACKAGE]` (the modules' versions lines): this Python's versions, a clear error otherwise."""
    from importlib.metadata import version

    from click.testing import CliRunner

    from sclatent import __version__
    from sclatent.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["version"]).output.strip() == __version__
    res = runner.invoke(main, ["version", "torch"])
    assert res.exit_code == 0 and res.output.strip() == version("torch")
    res = runner.invoke(main, ["version", "no-such-package-xyz"])
    assert res.exit_code == 2 and "package 'no-such-package-xyz' is not installed" in res.output


def _shard(start: int, stop: int, replicate: int):
    import anndata as ad
    import pandas as pd

    n = stop - start
    obs = pd.DataFrame(
        {"cell_index": np.arange(start, stop), "replicate": replicate},
        index=[f"r{replicate}_c{i}" for i in range(start, stop)],
    )
    return ad.AnnData(
        X=sp.csr_matrix(np.full((n, 3), replicate + 1.0, np.float32)),
        obs=obs,
        var=pd.DataFrame(index=["g1", "g2", "g3"]),
    )


def test_gather_orders_shards_and_rejects_non_shards(tmp_path) -> None:
    from sclatent.generate import gather

    for name, (a, b, r) in {"s1": (4, 8, 0), "s0": (0, 4, 0), "t": (0, 4, 1)}.items():
        _shard(a, b, r).write_h5ad(tmp_path / f"{name}.h5ad")
    out = gather([tmp_path / "t.h5ad", tmp_path / "s1.h5ad", tmp_path / "s0.h5ad"], tmp_path / "all.h5ad")
    assert list(out.obs["replicate"]) == [0] * 8 + [1] * 4
    assert list(out.obs["cell_index"]) == list(range(8)) + list(range(4))
    with pytest.raises(InputError, match="the shards overlap"):
        gather([tmp_path / "s0.h5ad", tmp_path / "s0.h5ad"], tmp_path / "dup.h5ad")
    plain = _shard(0, 4, 0)
    del plain.obs["cell_index"]
    plain.write_h5ad(tmp_path / "plain.h5ad")
    with pytest.raises(InputError, match=r"plain.h5ad is not a SAMPLE shard \(no obs column 'cell_index'\)"):
        gather([tmp_path / "s0.h5ad", tmp_path / "plain.h5ad"], tmp_path / "bad.h5ad")
    assert not (tmp_path / "dup.h5ad").exists() and not (tmp_path / "bad.h5ad").exists()


def test_h5ad_counts_take_equals_slicing_on_both_read_paths(tmp_path):
    """H5adCounts.take: few rows are read as runs of consecutive rows, many by chunks; both give X[rows]."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from sclatent.ondisk import H5adCounts

    X = sp.random(3000, 120, density=0.05, format="csr", random_state=1, dtype=np.float32)
    ad.AnnData(X).write_h5ad(tmp_path / "x.h5ad")
    rng = np.random.default_rng(0)
    with H5adCounts(tmp_path / "x.h5ad") as counts:
        for rows in (
            np.array([0, 1, 2, 9, 2998, 2999]),  # runs (6 * 256 < 3000), the first and last rows included
            np.sort(rng.choice(3000, 11, replace=False)),  # runs
            np.sort(rng.choice(3000, 900, replace=False)),  # chunks
            np.array([], dtype=np.int64),
        ):
            got = counts.take(rows)
            assert got.shape == (len(rows), 120) and (got != X[rows]).nnz == 0
