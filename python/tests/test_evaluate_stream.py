"""EVALUATE and REPORT read seeded subsamples from disk: the same metrics as in memory on the same cells, caps
recorded; the label metrics and per-class metrics honour their caps."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sclatent import metrics as M
from sclatent.counts import subsample
from sclatent.evaluate import run_evaluate
from sclatent.report.cells import cell_sample
from sclatent.report.inputs import ReportInputs, load_inputs


def _cells(n: int, seed: int, genes: list[str], replicates: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    profiles = np.random.default_rng(7).gamma(0.5, 1.0, size=(3, len(genes)))
    profiles /= profiles.sum(axis=1, keepdims=True)
    types = rng.integers(0, 3, n)
    X = rng.poisson(profiles[types] * rng.lognormal(6.5, 0.3, n)[:, None]).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"t{t}" for t in types]), "batch": pd.Categorical(rng.choice(["a", "b"], n))},
        index=[f"s{seed}_{i}" for i in range(n)],
    )
    if replicates:
        obs["replicate"] = np.arange(n) % replicates
    return ad.AnnData(sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=genes))


def _files(tmp_path):
    genes = [f"g{j}" for j in range(60)]
    real = _cells(400, 1, genes)
    real.var["highly_variable"] = np.arange(60) < 40
    real.uns["sclatent"] = {"condition_keys": ["cell_type", "batch"], "dataset": "toy"}
    gen = _cells(500, 2, genes[:50], replicates=2)
    real.write_h5ad(tmp_path / "real.h5ad")
    gen.write_h5ad(tmp_path / "gen.h5ad")
    return real, gen


def _strip(d):
    return json.loads(json.dumps(d))


def test_evaluate_reads_the_subsample_it_states(tmp_path):
    real, gen = _files(tmp_path)
    kw = {"n_pcs": 5, "min_cells_per_class": 10, "seed": 3}
    full = run_evaluate(tmp_path / "real.h5ad", tmp_path / "gen.h5ad", tmp_path / "a", cells_per_side=None, **kw)
    # no cap: the metrics of the whole files, as computed in memory
    for r in (0, 1):
        part = gen[gen.obs["replicate"] == r]
        expect = M.evaluate(real, part, ["cell_type", "batch"], model_genes=list(gen.var_names), **kw)
        assert _strip(full["generation_per_replicate"][r]) == _strip(expect)
    # a cap: the metrics of the stated seeded subsample of each side
    capped = run_evaluate(tmp_path / "real.h5ad", tmp_path / "gen.h5ad", tmp_path / "b", cells_per_side=150, **kw)
    assert capped["cells_used"] == {
        "cells_per_side": 150,
        "real": [150, 400],
        "generated": {"0": [150, 250], "1": [150, 250]},
        "scored": {"real": 150, "generated": {"0": 150, "1": 150}},
    }
    real_s = real[subsample(400, 150, np.random.SeedSequence([3, 0]))]
    rows = np.flatnonzero(gen.obs["replicate"].to_numpy() == 1)
    gen_s = gen[rows[subsample(len(rows), 150, np.random.SeedSequence([3, 1, 1]))]]
    expect = M.evaluate(real_s, gen_s, ["cell_type", "batch"], model_genes=list(gen.var_names), **kw)
    assert _strip(capped["generation_per_replicate"][1]) == _strip(expect)
    assert capped["real_vs_real"]["n_real"] + capped["real_vs_real"]["n_generated"] == 150


def test_label_and_class_caps():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(300, 4)), rng.normal(size=(280, 4))
    lx, ly = rng.choice(["a", "b", "c"], 300), rng.choice(["a", "b", "c"], 280)
    assert M.knn_label_f1(X, lx, Y, ly, max_cells=None) == M.knn_label_f1(X, lx, Y, ly, max_cells=300)
    assert M.tstr_accuracy(Y, ly, X, lx, max_cells=None) == M.tstr_accuracy(Y, ly, X, lx, max_cells=300)
    assert M.knn_label_f1(X, lx, Y, ly, max_cells=50, seed=1) == M.knn_label_f1(X, lx, Y, ly, max_cells=50, seed=1)
    genes = [f"g{j}" for j in range(30)]
    real, gen = _cells(300, 1, genes), _cells(300, 2, genes)
    real.var["highly_variable"] = True
    out = M.evaluate(real, gen, ["cell_type", "batch"], n_pcs=4, class_max_cells=40, min_cells_per_class=60)
    entry = out["per_class"]["cell_type"]
    assert out["settings"]["class_max_cells"] == 40
    assert entry["n_skipped"] == len(entry["skipped"]) and entry["n_classes"] + entry["n_skipped"] == 3


def test_report_reads_only_its_sample_from_disk(tmp_path):
    real, gen = _files(tmp_path)
    from_disk = load_inputs(real=tmp_path / "real.h5ad", generated=tmp_path / "gen.h5ad")
    assert from_disk.real.X is None and from_disk.generated.X is None
    in_memory = ReportInputs(dataset="toy", real=real, generated=gen)
    a, b = cell_sample(from_disk, 120, seed=5), cell_sample(in_memory, 120, seed=5)
    assert list(a.real.obs_names) == list(b.real.obs_names) and list(a.generated.obs_names) == list(
        b.generated.obs_names
    )
    assert (a.real.X != b.real.X).nnz == 0 and (a.generated.X != b.generated.X).nnz == 0
    assert a.n_generated_total == b.n_generated_total == 250


def test_generated_genes_the_real_cells_lack_are_left_out_and_said(tmp_path, caplog):
    """A model run on another panel generates vocabulary genes the real cells lack: the comparison is on the shared
    genes, the same as generating only those, and metrics.json says how many were compared."""
    real, gen = _files(tmp_path)
    extra = _cells(500, 3, [f"x{j}" for j in range(8)])
    genes = [*gen.var_names, *extra.var_names]
    wide = ad.AnnData(sp.hstack([gen.X, extra.X]).tocsr(), obs=gen.obs.copy(), var=pd.DataFrame(index=genes))
    wide.write_h5ad(tmp_path / "wide.h5ad")
    kw = {"n_pcs": 10, "floor": False}
    narrow = run_evaluate(tmp_path / "real.h5ad", tmp_path / "gen.h5ad", tmp_path / "a", **kw)
    wider = run_evaluate(tmp_path / "real.h5ad", tmp_path / "wide.h5ad", tmp_path / "b", **kw)
    assert "8 of the 58 generated genes are not in the real data" in caplog.text
    assert wider["genes_compared"] == {"shared": 50, "generated": 58, "hvg": 40, "hvg_real": 40}
    assert wider["generation"]["overall"] == narrow["generation"]["overall"]
    # a model that does not generate some of the real data's HVGs (PREPARE's, on the query): the others are used
    gen[:, 10:].copy().write_h5ad(tmp_path / "fewer.h5ad")
    fewer = run_evaluate(tmp_path / "real.h5ad", tmp_path / "fewer.h5ad", tmp_path / "c", **kw)
    assert "10 of the real data's 40 HVGs are not generated by the model" in caplog.text
    assert fewer["genes_compared"] == {"shared": 40, "generated": 40, "hvg": 30, "hvg_real": 40}
    assert fewer["generation"]["overall"]["w2"]["mean"] > 0
    # the report's cells too: the shared genes, read from disk for the sampled cells only
    sample = cell_sample(load_inputs(real=tmp_path / "real.h5ad", generated=tmp_path / "wide.h5ad"), 120, seed=5)
    same = cell_sample(load_inputs(real=tmp_path / "real.h5ad", generated=tmp_path / "gen.h5ad"), 120, seed=5)
    assert list(sample.generated.var_names) == list(gen.var_names)
    assert (sample.generated.X != same.generated.X).nnz == 0


def test_generated_cells_sharing_no_gene_or_no_hvg_are_one_line_errors(tmp_path):
    import pytest

    from sclatent.errors import InputError

    _, gen = _files(tmp_path)
    other = _cells(100, 4, [f"x{j}" for j in range(8)])
    other.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(InputError, match=r"other\.h5ad vs .*real\.h5ad: none of the 8 generated genes is in the real"):
        run_evaluate(tmp_path / "real.h5ad", tmp_path / "other.h5ad", tmp_path / "a", n_pcs=10, floor=False)
    gen[:, 40:].copy().write_h5ad(tmp_path / "no_hvg.h5ad")  # genes g40..g49: none of the 40 HVGs
    with pytest.raises(InputError, match=r"none of the real data's 40 HVGs is among the generated genes"):
        run_evaluate(tmp_path / "real.h5ad", tmp_path / "no_hvg.h5ad", tmp_path / "b", n_pcs=10, floor=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
