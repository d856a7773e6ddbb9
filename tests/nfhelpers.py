"""Helpers for the pipeline tests: find and run the real `nextflow` (made by `make nextflow`)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def nextflow_bin() -> str:
    path = os.environ.get("SCLATENT_NEXTFLOW") or str(REPO / ".cache" / "nextflow" / "bin" / "nextflow")
    if not os.path.exists(path):
        pytest.fail(f"Nextflow launcher not found at {path}: run `make nextflow` (make test does it)")
    return path


@dataclass
class NextflowRun:
    returncode: int
    output: str
    launch_dir: Path
    outdir: Path

    def trace(self) -> list[dict[str, str]]:
        files = sorted((self.outdir / "pipeline_info").glob("execution_trace_*.txt"))
        assert files, f"no trace in {self.outdir}/pipeline_info"
        lines = files[-1].read_text().splitlines()
        header = lines[0].split("\t")
        return [dict(zip(header, ln.split("\t"))) for ln in lines[1:]]


def run_nextflow(launch_dir: Path, *args: str, outdir: Path | None = None, timeout: int = 1800, env: dict | None = None) -> NextflowRun:
    """Run `nextflow run <repo>/main.nf ARGS` in launch_dir (its own work dir and .nextflow history)."""
    launch_dir.mkdir(parents=True, exist_ok=True)
    outdir = outdir or launch_dir / "results"
    cmd = [nextflow_bin(), "run", str(REPO / "main.nf"), "-ansi-log", "false", "--outdir", str(outdir), *args]
    full_env = {**os.environ, "NXF_ANSI_LOG": "false", **(env or {})}
    full_env.setdefault("NXF_HOME", str(REPO / ".cache" / "nxf-home"))
    proc = subprocess.run(cmd, cwd=launch_dir, capture_output=True, text=True, timeout=timeout, env=full_env)
    return NextflowRun(proc.returncode, proc.stdout + proc.stderr, launch_dir, outdir)


def nextflow_cmd(launch_dir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.setdefault("NXF_HOME", str(REPO / ".cache" / "nxf-home"))
    return subprocess.run([nextflow_bin(), *args], cwd=launch_dir, capture_output=True, text=True, timeout=timeout, env=env)
