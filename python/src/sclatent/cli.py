"""The `sclatent` command line: one subcommand per pipeline step, a thin shell over the package's functions.

Logs go to stderr and results to files. A problem with the user's input prints one line
`sclatent <step>: error: <message>` and exits with status 2, leaving no partial output.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import InputError

log = logging.getLogger("sclatent")

FILE = click.Path(dir_okay=False)
DIR = click.Path(file_okay=False)


def _setup_logging(verbose: int, quiet: bool) -> None:
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # no progress bars either
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level, format="[sclatent %(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )


def _user_errors(fn):
    """Turn InputError (and a training run's refusals) into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import NonFiniteLossError

        try:
            return fn(*args, **kwargs)
        except (InputError, NonFiniteLossError, FileNotFoundError) as exc:
            click.echo(f"sclatent {click.get_current_context().info_name}: error: {exc}", err=True)
            sys.exit(2)
        except ValueError as exc:  # configuration values the dataclasses refuse
            if type(exc).__module__.startswith("torch"):
                raise
            click.echo(f"sclatent {click.get_current_context().info_name}: error: {exc}", err=True)
            sys.exit(2)

    return wrapper


def _keys(value: str | None) -> list[str]:
    """A comma list of obs columns ('' -> [])."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="sclatent")
@click.option("-v", "--verbose", count=True, help="More logging.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """sclatent: scalable latent diffusion (scLDM) for single-cell gene expression."""
    _setup_logging(verbose, quiet)
    from .allocator import tune_malloc

    tune_malloc()


@main.command("version")
@click.argument("package", default="sclatent")
@_user_errors
def version_cmd(package: str) -> None:
    """Print the installed version of PACKAGE (default sclatent), e.g. for a task's versions.yml."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        click.echo(version(package))
    except PackageNotFoundError:
        raise InputError(f"package '{package}' is not installed in {sys.executable}") from None


@main.command("check-samplesheet")
@click.argument("samplesheet", type=FILE)
@click.option(
    "--base-dir",
    default=None,
    help="Folder or URI prefix that relative h5ad paths are resolved against [default: the samplesheet's folder].",
)
@click.option("--check-exists/--no-check-exists", default=True, help="Require local h5ad paths to exist.")
@click.option("--out", default=None, type=FILE, help="Write the normalised samplesheet (absolute paths) here.")
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
@click.option(
    "--samplesheet", required=True, type=FILE, help="Samplesheet CSV: dataset,h5ad[,split][,batch][,condition_keys]."
)
@click.option("--dataset", default=None, help="Which dataset of the samplesheet [default: the only one].")
@click.option("--outdir", required=True, type=DIR, help="Where train.h5ad, test.h5ad and prepare.json go.")
@click.option("--counts-layer", default="X", help="Where the raw counts are: X or a layer name.")
@click.option(
    "--condition-keys",
    default="",
    help="Comma list of obs columns to condition on (the samplesheet's "
    "condition_keys column, when given, takes precedence).",
)
@click.option("--n-hvg", default=2000, type=int, help="Number of highly variable genes to flag (seurat_v3).")
@click.option("--test-fraction", default=0.2, type=float, help="Fraction of the cells of split=all files held out.")
@click.option("--seed", default=0, type=int, help="Seed of the train/test split and the training-cell order.")
@click.option("--min-genes", default=0, type=int, help="QC: drop cells with fewer expressed genes.")
@click.option("--min-cells", default=0, type=int, help="QC: drop genes expressed in fewer cells.")
@click.option("--min-counts", default=0, type=int, help="QC: drop cells with fewer total counts.")
@click.option(
    "--gene-join",
    type=click.Choice(["inner", "outer"]),
    default="inner",
    help="Combine files on their shared genes (inner) or all genes (outer, zeros where absent).",
)
@click.option(
    "--gene-key",
    default=None,
    help="Use this var column (e.g. Ensembl ids) as the gene names instead of var_names, e.g. to match the "
    "vocabulary of a trained model.",
)
@click.option(
    "--holdout",
    default="",
    help="Attribute combinations whose cells go to the test split only, never to training: "
    "'cell_type=X,condition=Y;cell_type=Z' (';' between combinations).",
)
@click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="STAGED=ORIGINAL",
    help="The samplesheet's file STAGED is a copy of ORIGINAL (the pipeline stages its inputs): read STAGED, "
    "name ORIGINAL in messages and prepare.json. Repeatable.",
)
@_user_errors
def prepare(
    samplesheet,
    dataset,
    outdir,
    counts_layer,
    condition_keys,
    n_hvg,
    test_fraction,
    seed,
    min_genes,
    min_cells,
    min_counts,
    gene_join,
    gene_key,
    holdout,
    sources,
) -> None:
    """PREPARE: validate, combine, QC, split and flag HVGs for one dataset.

    The samplesheet has one row per h5ad file: dataset, h5ad (raw integer counts), and optionally split
    (train, test or all), batch, and condition_keys (obs columns separated by ';', the same for every row of
    a dataset; it takes precedence over --condition-keys).
    """
    from .holdout import parse_holdout
    from .io import name_staged_copies, read_samplesheet
    from .prepare import PrepareConfig
    from .prepare import prepare as run

    rows = name_staged_copies(read_samplesheet(samplesheet), list(sources), samplesheet)
    names = sorted({r.dataset for r in rows})
    if dataset is None:
        if len(names) > 1:
            raise InputError(
                f"samplesheet {samplesheet} has {len(names)} datasets ({', '.join(names)}); choose one with --dataset"
            )
        dataset = names[0]
    elif dataset not in names:
        raise InputError(f"samplesheet {samplesheet} has no dataset '{dataset}' (has: {', '.join(names)})")
    sheet_keys = next(r.condition_keys for r in rows if r.dataset == dataset)
    keys = list(sheet_keys) if sheet_keys is not None else _keys(condition_keys)
    cfg = PrepareConfig(
        dataset=dataset,
        counts_layer=counts_layer,
        condition_keys=keys,
        n_hvg=n_hvg,
        test_fraction=test_fraction,
        seed=seed,
        min_genes=min_genes,
        min_cells=min_cells,
        min_counts=min_counts,
        gene_join=gene_join,
        gene_key=gene_key,
        holdout=parse_holdout(holdout),
    )
    run(rows, cfg, outdir)


@main.command()
@click.option("--train", "train", required=True, type=FILE, help="train.h5ad from PREPARE.")
@click.option("--test", "test", default=None, type=FILE, help="test.h5ad from PREPARE (same vocabulary).")
@click.option("--outdir", required=True, type=DIR, help="Output folder (shards + manifest.json).")
@click.option("--genes", type=click.Choice(["hvg", "all"]), default="hvg", help="Vocabulary: PREPARE's HVGs or all.")
@click.option("--condition-keys", default=None, help="Comma list of obs columns [default: those PREPARE recorded].")
@click.option(
    "--max-tokens",
    default=4096,
    type=int,
    help="Encoder input cap: cells with more expressed genes get a seeded random subset of them at load time.",
)
@click.option("--shard-size", default=50_000, type=int, help="Cells per shard (bounds the loader's memory).")
@click.option("--seed", default=0, type=int, help="Seed recorded for the loader.")
@click.option(
    "--model",
    default=None,
    type=click.Path(exists=True),
    help="Tokenize over this model bundle's vocabulary and labels (to run or fine-tune it on new data): vocabulary "
    "genes the file lacks are absent from its tokens, its other genes ignored [default: the file's own vocabulary].",
)
@click.option(
    "--gene-key",
    default=None,
    help="With --model: match genes to the vocabulary by this var column (e.g. Ensembl ids) [default: var_names].",
)
@click.option(
    "--extend",
    is_flag=True,
    help="With --model: add the file's genes (per --genes), label values and condition keys the model lacks, "
    "for a fine-tune (train-vae / train-prior --init-from).",
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@_user_errors
def tokenize(
    train, test, outdir, genes, condition_keys, max_tokens, shard_size, seed, model, gene_key, extend, progress
) -> None:
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
        model=model,
        gene_key=gene_key,
        extend=extend,
    )


def _training_options(*, lr: float, batch_size: int, ema: float | None, min_steps: int):
    """Options of the shared training loop, with each stage's defaults."""
    opts = [
        click.option("--epochs", default=100.0, type=float, help="Training length in passes over the data."),
        click.option(
            "--min-steps",
            default=min_steps,
            type=int,
            help="At least this many optimiser steps however few epochs that is (0 = --epochs alone).",
        ),
        click.option(
            "--max-steps",
            default=None,
            type=int,
            help="Training length in optimiser steps (overrides --epochs and --min-steps).",
        ),
        click.option(
            "--batch-size", default=batch_size, type=int, help="Cells per batch (the global batch under torchrun)."
        ),
        click.option("--lr", default=lr, type=float, help="Peak learning rate (AdamW, warmup-stable-decay)."),
        click.option("--ema-decay", default=ema, type=float, help="EMA decay of the weights (0 = no EMA)."),
        click.option("--checkpoint-every", default=1000, type=int, help="Checkpoint every N steps and at the end."),
        click.option("--seed", default=0, type=int, help="Seed of initialisation, data order and every draw."),
        click.option("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ..."),
        click.option(
            "--precision",
            type=click.Choice(["fp32", "bf16"]),
            default="fp32",
            help="Arithmetic: fp32 (TF32 products on CUDA) or bf16 autocast.",
        ),
        click.option("--threads", default=None, type=int, help="CPU threads for torch [default: torch's choice]."),
        click.option("--resume", is_flag=True, help="Continue the run in --outdir from its checkpoint."),
        click.option(
            "--init-from",
            default=None,
            type=click.Path(exists=True),
            help="Fine-tune: start from this model bundle's weights and architecture (a new optimiser and "
            "schedule on these data; new genes and labels get new rows).",
        ),
        click.option("--progress/--no-progress", default=True, help="Show a progress bar."),
    ]

    def deco(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return deco


def _train_config(kw: dict, **stage_defaults):
    """The TrainConfig of the shared options `kw` and a stage's schedule (`stage_defaults`)."""
    from .train import TrainConfig

    _threads(kw["threads"])
    return TrainConfig(
        max_steps=1,
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        ema_decay=kw["ema_decay"] or None,
        checkpoint_every=kw["checkpoint_every"],
        seed=kw["seed"],
        device=kw["device"],
        precision=kw["precision"],
        **stage_defaults,
    )


@main.command("train-vae")
@click.option("--tokens", required=True, type=click.Path(file_okay=False, exists=True), help="TOKENIZE's folder.")
@click.option("--outdir", required=True, type=DIR, help="Run folder (checkpoint.pt, config.json, history.csv).")
@click.option(
    "--preset",
    type=click.Choice(["default", "scldm", "tiny"]),
    default=None,
    help="default: the authors' sizes with the adopted per-gene additions; scldm: the authors' model as "
    "released; tiny: a small model for tests and CPU demos [default: default, or the --init-from model's].",
)
@click.option(
    "--embedding",
    type=click.Choice(["concat", "multiplicative", "gene_count"]),
    default=None,
    help="Token embedding: paper eq. 9 (concat), the authors' code (multiplicative), or concat with a "
    "per-gene count direction (gene_count) [default: the preset's].",
)
@click.option(
    "--likelihood",
    type=click.Choice(["nb", "zinb", "poisson", "gaussian"]),
    default=None,
    help="Count likelihood of the decoder (gaussian: on log1p(1e4 x / L)) [default: nb, or the --init-from model's].",
)
@click.option(
    "--beta",
    default=None,
    type=click.FloatRange(min=0),
    help="KL weight: 0 = the authors' deterministic encoder, > 0 = a beta-VAE with a Gaussian posterior "
    "[default: 0, or the --init-from model's].",
)
@click.option(
    "--decode-genes",
    default=512,
    type=click.IntRange(min=0),
    help="Genes per cell in the loss: the cell's expressed genes, then importance-weighted unexpressed "
    "ones (0 = every gene).",
)
@click.option("--max-tokens", default=None, type=int, help="Encoder input cap [default: the manifest's].")
@_training_options(lr=1e-3, batch_size=128, ema=None, min_steps=5000)
@_user_errors
def train_vae_cmd(tokens, outdir, preset, embedding, likelihood, beta, decode_genes, max_tokens, **kw) -> None:
    """TRAIN_VAE: train the exchangeable Transformer VAE (MCAB encoder and decoder)."""
    from .train_vae import VAETraining, train_vae

    given = {"likelihood": likelihood, "beta": beta, "embedding": embedding}
    overrides = {k: v for k, v in given.items() if v is not None}
    run = VAETraining(
        preset=preset if preset is not None or kw["init_from"] else "default",
        init_from=kw["init_from"],
        model_overrides=overrides,
        epochs=kw["epochs"],
        min_steps=kw["min_steps"],
        max_steps=kw["max_steps"],
        decode_genes=decode_genes,
        max_tokens=max_tokens,
    )
    tcfg = _train_config(kw, betas=(0.9, 0.95), decay_frac=0.1, decay_shape="sqrt")
    train_vae(tokens, outdir, run, tcfg, resume=kw["resume"], progress=kw["progress"])


@main.command()
@click.option(
    "--model", required=True, type=click.Path(exists=True), help="A TRAIN_VAE run folder or a model bundle (model.pt)."
)
@click.option(
    "--tokens",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="TOKENIZE's folder (the model's vocabulary).",
)
@click.option("--outdir", required=True, type=DIR, help="Where latents.npz, latents.json, reconstruction.json go.")
@click.option("--batch-size", default=256, type=int, help="Cells per batch.")
@click.option(
    "--max-cells",
    default=10_000,
    type=int,
    help="At most this many test cells (a seeded subset, in file order) in the reconstruction metrics.",
)
@click.option("--seed", default=0, type=int, help="Seed of the subset and of the reconstruction's NB sample.")
@click.option("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
@click.option("--threads", default=None, type=int, help="CPU threads for torch.")
@_user_errors
def encode(model, tokens, outdir, batch_size, max_cells, seed, device, threads) -> None:
    """ENCODE: latents of the train and test cells, and reconstruction metrics on the test cells."""
    from .encode import EncodeConfig
    from .encode import encode as run

    _threads(threads)
    run(model, tokens, outdir, EncodeConfig(batch_size=batch_size, max_cells=max_cells, seed=seed, device=device))


@main.command()
@click.option("--model", required=True, type=click.Path(exists=True), help="Model bundle (model.pt) or its folder.")
@click.option("--h5ad", "h5ad", required=True, type=FILE, help="The AnnData to embed (raw counts; any gene panel).")
@click.option("--out", required=True, type=FILE, help="Output h5ad: the input with obsm[KEY] and uns[KEY].")
@click.option("--layer", default="X", help="Where the raw counts are: X or a layer name.")
@click.option(
    "--gene-key",
    default=None,
    help="Match genes to the model's vocabulary by this var column (e.g. Ensembl ids) [default: var_names].",
)
@click.option("--key", default="X_sclatent", help="obsm / uns key of the embedding.")
@click.option("--batch-size", default=256, type=int, help="Cells per encoder batch.")
@click.option("--chunk-size", default=8192, type=int, help="Cells read from the file at a time (bounds memory).")
@click.option("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
@click.option("--threads", default=None, type=int, help="CPU threads for torch.")
@_user_errors
def embed(model, h5ad, out, layer, gene_key, key, batch_size, chunk_size, device, threads) -> None:
    """EMBED: the model's latent representation of every cell of an AnnData, on any gene panel, into obsm."""
    from .embed import embed_h5ad

    _threads(threads)
    embed_h5ad(
        model,
        h5ad,
        out,
        layer=layer,
        gene_key=gene_key,
        key=key,
        batch_size=batch_size,
        chunk_size=chunk_size,
        device=device,
    )


@main.command("train-prior")
@click.option(
    "--latents",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="ENCODE's latents.npz (latents.json beside it).",
)
@click.option("--outdir", required=True, type=DIR, help="Run folder (checkpoint.pt, config.json, history.csv).")
@click.option(
    "--preset",
    type=click.Choice(["default", "tiny"]),
    default=None,
    help="DiT sizes: default (the authors': 256 wide, 8 blocks, 8 heads) or tiny [default: default, or the "
    "--init-from model's].",
)
@click.option(
    "--rho",
    default=0.2,
    type=click.FloatRange(0, 1),
    help="Label dropout: each attribute is replaced by its null token with this probability, independently.",
)
@click.option(
    "--label-dropout",
    type=click.Choice(["independent", "shared"]),
    default="independent",
    help="Label dropout: each attribute on its own (independent) or all of a cell's together (shared).",
)
@_training_options(lr=5e-4, batch_size=256, ema=0.999, min_steps=2000)
@_user_errors
def train_prior_cmd(latents, outdir, preset, rho, label_dropout, **kw) -> None:
    """TRAIN_PRIOR: train the DiT flow-matching prior with label dropout."""
    from .train_prior import PriorTraining, train_prior

    run = PriorTraining(
        preset=preset if preset is not None or kw["init_from"] else "default",
        epochs=kw["epochs"],
        min_steps=kw["min_steps"],
        max_steps=kw["max_steps"],
        rho=rho,
        init_from=kw["init_from"],
        dropout=label_dropout,
    )
    tcfg = _train_config(kw, betas=(0.9, 0.999), decay_frac=1.0, decay_shape="cosine")
    train_prior(latents, outdir, run, tcfg, resume=kw["resume"], progress=kw["progress"])


@main.command()
@click.option("--vae", required=True, type=click.Path(file_okay=False, exists=True), help="TRAIN_VAE run folder.")
@click.option(
    "--prior",
    default=None,
    type=click.Path(file_okay=False, exists=True),
    help="TRAIN_PRIOR run folder trained on that VAE's latents [default: a VAE-only bundle].",
)
@click.option("--out", required=True, type=FILE, help="The model bundle to write (model.pt).")
@click.option(
    "--weights",
    type=click.Choice(["auto", "ema", "model"]),
    default="auto",
    help="Which weights of each run (auto: the EMA when it was kept).",
)
@_user_errors
def bundle(vae, prior, out, weights) -> None:
    """BUNDLE: one model file (weights, configurations, vocabularies, versions) for sampling and the Python API."""
    from .checkpoint import bundle_from_runs

    path = bundle_from_runs(vae, prior, weights=weights).save(out)
    log.info("model bundle -> %s", path)


def _guidance_options(*, n_steps: int, each: str):
    """Options of guided ODE integration and decoding, shared by SAMPLE and TRANSFER."""
    opts = [
        click.option(
            "--guidance",
            type=click.Choice(["joint", "additive"]),
            default="joint",
            help="Classifier-free guidance: joint (paper eq. 11) or additive (CFGen).",
        ),
        click.option(
            "--cfg-scale",
            "cfg_scale",
            multiple=True,
            default=("1.0",),
            help="Guidance weight w, or key=w per attribute (additive); repeatable.",
        ),
        click.option(
            "--unseen",
            type=click.Choice(["analogy", "joint"]),
            default="analogy",
            help="A combination never seen in training, under joint guidance: composed from seen ones (analogy) or "
            "the joint labels as given (joint).",
        ),
        click.option(
            "--unseen-cfg-scale",
            default=2.0,
            type=float,
            help="Joint guidance weight of a combination never seen in training (--cfg-scale applies to the others).",
        ),
        click.option("--method", type=click.Choice(["euler", "heun", "dopri5"]), default="heun", help="ODE solver."),
        click.option("--n-steps", default=n_steps, type=int, help=f"Steps of the fixed-step solvers{each}."),
        click.option("--atol", default=1e-5, type=float, help="dopri5 absolute tolerance."),
        click.option("--rtol", default=1e-5, type=float, help="dopri5 relative tolerance."),
        click.option(
            "--counts", type=click.Choice(["sample", "mean"]), default="sample", help="NB draws or the NB mean."
        ),
    ]

    def deco(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return deco


def _parse_scales(values: tuple[str, ...]) -> tuple[float, dict[str, float] | None]:
    scale, per = 1.0, {}
    for v in values:
        key, sep, number = v.rpartition("=")
        try:
            if sep:
                per[key.strip()] = float(number)
            else:
                scale = float(number)
        except ValueError:
            raise InputError(f"--cfg-scale '{v}': expected a number or key=number") from None
    return scale, per or None


def _sample_config(cfg_scale: tuple[str, ...], **fields: object):
    """The SampleConfig of `sample` and `transfer` from their options (cfg_scale: one weight or key=w pairs)."""
    from .generate import SampleConfig

    scale, per = _parse_scales(cfg_scale)
    return SampleConfig(cfg_scale=scale, cfg_scales=per, **fields)


def _gene_list(genes: str | None) -> list[str] | None:
    if not genes:
        return None
    if genes.startswith("@"):
        path = Path(genes[1:])
        if not path.exists():
            raise InputError(f"--genes {genes}: file does not exist")
        return [g.strip() for g in path.read_text().splitlines() if g.strip()]
    return [g.strip() for g in genes.split(",") if g.strip()]


@main.command()
@click.option("--model", required=True, type=click.Path(exists=True), help="Model bundle (model.pt) from BUNDLE.")
@click.option("--out", required=True, type=FILE, help="Output h5ad.")
@click.option("--n-cells", default=None, type=int, help="Cells to generate per request (with --condition(s)).")
@click.option(
    "--condition", "conditions", multiple=True, help="key=value, repeatable; keys not given are marginalised."
)
@click.option(
    "--conditions",
    "requests",
    default=None,
    help="Several requests of --n-cells cells each: 'k=v,k2=v2;k=v3' (';' between requests).",
)
@click.option(
    "--like",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="One generated cell per cell of this h5ad, with its labels.",
)
@_guidance_options(n_steps=2, each="")
@click.option(
    "--library-size",
    "library",
    type=click.Choice(["model", "like"]),
    default="model",
    help="Per-condition log-normal from training, or the --like cells' own totals.",
)
@click.option(
    "--prior-kind",
    type=click.Choice(["ldm", "gaussian"]),
    default="ldm",
    help="The DiT prior, or N(0, I) (the paper's ablation).",
)
@click.option("--genes", default=None, help="Output genes: a comma list or @file (one per line) [default: all].")
@click.option("--shard", default=None, help="Generate only cells start:stop of the request (for scattering).")
@click.option("--replicate", default=0, type=int, help="Replicate number (another draw with the same seed).")
@click.option("--batch-size", default=512, type=int, help="Cells per batch.")
@click.option("--seed", default=0, type=int, help="Seed.")
@click.option("--keep-latents", is_flag=True, help="Store the latents in obsm['X_latent'].")
@click.option("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    help="Arithmetic of the DiT: fp32 (TF32 products on CUDA) or bf16 autocast; the decoder stays fp32.",
)
@click.option("--threads", default=None, type=int, help="CPU threads for torch.")
@_user_errors
def sample(
    model,
    out,
    n_cells,
    conditions,
    requests,
    like,
    guidance,
    cfg_scale,
    unseen,
    unseen_cfg_scale,
    method,
    n_steps,
    atol,
    rtol,
    counts,
    library,
    prior_kind,
    genes,
    shard,
    replicate,
    batch_size,
    seed,
    keep_latents,
    device,
    precision,
    threads,
) -> None:
    """SAMPLE: generate cells (integer counts) conditioned on any subset of the labels."""
    from .generate import parse_conditions, parse_requests, run_sample

    _threads(threads)
    cfg = _sample_config(
        cfg_scale,
        guidance=guidance,
        unseen=unseen,
        unseen_cfg_scale=unseen_cfg_scale,
        method=method,
        n_steps=n_steps,
        atol=atol,
        rtol=rtol,
        batch_size=batch_size,
        seed=seed,
        replicate=replicate,
        counts=counts,
        library=library,
        prior=prior_kind,
        keep_latents=keep_latents,
        precision=precision,
    )
    span = None
    if shard:
        try:
            span = tuple(int(x) for x in shard.split(":"))
            assert len(span) == 2
        except (ValueError, AssertionError):
            raise InputError(f"--shard '{shard}': expected start:stop") from None
    if requests and conditions:
        raise InputError("use either --condition (one request) or --conditions (several), not both")
    wanted = parse_requests(requests) if requests else parse_conditions(conditions)
    run_sample(
        model,
        out,
        cfg,
        n_cells=n_cells,
        conditions=wanted,
        like=like,
        genes=_gene_list(genes),
        shard=span,
        device=device,
    )


@main.command()
@click.option("--model", required=True, type=click.Path(exists=True), help="Model bundle (model.pt) from BUNDLE.")
@click.option(
    "--h5ad",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Real cells: raw counts and an obs column for every condition key of the model.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    required=True,
    help="key=value (or k=v,k2=v2): the labels the cells are carried to; repeatable; other keys keep the cell's own.",
)
@click.option("--where", multiple=True, help="key=value (or k=v,k2=v2): transfer only the cells with these obs values.")
@click.option(
    "--out", default=None, type=FILE, help="Output h5ad [default: <h5ad name>_transfer.h5ad in the current folder]."
)
@click.option("--layer", default="X", help="Where the raw counts are: X or a layer name.")
@_guidance_options(n_steps=8, each=" (each direction)")
@click.option("--genes", default=None, help="Output genes: a comma list or @file (one per line) [default: all].")
@click.option("--batch-size", default=512, type=int, help="Cells per batch.")
@click.option("--seed", default=0, type=int, help="Seed of the NB draws.")
@click.option("--keep-latents", is_flag=True, help="Store the new latents in obsm['X_latent'].")
@click.option("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    help="Arithmetic of the DiT: fp32 or bf16 autocast; the VAE stays fp32.",
)
@click.option("--threads", default=None, type=int, help="CPU threads for torch.")
@_user_errors
def transfer(
    model,
    h5ad,
    overrides,
    where,
    out,
    layer,
    guidance,
    cfg_scale,
    unseen,
    unseen_cfg_scale,
    method,
    n_steps,
    atol,
    rtol,
    counts,
    genes,
    batch_size,
    seed,
    keep_latents,
    device,
    precision,
    threads,
) -> None:
    """TRANSFER: real cells carried to other labels (counterfactuals): each cell is encoded, its latent integrated
    back to noise under its own labels, then forward under the requested ones, and decoded with its library size."""
    from .generate import parse_conditions
    from .transfer import run_transfer

    _threads(threads)
    cfg = _sample_config(
        cfg_scale,
        guidance=guidance,
        unseen=unseen,
        unseen_cfg_scale=unseen_cfg_scale,
        method=method,
        n_steps=n_steps,
        atol=atol,
        rtol=rtol,
        batch_size=batch_size,
        seed=seed,
        counts=counts,
        keep_latents=keep_latents,
        precision=precision,
    )
    cfg.validate()
    wanted = parse_conditions([p for item in overrides for p in item.split(",") if p.strip()], option="--set")
    chosen = parse_conditions([p for item in where for p in item.split(",") if p.strip()], option="--where")
    out = out or f"{Path(h5ad).name.removesuffix('.h5ad')}_transfer.h5ad"
    run_transfer(model, h5ad, out, wanted, cfg, where=chosen, layer=layer, genes=_gene_list(genes), device=device)


@main.command()
@click.argument("shards", nargs=-1, type=click.Path(dir_okay=False, exists=True))
@click.option("--out", required=True, type=FILE, help="Gathered h5ad.")
@_user_errors
def gather(shards, out) -> None:
    """Concatenate SAMPLE shards into one h5ad (ordered by replicate and cell index)."""
    from .gather import gather as run

    run(list(shards), out)


@main.command()
@click.option(
    "--real",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Real test cells (PREPARE's test.h5ad: counts, labels, var['highly_variable']).",
)
@click.option(
    "--generated",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Generated cells (GATHER's output, obs['replicate']).",
)
@click.option("--outdir", required=True, type=DIR, help="Where metrics.json and metrics_mqc.tsv go.")
@click.option("--condition-keys", default=None, help="Comma list of obs columns [default: those PREPARE recorded].")
@click.option(
    "--reconstruction",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help="ENCODE's reconstruction.json, carried into metrics.json.",
)
@click.option("--dataset", default=None, help="Dataset name recorded in metrics.json.")
@click.option("--n-pcs", default=30, type=int, help="Principal components of the feature space.")
@click.option(
    "--max-cells",
    default=None,
    type=int,
    help="Seeded subsample cap per side for MMD², 1-NN, PRDC, kNN-F1 and TSTR [default: 10,000].",
)
@click.option(
    "--cells-per-side",
    default=50_000,
    type=int,
    help="Cells read per side (the real cells; each generated replicate): a seeded subsample when there are more.",
)
@click.option(
    "--floor/--no-floor", default=True, help="Also compute the real-vs-real floor (two halves of the real cells)."
)
@click.option(
    "--min-cells-per-class",
    default=20,
    type=int,
    help="Classes with fewer cells on either side are skipped (and listed) in the per-class metrics; at least "
    "11 (k + 1 for the k-NN metrics) whatever is given.",
)
@click.option(
    "--class-max-cells",
    default=1_000,
    type=int,
    help="Per-class metrics use at most this many cells per side of a class (seeded subsample).",
)
@click.option("--seed", default=0, type=int, help="Seed of every subsample.")
@_user_errors
def evaluate(
    real,
    generated,
    outdir,
    condition_keys,
    reconstruction,
    dataset,
    n_pcs,
    max_cells,
    cells_per_side,
    floor,
    min_cells_per_class,
    class_max_cells,
    seed,
) -> None:
    """EVALUATE: W2, MMD², FD, 1-NN, PRDC, kNN-F1, TSTR overall and per class, over replicates."""
    from .evaluate import run_evaluate

    run_evaluate(
        real,
        generated,
        outdir,
        condition_keys=None if condition_keys is None else _keys(condition_keys),
        reconstruction=reconstruction,
        dataset=dataset,
        seed=seed,
        n_pcs=n_pcs,
        max_cells=max_cells,
        cells_per_side=cells_per_side,
        floor=floor,
        min_cells_per_class=min_cells_per_class,
        class_max_cells=class_max_cells,
    )


@main.command()
@click.option("--out", required=True, type=FILE, help="The HTML report to write.")
@click.option("--dataset", default=None, help="Dataset name in the title [default: from metrics.json].")
@click.option("--prepare", "prepare_json", default=None, help="PREPARE's prepare.json.")
@click.option("--manifest", default=None, help="TOKENIZE's manifest.json (or the tokens folder).")
@click.option("--vae-history", default=None, help="TRAIN_VAE's history.csv or run folder (config.json beside it).")
@click.option("--prior-history", default=None, help="TRAIN_PRIOR's history.csv or run folder.")
@click.option("--reconstruction", default=None, help="ENCODE's reconstruction.json.")
@click.option("--metrics", default=None, help="EVALUATE's metrics.json.")
@click.option("--real", default=None, help="Real test cells (PREPARE's test.h5ad), for the UMAP and marker genes.")
@click.option("--generated", default=None, help="Generated cells (GATHER's output), for the UMAP and markers.")
@click.option(
    "--baseline", "baselines", multiple=True, help="NAME=metrics.json of a baseline evaluated the same way; repeatable."
)
@click.option("--trace", default=None, help="Nextflow execution trace (tab-separated) for per-task wall times.")
@click.option(
    "--max-cells",
    default=3000,
    type=int,
    help="At most this many cells per side in the UMAP and dot plot (seeded subsample).",
)
@click.option(
    "--marker-key",
    default=None,
    help="Condition key whose classes get marker genes [default: the first with >= 2 classes].",
)
@click.option("--n-markers", default=3, type=int, help="Top marker genes per class in the dot plot.")
@click.option("--seed", default=0, type=int, help="Seed of the subsample and the UMAP.")
@_user_errors
def report(
    out,
    dataset,
    prepare_json,
    manifest,
    vae_history,
    prior_history,
    reconstruction,
    metrics,
    real,
    generated,
    baselines,
    trace,
    max_cells,
    marker_key,
    n_markers,
    seed,
) -> None:
    """REPORT: one self-contained HTML page (tables, training curves, UMAPs, marker genes) for a dataset."""
    from .report import make_report, parse_baselines

    make_report(
        out,
        dataset=dataset,
        prepare=prepare_json,
        manifest=manifest,
        vae_history=vae_history,
        prior_history=prior_history,
        reconstruction=reconstruction,
        metrics=metrics,
        real=real,
        generated=generated,
        baselines=parse_baselines(baselines),
        trace=trace,
        max_cells=max_cells,
        seed=seed,
        marker_key=marker_key,
        n_markers=n_markers,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
