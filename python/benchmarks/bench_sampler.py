"""The sampler study of issue 4: W2 (30-PC feature space) of Euler / Heun at several step counts vs dopri5.

On one trained VAE + prior, a seeded subset of the evaluation cells is generated `--like` that subset with every
setting (`sclatent sample --method M --n-steps N`, dopri5 at atol = rtol = 1e-5) and the same seed, so every
setting starts from the same noise, draws the same library sizes and uses the same NB random stream: the W2
differences come from the ODE solution alone, not from sampling noise. W2 is computed against all real
evaluation cells in the PCA space of those real cells (`metrics.feature_space`, `metrics.w2`). The answer is
the setting with the fewest function evaluations (NFE) whose W2 is within 2% of dopri5's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from common import Runner

log = logging.getLogger(__name__)

TOLERANCE = 0.02  # "within 2% of dopri5's W2"


def run_sampler_study(
    runner: Runner,
    dataset: str,
    model: Path,
    eval_real: Path,
    outdir: Path,
    *,
    n_cells: int,
    grid: Sequence[tuple[str, int]],
    seed: int,
    threads: int,
) -> dict[str, Any]:
    """Generate with each (method, n_steps) of `grid` and with dopri5; returns rows and the chosen setting."""
    import anndata as ad

    from sclatent import metrics

    outdir.mkdir(parents=True, exist_ok=True)
    real = ad.read_h5ad(eval_real)
    pick = np.sort(np.random.default_rng(seed).choice(real.n_obs, size=min(n_cells, real.n_obs), replace=False))
    subset = outdir / "like_subset.h5ad"
    real[pick].copy().write_h5ad(subset)
    # the reference is dopri5 in fp32; each grid item is (method, steps) or (method, steps, precision)
    settings = [("dopri5", 0, "fp32"), *((*item, "fp32")[:3] for item in grid)]
    gens: dict[tuple[str, int, str], Any] = {}
    rows = []
    for method, steps, precision in settings:
        out = outdir / f"{method}{steps or ''}_{precision}.h5ad"
        args = [
            "sample",
            "--model",
            model,
            "--like",
            subset,
            "--out",
            out,
            "--method",
            method,
            "--seed",
            seed,
            "--threads",
            threads,
            "--precision",
            precision,
        ]
        args += ["--atol", "1e-5", "--rtol", "1e-5"] if method == "dopri5" else ["--n-steps", steps]
        rec = runner.sclatent("SAMPLER", dataset, args, child=False, method=method, n_steps=steps)
        gen = ad.read_h5ad(out)
        gens[(method, steps, precision)] = gen
        uns = gen.uns["sclatent"]
        rows.append(
            {
                "method": method,
                "n_steps": steps or None,
                "precision": str(uns.get("precision", "fp32")),
                "nfe": float(uns["nfe_per_batch"]),
                "seconds": float(uns["seconds"]),
                "wall_s": rec.wall_s,
                "load": rec.load_text(),
                "cells_per_s": gen.n_obs / max(float(uns["seconds"]), 1e-9),
            }
        )
    genes = list(gens[settings[0]].var_names)
    real_g = real[:, genes]
    hvg = real_g.var["highly_variable"].to_numpy()
    for row, key in zip(rows, settings):
        real_pcs, gen_pcs, _ = metrics.feature_space(real_g.X, gens[key][:, genes].X, hvg, 30)
        row["w2"] = metrics.w2(real_pcs, gen_pcs, seed=seed)
    ref = rows[0]["w2"]
    for row in rows:
        row["w2_rel_diff"] = (row["w2"] - ref) / ref
    within = [r for r in rows[1:] if abs(r["w2_rel_diff"]) <= TOLERANCE]
    best = min(within, key=lambda r: (r["nfe"], r["method"] != "heun", r["precision"] != "bf16")) if within else None
    log.info(
        "sampler study: dopri5 W2 %.4f at NFE %.0f; fewest NFE within 2%%: %s",
        ref,
        rows[0]["nfe"],
        "none" if best is None else f"{best['method']} {best['n_steps']} {best['precision']} (NFE {best['nfe']:.0f})",
    )
    return {
        "dataset": dataset,
        "n_cells": int(len(pick)),
        "n_real": int(real.n_obs),
        "rows": rows,
        "best": best,
        "tolerance": TOLERANCE,
        "seed": seed,
    }


def main() -> None:
    """Stand-alone study on one trained model:

    python python/benchmarks/bench_sampler.py --vae RUN/vae --prior RUN/prior --real test.h5ad --outdir /tmp/sampler
    """
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(description="Euler / Heun step counts against dopri5 (W2, NFE) on one trained model")
    ap.add_argument("--model", type=Path, required=True, help="model bundle (BUNDLE's model.pt)")
    ap.add_argument("--real", type=Path, required=True, help="real test cells (PREPARE's test.h5ad)")
    ap.add_argument("--outdir", type=Path, required=True)
    ap.add_argument("--n-cells", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--grid",
        default="euler:4,euler:8,euler:16,heun:2,heun:4,heun:8,heun:16",
        help="comma list of method:steps[:precision] (euler or heun; precision fp32 or bf16, "
        "default fp32) compared with dopri5 in fp32",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    grid = []
    for item in (x.strip() for x in args.grid.split(",") if x.strip()):
        method, steps, *rest = item.split(":") + [""]
        precision = rest[0] or "fp32"
        if (
            method not in ("euler", "heun")
            or not steps.isdigit()
            or int(steps) < 1
            or len(rest) > 2
            or precision not in ("fp32", "bf16")
        ):
            sys.exit(
                f"bench_sampler: --grid item '{item}' is not euler:N or heun:N (N >= 1), "
                "optionally followed by :fp32 or :bf16"
            )
        grid.append((method, int(steps), precision))
    runner = Runner(args.outdir / "logs", args.threads, children=False)
    res = run_sampler_study(
        runner,
        args.model.parent.name,
        args.model,
        args.real,
        args.outdir,
        n_cells=args.n_cells,
        grid=grid,
        seed=args.seed,
        threads=args.threads,
    )
    (args.outdir / "sampler.json").write_text(json.dumps(res, indent=1, default=str))
    print("| method | steps | precision | NFE | W2 | vs dopri5 | cells/s |\n|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(
            f"| {r['method']} | {r['n_steps'] or 'adaptive'} | {r['precision']} | {r['nfe']:.0f} | {r['w2']:.3f} | "
            f"{100 * r['w2_rel_diff']:+.2f}% | {r['cells_per_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
