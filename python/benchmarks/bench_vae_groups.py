"""Where a VAE's reconstruction wins or loses against scVI: per label group and per gene-expression quintile.

ENCODE's Table 1 metrics are one number per test set. This breaks the test cells' reconstruction down, for one
or more trained sclatent VAEs and for scVI trained here on the same cells and genes:

- per label group (a combination of the condition keys, e.g. cell_line x protocol; a held-out combination shows
  up as its own row): the NB negative log-likelihood summed over genes (RE, mean over the group's cells) and the
  *within-group* per-gene PCC of the NB mean (Pearson r per gene across the group's cells on log1p CP10k, nanmean
  over genes): how much of the variation between cells of one type the means follow;
- per quintile of the genes' detection rate in the training cells: the per-gene PCC of the NB mean across all
  test cells and the RE restricted to those genes.

All metrics use the NB mean (no sampling), every test cell and every gene.

With --refine-steps N every model gets a second row with its test latents refined (semi-amortised inference):
N Adam steps on each cell's latent for its own NB likelihood over all genes, decoder fixed, the best latent per
cell kept. Our VAEs go through `sclatent.refine.refine_latents` (what `encode --refine-steps` runs); scVI's
posterior means get the same optimiser, learning rate, steps and objective (the NLL alone, no KL term), so
the comparison refines both or neither.

    python python/benchmarks/bench_vae_groups.py --data <PREPARE folder> --tokens <TOKENIZE folder> \\
        --vae default=runs/a --vae count30=runs/b --scvi-epochs 200 --seed 0 [--refine-steps 30] --out groups.json

Prints the two tables (markdown) and writes every number to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table  # noqa: E402

N_BINS = 5
MIN_GROUP_CELLS = 10  # smaller groups have too few cells for a per-gene r


def log_norm(x: np.ndarray) -> np.ndarray:
    """log1p(1e4 x / row total) of a dense (n, G) matrix (ENCODE's space)."""
    from sclatent.metrics import _log_norm_rows

    return _log_norm_rows(np.asarray(x, dtype=np.float64))


def pcc_per_gene(truth: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(G,) Pearson r per gene across cells between log-normalised NB means and truth; NaN for constant genes."""
    from sclatent.metrics import _pearson_columns

    return _pearson_columns(log_norm(mean), log_norm(truth))


@torch.no_grad()
def vae_test_reconstruction(vae_dir: Path, tokens: Path, refine_steps: int = 0, refine_lr: float = 0.1
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(truth, NB mean, NB NLL), each (n_test, G) in file order, and the vocabulary, for a TRAIN_VAE run
    (its encoder's latents, or those refined with `refine_steps` Adam steps)."""
    from sclatent.nn.vae import encoded_chunks
    from sclatent.refine import refine_latents
    from sclatent.tokens import TokenLoader, read_manifest
    from sclatent.train_vae import check_vocabulary, load_vae

    model, cfg = load_vae(vae_dir, map_location="cpu")
    model.eval()
    manifest = read_manifest(tokens)
    check_vocabulary(cfg, manifest, what=str(tokens))
    G = int(manifest["n_genes"])
    loader = TokenLoader(tokens, "test", batch_size=256, shuffle=False, seed=0)
    genes = torch.arange(1, G + 1)
    truth, means, nll, index = [], [], [], []
    device = torch.device("cpu")
    for cells, z, lib, target in encoded_chunks(model, loader.iter_epoch(0), np.ones(loader.n_cells, bool), device):
        if refine_steps:
            z, _, _ = refine_latents(model, z, lib, target, steps=refine_steps, lr=refine_lr)  # (c, m, d_latent)
        lik = model.decode(z, genes, lib)  # over (c, G)
        nll.append((-lik.log_prob(target)).double().numpy())
        means.append(lik.mean.double().numpy())
        truth.append(target.double().numpy())
        index.append(cells)
    order = np.argsort(np.concatenate(index), kind="stable")
    return (np.concatenate(truth)[order], np.concatenate(means)[order], np.concatenate(nll)[order],
            list(manifest["genes"]))


def scvi_test_reconstruction(data: Path, genes: list[str], epochs: int, seed: int, refine_steps: int = 0,
                             refine_lr: float = 0.1) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """scVI (scvi_baseline's settings) trained for `epochs` on data/train.h5ad.

    Returns (truth, [(NB mean, NB NLL) of its posterior means] + [(..) of refined latents] if refine_steps, info).
    """
    import scvi_baseline as sb
    from sclatent.nn.likelihoods import NegativeBinomial
    from sclatent.refine import minimise_per_cell

    train, test = sb.load_counts(data / "train.h5ad", genes), sb.load_counts(data / "test.h5ad", genes)
    model, info = sb.train_scvi(train, np.zeros(train.n_obs), "epochs", epochs, seed)
    module = model.module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    x = torch.from_numpy(test.X.toarray().astype(np.float32))  # (n, G)
    batch_index = torch.zeros((x.shape[0], 1), dtype=torch.long)

    def nb_of(z: torch.Tensor) -> NegativeBinomial:
        px = module.generative(z=z, library=library, batch_index=batch_index)["px"]
        return NegativeBinomial(px.mu, px.theta.expand_as(px.mu))

    with torch.no_grad():  # after training: Lightning leaves grad mode on
        inf = module.inference(x=x, batch_index=batch_index)
        z0, library = inf["qz"].loc, inf["library"]  # (n, d_latent), (n, 1)
    latents = [z0]
    if refine_steps:
        # the same procedure as `encode --refine-steps` (sclatent.refine), with scVI's NB NLL as the objective
        def objective(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            nll = -nb_of(z).log_prob(x).sum(dim=1)  # (n,)
            return nll, nll

        best_z, _, _, _ = minimise_per_cell(z0, objective, steps=refine_steps, lr=refine_lr)
        latents.append(best_z)
    out = []
    with torch.no_grad():
        for z in latents:
            nb = nb_of(z)
            out.append((nb.mean.double().numpy(), (-nb.log_prob(x)).double().numpy()))
    return x.double().numpy(), out, info


def group_labels(test_h5ad: Path, keys: list[str]) -> np.ndarray:
    """(n,) 'value1 x value2' per test cell from the condition keys."""
    obs = ad.read_h5ad(test_h5ad, backed="r").obs
    missing = [k for k in keys if k not in obs]
    if missing:
        raise SystemExit(f"bench_vae_groups: {test_h5ad} has no obs column {missing[0]!r}")
    return obs[keys].astype(str).agg(" x ".join, axis=1).to_numpy()


def detection_rate(train_h5ad: Path, genes: list[str]) -> np.ndarray:
    """(G,) fraction of training cells with a non-zero count of each gene."""
    adata = ad.read_h5ad(train_h5ad)[:, genes]
    X = sp.csr_matrix(adata.X)
    return np.asarray((X > 0).mean(axis=0)).ravel()


def breakdown(truth: np.ndarray, mean: np.ndarray, nll: np.ndarray, groups: np.ndarray, rate: np.ndarray) -> dict[str, Any]:
    """Overall, per-group and per-quintile figures of one model (see the module docstring)."""
    r_all = pcc_per_gene(truth, mean)
    out: dict[str, Any] = {"re": float(nll.sum(axis=1).mean()), "pcc_mean_all": float(np.nanmean(r_all)),
                           "groups": {}, "bins": []}
    for g in sorted(set(groups)):
        s = groups == g
        r = pcc_per_gene(truth[s], mean[s]) if s.sum() >= MIN_GROUP_CELLS else np.array([np.nan])
        out["groups"][g] = {"n": int(s.sum()), "re": float(nll[s].sum(axis=1).mean()),
                            "pcc_within": float(np.nanmean(r)) if np.isfinite(r).any() else None}
    edges = np.quantile(rate, np.linspace(0, 1, N_BINS + 1))
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        s = (rate >= a) & ((rate < b) if i < N_BINS - 1 else (rate <= b))
        out["bins"].append({"lo": float(a), "hi": float(b), "n_genes": int(s.sum()),
                            "pcc_mean": float(np.nanmean(r_all[s])), "re": float(nll[:, s].sum(axis=1).mean())})
    return out


def tables(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: per-group RE / within-group PCC, then per-quintile PCC / RE, one column pair per model."""
    names = list(results)
    first = results[names[0]]
    head = ["group", "cells"] + [f"{n} RE ↓" for n in names] + [f"{n} PCC within ↑" for n in names]
    rows = [["all test cells", sum(v["n"] for v in first["groups"].values())]
            + [f"{results[n]['re']:,.1f}" for n in names] + [f"{results[n]['pcc_mean_all']:.3f} (all)" for n in names]]
    for g, v in first["groups"].items():
        rows.append([g, v["n"]] + [f"{results[n]['groups'][g]['re']:,.1f}" for n in names]
                    + ["—" if results[n]["groups"][g]["pcc_within"] is None else f"{results[n]['groups'][g]['pcc_within']:.3f}"
                       for n in names])
    head2 = ["detection rate of the genes", "genes"] + [f"{n} PCC ↑" for n in names] + [f"{n} RE ↓" for n in names]
    rows2 = []
    for i, b in enumerate(first["bins"]):
        rows2.append([f"{b['lo']:.3f}–{b['hi']:.3f}", b["n_genes"]]
                     + [f"{results[n]['bins'][i]['pcc_mean']:.3f}" for n in names]
                     + [f"{results[n]['bins'][i]['re']:,.1f}" for n in names])
    return markdown_table(head, rows) + "\n\n" + markdown_table(head2, rows2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="PREPARE output folder (train.h5ad, test.h5ad)")
    ap.add_argument("--tokens", type=Path, required=True, help="TOKENIZE folder the VAEs were trained on")
    ap.add_argument("--vae", action="append", default=[], help="NAME=RUN_DIR of a TRAIN_VAE run (repeatable)")
    ap.add_argument("--scvi-epochs", type=int, default=0, help="also train scVI for this many epochs (0 = no scVI)")
    ap.add_argument("--keys", default="", help="comma list of obs columns that form the groups [default: the manifest's condition keys]")
    ap.add_argument("--seed", type=int, default=0, help="scVI's seed")
    ap.add_argument("--refine-steps", type=int, default=0, help="also score every model with its test latents refined by this many Adam steps (0 = no)")
    ap.add_argument("--refine-lr", type=float, default=0.1, help="Adam learning rate of --refine-steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="JSON file for every number")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for item in args.vae:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_dir():
            raise SystemExit(f"bench_vae_groups: --vae {item!r} is not NAME=RUN_DIR of an existing folder")
        runs.append((name, Path(path)))
    if not runs:
        raise SystemExit("bench_vae_groups: give at least one --vae NAME=RUN_DIR")
    if args.refine_steps < 0 or not args.refine_lr > 0:
        raise SystemExit(f"bench_vae_groups: --refine-steps must be >= 0 and --refine-lr > 0, got {args.refine_steps}, {args.refine_lr}")
    refined = f" refined {args.refine_steps}"
    from sclatent.tokens import read_manifest

    keys = [k for k in args.keys.split(",") if k] or list(read_manifest(args.tokens)["condition_keys"])
    results: dict[str, dict[str, Any]] = {}
    truth0 = genes = groups = rate = None
    for name, path in runs:
        truth, mean, nll, genes_run = vae_test_reconstruction(path, args.tokens)
        if truth0 is None:
            truth0, genes = truth, genes_run
            groups, rate = group_labels(args.data / "test.h5ad", keys), detection_rate(args.data / "train.h5ad", genes)
        results[name] = breakdown(truth, mean, nll, groups, rate)
        print(f"{name}: RE {results[name]['re']:.1f}, PCC(NB mean, all cells) {results[name]['pcc_mean_all']:.4f}", file=sys.stderr)
        if args.refine_steps:
            _, mean, nll, _ = vae_test_reconstruction(path, args.tokens, args.refine_steps, args.refine_lr)
            results[name + refined] = breakdown(truth, mean, nll, groups, rate)
    if args.scvi_epochs > 0:
        truth, fits, info = scvi_test_reconstruction(args.data, genes, args.scvi_epochs, args.seed, args.refine_steps, args.refine_lr)
        if not np.array_equal(truth, truth0):
            raise SystemExit("bench_vae_groups: scVI's test counts differ from the tokens' (another PREPARE folder?)")
        name = f"scVI {info['epochs']} ep"
        for label, (mean, nll) in zip((name, name + refined), fits):
            results[label] = breakdown(truth, mean, nll, groups, rate)
            results[label]["scvi"] = info
    args.out.write_text(json.dumps({"keys": keys, "results": results, "vaes": {n: str(p) for n, p in runs},
                                    "scvi_epochs": args.scvi_epochs, "seed": args.seed,
                                    "refine_steps": args.refine_steps, "refine_lr": args.refine_lr}, indent=1))
    print(tables(results))


if __name__ == "__main__":
    main()
