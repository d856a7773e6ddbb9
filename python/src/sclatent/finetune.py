"""Fine-tuning and transfer: start a training run from a trained model bundle (`--init-from`) on new data.

A fine-tune keeps the model's architecture and takes its weights; only what the new data brings changes:
- genes: the new vocabulary's genes are matched to the model's by name. A matched gene keeps every per-gene row
  of the VAE (gene embedding, count direction, readout, decoder readout, dispersion); a new gene gets the freshly
  initialised rows of a new model. Since a gene's rows are only read when that gene is a token or a query, the
  model's outputs on its old genes are unchanged before the first fine-tuning step.
- labels: each condition key's table of the DiT prior is matched by category name. A new category starts as a
  copy of its key's null (unconditional) row; a new key starts as a table of zeros (it adds nothing to the
  conditioning); a key the new data lacks is folded into the time embedding's bias as its null row (as if that
  key were never given). The prior's outputs on the old labels are therefore unchanged before fine-tuning.
The optimiser, schedule and data are new: the run is a fresh training run that records where it started from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import Bundle, load_model
from .errors import InputError
from .nn.dit import DiT, DiTConfig
from .nn.vae import TransformerVAE, VAEConfig

log = logging.getLogger(__name__)


def load_init(path: str | Path, stage: str) -> Bundle:
    """The model bundle a fine-tune of `stage` ("vae" | "prior") starts from; a VAE-only bundle has no prior."""
    bundle = load_model(path, map_location="cpu")
    if stage == "prior" and bundle.prior is None:
        raise InputError(f"--init-from {path}: the model has no prior to fine-tune (a VAE-only bundle)")
    return bundle


def init_provenance(bundle: Bundle) -> dict[str, Any]:
    """What a fine-tuned run records about the model it started from."""
    info = bundle.info
    return {
        "sclatent_version": info.get("sclatent_version"),
        "created": info.get("created"),
        "n_genes": len(bundle.genes),
        "condition_keys": list(bundle.condition_keys),
        "provenance": info.get("provenance", {}),
    }


def _changes(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...]) -> list[str]:
    return [
        f"{k} {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in ignore and old.get(k) != new.get(k)
    ]


def check_architecture(path: str | Path, stage: str, model: dict[str, Any], asked: dict[str, Any]) -> None:
    """Refuse a fine-tune whose options (`asked`, a full configuration) change the model's (`model`) architecture."""
    ignore = ("n_genes",) if stage == "vae" else ("n_classes",)
    changed = _changes(model, asked, ignore)
    if changed:
        raise InputError(
            f"--init-from {path}: a fine-tune keeps the model's {stage} architecture, but the options change "
            f"{', '.join(changed)}; leave those options out to take the model's"
        )


def vae_config(
    path: str | Path, bundle: Bundle, n_genes: int, preset: str | None, overrides: dict[str, Any]
) -> VAEConfig:
    """The fine-tuned VAE's configuration: the bundle's over `n_genes` genes; options that change it are refused."""
    model = {**bundle.vae.config.to_dict(), "n_genes": n_genes}
    try:
        asked = (
            VAEConfig.preset(preset, n_genes, **overrides).to_dict() if preset is not None else {**model, **overrides}
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"VAE configuration: {exc}") from None
    check_architecture(path, "vae", model, asked)
    return VAEConfig.from_dict(model)


def prior_config(
    path: str | Path, bundle: Bundle, asked: DiTConfig | None, latent_shape: tuple[int, int], n_classes: list[int]
) -> DiTConfig:
    """The fine-tuned DiT's configuration: the bundle's with the new label tables; other changes are refused."""
    model = {**bundle.prior.config.to_dict(), "n_classes": list(n_classes)}
    n_tokens, d_latent = latent_shape
    if (model["n_tokens"], model["d_latent"]) != (n_tokens, d_latent):
        raise InputError(
            f"--init-from {path}: the prior works on {model['n_tokens']} x {model['d_latent']} latents but these "
            f"latents are {n_tokens} x {d_latent} (encoded by another VAE architecture)"
        )
    if asked is not None:
        check_architecture(path, "prior", model, asked.to_dict())
    return DiTConfig.from_dict(model)


def gene_tables(vae: TransformerVAE) -> list[str]:
    """State-dict names of the VAE's per-gene tables (G + 1 rows, row 0 = PAD)."""
    return [f"{name}.weight" for name, module in vae.named_modules() if isinstance(module, nn.Embedding)]


@torch.no_grad()
def transfer_vae(
    old: TransformerVAE, old_genes: list[str], new: TransformerVAE, new_genes: list[str]
) -> dict[str, int]:
    """Copy `old`'s weights into the freshly initialised `new` (same architecture, vocabulary `new_genes`): shared
    weights as they are, per-gene rows by gene name. Returns how many genes were kept, added and left out."""
    index = {g: i + 1 for i, g in enumerate(old_genes)}
    pairs = [(j + 1, index[g]) for j, g in enumerate(new_genes) if g in index]
    dst = torch.tensor([0] + [j for j, _ in pairs], dtype=torch.long)  # PAD row, then the shared genes
    src = torch.tensor([0] + [i for _, i in pairs], dtype=torch.long)
    tables = set(gene_tables(new))
    state, target = old.state_dict(), new.state_dict()
    for name, value in target.items():
        if name in tables:
            value[dst] = state[name][src].to(value.dtype)
        else:
            value.copy_(state[name])
    return {
        "genes_kept": len(pairs),
        "genes_added": len(new_genes) - len(pairs),
        "genes_left_out": len(old_genes) - len(pairs),
    }


@torch.no_grad()
def transfer_prior(
    old: DiT,
    old_labels: dict[str, list[str]],
    old_keys: list[str],
    new: DiT,
    new_labels: dict[str, list[str]],
    new_keys: list[str],
) -> dict[str, Any]:
    """Copy `old`'s weights into the freshly initialised `new` (same architecture, condition keys `new_keys` with
    categories `new_labels`): label rows by category name; see the module docstring for new and missing keys."""
    state, target = old.state_dict(), new.state_dict()
    tables = {f"label_embeds.{k}.weight" for k in range(len(new_keys))} | {
        f"label_embeds.{k}.weight" for k in range(len(old_keys))
    }
    for name, value in target.items():
        if name not in tables:
            value.copy_(state[name])
    added: dict[str, list[str]] = {}
    for k, key in enumerate(new_keys):
        table = target[f"label_embeds.{k}.weight"]  # (n_k + 1, d), null last
        if key not in old_keys:
            table.zero_()
            added[key] = ["(new key)"]
            continue
        old_table = state[f"label_embeds.{old_keys.index(key)}.weight"]
        cats = old_labels[key]
        table[:] = old_table[len(cats)]  # new categories and the null row start as the old null row
        for j, value in enumerate(new_labels[key]):
            if value in cats:
                table[j] = old_table[cats.index(value)]
        added_values = [v for v in new_labels[key] if v not in cats]
        if added_values:
            added[key] = added_values
    dropped = [key for key in old_keys if key not in new_keys]
    bias = target["t_mlp.2.bias"]
    for key in dropped:
        i = old_keys.index(key)
        bias += state[f"label_embeds.{i}.weight"][len(old_labels[key])]  # c always held this key's null row
    return {"labels_added": added, "keys_left_out": dropped}
