"""The `sclatent` command itself: what every pipeline task runs first (the versions line) must stay light."""

from __future__ import annotations

import subprocess
import sys


def test_version_imports_neither_anndata_nor_torch():
    """Each task's versions line runs `sclatent --version`: importing the CLI must not pull in the heavy stack."""
    code = "import sys; import sclatent.cli; print(sorted({'anndata', 'torch', 'scanpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
