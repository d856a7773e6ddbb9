"""Tests of TRANSFER (sclatent.transfer): counterfactual cells from a real model trained for a few steps on the bundled
data: the round trip under the cells' own labels, the output contract, own library sizes, seeds, the Python API
and the one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest
import torch
from tiny_models import cli_ok, run_cli, train_tiny_mixology

from sclatent.api import Model
from sclatent.checkpoint import load_model
from sclatent.counts import counts_matrix
from sclatent.errors import InputError
from sclatent.generate import SampleConfig, label_codes
from sclatent.tokens import gene_index, memory_batches, tokens_of
from sclatent.transfer import Transfer

_cli, _ok = run_cli, cli_ok


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    """A tiny VAE (40 steps) and DiT (150 steps) trained on the bundled sc_mixology subset (~20 s)."""
    return train_tiny_mixology(tmp_path_factory.mktemp("transfer"), vae_steps=40, prior_steps=150)


def _encoded(model: dict[str, Path]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    bundle = load_model(model["model"])
    cells = ad.read_h5ad(model["test"])
    ids, _ = gene_index(cells.var_names, bundle.genes, source="test")
    batch = next(memory_batches(tokens_of(counts_matrix(cells, "X", source="test"), ids), 1024, None))
    t = batch.to_torch("cpu")
    with torch.no_grad():
        z, _ = bundle.vae.encode(t["genes"], t["counts"], t["mask"])  # (n, m, dl)
    codes = torch.as_tensor(label_codes(cells.obs, bundle.condition_keys, bundle.labels, source="test"))
    return bundle, z, codes


@pytest.mark.parametrize(
    "method, n_steps, tol, guidance, w",
    [
        ("euler", 64, 0.05, "joint", 1.0),
        ("heun", 8, 0.01, "joint", 1.0),
        ("heun", 16, 0.002, "joint", 1.0),
        ("dopri5", None, 0.001, "joint", 1.0),
        ("heun", 8, 0.01, "joint", 2.0),
        ("heun", 8, 0.01, "additive", 1.0),
        ("dopri5", None, 0.001, "additive", 1.0),
    ],
)
def test_round_trip_under_own_labels_returns_the_latents(model, method, n_steps, tol, guidance, w) -> None:
    """Invert each cell's latent under its labels, regenerate under the same labels: the latents come back (relative
    error in the prior's standardised space); the noise in between is a different point."""
    bundle, z, codes = _encoded(model)
    cfg = SampleConfig(method=method, n_steps=n_steps or 1, guidance=guidance, cfg_scale=w)
    back, noise, nfe = Transfer(bundle, cfg, torch.device("cpu")).latents(z, codes, codes)
    zs = (z - bundle.latent_mean) / bundle.latent_std
    err = float(((back - bundle.latent_mean) / bundle.latent_std - zs).norm() / zs.norm())
    assert err < tol, (method, n_steps, guidance, w, err)
    assert float((noise - zs).norm() / zs.norm()) > 0.3 and nfe > 0


def test_other_labels_move_the_latents(model) -> None:
    bundle, z, codes = _encoded(model)
    target = codes.clone()
    target[:, 1] = 1 - target[:, 1]  # the other protocol
    cfg = SampleConfig(method="heun", n_steps=8)
    moved, _, _ = Transfer(bundle, cfg, torch.device("cpu")).latents(z, codes, target)
    same, _, _ = Transfer(bundle, cfg, torch.device("cpu")).latents(z, codes, codes)
    assert float((moved - same).norm() / (same - z).norm()) > 3  # beyond the round trip's error


def test_transfer_cli_contract_library_sizes_and_seed(model, assert_integer_counts) -> None:
    d = model["dir"]
    args = ("transfer", "--model", model["model"], "--h5ad", model["test"], "--set", "protocol=Drop-seq")
    _ok(*args, "--where", "cell_line=H1975", "--out", d / "a.h5ad", "--seed", 1)
    _ok(*args, "--where", "cell_line=H1975", "--out", d / "b.h5ad", "--seed", 1)
    _ok(*args, "--where", "cell_line=H1975", "--out", d / "c.h5ad", "--seed", 2)
    _ok(*args, "--where", "cell_line=H1975", "--out", d / "m.h5ad", "--counts", "mean", "--keep-latents")
    a, b, c, m = (ad.read_h5ad(d / f"{x}.h5ad") for x in "abcm")
    real = ad.read_h5ad(model["test"])
    real = real[real.obs["cell_line"].astype(str) == "H1975"]
    bundle = load_model(model["model"])
    assert a.shape == (real.n_obs, len(bundle.genes)) and list(a.var_names) == bundle.genes
    assert_integer_counts(a.X)
    assert (a.obs["protocol"] == "Drop-seq").all() and (a.obs["cell_line"] == "H1975").all()
    assert list(a.obs["source_protocol"].astype(str)) == list(real.obs["protocol"].astype(str))
    assert list(a.obs["reference_cell"]) == list(real.obs_names)
    assert (a.X != b.X).nnz == 0 and (a.X != c.X).nnz > 0  # same seed -> same counts
    # NB means decoded with each cell's own library size: they sum to its total over the model genes
    own = np.asarray(real[:, bundle.genes].X.sum(axis=1)).ravel()
    np.testing.assert_allclose(np.asarray(m.X.sum(axis=1)).ravel(), own, rtol=1e-4)
    vc = bundle.vae.config
    assert m.obsm["X_latent"].shape == (real.n_obs, vc.n_latent_tokens * vc.d_latent)
    assert a.uns["sclatent"]["step"] == "transfer" and a.uns["sclatent"]["set"] == ["protocol=Drop-seq"]


def test_api_transfer_matches_the_cli(model) -> None:
    d = model["dir"]
    _ok(
        "transfer", "--model", model["model"], "--h5ad", model["test"], "--set", "cell_line=A549", "--out", d / "x.h5ad"
    )
    cli = ad.read_h5ad(d / "x.h5ad")
    api = Model.load(model["model"], device="cpu").transfer(ad.read_h5ad(model["test"]), set={"cell_line": "A549"})
    assert (cli.X != api.X).nnz == 0
    assert (api.obs["cell_line"] == "A549").all()
    assert list(api.obs["source_cell_line"].astype(str)) == list(ad.read_h5ad(model["test"]).obs["cell_line"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--set", "tissue=lung"), "'tissue' is not a condition key of the model (cell_line, protocol)"),
        (("--set", "protocol=10x"), "'10x' was never seen in training; known values of 'protocol': CEL-seq2, Drop-seq"),
        (("--set", "protocol"), "--set 'protocol': expected key=value"),
        (("--set", "protocol=Drop-seq", "--where", "cell_line=HeLa"), "no cell has cell_line=HeLa"),
        (("--set", "protocol=Drop-seq", "--where", "donor=1"), "'donor' is not an obs column"),
    ],
)
def test_bad_requests_are_one_line_errors_without_output(model, extra, message) -> None:
    out = model["dir"] / "bad.h5ad"
    result = _cli("transfer", "--model", model["model"], "--h5ad", model["test"], "--out", out, *extra)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cells_without_labels_or_counts_are_refused(model) -> None:
    cells = ad.read_h5ad(model["test"])
    api = Model.load(model["model"], device="cpu")
    unlabelled = ad.AnnData(X=cells.X, obs=cells.obs[["cell_line"]], var=cells.var)
    with pytest.raises(InputError, match="condition key 'protocol' is not an obs column"):
        api.transfer(unlabelled, set={"cell_line": "A549"})
    X = cells.X.tolil()
    X[0, :] = 0
    empty = ad.AnnData(X=X.tocsr(), obs=cells.obs, var=cells.var)
    with pytest.raises(InputError, match="has no counts in the model's genes"):
        api.transfer(empty, set={"cell_line": "A549"})
