"""The benchmark harness (python/benchmarks): its smallest path end to end, and the pieces it relies on."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_report  # noqa: E402
import common  # noqa: E402


def test_child_peak_rss_is_the_childs_own(tmp_path):
    """A child started from a process holding ~400 MB reports its own (small) peak RSS, not the parent's."""
    ballast = np.ones(50_000_000)  # 400 MB in this process
    wall, rss_mb, code = common.run_child([sys.executable, "-c", "pass"], log_path=tmp_path / "child.log")
    assert code == 0 and wall > 0
    assert ballast.sum() == 50_000_000
    assert 1 < rss_mb < 150, f"child reported {rss_mb:.0f} MB"


def test_child_timeout_kills_and_reports(tmp_path):
    wall, _, code = common.run_child(
        [sys.executable, "-c", "import time; time.sleep(30)"], log_path=tmp_path / "c.log", timeout_s=1.0
    )
    assert code == -9 and wall < 15


def test_update_benchmarks_md_replaces_only_its_section(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    bench_report.update_benchmarks_md(path, "quick", "## quick one\n")
    bench_report.update_benchmarks_md(path, "full", "## full one\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks") and bench_report.MARKER in text
    assert text.index("## full one") < text.index("## quick one")  # the full run's tables come first
    edited = text.replace("# Benchmarks", "# Benchmarks (edited by hand)")
    path.write_text(edited)
    bench_report.update_benchmarks_md(path, "quick", "## quick two\n")
    text = path.read_text()
    assert "# Benchmarks (edited by hand)" in text and "## full one" in text
    assert "## quick two" in text and "## quick one" not in text
    assert text.count("<!-- BEGIN quick -->") == 1


def test_growth_sentence_reports_the_loglog_slope():
    rows = [
        {
            "genes": g,
            "step_ms": 2.0 * g,
            "full_decode_ms_per_cell": 0.01 * g,
            "peak_rss_mb": 600 + 0.1 * g,
            "rss_after_imports_mb": 600,
        }
        for g in (1_000, 2_000, 4_000)
    ]
    text = bench_report.growth_sentence(rows, "genes")
    assert "slope 1.00" in text and "2,000 to 8,000 ms" in text


def test_scvi_budget_parsing():
    from scvi_baseline import parse_budget

    assert parse_budget("equal_epochs:epochs=20") == ("equal_epochs", "epochs", 20.0)
    assert parse_budget("equal_time:seconds=12.5") == ("equal_time", "seconds", 12.5)
    for bad in ("equal_time", "x:minutes=3", "x:epochs=-1"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark dataset 'pbmc68k'"):
        common.make_dataset_inputs("pbmc68k", tmp_path)


@pytest.mark.slow
def test_smoke_path_end_to_end(tmp_path):
    """run_all.py --smoke: synthetic data through every quality stage, the sampler study and the speed tables."""
    import run_all

    out = tmp_path / "BENCHMARKS.md"
    quieted = {name: logging.getLogger(name).level for name in ("sclatent", "py.warnings", "anndata", "scanpy")}
    try:
        res = run_all.main(["--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out), "--threads", "1"])
    finally:  # run_all quiets these loggers for its own console; later tests read sclatent's warnings
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)
    ds = res["datasets"]["synthetic"]
    assert set(ds["generation"]) == {"ldm_joint", "ldm_additive", "ldm_uncond", "vae_gaussian"}
    for entry in ds["generation"].values():
        w2 = entry["summary"]["overall"]["w2"]["mean"]
        assert math.isfinite(w2) and w2 > 0
    assert math.isfinite(ds["reconstruction"]["sclatent VAE"]["re_nll_gene_sum_cell_mean"])
    assert ds["budgets"]["vae"]["steps"] >= 1 and ds["budgets"]["prior"]["steps"] >= 1
    sections = ds["held_out"]["sections"]
    assert set(sections) == {
        "sclatent LDM, joint guidance",
        "sclatent LDM, additive guidance",
        "sclatent transfer (same cell type, other condition)",
    }
    for section in sections.values():
        entry = section["per_combination"]["type_0|batch_1"]
        assert math.isfinite(entry["model"]["w2"]) and math.isfinite(entry["floor"]["w2"])
    sampler = res["sampler"]
    assert sampler["rows"][0]["method"] == "dopri5" and sampler["rows"][0]["w2_rel_diff"] == 0.0
    assert all(r["nfe"] >= 1 for r in sampler["rows"])
    assert res["speed"]["scaling"]["genes"] and res["speed"]["presets"]
    text = out.read_text()
    for heading in (
        "Training budgets",
        "Generation, all",
        "Held-out combinations",
        "Sampler study",
        "Scaling of the VAE",
    ):
        assert heading in text
    assert "<!-- BEGIN smoke -->" in text and text.count("<!-- END smoke -->") == 1


@pytest.mark.slow
def test_scvi_baseline_trains_reconstructs_and_generates(tmp_path):
    """scVI on a tiny synthetic set: Table 1 metrics from sclatent's function, unconditional NB counts."""
    pytest.importorskip("scvi")
    import scvi_baseline

    from sclatent.synthetic import synthetic_counts

    train, test = synthetic_counts(n_cells=120, n_genes=40, seed=1), synthetic_counts(n_cells=30, n_genes=40, seed=2)
    model, info = scvi_baseline.train_scvi(train, train.obs["cell_type"].astype(str).to_numpy(), "epochs", 2, seed=0)
    assert info["epochs"] == 2 and info["cells_per_s"] > 0
    recon = scvi_baseline.reconstruct(model, test, seed=0)
    assert (
        recon["n_cells"] == 30
        and math.isfinite(recon["re_nll_gene_sum_cell_mean"])
        and recon["re_nll_gene_sum_cell_mean"] > 0
    )
    a = scvi_baseline.generate(model, 25, 7.0, 0.3, seed=0, replicate=0)
    b = scvi_baseline.generate(model, 25, 7.0, 0.3, seed=0, replicate=0)
    assert a.shape == (25, 40) and (a != b).nnz == 0  # the same seed gives the same counts
    assert np.all(a.data == np.floor(a.data)) and a.sum() > 0


@pytest.mark.slow
def test_scvi_with_covariates_generates_the_requested_labels(tmp_path):
    """scVI with the keys as categorical covariates: conditional cells, one per requested row, also for a
    combination it never saw (each value was seen), with sclatent's library-size rule; seeded."""
    pytest.importorskip("scvi")
    import scvi_baseline

    from sclatent.synthetic import CompositionalTruth

    truth = CompositionalTruth(n_types=2, n_perturbations=2, n_genes=40, seed=0)
    train = truth.sample([(0, 0), (0, 1), (1, 0)], 40, seed=1)
    keys = ["cell_type", "perturbation"]
    label = train.obs[keys].astype(str).agg("|".join, axis=1).to_numpy()
    model, info = scvi_baseline.train_scvi(train, label, "epochs", 2, seed=0, covariates=keys)
    assert info["covariates"] == keys
    request = truth.sample([(1, 1), (0, 0)], 5, seed=2).obs  # (1, 1) was never seen
    lib = np.log(np.asarray(train.X.sum(axis=1)).ravel())
    stats = {"mean": float(lib.mean()), "sd": float(lib.std())}
    manifest = {
        "labels": {"cell_type": ["type_0", "type_1"], "perturbation": ["control", "pert_1"]},
        "library_size": {
            "marginal": stats,
            "per_key": {
                k: {v: stats for v in vs}
                for k, vs in {"cell_type": ["type_0", "type_1"], "perturbation": ["control", "pert_1"]}.items()
            },
            "joint": {"type_0|control": stats, "type_0|pert_1": stats, "type_1|control": stats},
        },
    }
    a = scvi_baseline.generate_like(model, request, keys, manifest, seed=0, replicate=0)
    b = scvi_baseline.generate_like(model, request, keys, manifest, seed=0, replicate=0)
    assert a.shape == (10, 40) and (a != b).nnz == 0 and a.sum() > 0
    assert np.all(a.data == np.floor(a.data))
    codes = scvi_baseline.covariate_codes(model, request)
    assert codes.shape == (10, 2) and codes[:5].tolist() == [[1, 1]] * 5


def test_compositional_dataset_inputs(tmp_path):
    spec = common.make_dataset_inputs("compositional", tmp_path)
    assert spec.keys == ["cell_type", "perturbation"]
    assert spec.holdout == "cell_type=type_0,perturbation=pert_1;cell_type=type_1,perturbation=pert_2;" + (
        "cell_type=type_2,perturbation=pert_3"
    )


def test_run_all_rejects_two_modes():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--quick", "--full"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_training_summary_steady_rate_leaves_out_the_first_window(tmp_path):
    """A slow first window (start-up) counts in the run's average but not in the steady (calibration) rate."""
    from common import training_summary

    (tmp_path / "history.csv").write_text(
        "step,epoch,loss,lr,grad_norm,cells_per_s,elapsed_s\n"
        "10,0,5.0,0.001,1.0,100.0,10.0\n"  # 1,000 cells in 10 s (warm-up)
        "20,0,4.0,0.001,1.0,500.0,12.0\n"  # 1,000 cells in 2 s
        "30,0,3.0,0.001,1.0,500.0,14.0\n"  # 1,000 cells in 2 s
    )
    overall = training_summary(tmp_path)
    steady = training_summary(tmp_path, steady=True)
    assert overall["steps"] == 30 and overall["train_s"] == 14.0
    assert abs(overall["items_per_s"] - 3000 / 14) < 1e-9
    assert abs(steady["items_per_s"] - 500.0) < 1e-9


def test_vae_settings_grid_parsing():
    """bench_vae_settings: the grid is the product of its axes; on/off are flag forms; a malformed axis is an error."""
    import bench_vae_settings

    points = bench_vae_settings.parse_grid("lr=1e-3,3e-3; gene-head=on,off")
    assert points == [
        {"lr": "1e-3", "gene-head": "on"},
        {"lr": "1e-3", "gene-head": "off"},
        {"lr": "3e-3", "gene-head": "on"},
        {"lr": "3e-3", "gene-head": "off"},
    ]
    assert bench_vae_settings.parse_grid("") == [{}]
    assert bench_vae_settings._option("gene-head", "off") == ["--no-gene-head"]
    assert bench_vae_settings._option("lr", "1e-3") == ["--lr", "1e-3"]
    assert bench_vae_settings._option("betas", "0.9:0.999") == ["--betas", "0.9,0.999"]  # ',' separates grid values
    assert bench_vae_settings.point_steps({"lr": "1e-3"}, 400) == 400
    assert bench_vae_settings.point_steps({"batch-size": "64", "max-steps": "1600"}, 400) == 1600
    with pytest.raises(ValueError, match="not 'option=v1,v2'"):
        bench_vae_settings.parse_grid("lr")
    rows = [
        dict(
            dataset="pbmc",
            point="lr-1e-3",
            seed=s,
            steps=400,
            train_s=100.0 + 2 * s,
            re=700.0 + 2 * s,
            pcc=0.01,
            pcc_mean=0.02,
            mse=1.3,
        )
        for s in (0, 1)
    ]
    table = bench_vae_settings.table(rows).splitlines()
    assert len(table) == 3 and table[2] == "| pbmc | lr-1e-3 | 400 | 2 | 101 | 701.0 | 0.0100 | 0.020 | 1.300 |"
    # with --train-cells every row also has the training cells' RE and PCC: two more columns, means over seeds
    for r in rows:
        r.update(re_train=690.0 + r["seed"], pcc_train=0.02)
    table = bench_vae_settings.table(rows).splitlines()
    assert table[0].endswith("| RE, train cells | PCC, train cells |")
    assert table[2].endswith("| 1.300 | 690.5 | 0.0200 |")


def test_bench_vae_settings_train_sample_is_seeded_and_keeps_the_cells(tmp_path):
    """--train-cells: a seeded sample of whole training cells, in file order; n above the cell count takes them all."""
    import anndata as ad
    import bench_vae_settings
    import numpy as np
    import scipy.sparse as sp

    x = sp.random(30, 12, density=0.3, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    src = tmp_path / "train.h5ad"
    ad.AnnData(X=x, obs={"cell": [f"c{i}" for i in range(30)]}).write_h5ad(src)
    assert bench_vae_settings.write_train_sample(src, 10, tmp_path / "a.h5ad") == 10
    assert bench_vae_settings.write_train_sample(src, 10, tmp_path / "b.h5ad") == 10
    a, b, full = (ad.read_h5ad(tmp_path / f) for f in ("a.h5ad", "b.h5ad", "train.h5ad"))
    assert list(a.obs_names) == list(b.obs_names)  # same seed, same cells
    idx = [full.obs_names.get_loc(n) for n in a.obs_names]
    assert idx == sorted(idx)
    assert (a.X != full.X[idx]).nnz == 0  # counts unchanged
    assert bench_vae_settings.write_train_sample(src, 100, tmp_path / "c.h5ad") == 30


def test_vae_bench_scripts_refuse_bad_arguments_naming_them(tmp_path, monkeypatch):
    """bench_vae_settings --train-cells < 0 and bench_vae_speed's malformed --tokens / --variant: one-line exits."""
    import bench_vae_settings
    import bench_vae_speed

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "manifest.json").write_text("{}")

    cases = [
        (
            bench_vae_settings,
            ["--data", str(tmp_path), "--datasets", "x", "--workdir", str(tmp_path / "w"), "--train-cells", "-1"],
            "--train-cells must be >= 0, got -1",
        ),
        (bench_vae_speed, ["--tokens", f"pbmc={tmp_path}", "--workdir", str(tmp_path / "w")], "pbmc="),
        (bench_vae_speed, ["--tokens", "pbmc", "--workdir", str(tmp_path / "w")], "'pbmc' is not name="),
        (
            bench_vae_speed,
            ["--tokens", f"pbmc={tok}", "--workdir", str(tmp_path / "w"), "--variant", "--count-readout 4"],
            "--variant '--count-readout 4' is not NAME=",
        ),
        (
            bench_vae_speed,
            ["--tokens", f"pbmc={tok}", "--workdir", str(tmp_path / "w"), "--variant", "k4='--count-readout 4"],
            "No closing quotation",
        ),
    ]
    for module, argv, message in cases:
        monkeypatch.setattr(sys, "argv", ["prog", *argv])
        with pytest.raises(SystemExit) as exc:
            module.main()
        assert message in str(exc.value)
    assert not (tmp_path / "w").exists()  # nothing written


@pytest.mark.slow  # 4 child processes: ~15 s on an idle 2-core machine, ~45 s on a loaded one
def test_bench_scale_runs_its_steps_and_renders(tmp_path):
    """The scale harness at toy sizes: every step it runs measured, the growth table and the section written."""
    import bench_scale

    out = tmp_path / "BENCHMARKS.md"
    res = bench_scale.main(
        [
            "--cells",
            "300",
            "600",
            "--genes",
            "200",
            "--genes-per-cell",
            "30",
            "--cells-per-side",
            "200",
            "--steps",
            "PREPARE,GATHER",
            "--no-costs",
            "--threads",
            "1",
            "--workdir",
            str(tmp_path / "w"),
            "--section",
            "scale-test",
            "--out",
            str(out),
        ]
    )
    assert [(r["step"], r["n_cells"]) for r in res["steps"]] == [
        (step, n) for n in (300, 600) for step in ("PREPARE", "GATHER")
    ]
    assert all(r["wall_s"] > 0 and r["peak_rss_mb"] > 50 for r in res["steps"])
    text = out.read_text()
    assert "<!-- BEGIN scale-test -->" in text and "Growth with N" in text and "| 600 |" in text
    with pytest.raises(SystemExit):
        bench_scale.main(["--steps", "PREPARE,TRAIN", "--no-write", "--workdir", str(tmp_path / "x")])


def test_bench_heldout_smoke_runs_every_route_and_renders_the_goal(tmp_path):
    """The unseen-combination study (decision 0020) end to end on the tiny synthetic dataset: every route is scored
    on the held-out combination, and the rendered table counts the goal per (combination, seed)."""
    import json

    import bench_heldout

    out = tmp_path / "BENCHMARKS.md"
    bench_heldout.main(
        ["--datasets", "synthetic", "--seeds", "0", "--workdir", str(tmp_path), "--vae-preset", "tiny"]
        + ["--vae-steps", "20", "--priors", "independent:0.2:20", "--replicates", "1", "--out", str(out)]
        + ["--routes", "compose:joint:1,noise:additive:1,transfer:joint:1"]
    )
    results = json.loads((tmp_path / "synthetic" / "seed0" / "results.json").read_text())
    assert results["holdout"] == "cell_type=type_0,batch=batch_1"
    rows = results["rows"]
    assert set(rows) == {"vae_ceiling"} | {
        f"independent:0.2:20 | {r}" for r in ("compose:joint:1", "noise:additive:1", "transfer:joint:1")
    }
    for name, row in rows.items():
        entry = row["scores"]["held_out"]["per_combination"]["type_0|batch_1"]
        assert entry["model"]["w2"] > 0 and entry["floor"]["w2"] > 0, name
    text = out.read_text()
    assert "<!-- BEGIN heldout -->" in text and "### synthetic" in text
    assert "real half A (floor)" in text
    row = next(line for line in text.splitlines() if line.startswith("| from noise, composed from seen combinations"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "from noise, composed from seen combinations, w 1 (independent ρ 0.2, 20 prior steps)"
    assert float(cells[1]) == pytest.approx(
        rows["independent:0.2:20 | compose:joint:1"]["scores"]["held_out"]["per_combination"]["type_0|batch_1"][
            "model"
        ]["w2"],
        rel=0.01,
    )
    assert cells[8] in ("0/1", "1/1")  # coverage >= half the floor's, counted over (combination, seed)
