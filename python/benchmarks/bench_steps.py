"""Training length: reconstruction (VAE) and generation (prior) quality against the number of optimiser steps.

The evidence behind the `--min-steps` defaults of train-vae and train-prior. For each dataset (PREPARE outputs:
a folder with train.h5ad and test.h5ad) it tokenizes once, trains the VAE for each of --vae-steps (ENCODE's
test-set RE and PCC), then, on the longest VAE's latents, the prior for each of --prior-steps (EVALUATE's W2,
MMD² and FD of one generated cell per test cell, next to the real-vs-real floor). Prints a table and writes
results.json into --workdir.

    python python/benchmarks/bench_steps.py --data .cache/bench/full --datasets pbmc3k/prepare,sc_mixology/prepare \\
        --vae-steps 200,1000,3000 --prior-steps 300,1500,5000 --preset tiny --workdir /tmp/bench_steps

Each dataset runs in its own process with one torch thread, so two datasets use the two cores of this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from common import run_logged


def one_dataset(
    data: Path, work: Path, preset: str, vae_steps: list[int], prior_steps: list[int]
) -> list[dict[str, Any]]:
    """All runs of one dataset; rows of the table."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "steps.log"
    tokens = work / "tokens"
    if not (tokens / "manifest.json").exists():
        run_logged(
            [
                "tokenize",
                "--train",
                data / "train.h5ad",
                "--test",
                data / "test.h5ad",
                "--outdir",
                tokens,
                "--no-progress",
            ],
            log,
        )
    rows: list[dict[str, Any]] = []
    vae = None
    for steps in vae_steps:
        vae = work / f"vae_{steps}"
        wall = run_logged(
            [
                "train-vae",
                "--tokens",
                tokens,
                "--outdir",
                vae,
                "--preset",
                preset,
                "--max-steps",
                steps,
                "--threads",
                1,
                "--no-progress",
                "--seed",
                0,
            ],
            log,
        )
        run_logged(["encode", "--model", vae, "--tokens", tokens, "--outdir", vae / "encode", "--threads", 1], log)
        m = json.loads((vae / "encode" / "reconstruction.json").read_text())["metrics"]
        rows.append(
            {
                "dataset": data.name if data.name != "prepare" else data.parent.name,
                "stage": "VAE",
                "steps": steps,
                "train_s": round(wall, 1),
                "re": m["re_nll_gene_sum_cell_mean"],
                "pcc": m["pcc_gene_batch256_sample"],
                "pcc_mean": m["pcc_gene_batch256_mean"],
                "mse": m["mse_sample"],
            }
        )
    assert vae is not None
    for steps in prior_steps:
        prior = work / f"prior_{steps}"
        wall = run_logged(
            [
                "train-prior",
                "--latents",
                vae / "encode" / "latents.npz",
                "--outdir",
                prior,
                "--preset",
                preset,
                "--max-steps",
                steps,
                "--threads",
                1,
                "--no-progress",
                "--seed",
                0,
            ],
            log,
        )
        run_logged(["bundle", "--vae", vae, "--prior", prior, "--out", prior / "model.pt"], log)
        run_logged(
            [
                "sample",
                "--model",
                prior / "model.pt",
                "--like",
                data / "test.h5ad",
                "--out",
                prior / "generated.h5ad",
                "--method",
                "heun",
                "--n-steps",
                16,
                "--threads",
                1,
                "--seed",
                0,
            ],
            log,
        )
        run_logged(
            [
                "evaluate",
                "--real",
                data / "test.h5ad",
                "--generated",
                prior / "generated.h5ad",
                "--outdir",
                prior / "eval",
                "--min-cells-per-class",
                10,
            ],
            log,
        )
        m = json.loads((prior / "eval" / "metrics.json").read_text())
        ov = m["generation"]["overall"]
        rows.append(
            {
                "dataset": rows[0]["dataset"],
                "stage": f"prior (VAE {vae_steps[-1]} steps)",
                "steps": steps,
                "train_s": round(wall, 1),
                "w2": ov["w2"]["mean"],
                "mmd2": ov["mmd2_rbf"]["mean"],
                "fd": ov["fd"]["mean"],
                "floor_w2": m["real_vs_real"]["overall"]["w2"],
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of every row."""
    out = [
        "| dataset | stage | steps | training s | RE ↓ | PCC ↑ | PCC (NB mean) ↑ | MSE ↓ | W2 ↓ (floor) | MMD² ↓ | FD "
        "↓ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(r: dict[str, Any], k: str, spec: str) -> str:
        return format(r[k], spec) if k in r else ""

    for r in rows:
        w2 = f"{r['w2']:.2f} ({r['floor_w2']:.2f})" if "w2" in r else ""
        out.append(
            f"| {r['dataset']} | {r['stage']} | {r['steps']:,} | {r['train_s']:.0f} | {f(r, 're', ',.0f')} | "
            f"{f(r, 'pcc', '.3f')} "
            f"| {f(r, 'pcc_mean', '.3f')} | {f(r, 'mse', '.3f')} | {w2} | {f(r, 'mmd2', '.3f')} | {f(r, 'fd', '.0f')} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder holding one PREPARE output folder per dataset")
    ap.add_argument(
        "--datasets", required=True, help="comma list of sub-folders of --data (each with train.h5ad, test.h5ad)"
    )
    ap.add_argument("--vae-steps", default="200,1000,3000")
    ap.add_argument("--prior-steps", default="300,1500,5000")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "default"])
    ap.add_argument("--workdir", type=Path, required=True)
    args = ap.parse_args()
    names = [d for d in args.datasets.split(",") if d]
    vae_steps = [int(s) for s in args.vae_steps.split(",")]
    prior_steps = [int(s) for s in args.prior_steps.split(",")]
    for n in names:
        for f in ("train.h5ad", "test.h5ad"):
            if not (args.data / n / f).exists():
                sys.exit(f"bench_steps: {args.data / n / f} not found")
    with ProcessPoolExecutor(max_workers=len(names)) as pool:
        futures = [
            pool.submit(
                one_dataset, args.data / n, args.workdir / n.replace("/", "_"), args.preset, vae_steps, prior_steps
            )
            for n in names
        ]
        rows = [r for fut in futures for r in fut.result()]
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
