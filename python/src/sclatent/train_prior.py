"""TRAIN_PRIOR: stage 2 of scLDM — the DiT flow-matching prior over the frozen VAE's latents.

Reads `latents.npz` from ENCODE, standardises the latents with per-(token, dimension) statistics of the
training cells (stored in the checkpoint's config so that sampling can undo it), and trains the DiT with the
linear-interpolant flow-matching loss and per-attribute label dropout (`flow.flow_matching_loss`) in the shared
loop of `train.py`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .finetune import init_provenance, load_init, prior_config, transfer_prior
from .flow import flow_matching_loss
from .io import InputError, read_json
from .nn.dit import DiT, DiTConfig
from .train import TrainConfig, TrainResult, train, training_steps

log = logging.getLogger(__name__)


@dataclass
class PriorTraining:
    """What `sclatent train-prior` sets besides the optimiser and schedule (`TrainConfig`)."""

    preset: str | None = "default"  # DiTConfig.preset name; None: the --init-from model's (else "default")
    epochs: float = 100.0
    min_steps: int = 2000  # at least this many steps whatever the epochs give (ignored with max_steps)
    max_steps: int | None = None
    rho: float = 0.2  # probability of dropping each label to its null token (independently per attribute)
    init_from: str | None = None  # a model bundle whose prior weights the run starts from (finetune.py)
    dropout: str = "independent"  # label-dropout scheme (nn.dit.DROPOUT_SCHEMES)

    def validate(self) -> None:
        if not 0.0 <= self.rho <= 1.0:
            raise InputError(f"--rho must be in [0, 1], got {self.rho}")
        if self.min_steps < 0:
            raise InputError(f"--min-steps must be >= 0, got {self.min_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise InputError(f"--epochs must be > 0, got {self.epochs}")


class LatentBatches:
    """In-memory batches of (z, labels) with a seeded order per epoch; resumable at any batch."""

    def __init__(self, z: np.ndarray, labels: np.ndarray, batch_size: int, seed: int) -> None:
        self.z = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))  # (N, m, dl)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))  # (N, K)
        self.batch_size = batch_size
        self.seed = seed

    def n_batches(self, epoch: int = 0) -> int:
        return -(-len(self.z) // self.batch_size)

    def __len__(self) -> int:
        return self.n_batches()

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _, batch in self.iter_shares(epoch, start_batch, None):
            yield batch

    def iter_shares(
        self, epoch: int, start_batch: int, share: Callable[[int], slice] | None
    ) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
        """(cells in the batch, (z, labels) of its cells `share(cells)`) per batch (see train.BatchSource)."""
        order = torch.from_numpy(np.random.default_rng([self.seed, epoch]).permutation(len(self.z)))
        for b in range(start_batch, self.n_batches()):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            mine = idx if share is None else idx[share(len(idx))]
            yield len(idx), (self.z[mine], self.labels[mine])


class PriorLoss:
    """loss_fn for `train.train`: flow matching with label dropout."""

    def __init__(self, rho: float, scheme: str = "independent") -> None:
        self.rho = rho
        self.scheme = scheme

    def __call__(self, model: DiT, batch: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator):
        z, labels = batch
        loss = flow_matching_loss(model, z, labels, generator, self.rho, self.scheme)
        return loss, {}


def read_latents(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays of an ENCODE latents.npz (train_z, train_labels, ...)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read latents ({exc})") from None
    for key in ("train_z", "train_labels"):
        if key not in out:
            raise InputError(f"{path}: missing array '{key}' (is this ENCODE's latents.npz?)")
    if len(out["train_z"]) == 0:
        raise InputError(f"{path}: no training latents")
    return out


def train_prior(
    latents_path: str | Path,
    out_dir: str | Path,
    run: PriorTraining,
    tcfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train the DiT prior on ENCODE's latents into `out_dir`."""
    run.validate()
    arrays = read_latents(latents_path)
    sidecar = read_json(Path(latents_path).with_suffix(".json"))
    z = arrays["train_z"].astype(np.float32)  # (N, m, dl)
    labels = arrays["train_labels"].astype(np.int64)  # (N, K)
    n_classes = [len(sidecar["labels"][k]) for k in sidecar["condition_keys"]]
    if labels.shape[1] != len(n_classes):
        raise InputError(f"{latents_path}: labels have {labels.shape[1]} columns but {len(n_classes)} condition keys")
    init = load_init(run.init_from, "prior") if run.init_from else None
    if init is not None and tuple(init.latent_mean.shape) == z.shape[1:]:
        # a fine-tune keeps the model's standardisation, so that its prior's latent space does not move
        mean, std = init.latent_mean.numpy(), init.latent_std.numpy()  # (m, dl)
    else:
        mean = z.mean(axis=0)  # (m, dl)
        std = z.std(axis=0) + 1e-6  # (m, dl)
    z = (z - mean) / std
    try:
        asked = (
            DiTConfig.preset(run.preset or "default", d_latent=z.shape[2], n_tokens=z.shape[1], n_classes=n_classes)
            if run.preset is not None or not run.init_from
            else None
        )
    except ValueError as exc:
        raise InputError(f"DiT configuration: {exc}") from None
    model_cfg = prior_config(run.init_from, init, asked, z.shape[1:], n_classes) if init is not None else asked
    data = LatentBatches(z, labels, tcfg.batch_size, tcfg.seed)
    tcfg.max_steps = training_steps(run.epochs, data.n_batches(), run.min_steps, run.max_steps)
    torch.manual_seed(tcfg.seed)
    model = DiT(model_cfg)
    started_from = None
    if init is not None:
        keys, categories = list(sidecar["condition_keys"]), sidecar["labels"]
        started_from = {"path": str(run.init_from), **init_provenance(init)}
        started_from.update(transfer_prior(init.prior, init.labels, init.condition_keys, model, categories, keys))
        log.info(
            "fine-tuning the prior of %s: new label values %s, keys left out %s",
            run.init_from,
            started_from["labels_added"] or "none",
            started_from["keys_left_out"] or "none",
        )
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "DiT %s: %d parameters, %d latent cells, %d steps, rho=%.2f",
        run.preset,
        n_params,
        len(z),
        tcfg.max_steps,
        run.rho,
    )
    metadata = {
        "stage": "prior",
        "run": asdict(run),
        "n_parameters": n_params,
        "latent_mean": mean.tolist(),
        "latent_std": std.tolist(),
        "condition_keys": sidecar["condition_keys"],
        "labels": sidecar["labels"],
        "library_size": sidecar["library_size"],
        "genes": sidecar["genes"],
        "vocabulary_digest": sidecar["vocabulary_digest"],
        "vae": sidecar["vae"],
        "latents": str(latents_path),
        "init_from": started_from,
    }
    return train(
        model,
        PriorLoss(run.rho, run.dropout),
        data,
        tcfg,
        Path(out_dir),
        resume=resume,
        model_config=model_cfg.to_dict(),
        metadata=metadata,
        progress=progress,
        cells_in_batch=lambda b: len(b[0]),
    )
