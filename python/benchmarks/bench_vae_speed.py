"""TRAIN_VAE throughput in the real training loop: presets x precisions on TOKENIZE folders, a few repeats.

    python python/benchmarks/bench_vae_speed.py --tokens pbmc=W/pbmc/tokens,mixology=W/mixology/tokens \\
        --configs default:fp32,default:bf16,tiny:fp32 --steps 300 --repeats 2 --workdir /tmp/vs

Each run is `sclatent train-vae --preset P --precision R --max-steps N --threads T` (the CPU defaults for batch
and decoded genes); its rate is `common.training_summary(steady=True)` of history.csv (the first logged window
left out). Runs go one after another, so run it on an otherwise idle machine. Prints one row per (dataset,
config) with the rate of every repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import markdown_table, run_logged, training_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", required=True, help="comma list of name=TOKENIZE folder")
    ap.add_argument("--configs", default="default:fp32,default:bf16,tiny:fp32", help="comma list of preset:precision")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, required=True)
    args = ap.parse_args()
    datasets = [tuple(x.split("=", 1)) for x in args.tokens.split(",") if x]
    configs = [tuple(x.split(":", 1)) for x in args.configs.split(",") if x]
    for item in datasets:
        if len(item) != 2 or not (Path(item[1]) / "manifest.json").exists():
            sys.exit(f"bench_vae_speed: --tokens entry {'='.join(item)!r} is not name=<TOKENIZE folder>")
    for item in configs:
        if len(item) != 2:
            sys.exit(f"bench_vae_speed: --configs entry {':'.join(item)!r} is not preset:precision")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rates: dict[tuple[str, str, str], list[float]] = {}
    for rep in range(args.repeats):
        for name, tokens in datasets:
            for preset, precision in configs:
                out = args.workdir / f"{name}_{preset}_{precision}_r{rep}"
                run_logged(["train-vae", "--tokens", tokens, "--outdir", out, "--preset", preset, "--precision", precision,
                            "--max-steps", args.steps, "--threads", args.threads, "--no-progress", "--seed", 0],
                           args.workdir / f"{out.name}.log")
                rate = training_summary(out, steady=True)["items_per_s"]
                rates.setdefault((name, preset, precision), []).append(rate)
                print(json.dumps({"dataset": name, "preset": preset, "precision": precision, "repeat": rep,
                                  "cells_per_s": round(rate, 1)}), file=sys.stderr, flush=True)
    (args.workdir / "results.json").write_text(json.dumps([{"dataset": k[0], "preset": k[1], "precision": k[2],
                                                             "cells_per_s": v} for k, v in rates.items()], indent=1))
    print(markdown_table(["dataset", "preset", "precision", "cells/s per repeat"],
                         [[*k, " / ".join(f"{r:,.0f}" for r in v)] for k, v in rates.items()]))


if __name__ == "__main__":
    main()
