"""`make test`: pytest (package and pipeline), then nf-test (modules, subworkflow, pipeline); one closing line.

The closing line, printed last, counts both suites, e.g.
    pytest: 310 passed, 0 failed, 1 skipped (31 min); nf-test: 45 passed, 0 failed (14 min)
and the exit status is non-zero when either suite failed. nf-test is `nf-test` on PATH, else
`../shared/tools/nf-test/nf-test` beside the repository; without either it is skipped with a one-line notice,
except under CI=true, where a missing nf-test is a failure. Counts come from each suite's JUnit XML report.

Standard library only: it runs with the project's venv Python but imports nothing of the package.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_NFTEST = REPO.parent / "shared" / "tools" / "nf-test" / "nf-test"
# Short Nextflow runs spend most of their time compiling Groovy: the JIT's first tier makes them 2-3x faster.
FAST_JVM = "-XX:+TieredCompilation -XX:TieredStopAtLevel=1"


@dataclass
class Counts:
    """One suite's outcome; `note` replaces the counts when the suite did not run."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    note: str | None = None

    def text(self) -> str:
        if self.note:
            return self.note
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        return f"{self.passed} passed, {self.failed} failed{skipped} ({_minutes(self.seconds)})"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def junit_counts(path: Path) -> Counts:
    """Passed / failed / skipped of a JUnit XML report (pytest's or nf-test's): failures and errors are failed."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = failed = skipped = 0
    for suite in suites:
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return Counts(passed=total - failed - skipped, failed=failed, skipped=skipped)


def find_nftest() -> str | None:
    """nf-test on PATH, else the copy in ../shared/tools/nf-test (None if neither)."""
    on_path = shutil.which("nf-test")
    if on_path:
        return on_path
    return str(SHARED_NFTEST) if os.access(SHARED_NFTEST, os.X_OK) else None


def _suite(cmd: list[str], report: Path, env: dict[str, str]) -> Counts:
    """Run one suite; its counts from the JUnit report it wrote (a crash before any report counts as 1 failed)."""
    report.parent.mkdir(parents=True, exist_ok=True)
    report.unlink(missing_ok=True)
    print("+ " + shlex.join(cmd), flush=True)
    t0 = time.monotonic()
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    seconds = time.monotonic() - t0
    counts = junit_counts(report) if report.exists() else Counts(failed=1)
    if rc != 0 and counts.failed == 0:
        counts.failed = 1  # the suite itself failed (e.g. a collection error) without a failed test
    counts.seconds = seconds
    return counts


def run_pytest(python: str, extra: list[str], env: dict[str, str], reports: Path) -> Counts:
    report = reports / "pytest.xml"
    cmd = [python, "-m", "pytest", "python/tests", "tests", "-q", f"--junitxml={report}", *extra]
    return _suite(cmd, report, env)


def run_nftest(extra: list[str], env: dict[str, str], ci: bool, reports: Path) -> Counts:
    binary = find_nftest()
    if binary is None:
        where = f"no nf-test on PATH or at {SHARED_NFTEST}"
        if ci:
            print(f"nf-test: {where}: failing (CI=true); see docs/developers.md", flush=True)
            return Counts(failed=1, note=f"not run ({where}), counted as 1 failed")
        print(f"nf-test: {where}: skipped; see docs/developers.md to install it", flush=True)
        return Counts(note="skipped (not installed)")
    report = reports / "nf-test.xml"
    cmd = [binary, "test", "--junitxml", str(report), *(["--ci"] if ci else []), *extra]
    nf_env = {**env}
    nf_env.setdefault("NXF_OPTS", FAST_JVM)
    return _suite(cmd, report, nf_env)


def closing_line(pytest: Counts, nftest: Counts) -> str:
    return f"pytest: {pytest.text()}; nf-test: {nftest.text()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="Python with the package and pytest")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments (one string)")
    parser.add_argument("--nftest-args", default="", help="extra nf-test arguments (one string)")
    parser.add_argument("--reports", type=Path, default=REPO / ".cache" / "test-reports", help="JUnit reports here")
    args = parser.parse_args(argv)
    ci = os.environ.get("CI", "").lower() == "true"
    env = {**os.environ}
    pytest = run_pytest(args.python, shlex.split(args.pytest_args), env, args.reports)
    nftest = run_nftest(shlex.split(args.nftest_args), env, ci, args.reports)
    print(closing_line(pytest, nftest), flush=True)
    return 1 if pytest.failed or nftest.failed else 0


if __name__ == "__main__":
    sys.exit(main())
