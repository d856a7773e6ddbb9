"""`nextflow run main.nf -profile test` for real (the one real run of CI), and the pipeline's parameters.

The contracts that need no real run (the whole DAG with -stub, bad samplesheets, bad parameters) are nf-test's:
tests/default.nf.test.
"""

from __future__ import annotations

import csv
import json
import re

import anndata as ad
import numpy as np
import pytest

from nfhelpers import REPO, nextflow_cmd

DATASETS = {"pbmc": ["cell_type"], "mixology": ["cell_line", "protocol"]}


def test_all_tasks_succeed(test_profile_run):
    tasks = test_profile_run.trace()
    names = [t["name"] for t in tasks]
    assert all(t["status"] == "COMPLETED" for t in tasks), tasks
    for step in ("PREPARE", "TOKENIZE", "TRAIN_VAE", "ENCODE", "TRAIN_PRIOR", "BUNDLE", "GATHER", "EVALUATE", "REPORT"):
        for ds in DATASETS:
            assert any(f":{step} ({ds})" in n for n in names), (step, ds, names)
    # SAMPLE scattered: test profile = 2 replicates x shards of 128 cells (pbmc 200 test cells -> 2 shards)
    pbmc_shards = sorted(n for n in names if ":SAMPLE (pbmc:" in n)
    assert len(pbmc_shards) == 4 and any("r1:128-200" in n for n in pbmc_shards), pbmc_shards
    # the local executor's caps, said once (the test profile's --max_cpus 2 / --max_memory 6.GB are the lower)
    assert test_profile_run.output.count("local executor: every task asks for at most") == 1
    assert "local executor: every task asks for at most 2 CPUs and 6 GB" in test_profile_run.output


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_generated_cells(test_profile_run, dataset):
    out = test_profile_run.outdir / dataset
    gen = ad.read_h5ad(out / "sample" / "generated.h5ad")
    test = ad.read_h5ad(out / "prepare" / "test.h5ad")
    manifest = json.loads((out / "tokenize" / "tokens" / "manifest.json").read_text())
    # one generated cell per test cell and replicate, with its labels, over the model's genes
    assert gen.n_obs == 2 * test.n_obs and list(gen.var_names) == manifest["genes"]
    assert sorted(set(gen.obs["replicate"])) == [0, 1] and bool(gen.obs["generated"].all())
    for key in DATASETS[dataset]:
        for r in (0, 1):
            rep = gen.obs[gen.obs["replicate"] == r]
            assert list(rep[key].astype(str)) == list(test.obs[key].astype(str))
    data = gen.X.data
    assert np.all(data >= 0) and np.all(np.floor(data) == data) and gen.X.nnz > 0


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_models_and_metrics(test_profile_run, dataset):
    out = test_profile_run.outdir / dataset
    for stage, folder in (("vae", "train_vae/vae"), ("prior", "train_prior/prior")):
        cfg = json.loads((out / folder / "config.json").read_text())
        assert cfg["metadata"]["stage"] == stage and (out / folder / "checkpoint.pt").exists()
        history = (out / folder / "history.csv").read_text().splitlines()
        assert history[0].startswith("step,epoch,loss") and len(history) > 2
        if stage == "prior":  # the sampled weights are the warmed-up EMA (docs/decisions/0006)
            assert cfg["train_config"]["ema_decay"] == 0.999 and cfg["train_config"]["ema_warmup"] is True
    recon = json.loads((out / "encode" / "reconstruction.json").read_text())["metrics"]
    assert recon["n_cells"] > 0 and recon["n_genes"] == 500
    # the published model bundle loads with the Python API and holds both stages, the vocabulary and the labels
    import sclatent

    model = sclatent.Model.load(out / "model")
    assert model.genes == json.loads((out / "tokenize" / "tokens" / "manifest.json").read_text())["genes"]
    assert model.condition_keys == DATASETS[dataset] and model.bundle.prior is not None
    with np.load(out / "encode" / "latents.npz") as z:
        assert z["train_z"].shape[1:] == (4, 4)  # tiny preset: 4 latent tokens of width 4
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["condition_keys"] == DATASETS[dataset] and metrics["replicates"] == [0, 1]
    overall = metrics["generation"]["overall"]
    for m in ("w2", "mmd2_rbf", "fd", "one_nn_accuracy", "precision", "recall"):
        assert overall[m]["n"] == 2 and overall[m]["mean"] is not None, m
    # a tiny model trained for seconds is far from the real-vs-real floor at the same sample sizes
    assert 0 < metrics["real_vs_real"]["overall"]["w2"] < metrics["generated_vs_real_half"]["overall"]["w2"]
    assert metrics["reconstruction"]["re_nll_gene_sum_cell_mean"] == recon["re_nll_gene_sum_cell_mean"]
    assert "overall" in (out / "evaluate" / "metrics_mqc.tsv").read_text()


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_prepare_outputs_match_report(test_profile_run, dataset):
    out = test_profile_run.outdir / dataset / "prepare"
    report = json.loads((out / "prepare.json").read_text())
    train, test = ad.read_h5ad(out / "train.h5ad"), ad.read_h5ad(out / "test.h5ad")
    assert train.n_obs == report["split"]["train"] and test.n_obs == report["split"]["test"]
    assert train.n_obs + test.n_obs == report["cells_after_qc"]
    assert train.n_vars == test.n_vars == report["genes_after_qc"]
    assert int(train.var["highly_variable"].sum()) == report["hvg"]["n_flagged"] == 500  # test profile: --n_hvg 500
    assert report["split"]["stratified_by"] == DATASETS[dataset]
    for key in DATASETS[dataset]:
        assert key in train.obs and key in test.obs
    data = train.X.data
    assert np.all(data >= 0) and np.all(np.floor(data) == data)
    if dataset == "pbmc":  # two files, batches from the samplesheet, gene intersection
        assert set(train.obs["batch"]) == {"a", "b"}
        assert report["genes"]["union"] == 2500 and report["genes"]["intersection"] == 2450


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_tokens_consistent_with_shards(test_profile_run, dataset):
    tok = test_profile_run.outdir / dataset / "tokenize" / "tokens"
    manifest = json.loads((tok / "manifest.json").read_text())
    report = json.loads((test_profile_run.outdir / dataset / "prepare" / "prepare.json").read_text())
    assert manifest["n_genes"] == len(manifest["genes"]) == 500
    assert manifest["condition_keys"] == DATASETS[dataset]
    for split in ("train", "test"):
        info = manifest["splits"][split]
        assert info["n_cells"] == report["split"][split]
        n_cells = nnz = 0
        for shard in info["shards"]:
            with np.load(tok / shard["file"]) as z:
                assert len(z["library_size"]) == shard["n_cells"] and z["indptr"][-1] == shard["nnz"]
                assert z["genes"].min() >= 1 and z["genes"].max() <= manifest["n_genes"]
                n_cells += shard["n_cells"]
                nnz += shard["nnz"]
        assert n_cells == info["n_cells"] and nnz == info["nnz"]


def test_pipeline_info(test_profile_run):
    info = test_profile_run.outdir / "pipeline_info"
    for pattern in ("execution_trace_*.txt", "execution_timeline_*.html", "execution_report_*.html", "pipeline_dag_*.html"):
        assert list(info.glob(pattern)), pattern
    import yaml

    from sclatent import __version__

    # one mapping per process, every tool it reports inside (a repeated key would keep only its last mapping)
    text = (info / "sclatent_software_versions.yml").read_text()
    versions = yaml.safe_load(text)
    assert len(re.findall(r"^\S", text, flags=re.M)) == len(versions)
    steps = ("CHECK_SAMPLESHEET", "PREPARE", "TOKENIZE", "TRAIN_VAE", "ENCODE", "TRAIN_PRIOR", "BUNDLE", "SAMPLE")
    assert set(steps + ("GATHER", "EVALUATE", "REPORT", "EMBED")) == set(versions)
    assert all(v["sclatent"] == __version__ for v in versions.values()), versions
    assert set(versions["TRAIN_VAE"]) == {"sclatent", "torch"} and versions["TRAIN_VAE"]["torch"]
    with open(info / "samplesheet.valid.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["dataset"] for r in rows] == ["pbmc", "pbmc", "mixology"]


def test_help_lists_values_and_profiles_and_writes_nothing(tmp_path):
    """--help (and any run without --outdir) leaves no null/pipeline_info; it lists enums and every profile."""
    run = nextflow_cmd(tmp_path, "run", str(REPO / "main.nf"), "--help", "-ansi-log", "false")
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) in ([], ["work"])
    text = run.stdout
    assert "--vae_likelihood" in text and "One of: nb, zinb, poisson, gaussian." in text
    assert "One of: euler, heun, dopri5." in text and "One of: fp32, bf16." in text
    config = (REPO / "nextflow.config").read_text()
    block = config[config.index("\nprofiles {") : config.index("\n}", config.index("\nprofiles {"))]
    profiles = re.findall(r"(?m)^ {4}(\w+)\s*\{", block)
    assert {"apptainer", "test_full", "debug", "cpu", "test", "slurm"} <= set(profiles)
    assert f"Profiles: {', '.join(profiles)}" in text
    proc = nextflow_cmd(tmp_path, "config", str(REPO))
    assert proc.returncode == 0 and "null/" not in proc.stdout, proc.stdout


def test_schema_defaults_equal_config(tmp_path):
    """Every param in nextflow.config is in nextflow_schema.json with the same default, and vice versa."""
    proc = nextflow_cmd(tmp_path, "config", str(REPO), "-flat")
    assert proc.returncode == 0, proc.stderr
    config = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"params\.(\w+) = (.*)$", line)
        if m:
            config[m.group(1)] = m.group(2)
    schema = json.loads((REPO / "nextflow_schema.json").read_text())
    props = {k: v for g in schema["$defs"].values() for k, v in g["properties"].items()}
    assert set(config) == set(props), set(config) ^ set(props)
    for name, prop in props.items():
        raw = config[name]
        value = None if raw == "null" else json.loads(raw) if raw in ("true", "false") or re.fullmatch(r"-?[\d.]+", raw) else raw.strip("'")
        if name == "trace_report_suffix":
            continue  # a timestamp
        assert prop.get("default") == value, (name, prop.get("default"), raw)
        assert prop.get("description"), name


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_report_is_self_contained(test_profile_run, dataset):
    html = (test_profile_run.outdir / dataset / "report" / "report.html").read_text()
    for section in ("run-summary", "data-summary", "training", "reconstruction", "metrics", "per-class", "umap", "markers"):
        assert f'id="{section}"' in html, section
    assert not re.search(r'(src|href)="https?://', html)
    assert html.count("data:image/png;base64,") >= 4
    # the test profile's tiny models are flagged before any section; the pipeline gave REPORT the run's trace
    assert html.index('id="read-first"') < html.index('<section id="run-summary">') and "Test-size model." in html
    assert "Run wall time:" in html and 'id="table-trace"' in html
