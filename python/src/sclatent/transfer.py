"""TRANSFER: counterfactual generation, i.e. real cells carried to other labels ("these cells, under condition B").

For each real cell (its counts and its own labels):

1. encode it with the VAE (posterior mean) and standardise the latent as the prior's training latents were;
2. integrate the prior's guided flow *backwards* under the cell's own labels, from its latent at t = 1 to the
   noise at t = 0 that this flow carries to it (`Sampler.integrate(backward=True)`, `flow.integrate`);
3. integrate forwards from that noise under the requested labels (the cell's labels with the `set` overrides),
   with the same guidance, sampler and weights;
4. undo the standardisation and decode with the cell's own library size (its total over the model genes).

Because the probability-flow ODE is deterministic, steps 2-3 under the cell's own labels return its latent up to
the ODE error (the round trip), and what the noise keeps of a cell (its position within its class) is carried over
to the new labels. Counts are NB draws (or NB means), seeded per batch like SAMPLE.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .checkpoint import Bundle, load_model
from .counts import counts_matrix
from .device import resolve_device
from .generate import NONE_LABEL, SampleConfig, Sampler, batch_seed, label_codes, unseen_combinations
from .io import InputError, atomic_path, provenance, read_h5ad
from .tokens import gene_index, memory_batches, tokens_of

log = logging.getLogger(__name__)

SOURCE_PREFIX = "source_"  # obs column of each condition key's original label in the output


def target_codes(
    codes: np.ndarray, overrides: Mapping[str, str], keys: Sequence[str], labels: Mapping[str, Sequence[str]]
) -> np.ndarray:
    """The cells' label codes (n, K) with the overridden keys set to the requested values (errors name the key)."""
    if not overrides:
        raise InputError("--set: give at least one key=value to change (e.g. --set condition=stimulated)")
    out = codes.copy()
    for key, value in overrides.items():
        if key not in keys:
            raise InputError(f"--set {key}={value}: '{key}' is not a condition key of the model ({', '.join(keys)})")
        if value not in labels[key]:
            raise InputError(
                f"--set {key}={value}: '{value}' was never seen in training; known values of '{key}': "
                f"{', '.join(labels[key])}"
            )
        out[:, list(keys).index(key)] = list(labels[key]).index(value)
    return out


def select_cells(obs: pd.DataFrame, where: Mapping[str, str], *, source: str) -> np.ndarray:
    """Boolean mask (n,) of the cells whose obs columns hold the `where` values (all of them); none is an error."""
    keep = np.ones(len(obs), dtype=bool)
    for key, value in where.items():
        if key not in obs.columns:
            raise InputError(f"{source}: --where {key}={value}: '{key}' is not an obs column")
        keep &= obs[key].astype(str).to_numpy() == value
    if where and not keep.any():
        raise InputError(f"{source}: no cell has {', '.join(f'{k}={v}' for k, v in where.items())}")
    return keep


class Transfer:
    """A trained model (VAE + DiT prior) that carries encoded cells from their labels to requested labels."""

    def __init__(self, bundle: Bundle, cfg: SampleConfig, device: torch.device) -> None:
        if cfg.prior != "ldm":
            raise InputError("transfer runs the DiT prior's flow; the Gaussian prior has no flow to invert")
        self.sampler = Sampler(bundle, cfg, device)
        self.cfg = cfg
        self.device = device

    @torch.no_grad()
    def latents(
        self, z: torch.Tensor, source: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Latents z (B, m, dl) of cells with labels `source` (B, K), carried to `target` (B, K): the new latents
        (B, m, dl), the noise (B, m, dl) the cells invert to, and the NFE of both integrations together."""
        b = self.sampler.bundle
        noise, nfe_back = self.sampler.integrate(source, (z - b.latent_mean) / b.latent_std, backward=True)
        x1, nfe_fwd = self.sampler.integrate(target, noise, base=source)
        return x1 * b.latent_std + b.latent_mean, noise, nfe_back + nfe_fwd

    @torch.no_grad()
    def run(
        self, shard: dict[str, np.ndarray], source: np.ndarray, target: np.ndarray, columns: torch.Tensor | None
    ) -> tuple[sp.csr_matrix, np.ndarray | None, dict[str, Any]]:
        """Counts (n, Q) of the cells of a token shard (`tokens_of`) carried from label codes `source` (n, K) to
        `target` (n, K), decoded with their own library sizes; the new latents (n, m * dl) when kept; timings."""
        cfg, vae = self.cfg, self.sampler.vae
        parts, lat, nfes = [], [], []
        for k, batch in enumerate(memory_batches(shard, cfg.batch_size, None)):
            rows = batch.cell_index
            t = batch.to_torch(self.device)
            z, _ = vae.encode(t["genes"], t["counts"], t["mask"])  # (B, m, dl) posterior means
            src = torch.as_tensor(source[rows], device=self.device)
            tgt = torch.as_tensor(target[rows], device=self.device)
            z_new, _, nfe = self.latents(z.float(), src, tgt)
            nfes.append(nfe)
            gen = torch.Generator(device=self.device).manual_seed(batch_seed(cfg.seed, cfg.replicate, k))
            library = t["library_size"].float().clamp_min(1.0)  # (B,) each cell's own total
            parts.append(self.sampler.decode(z_new, library, columns, gen))
            if cfg.keep_latents:
                lat.append(z_new.reshape(len(z_new), -1).float().cpu().numpy())
        n_out = len(self.sampler.genes) if columns is None else len(columns)
        X = sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, n_out), dtype=np.float32)
        info = {"nfe_per_batch": float(np.mean(nfes)) if nfes else 0.0, "n_batches": len(nfes)}
        return X.astype(np.float32), (np.concatenate(lat) if lat else None), info


def transferred_anndata(
    X: sp.csr_matrix,
    source: np.ndarray,
    target: np.ndarray,
    sampler: Sampler,
    genes: Sequence[str],
    cell_names: Sequence[str],
    latents: np.ndarray | None = None,
) -> ad.AnnData:
    """The transferred counts (n, Q) as an AnnData: obs holds each key's new label, its original label in
    `source_<key>`, the input cell's name (`reference_cell`), `generated`, `replicate` and `cell_index`."""
    obs = pd.DataFrame(index=[f"transfer{sampler.cfg.replicate}_{i}" for i in range(X.shape[0])])
    for j, key in enumerate(sampler.keys):
        cats = sampler.labels[key]
        obs[key] = pd.Categorical([cats[c] if c < len(cats) else NONE_LABEL for c in target[:, j]])
        obs[SOURCE_PREFIX + key] = pd.Categorical([cats[c] for c in source[:, j]])
    obs["reference_cell"] = list(map(str, cell_names))
    obs["generated"] = True
    obs["replicate"] = sampler.cfg.replicate
    obs["cell_index"] = np.arange(X.shape[0])
    out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(genes)))
    if latents is not None:
        out.obsm["X_latent"] = latents.astype(np.float32)
    return out


def transfer_adata(
    bundle: Bundle,
    adata: ad.AnnData,
    overrides: Mapping[str, str],
    cfg: SampleConfig,
    device: torch.device,
    *,
    layer: str = "X",
    gene_key: str | None = None,
    genes: Sequence[str] | None = None,
    source: str = "adata",
) -> tuple[ad.AnnData, dict[str, Any]]:
    """Carry every cell of `adata` (raw counts in `layer`, the condition keys in obs) to the labels `overrides`;
    returns the transferred AnnData and the run's facts (NFE, unseen target combinations)."""
    tr = Transfer(bundle, cfg, device)
    sampler = tr.sampler
    if adata.n_obs == 0:
        raise InputError(f"{source}: no cells to transfer")
    codes = label_codes(adata.obs, sampler.keys, sampler.labels, source=source)  # (n, K)
    target = target_codes(codes, overrides, sampler.keys, sampler.labels)  # (n, K)
    unseen = unseen_combinations(target, sampler.keys, sampler.labels, sampler.library_stats)
    for combo in unseen:
        log.warning(
            "the combination %s never occurred in training: transferring to it from the model's composition of "
            "the attributes",
            combo,
        )
    if gene_key is not None and gene_key not in adata.var.columns:
        raise InputError(f"{source}: gene_key '{gene_key}' is not a var column")
    names = adata.var_names if gene_key is None else adata.var[gene_key].astype(str)
    ids, _ = gene_index(names, sampler.genes, source=source)
    shard = tokens_of(counts_matrix(adata, layer, source=source), ids)
    empty = np.flatnonzero(shard["library_size"] == 0)
    if len(empty):
        raise InputError(
            f"{source}: cell '{adata.obs_names[empty[0]]}' has no counts in the model's genes ({len(empty)} such "
            "cells): it cannot be encoded"
        )
    X, latents, info = tr.run(shard, codes, target, sampler.gene_columns(genes))
    out = transferred_anndata(X, codes, target, sampler, genes or sampler.genes, adata.obs_names, latents)
    info["unseen_combinations"] = unseen
    return out, info


def run_transfer(
    model: str | Path,
    h5ad: str | Path,
    out: str | Path,
    overrides: Mapping[str, str],
    cfg: SampleConfig,
    *,
    where: Mapping[str, str] | None = None,
    layer: str = "X",
    genes: Sequence[str] | None = None,
    device: str = "auto",
) -> ad.AnnData:
    """`sclatent transfer`: read the cells (optionally only those matching `where`), transfer, write h5ad."""
    t0 = time.time()
    dev = resolve_device(device)
    bundle = load_model(model, map_location=dev)
    adata = read_h5ad(h5ad)
    keep = select_cells(adata.obs, where or {}, source=str(h5ad))
    if not keep.all():
        adata = adata[keep].copy()
    result, info = transfer_adata(bundle, adata, overrides, cfg, dev, layer=layer, genes=genes, source=str(h5ad))
    info["seconds"] = round(time.time() - t0, 3)
    config = {
        **asdict(cfg),
        "model": str(model),
        "h5ad": str(h5ad),
        "set": dict(overrides),
        "where": dict(where or {}),
        "layer": layer,
        "device": str(dev),
    }
    result.uns["sclatent"] = {
        "step": "transfer",
        "condition_keys": list(bundle.condition_keys),
        "set": [f"{k}={v}" for k, v in overrides.items()],
        "method": cfg.method,
        "guidance": cfg.guidance,
        "nfe_per_batch": float(info["nfe_per_batch"]),
        "unseen_combinations": list(info["unseen_combinations"]),
        "seconds": float(info["seconds"]),
        "provenance_json": json.dumps({**provenance("transfer", config), "transfer": info}),
    }
    with atomic_path(out) as tmp:
        result.write_h5ad(tmp)
    log.info(
        "transferred %d cells to %s in %.1fs (NFE per batch %.0f)",
        result.n_obs,
        ", ".join(f"{k}={v}" for k, v in overrides.items()),
        info["seconds"],
        info["nfe_per_batch"],
    )
    return result
