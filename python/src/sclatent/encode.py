"""ENCODE: latents of the training and test cells, and reconstruction metrics on the test cells.

- Latents are the posterior means mu (B, m, d_latent) (deterministic encoders: their output), in cell order.
- Reconstruction (paper Table 1; definitions in `metrics.reconstruction_metrics`): every test cell is encoded,
  decoded over all G model genes with its observed library size, and compared with the truth: RE (NB negative
  log-likelihood summed over genes, mean over cells) and PCC/MSE of one NB sample (and of the mean) on
  log1p(1e4 x / sum x). At most `max_cells` test cells (a seeded subset kept in file order) enter the
  reconstruction metrics, which bounds the (cells x genes) matrices held in memory; the count used is reported.

With `refine_steps` > 0 every stored latent (train and test) is first refined for its own cell's counts
(`refine.refine_latents`: Adam on the latent, decoder fixed, over all G genes); the reconstruction metrics are
then those of the refined latents, and the encoder's own are kept beside them as `metrics_amortised`.

Outputs: `latents.npz` (train_z, train_labels, train_library_size, train_cell_index, and the same for test)
with a `latents.json` sidecar (vocabulary, labels, VAE run, provenance), and `reconstruction.json`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .io import atomic_outputs, dump_json, provenance
from .metrics import reconstruction_metrics
from .nn.vae import encoded_chunks, seeded_subset
from .refine import refine_latents
from .tokens import TokenLoader, read_manifest
from .train_vae import check_vocabulary, load_vae, vocabulary_digest

log = logging.getLogger(__name__)


@torch.no_grad()
def _encode_split(model, loader: TokenLoader, device: torch.device) -> dict[str, np.ndarray]:
    zs, labels, libs, idx = [], [], [], []
    for batch in loader.iter_epoch(0):
        t = batch.to_torch(device)
        mu, _ = model.encode(t["genes"], t["counts"], t["mask"])  # (B, m, d_latent)
        zs.append(mu.float().cpu().numpy())
        labels.append(batch.labels)
        libs.append(batch.library_size)
        idx.append(batch.cell_index)
    order = np.argsort(np.concatenate(idx), kind="stable")
    return {
        "z": np.concatenate(zs)[order].astype(np.float32),
        "labels": np.concatenate(labels)[order],
        "library_size": np.concatenate(libs)[order],
        "cell_index": np.concatenate(idx)[order],
    }


def refine_split(
    model, loader: TokenLoader, device: torch.device, *, steps: int, lr: float, progress: bool = True
) -> tuple[np.ndarray, dict[str, float]]:
    """Refined latents of every cell of a split, in cell order.

    Returns (refined z (n, m, d_latent) float32, summary: the mean all-gene NLL per cell before and after).
    """
    from tqdm.auto import tqdm

    c = model.config
    out = np.empty((loader.n_cells, c.n_latent_tokens, c.d_latent), dtype=np.float32)
    before, after = [], []
    keep = np.ones(loader.n_cells, dtype=bool)
    with tqdm(total=loader.n_cells, desc=f"refine {loader.split}", unit="cells", disable=not progress, leave=False) as bar:
        for cells, z_enc, lib, target in encoded_chunks(model, loader.iter_epoch(0), keep, device):
            zr, n0, n1 = refine_latents(model, z_enc, lib, target, steps=steps, lr=lr)
            out[cells] = zr.float().cpu().numpy()
            before.append(n0.double().cpu().numpy())
            after.append(n1.double().cpu().numpy())
            bar.update(len(cells))
    before_mean, after_mean = float(np.concatenate(before).mean()), float(np.concatenate(after).mean())
    log.info("refined %d %s latents: all-gene NLL per cell %.1f -> %.1f", loader.n_cells, loader.split, before_mean, after_mean)
    return out, {"nll_encoder": round(before_mean, 4), "nll_refined": round(after_mean, 4)}


@torch.no_grad()
def reconstruct_split(
    model, loader: TokenLoader, n_genes: int, device: torch.device, *, max_cells: int, seed: int,
    latents: np.ndarray | None = None,
) -> dict[str, Any]:
    """Reconstruct (a file-ordered seeded subset of) a split over all genes; returns the metrics dict.

    latents: (n_cells, m, d_latent) in cell order to decode instead of the encoder's (e.g. refined ones).
    """
    n = loader.n_cells
    keep = seeded_subset(n, max_cells, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    genes = torch.arange(1, n_genes + 1, device=device)  # (G,)
    truth, sampled, means, nll, index = [], [], [], [], []
    for cells, z, lib, target in encoded_chunks(model, loader.iter_epoch(0), keep, device):
        if latents is not None:
            z = torch.from_numpy(latents[cells]).to(device=device, dtype=z.dtype)  # (c, m, d_latent)
        lik = model.decode(z, genes, lib)  # over (c, G)
        nll.append((-lik.log_prob(target)).sum(dim=1).double().cpu().numpy())
        sampled.append(sp.csr_matrix(lik.sample(gen).float().cpu().numpy()))
        means.append(lik.mean.float().cpu().numpy())
        truth.append(sp.csr_matrix(target.cpu().numpy()))
        index.append(cells)
    order = np.argsort(np.concatenate(index), kind="stable")  # file order
    metrics = reconstruction_metrics(
        sp.vstack(truth).tocsr()[order],
        sp.vstack(sampled).tocsr()[order],
        np.concatenate(means)[order],
        np.concatenate(nll)[order],
    )
    metrics["n_cells_total"] = int(n)
    metrics["subsampled"] = bool(n > max_cells)
    return metrics


def encode(
    vae_dir: str | Path,
    tokens_dir: str | Path,
    outdir: str | Path,
    *,
    batch_size: int = 256,
    max_cells: int = 10_000,
    seed: int = 0,
    device: str = "auto",
    weights: str = "auto",
    refine_steps: int = 0,
    refine_lr: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ENCODE; writes latents.npz, latents.json and reconstruction.json into `outdir`."""
    if refine_steps < 0:
        raise ValueError(f"--refine-steps must be >= 0, got {refine_steps}")
    if not refine_lr > 0:
        raise ValueError(f"--refine-lr must be > 0, got {refine_lr}")
    t0 = time.time()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model, cfg = load_vae(vae_dir, weights=weights, map_location=dev)
    model.to(dev)
    manifest = read_manifest(tokens_dir)
    check_vocabulary(cfg, manifest, what=str(tokens_dir))
    G = int(manifest["n_genes"])
    arrays: dict[str, np.ndarray] = {}
    recon: dict[str, Any] = {}
    recon_amortised: dict[str, Any] = {}
    refinement: dict[str, Any] = {"steps": refine_steps, "lr": refine_lr} if refine_steps else {}
    for split in ("train", "test"):
        if split not in manifest["splits"]:
            continue
        loader = TokenLoader(tokens_dir, split, batch_size=batch_size, shuffle=False, seed=seed)
        for k, v in _encode_split(model, loader, dev).items():
            arrays[f"{split}_{k}"] = v
        log.info("encoded %d %s cells", loader.n_cells, split)
        if refine_steps:
            t1 = time.time()
            arrays[f"{split}_z"], summary = refine_split(model, loader, dev, steps=refine_steps, lr=refine_lr, progress=progress)
            refinement[split] = {**summary, "elapsed_s": round(time.time() - t1, 3)}
        if split == "test":
            recon = reconstruct_split(model, loader, G, dev, max_cells=max_cells, seed=seed,
                                      latents=arrays["test_z"] if refine_steps else None)
            if refine_steps:
                recon_amortised = reconstruct_split(model, loader, G, dev, max_cells=max_cells, seed=seed)
    if not recon:
        log.warning("no test split in %s: reconstruction metrics skipped", tokens_dir)
    config = {"batch_size": batch_size, "max_cells": max_cells, "seed": seed, "weights": weights, "device": str(dev),
              "refine_steps": refine_steps, "refine_lr": refine_lr}
    sidecar = {
        "genes": manifest["genes"],
        "vocabulary_digest": vocabulary_digest(manifest["genes"]),
        "condition_keys": manifest["condition_keys"],
        "labels": manifest["labels"],
        "library_size": manifest["library_size"],
        "latent_shape": list(arrays["train_z"].shape[1:]),
        "vae": {"dir": str(vae_dir), "model_config": cfg["model_config"]},
        "provenance": provenance("encode", config, {"vae_checkpoint": Path(vae_dir) / "checkpoint.pt"}),
    }
    recon_doc = {
        "elapsed_s": round(time.time() - t0, 3),
        "metrics": recon,
        "latents": "refined" if refine_steps else "encoder",
        **({"metrics_amortised": recon_amortised, "refinement": refinement} if refine_steps else {}),
        "split": "test",
        "likelihood": cfg["model_config"]["likelihood"],
        "definitions": {
            "re_nll_gene_sum_cell_mean": "RE: NB negative log-likelihood summed over the model genes, mean over cells",
            "pcc_gene_batch256_*": "per-gene Pearson r across the cells of consecutive 256-cell batches (file order), nanmean over genes, mean over batches (the scLDM code's PCC)",
            "pcc_gene_all_*": "per-gene Pearson r across all evaluated cells, nanmean over genes",
            "pcc_cell_*": "per-cell Pearson r across genes, nanmean over cells",
            "mse_*": "mean squared error over cells x genes",
            "*_sample / *_mean": "one NB sample of the reconstruction / the NB mean; all on log1p(1e4 x / sum x)",
            "metrics / metrics_amortised": "of the stored latents (refined when refinement.steps > 0) / of the encoder's own latents",
        },
        "provenance": sidecar["provenance"],
    }
    outdir = Path(outdir)
    with atomic_outputs(outdir / "latents.npz", outdir / "latents.json", outdir / "reconstruction.json") as (tz, tj, tr):
        with open(tz, "wb") as fh:
            np.savez(fh, **arrays)
        dump_json(sidecar, tj)
        dump_json(recon_doc, tr)
    log.info("ENCODE done in %.1fs: RE %.1f, PCC(batch256, sample) %.3f",
             time.time() - t0, recon.get("re_nll_gene_sum_cell_mean", float("nan")), recon.get("pcc_gene_batch256_sample", float("nan")) or float("nan"))
    return recon_doc
