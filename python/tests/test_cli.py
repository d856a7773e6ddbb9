"""The `sclatent` command itself: what every pipeline task runs first (the versions line) must stay light."""

from __future__ import annotations

import subprocess
import sys


def test_version_imports_neither_anndata_nor_torch():
    """Each task's versions line runs `sclatent --version`: importing the CLI must not pull in the heavy stack."""
    code = "import sys; import sclatent.cli; print(sorted({'anndata', 'torch', 'scanpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_folder_that_is_no_run_is_named_as_such(tmp_path):
    """BUNDLE and ENCODE given a folder without a run's config.json say what they expected, in one line."""
    from click.testing import CliRunner

    from sclatent.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["bundle", "--vae", str(empty), "--out", str(tmp_path / "model.pt")])
    assert res.exit_code == 2 and res.output.strip() == (
        f"sclatent bundle: error: {empty}: not a TRAIN_VAE run folder (no config.json)"
    )
    res = CliRunner().invoke(
        main, ["sample", "--model", str(empty), "--out", str(tmp_path / "g.h5ad"), "--n-cells", "2"]
    )
    assert res.exit_code == 2 and f"{empty}: neither a model bundle (model.pt) nor a TRAIN_VAE run folder" in res.output
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "g.h5ad").exists()


def test_missing_shared_datasets_skip_locally_and_fail_under_ci(tmp_path):
    import pytest
    from shared_data import locate_shared_datasets

    with pytest.raises(pytest.skip.Exception):
        locate_shared_datasets(tmp_path, ci=False)
    with pytest.raises(pytest.fail.Exception, match="CI=true: failing instead of skipping"):
        locate_shared_datasets(tmp_path, ci=True)
    (tmp_path / "pbmc3k_counts_celltype.h5ad").touch()
    assert locate_shared_datasets(tmp_path, ci=True) == tmp_path
