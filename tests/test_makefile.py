"""What `make` leaves a user with: a working ./nextflow after set-up, and `make demo` pointing at the reports."""

from __future__ import annotations

import os
import shutil
import subprocess

from nfhelpers import REPO, nextflow_bin


def test_make_nextflow_leaves_a_working_launcher_at_the_root(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Makefile", "nextflow.config"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "tools", root / "tools")
    # a launcher already bootstrapped (newer than tools/nextflow): make only links it
    launcher = root / ".cache" / "nextflow" / "bin" / "nextflow"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(f'#!/usr/bin/env bash\nexec "{nextflow_bin()}" "$@"\n')
    launcher.chmod(0o755)
    env = {**os.environ, "NXF_HOME": str(REPO / ".cache" / "nxf-home")}
    proc = subprocess.run(["make", "-s", "nextflow"], cwd=root, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Nextflow: ./nextflow" in proc.stdout
    assert os.readlink(root / "nextflow") == ".cache/nextflow/bin/nextflow"
    version = subprocess.run(["./nextflow", "-version"], cwd=root, capture_output=True, text=True, env=env, timeout=120)
    assert version.returncode == 0 and "version 25." in version.stdout, version.stdout + version.stderr


def test_make_demo_points_at_the_sclatent_reports():
    text = (REPO / "Makefile").read_text()
    demo = text.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "results/*/report/report.html" in demo and "pipeline_info" not in demo.split("find")[-1].split("\n", 1)[1]


def test_make_venv_installs_against_the_ranges_with_an_empty_constraints(tmp_path):
    """`make test CONSTRAINTS=` keeps a compatible torch the user has (README, "Using your own torch")."""
    (tmp_path / "python").mkdir()
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / "python" / name, tmp_path / "python" / name)

    def pip_line(*args: str) -> str:
        out = subprocess.run(["make", "-n", "venv", *args], cwd=tmp_path, capture_output=True, text=True, check=True)
        return next(ln for ln in out.stdout.splitlines() if "install --quiet -e 'python[test]'" in ln)

    assert pip_line().endswith("-c python/constraints.txt")
    assert pip_line("CONSTRAINTS=").rstrip().endswith("-e 'python[test]'")
