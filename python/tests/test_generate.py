"""Tests of SAMPLE (sclatent.generate) through the CLI on real models trained for a few steps on the bundled data:
seeded counts, the generated AnnData's contract, unseen labels, and the bf16 / fp32 precision of the DiT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
from tiny_models import cli_ok, run_cli, train_tiny_mixology

_cli, _ok = run_cli, cli_ok


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny VAE and DiT trained for 20 steps each on the bundled sc_mixology subset (~15 s)."""
    return train_tiny_mixology(tmp_path_factory.mktemp("generate"), vae_steps=20, prior_steps=20)


def _sample(models: dict[str, Path], out: Path, *extra: Any) -> ad.AnnData:
    _ok("sample", "--model", models["model"], "--out", out, "--device", "cpu", "--threads", 1, *extra)
    return ad.read_h5ad(out)


def test_sample_contract_and_seed(models, assert_integer_counts) -> None:
    d = models["dir"]
    req = ("--n-cells", 40, "--condition", "cell_line=H1975", "--batch-size", 16, "--precision", "fp32")
    a = _sample(models, d / "a.h5ad", *req, "--seed", 3)
    b = _sample(models, d / "b.h5ad", *req, "--seed", 3)
    c = _sample(models, d / "c.h5ad", *req, "--seed", 4)
    vocabulary = json.loads((models["vae"] / "config.json").read_text())["metadata"]["genes"]
    assert a.shape == (40, 300) and list(a.var_names) == vocabulary
    assert_integer_counts(a.X)
    assert (a.obs["cell_line"] == "H1975").all() and (a.obs["protocol"] == "none").all() and a.obs["generated"].all()
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0  # same seed -> same counts; another seed -> others
    assert a.uns["sclatent"]["precision"] == "fp32"


def test_unseen_label_is_a_clear_error(models) -> None:
    out = models["dir"] / "bad.h5ad"
    result = _cli(
        "sample",
        "--model",
        models["model"],
        "--out",
        out,
        "--n-cells",
        5,
        "--condition",
        "cell_line=HeLa",
        "--device",
        "cpu",
    )
    assert result.exit_code != 0
    assert (
        "cell_line=HeLa was never seen in training; known values of 'cell_line': A549, H1975, H2228, H838, HCC827"
        in result.output
    )
    assert not out.exists()


def test_bf16_precision_is_recorded_and_close_to_fp32(models) -> None:
    """--precision bf16 runs the DiT under bf16 autocast (native or emulated): the latents stay within bf16
    rounding of the fp32 run's, the counts are drawn from the same random stream, and the record says bf16."""
    d = models["dir"]
    req = ("--like", models["test"], "--seed", 0, "--keep-latents")
    fp32 = _sample(models, d / "fp32.h5ad", *req, "--precision", "fp32")
    bf16 = _sample(models, d / "bf16.h5ad", *req, "--precision", "bf16")
    assert bf16.uns["sclatent"]["precision"] == "bf16"
    z32, z16 = fp32.obsm["X_latent"], bf16.obsm["X_latent"]
    assert not np.array_equal(z32, z16)
    assert np.linalg.norm(z16 - z32) / np.linalg.norm(z32) < 0.02
    same = np.mean(fp32.X.toarray() == bf16.X.toarray())
    assert same > 0.9  # the same NB stream: nearly every (cell, gene) count is identical
    assert (
        _cli("sample", "--model", models["model"], "--out", d / "auto.h5ad", *req, "--precision", "auto").exit_code != 0
    )


def test_a_gene_subset_is_the_subset_of_a_full_generation(models) -> None:
    """--genes keeps the requested columns of a generation over every model gene: the NB means of a subset equal
    those of the full generation's columns (they used to be renormalised over the subset alone, inflating each
    mean by L / L_subset), and the sampled counts keep the subset's share of the library."""
    d = models["dir"]
    vocabulary = json.loads((models["vae"] / "config.json").read_text())["metadata"]["genes"]
    subset = vocabulary[10:30:2]
    req = ("--n-cells", 64, "--condition", "cell_line=A549", "--seed", 5)
    full = _sample(models, d / "full_mean.h5ad", *req, "--counts", "mean")
    part = _sample(models, d / "part_mean.h5ad", *req, "--counts", "mean", "--genes", ",".join(subset))
    assert list(part.var_names) == subset
    np.testing.assert_allclose(part.X.toarray(), full[:, subset].X.toarray(), rtol=1e-5, atol=1e-6)
    drawn = _sample(models, d / "part_sample.h5ad", *req, "--genes", ",".join(subset))
    expected = full[:, subset].X.toarray().sum()
    assert abs(drawn.X.sum() - expected) < 0.2 * expected  # counts sum to the subset's share, not to L
    result = _cli("sample", "--model", models["model"], "--out", d / "x.h5ad", *req, "--genes", "NOT_A_GENE")
    assert result.exit_code != 0 and "gene 'NOT_A_GENE' is not one of the model's 300 genes" in result.output


def test_training_precision_is_fp32_on_every_device_unless_asked(models) -> None:
    """No device-dependent arithmetic: both stages ran (and recorded) fp32, as they would on a GPU."""
    for stage in ("vae", "prior"):
        config = json.loads((models[stage] / "config.json").read_text())
        assert config["train_config"]["precision"] == config["precision_used"] == "fp32"


def test_unseen_choice_changes_only_never_seen_combinations(models) -> None:
    """--unseen analogy composes A549|Drop-seq (absent from the bundled data) from seen combinations; --unseen joint
    conditions on it as given. A seen combination is generated the same way by both."""
    out = {}
    for combo in ("cell_line=A549,protocol=Drop-seq", "cell_line=H1975,protocol=Drop-seq"):
        for unseen in ("analogy", "joint"):
            path = models["dir"] / f"{combo.replace(',', '_')}_{unseen}.h5ad"
            conditions = [a for kv in combo.split(",") for a in ("--condition", kv)]
            args = ["--n-cells", 20, *conditions, "--unseen", unseen, "--counts", "mean", "--device", "cpu"]
            _ok("sample", "--model", models["model"], "--out", path, *args, "--seed", 3)
            out[combo, unseen] = ad.read_h5ad(path).X.toarray()
    never, seen = "cell_line=A549,protocol=Drop-seq", "cell_line=H1975,protocol=Drop-seq"
    assert not np.array_equal(out[never, "analogy"], out[never, "joint"])  # a tiny model: labels move little
    np.testing.assert_array_equal(out[seen, "analogy"], out[seen, "joint"])


def test_unseen_cfg_scale_guides_only_never_seen_combinations(models) -> None:
    """--unseen-cfg-scale (default 2) is the guidance weight of a never-seen combination: changing it changes A549|
    Drop-seq (absent from the bundled data) and leaves a seen combination as it was; a negative weight is refused."""
    out = {}
    for combo in ("cell_line=A549,protocol=Drop-seq", "cell_line=H1975,protocol=Drop-seq"):
        for w in ("2", "1"):
            path = models["dir"] / f"{combo.replace(',', '_')}_w{w}.h5ad"
            conditions = [a for kv in combo.split(",") for a in ("--condition", kv)]
            args = ["--n-cells", 20, *conditions, "--counts", "mean", "--device", "cpu", "--seed", 3]
            if w != "2":  # 2 is the default
                args += ["--unseen-cfg-scale", w]
            _ok("sample", "--model", models["model"], "--out", path, *args)
            out[combo, w] = ad.read_h5ad(path).X.toarray()
    never, seen = "cell_line=A549,protocol=Drop-seq", "cell_line=H1975,protocol=Drop-seq"
    assert not np.array_equal(out[never, "2"], out[never, "1"])
    np.testing.assert_array_equal(out[seen, "2"], out[seen, "1"])
    bad = models["dir"] / "bad_w.h5ad"
    result = _cli("sample", "--model", models["model"], "--out", bad, "--n-cells", 5, "--unseen-cfg-scale", -1)
    assert result.exit_code != 0 and "--unseen-cfg-scale must be a finite number >= 0, got -1.0" in result.output
    assert not bad.exists()
