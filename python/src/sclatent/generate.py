"""SAMPLE: generate cells — latent sampling with guidance, decoding, library sizes, NB counts, h5ad writing.

Generative process (paper §2.2.4): Z ~ p(Z | y) by integrating the guided flow ODE from noise (t = 0) to data
(t = 1) with the DiT prior, undo the latent standardisation, then x_I ~ p(x_I | Z, I) with the VAE decoder over
the requested genes I, with NB mean = softmax over I x library size.

Requests: every generated cell carries a label code per condition key; a key that is not requested holds its
null code (the prior then marginalises over it). Library sizes L are drawn from the log-normal fitted on the
training cells (TOKENIZE) for the most specific statistics available: the joint combination of all keys when
all are requested and that combination was seen, else the single requested key, else — for several keys whose
combination was never seen — an additive model in log space (marginal mean + the sum of each key's offset,
mean of their sds), else the marginal (unconditional). `library="like"` takes the reference cells' own totals.

Reproducibility: cells are processed in batches aligned to their global index (batch k holds cells
[k*batch_size, (k+1)*batch_size)), and batch k draws its noise and counts from a generator seeded by
(seed, replicate, k). A scattered run whose shard boundaries are multiples of the batch size (the pipeline
makes them so) therefore produces exactly the cells of an unsharded run; dopri5 adapts its steps to the
batch, so this holds for it only when the batches are identical too.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .flow import guided_velocity, sample as ode_sample
from .io import InputError, atomic_path, provenance, read_h5ad
from .train import native_bf16
from .train_prior import load_prior
from .nn.vae import decode_chunks
from .train_vae import load_vae

log = logging.getLogger(__name__)

NONE_LABEL = "none"  # obs value of a condition key that was not requested


@dataclass
class SampleConfig:
    guidance: str = "joint"  # "joint" | "additive"
    cfg_scale: float = 1.0
    cfg_scales: dict[str, float] | None = None  # per-attribute weights (additive); default cfg_scale for all
    method: str = "heun"  # "euler" | "heun" | "dopri5"
    n_steps: int = 2  # fixed-step samplers (Heun 2 = NFE 4: within 1.4% of dopri5 W2 on eight models, BENCHMARKS.md)
    atol: float = 1e-5
    rtol: float = 1e-5
    batch_size: int = 512
    seed: int = 0
    replicate: int = 0
    counts: str = "sample"  # "sample" (NB draws) | "mean"
    library: str = "model"  # "model" (log-normal per condition) | "like" (the reference cells' totals)
    prior: str = "ldm"  # "ldm" (the DiT prior) | "gaussian" (N(0, I), the paper's ablation)
    weights: str = "auto"  # prior weights: "auto" | "ema" | "model"
    keep_latents: bool = False
    precision: str = "auto"  # "auto" (bf16 where the device has native bf16, else fp32) | "fp32" | "bf16"

    def validate(self) -> None:
        if self.guidance not in ("joint", "additive"):
            raise InputError(f"--guidance must be 'joint' or 'additive', got '{self.guidance}'")
        if self.method not in ("euler", "heun", "dopri5"):
            raise InputError(f"--method must be euler, heun or dopri5, got '{self.method}'")
        if self.method != "dopri5" and self.n_steps < 1:
            raise InputError(f"--n-steps must be >= 1, got {self.n_steps}")
        if self.counts not in ("sample", "mean"):
            raise InputError(f"--counts must be 'sample' or 'mean', got '{self.counts}'")
        if self.library not in ("model", "like"):
            raise InputError(f"--library-size must be 'model' or 'like', got '{self.library}'")
        if self.prior not in ("ldm", "gaussian"):
            raise InputError(f"--prior must be 'ldm' or 'gaussian', got '{self.prior}'")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise InputError(f"--precision must be auto, fp32 or bf16, got '{self.precision}'")


# --------------------------------------------------------------------------------------------------------
# requests: label codes and library sizes
# --------------------------------------------------------------------------------------------------------


def encode_request(values: dict[str, str], keys: Sequence[str], labels: dict[str, list[str]]) -> list[int]:
    """Codes (K,) of one request {key: value}; unrequested keys get their null code (= number of categories)."""
    for key in values:
        if key not in keys:
            raise InputError(f"condition key '{key}' is not one the model was trained on ({', '.join(keys) or 'none'})")
    codes = []
    for key in keys:
        cats = labels[key]
        if key not in values or values[key] is None:
            codes.append(len(cats))
            continue
        value = str(values[key])
        if value not in cats:
            raise InputError(f"{key}={value} was never seen in training; known values of '{key}': {', '.join(cats)}")
        codes.append(cats.index(value))
    return codes


def lognormal_params(codes: np.ndarray, keys: Sequence[str], labels: dict[str, list[str]], stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sd) of log L for each request row (N, K) of codes (see the module docstring for the rule)."""
    marg = stats["marginal"]
    means = np.empty(len(codes))
    sds = np.empty(len(codes))
    cache: dict[tuple[int, ...], tuple[float, float]] = {}
    for i, row in enumerate(map(tuple, codes)):
        if row not in cache:
            given = [(k, labels[k][c]) for k, c in zip(keys, row) if c < len(labels[k])]
            joint = stats.get("joint", {})
            if len(given) == len(keys) and len(keys) > 1 and "|".join(v for _, v in given) in joint:
                s = joint["|".join(v for _, v in given)]
                cache[row] = (s["mean"], s["sd"])
            elif len(given) == 1:
                s = stats["per_key"][given[0][0]][given[0][1]]
                cache[row] = (s["mean"], s["sd"])
            elif given:
                per = [stats["per_key"][k][v] for k, v in given]
                cache[row] = (marg["mean"] + sum(p["mean"] - marg["mean"] for p in per), float(np.mean([p["sd"] for p in per])))
            else:
                cache[row] = (marg["mean"], marg["sd"])
        means[i], sds[i] = cache[row]
    return means, sds


def unseen_combinations(codes: np.ndarray, keys: Sequence[str], labels: dict[str, list[str]], stats: dict) -> list[str]:
    """Requested combinations of several keys that never occurred together in training."""
    if len(keys) < 2:
        return []
    joint = stats.get("joint", {})
    out = set()
    for row in map(tuple, np.unique(codes, axis=0)):
        if all(c < len(labels[k]) for k, c in zip(keys, row)):
            name = "|".join(labels[k][c] for k, c in zip(keys, row))
            if name not in joint:
                out.add(name)
    return sorted(out)


# --------------------------------------------------------------------------------------------------------
# the model side
# --------------------------------------------------------------------------------------------------------


class Generator:
    """A loaded VAE (+ prior) that turns label requests into counts."""

    def __init__(self, vae_dir: str | Path, prior_dir: str | Path | None, cfg: SampleConfig, device: str = "auto") -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        self.vae, self.vae_cfg = load_vae(vae_dir, map_location=self.device)
        self.vae.to(self.device)
        meta = self.vae_cfg["metadata"]
        self.genes: list[str] = meta["genes"]
        self.keys: list[str] = meta["condition_keys"]
        self.labels: dict[str, list[str]] = meta["labels"]
        self.prior = None
        self.prior_cfg: dict[str, Any] | None = None
        if cfg.prior == "ldm":
            if prior_dir is None:
                raise InputError("--prior ldm needs the prior run directory (--prior-dir)")
            self.prior, self.prior_cfg = load_prior(prior_dir, weights=cfg.weights, map_location=self.device)
            self.prior.to(self.device)
            pm = self.prior_cfg["metadata"]
            if pm["vocabulary_digest"] != meta["vocabulary_digest"] or pm["condition_keys"] != self.keys or pm["labels"] != self.labels:
                raise InputError(f"prior {prior_dir} was trained on the latents of another VAE (vocabulary or labels differ from {vae_dir})")
            self.mean = torch.tensor(pm["latent_mean"], dtype=torch.float32, device=self.device)  # (m, dl)
            self.std = torch.tensor(pm["latent_std"], dtype=torch.float32, device=self.device)  # (m, dl)
            self.library_stats = pm["library_size"]
        else:
            self.library_stats = meta["library_size"]
        vc = self.vae.config
        self.latent_shape = (vc.n_latent_tokens, vc.d_latent)
        # bf16 autocast for the DiT's matrix products only; the ODE state, the guidance combination and the whole
        # VAE decoder stay fp32. On a CPU with AVX512-BF16 the DiT forward ran 2.0x faster (BENCHMARKS.md, "CPU
        # speed"); the decoder, whose products have only 32 inputs, measured no faster in bf16.
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(self.device))

    def gene_ids(self, genes: Sequence[str] | None) -> torch.Tensor:
        """Token ids (Q,) of the requested output genes (default: all model genes, in vocabulary order)."""
        if genes is None:
            return torch.arange(1, len(self.genes) + 1, device=self.device)
        index = {g: i + 1 for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in index]
        if missing:
            raise InputError(f"gene '{missing[0]}' is not one of the model's {len(self.genes)} genes ({len(missing)} unknown)")
        return torch.tensor([index[g] for g in genes], device=self.device)

    def _weights(self) -> float | list[float]:
        if self.cfg.guidance == "joint":
            return self.cfg.cfg_scale
        scales = self.cfg.cfg_scales or {}
        unknown = sorted(set(scales) - set(self.keys))
        if unknown:
            raise InputError(f"--cfg-scale {unknown[0]}=...: not a condition key ({', '.join(self.keys)})")
        return [float(scales.get(k, self.cfg.cfg_scale)) for k in self.keys]

    @torch.no_grad()
    def latents(self, codes: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, int]:
        """Z (B, m, dl) in the VAE's latent space for label codes (B, K), and the sampler's NFE."""
        B = codes.shape[0]
        x0 = torch.randn((B, *self.latent_shape), generator=gen, device=self.device)  # (B, m, dl)
        if self.prior is None:
            return x0, 0
        guided = guided_velocity(self.prior, codes, guidance=self.cfg.guidance, w=self._weights(), autocast=self.bf16)
        kw = {"atol": self.cfg.atol, "rtol": self.cfg.rtol} if self.cfg.method == "dopri5" else {"n_steps": self.cfg.n_steps}
        z, nfe = ode_sample(guided, x0, method=self.cfg.method, **kw)
        return z * self.std + self.mean, nfe

    @torch.no_grad()
    def generate(
        self, codes: np.ndarray, library: np.ndarray | None, gene_ids: torch.Tensor, *, start: int = 0
    ) -> tuple[sp.csr_matrix, np.ndarray | None, dict[str, Any]]:
        """Counts (N, Q) for request rows `codes` (N, K) whose global indices are start..start+N-1.

        library: (N,) library sizes, or None to draw them from the per-condition log-normal.
        """
        cfg = self.cfg
        n = len(codes)
        bs = cfg.batch_size
        rows, lat, nfes = [], [], []
        means, sds = lognormal_params(codes, self.keys, self.labels, self.library_stats) if library is None else (None, None)
        first, last = start // bs, (start + n - 1) // bs if n else -1
        from tqdm.auto import tqdm

        quiet = n == 0 or not log.isEnabledFor(logging.INFO)
        for k in tqdm(range(first, last + 1), desc="sample", unit="batch", leave=False, disable=quiet):
            a, b = max(k * bs, start), min((k + 1) * bs, start + n)  # global indices of this batch's cells
            gen = torch.Generator(device=self.device).manual_seed(_batch_seed(cfg.seed, cfg.replicate, k))
            batch_codes = torch.as_tensor(codes[a - start : b - start], device=self.device)  # (b, K)
            z, nfe = self.latents(batch_codes, gen)  # (b, m, dl)
            nfes.append(nfe)
            eps = torch.randn((b - a,), generator=gen, device=self.device)  # (b,) log-normal draws
            if library is None:
                mu_l = torch.as_tensor(means[a - start : b - start], device=self.device, dtype=torch.float32)
                sd_l = torch.as_tensor(sds[a - start : b - start], device=self.device, dtype=torch.float32)
                L = torch.exp(mu_l + sd_l * eps)  # (b,)
            else:
                L = torch.as_tensor(library[a - start : b - start], device=self.device, dtype=torch.float32)
            L = L.clamp_min(1.0)
            for c in decode_chunks(len(z), self.device):
                lik = self.vae.decode(z[c], gene_ids, L[c])  # over (c, Q), fp32
                x = lik.sample(gen) if cfg.counts == "sample" else lik.mean  # (c, Q)
                rows.append(sp.csr_matrix(x.float().cpu().numpy()))
            if cfg.keep_latents:
                lat.append(z.reshape(len(z), -1).float().cpu().numpy())
        X = sp.vstack(rows).tocsr() if rows else sp.csr_matrix((0, len(gene_ids)), dtype=np.float32)
        info = {"nfe_per_batch": float(np.mean(nfes)) if nfes else 0.0, "n_batches": len(nfes),
                "precision": "bf16" if self.bf16 else "fp32"}
        return X.astype(np.float32), (np.concatenate(lat) if lat else None), info


def _batch_seed(seed: int, replicate: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, replicate, k]).generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1))


# --------------------------------------------------------------------------------------------------------
# the command: requests from --condition / --like, h5ad output
# --------------------------------------------------------------------------------------------------------


def requests_from_conditions(n_cells: int, requests: Sequence[dict[str, str]], keys, labels) -> np.ndarray:
    """Label codes of `n_cells` cells for each request (concatenated in request order)."""
    rows = [np.tile(np.asarray(encode_request(r, keys, labels), dtype=np.int64), (n_cells, 1)) for r in requests]
    return np.concatenate(rows) if rows else np.zeros((0, len(keys)), dtype=np.int64)


def requests_like(path: str, keys: Sequence[str], labels: dict[str, list[str]], model_genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """Label codes (N, K) and library sizes over the model genes (N,) of the cells of a reference h5ad."""
    ref = read_h5ad(path)
    codes = np.zeros((ref.n_obs, len(keys)), dtype=np.int64)
    for j, key in enumerate(keys):
        if key not in ref.obs.columns:
            raise InputError(f"{path}: condition key '{key}' is not an obs column")
        values = ref.obs[key].astype(str).to_numpy()
        cats = labels[key]
        lookup = {c: i for i, c in enumerate(cats)}
        unknown = sorted(set(values) - set(lookup))
        if unknown:
            raise InputError(f"{path}: {key}={unknown[0]} was never seen in training; known values of '{key}': {', '.join(cats)}")
        codes[:, j] = [lookup[v] for v in values]
    reference_genes = set(ref.var_names)  # once: rebuilding it per gene cost ~3 s for 2,000 x 16,634 genes
    shared = [g for g in model_genes if g in reference_genes]
    lib = np.asarray(ref[:, shared].X.sum(axis=1)).ravel() if shared else np.zeros(ref.n_obs)
    return codes, lib.astype(np.float64), ref.obs_names


def write_generated(
    path: str | Path,
    X: sp.csr_matrix,
    codes: np.ndarray,
    gen: Generator,
    genes: Sequence[str],
    *,
    start: int,
    latents: np.ndarray | None,
    info: dict[str, Any],
    config: dict[str, Any],
    reference_names: Sequence[str] | None = None,
) -> ad.AnnData:
    """Assemble and atomically write the generated AnnData."""
    obs = pd.DataFrame(index=[f"gen{gen.cfg.replicate}_{start + i}" for i in range(X.shape[0])])
    for j, key in enumerate(gen.keys):
        cats = gen.labels[key]
        obs[key] = pd.Categorical([cats[c] if c < len(cats) else NONE_LABEL for c in codes[:, j]])
    obs["generated"] = True
    obs["replicate"] = gen.cfg.replicate
    obs["cell_index"] = np.arange(start, start + X.shape[0])
    if reference_names is not None:
        obs["reference_cell"] = list(reference_names)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(genes)))
    if latents is not None:
        adata.obsm["X_latent"] = latents.astype(np.float32)
    # h5ad attributes hold no None or lists of dicts: the full record is kept as a JSON string
    adata.uns["sclatent"] = {
        "step": "sample",
        "condition_keys": list(gen.keys),
        "method": gen.cfg.method,
        "nfe_per_batch": float(info["nfe_per_batch"]),
        "precision": str(info.get("precision", "fp32")),
        "seconds": float(info.get("seconds", 0.0)),
        "provenance_json": json.dumps({**provenance("sample", config), "sampler": info}),
    }
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return adata


def run_sample(
    vae_dir: str | Path,
    prior_dir: str | Path | None,
    out: str | Path,
    cfg: SampleConfig,
    *,
    n_cells: int | None = None,
    conditions: dict[str, str] | Sequence[dict[str, str]] | None = None,
    like: str | None = None,
    genes: Sequence[str] | None = None,
    shard: tuple[int, int] | None = None,
    device: str = "auto",
) -> ad.AnnData:
    """`sclatent sample`: build the request, generate (optionally one shard (start, stop) of it), write h5ad.

    conditions: one request {key: value} (n_cells cells) or a list of them (n_cells cells each).
    """
    t0 = time.time()
    gen = Generator(vae_dir, prior_dir, cfg, device=device)
    if (like is None) == (n_cells is None):
        raise InputError("give either --n-cells (with optional --condition key=value) or --like reference.h5ad")
    ref_names = None
    library = None
    if like is not None:
        if conditions:
            raise InputError("--condition cannot be combined with --like (the reference cells give the labels)")
        codes, lib, ref_names = requests_like(like, gen.keys, gen.labels, gen.genes)
        if cfg.library == "like":
            library = lib
    else:
        if n_cells < 1:
            raise InputError(f"--n-cells must be >= 1, got {n_cells}")
        if cfg.library == "like":
            raise InputError("--library-size like needs --like reference.h5ad")
        requests = [conditions or {}] if isinstance(conditions, dict) or conditions is None else list(conditions)
        codes = requests_from_conditions(n_cells, requests or [{}], gen.keys, gen.labels)
    for combo in unseen_combinations(codes, gen.keys, gen.labels, gen.library_stats):
        log.warning("the combination %s never occurred in training: generating it from the model's composition of the attributes", combo)
    start, stop = (0, len(codes)) if shard is None else shard
    if not (0 <= start <= stop <= len(codes)):
        raise InputError(f"shard {start}:{stop} is outside the request of {len(codes)} cells")
    gene_ids = gen.gene_ids(genes)
    out_genes = list(genes) if genes is not None else gen.genes
    X, lat, info = gen.generate(codes[start:stop], None if library is None else library[start:stop], gene_ids, start=start)
    info["seconds"] = round(time.time() - t0, 3)
    config = {**asdict(cfg), "n_cells": n_cells, "conditions": conditions, "like": like, "shard": [start, stop], "device": str(gen.device)}
    adata = write_generated(
        out, X, codes[start:stop], gen, out_genes, start=start, latents=lat, info=info, config=config,
        reference_names=None if ref_names is None else ref_names[start:stop],
    )
    log.info("generated %d cells x %d genes in %.1fs (NFE per batch %.0f)", X.shape[0], X.shape[1], info["seconds"], info["nfe_per_batch"])
    return adata


def gather(paths: Sequence[str | Path], out: str | Path) -> ad.AnnData:
    """Concatenate SAMPLE shards (same genes) into one h5ad, ordered by (replicate, cell_index)."""
    if not paths:
        raise InputError("gather: no shard files given")
    parts = [read_h5ad(p) for p in paths]
    genes = list(parts[0].var_names)
    for p, a in zip(paths, parts):
        missing = [c for c in ("cell_index", "replicate") if c not in a.obs.columns]
        if missing:
            raise InputError(f"gather: {p} is not a SAMPLE shard (no obs column {', '.join(repr(c) for c in missing)})")
        if list(a.var_names) != genes:
            raise InputError(f"gather: {p} has different genes than {paths[0]}")
    adata = ad.concat(parts, join="outer", merge="first", uns_merge="first")
    order = np.lexsort((adata.obs["cell_index"].to_numpy(), adata.obs["replicate"].to_numpy()))
    adata = adata[order].copy()
    if not adata.obs_names.is_unique:
        raise InputError("gather: the shards overlap (repeated cells)")
    first = dict(parts[0].uns.get("sclatent", {}))
    first["seconds"] = float(sum(float(a.uns.get("sclatent", {}).get("seconds", 0.0)) for a in parts))
    first["gathered_from"] = [Path(p).name for p in paths]
    adata.uns["sclatent"] = first
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    return adata


def parse_requests(text: str) -> list[dict[str, str]]:
    """'cell_type=B,stim=IL2;cell_type=NK' -> [{'cell_type': 'B', 'stim': 'IL2'}, {'cell_type': 'NK'}]."""
    return [parse_conditions([c for c in part.split(",") if c.strip()]) for part in text.split(";") if part.strip()]


def parse_conditions(items: Sequence[str]) -> dict[str, str]:
    """['cell_type=B', 'condition=stim'] -> {'cell_type': 'B', 'condition': 'stim'} with clear errors."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--condition '{item}': expected key=value")
        k, v = item.split("=", 1)
        k, v = k.strip(), v.strip()
        if not k or not v:
            raise InputError(f"--condition '{item}': expected key=value")
        if k in out:
            raise InputError(f"--condition: key '{k}' given twice")
        out[k] = v
    return out
