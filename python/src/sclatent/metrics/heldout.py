"""Combinations never seen in training: generated cells scored against their real cells, next to two references.

For every attribute combination H among the real test cells that training never saw (PREPARE records the trained
combinations), in the 30-PC space of the real test cells:

* the **model**: generated cells of H against half B of H's real cells, |A| of them per replicate (the metrics
  depend on the number of cells compared, so every comparison here is made at matched sizes);
* the **real-vs-real floor**: half A of H's real cells against half B (the best any model can do at that size);
* the **nearest seen combinations**: for each condition key j, the seen combinations equal to H on every other
  key (e.g. the same cell type under another condition) are candidates; each candidate's real test cells are
  scored against B, and the nearest (lowest W2) is reported beside the model at the same number of cells. A
  model that cannot beat the real cells of the nearest seen combination has learnt nothing about H beyond
  "copy the neighbour".

Halves are stratified by nothing (H is one class) and seeded; cell order never matters (canonical hash order).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from .distances import DEFAULT_K, DEFAULT_MAX_CELLS, DEFAULT_W2_MAX_CELLS, DISTRIBUTION_METRICS, JOINT_SEPARATOR
from .features import _cell_hash_order, _counts_of, _labels_of, align_genes, feature_space
from .generation import _json_safe, distribution_metrics, mean_sem

log = logging.getLogger(__name__)


def unseen_combinations(real_obs: pd.DataFrame, keys: Sequence[str], seen: Sequence[str] | None) -> list[str]:
    """Joint class names of the real cells that are not among the `seen` (trained) combinations, sorted.
    None when nothing is known about training (then nothing is reported as unseen)."""
    if seen is None or len(keys) < 2:
        return []
    classes = real_obs[list(keys)].astype(str).agg(JOINT_SEPARATOR.join, axis=1)
    return sorted(set(classes.tolist()) - set(seen))


def _metrics(X: NDArray, Y: NDArray, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return distribution_metrics(X, Y, **kwargs)
    except ValueError as exc:  # too few cells for the k-NN metrics
        return {"error": str(exc), "n_real": len(X), "n_generated": len(Y)}


def _pick(n: int, size: int, rng: np.random.Generator) -> NDArray[np.intp]:
    """`size` of n rows (all when size >= n), sorted, seeded."""
    return np.arange(n) if size >= n else np.sort(rng.choice(n, size=size, replace=False))


def _mean_over(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-metric mean over replicates (values kept), sizes of the first."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return dict(results[0])
    out: dict[str, Any] = {"n_real": ok[0]["n_real"], "n_generated": ok[0]["n_generated"]}
    for m in DISTRIBUTION_METRICS:
        out[m] = mean_sem([r[m] for r in ok])["mean"]
    out["replicate_values"] = {m: [r[m] for r in ok] for m in ("w2", "mmd2_rbf", "fd", "coverage")}
    return out


def score_held_out(
    real_adata: Any,
    gen_adata: Any,
    condition_keys: Sequence[str],
    seen: Sequence[str],
    hvg: str = "highly_variable",
    *,
    n_pcs: int = 30,
    seed: int = 0,
    k: int = DEFAULT_K,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    w2_max_cells: int | None = DEFAULT_W2_MAX_CELLS,
    model_genes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The held-out section of metrics.json (see the module docstring); {} when every combination was seen.

    `gen_adata` holds generated cells with the condition columns and optionally obs['replicate'].
    """
    keys = list(condition_keys)
    unseen = unseen_combinations(real_adata.obs, keys, seen)
    if not unseen:
        return {}
    genes = align_genes(real_adata, gen_adata, model_genes)
    real_genes = pd.Index(real_adata.var_names.astype(str))
    hvg_genes = real_genes[real_adata.var[hvg].to_numpy(dtype=bool)]
    hvg_mask = pd.Index(genes).isin(hvg_genes)
    real_counts = _counts_of(real_adata, None, genes, "real")
    gen_counts = _counts_of(gen_adata, None, genes, "generated")
    real_labels = _labels_of(real_adata, keys, "real")
    gen_labels = _labels_of(gen_adata, keys, "generated")
    reps = gen_adata.obs["replicate"].to_numpy() if "replicate" in gen_adata.obs.columns else np.zeros(gen_adata.n_obs)
    order_r, order_g = _cell_hash_order(real_counts, real_labels), _cell_hash_order(gen_counts, gen_labels)
    real_counts, real_labels = real_counts[order_r], real_labels.iloc[order_r].reset_index(drop=True)
    gen_counts, gen_labels, reps = gen_counts[order_g], gen_labels.iloc[order_g].reset_index(drop=True), reps[order_g]
    real_pcs, gen_pcs, info = feature_space(real_counts, gen_counts, hvg_mask, min(n_pcs, real_counts.shape[0]))
    cls_r = real_labels.agg(JOINT_SEPARATOR.join, axis=1).to_numpy()
    cls_g = gen_labels.agg(JOINT_SEPARATOR.join, axis=1).to_numpy()
    kwargs = {"k": k, "max_cells": max_cells, "w2_max_cells": w2_max_cells, "seed": seed}
    seen_set = set(seen)

    per: dict[str, Any] = {}
    skipped: list[dict[str, Any]] = []
    for combo in unseen:
        rng = np.random.default_rng([seed, zlib.crc32(combo.encode())])  # the halves depend on the name only
        values = combo.split(JOINT_SEPARATOR)
        real_h = real_pcs[cls_r == combo]  # (n_H, d)
        if len(real_h) < 2 * (k + 1):
            skipped.append({"combination": combo, "n_real": len(real_h), "reason": f"fewer than {2 * (k + 1)} cells"})
            continue
        half = rng.permutation(len(real_h))
        a, b = real_h[half[: len(real_h) // 2]], real_h[half[len(real_h) // 2 :]]
        gen_reps = {r: gen_pcs[(cls_g == combo) & (reps == r)] for r in sorted(set(reps.tolist()))}
        gen_reps = {r: g for r, g in gen_reps.items() if len(g)}
        if not gen_reps:
            skipped.append({"combination": combo, "n_real": len(real_h), "reason": "no generated cells"})
            continue

        def model_at(size: int) -> dict[str, Any]:
            return _mean_over([_metrics(b, g[_pick(len(g), size, rng)], kwargs) for g in gen_reps.values()])

        entry: dict[str, Any] = {
            "labels": dict(zip(keys, values)),
            "n_real": len(real_h),
            "n_half": len(a),
            "n_generated_per_replicate": {str(r): len(g) for r, g in gen_reps.items()},
            "model": model_at(len(a)),
            "floor": _metrics(b, a, kwargs),
            "nearest": {},
        }
        for j, key in enumerate(keys):
            candidates = {}
            for other in seen_set:
                parts = other.split(JOINT_SEPARATOR)
                if parts[j] != values[j] and all(parts[i] == values[i] for i in range(len(keys)) if i != j):
                    cells = real_pcs[cls_r == other]
                    if len(cells) > k:
                        candidates[other] = cells
            if not candidates:
                entry["nearest"][key] = None
                continue
            scored = {
                name: _metrics(b, cells[_pick(len(cells), len(a), rng)], kwargs) for name, cells in candidates.items()
            }
            usable = {name: s for name, s in scored.items() if "error" not in s}
            if not usable:
                entry["nearest"][key] = {"error": "too few cells", "candidates": sorted(scored)}
                continue
            best = min(usable, key=lambda name: usable[name]["w2"])
            n = usable[best]["n_generated"]
            entry["nearest"][key] = {
                "combination": best,
                "n": n,
                "real": usable[best],
                "model": model_at(n),
                "candidates_w2": {name: s["w2"] for name, s in usable.items()},
            }
        per[combo] = entry
        _log_combination(combo, entry)
    return _json_safe(
        {
            "combinations": unseen,
            "seen": sorted(seen_set),
            "feature_space": info,
            "per_combination": per,
            "skipped": skipped,
            "settings": {"seed": seed, "k": k, "n_pcs": n_pcs},
        }
    )


def _log_combination(combo: str, entry: Mapping[str, Any]) -> None:
    model, floor = entry["model"], entry["floor"]
    if "error" in model or "error" in floor:
        log.warning("%s was never seen in training; too few cells to score it", combo)
        return
    near = [
        f"{n['combination']} {n['real']['w2']:.3g} (model {n['model']['w2']:.3g})"
        for n in entry["nearest"].values()
        if n and "real" in n
    ]
    log.warning(
        "%s was never seen in training: W2 %.3g (real-vs-real floor %.3g; nearest seen real cells: %s), "
        "coverage %.2f (floor %.2f)",
        combo,
        model["w2"],
        floor["w2"],
        "; ".join(near) or "none",
        model["coverage"],
        floor["coverage"],
    )


def seen_only(adata: Any, keys: Sequence[str], unseen: Sequence[str]) -> Any:
    """The cells of `adata` whose joint class is not in `unseen` (a copy; the same object when nothing is)."""
    if not unseen:
        return adata
    classes = adata.obs[list(keys)].astype(str).agg(JOINT_SEPARATOR.join, axis=1).to_numpy()
    keep = ~np.isin(classes, list(unseen))
    return adata if keep.all() else adata[keep].copy()
