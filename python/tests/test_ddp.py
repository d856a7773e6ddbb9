"""Training with several processes (DDP, gloo on CPU) gives the run of one process: same losses, same models.

Two processes are started once per module (torch.multiprocessing, gloo) and train a tiny variational VAE on
token shards (stopped and resumed half-way) and a tiny DiT prior on synthetic latents; the same runs in this process are
the reference. Global batches that do not split evenly (7 cells on 2 ranks) and a 1-cell batch (one rank
idle) are part of both runs. The `train-prior` command launched by torchrun, as the module does, is checked too.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner

from sclatent.checkpoint import load_checkpoint, load_run
from sclatent.cli import main
from sclatent.distributed import GlobalBatchDraws, distributed_job, shard_rows
from sclatent.synthetic import synthetic_counts
from sclatent.tokens import TokenLoader, tokenize
from sclatent.train import TrainConfig, default_split_batch
from sclatent.train_prior import LatentBatches, PriorTraining, train_prior
from sclatent.train_vae import VAETraining, train_vae

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
# DDP sums the ranks' gradients in a different order than one process does: agreement to float32 rounding
# (measured: losses and gradient norms within 3e-7 relative, decoded means 1e-6, velocities 1e-7 absolute)
LOSS_RTOL = 2e-6
OUTPUT_RTOL = 1e-5  # decoded NB means (counts of order 1-40)
OUTPUT_ATOL = 1e-6  # DiT velocities (order 0.1-1)


def _train_config(batch_size: int, **kw) -> TrainConfig:
    # constant learning rate (no warmup, no decay), so that a run stopped at step 3 and resumed with
    # max_steps=6 is the same run as an uninterrupted one of 6 steps
    base = dict(
        max_steps=1,
        batch_size=batch_size,
        lr=3e-3,
        warmup_frac=0.0,
        decay_frac=0.0,
        log_every=1,
        checkpoint_every=3,
        seed=7,
        device="cpu",
        precision="fp32",
    )  # bf16 rounding would depend on how the batch is split across processes
    return TrainConfig(**{**base, **kw})


def _vae_run(max_steps: int) -> VAETraining:
    # variational: the posterior noise is drawn inside the model, per cell; so are the stratified gene sample and the
    # count readout's dropout
    return VAETraining(preset="tiny", model_overrides={"beta": 0.1}, max_steps=max_steps, decode_genes=16)


def _prior_run() -> PriorTraining:
    return PriorTraining(preset="tiny", max_steps=6, rho=0.3)


def _run_all(out: Path, tokens: Path, latents: Path) -> None:
    """The runs compared: VAE 3 steps, resumed to 6; prior 6 steps with EMA."""
    train_vae(tokens, out / "vae", _vae_run(3), _train_config(7), progress=False)
    train_vae(tokens, out / "vae", _vae_run(6), _train_config(7), resume=True, progress=False)
    train_prior(latents, out / "prior", _prior_run(), _train_config(5, ema_decay=0.9), progress=False)


def _worker(rank: int, port: int, out: str, tokens: str, latents: str) -> None:
    """One DDP rank (started by torch.multiprocessing); the process group is this function's, not train()'s."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        assert distributed_job() is not None
        _run_all(Path(out), Path(tokens), Path(latents))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_latents(folder: Path) -> Path:
    """A synthetic ENCODE output: 11 cells (batches of 5, 5, 1), 4 latent tokens of width 4, two labels."""
    rng = np.random.default_rng(3)
    path = folder / "latents.npz"
    np.savez(
        path,
        train_z=rng.normal(size=(11, 4, 4)).astype(np.float32),
        train_labels=np.stack([rng.integers(0, 3, 11), rng.integers(0, 2, 11)], axis=1).astype(np.int64),
    )
    sidecar = {
        "condition_keys": ["cell_type", "batch"],
        "labels": {"cell_type": ["a", "b", "c"], "batch": ["x", "y"]},
        "library_size": {},
        "genes": ["g1"],
        "vocabulary_digest": "synthetic",
        "vae": "synthetic",
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """Token shards (23 train cells, 40 genes) and synthetic latents."""
    folder = tmp_path_factory.mktemp("ddp_inputs")
    synthetic_counts(n_cells=23, n_genes=40, n_types=3, seed=5, mean_library=300).write_h5ad(folder / "train.h5ad")
    tokenize(
        folder / "train.h5ad",
        folder / "tokens",
        genes="all",
        condition_keys=["cell_type"],
        shard_size=23,
        max_tokens=24,
        progress=False,
    )
    return folder / "tokens", _write_latents(folder)


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> tuple[Path, Path]:
    """(one-process runs, two-process runs) of the same configurations."""
    tokens, latents = inputs
    single = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each rank; two OpenMP threads crawl on a loaded 2-core machine
    try:
        _run_all(single, tokens, latents)
    finally:
        torch.set_num_threads(threads)
    multi = tmp_path_factory.mktemp("ddp")
    # fork (as DataLoader workers do; each rank runs on one thread): the ranks start with the modules this
    # process has imported, instead of spending ~10 s each importing them again
    mp.start_processes(
        _worker, args=(_free_port(), str(multi), str(tokens), str(latents)), nprocs=WORLD, start_method="fork"
    )
    return single, multi


def _history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _assert_same_run(one: Path, many: Path, terms: tuple[str, ...]) -> None:
    """Same loss curve, same random draws, and the files of one process written by rank 0 alone."""
    h1, hn = _history(one / "history.csv"), _history(many / "history.csv")
    assert [r["step"] for r in hn] == [r["step"] for r in h1] == [1, 2, 3, 4, 5, 6]
    for name in ("loss", *terms, "grad_norm", "lr"):
        np.testing.assert_allclose([r[name] for r in hn], [r[name] for r in h1], rtol=LOSS_RTOL, err_msg=name)
    c1, cn = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(many / "checkpoint.pt")
    assert (cn["step"], cn["epoch"], cn["batch_in_epoch"]) == (c1["step"], c1["epoch"], c1["batch_in_epoch"])
    assert torch.equal(cn["generator"], c1["generator"])  # the ranks drew exactly the single-process numbers
    assert sorted(p.name for p in many.iterdir()) == ["checkpoint.pt", "config.json", "history.csv"]
    assert json.loads((many / "config.json").read_text())["world_size"] == WORLD


# The trained weights are compared through the functions they compute: parameters along directions that
# leave the loss unchanged (a bias added to every attention key, a shift of every softmax logit) have a zero
# gradient up to rounding, and Adam turns that rounding into steps of up to lr, differently in each run.


@torch.no_grad()
def test_vae_two_processes_match_one_process(runs, inputs) -> None:
    """VAE: per-cell gene subsets and posterior noise, uneven batches (7 -> 4 + 3), resumed at step 3."""
    single, multi = runs
    _assert_same_run(single / "vae", multi / "vae", ("nll", "kl"))
    batch = next(iter(TokenLoader(inputs[0], "train", batch_size=23, shuffle=False))).to_torch("cpu")
    genes = torch.arange(1, 41)  # (G,)
    means = [
        load_run(run, "vae", weights="model")[0]
        .reconstruct(batch["genes"], batch["counts"], batch["mask"], genes, batch["library_size"])
        .mean  # (23, G)
        for run in (single / "vae", multi / "vae")
    ]
    torch.testing.assert_close(means[1], means[0], rtol=OUTPUT_RTOL, atol=0)


@torch.no_grad()
def test_prior_two_processes_match_one_process(runs) -> None:
    """Prior: flow time, noise and label dropout; a 1-cell batch leaves one rank idle; EMA."""
    single, multi = runs
    _assert_same_run(single / "prior", multi / "prior", ())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 4, 4, generator=g), torch.rand(6, generator=g)  # (B, m, dl), (B,)
    labels = torch.tensor([[0, 0], [1, 1], [2, 0], [3, 2], [0, 2], [3, 1]])  # (B, K), 3 and 2 are the null codes
    for which in ("model", "ema"):
        velocities = [
            load_run(run, "prior", weights=which)[0](x, t, labels) for run in (single / "prior", multi / "prior")
        ]
        torch.testing.assert_close(velocities[1], velocities[0], rtol=0, atol=OUTPUT_ATOL, msg=which)


def test_checkpoint_of_two_processes_resumes_in_one(runs, inputs, tmp_path) -> None:
    """A checkpoint does not depend on the number of processes: one process continues a two-process run."""
    single, multi = runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, run in (("one", single), ("two", multi)):
            shutil.copytree(run / "vae", tmp_path / name)
            train_vae(inputs[0], tmp_path / name, _vae_run(8), _train_config(7), resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    h1, h2 = _history(tmp_path / "one" / "history.csv"), _history(tmp_path / "two" / "history.csv")
    assert [r["step"] for r in h2] == [r["step"] for r in h1] == list(range(1, 9))
    np.testing.assert_allclose([r["loss"] for r in h2], [r["loss"] for r in h1], rtol=LOSS_RTOL)


@pytest.mark.slow  # a torchrun job of 2 freshly started processes: ~15-25 s on a loaded 2-core machine
def test_torchrun_command_line(inputs, tmp_path) -> None:
    """`torchrun --nproc_per_node 2 --no-python sclatent train-prior` trains the run of the plain command."""
    _, latents = inputs
    args = [
        "train-prior",
        "--latents",
        str(latents),
        "--preset",
        "tiny",
        "--max-steps",
        "4",
        "--batch-size",
        "5",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
        "--seed",
        "3",
        "--precision",
        "fp32",
    ]
    threads = torch.get_num_threads()
    try:  # the plain command in this process (a subprocess would only add start-up time)
        plain = CliRunner().invoke(main, [*args, "--outdir", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    assert plain.exit_code == 0, plain.output
    # launched as the TRAIN_PRIOR module does with 2 GPUs: every rank runs the bin/sclatent shim
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCLATENT_PYTHON": sys.executable}
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(WORLD),
            "--no-python",
            str(REPO / "bin" / "sclatent"),
            *args,
            "--outdir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    h1, h2 = _history(tmp_path / "one" / "history.csv"), _history(tmp_path / "two" / "history.csv")
    assert [r["step"] for r in h2] == [r["step"] for r in h1] == [4]
    np.testing.assert_allclose(h2[0]["loss"], h1[0]["loss"], rtol=LOSS_RTOL)
    c1, c2 = load_checkpoint(tmp_path / "one" / "checkpoint.pt"), load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert torch.equal(c2["generator"], c1["generator"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 4, 4, generator=g), torch.rand(5, generator=g)  # (B, m, dl), (B,)
    labels = torch.tensor([[0, 0], [1, 1], [2, 0], [3, 2], [0, 2]])  # (B, K)
    with torch.no_grad():
        velocities = [load_run(tmp_path / run, "prior")[0](x, t, labels) for run in ("one", "two")]
    torch.testing.assert_close(velocities[1], velocities[0], rtol=0, atol=OUTPUT_ATOL)


# --------------------------------------------------------------------------------------------------------
# the pieces, in this process


def test_shard_rows_tile_the_batch() -> None:
    for n in range(8):
        for world in (1, 2, 3, 4):
            shares = [shard_rows(n, r, world) for r in range(world)]
            assert [i for s in shares for i in range(s.start, s.stop)] == list(range(n))
            sizes = [s.stop - s.start for s in shares]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_rows(4, 2, 2)


def test_global_batch_draws_are_the_rows_of_one_process_draws() -> None:
    def draws(g: torch.Generator, rows: int) -> list[torch.Tensor]:
        return [
            torch.rand((rows, 5), generator=g),
            torch.randn(rows, 2, 3, generator=g),
            torch.randperm(9, generator=g),
            torch.rand(size=(5,), generator=g),
            torch.randn((rows,), generator=g),
        ]

    g = torch.Generator().manual_seed(11)
    whole = draws(g, 7)  # one process, global batch of 7 cells
    for rank in range(WORLD):
        rows = shard_rows(7, rank, WORLD)
        g_rank = torch.Generator().manual_seed(11)
        with GlobalBatchDraws(g_rank, 7, rows):
            mine = draws(g_rank, rows.stop - rows.start)
        for i in (0, 1, 4):  # per-cell draws: this rank's rows
            assert torch.equal(mine[i], whole[i][rows])
        for i in (2, 3):  # shared draws (first dimension not the rank's 3 or 4 cells): identical on every rank
            assert torch.equal(mine[i], whole[i])
        assert torch.equal(g_rank.get_state(), g.get_state())  # the generators stay in step
    g_rank = torch.Generator().manual_seed(11)
    with GlobalBatchDraws(g_rank, 7, slice(0, 4)), pytest.raises(RuntimeError, match="normal_"):
        torch.empty(4).normal_(generator=g_rank)
    with pytest.raises(ValueError, match="rows"):
        GlobalBatchDraws(g_rank, 3, slice(2, 5))


def test_each_rank_collates_its_share_of_the_batch(inputs) -> None:
    """The shares that 3 ranks collate put together are the batch one process collates (padded width, encoder
    subsets of the cells over max_tokens, decoder targets), epoch after epoch and from a resumed position."""
    tokens, latents = inputs
    loader = TokenLoader(tokens, "train", batch_size=7, seed=1)
    assert loader.max_tokens == 24 and loader.load_shard(0)["indptr"][-1] > 24 * 23  # cells get truncated
    for epoch, start in ((0, 0), (1, 2)):
        whole = list(loader.iter_epoch(epoch, start))
        shares = [list(loader.iter_shares(epoch, start, lambda n, r=r: shard_rows(n, r, 3))) for r in range(3)]
        assert [len(s) for s in shares] == [len(whole)] * 3
        for k, batch in enumerate(whole):
            parts = [s[k] for s in shares]
            assert all(n == len(batch) for n, _ in parts)
            parts = [p for _, p in parts]
            assert all(p.genes.shape[1] == batch.genes.shape[1] for p in parts)  # the batch's padded width
            for field in ("genes", "counts", "mask", "library_size", "labels", "cell_index"):
                np.testing.assert_array_equal(np.concatenate([getattr(p, field) for p in parts]), getattr(batch, field))
            np.testing.assert_array_equal(np.concatenate([p.dense_counts(40) for p in parts]), batch.dense_counts(40))
    prior = LatentBatches(np.arange(11 * 2, dtype=np.float32).reshape(11, 2, 1), np.zeros((11, 1)), 5, seed=2)
    for (n, (z, _)), whole_z in zip(prior.iter_shares(0, 0, lambda n: shard_rows(n, 1, 2)), prior.iter_epoch(0)):
        assert torch.equal(z, whole_z[0][shard_rows(n, 1, 2)])


def test_default_split_batch_and_job_from_environment(monkeypatch) -> None:
    z, labels = torch.arange(12.0).view(6, 2), torch.arange(6)
    part = default_split_batch((z, {"y": labels}), slice(2, 5))
    assert torch.equal(part[0], z[2:5]) and torch.equal(part[1]["y"], labels[2:5])
    with pytest.raises(TypeError, match="split_batch"):
        default_split_batch(object(), slice(0, 1))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed_job() is None  # one process: the plain path
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    job = distributed_job()
    assert job is not None and (job.rank, job.world_size, job.local_rank) == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK"):
        distributed_job()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="'two'"):
        distributed_job()
