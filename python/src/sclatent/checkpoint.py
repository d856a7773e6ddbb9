"""Checkpoints of training runs and the model bundle that every later step and the Python API load.

A training run folder holds `checkpoint.pt` (state dicts, optimiser and RNG states: exact resume), `config.json`
(model and training configuration, vocabulary, labels, provenance) and `history.csv`.

The model bundle `model.pt` is one file with everything needed to use a trained model: the VAE's and the prior's
weights and configurations, the gene vocabulary, the label vocabularies, the latent standardisation, the
library-size model and the versions that made it. Like the checkpoints it holds only tensors and plain Python
values, and loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .io import InputError, atomic_path, read_json
from .nn.dit import DiT, DiTConfig
from .nn.vae import TransformerVAE, VAEConfig

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
HISTORY_NAME = "history.csv"
BUNDLE_NAME = "model.pt"
BUNDLE_FORMAT = "sclatent-model"
BUNDLE_VERSION = 1  # bumped whenever a bundle written by an older sclatent could not be read correctly
WEIGHTS = ("auto", "ema", "model")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save` to a temporary file beside `path`, then rename it onto `path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """`torch.load(weights_only=True)` of a checkpoint or bundle; a missing, truncated or foreign file is one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{path}: not a readable sclatent checkpoint (truncated or not written by torch.save: {reason[:200]})"
        ) from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a sclatent checkpoint (holds a {type(obj).__name__}, not a dict)")
    return obj


def build_model(stage: str, model_config: dict[str, Any]) -> nn.Module:
    """An empty VAE ("vae") or DiT prior ("prior") of the given configuration."""
    try:
        if stage == "vae":
            return TransformerVAE(VAEConfig.from_dict(model_config))
        return DiT(DiTConfig.from_dict(model_config))
    except (TypeError, ValueError) as exc:
        raise InputError(f"the {stage} configuration cannot be built by sclatent {__version__}: {exc}") from None


def load_run(
    run_dir: str | os.PathLike, stage: str, *, weights: str = "auto", map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """A finished training run of `stage` ("vae" | "prior"): (model in eval mode, config.json content).

    weights: "ema", "model", or "auto" (the EMA when the run kept one).
    """
    if weights not in WEIGHTS:
        raise InputError(f"weights must be one of {', '.join(WEIGHTS)}, got '{weights}'")
    run_dir = Path(run_dir)
    if run_dir.is_dir() and not (run_dir / CONFIG_NAME).exists():
        raise InputError(f"{run_dir}: not a TRAIN_{stage.upper()} run folder (no {CONFIG_NAME})")
    cfg = read_json(run_dir / CONFIG_NAME)
    found = cfg.get("metadata", {}).get("stage")
    if found != stage:
        raise InputError(f"{run_dir}: not a {stage} run folder (its config.json stage is {found!r})")
    ckpt = load_checkpoint(run_dir / CHECKPOINT_NAME, map_location=map_location)
    use_ema = weights == "ema" or (weights == "auto" and ckpt.get("ema") is not None)
    if use_ema and ckpt.get("ema") is None:
        raise InputError(f"{run_dir}: no EMA weights in the checkpoint (train with --ema-decay)")
    model = build_model(stage, cfg["model_config"])
    model.load_state_dict(ckpt["ema"] if use_ema else ckpt["model"])
    model.eval()
    cfg["weights_used"] = "ema" if use_ema else "model"
    return model, cfg


def check_vocabulary(meta: dict[str, Any], manifest: dict[str, Any], *, what: str) -> None:
    """Refuse tokens whose gene vocabulary, condition keys or label categories differ from the model's `meta`."""
    genes, theirs = meta["genes"], manifest["genes"]
    if genes != theirs:
        if len(genes) != len(theirs):
            detail = f"{len(genes)} genes in the model vs {len(theirs)} in the tokens"
        else:
            i = next(i for i, (a, b) in enumerate(zip(genes, theirs)) if a != b)
            detail = f"gene {i + 1} is '{genes[i]}' in the model but '{theirs[i]}' in the tokens"
        raise InputError(f"{what}: the gene vocabulary differs from the model's ({detail})")
    if meta["condition_keys"] != manifest["condition_keys"]:
        raise InputError(
            f"{what}: condition keys {manifest['condition_keys']} differ from the model's {meta['condition_keys']}"
        )
    for key, cats in meta["labels"].items():
        if manifest["labels"].get(key) != cats:
            raise InputError(
                f"{what}: the categories of '{key}' differ from the model's ({manifest['labels'].get(key)} vs {cats})"
            )


@dataclass
class Bundle:
    """A trained model in memory: the VAE, its prior (None for a VAE alone) and what they were trained on."""

    vae: TransformerVAE
    prior: DiT | None
    genes: list[str]  # the vocabulary: token id g means genes[g - 1]
    condition_keys: list[str]
    labels: dict[str, list[str]]  # categories per condition key; a code is the index in this list
    library_size: dict[str, Any]  # TOKENIZE's log-normal statistics of log library size, per condition
    latent_mean: torch.Tensor | None = None  # (m, d_latent): the prior works on (z - mean) / std
    latent_std: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)  # versions, configurations and provenance

    def to(self, device: torch.device) -> Bundle:
        """Move the networks and the latent statistics to `device` (in place); returns self."""
        self.vae.to(device)
        if self.prior is not None:
            self.prior.to(device)
        if self.latent_mean is not None:
            self.latent_mean, self.latent_std = self.latent_mean.to(device), self.latent_std.to(device)
        return self

    def payload(self) -> dict[str, Any]:
        """The bundle as tensors and plain values (what `save` writes)."""

        def part(model: nn.Module | None, stage: str) -> dict[str, Any] | None:
            if model is None:
                return None
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            return {"config": model.config.to_dict(), "state_dict": state, **self.info.get(stage, {})}

        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "sclatent_version": __version__,
            "torch_version": str(torch.__version__),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "vae": part(self.vae, "vae"),
            "prior": part(self.prior, "prior"),
            "genes": list(self.genes),
            "condition_keys": list(self.condition_keys),
            "labels": {k: list(v) for k, v in self.labels.items()},
            "library_size": self.library_size,
            "latent_mean": None if self.latent_mean is None else self.latent_mean.detach().cpu(),
            "latent_std": None if self.latent_std is None else self.latent_std.detach().cpu(),
            "provenance": self.info.get("provenance", {}),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle atomically to `path` (a file, or a folder that gets `model.pt`); returns the file."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / BUNDLE_NAME
        atomic_torch_save(path, self.payload())
        return path


def bundle_from_runs(
    vae_dir: str | os.PathLike, prior_dir: str | os.PathLike | None = None, *, weights: str = "auto"
) -> Bundle:
    """Assemble a bundle from a TRAIN_VAE run folder and, optionally, the TRAIN_PRIOR run trained on its latents."""
    vae, vcfg = load_run(vae_dir, "vae", weights=weights)
    meta = vcfg["metadata"]
    info: dict[str, Any] = {
        "vae": {
            "train_config": vcfg["train_config"],
            "weights": vcfg["weights_used"],
            "sclatent_version": vcfg.get("sclatent_version"),
            "run": meta.get("run", {}),
        },
        "provenance": {"tokens": meta.get("tokens_provenance", {}), "vae_dir": str(vae_dir)},
    }
    bundle = Bundle(
        vae=vae,
        prior=None,
        genes=meta["genes"],
        condition_keys=meta["condition_keys"],
        labels=meta["labels"],
        library_size=meta["library_size"],
        info=info,
    )
    if prior_dir is not None:
        prior, pcfg = load_run(prior_dir, "prior", weights=weights)
        pm = pcfg["metadata"]
        if (
            pm["vocabulary_digest"] != meta["vocabulary_digest"]
            or pm["condition_keys"] != meta["condition_keys"]
            or pm["labels"] != meta["labels"]
        ):
            raise InputError(
                f"prior {prior_dir} was trained on the latents of another VAE "
                f"(vocabulary or labels differ from {vae_dir})"
            )
        bundle.prior = prior
        bundle.latent_mean = torch.tensor(pm["latent_mean"], dtype=torch.float32)
        bundle.latent_std = torch.tensor(pm["latent_std"], dtype=torch.float32)
        info["prior"] = {
            "train_config": pcfg["train_config"],
            "weights": pcfg["weights_used"],
            "sclatent_version": pcfg.get("sclatent_version"),
            "run": pm.get("run", {}),
        }
        info["provenance"]["prior_dir"] = str(prior_dir)
    return bundle


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Bundle:
    """A bundle file, a folder holding `model.pt`, or a TRAIN_VAE run folder (then a bundle without a prior)."""
    path = Path(path)
    if path.is_dir() and not (path / BUNDLE_NAME).exists():
        if not (path / CONFIG_NAME).exists():
            raise InputError(
                f"{path}: neither a model bundle ({BUNDLE_NAME}) nor a TRAIN_VAE run folder ({CONFIG_NAME})"
            )
        return bundle_from_runs(path).to(torch.device(map_location))
    return load_bundle(path, map_location=map_location)


_REQUIRED = ("vae", "prior", "genes", "condition_keys", "labels", "library_size", "latent_mean", "latent_std")


def load_bundle(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Bundle:
    """Read a model bundle (a `model.pt` file or a folder holding one); every problem is a one-line InputError."""
    path = Path(path)
    if path.is_dir():
        path = path / BUNDLE_NAME
    data = load_checkpoint(path, map_location=map_location)
    if data.get("format") != BUNDLE_FORMAT:
        raise InputError(
            f"{path}: not a sclatent model bundle (a training checkpoint? export one with `sclatent bundle`)"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_VERSION:
        raise InputError(
            f"{path}: bundle format {version!r} was written by sclatent {data.get('sclatent_version')}; "
            f"this sclatent {__version__} reads formats up to {BUNDLE_VERSION}: upgrade sclatent"
        )
    absent = [k for k in _REQUIRED if k not in data]
    if absent or not isinstance(data["vae"], dict):
        raise InputError(f"{path}: incomplete model bundle (missing {', '.join(absent) or 'the VAE'})")

    def model(stage: str) -> nn.Module | None:
        part = data[stage]
        if part is None:
            return None
        net = build_model(stage, part["config"])
        try:
            net.load_state_dict(part["state_dict"])
        except RuntimeError as exc:
            raise InputError(
                f"{path}: the {stage} weights do not fit its configuration ({str(exc).splitlines()[0]})"
            ) from None
        return net.eval()

    info = {
        s: {k: v for k, v in data[s].items() if k not in ("config", "state_dict")}
        for s in ("vae", "prior")
        if data[s] is not None
    }
    info.update(
        provenance=data.get("provenance", {}),
        sclatent_version=data.get("sclatent_version"),
        torch_version=data.get("torch_version"),
        created=data.get("created"),
        path=str(path),
    )
    vae = model("vae")
    if len(data["genes"]) != vae.config.n_genes:
        raise InputError(f"{path}: {len(data['genes'])} genes in the vocabulary but the VAE has {vae.config.n_genes}")
    return Bundle(
        vae=vae,
        prior=model("prior"),
        genes=list(data["genes"]),
        condition_keys=list(data["condition_keys"]),
        labels={k: list(v) for k, v in data["labels"].items()},
        library_size=data["library_size"],
        latent_mean=data["latent_mean"],
        latent_std=data["latent_std"],
        info=info,
    )
