"""tools/nextflow/bootstrap.sh on a machine without Nextflow: its log is plain text (no ANSI codes from Maven)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from nfhelpers import REPO

# a stand-in for Maven 3.8: what it prints in batch mode with colours off (ANSI resets), and one jar
FAKE_MVN = r"""#!/usr/bin/env bash
printf '\033[0m\033[0m\033[1mINFO\033[m resolving\n'
for a in "$@"; do case "$a" in -DoutputDirectory=*) out="${a#-DoutputDirectory=}";; esac; done
mkdir -p "$out" && touch "$out/nextflow-fake.jar"
"""


def test_bootstrap_log_has_no_colour_codes(tmp_path):
    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    shutil.copytree(REPO / "tools" / "nextflow", root / "tools" / "nextflow")
    shutil.copy(REPO / "nextflow.config", root / "nextflow.config")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mvn").write_text(FAKE_MVN)
    (fake / "mvn").chmod(0o755)
    java = shutil.which("java")
    assert java, "the bootstrap needs java"
    (fake / "java").symlink_to(java)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}
    script = root / "tools" / "nextflow" / "bootstrap.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "resolving" in log and "\x1b" not in log, repr(log)
    assert (root / ".cache" / "nextflow" / "bin" / "nextflow").is_file()
    assert list(Path(root / ".cache" / "nextflow").glob("*/lib/nextflow-fake.jar"))
