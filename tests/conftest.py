"""Pipeline tests: they run the real `nextflow` (made by `make nextflow`) on the real pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nfhelpers import NextflowRun, run_nextflow  # noqa: E402


@pytest.fixture(scope="session")
def test_profile_run(tmp_path_factory) -> NextflowRun:
    """One real `nextflow run main.nf -profile test` shared by the assertions of this session."""
    launch = tmp_path_factory.mktemp("nf_test_profile")
    run = run_nextflow(launch, "-profile", "test")
    assert run.returncode == 0, run.output[-5000:]
    return run
