"""PREPARE and GATHER on data larger than a stated memory budget: run as a child process, its peak RSS stays under it.

The budget (300 MB) is the child's whole peak resident set: Python and its libraries (about 180 MB for `sclatent
prepare` on a tiny file) plus the step's working memory. The data is 460 MB of counts (CSR float32 + int32), so a
step that held the matrix once, let alone the in-memory PREPARE's 3-5 copies, would break the budget. The chunk and
bucket sizes are made small in the child (the defaults suit large data, not a test), so the test shows that memory
follows the chunk, not the data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sclatent.ondisk import H5adWriter

BUDGET_MB = 300
SMALL_CHUNKS = "import sclatent.ondisk as o, sclatent.prepare as p; o.CHUNK_NNZ = 500_000; p.BUCKET_NNZ = 1_000_000\n"

# A fresh small interpreter forks the command and reports the ru_maxrss of that process alone (a child forked from
# the test process would report the test process's own peak).
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(code: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-c", code], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1]) / 1024


def striped_counts(path: Path, n_cells: int, n_genes: int, per_cell: int, seed: int, **obs_columns) -> int:
    """Write n_cells x n_genes integer counts, `per_cell` evenly spaced genes per cell (shifted cell by cell), chunk by
    chunk; returns the bytes of the CSR arrays."""
    rng = np.random.default_rng(seed)
    step = n_genes // per_cell
    writer = H5adWriter(path, n_genes, max_nnz=n_cells * per_cell)
    import scipy.sparse as sp

    for a in range(0, n_cells, 20_000):
        n = min(20_000, n_cells - a)
        cols = (rng.integers(0, step, n)[:, None] + step * np.arange(per_cell)[None, :]).ravel()  # ascending per cell
        data = rng.integers(1, 10, n * per_cell).astype(np.float32)
        writer.append(
            sp.csr_matrix((data, cols.astype(np.int32), np.arange(0, n * per_cell + 1, per_cell)), (n, n_genes))
        )
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(rng.choice(["a", "b", "c", "d"], n_cells)), **obs_columns},
        index=[f"c{seed}_{i}" for i in range(n_cells)],
    )
    writer.close(obs, pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    return n_cells * per_cell * 8


@pytest.mark.slow  # ~30-50 s on a loaded 2-core machine
def test_prepare_memory_does_not_grow_with_the_data(tmp_path):
    nbytes = striped_counts(tmp_path / "big.h5ad", 100_000, 5_000, 600, seed=0)
    assert nbytes > 1.3 * BUDGET_MB * 2**20
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"dataset,h5ad,split,batch,condition_keys\nbig,{tmp_path / 'big.h5ad'},all,,cell_type\n")
    code = SMALL_CHUNKS + (
        "from sclatent.cli import main\n"
        f"main(['-q', 'prepare', '--samplesheet', {str(sheet)!r}, '--outdir', {str(tmp_path / 'out')!r}])\n"
    )
    rss = peak_rss_mb(code)
    assert (tmp_path / "out" / "train.h5ad").exists()
    assert rss < BUDGET_MB, f"PREPARE peaked at {rss:.0f} MB on {nbytes / 2**20:.0f} MB of counts"


@pytest.mark.slow  # ~15-30 s on a loaded 2-core machine
def test_gather_memory_does_not_grow_with_the_data(tmp_path):
    shards, nbytes = [], 0
    for i in range(8):
        path = tmp_path / f"generated_r0_{i}.h5ad"
        n = 12_500
        nbytes += striped_counts(
            path, n, 2_000, 600, seed=i, replicate=np.zeros(n, dtype=np.int64), cell_index=np.arange(i * n, (i + 1) * n)
        )
        shards.append(str(path))
    assert nbytes > 1.3 * BUDGET_MB * 2**20
    code = SMALL_CHUNKS + (
        f"from sclatent.cli import main\nmain(['-q', 'gather', *{shards!r}, '--out', {str(tmp_path / 'all.h5ad')!r}])\n"
    )
    rss = peak_rss_mb(code)
    assert (tmp_path / "all.h5ad").stat().st_size > nbytes
    assert rss < BUDGET_MB, f"GATHER peaked at {rss:.0f} MB on {nbytes / 2**20:.0f} MB of counts"
