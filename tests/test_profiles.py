"""Where the users run: executor/GPU profiles, container files, Seqera Platform reports, -stub and -resume.

Every Nextflow assertion here comes from the real `nextflow` (made by `make nextflow`) evaluating the project's
own configuration:
- the directives probe (tests/fixtures/directives_probe) loads nextflow.config + the chosen profiles, forces
  only the executor back to `local`, and writes what a `process_gpu` and a `process_single` task really get
  (closures evaluated) to directives.json;
- (the whole DAG under -stub, and that every step publishes what it makes: tests/default.nf.test, nf-test);
- a `main.nf -profile test -stub` run killed after PREPARE is resumed with `-resume`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from nfhelpers import REPO, nextflow_bin, nextflow_cmd, run_nextflow

FIXTURES = REPO / "tests" / "fixtures"
PROBE = FIXTURES / "directives_probe"
CONTAINERS = REPO / "containers"

# name -> (profiles, params given with -params-file). Params are the ones a user sets on the command line.
PROBES: dict[str, tuple[str, dict]] = {
    "slurm_gpu": (
        "slurm,singularity,gpu",
        {"gpus": 2, "gpu_queue": "gpu-part", "queue": "cpu-part", "cluster_options": "--account=lab",
         "gpu_cluster_options": "--constraint=a100"},
    ),
    "slurm_gpu_defaults": ("slurm,apptainer,gpu", {"queue": "cpu-part"}),
    "slurm_no_gpu": ("slurm", {"queue": "cpu-part", "cluster_options": "--account=lab", "gpus": 2}),
    "awsbatch_gpu": ("awsbatch,gpu", {"awsqueue": "batch-q"}),
    "awsbatch_no_gpu": ("awsbatch", {"awsqueue": "batch-q", "gpus": 2}),
    "docker_gpu": ("docker,gpu", {"gpus": 2}),
}
# `nextflow config -flat` for the non-closure settings the profiles make
FLAT_CONFIGS = ("slurm,gpu", "awsbatch,gpu")


# Short runs spend most of their time compiling Groovy: the JIT's first tier alone makes them 2-3x faster.
FAST_JVM = {"NXF_OPTS": "-XX:+TieredCompilation -XX:TieredStopAtLevel=1"}


def _nxf_env() -> dict[str, str]:
    env = {**os.environ, "NXF_ANSI_LOG": "false", **FAST_JVM}
    env.setdefault("NXF_HOME", str(REPO / ".cache" / "nxf-home"))
    return env


def _run_probe(root: Path, name: str, profiles: str | None = None, params: dict | None = None) -> dict[str, dict]:
    """Run the directives probe under one profile set; return {'gpu': directives, 'cpu': directives}.

    A PROBES entry stands in for its cluster executor (force_local.config); with `profiles` and `params` given
    instead, the probe runs on the local executor as a user's run would.
    """
    local = profiles is not None
    if not local:
        profiles, params = PROBES[name]
    launch = root / name
    launch.mkdir(parents=True)
    (launch / "params.json").write_text(json.dumps(params))
    cmd = [
        nextflow_bin(), "run", str(PROBE / "main.nf"), "-ansi-log", "false", "-c", str(REPO / "nextflow.config"),
        *([] if local else ["-c", str(PROBE / "force_local.config")]),
        *(["-profile", profiles] if profiles else []), "-params-file", "params.json", "--outdir", str(launch / "out"),
    ]
    proc = subprocess.run(cmd, cwd=launch, capture_output=True, text=True, timeout=600, env=_nxf_env())
    assert proc.returncode == 0, f"probe {name} ({profiles}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = launch / "out" / "probe"
    return {kind: json.loads((out / f"probe_{kind}" / "directives.json").read_text()) for kind in ("gpu", "cpu")}


def _flat_config(root: Path, profiles: str) -> str:
    proc = nextflow_cmd(root, "config", str(REPO), "-profile", profiles, "-flat")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, dict]:
    """All probe runs and flat configs of this module, three Nextflow JVMs at a time."""
    root = tmp_path_factory.mktemp("profiles")
    with ThreadPoolExecutor(max_workers=3) as pool:
        probe_jobs = {name: pool.submit(_run_probe, root, name) for name in PROBES}
        flat_jobs = {p: pool.submit(_flat_config, root, p) for p in FLAT_CONFIGS}
        results = {name: job.result() for name, job in probe_jobs.items()}
        results["flat"] = {p: job.result() for p, job in flat_jobs.items()}
    return results


# ---------------------------------------------------------------------------------------------------------------
# GPU and executor directives, as Nextflow evaluates them for a real task
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_slurm_gpu_requests_gres_partition_and_gpu_options(probes):
    gpu, cpu = probes["slurm_gpu"]["gpu"], probes["slurm_gpu"]["cpu"]
    # the slurm executor ignores `accelerator`: the GPUs must be in the sbatch options
    assert gpu["clusterOptions"].split() == ["--account=lab", "--gres=gpu:2", "--constraint=a100"]
    assert gpu["queue"] == "gpu-part"
    assert gpu["accelerator"] == 2
    assert gpu["containerOptions"] == "--nv"
    assert (gpu["cpus"], gpu["memory"]) == (8, "64 GB")
    # CPU tasks: the CPU partition and the common options only
    assert cpu["clusterOptions"] == "--account=lab"
    assert cpu["queue"] == "cpu-part"
    assert cpu["accelerator"] is None and cpu["containerOptions"] is None


@pytest.mark.slow
def test_slurm_gpu_defaults_one_gpu_on_the_cpu_partition(probes):
    gpu, cpu = probes["slurm_gpu_defaults"]["gpu"], probes["slurm_gpu_defaults"]["cpu"]
    assert gpu["clusterOptions"] == "--gres=gpu:1"
    assert gpu["queue"] == "cpu-part"  # no --gpu_queue: GPU tasks stay on --queue
    assert gpu["accelerator"] == 1
    assert gpu["containerOptions"] == "--nv"
    assert cpu["clusterOptions"] is None and cpu["accelerator"] is None


@pytest.mark.slow
def test_slurm_without_gpu_profile_requests_no_gpu(probes):
    for kind in ("gpu", "cpu"):
        d = probes["slurm_no_gpu"][kind]
        assert d["clusterOptions"] == "--account=lab", d  # no --gres even though --gpus 2 was given
        assert d["accelerator"] is None and d["containerOptions"] is None, d
        assert d["queue"] == "cpu-part", d


@pytest.mark.slow
def test_awsbatch_gpu_sets_accelerator_and_queue(probes):
    gpu, cpu = probes["awsbatch_gpu"]["gpu"], probes["awsbatch_gpu"]["cpu"]
    # AWS Batch turns `accelerator` into a GPU resource requirement; sbatch options mean nothing there
    assert gpu["accelerator"] == 1
    assert gpu["queue"] == "batch-q"
    assert gpu["clusterOptions"] is None
    assert cpu["accelerator"] is None
    assert cpu["queue"] == "batch-q"
    assert cpu["clusterOptions"] is None


@pytest.mark.slow
def test_awsbatch_without_gpu_profile_requests_no_gpu(probes):
    for kind in ("gpu", "cpu"):
        d = probes["awsbatch_no_gpu"][kind]
        assert d["accelerator"] is None, d
        assert d["queue"] == "batch-q", d


@pytest.mark.slow
def test_container_engines_expose_the_gpus(probes):
    gpu, cpu = probes["docker_gpu"]["gpu"], probes["docker_gpu"]["cpu"]
    assert gpu["containerEngine"] == "docker"
    assert gpu["containerOptions"] == "--gpus all"
    assert gpu["accelerator"] == 2
    assert cpu["containerOptions"] is None and cpu["accelerator"] is None
    assert probes["slurm_gpu"]["gpu"]["containerEngine"] == "singularity"
    assert probes["slurm_gpu_defaults"]["gpu"]["containerEngine"] == "apptainer"


@pytest.mark.slow
def test_images_come_from_params_tagged_with_the_package_version(probes):
    from sclatent import __version__

    for name in PROBES:
        for kind in ("gpu", "cpu"):
            d = probes[name][kind]
            assert d["container_cpu"].endswith(f":{__version__}"), (name, d["container_cpu"])
            assert d["container_gpu"].endswith(f":{__version__}-cuda"), (name, d["container_gpu"])


@pytest.mark.slow
def test_flat_config_of_executor_profiles(probes):
    slurm = probes["flat"]["slurm,gpu"].splitlines()
    assert "process.executor = 'slurm'" in slurm
    assert "params.use_gpu = true" in slurm and "params.gpu_gres = true" in slurm
    assert "executor.$slurm.pollInterval = '30 sec'" in slurm
    aws = probes["flat"]["awsbatch,gpu"].splitlines()
    assert "process.executor = 'awsbatch'" in aws
    assert "params.use_gpu = true" in aws
    assert "aws.region = 'us-east-1'" in aws
    assert "params.gpu_gres = false" in aws


def _machine_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


@pytest.mark.slow
def test_local_executor_caps_requests_at_the_machine(tmp_path):
    """With no executor profile every request fits this machine (the GPU label asks 8 CPUs / 64 GB on clusters)."""
    units = {"GB": 1024**3, "MB": 1024**2, "TB": 1024**4}

    def nbytes(text: str) -> float:
        value, unit = text.split()
        return float(value) * units[unit]

    plain = _run_probe(tmp_path, "local", "", {})
    assert plain["gpu"]["cpus"] == min(8, os.cpu_count()) and plain["cpu"]["cpus"] == 1
    assert nbytes(plain["gpu"]["memory"]) <= min(64 * 1024**3, _machine_memory_bytes() * 1.01)
    lowered = _run_probe(tmp_path, "local_max", "", {"max_cpus": 1, "max_memory": "3.GB"})
    assert (lowered["gpu"]["cpus"], lowered["gpu"]["memory"]) == (1, "3 GB")


def test_profiles_set_no_process_selectors():
    """A withLabel/withName block inside a profile replaces the conf/base.config one (nextflow-io/nextflow#6798)."""
    for name in ("gpu", "slurm", "awsbatch"):
        text = (REPO / "conf" / f"{name}.config").read_text()
        code = re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)
        assert not re.search(r"\bwith(Label|Name)\b", code), f"conf/{name}.config declares a process selector"


# ---------------------------------------------------------------------------------------------------------------
# Container files: the versions they pin are the package's
# ---------------------------------------------------------------------------------------------------------------

def _pyproject() -> dict:
    with open(REPO / "python" / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def _pinned(name: str) -> str:
    """The version of `name` in python/constraints.txt (the versions the tests ran with)."""
    for line in (REPO / "python" / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(rf"{re.escape(name)}==([\w.]+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned in python/constraints.txt")


@pytest.mark.parametrize("recipe", ["Dockerfile", "Dockerfile.cuda", "sclatent.def"])
def test_container_recipes_pin_the_package_torch(recipe):
    text = (CONTAINERS / recipe).read_text()
    pins = re.findall(r"TORCH_VERSION=([\w.]+)", text)
    assert pins == [_pinned("torch")], (recipe, pins)
    # the package itself (and so every other pinned dependency) is installed from the checkout's python/
    assert "pip install --no-cache-dir /opt/sclatent/python -c /opt/sclatent/python/constraints.txt" in text, recipe
    assert "procps" in text, f"{recipe}: Nextflow's trace needs ps"


def test_cpu_recipes_use_a_supported_python_and_the_cpu_torch_index():
    minimum = re.fullmatch(r">=3\.(\d+)", _pyproject()["project"]["requires-python"])
    assert minimum
    for recipe in ("Dockerfile", "sclatent.def"):
        text = (CONTAINERS / recipe).read_text()
        base = re.search(r"(?:^FROM|^From:)\s*python:3\.(\d+)-slim", text, flags=re.M)
        assert base and int(base.group(1)) >= int(minimum.group(1)), recipe
        assert "--index-url https://download.pytorch.org/whl/cpu" in text, recipe
    cuda = (CONTAINERS / "Dockerfile.cuda").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-runtime-", cuda, flags=re.M)
    assert "whl/cpu" not in cuda


def test_package_wheel_ships_every_runtime_file(tmp_path):
    """The images install python/ as a wheel, not editable: every non-Python file of the package must be in it."""
    src = tmp_path / "python"
    shutil.copytree(REPO / "python", src, ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info", "build", ".pytest_cache", "tests", "benchmarks"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("sclatent-*.whl"))) as whl:
        shipped = set(whl.namelist())
    package = REPO / "python" / "src"
    needed = {
        p.relative_to(package).as_posix()
        for p in (package / "sclatent").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    assert needed - shipped == set(), f"missing from the wheel (add them to [tool.setuptools.package-data]): {sorted(needed - shipped)}"


def test_conda_environment_installs_the_package_from_conda_forge_python():
    env = yaml.safe_load((CONTAINERS / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    minimum = _pyproject()["project"]["requires-python"].removeprefix(">=")
    assert f"python={minimum}" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # relative to the yml: conda runs pip in the folder that holds it
    assert pip == ["-c ../python/constraints.txt", "-e ../python"] and (CONTAINERS / "../python/pyproject.toml").exists()
    # every module points at this one file
    for module in sorted((REPO / "modules" / "local").glob("*/main.nf")):
        assert 'conda "${moduleDir}/../../../containers/environment.yml"' in module.read_text(), module


# ---------------------------------------------------------------------------------------------------------------
# Seqera Platform reports (tower.yml)
# ---------------------------------------------------------------------------------------------------------------

TOWER_REQUIRED = (
    "**/report/report.html",
    "**/evaluate/metrics_mqc.tsv",
    "**/prepare/prepare.json",
    "**/pipeline_info/execution_report_*.html",
    "**/pipeline_info/execution_timeline_*.html",
)


def test_tower_yml_lists_the_reports():
    reports = yaml.safe_load((REPO / "tower.yml").read_text())["reports"]
    for pattern in TOWER_REQUIRED:
        assert pattern in reports, pattern
    for pattern, entry in reports.items():
        assert entry.get("display"), pattern


# ---------------------------------------------------------------------------------------------------------------
# -resume after a run killed in the middle
# ---------------------------------------------------------------------------------------------------------------

def _read_trace(path: Path) -> list[dict[str, str]]:
    """Rows of a trace file that may still be being written (a partial last line is left out)."""
    text = path.read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    if not lines:
        return []
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"))) for ln in lines[1:]]


def _end_leftover_tasks(launch: Path) -> None:
    """End processes still running in launch/work after Nextflow was killed (the test's own task processes)."""
    work = str(launch / "work")
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc_dir / "cwd").startswith(work):
                os.kill(int(proc_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue  # gone already, or not ours to read


def _step(row: dict[str, str]) -> str:
    return row["process"].split(":")[-1]


@pytest.mark.slow
def test_resume_after_kill_reuses_the_finished_steps(tmp_path):
    launch, outdir = tmp_path / "launch", tmp_path / "results"
    launch.mkdir()
    # -stub: the caching under test is Nextflow's (task hashes of the same inputs), the same for stubs; the one
    # real -profile test run of CI is tests/test_pipeline.py's
    args = ["-profile", "test", "-stub", "--input", str(FIXTURES / "samplesheet_one_dataset.csv")]
    cmd = [nextflow_bin(), "run", str(REPO / "main.nf"), "-ansi-log", "false", "--outdir", str(outdir), *args]
    # first run: TOKENIZE is held (fixtures/hold_tokenize.config) so the kill lands in the middle of the run
    with open(tmp_path / "first_run.log", "w") as log:
        proc = subprocess.Popen(cmd + ["-c", str(FIXTURES / "hold_tokenize.config")], cwd=launch, env=_nxf_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900
            first: list[dict[str, str]] = []
            while time.monotonic() < deadline and proc.poll() is None:
                traces = sorted((outdir / "pipeline_info").glob("execution_trace_*.txt"))
                first = _read_trace(traces[-1]) if traces else []
                if any(_step(r) == "PREPARE" and r["status"] == "COMPLETED" for r in first):
                    break
                time.sleep(1)
            assert proc.poll() is None, "the first run ended before PREPARE completed:\n" + (tmp_path / "first_run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "PREPARE did not complete within 15 min"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            _end_leftover_tasks(launch)
    assert proc.returncode != 0, "the killed run reported success"
    trace_files = sorted((outdir / "pipeline_info").glob("execution_trace_*.txt"))
    first = _read_trace(trace_files[-1])
    done_first = {r["name"] for r in first if r["status"] == "COMPLETED"}
    assert {_step(r) for r in first if r["status"] == "COMPLETED"} == {"CHECK_SAMPLESHEET", "PREPARE"}, first
    assert not (outdir / "mixology" / "tokenize").exists()

    # second run, same launch directory, -resume: finished steps come from the cache, the rest run
    second_run = run_nextflow(launch, *args, "-resume", outdir=outdir, env=FAST_JVM)
    assert second_run.returncode == 0, second_run.output[-5000:]
    new_traces = sorted(set((outdir / "pipeline_info").glob("execution_trace_*.txt")) - set(trace_files))
    assert len(new_traces) == 1, new_traces
    second = _read_trace(new_traces[0])
    cached = {r["name"] for r in second if r["status"] == "CACHED"}
    completed = {r["name"] for r in second if r["status"] == "COMPLETED"}
    assert cached == done_first, (cached, done_first)
    assert len(cached) + len(completed) == len(second), [(r["name"], r["status"]) for r in second]
    assert "TOKENIZE" in {_step(r) for r in second if r["status"] == "COMPLETED"}
    assert (outdir / "mixology" / "tokenize" / "tokens" / "manifest.json").is_file()
    assert (outdir / "mixology" / "prepare" / "prepare.json").is_file()
