"""Tests of sclatent.metrics: closed forms, toy sets with known answers, invariances, input errors."""

from __future__ import annotations

import io
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.sparse as sp

from sclatent import metrics as M
from sclatent.metrics import distances as D

SIGMAS = np.array(M.MMD_SIGMAS)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def gaussian_w2_squared(m1, s1, m2, s2) -> float:
    """Closed form: ||m1 - m2||^2 + Tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2)."""
    root = np.real(scipy.linalg.sqrtm(s2))
    cross = np.real(scipy.linalg.sqrtm(root @ s1 @ root))
    return float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2.0 * cross))


def brute_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2[..., None] / (2.0 * SIGMAS**2)).sum(-1)

    return float(k(x, x).mean() + k(y, y).mean() - 2.0 * k(x, y).mean())


def brute_prdc(x: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al. 2020 written directly from the definitions, with full distance matrices."""
    dxx = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    dyy = np.sqrt(((y[:, None] - y[None]) ** 2).sum(-1))
    dxy = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))  # (N, M)
    rx = np.sort(dxx, axis=1)[:, k]  # column 0 is the point itself
    ry = np.sort(dyy, axis=1)[:, k]
    inside_x = dxy < rx[:, None]  # (N, M): y_j in B(x_i)
    return {
        "precision": float(inside_x.any(axis=0).mean()),
        "recall": float((dxy < ry[None, :]).any(axis=1).mean()),
        "density": float(inside_x.sum() / (k * len(y))),
        "coverage": float((dxy.min(axis=1) < rx).mean()),
    }


def make_counts_adata(
    n: int,
    seed: int,
    n_genes: int = 200,
    n_types: int = 4,
    scale: float = 1.0,
    sparse: bool = True,
    type_sizes: list[int] | None = None,
) -> ad.AnnData:
    """Poisson counts from cluster-specific gene profiles; obs 'cell_type' and 'batch'."""
    rng = np.random.default_rng(seed)
    profiles = np.random.default_rng(1234).gamma(0.5, 1.0, size=(n_types, n_genes))
    profiles /= profiles.sum(axis=1, keepdims=True)
    if type_sizes is None:
        types = rng.integers(0, n_types, n)
    else:
        types = np.repeat(np.arange(len(type_sizes)), type_sizes)
        n = len(types)
    library = rng.lognormal(7.0, 0.3, n)
    counts = rng.poisson(profiles[types] * library[:, None] * scale).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": [f"t{t}" for t in types], "batch": rng.choice(["b0", "b1"], n)},
        index=[f"s{seed}_c{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    adata = ad.AnnData(sp.csr_matrix(counts) if sparse else counts, obs=obs, var=var)
    adata.var["highly_variable"] = np.arange(n_genes) < n_genes // 2
    return adata


# ----------------------------------------------------------------------------------------------------------
# W2 and FD against closed forms
# ----------------------------------------------------------------------------------------------------------
def test_w2_one_dimensional_equals_sorted_matching():
    # For equal-size 1-D samples the optimal plan matches sorted values: an exact answer for the OT solve.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 1)), rng.gamma(2.0, size=(300, 1))
    expected = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    assert M.w2(x, y, max_cells=None) == pytest.approx(expected, rel=1e-9)


def test_w2_two_gaussians_close_to_closed_form():
    rng = np.random.default_rng(1)
    cov = np.array([[2.0, 0.6], [0.6, 0.5]])
    mean = np.array([3.0, -1.0])
    x = rng.normal(size=(1000, 2))
    y = rng.multivariate_normal(mean, cov, size=1000)
    expected = np.sqrt(gaussian_w2_squared(np.zeros(2), np.eye(2), mean, cov))  # 3.233
    # Over seeds the empirical value at n=1000 in 2-D has SD ~0.04; 0.15 is ~4 SD (about 5 %).
    assert abs(M.w2(x, y, max_cells=None) - expected) < 0.15


def test_w2_zero_for_identical_sets_and_subsampling_is_seeded():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 3))
    assert M.w2(x, x, max_cells=None) == pytest.approx(0.0, abs=1e-7)
    y = rng.normal(size=(500, 3)) + 1.0
    assert M.w2(x, y, max_cells=200, seed=5) == M.w2(x, y, max_cells=200, seed=5)
    assert M.w2(x, y, max_cells=200, seed=5) != M.w2(x, y, max_cells=200, seed=6)


def test_frechet_distance_equals_closed_form_on_sample_moments():
    rng = np.random.default_rng(3)
    d = 5
    b = rng.normal(size=(d, d))
    cov = b @ b.T / d + 0.5 * np.eye(d)
    mean = rng.normal(size=d)
    x = rng.normal(size=(50_000, d))
    y = rng.multivariate_normal(mean, cov, size=50_000)
    fd = M.frechet_distance(x, y)
    # Exact identity: sqrtm(Sx Sy) route == symmetric closed form, on the sample moments.
    exact = gaussian_w2_squared(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert fd == pytest.approx(exact, rel=1e-8)
    # Population value (FD = W2^2 for Gaussians); sampling SD at n=50k is ~0.02.
    assert fd == pytest.approx(gaussian_w2_squared(np.zeros(d), np.eye(d), mean, cov), abs=0.1)
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


# ----------------------------------------------------------------------------------------------------------
# MMD²
# ----------------------------------------------------------------------------------------------------------
def test_mmd2_single_pair_by_hand():
    # m = 1: K_xx = K_yy = 5 (five kernels at distance 0), K_xy = sum_s exp(-1 / (2 s^2)).
    value = M.mmd2_rbf(np.array([[0.0]]), np.array([[1.0]]))
    assert value == pytest.approx(10.0 - 2.0 * np.exp(-1.0 / (2.0 * SIGMAS**2)).sum(), rel=1e-12)


def test_mmd2_zero_for_same_set_and_positive_for_shift():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 5))
    assert M.mmd2_rbf(x, x) == pytest.approx(0.0, abs=1e-10)
    same = M.mmd2_rbf(x, rng.normal(size=(500, 5)))
    shifted = M.mmd2_rbf(x, rng.normal(size=(500, 5)) + 1.0)
    # The biased V-statistic of two samples of one distribution is not 0 but ~2 (5 - E k(x, x')) / m
    # (the diagonals, eval_protocol §2a): about 0.011 here.
    assert 0.0 < same < 0.02
    assert shifted > 0.1
    assert shifted > 10 * same


def test_mmd2_blockwise_matches_full_matrix(monkeypatch):
    monkeypatch.setattr(D, "_BLOCK_BYTES", 8 * 7 * 90)  # 7-row blocks: exercises the block loops
    rng = np.random.default_rng(5)
    x = rng.normal(size=(90, 3)) * 0.2  # small scale: the small bandwidths contribute too
    y = rng.normal(size=(120, 3)) * 0.2 + 0.1
    # m = min(90, 120) = 90: all of x and a seeded subsample of 90 rows of y.
    seed_y = D._two_seeds(0)[1]
    y_used = y[D._subsample(y, 90, seed_y)]
    assert M.mmd2_rbf(x, y, seed=0) == pytest.approx(brute_mmd2(x, y_used), rel=1e-10, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# 1-NN and PRDC
# ----------------------------------------------------------------------------------------------------------
def test_one_nn_accuracy_half_for_same_distribution_one_for_disjoint():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(1000, 2)), rng.normal(size=(1500, 2))
    # balanced union of 2,000 cells: SD of the accuracy under the null ~0.011
    assert abs(M.one_nn_accuracy(x, y) - 0.5) < 0.05
    assert M.one_nn_accuracy(x, y + 100.0) == 1.0


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 4))
    same = M.prdc(x, x.copy(), k=5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    assert same["density"] == pytest.approx(1.0, abs=0.02)
    far = M.prdc(x, x + 1000.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_hand_computed_one_dimensional():
    # real {0,1,2,3}, k=1: every real radius is 1. generated {0.5, 10}: both generated radii are 9.5.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    gen = np.array([[0.5], [10.0]])
    out = M.prdc(real, gen, k=1)
    # 0.5 lies in B(0) and B(1); 10 in none -> precision 1/2, density (2 + 0) / (1 * 2) = 1.
    # every real cell is within 9.5 of 0.5 -> recall 1; nearest generated cell is 0.5 at distance
    # 0.5, 0.5, 1.5, 2.5 -> coverage 2/4.
    assert out == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


def test_prdc_blockwise_matches_definition(monkeypatch):
    monkeypatch.setattr(D, "_BLOCK_BYTES", 8 * 13 * 150)  # small blocks
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(150, 3)), rng.normal(size=(130, 3)) * 1.3 + 0.3
    got = M.prdc(x, y, k=4, max_cells=None)
    want = brute_prdc(x, y, k=4)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


# ----------------------------------------------------------------------------------------------------------
# label metrics
# ----------------------------------------------------------------------------------------------------------
def test_label_metrics_separated_classes_and_shuffled_labels():
    rng = np.random.default_rng(9)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    lab_r, lab_g = rng.integers(0, 3, 600), rng.integers(0, 3, 500)
    x = centres[lab_r] + rng.normal(size=(600, 2))
    y = centres[lab_g] + rng.normal(size=(500, 2))
    names_r, names_g = np.array(["a", "b", "c"])[lab_r], np.array(["a", "b", "c"])[lab_g]
    assert M.knn_label_f1(x, names_r, y, names_g) == 1.0
    assert M.tstr_accuracy(y, names_g, x, names_r) == {"accuracy": 1.0, "macro_f1": 1.0}
    shuffled = rng.permutation(names_g)
    assert M.knn_label_f1(x, names_r, y, shuffled) < 0.5
    with pytest.raises(ValueError, match="at least 2 generated classes"):
        M.tstr_accuracy(y, np.full(500, "a"), x, names_r)


# ----------------------------------------------------------------------------------------------------------
# invariance to cell order
# ----------------------------------------------------------------------------------------------------------
def test_every_feature_metric_invariant_to_cell_order():
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(400, 4)), rng.normal(size=(350, 4)) + 0.3
    lab_x, lab_y = rng.choice(["a", "b"], 400), rng.choice(["a", "b"], 350)
    px, py = rng.permutation(400), rng.permutation(350)
    # caps below the cell counts, so the seeded subsampling is exercised too
    assert M.w2(x, y, max_cells=200) == M.w2(x[px], y[py], max_cells=200)
    assert M.mmd2_rbf(x, y, max_cells=300) == M.mmd2_rbf(x[px], y[py], max_cells=300)
    assert M.frechet_distance(x, y) == M.frechet_distance(x[px], y[py])
    assert M.one_nn_accuracy(x, y, max_cells=250) == M.one_nn_accuracy(x[px], y[py], max_cells=250)
    assert M.prdc(x, y, max_cells=300) == M.prdc(x[px], y[py], max_cells=300)
    assert M.knn_label_f1(x, lab_x, y, lab_y) == M.knn_label_f1(x[px], lab_x[px], y[py], lab_y[py])
    assert M.tstr_accuracy(y, lab_y, x, lab_x) == M.tstr_accuracy(y[py], lab_y[py], x[px], lab_x[px])


def test_evaluate_invariant_to_cell_order():
    real = make_counts_adata(500, seed=1)
    gen = make_counts_adata(450, seed=2, scale=1.1)
    kwargs = {"n_pcs": 8, "max_cells": 300, "w2_max_cells": 200, "min_cells_per_class": 20}
    a = M.evaluate(real, gen, ["cell_type", "batch"], **kwargs)
    rng = np.random.default_rng(0)
    b = M.evaluate(
        real[rng.permutation(real.n_obs)].copy(),
        gen[rng.permutation(gen.n_obs)].copy(),
        ["cell_type", "batch"],
        **kwargs,
    )
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert json.dumps(a, allow_nan=False)  # JSON-able, no NaN


# ----------------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------------
def test_align_genes_order_and_missing_genes():
    real = make_counts_adata(30, seed=1, n_genes=10)
    gen = real[:, ["g7", "g2", "g5"]].copy()
    assert M.align_genes(real, gen) == ["g2", "g5", "g7"]  # real order
    extra = ad.AnnData(np.zeros((3, 2)), var=pd.DataFrame(index=["g1", "MT-X"]))
    with pytest.raises(ValueError, match="generated genes are missing from the real data: 'MT-X'"):
        M.align_genes(real, extra)
    with pytest.raises(ValueError, match="model genes are missing from the generated data: 'g3'"):
        M.align_genes(real, gen, model_genes=["g2", "g3"])


def test_evaluate_rejects_genes_and_values_it_cannot_use():
    real = make_counts_adata(60, seed=1, n_genes=20)
    gen = make_counts_adata(60, seed=2, n_genes=20)
    gen_extra = gen.copy()
    gen_extra.var_names = [*gen.var_names[:-1], "NOT_IN_REAL"]
    with pytest.raises(ValueError, match="missing from the real data: 'NOT_IN_REAL'"):
        M.evaluate(real, gen_extra, ["cell_type"], n_pcs=3)
    gen_hvg_only = gen[:, gen.var_names[:5]].copy()  # HVGs are g0..g9
    with pytest.raises(ValueError, match="HVGs are missing from the generated data: 'g5'"):
        M.evaluate(real, gen_hvg_only, ["cell_type"], n_pcs=3)
    for bad, shown in ((0.5, "0.5"), (-1.0, "-1.0"), (np.nan, "nan")):
        dense = gen.X.toarray()
        dense[7, 3] = bad
        bad_gen = ad.AnnData(dense, obs=gen.obs, var=gen.var)
        with pytest.raises(ValueError, match=rf"value {shown} at cell 's2_c7', gene 'g3'"):
            M.evaluate(real, bad_gen, ["cell_type"], n_pcs=3)
    sparse_bad = gen.copy()
    lil = gen.X.tolil()
    lil[4, 2] = 2.5
    sparse_bad.X = lil.tocsr()
    with pytest.raises(ValueError, match=r"generated data: counts .* non-integer value 2.5 at cell 's2_c4', gene 'g2'"):
        M.evaluate(real, sparse_bad, ["cell_type"], n_pcs=3)
    with pytest.raises(ValueError, match="lacks condition column"):
        M.evaluate(real, gen, ["tissue"], n_pcs=3)


# ----------------------------------------------------------------------------------------------------------
# feature space
# ----------------------------------------------------------------------------------------------------------
def test_feature_space_centres_generated_cells_on_the_real_mean():
    real = make_counts_adata(300, seed=1, n_genes=50)
    gen = make_counts_adata(200, seed=2, n_genes=50)
    mask = real.var["highly_variable"].to_numpy()
    real_pcs, gen_pcs, info = M.feature_space(real.X, gen.X, mask, n_pcs=5)
    assert info["variant"] == "corrected: shared genes, real-mean centred"
    assert np.allclose(real_pcs.mean(axis=0), 0.0, atol=1e-10)

    # by hand: normalise each cell to 1e4 over all 50 genes, log1p, HVGs, subtract the real mean, project
    def lognorm(x):
        x = x.toarray().astype(np.float64)
        return np.log1p(x / x.sum(1, keepdims=True) * 1e4)[:, mask]

    lr, lg = lognorm(real.X), lognorm(gen.X)
    _, _, vt = np.linalg.svd(lr - lr.mean(0), full_matrices=False)
    proj_real = (lr - lr.mean(0)) @ vt[:5].T  # (300, 5), each component up to its sign
    signs = np.sign((proj_real * real_pcs).sum(axis=0))
    assert np.allclose(real_pcs, proj_real * signs, atol=1e-8)
    assert np.allclose(gen_pcs, ((lg - lr.mean(0)) @ vt[:5].T) * signs, atol=1e-8)
    # the same counts on both sides give the same coordinates
    same_r, same_g, _ = M.feature_space(real.X, real.X.toarray(), mask, n_pcs=5)
    assert np.allclose(same_r, same_g, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# per-class aggregation and replicates
# ----------------------------------------------------------------------------------------------------------
def test_per_class_rule_is_recorded_as_applied():
    """One rule everywhere: the minimum EVALUATE applies (at least k + 1) is the one metrics.json records."""
    real = make_counts_adata(0, seed=1, type_sizes=[60, 10, 11])
    gen = make_counts_adata(0, seed=2, type_sizes=[60, 30, 30])
    out = M.evaluate(real, gen, ["cell_type"], n_pcs=6, min_cells_per_class=5, k=10)
    assert out["settings"]["min_cells_per_class"] == 11 == M.effective_min_cells_per_class(5, k=10)
    group = out["per_class"]["cell_type"]
    assert sorted(group["classes"]) == ["t0", "t2"] and [s["class"] for s in group["skipped"]] == ["t1"]
    assert (
        M.evaluate(real, gen, ["cell_type"], n_pcs=6, min_cells_per_class=20)["settings"]["min_cells_per_class"] == 20
    )


def test_mean_sem_by_hand():
    out = M.mean_sem([1.0, 2.0, 3.0, 4.0, None])
    # std(ddof=1) of 1..4 = sqrt(5/3) = 1.2910; / sqrt(4) = 0.6455
    assert out == {"mean": 2.5, "sem": pytest.approx(np.sqrt(5.0 / 3.0) / 2.0), "n": 4}
    assert M.mean_sem([7.0]) == {"mean": 7.0, "sem": None, "n": 1}


def test_evaluate_per_class_summary_and_skipped_classes():
    # t0..t2 have enough cells on both sides; t3 has 5 real cells and is skipped (and listed).
    real = make_counts_adata(0, seed=1, type_sizes=[60, 50, 40, 5])
    gen = make_counts_adata(0, seed=2, type_sizes=[55, 45, 45, 30])
    out = M.evaluate(real, gen, ["cell_type"], n_pcs=6, min_cells_per_class=20)
    group = out["per_class"]["cell_type"]
    assert sorted(group["classes"]) == ["t0", "t1", "t2"]
    assert group["skipped"] == [{"class": "t3", "n_real": 5, "n_generated": 30}]
    assert group["classes"]["t1"]["n_real"] == 50 and group["classes"]["t1"]["n_generated"] == 45
    for metric in M.DISTRIBUTION_METRICS:
        values = np.array([group["classes"][c][metric] for c in ("t0", "t1", "t2")])
        assert group["summary"][metric]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert group["summary"][metric]["sem"] == pytest.approx(values.std(ddof=1) / np.sqrt(3), rel=1e-12)
        assert group["summary"][metric]["n"] == 3
    assert "cell_type|batch" not in out["per_class"]  # joint groups only with >= 2 keys


def test_aggregate_replicates_by_hand():
    def replicate(w2_overall: float, w2_class_mean: float, f1: float) -> dict:
        overall = {m: 0.0 for m in M.DISTRIBUTION_METRICS} | {"w2": w2_overall, "n_real": 10, "n_generated": 10}
        summary = {m: {"mean": 0.0, "sem": None, "n": 2} for m in M.DISTRIBUTION_METRICS}
        summary["w2"] = {"mean": w2_class_mean, "sem": 0.1, "n": 2}
        return {
            "overall": overall,
            "labels": {"ct": {"knn_f1": f1}},
            "per_class": {"ct": {"summary": summary, "n_classes": 2, "classes": {}, "skipped": []}},
        }

    out = M.aggregate_replicates([replicate(1.0, 2.0, 0.5), replicate(2.0, 4.0, 0.7), replicate(3.0, 6.0, 0.9)])
    assert out["n_replicates"] == 3
    assert out["overall"]["w2"]["mean"] == pytest.approx(2.0)
    assert out["overall"]["w2"]["sem"] == pytest.approx(1.0 / np.sqrt(3))  # std(1,2,3) = 1
    assert out["per_class"]["ct"]["w2"]["mean"] == pytest.approx(4.0)
    assert out["per_class"]["ct"]["w2"]["sem"] == pytest.approx(2.0 / np.sqrt(3))
    assert out["labels"]["ct"]["knn_f1"]["values"] == [0.5, 0.7, 0.9]
    mismatched = replicate(1.0, 1.0, 1.0)
    mismatched["per_class"] = {}
    with pytest.raises(ValueError, match="replicate 1 has per_class entries"):
        M.aggregate_replicates([replicate(1.0, 2.0, 0.5), mismatched])


# ----------------------------------------------------------------------------------------------------------
# reconstruction metrics
# ----------------------------------------------------------------------------------------------------------
def test_reconstruction_perfect():
    truth = make_counts_adata(40, seed=3, n_genes=30).X
    out = M.reconstruction_metrics(truth, truth.copy(), truth.toarray(), np.full(40, 12.5), batch_size=16)
    assert out["re_nll_gene_sum_cell_mean"] == 12.5
    for pred in ("sample", "mean"):
        assert out[f"pcc_gene_batch16_{pred}"] == pytest.approx(1.0)
        assert out[f"pcc_gene_all_{pred}"] == pytest.approx(1.0)
        assert out[f"pcc_cell_{pred}"] == pytest.approx(1.0)
        assert out[f"mse_{pred}"] == 0.0


def test_reconstruction_tiny_example_by_hand():
    # 4 cells x 3 genes, every cell with total 1e4 so that log1p(1e4 x / sum x) = log1p(x).
    truth = np.array([[5000, 3000, 2000], [1000, 4000, 5000], [2000, 2000, 6000], [6000, 1000, 3000]], float)
    sample = np.array([[4000, 4000, 2000], [2000, 3000, 5000], [2000, 2000, 6000], [5000, 2000, 3000]], float)
    mean = truth.copy()
    out = M.reconstruction_metrics(truth, sample, mean, [1.0, 2.0, 3.0, 6.0], batch_size=2)
    lt, ls = np.log1p(truth), np.log1p(sample)
    assert out["mse_sample"] == pytest.approx(np.mean((lt - ls) ** 2), rel=1e-12)
    assert out["re_nll_gene_sum_cell_mean"] == 3.0

    def gene_pcc(a, b):  # per gene across rows, constant -> NaN, nanmean
        r = [
            np.corrcoef(a[:, g], b[:, g])[0, 1] if np.ptp(a[:, g]) and np.ptp(b[:, g]) else np.nan
            for g in range(a.shape[1])
        ]
        return np.nanmean(r)

    # batch [0,1]: all three genes vary; batch [2,3]: gene 1 is constant in the sample -> dropped
    batches = [gene_pcc(lt[:2], ls[:2]), gene_pcc(lt[2:], ls[2:])]
    assert out["pcc_gene_batch2_sample"] == pytest.approx(np.mean(batches), rel=1e-10)
    assert out["pcc_gene_all_sample"] == pytest.approx(gene_pcc(lt, ls), rel=1e-10)
    cells = [np.corrcoef(lt[i], ls[i])[0, 1] for i in range(4)]
    assert out["pcc_cell_sample"] == pytest.approx(np.mean(cells), rel=1e-10)
    # batches of 2 cells: any two distinct values are perfectly correlated or anti-correlated
    assert out["pcc_gene_batch2_mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sampled_counts has shape"):
        M.reconstruction_metrics(truth, sample[:3], mean, np.zeros(4))


# ----------------------------------------------------------------------------------------------------------
# MultiQC
# ----------------------------------------------------------------------------------------------------------
def test_to_mqc_tsv_header_and_table():
    real = make_counts_adata(200, seed=1)
    gen = make_counts_adata(200, seed=2)
    result = M.evaluate(real, gen, ["cell_type"], n_pcs=5)
    text = M.to_mqc_tsv(result, section_id="gen_metrics", section_name="Generation")
    lines = text.splitlines()
    assert lines[0] == "# id: 'gen_metrics'"
    assert lines[1] == "# section_name: 'Generation'"
    assert "# plot_type: 'table'" in lines
    table = pd.read_csv(io.StringIO(text), sep="\t", comment="#", index_col=0)
    assert list(table.index) == ["overall", "per-class mean: cell_type"]
    assert table.loc["overall", "w2"] == pytest.approx(result["overall"]["w2"], rel=1e-5)
    assert table.loc["per-class mean: cell_type", "knn_f1"] == pytest.approx(
        result["labels"]["cell_type"]["knn_f1"], rel=1e-5
    )
    flat = M.to_mqc_tsv({"mse_sample": 0.25, "n_cells": 4})
    assert flat.splitlines()[-2:] == ["Sample\tmse_sample\tn_cells", "metrics\t0.25\t4"]
