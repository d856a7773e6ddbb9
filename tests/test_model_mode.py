"""`nextflow run main.nf --model <bundle>`: a trained model run on new data, no training (real Nextflow, real files).

The model is the pbmc bundle of the session's `-profile test` run; the new data are the bundled pbmc3k_b cells on
another panel (Ensembl ids as var_names, 300 genes removed), matched to the model's gene symbols by --gene_key.
"""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pytest

from nfhelpers import REPO, run_nextflow

pytestmark = [pytest.mark.nextflow, pytest.mark.slow]  # each run: ~1-3 min on a loaded 2-core machine


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    d = tmp_path_factory.mktemp("query")
    src = ad.read_h5ad(REPO / "assets" / "test_data" / "pbmc3k_b.h5ad")
    q = src[:, 300:].copy()
    q.var["symbol"] = list(q.var_names)
    q.var_names = list(q.var["gene_ids"])
    q.write_h5ad(d / "query.h5ad")
    sheet = d / "query.csv"
    sheet.write_text(f"dataset,h5ad,condition_keys\nquery,{d / 'query.h5ad'},cell_type\n")
    return {"dir": d, "h5ad": d / "query.h5ad", "sheet": sheet, "adata": q}


def test_a_trained_model_runs_on_new_data_without_training(test_profile_run, query, tmp_path) -> None:
    import sclatent

    bundle = test_profile_run.outdir / "pbmc" / "model" / "model.pt"
    run = run_nextflow(
        tmp_path, "-profile", "test", "--input", str(query["sheet"]), "--model", str(bundle), "--gene_key", "symbol"
    )
    assert run.returncode == 0, run.output[-5000:]
    names = [t["name"] for t in run.trace()]
    for step in ("PREPARE", "TOKENIZE", "ENCODE", "EMBED", "SAMPLE", "GATHER", "EVALUATE", "REPORT"):
        assert any(f":{step} (query" in n for n in names), (step, names)
    for step in ("TRAIN_VAE", "TRAIN_PRIOR", "BUNDLE"):
        assert not any(f":{step} " in n for n in names), (step, names)
    out = run.outdir / "query"
    assert not (out / "model").exists()

    model = sclatent.Model.load(bundle, device="cpu")
    manifest = json.loads((out / "tokenize" / "tokens" / "manifest.json").read_text())
    present = set(query["adata"].var["symbol"]) & set(model.genes)
    assert manifest["genes"] == model.genes and manifest["gene_selection"] == "model"
    assert manifest["splits"]["train"]["panel"]["matched"] == len(present) < len(model.genes)
    assert json.loads((out / "prepare" / "prepare.json").read_text())["provenance"]["config"]["gene_key"] == "symbol"

    # the input file with the model's embedding: the same numbers as the Python API's
    emb = ad.read_h5ad(out / "embed" / "query.h5ad")
    assert emb.n_obs == query["adata"].n_obs and list(emb.var_names) == list(query["adata"].var_names)
    expected = model.embed(query["adata"].copy(), gene_key="symbol")
    np.testing.assert_allclose(emb.obsm["X_sclatent"], expected, rtol=1e-4, atol=1e-5)
    assert emb.uns["X_sclatent"]["panel"]["matched"] == len(present)

    test = ad.read_h5ad(out / "prepare" / "test.h5ad")
    gen = ad.read_h5ad(out / "sample" / "generated.h5ad")
    assert gen.n_obs == 2 * test.n_obs and list(gen.var_names) == model.genes
    assert list(gen.obs.loc[gen.obs["replicate"] == 0, "cell_type"].astype(str)) == list(test.obs["cell_type"])
    recon = json.loads((out / "encode" / "reconstruction.json").read_text())["metrics"]
    assert recon["n_cells"] == test.n_obs and recon["n_genes"] == len(model.genes)
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["generation"]["overall"]["w2"]["n"] == 2
    html = (out / "report" / "report.html").read_text()
    assert 'id="reconstruction"' in html and 'id="metrics"' in html


def test_a_panel_without_overlap_stops_with_one_clear_line(test_profile_run, query, tmp_path) -> None:
    """By its own var_names (Ensembl ids) the query shares no gene with the model's symbols."""
    bundle = test_profile_run.outdir / "pbmc" / "model" / "model.pt"
    run = run_nextflow(tmp_path, "-profile", "test", "--input", str(query["sheet"]), "--model", str(bundle))
    assert run.returncode != 0
    # TOKENIZE (on PREPARE's train.h5ad) or EMBED (on the input file), running side by side, stops first, naming
    # its file and the model's vocabulary
    assert re.search(r"sclatent (tokenize|embed): error: \S*(query|train)\.h5ad: none of its \d+ genes is in the model's "
                     r"vocabulary of 500 genes", run.output), run.output[-3000:]  # fmt: skip
    assert not (run.outdir / "query" / "tokenize").exists() and not (run.outdir / "query" / "embed").exists()


def test_a_missing_model_file_is_named(query, tmp_path) -> None:
    run = run_nextflow(tmp_path, "-profile", "test", "--input", str(query["sheet"]), "--model", "nowhere/model.pt")
    assert run.returncode != 0
    assert re.search(r"nowhere/model\.pt", run.output), run.output[-3000:]
    assert not (run.outdir / "query").exists()
