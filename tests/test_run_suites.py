"""tests/run_suites.py, what `make test` runs: both suites, counted from their JUnit reports, one closing line."""

from __future__ import annotations

import os
import subprocess
import sys

from nfhelpers import REPO

RUNNER = REPO / "tests" / "run_suites.py"

# stand-ins for `python -m pytest ... --junitxml=PATH` and `nf-test test --junitxml PATH`, in their own formats
FAKE_PYTHON = r"""#!/usr/bin/env bash
for a in "$@"; do case "$a" in --junitxml=*) out="${a#--junitxml=}";; esac; done
mkdir -p "$(dirname "$out")"
suite='<testsuite name="pytest" errors="1" failures="1" skipped="2" tests="9"/>'
echo "<testsuites name=\"pytest tests\">$suite</testsuites>" > "$out"
exit 1
"""
FAKE_NFTEST = r"""#!/usr/bin/env bash
while [ $# -gt 0 ]; do [ "$1" = --junitxml ] && out="$2"; shift; done
mkdir -p "$(dirname "$out")"
a='<testsuite name="A" tests="3" skipped="0" failures="0"/>'
b='<testsuite name="B" tests="2" skipped="0" failures="0"/>'
echo "<testsuites>$a$b</testsuites>" > "$out"
"""


def _fake(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def _run(tmp_path, env_extra: dict[str, str], with_nftest: bool):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if with_nftest:
        _fake(bin_dir, "nf-test", FAKE_NFTEST)
    python = _fake(tmp_path, "python", FAKE_PYTHON)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", **env_extra}
    cmd = [sys.executable, str(RUNNER), "--python", str(python), "--reports", str(tmp_path / "reports")]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def test_both_suites_are_counted_in_one_closing_line(tmp_path):
    proc = _run(tmp_path, {"CI": "true"}, with_nftest=True)
    last = proc.stdout.strip().splitlines()[-1]
    # pytest: 9 tests, 1 failure + 1 error = 2 failed, 2 skipped; nf-test: 5 tests over two suites
    assert last.startswith("pytest: 5 passed, 2 failed, 2 skipped (") and "; nf-test: 5 passed, 0 failed (" in last
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the failed pytest tests fail `make test`


def test_missing_nftest_skips_locally_and_fails_under_ci(tmp_path, monkeypatch):
    sys.path.insert(0, str(RUNNER.parent))
    import run_suites

    monkeypatch.setattr(run_suites, "SHARED_NFTEST", tmp_path / "absent" / "nf-test")
    monkeypatch.setenv("PATH", str(tmp_path))
    local = run_suites.run_nftest([], {}, ci=False, reports=tmp_path)
    assert (local.failed, local.text()) == (0, "skipped (not installed)")
    ci = run_suites.run_nftest([], {}, ci=True, reports=tmp_path)
    assert ci.failed == 1 and ci.text().startswith("not run (no nf-test on PATH or at ")


def test_shared_nftest_is_the_fallback(tmp_path, monkeypatch):
    sys.path.insert(0, str(RUNNER.parent))
    import run_suites

    shared = _fake(tmp_path, "nf-test", FAKE_NFTEST)
    monkeypatch.setattr(run_suites, "SHARED_NFTEST", shared)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert run_suites.find_nftest() == str(shared)
