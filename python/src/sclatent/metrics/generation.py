"""Generation metrics of real vs generated AnnData: overall, per class of every condition key and of their joint
combination (mean ± SEM over classes), and aggregated over generated replicates (mean ± SEM over replicates).

Cell order never matters: both sides are put in a canonical order (a hash of each cell's counts and labels)
before anything is computed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from ..io import joint_labels
from .distances import (
    DEFAULT_CLASS_MAX_CELLS,
    DEFAULT_K,
    DEFAULT_MAX_CELLS,
    DEFAULT_MIN_CELLS_PER_CLASS,
    DEFAULT_W2_MAX_CELLS,
    DISTRIBUTION_METRICS,
    JOINT_SEPARATOR,
    MMD_SIGMAS,
    frechet_distance,
    knn_label_f1,
    mmd2_rbf,
    one_nn_accuracy,
    prdc,
    tstr_accuracy,
    w2,
)
from .features import _cell_hash_order, _counts_of, _first_names, _labels_of, align_genes, feature_space

logger = logging.getLogger(__name__)


def distribution_metrics(
    X: NDArray[np.float64],
    Y: NDArray[np.float64],
    *,
    k: int = DEFAULT_K,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    w2_max_cells: int | None = DEFAULT_W2_MAX_CELLS,
    seed: int = 0,
) -> dict[str, float]:
    """All distribution metrics of real X (n, d) vs generated Y (n', d): w2, mmd2_rbf, fd,
    one_nn_accuracy, precision, recall, density, coverage, plus n_real / n_generated."""
    out = {
        "n_real": len(X),
        "n_generated": len(Y),
        "w2": w2(X, Y, max_cells=w2_max_cells, seed=seed),
        "mmd2_rbf": mmd2_rbf(X, Y, max_cells=max_cells, seed=seed),
        "fd": frechet_distance(X, Y),
        "one_nn_accuracy": one_nn_accuracy(X, Y, max_cells=max_cells, seed=seed),
    }
    out.update(prdc(X, Y, k=k, max_cells=max_cells, seed=seed))
    return out


def mean_sem(values: Sequence[float | None]) -> dict[str, Any]:
    """{"mean", "sem", "n"} of the non-missing values; SEM = sample std (ddof=1) / sqrt(n), None if n < 2."""
    vals = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if len(vals) == 0:
        return {"mean": None, "sem": None, "n": 0}
    sem = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) >= 2 else None
    return {"mean": float(vals.mean()), "sem": sem, "n": int(len(vals))}


def _per_class(
    X: NDArray[np.float64],
    classes_x: NDArray[np.str_],
    Y: NDArray[np.float64],
    classes_y: NDArray[np.str_],
    group: str,
    min_cells: int,
    metric_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Metrics of each class with >= min_cells cells on both sides (`effective_min_cells_per_class`); summary =
    mean ± SEM over classes."""
    rows_x, rows_y = _rows_by_class(classes_x), _rows_by_class(classes_y)
    per_class: dict[str, dict[str, float]] = {}
    skipped = []
    empty = np.zeros(0, dtype=np.intp)
    for cls in sorted(set(rows_x) | set(rows_y)):
        in_x, in_y = rows_x.get(cls, empty), rows_y.get(cls, empty)
        if len(in_x) < min_cells or len(in_y) < min_cells:
            skipped.append({"class": cls, "n_real": len(in_x), "n_generated": len(in_y)})
            continue
        per_class[cls] = distribution_metrics(X[in_x], Y[in_y], **metric_kwargs)
    if skipped:
        shown = ", ".join(f"{s['class']} ({s['n_real']}/{s['n_generated']})" for s in skipped[:10])
        logger.warning(
            "%s: skipped %d classes with fewer than %d cells on a side: %s%s",
            group,
            len(skipped),
            min_cells,
            shown,
            f" and {len(skipped) - 10} more" if len(skipped) > 10 else "",
        )
    summary = {m: mean_sem([v[m] for v in per_class.values()]) for m in DISTRIBUTION_METRICS}
    return {
        "classes": per_class,
        "summary": summary,
        "n_classes": len(per_class),
        "n_skipped": len(skipped),
        "skipped": skipped,
    }


def _rows_by_class(classes: NDArray[np.str_]) -> dict[str, NDArray[np.intp]]:
    """{class: its row indices, ascending}, in one pass over the cells."""
    values, codes = np.unique(np.asarray(classes).astype(str), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(values) + 1))
    return {str(v): order[bounds[i] : bounds[i + 1]] for i, v in enumerate(values)}


def _min_cap(a: int | None, b: int | None) -> int | None:
    """The smaller of two caps (None = no cap)."""
    return b if a is None else a if b is None else min(a, b)


def effective_min_cells_per_class(min_cells_per_class: int, k: int = DEFAULT_K) -> int:
    """The fewest cells a class needs on each side to be evaluated: the asked minimum, and at least k + 1."""
    return max(int(min_cells_per_class), int(k) + 1)


def _json_safe(obj: Any) -> Any:
    """Plain Python types only; NaN / inf become None (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(key): _json_safe(v) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def evaluate(
    real_adata: Any,
    gen_adata: Any,
    condition_keys: Sequence[str] = (),
    hvg: str | ArrayLike = "highly_variable",
    *,
    n_pcs: int = 30,
    seed: int = 0,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    w2_max_cells: int | None = DEFAULT_W2_MAX_CELLS,
    min_cells_per_class: int = DEFAULT_MIN_CELLS_PER_CLASS,
    class_max_cells: int | None = DEFAULT_CLASS_MAX_CELLS,
    k: int = DEFAULT_K,
    real_layer: str | None = None,
    gen_layer: str | None = None,
    model_genes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Compare generated cells with real cells; returns a JSON-able dict (metrics.json).

    Inputs: two AnnData objects holding raw integer counts (`.X` or the given layers) and the condition
    columns `condition_keys` in `.obs`. `hvg` is a bool column of `real_adata.var` or a bool array aligned
    with `real_adata.var_names`; every HVG must be among the shared genes (see `align_genes`).

    Output keys: "feature_space" (variant description), "settings", "overall" (distribution metrics on all
    cells), "labels" (per key: kNN label F1 and TSTR, each on at most `max_cells` cells per side), "per_class" (per
    key, and for >= 2 keys per joint combination named "k1|k2": "classes" -> metrics of each class on at most
    `class_max_cells` cells per side, "summary" -> mean ± SEM over classes, "skipped" / "n_skipped" -> classes with
    fewer than `min_cells_per_class` cells on either side, with their counts).
    Cell order does not matter: both sides are put in a canonical order first.
    """
    keys = list(condition_keys)
    genes = align_genes(real_adata, gen_adata, model_genes)
    real_genes = pd.Index(real_adata.var_names.astype(str))
    if isinstance(hvg, str):
        if hvg not in real_adata.var.columns:
            raise ValueError(f"real data has no var column {hvg!r} for the HVG mask")
        hvg_full = real_adata.var[hvg].to_numpy()
    else:
        hvg_full = np.asarray(hvg)
    if hvg_full.dtype != np.bool_ or hvg_full.shape != (len(real_genes),):
        raise ValueError(
            f"HVG mask must be bool with one entry per real gene ({len(real_genes)}), "
            f"got {hvg_full.dtype} {hvg_full.shape}"
        )
    hvg_genes = real_genes[hvg_full]
    not_shared = hvg_genes[~hvg_genes.isin(genes)]
    if len(not_shared):
        raise ValueError(
            f"{len(not_shared)} HVGs are missing from the generated data: {_first_names(list(not_shared))}"
        )
    hvg_mask = pd.Index(genes).isin(hvg_genes)  # (G,) over the shared genes

    real_counts = _counts_of(real_adata, real_layer, genes, "real")  # (n, G)
    gen_counts = _counts_of(gen_adata, gen_layer, genes, "generated")  # (n', G)
    real_labels = _labels_of(real_adata, keys, "real")
    gen_labels = _labels_of(gen_adata, keys, "generated")

    order_r = _cell_hash_order(real_counts, real_labels)
    order_g = _cell_hash_order(gen_counts, gen_labels)
    real_counts, real_labels = real_counts[order_r], real_labels.iloc[order_r].reset_index(drop=True)
    gen_counts, gen_labels = gen_counts[order_g], gen_labels.iloc[order_g].reset_index(drop=True)

    real_pcs, gen_pcs, info = feature_space(real_counts, gen_counts, hvg_mask, n_pcs)
    metric_kwargs = {"k": k, "max_cells": max_cells, "w2_max_cells": w2_max_cells, "seed": seed}
    class_kwargs = {
        **metric_kwargs,
        "max_cells": _min_cap(max_cells, class_max_cells),
        "w2_max_cells": _min_cap(w2_max_cells, class_max_cells),
    }
    # the one per-class rule, recorded as applied: the k-NN metrics need k + 1 cells on a side
    min_cells_per_class = effective_min_cells_per_class(min_cells_per_class, k)
    result: dict[str, Any] = {
        "feature_space": info,
        "settings": {
            "condition_keys": keys,
            "seed": seed,
            "max_cells": max_cells,
            "w2_max_cells": w2_max_cells,
            "min_cells_per_class": min_cells_per_class,
            "class_max_cells": class_max_cells,
            "k": k,
            "mmd_sigmas": list(MMD_SIGMAS),
            "joint_separator": JOINT_SEPARATOR,
        },
        "n_real": int(real_counts.shape[0]),
        "n_generated": int(gen_counts.shape[0]),
        "overall": distribution_metrics(real_pcs, gen_pcs, **metric_kwargs),
        "labels": {},
        "per_class": {},
    }
    for key in keys:
        lab_r, lab_g = real_labels[key].to_numpy(), gen_labels[key].to_numpy()
        entry: dict[str, Any] = {
            "knn_f1": knn_label_f1(real_pcs, lab_r, gen_pcs, lab_g, k=k, max_cells=max_cells, seed=seed)
        }
        if len(np.unique(lab_g)) >= 2:
            tstr = tstr_accuracy(gen_pcs, lab_g, real_pcs, lab_r, seed=seed, max_cells=max_cells)
            entry.update({"tstr_accuracy": tstr["accuracy"], "tstr_macro_f1": tstr["macro_f1"]})
        else:
            logger.warning("condition %r: one generated class only, TSTR not computed", key)
            entry.update({"tstr_accuracy": None, "tstr_macro_f1": None})
        result["labels"][key] = entry
    groups = [[key] for key in keys] + ([keys] if len(keys) >= 2 else [])
    for group in groups:
        name = JOINT_SEPARATOR.join(group)
        cls_r = joint_labels(real_labels, group, JOINT_SEPARATOR)
        cls_g = joint_labels(gen_labels, group, JOINT_SEPARATOR)
        result["per_class"][name] = _per_class(real_pcs, cls_r, gen_pcs, cls_g, name, min_cells_per_class, class_kwargs)
    return _json_safe(result)


def aggregate_replicates(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± SEM over generated replicates of the per-replicate summaries returned by `evaluate`.

    For "overall" and "labels" the replicate values are averaged; for "per_class" the per-replicate mean
    over classes (its "summary" mean) is averaged. Each entry is {"mean", "sem", "n", "values"}; SEM over
    replicates (ddof=1). Replicates must have the same groups and metrics.
    """
    if len(results) == 0:
        raise ValueError("aggregate_replicates needs at least one result")
    first = results[0]

    def stat(values: list[Any]) -> dict[str, Any]:
        return {**mean_sem(values), "values": values}

    for i, res in enumerate(results[1:], start=1):
        for part in ("overall", "labels", "per_class"):
            if set(res[part]) != set(first[part]):
                raise ValueError(
                    f"replicate {i} has {part} entries {sorted(res[part])}, replicate 0 has {sorted(first[part])}"
                )
    out: dict[str, Any] = {
        "n_replicates": len(results),
        "feature_space": first.get("feature_space"),
        "settings": first.get("settings"),
        "overall": {m: stat([r["overall"][m] for r in results]) for m in DISTRIBUTION_METRICS},
        "labels": {
            key: {m: stat([r["labels"][key][m] for r in results]) for m in first["labels"][key]}
            for key in first["labels"]
        },
        "per_class": {},
    }
    for group, entry in first["per_class"].items():
        metrics = list(entry["summary"])
        out["per_class"][group] = {
            m: stat([r["per_class"][group]["summary"].get(m, {}).get("mean") for r in results]) for m in metrics
        }
        out["per_class"][group]["n_classes"] = [r["per_class"][group]["n_classes"] for r in results]
    return _json_safe(out)
