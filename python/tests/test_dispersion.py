"""Tests for sclatent.dispersion: the per-gene NB dispersion refit after training (CPU, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sclatent.dispersion import LOG_THETA_MIN, _gene_nll, fit_log_theta, refit_cells
from sclatent.nn.likelihoods import NegativeBinomial


def simulated(n_cells: int = 3000, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Counts drawn from NB(mu, theta_g) with known per-gene log theta spread over -3..3 (G = 7 + 1 all-zero gene)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.linspace(-3.0, 3.0, 7, dtype=torch.float64)  # (7,)
    log_mu = (torch.randn(n_cells, 7, generator=g, dtype=torch.float64) * 0.7 + 1.0)  # (N, 7)
    x = NegativeBinomial.from_log(log_mu, true[None, :].expand_as(log_mu)).sample(g)  # (N, 7)
    zero_mu = torch.full((n_cells, 1), -3.0, dtype=torch.float64)  # a gene never seen expressed
    data = {"counts": torch.cat([x, torch.zeros(n_cells, 1, dtype=torch.float64)], 1).float(),
            "log_mu": torch.cat([log_mu, zero_mu], 1).float()}
    return data, true


def test_fit_recovers_known_dispersions_and_never_raises_a_genes_nll() -> None:
    """From a flat start (log theta = 1, the VAE's initial value) the fit lands within sampling error of every
    gene's true log theta, lowers each gene's NLL, and sends an all-zero gene to the lower end of the range."""
    data, true = simulated()
    start = torch.ones(8, dtype=torch.float64)
    fitted = fit_log_theta(data, start)
    torch.testing.assert_close(fitted[:7], true, atol=0.25, rtol=0)  # large theta is the hardest to pin down
    before = _gene_nll(data, slice(0, 8), start)
    after = _gene_nll(data, slice(0, 8), fitted)
    assert torch.all(after <= before)
    assert after[:7].sum() < before[:7].sum() - 100  # a real gain, not a tie
    assert fitted[7] == pytest.approx(LOG_THETA_MIN)  # zeros only: P(0) = (theta / (theta + mu))^theta rises as theta falls
    # already at the optimum: the fit keeps it (no gene gets worse)
    again = fit_log_theta(data, fitted)
    assert torch.all(_gene_nll(data, slice(0, 8), again) <= after + 1e-6)


def test_refit_cells_bounds_the_decoded_matrix() -> None:
    assert refit_cells(2160, 2000) == 2160  # small data: every training cell
    assert refit_cells(1_000_000, 20_000) == 1000  # 2e7 entries
    assert refit_cells(1_000_000, 10_000_000) == 256  # never fewer than 256 cells


def _tokens(tmp_path: Path) -> Path:
    from sclatent.synthetic import synthetic_counts
    from sclatent.tokens import tokenize

    adata = synthetic_counts(n_cells=60, n_genes=24, seed=5)
    adata.var["highly_variable"] = True
    adata.write_h5ad(tmp_path / "train.h5ad")
    tokenize(tmp_path / "train.h5ad", tmp_path / "tok", progress=False)
    return tmp_path / "tok"


def test_train_vae_refits_the_dispersions_at_the_end_when_asked(tmp_path: Path) -> None:
    """train-vae --refit-dispersion refits log theta after its last step (nb): the checkpoint holds the refit table,
    config.json the training cells' NLL before and after (after <= before); without the flag (the default) the
    trained table stays, and it is the refit run's table before the refit (same seed), every other weight equal;
    a likelihood without the table has no refit."""
    from click.testing import CliRunner

    from sclatent.cli import main
    from sclatent.train import load_checkpoint

    tok = _tokens(tmp_path)
    common = ["-q", "train-vae", "--tokens", str(tok), "--max-steps", "5", "--device", "cpu", "--no-progress",
              "--preset", "tiny", "--batch-size", "20"]
    runner = CliRunner()
    res = runner.invoke(main, [*common, "--outdir", str(tmp_path / "refit"), "--refit-dispersion"])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "refit" / "config.json").read_text())
    report = config["metadata"]["dispersion_refit"]
    assert report["after_step"] == 5 and report["model"]["cells"] == 60 and report["model"]["genes"] == 24
    assert report["model"]["train_nll_after"] <= report["model"]["train_nll_before"]
    assert config["metadata"]["run"]["refit_dispersion"] is True
    refit = load_checkpoint(tmp_path / "refit" / "checkpoint.pt")["model"]
    q = report["model"]["log_theta_after"]
    lt = refit["log_theta.weight"][1:, 0].double()
    assert torch.quantile(lt, 0.5).item() == pytest.approx(q[1], abs=1e-3)

    res = runner.invoke(main, [*common, "--outdir", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "dispersion_refit" not in config["metadata"] and config["metadata"]["run"]["refit_dispersion"] is False
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    trained = plain["log_theta.weight"][1:, 0].double()
    assert torch.quantile(trained, 0.5).item() == pytest.approx(report["model"]["log_theta_before"][1], abs=1e-3)
    assert not torch.equal(trained, lt)
    assert all(torch.equal(plain[k], refit[k]) for k in plain if k != "log_theta.weight")  # nothing else moves

    res = runner.invoke(main, [*common, "--outdir", str(tmp_path / "pois"), "--likelihood", "poisson",
                               "--refit-dispersion"])
    assert res.exit_code == 0, res.output
    assert "dispersion_refit" not in json.loads((tmp_path / "pois" / "config.json").read_text())["metadata"]


def test_refit_keeps_the_ema_weights_apart(tmp_path: Path) -> None:
    """With an EMA the refit fits each set of weights' own table; the EMA's is what ENCODE loads by default."""
    from click.testing import CliRunner

    from sclatent.cli import main
    from sclatent.train import load_checkpoint
    from sclatent.train_vae import load_vae

    tok = _tokens(tmp_path)
    res = CliRunner().invoke(main, ["-q", "train-vae", "--tokens", str(tok), "--max-steps", "5", "--device", "cpu",
                                    "--no-progress", "--preset", "tiny", "--batch-size", "20", "--ema-decay", "0.9",
                                    "--refit-dispersion",
                                    "--outdir", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "run" / "config.json").read_text())["metadata"]["dispersion_refit"]
    assert set(report) == {"after_step", "ema", "model"}
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert not torch.equal(ckpt["ema"]["log_theta.weight"], ckpt["model"]["log_theta.weight"])
    model, _ = load_vae(tmp_path / "run")  # auto: the EMA weights
    torch.testing.assert_close(model.log_theta.weight, ckpt["ema"]["log_theta.weight"])
    assert math.isfinite(report["ema"]["train_nll_after"])
