"""A real `nextflow run` with --holdout and --transfer on the bundled sc_mixology subset (one dataset): the held-out
combination reaches the test split only, EVALUATE and the report score it apart, the console names it, and
TRANSFER publishes the test cells under the requested label. About 3-4 min on a loaded 2-core machine."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from nfhelpers import REPO, run_nextflow

pytestmark = [pytest.mark.slow, pytest.mark.nextflow]


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory):
    launch = tmp_path_factory.mktemp("nf_heldout")
    sheet = launch / "samplesheet.csv"
    sheet.write_text(
        f"dataset,h5ad,split,batch,condition_keys\nmixology,{REPO / 'assets/test_data/mixology.h5ad'},all,,cell_line;protocol\n"
    )
    run = run_nextflow(
        launch,
        "-profile",
        "test",
        "--input",
        str(sheet),
        "--holdout",
        "cell_line=HCC827,protocol=Drop-seq",
        "--transfer",
        "protocol=Drop-seq",
        "--transfer_where",
        "cell_line=HCC827",
        "--sample_replicates",
        "1",
        "--vae_epochs",
        "8",
        "--prior_epochs",
        "20",
    )
    assert run.returncode == 0, run.output[-5000:]
    return run


def test_held_out_cells_are_test_cells_only(heldout_run):
    out = heldout_run.outdir / "mixology" / "prepare"
    train, test = ad.read_h5ad(out / "train.h5ad"), ad.read_h5ad(out / "test.h5ad")
    source = ad.read_h5ad(REPO / "assets/test_data/mixology.h5ad")

    def held(obs):
        return (obs["cell_line"].astype(str) == "HCC827") & (obs["protocol"].astype(str) == "Drop-seq")

    assert not held(train.obs).any() and int(held(test.obs).sum()) == int(held(source.obs).sum()) == 23
    report = json.loads((out / "prepare.json").read_text())
    assert report["holdout"] == {"combinations": ["cell_line=HCC827,protocol=Drop-seq"], "test_cells": 23}
    assert "HCC827|Drop-seq" not in list(test.uns["sclatent"]["train_combinations"])


def test_evaluate_report_and_console_name_the_never_seen_combination(heldout_run):
    out = heldout_run.outdir / "mixology"
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    entry = metrics["held_out"]["per_combination"]["HCC827|Drop-seq"]
    assert metrics["held_out"]["combinations"] == ["HCC827|Drop-seq"]
    assert entry["n_real"] == 23 and entry["model"]["w2"] > 0 and entry["floor"]["w2"] > 0
    assert entry["nearest"]["protocol"]["combination"] == "HCC827|CEL-seq2"
    assert metrics["generation_scope"].startswith("seen combinations")
    assert "held out of training (test cells only): cell_line=HCC827,protocol=Drop-seq (23 cells)" in heldout_run.output
    assert "mixology: HCC827|Drop-seq was never seen in training: W2" in heldout_run.output
    page = (out / "report" / "report.html").read_text()
    assert "Never seen in training: HCC827|Drop-seq." in page


def test_transfer_publishes_the_cells_under_the_new_label(heldout_run):
    out = heldout_run.outdir / "mixology"
    cells = ad.read_h5ad(out / "transfer" / "transferred.h5ad")
    test = ad.read_h5ad(out / "prepare" / "test.h5ad")
    source = test[test.obs["cell_line"].astype(str) == "HCC827"]
    assert cells.n_obs == source.n_obs and list(cells.obs["reference_cell"]) == list(source.obs_names)
    assert (cells.obs["protocol"] == "Drop-seq").all() and (cells.obs["cell_line"] == "HCC827").all()
    assert list(cells.obs["source_protocol"].astype(str)) == list(source.obs["protocol"].astype(str))
    data = cells.X.data
    assert np.all(data >= 0) and np.all(np.floor(data) == data) and cells.X.nnz > 0
    tasks = heldout_run.trace()
    assert any(":TRANSFER (mixology)" in t["name"] and t["status"] == "COMPLETED" for t in tasks)
