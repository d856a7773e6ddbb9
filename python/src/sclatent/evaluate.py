"""EVALUATE: generated vs real test cells, per replicate, aggregated; plus the real-vs-real floor.

Reads the real test cells (PREPARE's test.h5ad: counts, labels, `var["highly_variable"]`) and the gathered
generated cells (SAMPLE + GATHER: `obs["replicate"]`), computes the metrics of `metrics.evaluate` for every
replicate, aggregates them (`metrics.aggregate_replicates`: mean ± SEM over replicates of the per-replicate
values / class means), and — as the reference every number should be read against — the same metrics between
two seeded, stratified halves A and B of the real test cells ("real_vs_real": the floor this data allows),
next to the model at the same sizes ("generated_vs_real_half": |A| generated cells of replicate 0 vs B),
because W2 and MMD² shrink with the number of cells compared.
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

import numpy as np

from .io import InputError, atomic_outputs, dump_json, provenance, read_h5ad, read_json
from .metrics import aggregate_replicates, to_mqc_tsv
from .metrics import evaluate as evaluate_metrics
from .metrics.heldout import score_held_out, seen_only

log = logging.getLogger(__name__)


def _split_halves(adata, keys: Sequence[str], seed: int):
    """Two disjoint halves of `adata`, stratified by the joint labels (seeded)."""
    rng = np.random.default_rng(seed)
    strata = (
        adata.obs[list(keys)].astype(str).agg("|".join, axis=1).to_numpy()
        if keys
        else np.zeros(adata.n_obs, dtype=object)
    )
    first = np.zeros(adata.n_obs, dtype=bool)
    for value in sorted(set(strata.tolist())):
        idx = rng.permutation(np.flatnonzero(strata == value))
        first[idx[: len(idx) // 2]] = True
    return adata[first].copy(), adata[~first].copy()


def _held_out(real, gen, keys, model_genes, generated_path, real_path, kwargs):
    """The held-out section (empty when training saw every combination) and the seen cells of both sides."""
    seen = real.uns.get("sclatent", {}).get("train_combinations")
    if seen is None or len(keys) < 2:
        return {}, real, gen
    options = {k: v for k, v in kwargs.items() if k in ("n_pcs", "seed", "k", "max_cells", "w2_max_cells")}
    try:
        held = score_held_out(real, gen, keys, list(seen), model_genes=model_genes, **options)
    except ValueError as exc:
        raise InputError(f"{generated_path} vs {real_path}: {exc}") from None
    if not held:
        return {}, real, gen
    seen_real = seen_only(real, keys, held["combinations"])
    if seen_real.n_obs == 0:  # every test cell is of a never-seen combination: the main section scores them all
        held["scope_note"] = "every test cell is of a never-seen combination; the main metrics score them all"
        return held, real, gen
    return held, seen_real, seen_only(gen, keys, held["combinations"])


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
    floor: bool = True,
    **metric_kwargs: Any,
) -> dict[str, Any]:
    """Run EVALUATE; returns the metrics.json content."""
    t0 = time.time()
    real = read_h5ad(real_path)
    gen = read_h5ad(generated_path)
    keys = (
        list(condition_keys)
        if condition_keys is not None
        else list(real.uns.get("sclatent", {}).get("condition_keys", []))
    )
    if "highly_variable" not in real.var.columns:
        raise InputError(f"{real_path}: no var['highly_variable'] (the HVG flags written by PREPARE)")
    reps = sorted(gen.obs["replicate"].unique().tolist()) if "replicate" in gen.obs.columns else [0]
    kwargs = {"n_pcs": n_pcs, "seed": seed, **({"max_cells": max_cells} if max_cells else {}), **metric_kwargs}
    model_genes = list(gen.var_names)
    held_out, real, gen = _held_out(real, gen, keys, model_genes, generated_path, real_path, kwargs)
    per_rep = []
    for r in reps:
        part = gen[gen.obs["replicate"] == r] if "replicate" in gen.obs.columns else gen
        log.info("evaluating replicate %s: %d generated vs %d real cells", r, part.n_obs, real.n_obs)
        try:
            per_rep.append(evaluate_metrics(real, part, keys, "highly_variable", model_genes=model_genes, **kwargs))
        except ValueError as exc:
            raise InputError(f"{generated_path} vs {real_path}: {exc}") from None
    summary = aggregate_replicates(per_rep)
    result: dict[str, Any] = {
        "dataset": dataset or real.uns.get("sclatent", {}).get("dataset"),
        "condition_keys": keys,
        "n_real": int(real.n_obs),
        "n_generated": int(gen.n_obs),
        "replicates": [int(r) for r in reps],
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
        first = gen[gen.obs["replicate"] == reps[0]] if "replicate" in gen.obs.columns else gen
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
    sampler = gen.uns.get("sclatent", {})
    result["sampler"] = {
        k: (v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v)
        for k, v in sampler.items()
        if k != "provenance_json"
    }
    result["elapsed_s"] = round(time.time() - t0, 3)
    result["provenance"] = provenance(
        "evaluate",
        {"condition_keys": keys, "seed": seed, "n_pcs": n_pcs, "max_cells": max_cells, "floor": floor, **metric_kwargs},
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
