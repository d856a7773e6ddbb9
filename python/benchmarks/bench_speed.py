"""Speed and cost: throughput and peak memory of each step, presets, threads, TOKENIZE at scale, Nextflow.

The per-step costs on the real datasets come from the quality runs (every pipeline step there is a measured
child process). This module adds what the quality runs do not measure:
- TRAIN_VAE cells/s and peak RSS of the tiny and default presets (short `--max-steps` runs on one dataset's
  tokens), and of the default preset at 1 thread vs all cores (the machine is shared: the load average is
  recorded next to every timing);
- TRAIN_PRIOR samples/s and SAMPLE cells/s (with NFE) at the default DiT size, from a briefly trained default
  DiT (sampling cost does not depend on how long the prior was trained);
- TOKENIZE on large synthetic data (bench_tokenize.py's data and command);
- the end-to-end wall time of `nextflow run main.nf -profile test` (or `-stub-run`, wiring only, in --quick).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import REPO, Plan, Runner, StepRecord, child_env, load_average, run_child, training_summary

log = logging.getLogger(__name__)

NO_CHECKPOINT = str(10**9)


def preset_throughput(runner: Runner, plan: Plan, tokens: Path, dataset: str, workdir: Path) -> list[dict[str, Any]]:
    """TRAIN_VAE cells/s and peak RSS of the preset the quality runs did not use, and of the default preset at the
    other thread count (1 vs all cores) when `plan.threads_comparison`."""
    cores = os.cpu_count() or 1
    runs = [(p, plan.threads) for p in ("tiny", "default") if p != plan.vae_preset]
    if plan.threads_comparison:
        other = cores if plan.threads == 1 else 1
        if other != plan.threads:
            runs.append(("default", other))
    rows = []
    saved = runner.threads
    for preset, threads in runs:
        out = workdir / f"vae_{preset}_t{threads}"
        runner.threads = threads
        try:
            rec = runner.sclatent(
                "TRAIN_VAE",
                dataset,
                [
                    "train-vae",
                    "--tokens",
                    tokens,
                    "--outdir",
                    out,
                    "--preset",
                    preset,
                    "--max-steps",
                    plan.speed_steps,
                    "--batch-size",
                    plan.vae_batch_size,
                    "--decode-genes",
                    plan.vae_decode_genes,
                    "--threads",
                    threads,
                    "--seed",
                    plan.seed,
                    "--no-progress",
                    "--checkpoint-every",
                    NO_CHECKPOINT,
                ],
                child=True,
            )
        finally:
            runner.threads = saved
        summary = training_summary(out)
        rec.extra.update(preset=preset, threads=threads, cells_per_s=summary["items_per_s"], speed_run=True)
        rows.append(
            {
                "preset": preset,
                "threads": threads,
                "steps": summary["steps"],
                "cells_per_s": summary["items_per_s"],
                "train_s": summary["train_s"],
                "wall_s": rec.wall_s,
                "peak_rss_mb": rec.peak_rss_mb,
                "load": rec.load_text(),
            }
        )
    return rows


def default_size_prior_and_sample(
    runner: Runner, plan: Plan, dataset: str, vae: Path, latents: Path, like: Path, workdir: Path
) -> dict[str, Any]:
    """TRAIN_PRIOR samples/s at the default DiT size (a few steps) and SAMPLE cells/s from that DiT."""
    import anndata as ad
    import numpy as np

    prior = workdir / "prior_default"
    rec = runner.sclatent(
        "TRAIN_PRIOR",
        dataset,
        [
            "train-prior",
            "--latents",
            latents,
            "--outdir",
            prior,
            "--preset",
            "default",
            "--max-steps",
            max(2, plan.speed_steps // 3),
            "--threads",
            plan.threads,
            "--seed",
            plan.seed,
            "--no-progress",
            "--checkpoint-every",
            NO_CHECKPOINT,
        ],
        child=True,
    )
    summary = training_summary(prior)
    rec.extra.update(preset="default", samples_per_s=summary["items_per_s"], speed_run=True)
    model = workdir / "model_default_size.pt"
    runner.sclatent("BUNDLE", dataset, ["bundle", "--vae", vae, "--prior", prior, "--out", model], child=False)
    real = ad.read_h5ad(like)
    n = min(plan.default_size_sample_cells, real.n_obs)
    pick = np.sort(np.random.default_rng(plan.seed).choice(real.n_obs, size=n, replace=False))
    subset = workdir / "like_default_size.h5ad"
    real[pick].copy().write_h5ad(subset)
    out = workdir / "sample_default_size.h5ad"
    srec = runner.sclatent(
        "SAMPLE",
        dataset,
        ["sample", "--model", model, "--like", subset, "--out", out, "--seed", plan.seed, "--threads", plan.threads],
        child=True,
    )
    uns = dict(ad.read_h5ad(out, backed="r").uns["sclatent"])
    srec.extra.update(
        cells=n,
        cells_per_s=n / srec.wall_s,
        in_step_cells_per_s=n / max(float(uns["seconds"]), 1e-9),
        nfe_per_batch=uns["nfe_per_batch"],
        method=uns["method"],
        speed_run=True,
        prior_preset="default",
    )
    return {
        "prior": {
            "steps": summary["steps"],
            "samples_per_s": summary["items_per_s"],
            "peak_rss_mb": rec.peak_rss_mb,
            "load": rec.load_text(),
        },
        "sample": {
            "cells": n,
            "nfe_per_batch": uns["nfe_per_batch"],
            "method": uns["method"],
            "precision": str(uns.get("precision", "fp32")),
            "wall_s": srec.wall_s,
            "cells_per_s": n / srec.wall_s,
            "in_step_cells_per_s": n / max(float(uns["seconds"]), 1e-9),
            "peak_rss_mb": srec.peak_rss_mb,
            "load": srec.load_text(),
        },
    }


def tokenize_synthetic(runner: Runner, plan: Plan, workdir: Path) -> list[dict[str, Any]]:
    """TOKENIZE cells/s and peak RSS on synthetic sparse data: the data and command of bench_tokenize.run_one.

    Not `bench_tokenize.run_one` itself: it spawns TOKENIZE from the process that has just built the dataset,
    and Linux charges that process's memory high-water mark to the child's ru_maxrss, so its peak RSS includes
    the generator's memory. Here the data are built in a throw-away child and TOKENIZE is measured through the
    harness's launcher.
    """
    rows = []
    for n in plan.tokenize_cells:
        h5ad, out = workdir / f"synthetic_{n}.h5ad", workdir / f"tokens_{n}"
        workdir.mkdir(parents=True, exist_ok=True)
        code = (
            "import sys\nfrom sclatent.synthetic import synthetic_sparse_counts\n"
            "a = synthetic_sparse_counts(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), seed=0)\n"
            "a.var['highly_variable'] = True\na.write_h5ad(sys.argv[4])\nprint(a.X.nnz)\n"
        )
        if runner.children:
            made = subprocess.run(
                [sys.executable, "-c", code, str(n), str(plan.tokenize_genes), str(plan.tokenize_nnz), str(h5ad)],
                capture_output=True,
                text=True,
                check=True,
                env=child_env(plan.threads),
            )
            nnz = int(made.stdout.split()[-1])
        else:
            from sclatent.synthetic import synthetic_sparse_counts

            adata = synthetic_sparse_counts(n, plan.tokenize_genes, plan.tokenize_nnz, seed=0)
            adata.var["highly_variable"] = True
            adata.write_h5ad(h5ad)
            nnz = int(adata.X.nnz)
        rec = runner.sclatent(
            "TOKENIZE",
            f"synthetic-{n}",
            ["tokenize", "--train", h5ad, "--outdir", out, "--genes", "all", "--no-progress"],
            child=True,
        )
        rec.extra.update(cells=n, cells_per_s=n / rec.wall_s, speed_run=True)
        rows.append(
            {
                "cells": n,
                "genes": plan.tokenize_genes,
                "nnz_per_cell": round(nnz / n, 1),
                "seconds": round(rec.wall_s, 2),
                "cells_per_s": round(n / rec.wall_s),
                "peak_rss_mb": rec.peak_rss_mb,
                "load": rec.load_text(),
            }
        )
        h5ad.unlink()
        shutil.rmtree(out)
    return rows


def nextflow_test(plan: Plan, workdir: Path, logdir: Path) -> dict[str, Any]:
    """Wall time of `nextflow run main.nf -profile test` (or -stub-run), run from a scratch folder."""
    nxf = Path(os.environ.get("SCLATENT_NEXTFLOW", REPO / ".cache" / "nextflow" / "bin" / "nextflow"))
    if not nxf.exists():
        nxf_on_path = shutil.which("nextflow")
        if nxf_on_path is None:
            return {"skipped": f"no Nextflow at {nxf} or on PATH (run `make nextflow`)"}
        nxf = Path(nxf_on_path)
    run_dir = workdir / "nextflow"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(nxf),
        "-log",
        str(run_dir / "nextflow.log"),
        "run",
        str(REPO / "main.nf"),
        "-profile",
        "test",
        "--outdir",
        str(run_dir / "results"),
        "-w",
        str(run_dir / "work"),
        "-ansi-log",
        "false",
    ]
    if plan.nextflow == "stub":
        cmd.append("-stub-run")
    env = dict(os.environ)  # as a user runs it: the pipeline's own thread settings
    env.setdefault("NXF_HOME", str(REPO / ".cache" / "nxf-home"))
    before = load_average()
    wall, rss, code = run_child(
        cmd, log_path=logdir / "nextflow_test.log", env=env, cwd=run_dir, timeout_s=plan.nextflow_timeout_s
    )
    after = load_average()
    result = {
        "command": " ".join(["nextflow", *cmd[3:]]),
        "mode": plan.nextflow,
        "wall_s": wall,
        "peak_rss_mb": rss,
        "exit_code": code,
        "load": f"{before:.1f}→{after:.1f}",
    }
    if code == -9:
        result["note"] = f"killed after the {plan.nextflow_timeout_s:.0f} s limit"
    elif code != 0:
        result["note"] = f"failed (exit {code}); log {logdir / 'nextflow_test.log'}"
    return result


def step_record(rec: StepRecord) -> dict[str, Any]:
    """A StepRecord as a plain dict (for the results JSON)."""
    return {
        "step": rec.step,
        "dataset": rec.dataset,
        "wall_s": rec.wall_s,
        "peak_rss_mb": rec.peak_rss_mb,
        "load": rec.load_text(),
        "child": rec.child,
        "command": rec.command,
        **rec.extra,
    }
