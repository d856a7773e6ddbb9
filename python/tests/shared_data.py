"""Where the tests find ../shared/datasets, and what they do when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest


def locate_shared_datasets(folder: Path, ci: bool) -> Path:
    """The real datasets' folder; where it is absent, skip the test locally but fail it under CI=true (CI has
    ../shared beside the checkout, so a missing folder there is a broken set-up, not a reason to test less)."""
    if (folder / "pbmc3k_counts_celltype.h5ad").exists():
        return folder
    message = f"real datasets not found at {folder} (they live in ../shared/datasets beside the repository)"
    if ci:
        pytest.fail(f"{message}; CI=true: failing instead of skipping")
    pytest.skip(message)
