"""Shared pieces of the benchmark harness: measured steps, budgets, machine facts, datasets, tables.

- `Runner` runs one `sclatent <step>` either as a measured child process (wall time, peak RSS of the child and
  its descendants from `os.wait4`, the 1-minute load average before and after) or in this process through the
  same click command (`sclatent.cli.main`, no start-up cost; wall time only). Every timing carries the load
  average, because other work shares this machine.
- `Budget` is the wall-clock budget of one harness run; stages ask it how much time is left.
- `DatasetSpec` / `make_dataset_inputs` write the samplesheets PREPARE reads (pbmc3k by cell_type; sc_mixology
  singlets by cell_line x protocol with one combination held out of training; a tiny synthetic set for tests).
- `markdown_table` and `fmt` render the tables of BENCHMARKS.md.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
PBMC_FILE = "pbmc3k_counts_celltype.h5ad"
MIXOLOGY_FILE = "sc_mixology_celllines_counts.h5ad"


class BenchError(RuntimeError):
    """A benchmark step failed; the message names the step and where its log is."""


# --------------------------------------------------------------------------------------------------------
# measured steps
# --------------------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """One timed step: what ran, how long, how much memory, under which load."""

    step: str  # e.g. "TRAIN_VAE"
    dataset: str
    wall_s: float
    peak_rss_mb: float | None  # None for steps run in this process
    load_before: float  # 1-minute load average when the step started
    load_after: float
    command: str
    child: bool  # True: measured child process; False: in this process
    extra: dict[str, Any] = field(default_factory=dict)  # throughput, NFE, epochs, ...

    def load_text(self) -> str:
        """The load average during the step, 'before→after'."""
        return f"{self.load_before:.1f}→{self.load_after:.1f}"


def load_average() -> float:
    """The 1-minute load average of the machine."""
    return os.getloadavg()[0]


# A minimal launcher between this process and each measured child. Linux charges a process's pre-exec memory
# high-water mark to its ru_maxrss, and a child forked (or vforked) from this harness, which holds torch and
# the data, would report the harness's own peak: measured here, a child that used 14 MB reported 808 MB when
# its parent held 800 MB. The launcher is a fresh small interpreter; it forks the real command and writes that
# grandchild's ru_maxrss (KiB) to a file.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    fh.write(str(usage.ru_maxrss))
with open(sys.argv[1] + ".cpu", "w") as fh:
    fh.write(str(usage.ru_utime + usage.ru_stime))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def child_cpu_seconds(log_path: Path) -> float:
    """User + system CPU seconds of the last command `run_child` ran with this log (NaN if unknown)."""
    path = Path(str(log_path.with_suffix(".maxrss")) + ".cpu")
    return float(path.read_text()) if path.exists() else float("nan")


def run_child(
    cmd: Sequence[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float | None = None,
) -> tuple[float, float, int]:
    """Run `cmd` as a child process, output to `log_path`; returns (wall seconds, peak RSS in MB, exit code).

    Peak RSS is the ru_maxrss that `os.wait4` reports for the command (its largest resident set, and that of
    every descendant it waited for), measured through `_LAUNCHER` so that this process's memory does not leak
    into it. A `timeout_s` kills the command's whole process group and returns exit code -9.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log_path.with_suffix(".maxrss")
    rss_file.unlink(missing_ok=True)
    with open(log_path, "w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(rss_file), *cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            code = -9
        wall = time.perf_counter() - start
    rss_mb = int(rss_file.read_text()) / 1024.0 if rss_file.exists() else float("nan")
    return wall, rss_mb, code


SCLATENT = [sys.executable, "-m", "sclatent.cli"]


def run_logged(args: Sequence[Any], log: Path) -> float:
    """Run one `sclatent` step with its output appended to `log`; returns its wall time. Raises on failure."""
    start = time.perf_counter()
    with open(log, "a") as fh:
        proc = subprocess.run([*SCLATENT, *map(str, args)], stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"sclatent {args[0]} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def child_env(threads: int) -> dict[str, str]:
    """Environment of every child: the chosen thread count for OpenMP/MKL/torch, no progress bars."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TQDM_DISABLE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Runner:
    """Runs `sclatent` commands, measured in a child process or cheaply in this process; keeps the records."""

    def __init__(self, logdir: Path, threads: int, children: bool = True) -> None:
        """children=False runs every step in this process (the tests' smoke path: no start-up cost, no RSS)."""
        self.logdir = logdir
        self.threads = threads
        self.children = children
        self.records: list[StepRecord] = []
        self._n = 0

    def sclatent(self, step: str, dataset: str, args: Sequence[str], *, child: bool, **extra: Any) -> StepRecord:
        """Run `sclatent <args>`; `child=True` measures it in a fresh process (wall, peak RSS)."""
        args = [str(a) for a in args]
        child = child and self.children
        command = "sclatent " + " ".join(shlex.quote(a) for a in args)
        self._n += 1
        log_path = self.logdir / f"{self._n:03d}_{dataset}_{step.lower()}.log"
        before = load_average()
        if child:
            cmd = [sys.executable, "-m", "sclatent", "-q", *args]
            wall, rss, code = run_child(cmd, log_path=log_path, env=child_env(self.threads))
            if code != 0:
                tail = log_path.read_text()[-1500:]
                raise BenchError(f"{step} on {dataset} failed (exit {code}); log {log_path}:\n{tail}")
        else:
            wall, rss = self._in_process(step, dataset, args, log_path), None
        rec = StepRecord(step, dataset, wall, rss, before, load_average(), command, child, dict(extra))
        self.records.append(rec)
        log.info(
            "%-12s %-12s %7.1fs %s load %s",
            step,
            dataset,
            wall,
            "" if rss is None else f"{rss:6.0f} MB",
            rec.load_text(),
        )
        return rec

    def _in_process(self, step: str, dataset: str, args: list[str], log_path: Path) -> float:
        from sclatent.cli import main

        start = time.perf_counter()
        try:
            main.main(args=["-q", *args], prog_name="sclatent", standalone_mode=False)
        except SystemExit as exc:  # the CLI turns input errors into exit status 2
            if exc.code:
                raise BenchError(f"{step} on {dataset}: sclatent {' '.join(args)} exited with {exc.code}") from None
        wall = time.perf_counter() - start
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"in process: sclatent {' '.join(args)}\n{wall:.3f} s\n")
        return wall

    def add(self, rec: StepRecord) -> StepRecord:
        """Keep a record measured elsewhere (e.g. the scVI child process)."""
        self.records.append(rec)
        return rec


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """Rows of a training run's history.csv as floats."""
    with open(run_dir / "history.csv") as fh:
        return [
            {k: float(v) if v not in ("", "nan") else float("nan") for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]


def training_summary(run_dir: Path, steady: bool = False) -> dict[str, float]:
    """Steps, training-loop seconds and throughput of a finished run, from its history.csv.

    Throughput = items (cells or latent samples) processed / seconds, where each history row contributes
    cells_per_s x the seconds of its window, so the first window (warm-up) counts with its true weight.
    With `steady`, the first window is left out of the throughput when there are later ones: a calibration
    run wants the rate a long run settles at, and its first steps carry one-off costs (allocator, first
    batches) that a few-step run would otherwise spread over the whole budget.
    """
    rows = read_history(run_dir)
    items, previous, start = 0.0, 0.0, 0.0
    for i, row in enumerate(rows):
        if steady and i == 0 and len(rows) > 1:
            previous = start = row["elapsed_s"]
            continue
        items += row["cells_per_s"] * (row["elapsed_s"] - previous)
        previous = row["elapsed_s"]
    last = rows[-1]
    secs = float(last["elapsed_s"])
    span = secs - start
    return {
        "steps": int(last["step"]),
        "train_s": secs,
        "items_per_s": items / span if span > 0 else float("nan"),
        "final_loss": float(last["loss"]),
    }


# --------------------------------------------------------------------------------------------------------
# budget and machine
# --------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything one harness run (--quick, --full or the test's --smoke) decides."""

    mode: str
    budget_s: float
    datasets: list[str]
    threads: int
    seed: int = 0
    # quality: model sizes and training budgets (seconds of training loop, turned into epochs by a calibration)
    vae_preset: str = "default"
    # TRAIN_VAE's CPU settings (-profile cpu): these benchmarks run on CPUs
    vae_batch_size: int = 64
    vae_decode_genes: int = 256
    prior_preset: str = "tiny"
    vae_seconds: float = 240.0
    prior_seconds: float = 120.0
    vae_epochs_range: tuple[float, float] = (1.0, 200.0)
    prior_epochs_range: tuple[float, float] = (1.0, 500.0)
    calibration_steps: int = 30  # three history windows of 10 steps; the first is left out (steady rate)
    replicates: int = 2
    uncond_replicates: int = 1
    scvi: bool = True
    # sampler study (issue 4)
    sampler_cells: int = 200
    sampler_grid: list[tuple[str, int]] = field(
        default_factory=lambda: [
            ("euler", 4),
            ("euler", 8),
            ("euler", 16),
            ("euler", 32),
            ("heun", 2),
            ("heun", 4),
            ("heun", 8),
            ("heun", 16),
        ]
    )
    # speed
    speed_steps: int = 30  # TRAIN_VAE steps of the preset throughput runs
    threads_comparison: bool = True
    default_size_sample_cells: int = 128  # SAMPLE at the default DiT size (speed only)
    tokenize_cells: list[int] = field(default_factory=lambda: [20_000, 100_000])
    tokenize_genes: int = 20_000
    tokenize_nnz: int = 1_000
    # the streamed steps at growing N (bench_scale.py; `make bench-scale` runs the full sizes); [] = not run
    scale_cells: list[int] = field(default_factory=list)
    scale_genes: int = 5_000
    scale_steps: str = "PREPARE,TOKENIZE,GATHER"
    scaling_genes: list[int] = field(default_factory=lambda: [1_000, 2_000, 5_000, 10_000, 20_000])
    scaling_tokens: list[int] = field(default_factory=lambda: [128, 256, 512, 1_024, 2_048])
    scaling_steps: int = 3
    scaling_batch: int = 64
    scaling_fixed_tokens: int = 256  # tokens per cell of the gene scaling
    scaling_fixed_genes: int = 5_000  # genes of the token scaling
    scaling_preset: str = "default"
    scaling_decode_genes: int = 512
    nextflow: str = "run"  # "run" (the test profile for real), "stub" (-stub-run: wiring only), "skip"
    children: bool = True  # measured child processes (False: everything in this process, no peak RSS)
    children_datasets: int = 99  # the pipeline steps of the first N datasets run as measured children
    nextflow_timeout_s: float = 900.0


class Budget:
    """The wall-clock budget of a harness run."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds left (may be negative)."""
        return self.total_s - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        """Whether a stage expected to take `estimate_s` still fits."""
        return estimate_s <= self.left()


def choose_threads(requested: int) -> int:
    """Torch/OpenMP threads for every step: `requested` if > 0, else 1 on a machine already busier than its
    cores (measured here: 2 spinning OpenMP threads on 2 cores shared with other work ran scVI 15x and the
    default VAE 2.6x slower than 1 thread), else all cores."""
    cores = os.cpu_count() or 1
    if requested > 0:
        return requested
    return 1 if load_average() >= cores - 0.5 else cores


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, accelerator, library versions, git commit, date (UTC)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    import torch

    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_at_start": round(load_average(), 2),
    }
    try:
        import scvi  # noqa: F401

        info["scvi_tools"] = scvi.__version__
    except ImportError:
        info["scvi_tools"] = None
    import sclatent

    info["sclatent"] = sclatent.__version__
    info.update(git_state())
    return info


def git_state() -> dict[str, Any]:
    """Commit and whether the tree has uncommitted changes (read-only: no index refresh)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit or "unknown", "git_dirty": dirty}


# --------------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------------


@dataclass
class DatasetSpec:
    """One benchmark dataset as PREPARE sees it."""

    name: str
    keys: list[str]
    samplesheet: Path
    n_hvg: int
    holdout: str = ""  # PREPARE --holdout: combinations kept out of training ('k=v,k2=v2;...')
    note: str = ""


def _write_sheet(path: Path, dataset: str, rows: Sequence[tuple[Path, str]]) -> Path:
    lines = ["dataset,h5ad,split"] + [f"{dataset},{p},{split}" for p, split in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_dataset_inputs(which: str, workdir: Path, shared: Path = SHARED_DATASETS) -> DatasetSpec:
    """Write the inputs of dataset `which` under workdir/inputs: "pbmc3k", "sc_mixology" (one cell line x protocol
    combination held out), "compositional" (the seeded synthetic truth of cell types x perturbations, three pairs
    held out) or "synthetic" (tiny, for tests)."""
    out = workdir / "inputs"
    out.mkdir(parents=True, exist_ok=True)
    if which == "pbmc3k":
        src = shared / PBMC_FILE
        if not src.exists():
            raise FileNotFoundError(src)
        sheet = _write_sheet(out / "pbmc3k.csv", "pbmc3k", [(src, "all")])
        return DatasetSpec("pbmc3k", ["cell_type"], sheet, 2000, note="2,700 PBMCs, 8 cell types")
    if which == "sc_mixology":
        import anndata as ad

        src = shared / MIXOLOGY_FILE
        if not src.exists():
            raise FileNotFoundError(src)
        adata = ad.read_h5ad(src)
        adata = adata[adata.obs["demuxlet_call"].astype(str).to_numpy() == "SNG"].copy()
        adata.obs = adata.obs[["cell_line", "protocol"]].astype(str).astype("category")
        adata.write_h5ad(out / "sc_mixology_singlets.h5ad")
        sheet = _write_sheet(out / "sc_mixology.csv", "sc_mixology", [(out / "sc_mixology_singlets.h5ad", "all")])
        held = "cell_line=HCC827,protocol=Drop-seq"
        n_held = int(((adata.obs["cell_line"] == "HCC827") & (adata.obs["protocol"] == "Drop-seq")).sum())
        return DatasetSpec(
            "sc_mixology",
            ["cell_line", "protocol"],
            sheet,
            2000,
            holdout=held,
            note=f"{adata.n_obs} singlets (demuxlet SNG); HCC827 x Drop-seq ({n_held} cells) held out of training",
        )
    if which == "compositional":
        from sclatent.synthetic import CompositionalTruth

        truth = CompositionalTruth(n_types=4, n_perturbations=4, n_genes=400, seed=0)
        truth.sample(None, COMPOSITIONAL_CELLS_PER_PAIR, seed=1).write_h5ad(out / "compositional.h5ad")
        sheet = _write_sheet(out / "compositional.csv", "compositional", [(out / "compositional.h5ad", "all")])
        held = ";".join(f"cell_type=type_{t},perturbation=pert_{p}" for t, p in COMPOSITIONAL_HELD_OUT)
        return DatasetSpec(
            "compositional",
            ["cell_type", "perturbation"],
            sheet,
            2000,
            holdout=held,
            note=(
                f"seeded synthetic truth (sclatent.synthetic.CompositionalTruth, seed 0): 4 cell types x 4 "
                f"perturbations (one a control), {COMPOSITIONAL_CELLS_PER_PAIR} cells each, 400 genes; shared and "
                f"type-specific responses; {len(COMPOSITIONAL_HELD_OUT)} pairs held out of training"
            ),
        )
    if which == "synthetic":
        from sclatent.synthetic import synthetic_counts

        adata = synthetic_counts(n_cells=240, n_genes=120, n_types=3, n_batches=2, seed=0, n_markers=8)
        adata.write_h5ad(out / "synthetic.h5ad")
        sheet = _write_sheet(out / "synthetic.csv", "synthetic", [(out / "synthetic.h5ad", "all")])
        return DatasetSpec(
            "synthetic",
            ["cell_type", "batch"],
            sheet,
            60,
            holdout="cell_type=type_0,batch=batch_1",
            note="seeded synthetic NB counts (tests only)",
        )
    raise ValueError(f"unknown benchmark dataset '{which}' (expected pbmc3k, sc_mixology, compositional or synthetic)")


COMPOSITIONAL_CELLS_PER_PAIR = 150
COMPOSITIONAL_HELD_OUT = [(0, 1), (1, 2), (2, 3)]  # (type, perturbation): every type and perturbation seen elsewhere


# --------------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------------


def fmt(value: Any, sem: Any = None, digits: int = 3) -> str:
    """A number with `digits` significant digits (and ± SEM); '—' for a missing value."""
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        text = f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
        if sem is not None and sem == sem:
            text += f" ± {sem:.2g}"
        return text
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (cells are str() of the values; '|' escaped)."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def dump_json(obj: Any, path: Path) -> None:
    """Write JSON (dataclasses become dicts), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(o: Any) -> Any:
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        if isinstance(o, Path):
            return str(o)
        return str(o)

    path.write_text(json.dumps(obj, indent=1, default=default))
