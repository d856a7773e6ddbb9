"""Shared fixtures: synthetic AnnData files, the shared real datasets (skipped where absent, failed under CI=true)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from shared_data import locate_shared_datasets

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "datasets"


@pytest.fixture
def shared_datasets() -> Path:
    return locate_shared_datasets(SHARED, os.environ.get("CI", "").lower() == "true")


@pytest.fixture
def make_h5ad(tmp_path):
    """Write a synthetic NB dataset to tmp_path/<name>.h5ad and return its path."""
    from sclatent.synthetic import synthetic_counts

    def _make(name: str = "a", **kwargs) -> Path:
        adata = synthetic_counts(**kwargs)
        path = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(path)
        return path

    return _make


@pytest.fixture
def write_sheet(tmp_path):
    """Write a samplesheet from a header and rows; returns its path."""

    def _write(rows: list[list[str]], header: str = "dataset,h5ad,split,batch", name: str = "samplesheet.csv") -> Path:
        path = tmp_path / name
        lines = [header] + [",".join(map(str, r)) for r in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    return _write


def _assert_integer_counts(X) -> None:
    data = X.data if hasattr(X, "data") else np.asarray(X)
    assert np.all(np.isfinite(data)) and np.all(data >= 0) and np.all(np.floor(data) == data)


@pytest.fixture
def assert_integer_counts():
    """Assert that a (sparse) matrix holds finite non-negative integers."""
    return _assert_integer_counts
