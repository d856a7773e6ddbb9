"""TOKENIZE throughput and memory on a synthetic sparse dataset (issue: >= 20,000 cells/s, RSS < 2 GB, flat in n).

    .venv/bin/python python/benchmarks/bench_tokenize.py --cells 50000 200000 --genes 20000 --nnz 1000

For each size, the dataset is generated once (seeded) into a temporary h5ad, then `sclatent tokenize --genes all`
runs in a fresh subprocess whose wall time and peak RSS (getrusage of the child) are reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_one(n_cells: int, n_genes: int, nnz: int, workdir: Path) -> dict:

    from sclatent.synthetic import synthetic_sparse_counts

    h5ad = workdir / f"synth_{n_cells}.h5ad"
    t0 = time.time()
    adata = synthetic_sparse_counts(n_cells, n_genes, nnz, seed=0)
    adata.var["highly_variable"] = True
    adata.write_h5ad(h5ad)
    real_nnz = adata.X.nnz
    del adata
    gen_s = time.time() - t0
    out = workdir / f"tokens_{n_cells}"
    code = (
        "import resource, sys, time\n"
        "from sclatent.tokens import tokenize\n"
        "t = time.time()\n"
        f"tokenize({str(h5ad)!r}, {str(out)!r}, genes='all', progress=False)\n"
        "print(time.time() - t)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    secs, rss_kb = proc.stdout.split()
    secs = float(secs)
    h5ad.unlink()
    import shutil

    shutil.rmtree(out)
    return {
        "cells": n_cells,
        "genes": n_genes,
        "nnz_per_cell": round(real_nnz / n_cells, 1),
        "seconds": round(secs, 2),
        "cells_per_s": round(n_cells / secs),
        "peak_rss_mb": round(int(rss_kb) / 1024),
        "generate_s": round(gen_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--nnz", type=int, default=1_000)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.cells:
            rows.append(run_one(n, args.genes, args.nnz, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    cols = ["cells", "genes", "nnz_per_cell", "seconds", "cells_per_s", "peak_rss_mb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
