"""A trained model's vocabulary and labels applied to new data: TOKENIZE with `--model` (running or fine-tuning it).

Genes are matched to the vocabulary by var_names or by a var column; vocabulary genes a file lacks are simply absent
from its cells' tokens (the exchangeable encoder takes any set of genes), the file's other genes are ignored. With
`extend` (a fine-tune) the file's other genes, label values and condition keys are appended instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import anndata as ad

from .errors import InputError

log = logging.getLogger(__name__)


@dataclass
class ModelPanel:
    """TOKENIZE against a trained model: its vocabulary and labels, genes matched by name or by a var column.

    Vocabulary genes a file lacks are simply absent from its cells' tokens; the file's other genes are ignored,
    or, with `extend` (for a fine-tune), appended to the vocabulary, as are label values and keys the model has
    not seen.
    """

    path: str
    genes: list[str]
    condition_keys: list[str]
    labels: dict[str, list[str]]
    library_size: dict[str, Any]
    gene_key: str | None = None
    extend: bool = False

    @classmethod
    def of(cls, model: Any, gene_key: str | None = None, extend: bool = False) -> ModelPanel:
        """From a model bundle (a path, or a loaded `checkpoint.Bundle`)."""
        if isinstance(model, (str, os.PathLike)):
            from .checkpoint import load_model

            bundle, path = load_model(model), str(model)
        else:
            bundle, path = model, str(model.info.get("path", ""))
        return cls(
            path,
            list(bundle.genes),
            list(bundle.condition_keys),
            dict(bundle.labels),
            bundle.library_size,
            gene_key,
            extend,
        )

    def names(self, var: Any, source: str) -> list[str]:
        """The gene names of a file's var, matched against the model's vocabulary."""
        if self.gene_key is None:
            return [str(g) for g in var.index]
        if self.gene_key not in var.columns:
            raise InputError(
                f"{source}: --gene-key '{self.gene_key}' is not a var column "
                f"(var has: {', '.join(map(str, var.columns)) or 'no columns'})"
            )
        return [str(g) for g in var[self.gene_key]]

    def vocabulary(
        self, head: ad.AnnData, genes: str, requested: list[str] | None, source: str
    ) -> tuple[list[str], list[str], dict[str, list[str]]]:
        """(vocabulary, condition keys, label categories) of the tokens of `head`'s file."""
        known = set(self.genes)
        vocab = list(self.genes)
        if self.extend:
            names = self.names(head.var, source)
            if genes == "hvg":
                if "highly_variable" not in head.var.columns:
                    raise InputError(f"{source}: --genes hvg needs var['highly_variable'] (written by PREPARE)")
                names = [n for n, hv in zip(names, head.var["highly_variable"].to_numpy(dtype=bool)) if hv]
            vocab += [n for n in dict.fromkeys(names) if n not in known]
        obs = head.obs
        if requested is None:
            requested = [k for k in self.condition_keys if k in obs.columns] if self.extend else self.condition_keys
        unknown = [k for k in requested if k not in self.condition_keys]
        if not self.extend:
            if unknown:
                raise InputError(
                    f"{source}: condition key '{unknown[0]}' is not one the model knows "
                    f"(known: {', '.join(self.condition_keys) or 'none'}); add keys by fine-tuning (--extend)"
                )
            for key in self.condition_keys:
                if key not in obs.columns:
                    log.warning(
                        "%s: no obs column '%s' (a condition key of the model): its labels are unknown", source, key
                    )
                    continue
                new = sorted(set(obs[key].astype(str)) - set(self.labels[key]))
                if new:
                    log.warning(
                        "%s: %d value(s) of '%s' the model does not know (%s); known values: %s",
                        source,
                        len(new),
                        key,
                        ", ".join(new[:5]),
                        ", ".join(self.labels[key]),
                    )
            return vocab, list(self.condition_keys), {k: list(v) for k, v in self.labels.items()}
        categories = {}
        for key in requested:
            if key not in obs.columns:
                raise InputError(f"{source}: condition key '{key}' is not an obs column")
            old = list(self.labels.get(key, []))
            categories[key] = old + sorted(set(obs[key].astype(str)) - set(old))
        return vocab, list(requested), categories

    def merge_library_size(self, libsize: dict[str, Any], keys: list[str]) -> None:
        """Label values the fine-tuning cells lack keep the model's library-size statistics (in place)."""
        old = self.library_size
        for key in keys:
            for value, stat in old.get("per_key", {}).get(key, {}).items():
                libsize["per_key"][key].setdefault(value, stat)
        if keys == self.condition_keys and "joint" in libsize:
            for value, stat in old.get("joint", {}).items():
                libsize["joint"].setdefault(value, stat)
