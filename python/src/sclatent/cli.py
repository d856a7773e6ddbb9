"""The `sclatent` command line: one subcommand per pipeline step (argument parsing and progress only).

Logs go to stderr; results go to files. A problem with the user's input prints one line
`sclatent <step>: error: <message>` and exits with status 2, leaving no partial output.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .io import InputError

# Floors on the training length (--min-steps), so that a small dataset is not trained for a few hundred steps
# only because an epoch of it is a few batches; measured in BENCHMARKS.md ("Training length").
VAE_MIN_STEPS = 5000
PRIOR_MIN_STEPS = 2000
# TRAIN_VAE's batch when --batch-size is not given: the authors' 128 on a GPU; 64 on a CPU, where it learnt more
# per epoch on both benchmark datasets and both seeds for ~6% more time (BENCHMARKS.md, "VAE settings").
VAE_BATCH_SIZE_GPU = 128
VAE_BATCH_SIZE_CPU = 64
# Genes per cell in TRAIN_VAE's loss when --decode-genes is not given: 512 on a GPU; 256 on a CPU, where a step costs
# 1.18-1.33x less and, at equal or less wall time, was at least as good on every test metric on both benchmark
# datasets over two seeds (BENCHMARKS.md, "VAE settings": pbmc3k RE 664.1 -> 663.8, sc_mixology 2,083 -> 2,062).
VAE_DECODE_GENES_GPU = 512
VAE_DECODE_GENES_CPU = 256

log = logging.getLogger("sclatent")


def _setup_logging(verbose: int, quiet: bool) -> None:
    if quiet:
        import os

        os.environ["TQDM_DISABLE"] = "1"  # no progress bars either
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="[sclatent %(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def _user_errors(fn):
    """Turn InputError into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as exc:
            name = click.get_current_context().info_name
            click.echo(f"sclatent {name}: error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def _keys(value: str | None) -> list[str]:
    """Parse a comma list of obs columns ('' -> [])."""
    if value is None:
        return []
    return [k.strip() for k in value.split(",") if k.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="sclatent")
@click.option("-v", "--verbose", count=True, help="More logging.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """sclatent: scalable latent diffusion (scLDM) for single-cell gene expression."""
    _setup_logging(verbose, quiet)
    from .allocator import tune_malloc

    tune_malloc()  # reuse freed CPU tensor buffers between training steps (see allocator.py)


@main.command("version")
@click.argument("package", default="sclatent")
@_user_errors
def version_cmd(package: str) -> None:
    """Print the installed version of PACKAGE (default sclatent) of this Python, e.g. for a task's versions.yml."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        click.echo(version(package))
    except PackageNotFoundError:
        raise InputError(f"package '{package}' is not installed in {sys.executable}") from None


@main.command("check-samplesheet")
@click.argument("samplesheet", type=click.Path(dir_okay=False))
@click.option("--base-dir", default=None, help="Folder (or URI prefix) relative h5ad paths are resolved against [default: the samplesheet's folder].")
@click.option("--check-exists/--no-check-exists", default=True, help="Require local h5ad paths to exist.")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None, help="Write the normalised samplesheet here (absolute paths, split filled in).")
@_user_errors
def check_samplesheet(samplesheet: str, base_dir: str | None, check_exists: bool, out: str | None) -> None:
    """Validate SAMPLESHEET against assets/schema_input.json."""
    from .io import read_samplesheet, write_samplesheet

    rows = read_samplesheet(samplesheet, base_dir=base_dir, check_exists=check_exists)
    datasets = sorted({r.dataset for r in rows})
    log.info("samplesheet %s: %d rows, %d datasets (%s)", samplesheet, len(rows), len(datasets), ", ".join(datasets))
    if out:
        write_samplesheet(rows, out)


@main.command()
@click.option("--samplesheet", required=True, type=click.Path(dir_okay=False), help="Samplesheet CSV (dataset,h5ad[,split][,batch]).")
@click.option("--dataset", default=None, help="Which dataset of the samplesheet [default: the only one].")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Where train.h5ad, test.h5ad and prepare.json go.")
@click.option("--counts-layer", default="X", help="Where the raw counts are: X or a layer name.")
@click.option("--condition-keys", default="", help="Comma list of obs columns to condition on (may be empty).")
@click.option("--n-hvg", default=2000, type=int, help="Number of highly variable genes to flag (seurat_v3).")
@click.option("--test-fraction", default=0.2, type=float, help="Fraction of cells (of files with split=all) held out for testing.")
@click.option("--seed", default=0, type=int, help="Seed of the train/test split and the training-cell order.")
@click.option("--min-genes", default=0, type=int, help="QC: drop cells with fewer expressed genes.")
@click.option("--min-cells", default=0, type=int, help="QC: drop genes expressed in fewer cells.")
@click.option("--min-counts", default=0, type=int, help="QC: drop cells with fewer total counts.")
@click.option("--gene-join", type=click.Choice(["inner", "outer"]), default="inner", help="Combine files on shared genes (inner) or all genes (outer, zeros where absent).")
@_user_errors
def prepare(samplesheet, dataset, outdir, counts_layer, condition_keys, n_hvg, test_fraction, seed, min_genes, min_cells, min_counts, gene_join) -> None:
    """PREPARE: validate, combine, QC, split and flag HVGs for one dataset."""
    from .io import read_samplesheet
    from .prepare import PrepareConfig, prepare as run

    rows = read_samplesheet(samplesheet)
    names = sorted({r.dataset for r in rows})
    if dataset is None:
        if len(names) > 1:
            raise InputError(f"samplesheet {samplesheet} has {len(names)} datasets ({', '.join(names)}); choose one with --dataset")
        dataset = names[0]
    elif dataset not in names:
        raise InputError(f"samplesheet {samplesheet} has no dataset '{dataset}' (has: {', '.join(names)})")
    sheet_keys = next(r.condition_keys for r in rows if r.dataset == dataset)
    if sheet_keys is not None and _keys(condition_keys) and list(sheet_keys) != _keys(condition_keys):
        log.info("dataset '%s': samplesheet condition_keys %s override --condition-keys %s", dataset, list(sheet_keys), _keys(condition_keys))
    cfg = PrepareConfig(
        dataset=dataset,
        counts_layer=counts_layer,
        condition_keys=list(sheet_keys) if sheet_keys is not None else _keys(condition_keys),
        n_hvg=n_hvg,
        test_fraction=test_fraction,
        seed=seed,
        min_genes=min_genes,
        min_cells=min_cells,
        min_counts=min_counts,
        gene_join=gene_join,
    )
    run(rows, cfg, outdir)


@main.command()
@click.option("--train", "train", required=True, type=click.Path(dir_okay=False), help="train.h5ad from PREPARE.")
@click.option("--test", "test", default=None, type=click.Path(dir_okay=False), help="test.h5ad from PREPARE (tokenized with the same vocabulary).")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Output folder (shards + manifest.json).")
@click.option("--genes", type=click.Choice(["hvg", "all"]), default="hvg", help="Vocabulary: the HVGs flagged by PREPARE, or all genes.")
@click.option("--condition-keys", default=None, help="Comma list of obs columns [default: those PREPARE recorded].")
@click.option("--max-tokens", default=4096, type=int, help="Encoder input cap: cells with more expressed genes get a seeded random subset at load time.")
@click.option("--shard-size", default=50_000, type=int, help="Cells per shard (bounds the loader's memory).")
@click.option("--seed", default=0, type=int, help="Seed recorded for the loader.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@_user_errors
def tokenize(train, test, outdir, genes, condition_keys, max_tokens, shard_size, seed, progress) -> None:
    """TOKENIZE: sparse (gene id, count) tokens over a fixed vocabulary, sharded."""
    from .tokens import tokenize as run

    run(
        train,
        outdir,
        test_path=test,
        genes=genes,
        condition_keys=None if condition_keys is None else _keys(condition_keys),
        max_tokens=max_tokens,
        shard_size=shard_size,
        seed=seed,
        progress=progress,
    )


def _training_options(*, lr: float, batch_size: int | None, betas: str, decay_frac: float, decay_shape: str, ema: float | None, min_steps: int):
    """Options of the shared training loop (train.py), with per-stage defaults."""

    def deco(fn):
        opts = [
            click.option("--epochs", default=100.0, type=float, help="Training length in passes over the data."),
            click.option("--min-steps", default=min_steps, type=int, show_default=True,
                         help="At least this many optimiser steps, however few epochs that is (small datasets need more "
                              "passes; 0 = --epochs alone). Ignored with --max-steps."),
            click.option("--max-steps", default=None, type=int, help="Training length in optimiser steps (overrides --epochs and --min-steps)."),
            click.option("--batch-size", default=batch_size, type=int,
                         help="Cells per batch." if batch_size is not None else
                         f"Cells per batch [default: {VAE_BATCH_SIZE_GPU} on a GPU, {VAE_BATCH_SIZE_CPU} on a CPU]."),
            click.option("--lr", default=lr, type=float, help="Peak learning rate (AdamW)."),
            click.option("--weight-decay", default=0.0, type=float, help="AdamW weight decay."),
            click.option("--betas", default=betas, help="AdamW betas, 'b1,b2'."),
            click.option("--warmup-frac", default=0.1, type=float, help="Fraction of steps of linear warmup."),
            click.option("--decay-frac", default=decay_frac, type=float, help="Fraction of steps of the final decay (warmup-stable-decay)."),
            click.option("--decay-shape", type=click.Choice(["sqrt", "cosine", "linear"]), default=decay_shape, help="Shape of the decay."),
            click.option("--grad-clip", default=10.0, type=float, help="Gradient-norm clipping (0 = off)."),
            click.option("--ema-decay", default=ema, type=float, help="EMA decay of the weights (0 = no EMA)."),
            click.option("--ema-warmup/--no-ema-warmup", default=True, show_default=True,
                         help="EMA decay min(--ema-decay, (1+n)/(10+n)) at step n, so the average forgets the random "
                              "initial weights on short runs."),
            click.option("--checkpoint-every", default=1000, type=int, help="Checkpoint every N steps (and at the end)."),
            click.option("--seed", default=0, type=int, help="Seed of initialisation, data order and every random draw."),
            click.option("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ..."),
            click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", help="auto = bf16 autocast on CUDA; on a CPU, bf16 for the DiT prior where the CPU computes bf16 natively (AVX512-BF16 or AMX) and fp32 for the VAE (measured faster); bf16 = autocast on any device."),
            click.option("--threads", default=None, type=int, help="CPU threads for torch [default: torch's choice]."),
            click.option("--resume", is_flag=True, help="Continue from the checkpoint in --outdir."),
            click.option("--progress/--no-progress", default=True, help="Show a progress bar."),
        ]
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return deco


def _train_config(kw: dict):
    from .train import TrainConfig

    try:
        b1, b2 = (float(x) for x in kw.pop("betas").split(","))
    except ValueError:
        raise InputError("--betas must be two numbers 'b1,b2'") from None
    if kw.get("threads"):
        import torch

        torch.set_num_threads(kw["threads"])
    try:
        return TrainConfig(
            max_steps=1,  # set from --epochs/--max-steps by the stage
            batch_size=kw["batch_size"],
            lr=kw["lr"],
            weight_decay=kw["weight_decay"],
            betas=(b1, b2),
            warmup_frac=kw["warmup_frac"],
            decay_frac=kw["decay_frac"],
            decay_shape=kw["decay_shape"],
            grad_clip=kw["grad_clip"] or None,
            ema_decay=kw["ema_decay"] or None,
            ema_warmup=kw["ema_warmup"],
            checkpoint_every=kw["checkpoint_every"],
            seed=kw["seed"],
            device=kw["device"],
            precision=kw["precision"],
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None


def default_vae_batch_size(device: str) -> int:
    """TRAIN_VAE's batch for `--device` when --batch-size is not given (see VAE_BATCH_SIZE_CPU)."""
    from .train import resolve_device

    try:
        kind = resolve_device(device).type
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return VAE_BATCH_SIZE_CPU if kind == "cpu" else VAE_BATCH_SIZE_GPU


def default_vae_decode_genes(device: str) -> int:
    """TRAIN_VAE's genes per cell in the loss for `--device` when --decode-genes is not given (see VAE_DECODE_GENES_CPU)."""
    from .train import resolve_device

    try:
        kind = resolve_device(device).type
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return VAE_DECODE_GENES_CPU if kind == "cpu" else VAE_DECODE_GENES_GPU


def _run_training(fn, *args, **kwargs):
    """Run a training stage, turning its refusals into one-line errors."""
    from .train import NonFiniteLossError

    try:
        return fn(*args, **kwargs)
    except NonFiniteLossError as exc:
        raise InputError(str(exc)) from None
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(str(exc)) from None


@main.command("train-vae")
@click.option("--tokens", "tokens", required=True, type=click.Path(file_okay=False, exists=True), help="TOKENIZE output folder.")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoint.pt, config.json, history.csv).")
@click.option("--preset", type=click.Choice(["default", "tiny"]), default="default", help="Model sizes: the official ones, or tiny (tests).")
@click.option("--embedding", type=click.Choice(["concat", "multiplicative", "gene_count"]), default=None, help="Token embedding: paper eq. 9 (concat), official E_g*log1p(x), or concat plus a per-gene count direction (gene_count) [default: the preset's].")
@click.option("--gene-head/--no-gene-head", default=None, help="Per-gene readout vector added to the decoder's shared head [default: the preset's].")
@click.option("--pooled-head", type=click.IntRange(min=0), default=None, help="k > 0: per-gene linear readout of the cell pooled by k learned queries over the decoder's latent tokens (measured mixed: better on pbmc3k, worse on sc_mixology; BENCHMARKS.md) [default: 0, off].")
@click.option("--likelihood", type=click.Choice(["nb", "nb_cell", "zinb", "poisson", "gaussian"]), default=None, help="Count likelihood [default: nb].")
@click.option("--variational/--deterministic", default=None, help="Gaussian posterior with KL (beta-VAE) or the official deterministic encoder [default: the preset's].")
@click.option("--beta", default=None, type=float, help="KL weight (variational only).")
@click.option("--gene-bias/--no-gene-bias", default=None, help="Per-gene offset on the decoder's logits, initialised from the data's mean profile [default: the preset's].")
@click.option("--count-encoding", type=click.Choice(["linear", "fourier"]), default=None, help="How a token's count enters the embedding: log1p(x) times a direction (paper), or bounded Fourier features of log1p(x) that the encoder's layer norms do not saturate (measured no better on either benchmark dataset; BENCHMARKS.md) [default: the preset's].")
@click.option("--depth-features/--no-depth-features", default=None, help="Give the encoder the cell's depth (log total count and log number of expressed genes of its tokens; measured: lower test RE on pbmc3k, higher on sc_mixology, BENCHMARKS.md) [default: the preset's].")
@click.option("--count-readout", type=click.IntRange(min=0), default=None, help="k > 0: a linear readout of every token's count beside the encoder's MCAB pooling, the sum over tokens of log1p(x_g) times a learned per-gene k-vector, mapped into the pooled latent tokens (as scVI's first layer reads counts); 0 = off. Larger k reconstructs test cells more closely (higher PCC, lower MSE) but fits small training sets more (BENCHMARKS.md, 'Linear count readout') [default: the preset's, 64; tiny 4].")
@click.option("--readout-dropout", type=click.FloatRange(0, 1, max_open=True), default=None, help="With --count-readout: in training, leave each token out of the readout's sum with this probability (inverted dropout; a ridge-like penalty on the per-gene readout, which keeps a large --count-readout from memorising a small training set; BENCHMARKS.md, 'Readout dropout'); 0 = off [default: the preset's, 0.2].")
@click.option("--decode-genes", default=None, type=int, help=f"Genes per cell in the loss (a random subset each step; 0 = all) [default: {VAE_DECODE_GENES_GPU} on a GPU, {VAE_DECODE_GENES_CPU} on a CPU].")
@click.option("--subset", type=click.Choice(["stratified", "cell", "batch"]), default="stratified", show_default=True, help="Decoded genes of a cell: stratified (its expressed genes first, then unexpressed ones, importance-weighted; lower test RE, higher PCC on both benchmark datasets, BENCHMARKS.md), uniform per cell, or uniform once per batch.")
@click.option("--zero-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.25, show_default=True, help="With --subset stratified: the least share of the decoded genes drawn from a cell's unexpressed genes.")
@click.option("--max-tokens", default=None, type=int, help="Encoder input cap [default: the manifest's].")
@click.option("--theta-lr-scale", default=10.0, type=float, show_default=True, help="Learning-rate multiplier of the per-gene NB dispersions during training (nb, zinb; no effect on the others). At 1 they barely move from their start in a CPU-length run; 10 gave a lower test RE on both benchmark datasets at 2,400 steps (BENCHMARKS.md).")
@click.option("--gene-lr-scale", default=1.0, type=float, show_default=True, help="Learning-rate multiplier of the other per-gene tables (gene embedding, decoder readout, decoder bias, pooled readout; the count directions have --count-lr-scale). 10 reached about the quality of 1 in half the steps on both benchmark datasets, but at 2,400 steps it raised pbmc3k's test RE, so 1 is the default (BENCHMARKS.md).")
@click.option("--count-lr-scale", default=1.0, type=float, show_default=True, help="Learning-rate multiplier of the encoder's per-gene count directions (embedding gene_count; no effect on the others). 10 and 30 raised the per-gene PCC on both benchmark datasets and 30 lowered sc_mixology's test RE, but both raised pbmc3k's test RE, so 1 is the default (BENCHMARKS.md).")
@click.option("--refit-dispersion/--no-refit-dispersion", default=False, show_default=True, help="After training, refit the per-gene NB dispersions by maximum likelihood on the training cells, every other weight fixed (nb, zinb). Lowers test RE where the VAE underfits, raises it where the decoder has begun to fit its training cells (BENCHMARKS.md).")
@_training_options(lr=1e-3, batch_size=None, betas="0.9,0.95", decay_frac=0.1, decay_shape="sqrt", ema=None, min_steps=VAE_MIN_STEPS)
@_user_errors
def train_vae_cmd(tokens, outdir, preset, embedding, gene_head, pooled_head, likelihood, variational, beta, gene_bias, depth_features, count_encoding, count_readout, readout_dropout, decode_genes, subset, zero_fraction, max_tokens, theta_lr_scale, gene_lr_scale, count_lr_scale, refit_dispersion, **kw) -> None:
    """TRAIN_VAE: train the exchangeable Transformer VAE (MCAB encoder/decoder)."""
    from .train_vae import VAERunConfig, train_vae

    if decode_genes is None:
        decode_genes = default_vae_decode_genes(kw["device"])
    overrides = {k: v for k, v in dict(embedding=embedding, gene_head=gene_head, pooled_head=pooled_head, likelihood=likelihood, variational=variational, beta=beta, gene_bias=gene_bias, depth_features=depth_features, count_encoding=count_encoding, count_readout=count_readout, readout_dropout=readout_dropout).items() if v is not None}
    run = VAERunConfig(preset=preset, model_overrides=overrides, epochs=kw["epochs"], min_steps=kw["min_steps"], max_steps=kw["max_steps"], decode_genes=decode_genes, subset=subset, zero_fraction=zero_fraction, max_tokens=max_tokens, theta_lr_scale=theta_lr_scale, gene_lr_scale=gene_lr_scale, count_lr_scale=count_lr_scale, refit_dispersion=refit_dispersion)
    if kw["batch_size"] is None:
        kw["batch_size"] = default_vae_batch_size(kw["device"])
    tcfg = _train_config(kw)
    _run_training(train_vae, tokens, outdir, run, tcfg, resume=kw["resume"], progress=kw["progress"])


@main.command()
@click.option("--vae", "vae", required=True, type=click.Path(file_okay=False, exists=True), help="TRAIN_VAE run folder.")
@click.option("--tokens", "tokens", required=True, type=click.Path(file_okay=False, exists=True), help="TOKENIZE output folder (same vocabulary).")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Where latents.npz, latents.json, reconstruction.json go.")
@click.option("--batch-size", default=256, type=int, help="Cells per batch.")
@click.option("--max-cells", default=10_000, type=int, help="At most this many test cells (seeded, file order) in the reconstruction metrics.")
@click.option("--seed", default=0, type=int, help="Seed of the NB sample and the subset.")
@click.option("--device", default="auto", help="auto, cpu, cuda, ...")
@click.option("--weights", type=click.Choice(["auto", "ema", "model"]), default="auto", help="Which VAE weights (auto: EMA if kept).")
@click.option("--threads", default=None, type=int, help="CPU threads for torch.")
@click.option("--refine-steps", default=0, type=click.IntRange(min=0), show_default=True, help="Refine every latent (train and test) with this many Adam steps on its cell's own likelihood over all genes, decoder fixed (semi-amortised inference). Costs about as many decoder passes per cell; reconstruction.json then reports the refined and the encoder's metrics (BENCHMARKS.md, \"Latent refinement\").")
@click.option("--refine-lr", default=0.1, type=click.FloatRange(min=0, min_open=True), show_default=True, help="Adam learning rate of --refine-steps.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr (refinement only).")
@_user_errors
def encode(vae, tokens, outdir, batch_size, max_cells, seed, device, weights, threads, refine_steps, refine_lr, progress) -> None:
    """ENCODE: latents of train/test cells and reconstruction metrics on test cells."""
    from .encode import encode as run

    if threads:
        import torch

        torch.set_num_threads(threads)
    run(vae, tokens, outdir, batch_size=batch_size, max_cells=max_cells, seed=seed, device=device, weights=weights,
        refine_steps=refine_steps, refine_lr=refine_lr, progress=progress)


@main.command("train-prior")
@click.option("--latents", "latents", required=True, type=click.Path(dir_okay=False, exists=True), help="ENCODE's latents.npz (latents.json beside it).")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoint.pt, config.json, history.csv).")
@click.option("--preset", type=click.Choice(["default", "tiny"]), default="default", help="DiT sizes: default (256 wide, 8 blocks, 8 heads) or tiny.")
@click.option("--rho", default=0.2, type=float, help="Label dropout: each attribute is replaced by its null token with this probability, independently.")
@click.option("--standardize/--no-standardize", default=True, help="Standardise latents with train statistics (stored in the run).")
@_training_options(lr=5e-4, batch_size=256, betas="0.9,0.999", decay_frac=1.0, decay_shape="cosine", ema=0.999, min_steps=PRIOR_MIN_STEPS)
@_user_errors
def train_prior_cmd(latents, outdir, preset, rho, standardize, **kw) -> None:
    """TRAIN_PRIOR: train the DiT flow-matching prior with per-attribute label dropout."""
    from .train_prior import PriorRunConfig, train_prior

    run = PriorRunConfig(preset=preset, epochs=kw["epochs"], min_steps=kw["min_steps"], max_steps=kw["max_steps"], rho=rho, standardize=standardize)
    tcfg = _train_config(kw)
    _run_training(train_prior, latents, outdir, run, tcfg, resume=kw["resume"], progress=kw["progress"])


def _parse_scales(values: tuple[str, ...]) -> tuple[float, dict[str, float] | None]:
    scale, per = 1.0, {}
    for v in values:
        if "=" in v:
            k, x = v.split("=", 1)
            try:
                per[k.strip()] = float(x)
            except ValueError:
                raise InputError(f"--cfg-scale '{v}': expected a number or key=number") from None
        else:
            try:
                scale = float(v)
            except ValueError:
                raise InputError(f"--cfg-scale '{v}': expected a number or key=number") from None
    return scale, per or None


@main.command()
@click.option("--vae", "vae", required=True, type=click.Path(file_okay=False, exists=True), help="TRAIN_VAE run folder.")
@click.option("--prior", "prior_dir", default=None, type=click.Path(file_okay=False, exists=True), help="TRAIN_PRIOR run folder (not needed with --prior-kind gaussian).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Output h5ad.")
@click.option("--n-cells", default=None, type=int, help="Number of cells to generate (with --condition).")
@click.option("--condition", "conditions", multiple=True, help="key=value, repeatable; unrequested keys are marginalised.")
@click.option("--conditions", "requests", default=None, help="Several requests of --n-cells cells each: 'k=v,k2=v2;k=v3' (';' between requests).")
@click.option("--like", default=None, type=click.Path(dir_okay=False, exists=True), help="One generated cell per cell of this h5ad, with its labels.")
@click.option("--guidance", type=click.Choice(["joint", "additive"]), default="joint", help="Classifier-free guidance: joint (paper eq. 11) or additive (CFGen).")
@click.option("--cfg-scale", "cfg_scale", multiple=True, default=("1.0",), help="Guidance weight w, or key=w per attribute (additive); repeatable.")
@click.option("--method", type=click.Choice(["euler", "heun", "dopri5"]), default="heun", help="ODE sampler.")
@click.option("--n-steps", default=2, type=int, help="Steps of the fixed-step samplers (Heun 2 = 4 network evaluations: within 1.4% of dopri5's W2 on all eight models in BENCHMARKS.md).")
@click.option("--atol", default=1e-5, type=float, help="dopri5 absolute tolerance.")
@click.option("--rtol", default=1e-5, type=float, help="dopri5 relative tolerance.")
@click.option("--counts", type=click.Choice(["sample", "mean"]), default="sample", help="NB draws or the NB mean.")
@click.option("--library-size", "library", type=click.Choice(["model", "like"]), default="model", help="Per-condition log-normal from training, or the --like cells' own totals.")
@click.option("--prior-kind", "prior_kind", type=click.Choice(["ldm", "gaussian"]), default="ldm", help="The DiT prior, or N(0, I) (the paper's ablation).")
@click.option("--weights", type=click.Choice(["auto", "ema", "model"]), default="auto", help="Prior weights (auto: EMA if kept).")
@click.option("--genes", "genes", default=None, help="Output genes: comma list or @file (one per line) [default: all model genes].")
@click.option("--shard", default=None, help="Generate only cells start:stop of the request (for scattering).")
@click.option("--replicate", default=0, type=int, help="Replicate number (a different draw with the same seed).")
@click.option("--batch-size", default=512, type=int, help="Cells per batch.")
@click.option("--seed", default=0, type=int, help="Seed.")
@click.option("--keep-latents", is_flag=True, help="Store the latents in obsm['X_latent'].")
@click.option("--device", default="auto", help="auto, cpu, cuda, ...")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", help="Network arithmetic: auto = bf16 autocast where the device has native bf16 (CUDA, CPUs with AVX512-BF16 or AMX), else fp32.")
@click.option("--threads", default=None, type=int, help="CPU threads for torch.")
@_user_errors
def sample(vae, prior_dir, out, n_cells, conditions, requests, like, guidance, cfg_scale, method, n_steps, atol, rtol, counts, library, prior_kind, weights, genes, shard, replicate, batch_size, seed, keep_latents, device, precision, threads) -> None:
    """SAMPLE: generate cells (integer counts) conditioned on any subset of the labels."""
    from .generate import SampleConfig, parse_conditions, run_sample

    if threads:
        import torch

        torch.set_num_threads(threads)
    scale, per = _parse_scales(cfg_scale)
    cfg = SampleConfig(
        guidance=guidance, cfg_scale=scale, cfg_scales=per, method=method, n_steps=n_steps, atol=atol, rtol=rtol,
        batch_size=batch_size, seed=seed, replicate=replicate, counts=counts, library=library, prior=prior_kind,
        weights=weights, keep_latents=keep_latents, precision=precision,
    )
    gene_list = None
    if genes:
        if genes.startswith("@"):
            path = Path(genes[1:])
            if not path.exists():
                raise InputError(f"--genes {genes}: file does not exist")
            gene_list = [g.strip() for g in path.read_text().splitlines() if g.strip()]
        else:
            gene_list = [g.strip() for g in genes.split(",") if g.strip()]
    span = None
    if shard:
        try:
            a, b = (int(x) for x in shard.split(":"))
        except ValueError:
            raise InputError(f"--shard '{shard}': expected start:stop") from None
        span = (a, b)
    from .generate import parse_requests

    if requests and conditions:
        raise InputError("use either --condition (one request) or --conditions (several), not both")
    wanted = parse_requests(requests) if requests else parse_conditions(conditions)
    run_sample(vae, prior_dir, out, cfg, n_cells=n_cells, conditions=wanted, like=like, genes=gene_list, shard=span, device=device)


@main.command()
@click.argument("shards", nargs=-1, type=click.Path(dir_okay=False, exists=True))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Gathered h5ad.")
@_user_errors
def gather(shards, out) -> None:
    """Concatenate SAMPLE shards into one h5ad (ordered by replicate and cell index)."""
    from .generate import gather as run

    run(list(shards), out)


@main.command()
@click.option("--real", "real", required=True, type=click.Path(dir_okay=False, exists=True), help="Real test cells (PREPARE's test.h5ad: counts, labels, var['highly_variable']).")
@click.option("--generated", "generated", required=True, type=click.Path(dir_okay=False, exists=True), help="Generated cells (gathered SAMPLE output, obs['replicate']).")
@click.option("--outdir", required=True, type=click.Path(file_okay=False), help="Where metrics.json and metrics_mqc.tsv go.")
@click.option("--condition-keys", default=None, help="Comma list of obs columns [default: those PREPARE recorded].")
@click.option("--reconstruction", default=None, type=click.Path(dir_okay=False, exists=True), help="ENCODE's reconstruction.json, carried into metrics.json.")
@click.option("--dataset", default=None, help="Dataset name recorded in metrics.json.")
@click.option("--n-pcs", default=30, type=int, help="PCs of the feature space.")
@click.option("--max-cells", default=None, type=int, help="Seeded subsample cap per side for the kNN/MMD metrics [default: the metrics module's].")
@click.option("--floor/--no-floor", default=True, help="Also compute the real-vs-real floor (two halves of the real cells).")
@click.option("--min-cells-per-class", default=20, type=int, help="Classes with fewer cells on either side are skipped (and listed) in the per-class metrics.")
@click.option("--seed", default=0, type=int, help="Seed of every subsample.")
@_user_errors
def evaluate(real, generated, outdir, condition_keys, reconstruction, dataset, n_pcs, max_cells, floor, min_cells_per_class, seed) -> None:
    """EVALUATE: W2, MMD², FD, 1-NN, PRDC, kNN-F1, TSTR overall and per class, over replicates."""
    from .evaluate import run_evaluate

    run_evaluate(
        real, generated, outdir, condition_keys=None if condition_keys is None else _keys(condition_keys),
        reconstruction=reconstruction, dataset=dataset, seed=seed, n_pcs=n_pcs, max_cells=max_cells, floor=floor,
        min_cells_per_class=min_cells_per_class,
    )


@main.command()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The HTML report to write.")
@click.option("--dataset", default=None, help="Dataset name in the title [default: from metrics.json / prepare.json].")
@click.option("--prepare", "prepare_json", default=None, help="PREPARE's prepare.json.")
@click.option("--manifest", default=None, help="TOKENIZE's manifest.json (or the tokens folder).")
@click.option("--vae-history", default=None, help="TRAIN_VAE's history.csv (or the run folder); config.json beside it is read too.")
@click.option("--prior-history", default=None, help="TRAIN_PRIOR's history.csv (or the run folder); config.json beside it is read too.")
@click.option("--reconstruction", default=None, help="ENCODE's reconstruction.json.")
@click.option("--metrics", default=None, help="EVALUATE's metrics.json.")
@click.option("--real", default=None, help="Real test cells (PREPARE's test.h5ad), for the UMAP and marker genes.")
@click.option("--generated", default=None, help="Generated cells (gathered SAMPLE output), for the UMAP and marker genes.")
@click.option("--baseline", "baselines", multiple=True, help="NAME=metrics.json of a baseline evaluated the same way; repeatable.")
@click.option("--trace", default=None, help="Nextflow execution trace (tab-separated) for per-task wall times.")
@click.option("--max-cells", default=3000, type=int, help="At most this many cells per side in the UMAP and dot plot (seeded subsample).")
@click.option("--marker-key", default=None, help="Condition key whose classes get marker genes [default: the first with >= 2 classes].")
@click.option("--n-markers", default=3, type=int, help="Top marker genes per class in the dot plot.")
@click.option("--seed", default=0, type=int, help="Seed of the subsample and the UMAP.")
@_user_errors
def report(out, dataset, prepare_json, manifest, vae_history, prior_history, reconstruction, metrics, real, generated, baselines, trace, max_cells, marker_key, n_markers, seed) -> None:
    """REPORT: one self-contained HTML page (tables, training curves, UMAPs, marker genes) for a dataset."""
    from .report import make_report, parse_baselines

    make_report(
        out, dataset=dataset, prepare=prepare_json, manifest=manifest, vae_history=vae_history, prior_history=prior_history,
        reconstruction=reconstruction, metrics=metrics, real=real, generated=generated, baselines=parse_baselines(baselines),
        trace=trace, max_cells=max_cells, seed=seed, marker_key=marker_key, n_markers=n_markers,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
