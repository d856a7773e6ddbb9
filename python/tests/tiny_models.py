"""The CLI chain that trains a tiny VAE and DiT on the bundled sc_mixology subset, shared by the SAMPLE and TRANSFER
tests (each trains its own, for its own number of steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import CliRunner

from sclatent.cli import main

REPO = Path(__file__).resolve().parents[2]
MIXOLOGY = REPO / "assets" / "test_data" / "mixology.h5ad"


def run_cli(*args: Any):
    """`sclatent -q <args>` in process; returns click's Result."""
    return CliRunner().invoke(main, ["-q", *map(str, args)])


def cli_ok(*args: Any) -> None:
    result = run_cli(*args)
    assert result.exit_code == 0, (args[0], result.output, result.exception)


def train_tiny_mixology(d: Path, *, vae_steps: int, prior_steps: int) -> dict[str, Path]:
    """PREPARE (half the cells in test), TOKENIZE, TRAIN_VAE, ENCODE, TRAIN_PRIOR and BUNDLE into folder `d`."""
    sheet = d / "s.csv"
    sheet.write_text(f"dataset,h5ad,split,batch,condition_keys\nmix,{MIXOLOGY},all,,cell_line;protocol\n")
    common = ("--no-progress", "--device", "cpu", "--threads", 1)
    cli_ok("prepare", "--samplesheet", sheet, "--outdir", d / "p", "--n-hvg", 300, "--min-cells", 3,
           "--test-fraction", 0.5)  # fmt: skip
    cli_ok("tokenize", "--train", d / "p/train.h5ad", "--outdir", d / "tok", "--max-tokens", 512, "--no-progress")
    vae = ("--preset", "tiny", "--batch-size", 32, "--decode-genes", 128, "--max-steps", vae_steps)
    cli_ok("train-vae", "--tokens", d / "tok", "--outdir", d / "vae", *vae, *common)
    cli_ok("encode", "--model", d / "vae", "--tokens", d / "tok", "--outdir", d / "enc", "--device", "cpu",
           "--threads", 1)  # fmt: skip
    prior = ("--preset", "tiny", "--batch-size", 64, "--max-steps", prior_steps)
    cli_ok("train-prior", "--latents", d / "enc/latents.npz", "--outdir", d / "prior", *prior, *common)
    cli_ok("bundle", "--vae", d / "vae", "--prior", d / "prior", "--out", d / "model" / "model.pt")
    return {"model": d / "model" / "model.pt", "vae": d / "vae", "prior": d / "prior", "test": d / "p/test.h5ad",
            "dir": d}  # fmt: skip
