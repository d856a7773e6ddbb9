"""Benchmark of sclatent.metrics.evaluate at scale, and of the W2 subsampling size.

Synthetic data: negative-binomial counts of 10 cell types over 2,000 genes (gamma-distributed expression
profiles, log-normal library sizes), 50,000 real and 50,000 generated cells; the generated cells come from
the same model with a per-gene log-normal distortion of the means and shifted class proportions (an
imperfect generator). Both pass through the whole pipeline (hash ordering, normalisation, PCA, metrics).

1. `evaluate` runs in a fresh child process; its wall time and peak RSS (ru_maxrss of the child, which
   includes reading the two h5ad files) are reported.
2. W2 on the 30-PC features of the same cells at several subsample sizes per side: value (mean ± SD over
   seeds) and runtime per call, next to the real-vs-real floor (two disjoint halves of the real cells).

Run (from python/):  OMP_NUM_THREADS=2 ../.venv/bin/python benchmarks/bench_metrics.py
Output is a plain-text table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sclatent import metrics

log = logging.getLogger("bench_metrics")


def synthetic_counts(n_cells: int, n_genes: int, n_types: int, seed: int, distortion: float) -> ad.AnnData:
    """NB counts (theta = 5) of n_types cell types; `distortion` = SD of a per-gene log-normal mean error."""
    profile_rng = np.random.default_rng(12345)  # the same cell types on both sides
    profiles = profile_rng.gamma(0.3, 1.0, size=(n_types, n_genes))  # (T, G)
    profiles /= profiles.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(np.full(n_types, 20.0))
    types = rng.choice(n_types, size=n_cells, p=proportions)
    gene_error = np.exp(rng.normal(0.0, distortion, size=n_genes))  # (G,)
    library = rng.lognormal(8.0, 0.4, size=n_cells)  # ~3,000 counts per cell
    theta = 5.0
    rows = []
    step = 5_000
    for start in range(0, n_cells, step):
        t = types[start : start + step]
        mu = profiles[t] * gene_error * library[start : start + step, None]  # (b, G)
        counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
        rows.append(sp.csr_matrix(counts))
    obs = pd.DataFrame(
        {"cell_type": [f"type_{i}" for i in types], "batch": rng.choice(["b0", "b1"], n_cells)},
        index=[f"s{seed}_cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame({"highly_variable": np.ones(n_genes, dtype=bool)}, index=[f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(sp.vstack(rows).tocsr(), obs=obs, var=var)


def _evaluate_child(real_path: str, gen_path: str, keys: list[str], queue: Any) -> None:
    start = time.perf_counter()
    real = ad.read_h5ad(real_path)
    gen = ad.read_h5ad(gen_path)
    loaded = time.perf_counter()
    result = metrics.evaluate(real, gen, keys, "highly_variable", n_pcs=30, seed=0)
    done = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux
    queue.put({"load_s": loaded - start, "evaluate_s": done - loaded, "peak_rss_gb": peak_gb, "result": result})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=50_000, help="cells per side")
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--types", type=int, default=10)
    parser.add_argument("--keys", default="cell_type", help="comma-separated condition keys (cell_type,batch)")
    parser.add_argument("--w2-sizes", default="1000,2000,3000,5000,10000", help="cells per side; '' to skip")
    parser.add_argument("--w2-seeds", type=int, default=3, help="seeds per size (1 for sizes > 5,000)")
    parser.add_argument("--floor-max", type=int, default=10_000, help="real-vs-real floor up to this size")
    parser.add_argument("--skip-evaluate", action="store_true", help="only the W2 table")
    parser.add_argument("--json", type=Path, default=None, help="also write the evaluate result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("sclatent").setLevel(logging.WARNING)
    keys = [k for k in args.keys.split(",") if k]

    t0 = time.perf_counter()
    real = synthetic_counts(args.cells, args.genes, args.types, seed=1, distortion=0.0)
    gen = synthetic_counts(args.cells, args.genes, args.types, seed=2, distortion=0.15)
    log.info("synthetic data: %d x %d genes per side, %.1f s", args.cells, args.genes, time.perf_counter() - t0)

    if not args.skip_evaluate:
        with tempfile.TemporaryDirectory() as tmp:
            real_path, gen_path = f"{tmp}/real.h5ad", f"{tmp}/gen.h5ad"
            real.write_h5ad(real_path)
            gen.write_h5ad(gen_path)
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            child = ctx.Process(target=_evaluate_child, args=(real_path, gen_path, keys, queue))
            child.start()
            report = queue.get()
            child.join()

        res = report["result"]
        log.info("")
        log.info(
            "evaluate: %d real x %d generated cells, keys %s, defaults max_cells=%d, w2_max_cells=%d",
            res["n_real"],
            res["n_generated"],
            keys,
            metrics.DEFAULT_MAX_CELLS,
            metrics.DEFAULT_W2_MAX_CELLS,
        )
        log.info("  %-28s %10.1f", "load h5ad (s)", report["load_s"])
        log.info("  %-28s %10.1f", "evaluate wall time (s)", report["evaluate_s"])
        log.info("  %-28s %10.2f", "peak RSS of the process (GB)", report["peak_rss_gb"])
        log.info("  overall: %s", ", ".join(f"{m}={res['overall'][m]:.4g}" for m in metrics.DISTRIBUTION_METRICS))
        for group, entry in res["per_class"].items():
            summary = ", ".join(f"{m}={v['mean']:.4g}" for m, v in entry["summary"].items() if v["mean"] is not None)
            log.info("  per-class mean over %d %s classes: %s", entry["n_classes"], group, summary)
        log.info("  labels: %s", json.dumps(res["labels"]))
        if args.json is not None:
            args.json.write_text(json.dumps(res, indent=1))

    sizes = [int(s) for s in args.w2_sizes.split(",") if s]
    if sizes:
        log.info("")
        log.info(
            "W2 vs subsample size (cells per side), 30-PC features of %d real / %d generated cells;",
            args.cells,
            args.cells,
        )
        log.info("floor = W2 between two disjoint random halves of the real cells at the same size (seed 0)")
        hvg = real.var["highly_variable"].to_numpy()
        real_pcs, gen_pcs, _ = metrics.feature_space(real.X, gen.X, hvg, 30)
        halves = np.random.default_rng(0).permutation(args.cells)
        half_a, half_b = real_pcs[halves[: args.cells // 2]], real_pcs[halves[args.cells // 2 :]]
        log.info(
            "  %8s %6s %10s %8s %10s %10s %10s", "cells", "seeds", "W2 mean", "W2 SD", "s/call", "floor", "floor s"
        )
        for n in sizes:
            seeds = range(args.w2_seeds if n <= 5_000 else 1)
            values, times = [], []
            for seed in seeds:
                t = time.perf_counter()
                values.append(metrics.w2(real_pcs, gen_pcs, max_cells=n, seed=seed))
                times.append(time.perf_counter() - t)
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            floor, floor_s = float("nan"), float("nan")
            if n <= args.floor_max and n <= len(half_a):
                t = time.perf_counter()
                floor = metrics.w2(half_a, half_b, max_cells=n, seed=0)
                floor_s = time.perf_counter() - t
            log.info(
                "  %8d %6d %10.4f %8.4f %10.1f %10.4f %10.1f",
                n,
                len(values),
                np.mean(values),
                sd,
                np.mean(times),
                floor,
                floor_s,
            )


if __name__ == "__main__":
    main()
