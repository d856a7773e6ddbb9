"""TRAIN_VAE: stage 1 of scLDM, the exchangeable Transformer VAE trained on TOKENIZE's shards.

Each step encodes every cell's expressed genes (at most `max_tokens`) and decodes `decode_genes` genes per cell:
its expressed genes first, then a sample of its unexpressed ones, importance-weighted so that the loss estimates
the all-gene one (`stratified_subset`); 0 decodes every gene (the authors' setting). The per-gene NB dispersions
learn at `theta_lr_scale` times the learning rate. The run folder holds checkpoint.pt, config.json, history.csv.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .finetune import init_provenance, load_init, transfer_vae, vae_config
from .io import InputError
from .nn.vae import TransformerVAE, VAEConfig
from .tokens import MANIFEST, TokenLoader, read_manifest, vocabulary_digest
from .train import TrainConfig, TrainResult, train, training_steps

log = logging.getLogger(__name__)

ZERO_FRACTION = 0.25  # the least share of a cell's decoded genes drawn from its unexpressed genes


@dataclass
class VAETraining:
    """What `sclatent train-vae` sets besides the optimiser and schedule (`TrainConfig`)."""

    preset: str | None = "default"  # VAEConfig.preset name; None: the --init-from model's (else "default")
    model_overrides: dict[str, Any] = field(default_factory=dict)  # VAEConfig fields (likelihood, beta, ...)
    epochs: float = 100.0
    min_steps: int = 5000  # at least this many steps whatever the epochs give (ignored with max_steps)
    max_steps: int | None = None  # overrides epochs and min_steps when set
    decode_genes: int = 512  # genes per cell in the loss; 0 = all genes
    max_tokens: int | None = None  # encoder input cap (default: the manifest's)
    theta_lr_scale: float = 10.0  # learning-rate multiplier of the per-gene dispersions (nb, zinb)
    init_from: str | None = None  # a model bundle whose VAE weights the run starts from (finetune.py)

    def validate(self) -> None:
        if not (math.isfinite(self.theta_lr_scale) and self.theta_lr_scale > 0):
            raise InputError(f"theta_lr_scale must be a finite number > 0, got {self.theta_lr_scale}")
        if self.decode_genes < 0:
            raise InputError(f"--decode-genes must be >= 0 (0 = all genes), got {self.decode_genes}")
        if self.min_steps < 0:
            raise InputError(f"--min-steps must be >= 0, got {self.min_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise InputError(f"--epochs must be > 0, got {self.epochs}")


def stratified_subset(
    target: torch.Tensor, q: int, zero_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-cell sample of Q genes in two strata, expressed (x > 0) and unexpressed, with Horvitz-Thompson weights.

    target (B, G) counts. A cell keeps k1 = min(n1, Q - ceil(zero_fraction Q)) of its n1 expressed genes (more only
    when it has too few zeros) and fills the k0 = Q - k1 other slots with unexpressed ones, both drawn uniformly
    without replacement; a drawn gene weighs its stratum's size over its sample size, so sum_g w_g f(x_g) is an
    unbiased estimate of the sum over all G genes. Returns column indices (B, Q) int64 and weights (B, Q) float32.
    """
    B, G = target.shape
    expressed = target > 0  # (B, G)
    n1 = expressed.sum(dim=1)  # (B,)
    n0 = G - n1
    room = q - math.ceil(zero_fraction * q)  # slots open to expressed genes
    k1 = torch.maximum(torch.clamp(n1, max=room), q - n0)
    k0 = q - k1
    # random keys in [0, 1) for expressed genes and [2, 3) for the others: the `room` smallest are random expressed
    # genes (topped up with zeros), the q - room largest random zeros (topped up with expressed genes); two top-k's
    # are cheaper than sorting all G keys
    keys = torch.rand((B, G), generator=generator, device=generator.device).to(target.device) + 2.0 * (~expressed)
    low = keys.topk(room, dim=1, largest=False).indices  # (B, room)
    high = keys.topk(q - room, dim=1, largest=True).indices  # (B, q - room)
    idx = torch.cat([low, high], dim=1)  # (B, Q)
    w1 = n1.float() / k1.clamp(min=1).float()  # (B,)
    w0 = n0.float() / k0.clamp(min=1).float()
    return idx, torch.where(expressed.gather(1, idx), w1[:, None], w0[:, None])  # (B, Q) x 2


class VAELoss:
    """loss_fn of `train.train`: decode each cell's stratified gene sample (or every gene) and return the -ELBO."""

    def __init__(self, n_genes: int, decode_genes: int) -> None:
        self.q = n_genes if decode_genes <= 0 or decode_genes >= n_genes else decode_genes

    def __call__(self, model: TransformerVAE, batch: dict[str, torch.Tensor], generator: torch.Generator):
        target = batch["target"]  # (B, G): every count of the cells
        G = target.shape[1]
        if self.q == G:
            genes, counts, weights = torch.arange(1, G + 1, device=target.device), target, None
        else:
            idx, weights = stratified_subset(target, self.q, ZERO_FRACTION, generator)  # (B, Q) x 2
            genes, counts = idx + 1, target.gather(1, idx)
        out = model.loss(
            batch["genes"],
            batch["counts"],
            batch["mask"],
            batch["library_size"],
            genes,
            counts,
            target_weights=weights,
            generator=generator,
        )
        return out["loss"], {"nll": out["nll"].item(), "kl": out["kl"].item()}


def train_vae(
    tokens_dir: str | Path,
    out_dir: str | Path,
    run: VAETraining,
    tcfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train the VAE on `tokens_dir`'s train split into the run folder `out_dir`."""
    run.validate()
    manifest = read_manifest(tokens_dir)
    G = int(manifest["n_genes"])
    init = load_init(run.init_from, "vae") if run.init_from else None
    if init is not None:
        model_cfg = vae_config(run.init_from, init, G, run.preset, run.model_overrides)
    else:
        try:
            model_cfg = VAEConfig.preset(run.preset or "default", G, **run.model_overrides)
        except (ValueError, TypeError) as exc:
            raise InputError(f"VAE configuration: {exc}") from None
    loader = TokenLoader(
        tokens_dir, "train", batch_size=tcfg.batch_size, shuffle=True, seed=tcfg.seed, max_tokens=run.max_tokens
    )
    tcfg.max_steps = training_steps(run.epochs, loader.n_batches(), run.min_steps, run.max_steps)
    model = TransformerVAE(model_cfg, seed=tcfg.seed)
    started_from = None
    if init is not None:
        started_from = {"path": str(run.init_from), **init_provenance(init)}
        started_from.update(transfer_vae(init.vae, init.genes, model, manifest["genes"]))
        log.info(
            "fine-tuning the VAE of %s: %d genes kept, %d added, %d of its genes not in the tokens' vocabulary",
            run.init_from,
            started_from["genes_kept"],
            started_from["genes_added"],
            started_from["genes_left_out"],
        )
    if model.head.log_theta is not None and run.theta_lr_scale != 1.0:
        tcfg.lr_scales = {**tcfg.lr_scales, "head.log_theta": run.theta_lr_scale}
    n_params = sum(p.numel() for p in model.parameters())
    q = "all" if run.decode_genes <= 0 or run.decode_genes >= G else run.decode_genes
    log.info(
        "VAE %s: %d genes, %d parameters, %d steps (%d cells, %d batches/epoch), decoding %s genes per cell",
        run.preset,
        G,
        n_params,
        tcfg.max_steps,
        loader.n_cells,
        loader.n_batches(),
        q,
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
        "init_from": started_from,
    }
    return train(
        model,
        VAELoss(G, run.decode_genes),
        loader,
        tcfg,
        Path(out_dir),
        resume=resume,
        model_config=model_cfg.to_dict(),
        metadata=metadata,
        progress=progress,
        cells_in_batch=len,
        stage_batch=lambda b: b.to_torch("cpu", dense_target=G),  # in the prefetch thread
    )
