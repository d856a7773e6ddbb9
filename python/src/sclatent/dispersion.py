"""Dispersion refit: the per-gene NB inverse dispersions theta_g by maximum likelihood, after training.

Why: the per-gene log theta table is one scalar per gene whose gradient is noisy from batch to batch, so AdamW
moves it far less than its learning rate allows. After 1,200 steps of the default VAE the table still sat near its
initial log theta = 1 (pbmc3k: median 0.84, 5-95% 0.68-0.93), while the maximum-likelihood values given the
trained means spread over -5..0.4 (median -1.8). train-vae therefore gives the table 10x the learning rate by
default (`--theta-lr-scale`); this module is the other remedy, an option: the table is refit once, at the end,
with every other weight fixed: each gene's theta maximises sum_cells log NB(x_cg | mu_cg, theta_g) over (a seeded
subset of) the training cells, mu_cg the trained model's decoded means. The objective is separable in the genes,
so a block of genes' log theta is that many independent one-dimensional problems, solved together by Newton's
method with autograd's exact derivatives (a shared L-BFGS over a block of genes took about 100 iterations to
converge, since the genes' curvatures differ by orders of magnitude; per-gene Newton steps take about ten).

A gene's NLL never rises (a step is accepted only where it falls), and theta is kept inside [1e-4, 1e6], the
range the likelihoods are tested on. A gene with only zeros in the fitted cells goes to theta = 1e-4: the NB
probability of a zero, (theta / (theta + mu))^theta, rises as theta falls.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from .nn.likelihoods import NegativeBinomial, ZeroInflatedNegativeBinomial
from .nn.vae import TransformerVAE, encoded_chunks, seeded_subset
from .tokens import TokenLoader

log = logging.getLogger(__name__)

LOG_THETA_MIN, LOG_THETA_MAX = math.log(1e-4), math.log(1e6)
# Decoded (cell, gene) entries held for the fit: 2e7 float32 log-means (80 MB) = 10,000 cells of 2,000 genes or
# 1,000 of 20,000 (at least MIN_CELLS cells whatever the gene count).
MAX_ENTRIES = 20_000_000
MIN_CELLS = 256
GENE_BLOCK = 256  # genes per Newton block (bounds the float64 temporaries to cells x 256)


def refit_cells(n_cells: int, n_genes: int, *, max_entries: int = MAX_ENTRIES) -> int:
    """How many training cells the refit decodes: all of them, or as many as `max_entries` allows."""
    return int(min(n_cells, max(MIN_CELLS, max_entries // max(n_genes, 1))))


@torch.no_grad()
def _decoded_training_cells(
    model: TransformerVAE, loader: TokenLoader, keep: np.ndarray, device: torch.device
) -> dict[str, torch.Tensor]:
    """(M, G) float32 on the CPU: counts, log means and (zinb) zero-inflation logits of the kept cells."""
    genes = torch.arange(1, model.config.n_genes + 1, device=device)  # (G,)
    counts, log_mu, zi = [], [], []
    for _cells, z, lib, target in encoded_chunks(model, loader.iter_epoch(0), keep, device):
        params = model.decode_parameters(z, genes)
        lik = model.likelihood(params, lib)
        nb = lik.nb if isinstance(lik, ZeroInflatedNegativeBinomial) else lik
        log_mu.append(nb.log_mu.float().cpu())
        counts.append(target.float().cpu())
        if "zi_logits" in params:
            zi.append(params["zi_logits"].float().cpu())
    out = {"counts": torch.cat(counts), "log_mu": torch.cat(log_mu)}  # (M, G) each
    if zi:
        out["zi_logits"] = torch.cat(zi)
    return out


def _gene_nll(data: dict[str, torch.Tensor], cols: slice, log_theta: torch.Tensor) -> torch.Tensor:
    """(g,) NLL summed over cells of the genes in `cols` at log theta (g,), in float64."""
    x = data["counts"][:, cols].double()
    log_mu = data["log_mu"][:, cols].double()
    lt = log_theta[None, :].expand_as(log_mu)
    if "zi_logits" in data:
        lik = ZeroInflatedNegativeBinomial.from_log(log_mu, lt, data["zi_logits"][:, cols].double())
    else:
        lik = NegativeBinomial.from_log(log_mu, lt)
    return -lik.log_prob(x).sum(dim=0)


@torch.no_grad()
def _total_nll(data: dict[str, torch.Tensor], log_theta: torch.Tensor) -> float:
    """NLL summed over every cell and gene at log theta (G,), in blocks of GENE_BLOCK genes."""
    G = data["counts"].shape[1]
    return float(sum(_gene_nll(data, slice(a, min(a + GENE_BLOCK, G)), log_theta[a:a + GENE_BLOCK]).sum()
                     for a in range(0, G, GENE_BLOCK)))


def fit_log_theta(data: dict[str, torch.Tensor], start: torch.Tensor, *, max_iter: int = 25) -> torch.Tensor:
    """(G,) maximum-likelihood log theta per gene given fixed means, starting from `start` (G,).

    Newton's method on each gene's own one-dimensional problem, all genes of a block at once: the objective is
    separable, so autograd's gradient of the summed NLL is every gene's own derivative, and the gradient of
    that gradient's sum is the Hessian's diagonal (its only non-zero part). A step is at most 1 in log theta,
    goes downhill where the curvature is not positive, and is halved (per gene) until the gene's NLL falls.
    """
    G = start.numel()
    out = start.detach().double().clone().clamp(LOG_THETA_MIN, LOG_THETA_MAX)
    for a in range(0, G, GENE_BLOCK):
        cols = slice(a, min(a + GENE_BLOCK, G))
        lt = out[cols].clone()
        with torch.no_grad():
            f = _gene_nll(data, cols, lt)  # (g,)
        for _ in range(max_iter):
            x = lt.clone().requires_grad_(True)
            grad, = torch.autograd.grad(_gene_nll(data, cols, x).sum(), x, create_graph=True)  # (g,)
            hess, = torch.autograd.grad(grad.sum(), x)  # (g,) the diagonal
            grad = grad.detach()
            step = torch.where(hess > 0, -grad / hess.clamp_min(1e-12), -torch.sign(grad)).clamp(-1.0, 1.0)
            step = (lt + step).clamp(LOG_THETA_MIN, LOG_THETA_MAX) - lt  # a gene at a bound stays there
            converged = (grad * step).abs() < 1e-6  # the predicted gain, in nats: nothing left to take
            if bool(converged.all()):
                break
            done = converged.clone()
            with torch.no_grad():
                for _halving in range(12):
                    trial = (lt + step).clamp(LOG_THETA_MIN, LOG_THETA_MAX)
                    f_trial = _gene_nll(data, cols, trial)
                    ok = (f_trial < f) & ~done
                    lt = torch.where(ok, trial, lt)
                    f = torch.where(ok, f_trial, f)
                    done |= ok
                    if bool(done.all()):
                        break
                    step = step / 2
            if not bool((done & ~converged).any()):
                break  # no gene could improve
        out[cols] = lt
    return out


def refit_dispersion(
    model: TransformerVAE, tokens_dir: str, *, seed: int, device: torch.device, max_entries: int = MAX_ENTRIES
) -> dict[str, Any]:
    """Refit `model.log_theta` in place on the training split of `tokens_dir`; returns what it did.

    The returned dict (for config.json): cells and genes used, the training cells' mean NLL (summed over
    genes) before and after, and the quantiles of log theta before and after.
    """
    if not hasattr(model, "log_theta"):
        raise ValueError(f"the {model.config.likelihood!r} likelihood has no per-gene dispersion table to refit")
    G = model.config.n_genes
    loader = TokenLoader(tokens_dir, "train", batch_size=256, shuffle=False, seed=seed)
    n = loader.n_cells
    m = refit_cells(n, G, max_entries=max_entries)
    keep = seeded_subset(n, m, seed)
    was_training = model.training
    model.eval()
    data = _decoded_training_cells(model, loader, keep, device)
    model.train(was_training)
    old = model.log_theta.weight[1:, 0].detach().double().cpu()  # (G,)
    nll_before = _total_nll(data, old)
    new = fit_log_theta(data, old)
    nll_after = _total_nll(data, new)
    with torch.no_grad():
        model.log_theta.weight[1:, 0] = new.to(model.log_theta.weight)
    q = [0.05, 0.5, 0.95]
    report = {
        "cells": int(m),
        "genes": int(G),
        "train_nll_before": round(nll_before / m, 4),
        "train_nll_after": round(nll_after / m, 4),
        "log_theta_quantiles": q,
        "log_theta_before": [round(float(v), 4) for v in np.quantile(old.numpy(), q)],
        "log_theta_after": [round(float(v), 4) for v in np.quantile(new.numpy(), q)],
    }
    log.info(
        "dispersion refit on %d training cells: NLL per cell %.2f -> %.2f; median log theta %.2f -> %.2f",
        m, report["train_nll_before"], report["train_nll_after"], report["log_theta_before"][1],
        report["log_theta_after"][1],
    )
    return report
