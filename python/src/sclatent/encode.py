"""ENCODE: latents of the training and test cells, and reconstruction metrics on the test cells.

Latents are the posterior means (B, m, d_latent), in cell order. Reconstruction (paper Table 1, defined in
`metrics.reconstruction`): every test cell, or a seeded subset of `max_cells` of them, is encoded, decoded over all
G model genes with its observed library size, and compared with its counts.

Outputs: `latents.npz` (train_z, train_labels, train_library_size, train_cell_index, and the same for test) with a
`latents.json` sidecar (vocabulary, labels, the VAE, provenance), and `reconstruction.json`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import check_vocabulary, load_model
from .counts import subsample
from .device import resolve_device
from .inference import encode_batches, reconstruct_batches
from .io import InputError, atomic_outputs, dump_json, provenance
from .metrics import reconstruction_metrics
from .tokens import TokenLoader, read_manifest, vocabulary_digest
from .train import Prefetcher

log = logging.getLogger(__name__)

DEFINITIONS = {
    "re_nll_gene_sum_cell_mean": "RE: NB negative log-likelihood summed over the model genes, mean over cells",
    "pcc_gene_batch256_*": "per-gene Pearson r across the cells of consecutive 256-cell batches (file order), "
    "nanmean over genes, mean over batches (the scLDM code's PCC)",
    "pcc_gene_all_*": "per-gene Pearson r across all evaluated cells, nanmean over genes",
    "pcc_cell_*": "per-cell Pearson r across genes, nanmean over cells",
    "mse_*": "mean squared error over cells x genes",
    "*_sample / *_mean": "one NB sample of the reconstruction / the NB mean; all on log1p(1e4 x / sum x)",
}


@dataclass
class EncodeConfig:
    """Settings of `sclatent encode`."""

    batch_size: int = 256
    max_cells: int = 10_000  # test cells in the reconstruction metrics (a seeded subset beyond)
    seed: int = 0  # of the subset and of the reconstruction's NB sample
    device: str = "auto"

    def validate(self) -> None:
        if self.batch_size < 1 or self.max_cells < 1:
            raise InputError(f"--batch-size and --max-cells must be >= 1, got {self.batch_size}, {self.max_cells}")


def reconstruction(vae, loader: TokenLoader, device, *, max_cells: int, seed: int) -> dict[str, Any]:
    """Table 1 metrics of (a seeded subset of at most `max_cells` of) the cells of `loader`."""
    keep = np.zeros(loader.n_cells, dtype=bool)
    keep[subsample(loader.n_cells, max_cells, seed)] = True
    rec = reconstruct_batches(vae, loader.iter_epoch(0), keep, device, seed)
    metrics = reconstruction_metrics(rec["truth"], rec["sample"], rec["mean"], rec["nll"])
    metrics.update(n_cells_total=int(loader.n_cells), subsampled=bool(loader.n_cells > max_cells))
    return metrics


def encode(model_path: str | Path, tokens_dir: str | Path, outdir: str | Path, cfg: EncodeConfig) -> dict[str, Any]:
    """Run ENCODE with a VAE run folder or model bundle; writes latents.npz, latents.json, reconstruction.json."""
    cfg.validate()
    t0 = time.time()
    device = resolve_device(cfg.device)
    bundle = load_model(model_path, map_location=device)
    vae = bundle.vae
    manifest = read_manifest(tokens_dir)
    meta = {"genes": bundle.genes, "condition_keys": bundle.condition_keys, "labels": bundle.labels}
    check_vocabulary(meta, manifest, what=str(tokens_dir))
    arrays: dict[str, np.ndarray] = {}
    recon: dict[str, Any] = {}
    for split in ("train", "test"):
        if split not in manifest["splits"]:
            continue
        loader = TokenLoader(tokens_dir, split, batch_size=cfg.batch_size, shuffle=False, seed=cfg.seed)
        batches = Prefetcher(loader.iter_epoch(0))  # the next batches collate while the model encodes
        arrays.update({f"{split}_{k}": v for k, v in encode_batches(vae, batches, device).items()})
        log.info("encoded %d %s cells", loader.n_cells, split)
        if split == "test":
            recon = reconstruction(vae, loader, device, max_cells=cfg.max_cells, seed=cfg.seed)
    if not recon:
        log.warning("no test split in %s: reconstruction metrics skipped", tokens_dir)
    config = {**asdict(cfg), "device": str(device)}
    prov = provenance("encode", config, {"model": Path(model_path) if Path(model_path).is_file() else None})
    sidecar = {
        "genes": manifest["genes"],
        "vocabulary_digest": vocabulary_digest(manifest["genes"]),
        "condition_keys": manifest["condition_keys"],
        "labels": manifest["labels"],
        "library_size": manifest["library_size"],
        "latent_shape": list(arrays["train_z"].shape[1:]),
        "vae": {"path": str(model_path), "model_config": vae.config.to_dict()},
        "provenance": prov,
    }
    recon_doc = {
        "elapsed_s": round(time.time() - t0, 3),
        "metrics": recon,
        "split": "test",
        "likelihood": vae.config.likelihood,
        "definitions": DEFINITIONS,
        "provenance": prov,
    }
    outdir = Path(outdir)
    with atomic_outputs(outdir / "latents.npz", outdir / "latents.json", outdir / "reconstruction.json") as tmps:
        with open(tmps[0], "wb") as fh:
            np.savez(fh, **arrays)
        dump_json(sidecar, tmps[1])
        dump_json(recon_doc, tmps[2])
    log.info(
        "ENCODE done in %.1fs: RE %.1f, PCC(batch256, sample) %s",
        time.time() - t0,
        recon.get("re_nll_gene_sum_cell_mean", float("nan")),
        recon.get("pcc_gene_batch256_sample"),
    )
    return recon_doc
