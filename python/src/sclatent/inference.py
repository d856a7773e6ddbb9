"""Running a trained VAE over token batches: latents in cell order, and reconstructions over every model gene."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .nn.vae import TransformerVAE
from .tokens import TokenBatch

# Cells decoded together on a CPU: a full decode makes (cells x genes x 88) intermediates in the decoder's MLP, and
# chunks of 16 cells keep them in cache. CUDA decodes a whole batch at once.
CPU_DECODE_CHUNK = 16


def decode_chunks(n: int, device: torch.device) -> list[slice]:
    """Row slices over a batch of `n` cells for decoding on `device` (the whole batch except on a CPU)."""
    step = CPU_DECODE_CHUNK if torch.device(device).type == "cpu" else max(n, 1)
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


@torch.no_grad()
def encode_batches(vae: TransformerVAE, batches: Iterable[TokenBatch], device: torch.device) -> dict[str, np.ndarray]:
    """Posterior means of every cell of `batches`, sorted by cell index: z (n, m, d_latent) float32, labels (n, K),
    library_size (n,), cell_index (n,)."""
    zs, labels, libs, idx = [], [], [], []
    for batch in batches:
        t = batch.to_torch(device)
        mu, _ = vae.encode(t["genes"], t["counts"], t["mask"])  # (B, m, d_latent)
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


@torch.no_grad()
def encoded_chunks(
    vae: TransformerVAE, batches: Iterable[TokenBatch], keep: np.ndarray, device: torch.device
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Encode the kept cells (`keep` (n,) bool by cell index) and yield them in `decode_chunks` pieces:
    (cell_index (c,), z (c, m, d_latent), library_size (c,), dense counts over every model gene (c, G))."""
    G = vae.config.n_genes
    for batch in batches:
        rows = np.flatnonzero(keep[batch.cell_index])
        if len(rows) == 0:
            continue
        t = batch.to_torch(device, dense_target=G)
        sel = torch.from_numpy(rows).to(device)
        z, _ = vae.encode(t["genes"][sel], t["counts"][sel], t["mask"][sel])  # (b, m, d_latent)
        lib, target, index = t["library_size"][sel], t["target"][sel], batch.cell_index[rows]
        for c in decode_chunks(len(z), device):
            yield index[c], z[c], lib[c], target[c]


@torch.no_grad()
def reconstruct_batches(
    vae: TransformerVAE, batches: Iterable[TokenBatch], keep: np.ndarray, device: torch.device, seed: int
) -> dict[str, Any]:
    """Decode the kept cells over all G genes with their observed library sizes, in cell order: truth, one sample
    (CSR (n, G)), the mean (n, G) and the negative log-likelihood summed over genes (n,), plus cell_index (n,)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    genes = torch.arange(1, vae.config.n_genes + 1, device=device)  # (G,)
    truth, sampled, means, nll, index = [], [], [], [], []
    for cells, z, lib, target in encoded_chunks(vae, batches, keep, device):
        lik = vae.decode(z, genes, lib)  # over (c, G)
        nll.append((-lik.log_prob(target)).sum(dim=1).double().cpu().numpy())
        sampled.append(sp.csr_matrix(lik.sample(gen).float().cpu().numpy()))
        means.append(lik.mean.float().cpu().numpy())
        truth.append(sp.csr_matrix(target.cpu().numpy()))
        index.append(cells)
    order = np.argsort(np.concatenate(index), kind="stable")
    return {
        "truth": sp.vstack(truth).tocsr()[order],
        "sample": sp.vstack(sampled).tocsr()[order],
        "mean": np.concatenate(means)[order],
        "nll": np.concatenate(nll)[order],
        "cell_index": np.concatenate(index)[order],
    }
