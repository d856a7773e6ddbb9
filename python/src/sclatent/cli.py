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

log = logging.getLogger("sclatent")


def _setup_logging(verbose: int, quiet: bool) -> None:
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


if __name__ == "__main__":  # pragma: no cover
    main()
