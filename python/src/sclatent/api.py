"""The Python API: a trained model you load, embed AnnData with, reconstruct with and sample from.

import sclatent
model = sclatent.Model.load("results/pbmc/model")          # a model bundle (model.pt) or its folder
model.embed(adata)                                           # adata.obsm["X_sclatent"]
model.embed_file("query.h5ad", "query_embedded.h5ad", gene_key="gene_ids")   # any panel, large files
cells = model.sample(n=500, conditions={"cell_type": "B"}, cfg_scale=2.0)   # an AnnData of counts
stim = model.transfer(adata, set={"condition": "stimulated"})                # the same cells under other labels
model = sclatent.Model.train(adata, condition_keys=["cell_type"])           # or train one from an AnnData
tuned = sclatent.Model.train(new, condition_keys=["cell_type"], init_from=model)   # or fine-tune one
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from . import __version__
from .checkpoint import Bundle, bundle_from_runs, load_model
from .counts import counts_matrix
from .device import resolve_device
from .embed import EMBEDDING_KEY, embed_counts, embed_h5ad, embedding_uns
from .errors import InputError
from .generate import SampleConfig, Sampler, generated_anndata, label_codes, request_codes
from .tokens import gene_index, memory_batches, tokens_of
from .train import TrainConfig
from .train_prior import PriorTraining
from .train_vae import VAETraining

log = logging.getLogger(__name__)


class Model:
    """A trained sclatent model: the exchangeable VAE, its DiT prior (when trained) and their vocabularies."""

    def __init__(self, bundle: Bundle, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.bundle = bundle.to(self.device)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> Model:
        """Load a model bundle (`model.pt`, or the folder holding it, e.g. `results/<dataset>/model`)."""
        return cls(load_model(path, map_location="cpu"), device=device)

    def save(self, path: str | Path) -> Path:
        """Write the model as one bundle file (a folder gets `model.pt`); returns its path."""
        return self.bundle.save(path)

    @property
    def genes(self) -> list[str]:
        """The gene vocabulary, in the model's order."""
        return list(self.bundle.genes)

    @property
    def condition_keys(self) -> list[str]:
        """The obs columns the prior is conditioned on."""
        return list(self.bundle.condition_keys)

    @property
    def labels(self) -> dict[str, list[str]]:
        """The known values of each condition key."""
        return {k: list(v) for k, v in self.bundle.labels.items()}

    def __repr__(self) -> str:
        c = self.bundle.vae.config
        prior = "DiT prior" if self.bundle.prior is not None else "no prior"
        return (
            f"sclatent.Model({len(self.genes)} genes, latent {c.n_latent_tokens}x{c.d_latent}, {prior}, "
            f"condition keys {self.condition_keys}, device {self.device})"
        )

    # ---------------------------------------------------------------------------------------------- VAE
    def _tokens(self, adata: ad.AnnData, layer: str, gene_key: str | None) -> tuple[dict[str, np.ndarray], dict]:
        if gene_key is not None and gene_key not in adata.var.columns:
            raise InputError(f"gene_key '{gene_key}' is not a var column (var has: {', '.join(adata.var.columns)})")
        names = adata.var_names if gene_key is None else adata.var[gene_key].astype(str)
        ids, panel = gene_index(names, self.genes, source="adata")
        return tokens_of(counts_matrix(adata, layer, source="adata"), ids), panel

    @torch.no_grad()
    def embed(
        self,
        adata: ad.AnnData,
        *,
        layer: str = "X",
        gene_key: str | None = None,
        key: str = EMBEDDING_KEY,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Latent representation of every cell of `adata` (raw counts in `layer`), flattened to (n, m * d_latent),
        stored in `adata.obsm[key]` with the model's provenance in `adata.uns[key]`.

        Genes are matched to the vocabulary by var_names or by the var column `gene_key` (e.g. Ensembl ids); genes
        outside it are ignored, vocabulary genes missing from the panel are simply absent from the cells' tokens.
        """
        if gene_key is not None and gene_key not in adata.var.columns:
            raise InputError(f"gene_key '{gene_key}' is not a var column (var has: {', '.join(adata.var.columns)})")
        names = adata.var_names if gene_key is None else adata.var[gene_key].astype(str)
        col_to_id, panel = gene_index(names, self.genes, source="adata")
        X = counts_matrix(adata, layer, source="adata")
        z = embed_counts(self.bundle, X, col_to_id, self.device, batch_size)  # (n, m * d_latent)
        adata.obsm[key] = z
        config = {"layer": layer, "gene_key": gene_key, "key": key, "batch_size": batch_size}
        adata.uns[key] = embedding_uns(self.bundle, panel, config)
        return z

    def embed_file(
        self,
        h5ad: str | Path,
        out: str | Path,
        *,
        layer: str = "X",
        gene_key: str | None = None,
        key: str = EMBEDDING_KEY,
        batch_size: int = 256,
        chunk_size: int = 8192,
    ) -> dict[str, Any]:
        """Write `out`: the AnnData file `h5ad` with obsm[key] and uns[key], read and written in row chunks (memory
        bounded by `chunk_size` cells); the input file is not modified. Returns uns[key]."""
        return embed_h5ad(
            self.bundle,
            h5ad,
            out,
            layer=layer,
            gene_key=gene_key,
            key=key,
            batch_size=batch_size,
            chunk_size=chunk_size,
            device=str(self.device),
        )

    @torch.no_grad()
    def reconstruct(
        self, adata: ad.AnnData, *, layer: str = "X", gene_key: str | None = None, batch_size: int = 256
    ) -> ad.AnnData:
        """The VAE's reconstruction (NB means) of the cells of `adata` over the vocabulary genes its panel holds,
        each cell decoded with its observed total over them; obs is copied from `adata`."""
        shard, _ = self._tokens(adata, layer, gene_key)
        present = np.unique(shard["genes"]) if len(shard["genes"]) else np.zeros(0, np.int64)
        query = torch.as_tensor(present, dtype=torch.long, device=self.device)  # (Q,)
        means = []
        for batch in memory_batches(shard, batch_size, None):
            t = batch.to_torch(self.device)
            lik = self.bundle.vae.reconstruct(t["genes"], t["counts"], t["mask"], query, t["library_size"])
            means.append(lik.mean.float().cpu().numpy())
        var = pd.DataFrame(index=[self.genes[i - 1] for i in present])
        return ad.AnnData(X=np.concatenate(means), obs=adata.obs.copy(), var=var)

    # ---------------------------------------------------------------------------------------------- generation
    def sample(
        self,
        n: int | None = None,
        conditions: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
        *,
        like: ad.AnnData | None = None,
        guidance: str = "joint",
        cfg_scale: float | Mapping[str, float] = 1.0,
        genes: Sequence[str] | None = None,
        seed: int = 0,
        **options: Any,
    ) -> ad.AnnData:
        """Generate cells: `n` per request in `conditions` ({key: value}, or a list of them; keys not given are
        marginalised), or one per cell of `like` with its labels. Returns counts over the model genes (or `genes`).

        `options` are further SampleConfig fields (method, n_steps, counts, prior, precision, batch_size, ...).
        """
        per_key = dict(cfg_scale) if isinstance(cfg_scale, Mapping) else None
        cfg = SampleConfig(
            guidance=guidance, cfg_scale=1.0 if per_key else float(cfg_scale), cfg_scales=per_key, seed=seed, **options
        )
        sampler = Sampler(self.bundle, cfg, self.device)
        if (like is None) == (n is None):
            raise InputError("give either n (with optional conditions) or like=<AnnData with the condition columns>")
        if like is not None:
            codes = label_codes(like.obs, sampler.keys, sampler.labels, source="like")
        else:
            codes = request_codes(
                sampler,
                n_cells=n,
                conditions=dict(conditions)
                if isinstance(conditions, Mapping)
                else None
                if conditions is None
                else [dict(c) for c in conditions],
            )
        X, latents, _ = sampler.generate(codes, None, sampler.gene_columns(genes))
        out = generated_anndata(X, codes, sampler, genes or self.genes, latents=latents)
        out.uns["sclatent"] = {
            "sclatent_version": __version__,
            "guidance": guidance,
            "seed": seed,
            "method": cfg.method,
            "n_steps": cfg.n_steps,
        }
        return out

    def transfer(
        self,
        adata: ad.AnnData,
        set: Mapping[str, str],  # noqa: A002 - the user-facing name of the requested labels
        *,
        layer: str = "X",
        gene_key: str | None = None,
        guidance: str = "joint",
        cfg_scale: float | Mapping[str, float] = 1.0,
        genes: Sequence[str] | None = None,
        seed: int = 0,
        **options: Any,
    ) -> ad.AnnData:
        """Counterfactual cells: every cell of `adata` (raw counts in `layer`, a column per condition key in obs)
        carried from its own labels to the labels in `set` ({key: value}; other keys keep the cell's own).

        Each cell's latent is integrated back to noise under its labels, then forward under the new ones, and
        decoded with its own library size. The result's obs holds the new labels, the old ones (`source_<key>`)
        and the input cell's name (`reference_cell`). `options` are further SampleConfig fields (method, n_steps,
        counts, precision, batch_size, ...); the fixed-step solvers take 8 steps each way unless told otherwise.
        """
        from .transfer import transfer_adata

        per_key = dict(cfg_scale) if isinstance(cfg_scale, Mapping) else None
        options = {"method": "heun", "n_steps": 8, **options}
        cfg = SampleConfig(
            guidance=guidance, cfg_scale=1.0 if per_key else float(cfg_scale), cfg_scales=per_key, seed=seed, **options
        )
        cfg.validate()
        out, info = transfer_adata(
            self.bundle, adata, dict(set), cfg, self.device, layer=layer, gene_key=gene_key, genes=genes
        )
        out.uns["sclatent"] = {
            "sclatent_version": __version__,
            "step": "transfer",
            "set": [f"{k}={v}" for k, v in dict(set).items()],
            "guidance": guidance,
            "seed": seed,
            "method": cfg.method,
            "n_steps": cfg.n_steps,
            "unseen_combinations": list(info["unseen_combinations"]),
        }
        return out

    # ---------------------------------------------------------------------------------------------- training
    @classmethod
    def train(
        cls,
        adata: ad.AnnData,
        *,
        condition_keys: Sequence[str] = (),
        layer: str = "X",
        genes: str = "all",
        vae: VAETraining | None = None,
        prior: PriorTraining | None = None,
        vae_batch_size: int = 128,
        prior_batch_size: int = 256,
        seed: int = 0,
        device: str = "auto",
        workdir: str | Path | None = None,
        progress: bool = True,
        init_from: str | Path | Model | None = None,
    ) -> Model:
        """Train a model on the cells of `adata` (raw counts in `layer`) and return it.

        genes: "all" (every var) or "hvg" (var['highly_variable']). The steps are the pipeline's (TOKENIZE,
        TRAIN_VAE, ENCODE, TRAIN_PRIOR, BUNDLE), run in `workdir` (a temporary folder by default).

        init_from: fine-tune a trained model (a bundle path or a Model) instead: its vocabulary extended by the genes
        of `adata` (per `genes`) and its labels by new values and keys; both stages start from its weights and keep
        its architecture (`vae` / `prior` default to the model's; options that change it are refused).
        """
        from .encode import EncodeConfig, encode
        from .tokens import tokenize
        from .train_prior import train_prior
        from .train_vae import train_vae

        missing = [k for k in condition_keys if k not in adata.obs.columns]
        if missing:
            raise InputError(f"condition key '{missing[0]}' is not an obs column")
        vae = vae or VAETraining(preset=None if init_from is not None else "default")
        prior = prior or PriorTraining(preset=None if init_from is not None else "default")
        with tempfile.TemporaryDirectory(prefix="sclatent-") as tmp:
            work = Path(workdir) if workdir is not None else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            if isinstance(init_from, Model):
                init_from = init_from.save(work / "init" / "model.pt")
            if init_from is not None:
                vae = dataclasses.replace(vae, init_from=str(init_from))
                prior = dataclasses.replace(prior, init_from=str(init_from))
            X = counts_matrix(adata, layer, source="adata")
            obs = pd.DataFrame(
                {k: adata.obs[k].astype(str).to_numpy() for k in condition_keys}, index=adata.obs_names.astype(str)
            )
            var = pd.DataFrame(index=adata.var_names.astype(str))
            if genes == "hvg":
                if "highly_variable" not in adata.var.columns:
                    raise InputError(
                        "genes='hvg' needs var['highly_variable'] (e.g. from scanpy's highly_variable_genes)"
                    )
                var["highly_variable"] = adata.var["highly_variable"].to_numpy(dtype=bool)
            elif genes != "all":
                raise InputError(f"genes must be 'all' or 'hvg', got '{genes}'")
            train_h5ad = work / "train.h5ad"
            ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var).write_h5ad(train_h5ad)
            tokenize(
                train_h5ad,
                work / "tokens",
                genes=genes,
                condition_keys=list(condition_keys),
                progress=progress,
                model=init_from,
                extend=init_from is not None,
            )
            tcfg = TrainConfig(max_steps=1, batch_size=vae_batch_size, seed=seed, device=device)
            train_vae(work / "tokens", work / "vae", vae, tcfg, progress=progress)
            encode(work / "vae", work / "tokens", work / "encode", EncodeConfig(seed=seed, device=device))
            pcfg = TrainConfig(
                max_steps=1,
                batch_size=prior_batch_size,
                lr=5e-4,
                betas=(0.9, 0.999),
                decay_frac=1.0,
                decay_shape="cosine",
                ema_decay=0.999,
                seed=seed,
                device=device,
            )
            train_prior(work / "encode" / "latents.npz", work / "prior", prior, pcfg, progress=progress)
            bundle = bundle_from_runs(work / "vae", work / "prior")
        return cls(bundle, device=device)


__all__ = ["EMBEDDING_KEY", "Model"]
