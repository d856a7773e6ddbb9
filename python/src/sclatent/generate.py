"""SAMPLE: generate cells — latent sampling with guidance, decoding, library sizes, NB counts, h5ad writing.

Generative process (paper §2.2.4): Z ~ p(Z | y) by integrating the guided flow ODE from noise (t = 0) to data
(t = 1) with the DiT prior, undo the latent standardisation, then x ~ p(x | Z) with the VAE decoder over every model
gene (NB mean = softmax over the vocabulary x library size), of which the requested genes are kept.

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
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .checkpoint import Bundle, load_model
from .device import check_precision, resolve_device
from .flow import analogies, guided_velocity
from .flow import integrate as ode_integrate
from .gather import gather  # noqa: F401  (GATHER, torch-free; kept importable from here)
from .inference import decode_chunks
from .io import InputError, atomic_path, provenance

log = logging.getLogger(__name__)

NONE_LABEL = "none"  # obs value of a condition key that was not requested


@dataclass
class SampleConfig:
    """Settings of `sclatent sample` (and of `Model.sample`)."""

    guidance: str = "joint"  # "joint" | "additive"
    cfg_scale: float = 1.0
    cfg_scales: dict[str, float] | None = None  # per-attribute weights (additive); default cfg_scale for all
    method: str = "heun"  # "euler" | "heun" | "dopri5"
    n_steps: int = 2  # steps of the fixed-step samplers
    atol: float = 1e-5
    rtol: float = 1e-5
    batch_size: int = 512
    seed: int = 0
    replicate: int = 0
    counts: str = "sample"  # "sample" (NB draws) | "mean"
    library: str = "model"  # "model" (log-normal per condition) | "like" (the reference cells' totals)
    prior: str = "ldm"  # "ldm" (the DiT prior) | "gaussian" (N(0, I), the paper's ablation)
    keep_latents: bool = False
    precision: str = "fp32"  # "fp32" or "bf16" (autocast of the DiT's products)
    unseen: str = "analogy"  # a combination never seen in training, under joint guidance: "analogy" | "joint"
    unseen_cfg_scale: float = 2.0  # joint guidance weight of a combination never seen in training (decision 0020)

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
        if self.precision not in ("fp32", "bf16"):
            raise InputError(f"--precision must be fp32 or bf16, got '{self.precision}'")
        if self.unseen not in ("analogy", "joint"):
            raise InputError(f"--unseen must be analogy or joint, got '{self.unseen}'")
        if not math.isfinite(self.unseen_cfg_scale) or self.unseen_cfg_scale < 0:
            raise InputError(f"--unseen-cfg-scale must be a finite number >= 0, got {self.unseen_cfg_scale}")


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


def lognormal_params(
    codes: np.ndarray, keys: Sequence[str], labels: dict[str, list[str]], stats: dict
) -> tuple[np.ndarray, np.ndarray]:
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
                cache[row] = (
                    marg["mean"] + sum(p["mean"] - marg["mean"] for p in per),
                    float(np.mean([p["sd"] for p in per])),
                )
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


class Sampler:
    """A trained model (VAE + prior, or the Gaussian prior) that turns label requests into counts."""

    def __init__(self, bundle: Bundle, cfg: SampleConfig, device: torch.device) -> None:
        cfg.validate()
        if cfg.prior == "ldm" and bundle.prior is None:
            raise InputError(
                "this model has no trained prior (a VAE alone): sample with --prior-kind gaussian, or "
                "bundle it with its TRAIN_PRIOR run"
            )
        self.cfg = cfg
        self.device = device
        self.bundle = bundle.to(device)
        self.vae = bundle.vae
        self.prior = bundle.prior if cfg.prior == "ldm" else None
        self.genes, self.keys, self.labels = bundle.genes, bundle.condition_keys, bundle.labels
        self.library_stats = bundle.library_size
        vc = self.vae.config
        self.latent_shape = (vc.n_latent_tokens, vc.d_latent)
        self.bf16 = check_precision(cfg.precision)  # autocast of the DiT only; the decoder always runs in fp32

    def gene_columns(self, genes: Sequence[str] | None) -> torch.Tensor | None:
        """Columns (Q,) of the requested output genes in the model's vocabulary (None = every gene, in order)."""
        if genes is None:
            return None
        index = {g: i for i, g in enumerate(self.genes)}
        missing = [g for g in genes if g not in index]
        if missing:
            raise InputError(
                f"gene '{missing[0]}' is not one of the model's {len(self.genes)} genes ({len(missing)} unknown)"
            )
        return torch.tensor([index[g] for g in genes], device=self.device)

    def _weights(self) -> float | list[float]:
        if self.cfg.guidance == "joint":
            return self.cfg.cfg_scale
        scales = self.cfg.cfg_scales or {}
        unknown = sorted(set(scales) - set(self.keys))
        if unknown:
            raise InputError(f"--cfg-scale {unknown[0]}=...: not a condition key ({', '.join(self.keys)})")
        return [float(scales.get(k, self.cfg.cfg_scale)) for k in self.keys]

    def seen_combinations(self) -> dict[tuple[int, ...], int]:
        """The combinations of every condition key seen in training (label codes) and their training cells."""
        if not hasattr(self, "_seen"):
            self._seen = {}
            for name, stats in self.library_stats.get("joint", {}).items():
                values = name.split("|")
                if len(values) == len(self.keys) and all(v in self.labels[k] for k, v in zip(self.keys, values)):
                    combo = tuple(self.labels[k].index(v) for k, v in zip(self.keys, values))
                    self._seen[combo] = int(stats.get("n", 1))
        return self._seen

    def analogies_of(self, codes: torch.Tensor, base: torch.Tensor | None = None) -> list | None:
        """Per request row, the parallelograms standing in for a combination never seen in training (joint
        guidance with `unseen="analogy"`; `base`: each row's own combination when transferring), else None."""
        if self.cfg.guidance != "joint" or self.cfg.unseen != "analogy" or len(self.keys) < 2:
            return None
        seen = self.seen_combinations()
        nulls = [len(self.labels[k]) for k in self.keys]
        rows, cache = [], {}
        for i, row in enumerate(codes.tolist()):
            own = tuple(base[i].tolist()) if base is not None else None
            if (tuple(row), own) not in cache:
                full = all(c < n for c, n in zip(row, nulls))
                cache[(tuple(row), own)] = analogies(tuple(row), seen, own) if full else []
            rows.append(cache[(tuple(row), own)])
        return rows if any(rows) else None

    def row_weights(self, codes: torch.Tensor) -> list[float] | None:
        """Per request row (B, K), the joint guidance weight: `unseen_cfg_scale` for a combination of every key never
        seen in training, `cfg_scale` otherwise; None when all rows take `cfg_scale` (or guidance is additive)."""
        w, w_unseen = self.cfg.cfg_scale, self.cfg.unseen_cfg_scale
        if self.cfg.guidance != "joint" or len(self.keys) < 2 or w_unseen == w:
            return None
        seen = self.seen_combinations()
        if not seen:  # a model without joint statistics cannot tell seen from unseen
            return None
        nulls = [len(self.labels[k]) for k in self.keys]
        ws = [
            w_unseen if all(c < n for c, n in zip(row, nulls)) and tuple(row) not in seen else w
            for row in codes.tolist()
        ]
        return ws if any(x != w for x in ws) else None

    def integrate(
        self, codes: torch.Tensor, x: torch.Tensor, backward: bool = False, base: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int]:
        """Integrate the guided flow under label codes (B, K) from noise x (B, m, dl) at t = 0 to t = 1, or with
        `backward` from standardised latents x at t = 1 back to t = 0: the other end and the sampler's NFE.
        A combination never seen in training is composed from seen ones (`analogies_of`; `base` (B, K): the
        rows' own combinations when transferring) and guided with its own weight (`row_weights`)."""
        guided = guided_velocity(
            self.prior,
            codes,
            guidance=self.cfg.guidance,
            w=self._weights(),
            autocast=self.bf16,
            analogies=self.analogies_of(codes, base),
            row_w=self.row_weights(codes),
        )
        kw = (
            {"atol": self.cfg.atol, "rtol": self.cfg.rtol}
            if self.cfg.method == "dopri5"
            else {"n_steps": self.cfg.n_steps}
        )
        t0, t1 = (1.0, 0.0) if backward else (0.0, 1.0)
        return ode_integrate(guided, x, t0, t1, method=self.cfg.method, **kw)

    @torch.no_grad()
    def latents(self, codes: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, int]:
        """Z (B, m, dl) in the VAE's latent space for label codes (B, K), and the sampler's NFE."""
        x0 = torch.randn((codes.shape[0], *self.latent_shape), generator=gen, device=self.device)  # (B, m, dl)
        if self.prior is None:
            return x0, 0
        z, nfe = self.integrate(codes, x0)
        return z * self.bundle.latent_std + self.bundle.latent_mean, nfe

    @torch.no_grad()
    def decode(
        self, z: torch.Tensor, L: torch.Tensor, columns: torch.Tensor | None, gen: torch.Generator
    ) -> sp.csr_matrix:
        """Counts of latents z (B, m, dl) with library sizes L (B,) over every model gene, then the requested columns:
        the means are normalised over the whole vocabulary, so a gene subset is the subset of a full generation."""
        genes = torch.arange(1, len(self.genes) + 1, device=self.device)  # (G,)
        rows = []
        for c in decode_chunks(len(z), self.device):
            lik = self.vae.decode(z[c], genes, L[c])  # over (c, G), fp32
            if columns is not None:
                lik = lik.columns(columns)  # (c, Q)
            x = lik.sample(gen) if self.cfg.counts == "sample" else lik.mean
            rows.append(sp.csr_matrix(x.float().cpu().numpy()))
        return sp.vstack(rows).tocsr() if rows else sp.csr_matrix((0, len(self.genes)), dtype=np.float32)

    @torch.no_grad()
    def generate(
        self, codes: np.ndarray, library: np.ndarray | None, columns: torch.Tensor | None, *, start: int = 0
    ) -> tuple[sp.csr_matrix, np.ndarray | None, dict[str, Any]]:
        """Counts (N, Q) for request rows `codes` (N, K) whose global indices are start..start+N-1.

        library: (N,) library sizes, or None to draw them from the per-condition log-normal.
        """
        cfg = self.cfg
        n, bs = len(codes), cfg.batch_size
        n_out = len(self.genes) if columns is None else len(columns)
        parts, lat, nfes = [], [], []
        means, sds = (
            lognormal_params(codes, self.keys, self.labels, self.library_stats) if library is None else (None, None)
        )
        first, last = start // bs, (start + n - 1) // bs if n else -1
        from tqdm.auto import tqdm

        quiet = n == 0 or not log.isEnabledFor(logging.INFO)
        for k in tqdm(range(first, last + 1), desc="sample", unit="batch", leave=False, disable=quiet):
            a, b = max(k * bs, start), min((k + 1) * bs, start + n)  # global indices of this batch's cells
            gen = torch.Generator(device=self.device).manual_seed(batch_seed(cfg.seed, cfg.replicate, k))
            z, nfe = self.latents(torch.as_tensor(codes[a - start : b - start], device=self.device), gen)
            nfes.append(nfe)
            eps = torch.randn((b - a,), generator=gen, device=self.device)  # (b,) log-normal draws
            if library is None:
                mu_l = torch.as_tensor(means[a - start : b - start], device=self.device, dtype=torch.float32)
                sd_l = torch.as_tensor(sds[a - start : b - start], device=self.device, dtype=torch.float32)
                L = torch.exp(mu_l + sd_l * eps)  # (b,)
            else:
                L = torch.as_tensor(library[a - start : b - start], device=self.device, dtype=torch.float32)
            parts.append(self.decode(z, L.clamp_min(1.0), columns, gen))
            if cfg.keep_latents:
                lat.append(z.reshape(len(z), -1).float().cpu().numpy())
        X = sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, n_out), dtype=np.float32)
        info = {
            "nfe_per_batch": float(np.mean(nfes)) if nfes else 0.0,
            "n_batches": len(nfes),
            "precision": cfg.precision,
        }
        return X.astype(np.float32), (np.concatenate(lat) if lat else None), info


def batch_seed(seed: int, replicate: int, k: int) -> int:
    """The seed of batch k's generator (noise, library sizes, NB draws) for (seed, replicate)."""
    return int(np.random.SeedSequence([seed, replicate, k]).generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1))


# --------------------------------------------------------------------------------------------------------
# the command: requests from --condition / --like, h5ad output
# --------------------------------------------------------------------------------------------------------


def requests_from_conditions(n_cells: int, requests: Sequence[dict[str, str]], keys, labels) -> np.ndarray:
    """Label codes of `n_cells` cells for each request (concatenated in request order)."""
    rows = [np.tile(np.asarray(encode_request(r, keys, labels), dtype=np.int64), (n_cells, 1)) for r in requests]
    return np.concatenate(rows) if rows else np.zeros((0, len(keys)), dtype=np.int64)


def label_codes(
    obs: pd.DataFrame,
    keys: Sequence[str],
    labels: dict[str, list[str]],
    *,
    source: str,
    marginalise_missing: bool = False,
) -> np.ndarray:
    """Label codes (n, K) of cells from their obs columns; an unknown value is an InputError, and so is a missing
    column unless `marginalise_missing` (then the key gets its null code: generated marginally over it)."""
    codes = np.zeros((len(obs), len(keys)), dtype=np.int64)
    for j, key in enumerate(keys):
        if key not in obs.columns and marginalise_missing:
            log.warning(
                "%s: no obs column '%s' (a condition key of the model): generating marginally over it", source, key
            )
            codes[:, j] = len(labels[key])
            continue
        if key not in obs.columns:
            raise InputError(f"{source}: condition key '{key}' is not an obs column")
        values = obs[key].astype(str).to_numpy()
        lookup = {c: i for i, c in enumerate(labels[key])}
        unknown = sorted(set(values) - set(lookup))
        if unknown:
            raise InputError(
                f"{source}: {key}={unknown[0]} was never seen in training; known values of '{key}': "
                f"{', '.join(labels[key])}"
            )
        codes[:, j] = [lookup[v] for v in values]
    return codes


def requests_like(
    path: str,
    keys: Sequence[str],
    labels: dict[str, list[str]],
    model_genes: Sequence[str],
    rows: slice | None = None,
    library: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, pd.Index, int]:
    """Label codes (n, K) of the cells `rows` of a reference h5ad, their library sizes over the model genes when
    `library` (else None), their names, and the reference's total number of cells. Only those rows' labels and
    counts are read."""
    from .ondisk import H5adCounts

    with H5adCounts(path) as ref:
        n_total = ref.n_obs
        rows = rows or slice(0, n_total)
        a, b = max(0, rows.start or 0), min(n_total, n_total if rows.stop is None else rows.stop)
        b = max(a, b)
        present = [k for k in keys if k in ref.obs_columns]  # a model key the reference lacks is marginalised
        obs = pd.DataFrame({k: ref.obs_column(k, a, b) for k in present}, index=pd.Index(ref.obs_names[a:b]))
        codes = label_codes(obs, keys, labels, source=path, marginalise_missing=True)
        lib = None
        if library:
            cols = np.flatnonzero(ref.var_names.isin(list(model_genes)))
            lib = np.zeros(b - a)
            if len(cols):
                for c0 in range(a, b, 65_536):
                    X = ref.rows(c0, min(c0 + 65_536, b))
                    lib[c0 - a : c0 - a + X.shape[0]] = np.asarray(X[:, cols].sum(axis=1), dtype=np.float64).ravel()
        return codes, lib, obs.index, n_total


def write_generated(
    path: str | Path,
    X: sp.csr_matrix,
    codes: np.ndarray,
    sampler: Sampler,
    genes: Sequence[str],
    *,
    start: int,
    latents: np.ndarray | None,
    info: dict[str, Any],
    config: dict[str, Any],
    reference_names: Sequence[str] | None = None,
) -> ad.AnnData:
    """Assemble and atomically write the generated AnnData."""
    adata = generated_anndata(X, codes, sampler, genes, start=start, latents=latents, reference_names=reference_names)
    # h5ad attributes hold no None or lists of dicts: the full record is kept as a JSON string
    adata.uns["sclatent"] = {
        "step": "sample",
        "condition_keys": list(sampler.keys),
        "method": sampler.cfg.method,
        "nfe_per_batch": float(info["nfe_per_batch"]),
        "precision": str(info.get("precision", "fp32")),
        "seconds": float(info.get("seconds", 0.0)),
        "provenance_json": json.dumps({**provenance("sample", config), "sampler": info}),
    }
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return adata


def generated_anndata(
    X: sp.csr_matrix,
    codes: np.ndarray,
    sampler: Sampler,
    genes: Sequence[str],
    *,
    start: int = 0,
    latents: np.ndarray | None = None,
    reference_names: Sequence[str] | None = None,
) -> ad.AnnData:
    """Generated counts (N, Q) as an AnnData: obs holds each cell's labels ('none' where not requested), replicate
    and global cell index; obsm['X_latent'] the latents when kept."""
    obs = pd.DataFrame(index=[f"gen{sampler.cfg.replicate}_{start + i}" for i in range(X.shape[0])])
    for j, key in enumerate(sampler.keys):
        cats = sampler.labels[key]
        obs[key] = pd.Categorical([cats[c] if c < len(cats) else NONE_LABEL for c in codes[:, j]])
    obs["generated"] = True
    obs["replicate"] = sampler.cfg.replicate
    obs["cell_index"] = np.arange(start, start + X.shape[0])
    if reference_names is not None:
        obs["reference_cell"] = list(reference_names)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(genes)))
    if latents is not None:
        adata.obsm["X_latent"] = latents.astype(np.float32)
    return adata


def request_codes(
    sampler: Sampler, *, n_cells: int | None, conditions: dict[str, str] | Sequence[dict[str, str]] | None
) -> np.ndarray:
    """Label codes (N, K) of `n_cells` cells per request (one dict, or a list of them; None = unconditional)."""
    if n_cells is None or n_cells < 1:
        raise InputError(f"--n-cells must be >= 1, got {n_cells}")
    requests = [conditions or {}] if isinstance(conditions, dict) or conditions is None else list(conditions)
    codes = requests_from_conditions(n_cells, requests or [{}], sampler.keys, sampler.labels)
    for combo in unseen_combinations(codes, sampler.keys, sampler.labels, sampler.library_stats):
        log.warning(
            "the combination %s never occurred in training: generating it from the model's composition of "
            "the attributes",
            combo,
        )
    return codes


def run_sample(
    model: str | Path,
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
    dev = resolve_device(device)
    sampler = Sampler(load_model(model, map_location=dev), cfg, dev)
    if (like is None) == (n_cells is None):
        raise InputError("give either --n-cells (with optional --condition key=value) or --like reference.h5ad")
    ref_names = library = None
    if like is not None:
        if conditions:
            raise InputError("--condition cannot be combined with --like (the reference cells give the labels)")
        rows = None if shard is None else slice(*shard)
        codes, library, ref_names, n_total = requests_like(
            like, sampler.keys, sampler.labels, sampler.genes, rows, library=cfg.library == "like"
        )
        start, stop = (0, n_total) if shard is None else shard
        if not 0 <= start <= stop <= n_total:
            raise InputError(f"shard {start}:{stop} is outside the request of {n_total} cells")
        for combo in unseen_combinations(codes, sampler.keys, sampler.labels, sampler.library_stats):
            log.warning(
                "the combination %s never occurred in training: generating it from the model's composition "
                "of the attributes",
                combo,
            )
    else:
        if cfg.library == "like":
            raise InputError("--library-size like needs --like reference.h5ad")
        all_codes = request_codes(sampler, n_cells=n_cells, conditions=conditions)
        start, stop = (0, len(all_codes)) if shard is None else shard
        if not 0 <= start <= stop <= len(all_codes):
            raise InputError(f"shard {start}:{stop} is outside the request of {len(all_codes)} cells")
        codes = all_codes[start:stop]
    columns = sampler.gene_columns(genes)
    out_genes = list(genes) if genes is not None else sampler.genes
    X, lat, info = sampler.generate(codes, library, columns, start=start)
    info["seconds"] = round(time.time() - t0, 3)
    config = {
        **asdict(cfg),
        "model": str(model),
        "n_cells": n_cells,
        "conditions": conditions,
        "like": like,
        "shard": [start, stop],
        "device": str(dev),
    }
    adata = write_generated(
        out, X, codes, sampler, out_genes, start=start, latents=lat, info=info, config=config, reference_names=ref_names
    )
    log.info(
        "generated %d cells x %d genes in %.1fs (NFE per batch %.0f)",
        X.shape[0],
        X.shape[1],
        info["seconds"],
        info["nfe_per_batch"],
    )
    return adata


def parse_requests(text: str) -> list[dict[str, str]]:
    """'cell_type=B,stim=IL2;cell_type=NK' -> [{'cell_type': 'B', 'stim': 'IL2'}, {'cell_type': 'NK'}]."""
    return [parse_conditions([c for c in part.split(",") if c.strip()]) for part in text.split(";") if part.strip()]


def parse_conditions(items: Sequence[str], option: str = "--condition") -> dict[str, str]:
    """['cell_type=B', 'condition=stim'] -> {'cell_type': 'B', 'condition': 'stim'} with clear errors (naming
    `option`)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"{option} '{item}': expected key=value")
        k, v = item.split("=", 1)
        k, v = k.strip(), v.strip()
        if not k or not v:
            raise InputError(f"{option} '{item}': expected key=value")
        if k in out:
            raise InputError(f"{option}: key '{k}' given twice")
        out[k] = v
    return out
