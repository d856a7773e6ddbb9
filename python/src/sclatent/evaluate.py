"""EVALUATE: generated vs real test cells, per replicate, aggregated; plus the real-vs-real floor.

Reads the real test cells (PREPARE's test.h5ad: counts, labels, `var["highly_variable"]`) and the gathered
generated cells (SAMPLE + GATHER: `obs["replicate"]`), computes the metrics of `metrics.evaluate` for every
replicate (`evaluate_pair`), aggregates them (`metrics.aggregate_replicates`: mean ± SEM over replicates of the
per-replicate values / class means), and — as the reference every number should be read against — the same metrics
between two seeded, stratified halves A and B of the real test cells ("real_vs_real": the floor this data allows),
next to the model at the same sizes ("generated_vs_real_half": |A| generated cells of replicate 0 vs B),
because W2 and MMD² shrink with the number of cells compared.

Scale: each side is a seeded uniform subsample of at most `cells_per_side` cells (the real cells; each replicate's
generated cells), read from disk row by row or chunk by chunk, never the whole file; every metric then caps its own
cells as documented in `metrics` (MMD², 1-NN, PRDC, kNN-F1, TSTR: `max_cells`; W2: `w2_max_cells`; per class:
`class_max_cells`). metrics.json records the cells used and the caps.
The reconstruction metrics of ENCODE are carried over. Writes `metrics.json` and `metrics_mqc.tsv`.

Combinations never seen in training (the real cells' `uns["sclatent"]["train_combinations"]`, written by PREPARE)
are scored on their own (`metrics.heldout`: model, real-vs-real floor and nearest seen combinations, under
"held_out"); every other number is then about the seen combinations only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import anndata as ad
import numpy as np

from .counts import subsample
from .io import InputError, atomic_outputs, dump_json, joint_labels, provenance, read_json
from .metrics import aggregate_replicates, to_mqc_tsv
from .metrics import evaluate as evaluate_metrics
from .metrics.heldout import score_held_out, seen_only
from .ondisk import H5adCounts, read_meta

log = logging.getLogger(__name__)

DEFAULT_CELLS_PER_SIDE = 50_000  # cells read per side (real; each generated replicate), seeded subsample


def _split_halves(adata, keys: Sequence[str], seed: int):
    """Two disjoint halves of `adata`, stratified by the joint labels (seeded)."""
    rng = np.random.default_rng(seed)
    strata = joint_labels(adata.obs, list(keys)) if keys else np.zeros(adata.n_obs, dtype=str)
    values, codes = np.unique(strata, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(values) + 1))
    first = np.zeros(adata.n_obs, dtype=bool)
    for v in range(len(values)):  # strata in sorted order, each stratum's cells in input order
        idx = rng.permutation(order[bounds[v] : bounds[v + 1]])
        first[idx[: len(idx) // 2]] = True
    return adata[first].copy(), adata[~first].copy()


def load_cells(path: str | Path, meta: ad.AnnData, rows: np.ndarray, cap: int | None, seed: Any) -> ad.AnnData:
    """The cells `rows` (ascending) of an h5ad file, or a seeded uniform subsample of at most `cap` of them, in file
    order, with their counts (read from disk for those rows only), obs, var and uns."""
    keep = rows[subsample(len(rows), cap, seed)]
    with H5adCounts(path) as counts:
        X = counts.take(keep)
    out = ad.AnnData(X=X, obs=meta.obs.iloc[keep].copy(), var=meta.var.copy())
    out.uns = meta.uns
    return out


def evaluate_pair(real: ad.AnnData, generated: ad.AnnData, keys: Sequence[str], what: str, **kwargs: Any) -> dict:
    """The metrics of one real-vs-generated comparison (`metrics.evaluate`); a problem with the inputs is an
    InputError naming `what`."""
    try:
        return evaluate_metrics(real, generated, list(keys), "highly_variable", **kwargs)
    except ValueError as exc:
        raise InputError(f"{what}: {exc}") from None


def _held_out(
    real: ad.AnnData, parts: dict[Any, ad.AnnData], keys: list[str], model_genes: list[str], what: str, kwargs: dict
) -> tuple[dict, ad.AnnData, dict[Any, ad.AnnData]]:
    """The held-out section ({} when training saw every combination), and the real cells and generated replicates
    the main section scores: the seen combinations only, when some were never seen."""
    seen = real.uns.get("sclatent", {}).get("train_combinations")
    if seen is None or len(keys) < 2:
        return {}, real, parts
    options = {k: v for k, v in kwargs.items() if k in ("n_pcs", "seed", "k", "max_cells", "w2_max_cells")}
    gen = ad.concat(list(parts.values())) if len(parts) > 1 else next(iter(parts.values()))
    try:
        held = score_held_out(real, gen, keys, list(seen), model_genes=model_genes, **options)
    except ValueError as exc:
        raise InputError(f"{what}: {exc}") from None
    if not held:
        return {}, real, parts
    seen_real = seen_only(real, keys, held["combinations"])
    if seen_real.n_obs == 0:  # every test cell is of a never-seen combination: the main section scores them all
        held["scope_note"] = "every test cell is of a never-seen combination; the main metrics score them all"
        return held, real, parts
    return held, seen_real, {r: seen_only(p, keys, held["combinations"]) for r, p in parts.items()}


def run_evaluate(
    real_path: str | Path,
    generated_path: str | Path,
    outdir: str | Path,
    *,
    condition_keys: Sequence[str] | None = None,
    reconstruction: str | Path | None = None,
    dataset: str | None = None,
    seed: int = 0,
    n_pcs: int = 30,
    max_cells: int | None = None,
    cells_per_side: int | None = DEFAULT_CELLS_PER_SIDE,
    floor: bool = True,
    **metric_kwargs: Any,
) -> dict[str, Any]:
    """Run EVALUATE; returns the metrics.json content."""
    t0 = time.time()
    if cells_per_side is not None and cells_per_side < 1:
        raise InputError(f"--cells-per-side must be >= 1, got {cells_per_side}")
    real_meta = read_meta(real_path)
    gen_meta = read_meta(generated_path)
    keys = (
        list(condition_keys)
        if condition_keys is not None
        else list(real_meta.uns.get("sclatent", {}).get("condition_keys", []))
    )
    if "highly_variable" not in real_meta.var.columns:
        raise InputError(f"{real_path}: no var['highly_variable'] (the HVG flags written by PREPARE)")
    has_reps = "replicate" in gen_meta.obs.columns
    reps = sorted(gen_meta.obs["replicate"].unique().tolist()) if has_reps else [0]
    kwargs = {"n_pcs": n_pcs, "seed": seed, **({"max_cells": max_cells} if max_cells else {}), **metric_kwargs}
    what = f"{generated_path} vs {real_path}"
    # A model run on another panel (--model) generates vocabulary genes the real cells lack: compare on the shared
    # genes, and say so.
    gen_genes = [str(g) for g in gen_meta.var_names]
    real_genes = set(map(str, real_meta.var_names))
    model_genes = [g for g in gen_genes if g in real_genes]
    if not model_genes:
        raise InputError(f"{what}: none of the {len(gen_genes)} generated genes is in the real data")
    if len(model_genes) < len(gen_genes):
        log.warning(
            "%d of the %d generated genes are not in the real data (another gene panel): comparing on the %d shared",
            len(gen_genes) - len(model_genes),
            len(gen_genes),
            len(model_genes),
        )
    # and the real data's HVGs (PREPARE's, on these data) that the model does not generate are left out of the
    # feature space
    hvg = real_meta.var["highly_variable"].to_numpy(dtype=bool)
    generated_hvg = hvg & real_meta.var_names.astype(str).isin(gen_genes)
    if not generated_hvg.any():
        raise InputError(f"{what}: none of the real data's {int(hvg.sum())} HVGs is among the generated genes")
    if generated_hvg.sum() < hvg.sum():
        log.warning(
            "%d of the real data's %d HVGs are not generated by the model: the feature space uses the other %d",
            int(hvg.sum() - generated_hvg.sum()),
            int(hvg.sum()),
            int(generated_hvg.sum()),
        )
        real_meta.var["highly_variable"] = generated_hvg

    real = load_cells(
        real_path, real_meta, np.arange(real_meta.n_obs), cells_per_side, np.random.SeedSequence([seed, 0])
    )
    used = {"real": [int(real.n_obs), int(real_meta.n_obs)], "generated": {}}
    parts = {}
    for r in reps:
        rows = np.flatnonzero(gen_meta.obs["replicate"].to_numpy() == r) if has_reps else np.arange(gen_meta.n_obs)
        parts[r] = load_cells(generated_path, gen_meta, rows, cells_per_side, np.random.SeedSequence([seed, 1, int(r)]))
        if len(model_genes) < len(gen_genes):
            parts[r] = parts[r][:, model_genes].copy()
        used["generated"][str(r)] = [int(parts[r].n_obs), int(len(rows))]
    held_out, real, parts = _held_out(real, parts, keys, model_genes, what, kwargs)
    # the cells the main section scores (without the never-seen combinations' cells, when there are any)
    used["scored"] = {"real": int(real.n_obs), "generated": {str(r): int(p.n_obs) for r, p in parts.items()}}
    per_rep, first = [], None
    for r in reps:
        part = parts.pop(r)  # each replicate's cells are dropped once scored
        log.info("evaluating replicate %s: %d generated vs %d real cells", r, part.n_obs, real.n_obs)
        per_rep.append(evaluate_pair(real, part, keys, what, model_genes=model_genes, **kwargs))
        first = part if first is None else first
    summary = aggregate_replicates(per_rep)
    result: dict[str, Any] = {
        "dataset": dataset or real_meta.uns.get("sclatent", {}).get("dataset"),
        "condition_keys": keys,
        "n_real": int(real_meta.n_obs),
        "n_generated": int(gen_meta.n_obs),
        "replicates": [int(r) for r in reps],
        "cells_used": {"cells_per_side": cells_per_side, **used},
        "genes_compared": {
            "shared": len(model_genes),
            "generated": len(gen_genes),
            "hvg": int(generated_hvg.sum()),
            "hvg_real": int(hvg.sum()),
        },
        "generation": summary,
        "generation_per_replicate": per_rep,
    }
    if held_out:
        result["generation_scope"] = (
            "all test cells" if "scope_note" in held_out else "seen combinations (the never-seen ones: held_out)"
        )
        result["held_out"] = held_out
    if floor:
        # Distances shrink with the number of cells compared, so the floor (half A vs half B of the real
        # cells) is read against the model at the same sizes: generated cells (replicate 0, subsampled to
        # |A|, seeded) vs the same half B.
        a, b = _split_halves(real[:, model_genes].copy(), keys, seed)
        pick = np.sort(np.random.default_rng(seed).choice(first.n_obs, size=min(a.n_obs, first.n_obs), replace=False))
        log.info(
            "real-vs-real floor: %d vs %d cells (model at matched size: %d vs %d)", a.n_obs, b.n_obs, len(pick), b.n_obs
        )
        try:
            # half B is the reference ("real") side of both comparisons
            result["real_vs_real"] = evaluate_metrics(b, a, keys, "highly_variable", model_genes=model_genes, **kwargs)
            result["generated_vs_real_half"] = evaluate_metrics(
                b, first[pick], keys, "highly_variable", model_genes=model_genes, **kwargs
            )
        except ValueError as exc:
            log.warning("real-vs-real floor not computed: %s", exc)
            result["real_vs_real"] = result["generated_vs_real_half"] = None
    if reconstruction is not None:
        result["reconstruction"] = read_json(reconstruction).get("metrics", {})
    sampler = gen_meta.uns.get("sclatent", {})
    result["sampler"] = {
        k: (v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v)
        for k, v in sampler.items()
        if k != "provenance_json"
    }
    result["elapsed_s"] = round(time.time() - t0, 3)
    result["provenance"] = provenance(
        "evaluate",
        {
            "condition_keys": keys,
            "seed": seed,
            "n_pcs": n_pcs,
            "max_cells": max_cells,
            "cells_per_side": cells_per_side,
            "floor": floor,
            **metric_kwargs,
        },
        {"real": real_path, "generated": generated_path},
    )
    outdir = Path(outdir)
    with atomic_outputs(outdir / "metrics.json", outdir / "metrics_mqc.tsv") as (tj, tt):
        dump_json(result, tj)
        name = result["dataset"] or "dataset"
        parts = [(f"{name}: ", summary)]
        if result.get("real_vs_real"):
            parts += [
                (f"{name} (half-size): ", result["generated_vs_real_half"]),
                (f"{name} real-vs-real floor: ", result["real_vs_real"]),
            ]
        if result.get("reconstruction"):
            parts.append((f"{name} reconstruction: ", result["reconstruction"]))
        Path(tt).write_text(to_mqc_tsv(parts))
    log.info(
        "EVALUATE done in %.1fs: W2 %.3f (floor %s)",
        result["elapsed_s"],
        summary["overall"]["w2"]["mean"],
        "n/a" if not result.get("real_vs_real") else f"{result['real_vs_real']['overall']['w2']:.3f}",
    )
    return result
