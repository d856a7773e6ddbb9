"""TRAIN_VAE throughput in the real training loop: presets x precisions on TOKENIZE folders, a few repeats.

    python python/benchmarks/bench_vae_speed.py --tokens pbmc=W/pbmc/tokens,mixology=W/mixology/tokens \\
        --configs default:fp32,default:bf16,tiny:fp32 --steps 300 --repeats 2 --workdir /tmp/vs

Each run is `sclatent train-vae --preset P --precision R --max-steps N --threads T` (the CPU defaults for batch
and decoded genes); its rate is `common.training_summary(steady=True)` of history.csv (the first logged window
left out). Runs go one after another, so run it on an otherwise idle machine. Prints one row per (dataset,
config, variant) with the rate of every repeat.

`--variant NAME='train-vae options'` (repeatable) runs every config once per variant with those options added,
e.g. `--variant k16="--count-readout 16 --readout-dropout 0" --variant preset=""`; the variants of one repeat
run back to back, so a slow spell of the machine hits every variant alike. Without it, one variant: the preset.
"""

from __future__ import annotations

import argparse
import json
import shlex
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
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME='train-vae options' added to every run of this variant; repeatable [default: the preset alone]",
    )
    args = ap.parse_args()
    datasets = [tuple(x.split("=", 1)) for x in args.tokens.split(",") if x]
    configs = [tuple(x.split(":", 1)) for x in args.configs.split(",") if x]
    for item in datasets:
        if len(item) != 2 or not (Path(item[1]) / "manifest.json").exists():
            sys.exit(f"bench_vae_speed: --tokens entry {'='.join(item)!r} is not name=<TOKENIZE folder>")
    for item in configs:
        if len(item) != 2:
            sys.exit(f"bench_vae_speed: --configs entry {':'.join(item)!r} is not preset:precision")
    variants: list[tuple[str, list[str]]] = []
    for text in args.variant or ["preset="]:
        name, sep, options = text.partition("=")
        if not sep or not name.strip() or "/" in name:
            sys.exit(f"bench_vae_speed: --variant {text!r} is not NAME='train-vae options'")
        try:
            words = shlex.split(options)
        except ValueError as err:  # an unclosed quote
            sys.exit(f"bench_vae_speed: --variant {text!r}: {err}")
        variants.append((name.strip(), words))
    args.workdir.mkdir(parents=True, exist_ok=True)
    rates: dict[tuple[str, str, str, str], list[float]] = {}
    for rep in range(args.repeats):
        for name, tokens in datasets:
            for preset, precision in configs:
                for variant, options in variants:
                    out = args.workdir / f"{name}_{preset}_{precision}_{variant}_r{rep}"
                    run_logged(
                        [
                            "train-vae",
                            "--tokens",
                            tokens,
                            "--outdir",
                            out,
                            "--preset",
                            preset,
                            "--precision",
                            precision,
                            "--max-steps",
                            args.steps,
                            "--threads",
                            args.threads,
                            "--no-progress",
                            "--seed",
                            0,
                            *options,
                        ],
                        args.workdir / f"{out.name}.log",
                    )
                    rate = training_summary(out, steady=True)["items_per_s"]
                    rates.setdefault((name, preset, precision, variant), []).append(rate)
                    print(
                        json.dumps(
                            {
                                "dataset": name,
                                "preset": preset,
                                "precision": precision,
                                "variant": variant,
                                "repeat": rep,
                                "cells_per_s": round(rate, 1),
                            }
                        ),
                        file=sys.stderr,
                        flush=True,
                    )
    (args.workdir / "results.json").write_text(
        json.dumps(
            [
                {
                    "dataset": k[0],
                    "preset": k[1],
                    "precision": k[2],
                    "variant": k[3],
                    "options": dict(variants)[k[3]],
                    "cells_per_s": v,
                }
                for k, v in rates.items()
            ],
            indent=1,
        )
    )
    print(
        markdown_table(
            ["dataset", "preset", "precision", "variant", "cells/s per repeat"],
            [[*k, " / ".join(f"{r:,.0f}" for r in v)] for k, v in rates.items()],
        )
    )


if __name__ == "__main__":
    main()
