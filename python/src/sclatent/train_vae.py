"""TRAIN_VAE: stage 1 of scLDM — the exchangeable Transformer VAE trained on token shards.

Glue between the token loader (`tokens.py`), the model (`nn/vae.py`) and the shared loop (`train.py`):
- the model is sized from the token manifest (G = vocabulary size) and a preset;
- each step decodes a random subset of `decode_genes` genes per cell (the paper trains on subsets of
  variables). By default (`subset="stratified"`) it holds the cell's expressed genes (all of them when they
  fit in 75% of the slots) and a sample of its unexpressed ones, importance-weighted so that the NLL and the
  softmax normaliser estimate the full-gene ones; `"cell"` (uniform per cell) and `"batch"` (one uniform
  subset per batch) rescale the NLL by G/Q instead;
- the per-gene NB dispersion table learns at 10x the learning rate (`theta_lr_scale`): at 1x it barely moves
  from its initial value in a CPU-length run (BENCHMARKS.md, "Per-gene dispersions");
- optionally, after the last step, the per-gene NB dispersions are refit by maximum likelihood on the training cells with
  every other weight fixed (`dispersion.py`; off by default, `refit_dispersion=True`);
- the run directory holds `checkpoint.pt`, `config.json` (model + training config, the vocabulary and label
  encoders it was trained with, input checksums, the refit's figures) and `history.csv`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dispersion import refit_dispersion
from .io import InputError
from .nn.vae import TransformerVAE, VAEConfig
from .tokens import MANIFEST, TokenBatch, TokenLoader, read_manifest
from .train import (
    TrainConfig,
    TrainResult,
    atomic_torch_save,
    atomic_write_json,
    distributed_job,
    load_checkpoint,
    load_run,
    train,
    training_steps,
)

log = logging.getLogger(__name__)


def vocabulary_digest(genes: list[str]) -> str:
    """A short fingerprint of an ordered gene vocabulary."""
    return hashlib.sha256("\n".join(genes).encode()).hexdigest()[:16]


# The VAE's per-gene embedding tables (besides the dispersions): each row is one gene's parameters, and its
# gradient comes only from the cells of a batch that hold or decode that gene.
# Per-gene tables whose learning rate `gene_lr_scale` multiplies. The encoder's per-gene count directions
# (count_embedding) have their own multiplier, `count_lr_scale`: measured apart, a faster count table helped and a
# faster decoder readout hurt (BENCHMARKS.md, "Per-gene tables' learning rate").
GENE_TABLES = ("gene_embedding", "gene_head_weight", "gene_bias", "pooled_head_weight", "readout_table")
COUNT_TABLE = "count_embedding"


@dataclass
class VAERunConfig:
    """Everything `sclatent train-vae` can set besides the training-loop settings."""

    preset: str = "default"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # VAEConfig fields (embedding, beta, ...)
    epochs: float = 100.0
    min_steps: int = 0  # at least this many steps whatever the epochs give (ignored with max_steps)
    max_steps: int | None = None  # overrides epochs when set
    decode_genes: int = 512  # genes per cell in the loss; 0 = all genes (the CLI's default depends on the device)
    subset: str = "stratified"  # "stratified": expressed genes first; "cell": uniform per cell; "batch": one per batch
    zero_fraction: float = 0.25  # "stratified": at least this share of the decoded genes are unexpressed ones
    max_tokens: int | None = None  # encoder input cap (default: the manifest's)
    theta_lr_scale: float = 10.0  # learning-rate multiplier of the per-gene dispersion table (nb, zinb); BENCHMARKS.md
    refit_dispersion: bool = False  # after training, refit that table by maximum likelihood (dispersion.py)
    gene_lr_scale: float = 1.0  # learning-rate multiplier of the per-gene tables (GENE_TABLES); BENCHMARKS.md
    count_lr_scale: float = 1.0  # learning-rate multiplier of the encoder's per-gene count directions (COUNT_TABLE)

    def validate(self) -> None:
        if not (math.isfinite(self.theta_lr_scale) and self.theta_lr_scale > 0):
            raise InputError(f"--theta-lr-scale must be a finite number > 0, got {self.theta_lr_scale}")
        if not (math.isfinite(self.gene_lr_scale) and self.gene_lr_scale > 0):
            raise InputError(f"--gene-lr-scale must be a finite number > 0, got {self.gene_lr_scale}")
        if not (math.isfinite(self.count_lr_scale) and self.count_lr_scale > 0):
            raise InputError(f"--count-lr-scale must be a finite number > 0, got {self.count_lr_scale}")
        if self.subset not in SUBSETS:
            raise InputError(f"--subset must be one of {', '.join(SUBSETS)}, got '{self.subset}'")
        if not 0.0 < self.zero_fraction < 1.0:
            raise InputError(f"--zero-fraction must be in (0, 1), got {self.zero_fraction}")
        if self.decode_genes < 0:
            raise InputError(f"--decode-genes must be >= 0 (0 = all genes), got {self.decode_genes}")
        if self.min_steps < 0:
            raise InputError(f"--min-steps must be >= 0, got {self.min_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise InputError(f"--epochs must be > 0, got {self.epochs}")


SUBSETS = ("cell", "batch", "stratified")


def stratified_subset(
    target: torch.Tensor, q: int, zero_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-cell sample of Q gene columns in two strata, expressed (x > 0) and unexpressed, with weights.

    target (B, G) counts. Each cell keeps k1 = min(n1, Q - ceil(zero_fraction * Q)) of its n1 expressed genes
    (all of them when they fit) and fills the other k0 = Q - k1 slots with unexpressed ones (fewer expressed
    genes are kept only when the cell has fewer than k0 zeros), both strata drawn uniformly without
    replacement. A drawn gene's weight is its stratum's size over its sample size (n1 / k1 or n0 / k0), so
    sum_g w_g f(x_g) is an unbiased estimate of the sum over all G genes (Horvitz-Thompson).
    Why: a uniform subset of 256 of 2,000 genes holds ~25 of a typical pbmc3k cell's ~190 expressed genes,
    and those carry most of the likelihood's information; this one holds all 190 at the same decoding cost.
    Returns column indices (B, Q) int64 (gene id - 1) and weights (B, Q) float32.
    """
    B, G = target.shape
    dev = target.device
    expressed = target > 0  # (B, G)
    n1 = expressed.sum(dim=1)  # (B,)
    n0 = G - n1
    room = q - math.ceil(zero_fraction * q)  # slots open to expressed genes
    k1 = torch.maximum(torch.clamp(n1, max=room), q - n0)  # too few zeros: keep more expressed genes
    k0 = q - k1
    # Random keys with the expressed genes in [0, 1) and the unexpressed in [2, 3). The `room` smallest keys
    # are min(n1, room) random expressed genes (topped up with random zeros when n1 < room), the q - room
    # largest are random zeros (topped up with random expressed genes when n0 < q - room); the two sets are
    # disjoint whenever q <= G, and together they are the draw described above. Two top-k's rather than
    # one sort of all G keys: 3 vs 7 ms per 64 x 2,000 batch on this CPU.
    keys = torch.rand((B, G), generator=generator, device=generator.device).to(dev) + 2.0 * (~expressed)
    low = keys.topk(room, dim=1, largest=False).indices  # (B, room)
    high = keys.topk(q - room, dim=1, largest=True).indices  # (B, q - room)
    idx = torch.cat([low, high], dim=1)  # (B, Q)
    drawn_expressed = expressed.gather(1, idx)  # (B, Q)
    w1 = n1.float() / k1.clamp(min=1).float()  # (B,)
    w0 = n0.float() / k0.clamp(min=1).float()
    weights = torch.where(drawn_expressed, w1[:, None], w0[:, None])  # (B, Q)
    return idx, weights


class VAELoss:
    """loss_fn for `train.train`: decode a random gene subset of each cell and return the negative ELBO."""

    def __init__(self, n_genes: int, decode_genes: int, subset: str, zero_fraction: float = 0.25) -> None:
        self.n_genes = n_genes
        self.q = n_genes if decode_genes <= 0 or decode_genes >= n_genes else decode_genes
        self.subset = subset
        self.zero_fraction = zero_fraction

    def __call__(self, model: TransformerVAE, batch: dict[str, torch.Tensor], generator: torch.Generator):
        target = batch["target"]  # (B, G) all counts of the cells
        B, G = target.shape
        dev = target.device
        weights = None
        if self.q == G:
            idx = torch.arange(G, device=dev)  # (G,)
            target_genes, target_counts = idx + 1, target
        elif self.subset == "batch":
            idx = torch.randperm(G, generator=generator, device=generator.device)[: self.q].to(dev)  # (Q,)
            target_genes, target_counts = idx + 1, target[:, idx]
        elif self.subset == "stratified":
            idx, weights = stratified_subset(target, self.q, self.zero_fraction, generator)  # (B, Q) x 2
            target_genes, target_counts = idx + 1, target.gather(1, idx)
        else:
            # a uniform random subset per cell: the Q smallest of G uniform keys
            keys = torch.rand((B, G), generator=generator, device=generator.device).to(dev)
            idx = keys.topk(self.q, dim=1, largest=False).indices  # (B, Q)
            target_genes, target_counts = idx + 1, target.gather(1, idx)
        out = model.loss(
            batch["genes"], batch["counts"], batch["mask"], batch["library_size"], target_genes, target_counts,
            generator=generator, target_weights=weights,
        )
        return out["loss"], {"nll": out["nll"].item(), "kl": out["kl"].item()}


def token_batch_rows(batch: TokenBatch, rows: slice) -> TokenBatch:
    """The cells ``rows`` of a token batch (one DDP rank's share; see `train.train`).

    The encoder inputs keep the batch's padded width S, so every cell is encoded exactly as in the whole
    batch; the CSR decoder target is cut to the same cells.
    """
    a, b = rows.start, rows.stop
    if rows.step not in (None, 1) or not 0 <= a <= b <= len(batch):
        raise ValueError(f"rows must be a contiguous slice of the {len(batch)} cells, got {rows}")
    lo, hi = int(batch.target_indptr[a]), int(batch.target_indptr[b])
    return TokenBatch(
        genes=batch.genes[a:b],  # (b - a, S)
        counts=batch.counts[a:b],
        mask=batch.mask[a:b],
        library_size=batch.library_size[a:b],  # (b - a,)
        labels=batch.labels[a:b],  # (b - a, K)
        cell_index=batch.cell_index[a:b],
        target_indptr=batch.target_indptr[a : b + 1] - lo,  # (b - a + 1,)
        target_genes=batch.target_genes[lo:hi],
        target_counts=batch.target_counts[lo:hi],
    )


def gene_bias_init(loader: TokenLoader, likelihood: str) -> torch.Tensor:
    """Initial per-gene offsets (G,) from the training cells, one pass over the shards.

    Count likelihoods: log of the gene's mean expression fraction, mean over cells of x_g / L, so that at step 0
    the decoder's softmax already gives the average profile (floored at 1e-9 for genes never seen). Gaussian:
    the mean over cells of log1p(1e4 x_g / L), its target's average.
    """
    G = loader.n_genes
    total = np.zeros(G + 1)
    n = 0
    for i in range(len(loader.shards)):
        shard = loader.load_shard(i)
        lib = shard["library_size"].astype(np.float64)  # (n,)
        rows = np.repeat(np.arange(len(lib)), np.diff(shard["indptr"]))  # (nnz,)
        frac = shard["counts"].astype(np.float64) / np.maximum(lib[rows], 1.0)  # (nnz,)
        values = np.log1p(1e4 * frac) if likelihood == "gaussian" else frac
        total += np.bincount(shard["genes"], weights=values, minlength=G + 1)
        n += len(lib)
    mean = total[1:] / max(n, 1)  # (G,)
    if likelihood != "gaussian":
        mean = np.log(np.maximum(mean, 1e-9))
    return torch.from_numpy(mean).float()


def depth_stats_init(loader: TokenLoader) -> tuple[list[float], list[float]]:
    """Means and standard deviations (2,) of the encoder's depth features (`TransformerVAE.depth_of`: log1p of a
    cell's total token count, log1p of its number of tokens) over the training cells, one pass over the shards.

    A cell above the loader's max_tokens gets a random subset of that many tokens as encoder input; its features
    are taken at their expected values (max_tokens tokens holding total * max_tokens / n counts).
    """
    cap = loader.max_tokens
    parts = []
    for i in range(len(loader.shards)):
        shard = loader.load_shard(i)
        n = np.diff(shard["indptr"]).astype(np.float64)  # (cells,)
        total = np.zeros(len(n))
        nonempty = n > 0
        starts = shard["indptr"][:-1][nonempty]
        if len(starts):
            total[nonempty] = np.add.reduceat(shard["counts"].astype(np.float64), starts)
        if cap:
            kept = np.minimum(n, cap)
            total = total * np.where(n > 0, kept / np.maximum(n, 1), 0.0)
            n = kept
        parts.append(np.stack([np.log1p(total), np.log1p(n)], axis=1))  # (cells, 2)
    x = np.concatenate(parts) if parts else np.zeros((0, 2))
    mean = x.mean(axis=0) if len(x) else np.zeros(2)
    sd = x.std(axis=0) if len(x) > 1 else np.ones(2)
    return mean.tolist(), np.where(sd > 1e-6, sd, 1.0).tolist()


def train_vae(
    tokens_dir: str | Path,
    out_dir: str | Path,
    run: VAERunConfig,
    tcfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train the VAE on `tokens_dir`'s train split into `out_dir` (see the module docstring)."""
    run.validate()
    manifest = read_manifest(tokens_dir)
    G = int(manifest["n_genes"])
    try:
        model_cfg = VAEConfig.preset(run.preset, G, **run.model_overrides)
    except (ValueError, TypeError) as exc:
        raise InputError(f"VAE configuration: {exc}") from None
    loader = TokenLoader(
        tokens_dir, "train", batch_size=tcfg.batch_size, shuffle=True, seed=tcfg.seed, max_tokens=run.max_tokens
    )
    tcfg.max_steps = training_steps(run.epochs, loader.n_batches(), run.min_steps, run.max_steps)
    model = TransformerVAE(model_cfg, seed=tcfg.seed)
    if run.theta_lr_scale != 1.0 and hasattr(model, "log_theta"):
        tcfg.lr_scales = {**tcfg.lr_scales, "log_theta": run.theta_lr_scale}
    if run.gene_lr_scale != 1.0:
        tables = {name: run.gene_lr_scale for name in GENE_TABLES if hasattr(model, name)}
        tcfg.lr_scales = {**tcfg.lr_scales, **tables}
    if run.count_lr_scale != 1.0 and hasattr(model, COUNT_TABLE):
        tcfg.lr_scales = {**tcfg.lr_scales, COUNT_TABLE: run.count_lr_scale}
    if model_cfg.gene_bias:
        model.init_gene_bias(gene_bias_init(loader, model_cfg.likelihood))
    if model_cfg.depth_features:
        model.set_depth_stats(*depth_stats_init(loader))
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "VAE %s: %d genes, %d parameters, %d steps (%d cells, %d batches/epoch), decoding %s genes per %s",
        run.preset, G, n_params, tcfg.max_steps, loader.n_cells, loader.n_batches(),
        "all" if run.decode_genes <= 0 else run.decode_genes, run.subset,
    )
    metadata = {
        "stage": "vae",
        "run": asdict(run),
        "n_parameters": n_params,
        "genes": manifest["genes"],
        "vocabulary_digest": vocabulary_digest(manifest["genes"]),
        "condition_keys": manifest["condition_keys"],
        "labels": manifest["labels"],
        "library_size": manifest["library_size"],
        "tokens_manifest": str(Path(tokens_dir) / MANIFEST),
        "tokens_provenance": manifest.get("provenance", {}),
    }
    result = train(
        model,
        VAELoss(G, run.decode_genes, run.subset, run.zero_fraction),
        loader,
        tcfg,
        Path(out_dir),
        resume=resume,
        model_config=model_cfg.to_dict(),
        metadata=metadata,
        progress=progress,
        cells_in_batch=len,
        move_batch=lambda b, device: b.to_torch(device, dense_target=G),
        split_batch=token_batch_rows,
    )
    job = distributed_job()
    if run.refit_dispersion and hasattr(model, "log_theta") and (job is None or job.rank == 0):
        _refit_run_dispersion(result, tokens_dir, seed=tcfg.seed)
    return result


def _refit_run_dispersion(result: TrainResult, tokens_dir: str | Path, *, seed: int) -> None:
    """Refit the per-gene dispersions of the finished run's weights (and of their EMA, when kept) by maximum
    likelihood on the training cells, then rewrite checkpoint.pt and config.json (atomically; see dispersion.py)."""
    model = result.model
    device = next(model.parameters()).device
    ckpt = load_checkpoint(result.checkpoint_path, map_location="cpu")
    reports: dict[str, Any] = {}
    for which in ("ema", "model"):  # "model" last: the returned module then holds the trained weights
        if ckpt.get(which) is None:
            continue
        model.load_state_dict(ckpt[which])
        reports[which] = refit_dispersion(model, str(tokens_dir), seed=seed, device=device)
        ckpt[which]["log_theta.weight"] = model.log_theta.weight.detach().cpu().clone()
    if result.ema is not None and "ema" in reports:
        result.ema.load_state_dict(ckpt["ema"])
    atomic_torch_save(result.checkpoint_path, ckpt)
    config = json.loads(result.config_path.read_text())
    config["metadata"]["dispersion_refit"] = {"after_step": int(ckpt["step"]), **reports}
    atomic_write_json(result.config_path, config)


def load_vae(run_dir: str | Path, *, weights: str = "auto", map_location: str | torch.device = "cpu") -> tuple[TransformerVAE, dict]:
    """Load a trained VAE from its run directory: (model in eval mode, config.json content)."""
    return load_run(run_dir, "vae", lambda c: TransformerVAE(VAEConfig.from_dict(c)), weights=weights, map_location=map_location)


def check_vocabulary(cfg: dict, manifest: dict, *, what: str) -> None:
    """Refuse a token manifest whose vocabulary or labels differ from those the model was trained with."""
    genes, theirs = cfg["metadata"]["genes"], manifest["genes"]
    if genes != theirs:
        if len(genes) != len(theirs):
            detail = f"{len(genes)} genes in the model vs {len(theirs)} in the tokens"
        else:
            i = next(i for i, (a, b) in enumerate(zip(genes, theirs)) if a != b)
            detail = f"gene {i + 1} is '{genes[i]}' in the model but '{theirs[i]}' in the tokens"
        raise InputError(f"{what}: the gene vocabulary differs from the model's ({detail})")
    if cfg["metadata"]["condition_keys"] != manifest["condition_keys"]:
        raise InputError(
            f"{what}: condition keys {manifest['condition_keys']} differ from the model's {cfg['metadata']['condition_keys']}"
        )
    for key, cats in cfg["metadata"]["labels"].items():
        if manifest["labels"].get(key) != cats:
            raise InputError(f"{what}: the categories of '{key}' differ from the model's ({manifest['labels'].get(key)} vs {cats})")
