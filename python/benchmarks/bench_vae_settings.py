"""VAE training settings: reconstruction quality (ENCODE's test-set metrics) over a grid of train-vae options.

The evidence behind train-vae's learning-rate and decoded-genes defaults. For each dataset (PREPARE output:
a folder with train.h5ad and test.h5ad) it tokenizes once, then trains one VAE per (grid point, seed) for a
fixed number of optimiser steps and encodes the test cells. Prints a table (one row per dataset x grid point,
mean over seeds) and writes results.json into --workdir.

    python python/benchmarks/bench_vae_settings.py --data .gpudata/data --datasets pbmc,mixology \\
        --grid "lr=1e-3,3e-3;decode-genes=512,256" --steps 500 --preset default --seeds 0 --workdir /tmp/vs

`--grid` is a ';'-separated list of `option=v1,v2,...` (train-vae option names without the dashes; the values
`on` / `off` give a flag's `--option` / `--no-option` form, and a ':' inside a value stands for ',', as in
`betas=0.9:0.999`); the grid is their product. A `max-steps` axis
overrides `--steps` per point (e.g. `batch-size=64;max-steps=1600` for the same epochs as batch 128 at 800).
Runs go to a pool of `--workers` processes with one torch thread each; the training seconds in the table are the
run's own (comparable between rows only when the machine is equally busy).

`--train-cells N` also encodes N training cells (a seeded sample, tokenized with the same vocabulary as the test
split of a second token folder) with every trained model and adds their RE and per-gene PCC to the table: the
train-test gap says whether a setting over- or underfits (a test RE well above the train RE is overfitting).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from common import markdown_table, run_logged


def parse_grid(text: str) -> list[dict[str, str]]:
    """'a=1,2;b=x' -> [{'a': '1', 'b': 'x'}, {'a': '2', 'b': 'x'}]; an empty text is one empty point."""
    axes: list[tuple[str, list[str]]] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"grid axis {part!r} is not 'option=v1,v2'")
        name, values = part.split("=", 1)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ValueError(f"grid axis {name!r} has no values")
        axes.append((name.strip().lstrip("-"), vals))
    return [dict(zip([a for a, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def _option(name: str, value: str) -> list[str]:
    """Command-line words of one grid value: 'on' / 'off' are the --name / --no-name flag forms; a ':' in a value
    becomes ',' (values are ','-separated in the grid, so `betas=0.9:0.999` is `--betas 0.9,0.999`)."""
    if value == "on":
        return [f"--{name}"]
    if value == "off":
        return [f"--no-{name}"]
    return [f"--{name}", value.replace(":", ",")]


def point_steps(point: dict[str, str], steps: int) -> int:
    """Optimiser steps of a grid point: its own `max-steps` value if the grid has that axis, else `--steps`."""
    return int(point.get("max-steps", steps))


def write_train_sample(train: Path, n: int, out: Path, seed: int = 0) -> int:
    """Write a seeded sample of n training cells (all of them if fewer) to out; returns the number written."""
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(train)
    k = min(n, adata.n_obs)
    idx = np.sort(np.random.default_rng(seed).choice(adata.n_obs, size=k, replace=False))
    adata[idx].copy().write_h5ad(out)
    return k


def _metrics(encode_dir: Path) -> dict[str, float]:
    m = json.loads((encode_dir / "reconstruction.json").read_text())["metrics"]
    return {
        "re": m["re_nll_gene_sum_cell_mean"],
        "pcc": m["pcc_gene_batch256_sample"],
        "pcc_mean": m["pcc_gene_batch256_mean"],
        "mse": m["mse_sample"],
    }


def one_run(
    data: Path,
    tokens: Path,
    work: Path,
    preset: str,
    steps: int,
    point: dict[str, str],
    seed: int,
    train_tokens: Path | None = None,
) -> dict[str, Any]:
    """Train one VAE and encode the test cells (and, with train_tokens, the sampled training cells); one result row."""
    name = "_".join(f"{k}-{v}" for k, v in point.items()) or "defaults"
    steps = point_steps(point, steps)
    vae = work / f"{name}_s{seed}"
    log = work / f"{name}_s{seed}.log"
    extra = [x for k, v in point.items() if k != "max-steps" for x in _option(k, v)]  # steps: --max-steps above
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
            seed,
            *extra,
        ],
        log,
    )
    run_logged(
        ["encode", "--model", vae, "--tokens", tokens, "--outdir", vae / "encode", "--threads", 1, "--seed", 0], log
    )
    row = {
        "dataset": data.name,
        "point": name,
        "seed": seed,
        "steps": steps,
        "train_s": round(wall, 1),
        **_metrics(vae / "encode"),
    }
    if train_tokens is not None:
        run_logged(
            [
                "encode",
                "--model",
                vae,
                "--tokens",
                train_tokens,
                "--outdir",
                vae / "encode_train",
                "--threads",
                1,
                "--seed",
                0,
            ],
            log,
        )
        m = _metrics(vae / "encode_train")
        row.update(re_train=m["re"], pcc_train=m["pcc"])
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: mean over seeds per (dataset, grid point), with the seed count."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    gap = bool(rows) and all("re_train" in r for r in rows)
    for r in rows:
        groups.setdefault((r["dataset"], r["point"]), []).append(r)
    body = []
    for (ds, point), rs in groups.items():
        mean = {k: statistics.fmean(r[k] for r in rs) for k in ("train_s", "re", "pcc", "pcc_mean", "mse")}
        line = [
            ds,
            point,
            f"{rs[0]['steps']:,}",
            len(rs),
            f"{mean['train_s']:.0f}",
            f"{mean['re']:,.1f}",
            f"{mean['pcc']:.4f}",
            f"{mean['pcc_mean']:.3f}",
            f"{mean['mse']:.3f}",
        ]
        if gap:
            line += [
                f"{statistics.fmean(r['re_train'] for r in rs):,.1f}",
                f"{statistics.fmean(r['pcc_train'] for r in rs):.4f}",
            ]
        body.append(line)
    headers = ["dataset", "setting", "steps", "seeds", "training s", "RE ↓", "PCC ↑", "PCC (NB mean) ↑", "MSE ↓"]
    if gap:
        headers += ["RE, train cells", "PCC, train cells"]
    return markdown_table(headers, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder holding one PREPARE output folder per dataset")
    ap.add_argument(
        "--datasets", required=True, help="comma list of sub-folders of --data (each with train.h5ad, test.h5ad)"
    )
    ap.add_argument("--grid", default="", help="';'-separated 'option=v1,v2' axes of train-vae options")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seeds", default="0", help="comma list of training seeds")
    ap.add_argument("--preset", default="default", choices=["tiny", "default"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument(
        "--train-cells",
        type=int,
        default=0,
        help="also encode this many (seeded) training cells with every model: the train-test gap",
    )
    args = ap.parse_args()
    if args.train_cells < 0:
        sys.exit(f"bench_vae_settings: --train-cells must be >= 0, got {args.train_cells}")
    names = [d for d in args.datasets.split(",") if d]
    points = parse_grid(args.grid)
    seeds = [int(s) for s in args.seeds.split(",")]
    for n in names:
        for f in ("train.h5ad", "test.h5ad"):
            if not (args.data / n / f).exists():
                sys.exit(f"bench_vae_settings: {args.data / n / f} not found")
    jobs = []
    for n in names:
        work = args.workdir / n
        work.mkdir(parents=True, exist_ok=True)
        tokens = work / "tokens"
        if not (tokens / "manifest.json").exists():
            run_logged(
                [
                    "tokenize",
                    "--train",
                    args.data / n / "train.h5ad",
                    "--test",
                    args.data / n / "test.h5ad",
                    "--outdir",
                    tokens,
                    "--no-progress",
                ],
                work / "tokenize.log",
            )
        train_tokens = None
        if args.train_cells > 0:
            train_tokens = work / "tokens_train_cells"
            if not (train_tokens / "manifest.json").exists():
                sample = work / "train_cells.h5ad"
                write_train_sample(args.data / n / "train.h5ad", args.train_cells, sample)
                # the same --train as `tokens`, so the same vocabulary; its test split is the sampled training cells
                run_logged(
                    [
                        "tokenize",
                        "--train",
                        args.data / n / "train.h5ad",
                        "--test",
                        sample,
                        "--outdir",
                        train_tokens,
                        "--no-progress",
                    ],
                    work / "tokenize.log",
                )
        jobs += [
            (args.data / n, tokens, work, args.preset, args.steps, p, s, train_tokens) for p in points for s in seeds
        ]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(one_run, *job) for job in jobs]
        rows = []
        for fut in futures:
            rows.append(fut.result())
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
