"""The user docs stay true: the parameter tables match nextflow_schema.json, and docs/api.md's example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_usage_parameter_tables_match_the_schema():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "docs" / "param_tables.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow  # trains a tiny VAE and prior for 300 steps each: ~40 s on 2 cores
def test_api_example_runs(tmp_path):
    """The Python block of docs/api.md runs as written, from a folder holding the repository's assets."""
    code = "\n".join(re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), flags=re.S))
    assert "sclatent.Model.load" in code and "model.embed" in code and "model.sample" in code
    (tmp_path / "assets").symlink_to(REPO / "assets")
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / ".mpl"), "NUMBA_CACHE_DIR": str(tmp_path / ".numba")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "sclatent.Model(" in out and "condition keys ['cell_line', 'protocol']" in out
    assert re.search(r"embedding: \(400, 16\) genes matched: \d+", out), out
    assert "n_obs × n_vars = 200 ×" in out and "(50, " in out
    assert (tmp_path / "mixology_model" / "model.pt").is_file()
