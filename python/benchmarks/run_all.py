"""`make bench` / `make bench-quick`: quality and speed of sclatent side by side against scVI, into BENCHMARKS.md.

    python python/benchmarks/run_all.py --quick     # <= 5 min: tiny presets, short budgets, one replicate
    python python/benchmarks/run_all.py --full      # <= 60 min: default VAE preset, time-budgeted training

Per dataset of ../shared/datasets (pbmc3k by cell_type; sc_mixology singlets by cell_line x protocol, one
combination held out of training) and the seeded compositional truth (cell types x perturbations, three pairs
held out; --full) it runs the pipeline and scVI (bench_quality.py), then the sampler study on the
first dataset's model (bench_sampler.py), then the speed and cost measurements (bench_speed.py, bench_scaling.py,
bench_tokenize.py), prints the tables and writes them, with machine, date, commit and this command, into this
mode's section of BENCHMARKS.md (bench_report.py). Where ../shared/datasets is absent the quality part is
skipped with a message and the speed part runs on synthetic data. Every stage checks the run's time budget and
records what it had to leave out. Results (JSON) and logs go to --workdir.

`--smoke` is the smallest path (a tiny synthetic dataset, seconds of training, no scVI, no Nextflow) used by
python/tests/test_benchmarks.py to keep the harness from rotting.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    REPO,
    SHARED_DATASETS,
    BenchError,
    Budget,
    Plan,
    Runner,
    choose_threads,
    dump_json,
    load_average,
    machine_info,
    make_dataset_inputs,
)

log = logging.getLogger("run_all")


def make_plan(mode: str, threads: int, budget_minutes: float | None, datasets: list[str] | None, scvi: bool) -> Plan:
    """The settings of one mode (see BENCHMARKS.md for what each budget bought)."""
    if mode == "full":
        plan = Plan(
            mode="full",
            budget_s=3600.0,
            datasets=["pbmc3k", "sc_mixology", "compositional"],
            threads=threads,
            vae_preset="default",
            prior_preset="tiny",
            vae_seconds=240.0,
            prior_seconds=90.0,
            replicates=2,
            # 100 calibration steps (9 measured windows): 30 mis-estimated the VAE's rate by -20% / +19% at 1dab755
            calibration_steps=100,
            uncond_replicates=1,
            sampler_cells=200,
            speed_steps=20,
            threads_comparison=True,
            default_size_sample_cells=128,
            tokenize_cells=[20_000, 50_000],
            tokenize_genes=20_000,
            tokenize_nnz=1_000,
            scaling_genes=[1_000, 2_000, 5_000, 10_000, 20_000],
            scaling_tokens=[128, 256, 512, 1_024, 2_048],
            scaling_steps=2,
            scaling_batch=64,
            nextflow="run",
            nextflow_timeout_s=1200.0,
        )
    elif mode == "quick":
        plan = Plan(
            mode="quick",
            budget_s=300.0,
            datasets=["pbmc3k", "sc_mixology"],
            threads=threads,
            vae_preset="tiny",
            prior_preset="tiny",
            vae_seconds=6.0,
            prior_seconds=4.0,
            vae_epochs_range=(1.0, 20.0),
            prior_epochs_range=(1.0, 30.0),
            calibration_steps=20,
            replicates=1,
            uncond_replicates=1,
            sampler_cells=64,
            sampler_grid=[("euler", 4), ("heun", 2)],
            speed_steps=6,
            threads_comparison=False,
            children_datasets=1,
            default_size_sample_cells=16,
            tokenize_cells=[5_000],
            tokenize_genes=5_000,
            tokenize_nnz=300,
            scale_cells=[20_000, 60_000],
            scaling_genes=[1_000, 5_000],
            scaling_tokens=[128, 512],
            scaling_steps=1,
            scaling_batch=16,
            scaling_fixed_tokens=128,
            nextflow="stub",
            nextflow_timeout_s=120.0,
        )
    elif mode == "smoke":
        plan = Plan(
            mode="smoke",
            budget_s=600.0,
            datasets=["synthetic"],
            threads=threads,
            vae_preset="tiny",
            prior_preset="tiny",
            vae_seconds=0.5,
            prior_seconds=0.5,
            vae_epochs_range=(1.0, 2.0),
            prior_epochs_range=(1.0, 2.0),
            calibration_steps=2,
            replicates=1,
            uncond_replicates=1,
            scvi=False,
            sampler_cells=24,
            sampler_grid=[("euler", 2), ("heun", 1)],
            speed_steps=2,
            threads_comparison=False,
            default_size_sample_cells=0,
            tokenize_cells=[300],
            tokenize_genes=200,
            tokenize_nnz=20,
            scaling_genes=[32, 64],
            scaling_tokens=[8, 16],
            scaling_steps=1,
            scaling_batch=8,
            scaling_fixed_tokens=16,
            scaling_fixed_genes=64,
            scaling_preset="tiny",
            scaling_decode_genes=16,
            nextflow="skip",
            children=False,
            children_datasets=0,
        )
    else:
        raise ValueError(f"unknown mode '{mode}' (expected full, quick or smoke)")
    if budget_minutes is not None:
        plan.budget_s = budget_minutes * 60.0
    if datasets is not None:
        plan.datasets = datasets
    plan.scvi = plan.scvi and scvi
    return plan


def _scvi_available() -> bool:
    try:
        import scvi  # noqa: F401
    except ImportError:
        return False
    return True


def run(plan: Plan, workdir: Path, out_md: Path | None, command: str) -> dict[str, Any]:
    """Run every stage of `plan`; returns the results dict (also written to workdir/results.json)."""
    import torch
    from bench_quality import run_dataset
    from bench_sampler import run_sampler_study
    from bench_scaling import run_scaling
    from bench_speed import (
        default_size_prior_and_sample,
        nextflow_test,
        preset_throughput,
        step_record,
        tokenize_synthetic,
    )

    budget = Budget(plan.budget_s)
    torch.set_num_threads(plan.threads)
    logdir = workdir / "logs"
    runner = Runner(logdir, plan.threads, children=plan.children)
    res: dict[str, Any] = {
        "plan": plan,
        "command": command,
        "machine": machine_info(),
        "datasets": {},
        "speed": {},
        "skipped": [],
        "notes": [],
    }
    if plan.scvi and not _scvi_available():
        plan.scvi = False
        res["notes"].append(
            "scvi-tools is not installed (`make bench` installs the `bench` extra): the scVI rows are missing"
        )

    # ---- quality per dataset (the first `children_datasets` run their pipeline steps as measured children)
    for index, name in enumerate(plan.datasets):
        try:
            spec = make_dataset_inputs(name, workdir)
        except FileNotFoundError as exc:
            msg = (
                f"{name}: skipped, dataset file {exc} not found (the real datasets live in ../shared/datasets "
                "beside the repository)"
            )
            log.warning(msg)
            res["notes"].append(msg)
            continue
        log.info("==== quality: %s (%.0f s of budget left)", name, budget.left())
        runner.children = plan.children and index < plan.children_datasets
        try:
            res["datasets"][name] = run_dataset(spec, plan, runner, budget, workdir)
        finally:
            runner.children = plan.children

    first = next(iter(res["datasets"].values()), None)
    # ---- sampler study on the first dataset's model
    if first is not None:
        if budget.allows(120 if plan.mode == "full" else 20):
            p = first["paths"]
            res["sampler"] = run_sampler_study(
                runner,
                first["dataset"],
                Path(p["model"]),
                Path(p["eval_real"]),
                workdir / first["dataset"] / "sampler",
                n_cells=plan.sampler_cells,
                grid=plan.sampler_grid,
                seed=plan.seed,
                threads=plan.threads,
            )
        else:
            res["skipped"].append(f"sampler study: not enough budget left ({budget.left():.0f} s)")

    # ---- speed
    if first is not None:
        tokens, speed_ds, ddir = Path(first["paths"]["tokens"]), first["dataset"], workdir / first["dataset"]
    else:
        spec = make_dataset_inputs("synthetic", workdir)
        ddir, speed_ds = workdir / "synthetic", "synthetic"
        runner.sclatent(
            "PREPARE",
            speed_ds,
            [
                "prepare",
                "--samplesheet",
                spec.samplesheet,
                "--dataset",
                speed_ds,
                "--outdir",
                ddir / "prepare",
                "--condition-keys",
                ",".join(spec.keys),
                "--n-hvg",
                spec.n_hvg,
                "--seed",
                plan.seed,
            ],
            child=False,
        )
        tokens = ddir / "tokens"
        runner.sclatent(
            "TOKENIZE",
            speed_ds,
            [
                "tokenize",
                "--train",
                ddir / "prepare" / "train.h5ad",
                "--outdir",
                tokens,
                "--genes",
                "hvg",
                "--no-progress",
            ],
            child=False,
        )
    res["speed"]["presets_dataset"] = speed_ds
    if budget.allows(60 if plan.mode == "full" else 15):
        res["speed"]["presets"] = preset_throughput(runner, plan, tokens, speed_ds, ddir / "speed")
    else:
        res["skipped"].append("TRAIN_VAE preset throughput (budget)")
    if first is not None and plan.default_size_sample_cells > 0:
        if budget.allows(120 if plan.mode == "full" else 25):
            p = first["paths"]
            res["speed"]["default_size"] = default_size_prior_and_sample(
                runner,
                plan,
                speed_ds,
                Path(p["vae"]),
                ddir / "encode" / "latents.npz",
                Path(p["eval_real"]),
                ddir / "speed",
            )
        else:
            res["skipped"].append("TRAIN_PRIOR / SAMPLE at the default DiT size (budget)")
    if budget.allows(90 if plan.mode == "full" else 20):
        res["speed"]["tokenize"] = tokenize_synthetic(runner, plan, workdir / "tokenize_synthetic")
    else:
        res["skipped"].append("TOKENIZE on synthetic data (budget)")
    if plan.scale_cells:
        if budget.allows(90):
            import bench_scale

            res["speed"]["scale"] = bench_scale.main(
                [
                    "--cells",
                    *map(str, plan.scale_cells),
                    "--genes",
                    str(plan.scale_genes),
                    "--genes-per-cell",
                    "300",
                    "--steps",
                    plan.scale_steps,
                    "--no-costs",
                    "--no-write",
                    "--section",
                    "quick-scale",
                    "--threads",
                    str(plan.threads),
                    "--workdir",
                    str(workdir / "scale"),
                ]
            )
        else:
            res["skipped"].append(
                f"PREPARE/TOKENIZE/GATHER at growing N: not enough budget left ({budget.left():.0f} s)"
            )
    # scaling gets what is left after a reserve for the real Nextflow run (--full); the wiring-only stub run of
    # --quick comes last and only if it still fits
    reserve = 600.0 if plan.nextflow == "run" else 0.0
    scaling_time = budget.left() - reserve - 20
    if scaling_time > 0:
        res["speed"]["scaling"] = run_scaling(
            plan.scaling_genes,
            plan.scaling_tokens,
            fixed_tokens=plan.scaling_fixed_tokens,
            fixed_genes=plan.scaling_fixed_genes,
            preset=plan.scaling_preset,
            batch=plan.scaling_batch,
            steps=plan.scaling_steps,
            decode_genes=plan.scaling_decode_genes,
            threads=plan.threads,
            logdir=logdir,
            deadline_s=scaling_time,
            children=plan.children,
        )
    else:
        res["skipped"].append(f"VAE scaling: not enough budget left ({budget.left():.0f} s)")
    if plan.nextflow != "skip":
        # the real test-profile run when it fits, else the wiring-only stub run (~60 s), else nothing
        if plan.nextflow == "run" and not budget.allows(reserve):
            res["skipped"].append(
                f"the real Nextflow test-profile run (needs ~{reserve:.0f} s, {budget.left():.0f} s left): -stub-run "
                "instead"
            )
            plan.nextflow = "stub"
        if budget.allows(65.0):
            plan.nextflow_timeout_s = max(30.0, min(plan.nextflow_timeout_s, budget.left() - 10))
            res["speed"]["nextflow"] = nextflow_test(plan, workdir, logdir)
        else:
            res["speed"]["nextflow"] = {"skipped": f"not enough budget left ({budget.left():.0f} s)"}

    res["plan"] = asdict(plan)
    res["steps"] = [step_record(r) for r in runner.records]
    res["total_s"] = budget.elapsed()
    res["load_at_end"] = round(load_average(), 2)
    dump_json(res, workdir / "results.json")
    from bench_report import render, update_benchmarks_md

    section = render(res)
    log.info("\n%s", section)
    if out_md is not None:
        update_benchmarks_md(out_md, plan.mode, section)
        log.info("wrote the %s section of %s (%.1f min)", plan.mode, out_md, res["total_s"] / 60)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode", help="<= 5 minutes")
    mode.add_argument("--full", action="store_const", const="full", dest="mode", help="<= 60 minutes")
    mode.add_argument(
        "--smoke", action="store_const", const="smoke", dest="mode", help="seconds, synthetic data (tests)"
    )
    ap.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (emptied first) [default: .cache/bench/<mode>]"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "BENCHMARKS.md",
        help="markdown file whose section for this mode is rewritten",
    )
    ap.add_argument("--no-write", action="store_true", help="print the tables only")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per step (0 = 1 when the machine is busier than its cores, else all)",
    )
    ap.add_argument("--budget-minutes", type=float, default=None, help="override the mode's time budget")
    ap.add_argument("--datasets", default=None, help="comma list among pbmc3k, sc_mixology, synthetic")
    ap.add_argument("--no-scvi", action="store_true", help="leave out the scVI baseline")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[bench %(asctime)s] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    for name in ("sclatent", "py.warnings", "anndata", "scanpy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    threads = choose_threads(args.threads)
    datasets = [d for d in args.datasets.split(",") if d] if args.datasets else None
    try:
        plan = make_plan(args.mode, threads, args.budget_minutes, datasets, not args.no_scvi)
    except ValueError as exc:
        ap.error(str(exc))
    workdir = args.workdir or (REPO / ".cache" / "bench" / args.mode)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    if not SHARED_DATASETS.exists() and plan.mode != "smoke":
        log.warning(
            "%s is absent: the quality benchmarks are skipped; only the speed part runs (on synthetic data)",
            SHARED_DATASETS,
        )
    command = "python python/benchmarks/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    try:
        res = run(plan, workdir, None if args.no_write else args.out, command)
    except BenchError as exc:
        log.error("%s", exc)
        sys.exit(1)
    log.info("done in %.1f min", (time.perf_counter() - start) / 60)
    return res


if __name__ == "__main__":
    main()
